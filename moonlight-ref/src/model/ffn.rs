//! The feed-forward halves of the blocks: a dense SwiGLU FFN, and the MoE layer (DeepSeek-V3:
//! sigmoid router, top-k on score + selection bias, normalized and scaled gates, routed SwiGLU
//! experts stacked as `[E, *, *]` parameters, shared experts always on).
//!
//! ```text
//! SwiGLU:  out = (silu(x W_gate^T) * (x W_up^T)) W_down^T
//! MoE:     s = sigmoid(x W_router^T)                              [N, E]
//!          experts(n) = top-K of s[n] + bias                      (not differentiated)
//!          gates[n, k] = routed_scaling * s_sel / sum(s_sel)      [N, K]
//!          out[n] = shared(x)[n] + sum_k gates[n, k] * expert_k(x[n])
//!          aux = alpha * mean_b sum_i f[b, i] P[b, i]                 (seq_aux, if alpha > 0)
//! ```
//!
//! The sequence-wise balance loss `aux` (DeepSeek-V3) is computed per sequence `b` from the
//! share `f` of its selections each expert got (times E / K, not differentiated) and its mean
//! normalized score `P`; it adds to the training objective, its gradient flows into the router
//! logits, and it is reported apart from the cross-entropy.
//!
//! The routed experts run on grouped rows: the `R = N*K` (token, choice) slots sorted by
//! expert (`moe_dispatch`), the token rows gathered into that order, one product per expert on
//! its row range (`grouped_gemm`), and the outputs combined back per token with the gates.

use muon_core::{ParamRole, ParamSpec, Real, Shape, Transpose};

use super::{declare, linear_backward, linear_forward, Mat, ModelError};
use crate::config::ModelConfig;
use crate::ops::ModelOps;

/// A SwiGLU FFN of width `F` on `N` token rows: parameter indices and buffers.
pub struct SwiGlu<B: ModelOps> {
    w_gate: usize,   // [F, C]
    w_up: usize,     // [F, C]
    w_down: usize,   // [C, F]
    h_gate: Mat<B>,  // [N, F] cache: x W_gate^T
    h_up: Mat<B>,    // [N, F] cache: x W_up^T
    act: Mat<B>,     // [N, F] cache: silu(h_gate) * h_up
    dact: Mat<B>,    // [N, F] scratch
    dh_gate: Mat<B>, // [N, F]
    dh_up: Mat<B>,   // [N, F]
}

impl<B: ModelOps> SwiGlu<B> {
    /// Declares `{prefix}.w_gate`, `.w_up`, `.w_down` and allocates buffers for `n` rows.
    pub fn new(
        b: &B,
        specs: &mut Vec<ParamSpec>,
        prefix: &str,
        c: usize,
        f: usize,
        n: usize,
    ) -> Result<Self, ModelError> {
        let mut hidden =
            |name: &str, shape: Shape| declare(specs, format!("{prefix}.{name}"), shape, ParamRole::Hidden);
        let w_gate = hidden("w_gate", Shape::matrix(f, c));
        let w_up = hidden("w_up", Shape::matrix(f, c));
        let w_down = hidden("w_down", Shape::matrix(c, f));
        let z = || b.zeros(Shape::matrix(n, f));
        Ok(SwiGlu {
            w_gate,
            w_up,
            w_down,
            h_gate: z()?,
            h_up: z()?,
            act: z()?,
            dact: z()?,
            dh_gate: z()?,
            dh_up: z()?,
        })
    }
}

/// `out = swiglu(x)`. x: `[N, C]`, out: `[N, C]` (overwritten).
pub fn swiglu_forward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    s: &mut SwiGlu<B>,
    x: &Mat<B>,       // [N, C]
    out: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    linear_forward(b, &mut s.h_gate, x, &p[s.w_gate])?; // h_gate = x W_gate^T   [N, F]
    linear_forward(b, &mut s.h_up, x, &p[s.w_up])?; // h_up = x W_up^T
    b.swiglu_forward(&mut s.act, &s.h_gate, &s.h_up)?; // act = silu(h_gate) * h_up
    linear_forward(b, out, &s.act, &p[s.w_down])?; // out = act W_down^T     [N, C]
    Ok(())
}

/// Backward of [`swiglu_forward`]: accumulates into `g`, overwrites `dx` `[N, C]`.
pub fn swiglu_backward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    g: &mut [Mat<B>],
    s: &mut SwiGlu<B>,
    x: &Mat<B>,      // [N, C]
    dout: &Mat<B>,   // [N, C]
    dx: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    // out = act W_down^T
    linear_backward(
        b,
        &mut s.dact,
        &mut g[s.w_down],
        dout,
        &s.act,
        &p[s.w_down],
        false,
    )?;
    // act = silu(h_gate) * h_up
    b.swiglu_backward(&mut s.dh_gate, &mut s.dh_up, &s.dact, &s.h_gate, &s.h_up)?;
    // h_gate = x W_gate^T, h_up = x W_up^T
    linear_backward(b, dx, &mut g[s.w_gate], &s.dh_gate, x, &p[s.w_gate], false)?;
    linear_backward(b, dx, &mut g[s.w_up], &s.dh_up, x, &p[s.w_up], true)?;
    Ok(())
}

/// An MoE layer: router, routed experts, optional shared experts, selection bias, buffers.
pub struct Moe<B: ModelOps> {
    top_k: usize,
    scaling: f64,
    /// Weight of the sequence-wise balance loss (0: off) and the sequence length it uses.
    aux_alpha: f64,
    seq: usize,
    router: usize, // [E, C]
    w_gate: usize, // [E, F, C]
    w_up: usize,   // [E, F, C]
    w_down: usize, // [E, C, F]
    shared: Option<SwiGlu<B>>,
    /// Selection bias b (a buffer, not a parameter).
    pub(crate) bias: Mat<B>, // [1, E]
    logits: Mat<B>,                 // [N, E] scratch
    scores: Mat<B>,                 // [N, E] cache: sigmoid(logits)
    gates: Mat<B>,                  // [N, K] cache
    pub(crate) experts: B::Indices, // [N*K] cache: chosen experts per slot
    /// Rows routed to each expert in the last forward.
    pub(crate) counts: B::Indices, // [E]
    offsets: B::Indices,            // [E+1] cache
    slot_row: B::Indices,           // [N*K] cache: grouped row of each slot
    row_token: B::Indices,          // [R] cache: token of each grouped row
    xg: Mat<B>,                     // [R, C] cache: token rows in grouped order
    hg: Mat<B>,                     // [R, F] cache: xg W_gate_e^T
    hu: Mat<B>,                     // [R, F] cache: xg W_up_e^T
    act: Mat<B>,                    // [R, F] cache: silu(hg) * hu
    yg: Mat<B>,                     // [R, C] cache: act W_down_e^T
    dyg: Mat<B>,                    // [R, C] scratch
    dact: Mat<B>,                   // [R, F]
    dhg: Mat<B>,                    // [R, F]
    dhu: Mat<B>,                    // [R, F]
    dxg: Mat<B>,                    // [R, C]
    dgates: Mat<B>,                 // [N, K]
    dlogits: Mat<B>,                // [N, E]
    /// The balance loss of the last forward `[1, 1]`, its load fractions `f` `[B, E]` and its
    /// gradient with respect to the logits `[N, E]` (computed in the forward).
    pub(crate) aux_loss: Mat<B>,
    aux_frac: Mat<B>,
    aux_dlogits: Mat<B>,
}

impl<B: ModelOps> Moe<B> {
    /// Declares `{prefix}.router`, `.experts.{w_gate,w_up,w_down}` and `.shared.*`, and
    /// allocates buffers for `batch` sequences of `seq` token rows.
    pub fn new(
        b: &B,
        specs: &mut Vec<ParamSpec>,
        prefix: &str,
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
    ) -> Result<Self, ModelError> {
        let (c, e, k, f) = (cfg.dim, cfg.n_routed_experts, cfg.top_k, cfg.expert_width);
        let n = batch * seq;
        let r = n * k;
        let mut hidden =
            |name: &str, shape: Shape| declare(specs, format!("{prefix}.{name}"), shape, ParamRole::Hidden);
        let router = hidden("router", Shape::matrix(e, c));
        let w_gate = hidden("experts.w_gate", Shape::batched(e, f, c));
        let w_up = hidden("experts.w_up", Shape::batched(e, f, c));
        let w_down = hidden("experts.w_down", Shape::batched(e, c, f));
        let shared = if cfg.n_shared_experts > 0 {
            let width = cfg.n_shared_experts * f;
            Some(SwiGlu::new(b, specs, &format!("{prefix}.shared"), c, width, n)?)
        } else {
            None
        };
        let z = |rows: usize, cols: usize| b.zeros(Shape::matrix(rows, cols));
        // The balance loss's buffers only when it is on.
        let aux = |rows: usize, cols: usize| {
            if cfg.aux_loss_alpha > 0.0 {
                z(rows, cols)
            } else {
                z(0, 0)
            }
        };
        Ok(Moe {
            top_k: k,
            scaling: cfg.routed_scaling,
            aux_alpha: cfg.aux_loss_alpha,
            seq,
            router,
            w_gate,
            w_up,
            w_down,
            shared,
            bias: z(1, e)?,
            logits: z(n, e)?,
            scores: z(n, e)?,
            gates: z(n, k)?,
            experts: b.indices_zeros(r)?,
            counts: b.indices_zeros(e)?,
            offsets: b.indices_zeros(e + 1)?,
            slot_row: b.indices_zeros(r)?,
            row_token: b.indices_zeros(r)?,
            xg: z(r, c)?,
            hg: z(r, f)?,
            hu: z(r, f)?,
            act: z(r, f)?,
            yg: z(r, c)?,
            dyg: z(r, c)?,
            dact: z(r, f)?,
            dhg: z(r, f)?,
            dhu: z(r, f)?,
            dxg: z(r, c)?,
            dgates: z(n, k)?,
            dlogits: z(n, e)?,
            aux_loss: z(1, 1)?,
            aux_frac: aux(batch, e)?,
            aux_dlogits: aux(n, e)?,
        })
    }
}

/// `out = moe(x)`. x: `[N, C]`, out: `[N, C]` (overwritten).
pub fn moe_forward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    m: &mut Moe<B>,
    x: &Mat<B>,       // [N, C]
    out: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    let (one, zero) = (B::Elem::ONE, B::Elem::ZERO);
    linear_forward(b, &mut m.logits, x, &p[m.router])?; // logits = x W_router^T      [N, E]
                                                        // s = sigmoid(logits); experts = top-K(s + bias); gates = scaling * s_sel / sum s_sel
    b.router_forward(
        &mut m.scores,
        &mut m.gates,
        &mut m.experts,
        &m.logits,
        &m.bias,
        m.scaling,
    )?;
    if m.aux_alpha > 0.0 {
        // aux = alpha mean_b sum_i f[b,i] P[b,i], and d(aux)/d(logits) for the backward.
        b.router_seq_aux(
            &mut m.aux_loss,
            &mut m.aux_frac,
            &mut m.aux_dlogits,
            &m.scores,
            &m.experts,
            m.seq,
            m.aux_alpha,
        )?;
    }
    b.moe_dispatch(
        &mut m.counts,
        &mut m.offsets,
        &mut m.slot_row,
        &mut m.row_token,
        &m.experts,
        m.top_k,
    )?;
    b.gather_rows(&mut m.xg, x, &m.row_token)?; // xg = x[row_token]              [R, C]
    let yes = Transpose::Yes;
    b.grouped_gemm(&mut m.hg, one, &m.xg, &p[m.w_gate], yes, &m.offsets, zero)?; // hg = xg W_gate_e^T
    b.grouped_gemm(&mut m.hu, one, &m.xg, &p[m.w_up], yes, &m.offsets, zero)?; // hu = xg W_up_e^T
    b.swiglu_forward(&mut m.act, &m.hg, &m.hu)?; // act = silu(hg) * hu          [R, F]
    b.grouped_gemm(&mut m.yg, one, &m.act, &p[m.w_down], yes, &m.offsets, zero)?; // yg = act W_down_e^T
    match &mut m.shared {
        Some(s) => swiglu_forward(b, p, s, x, out)?, // out = shared(x)
        None => b.fill(out, zero)?,
    }
    b.moe_combine(out, &m.yg, &m.gates, &m.slot_row)?; // out[n] += sum_k gates[n,k] yg[slot]
    Ok(())
}

/// Backward of [`moe_forward`]: accumulates into `g`, overwrites `dx` `[N, C]`. The router
/// weight gets its gradient through the gates; the top-K choice is held fixed.
pub fn moe_backward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    g: &mut [Mat<B>],
    m: &mut Moe<B>,
    x: &Mat<B>,      // [N, C]
    dout: &Mat<B>,   // [N, C]
    dx: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    let (one, zero) = (B::Elem::ONE, B::Elem::ZERO);
    let no = Transpose::No;
    // out[n] += sum_k gates[n,k] yg[slot]: dyg = gates * dout, dgates = dout . yg
    b.moe_combine_backward(&mut m.dyg, &mut m.dgates, dout, &m.yg, &m.gates, &m.slot_row)?;
    // yg = act W_down_e^T: dW_down_e += dyg_e^T act_e, dact = dyg W_down_e
    b.grouped_gemm_weight_grad(&mut g[m.w_down], one, &m.dyg, &m.act, &m.offsets, one)?;
    b.grouped_gemm(&mut m.dact, one, &m.dyg, &p[m.w_down], no, &m.offsets, zero)?;
    // act = silu(hg) * hu
    b.swiglu_backward(&mut m.dhg, &mut m.dhu, &m.dact, &m.hg, &m.hu)?;
    // hg = xg W_gate_e^T, hu = xg W_up_e^T
    b.grouped_gemm_weight_grad(&mut g[m.w_gate], one, &m.dhg, &m.xg, &m.offsets, one)?;
    b.grouped_gemm_weight_grad(&mut g[m.w_up], one, &m.dhu, &m.xg, &m.offsets, one)?;
    b.grouped_gemm(&mut m.dxg, one, &m.dhg, &p[m.w_gate], no, &m.offsets, zero)?;
    b.grouped_gemm(&mut m.dxg, one, &m.dhu, &p[m.w_up], no, &m.offsets, one)?;
    // out = shared(x) (+ ...)
    match &mut m.shared {
        Some(s) => swiglu_backward(b, p, g, s, x, dout, dx)?,
        None => b.fill(dx, zero)?,
    }
    // xg = x[row_token]
    b.scatter_add_slots(dx, &m.dxg, &m.slot_row)?;
    // gates = scaling * s_sel / sum s_sel, s = sigmoid(logits)
    b.router_backward(&mut m.dlogits, &m.dgates, &m.scores, &m.experts, m.scaling)?;
    if m.aux_alpha > 0.0 {
        // + the balance loss's own gradient (its weight in the objective is 1).
        b.axpby(&mut m.dlogits, one, &m.aux_dlogits, one)?;
    }
    // logits = x W_router^T
    linear_backward(b, dx, &mut g[m.router], &m.dlogits, x, &p[m.router], true)?;
    Ok(())
}
