//! Causal self-attention with RoPE: multi-head (MHA) or multi-head latent (MLA, DeepSeek-V2's).
//!
//! Both share one core on the heads layout `[B*H, T, D]`, where every product is a batched GEMM:
//!
//! ```text
//! S  = scale * Qh Kh^T      [B*H, T, T]
//! P  = causal_softmax(S)
//! Oh = P Vh                 [B*H, T, Dv]
//! ```
//!
//! MHA: `q, k, v = x W_q^T, x W_k^T, x W_v^T`, RoPE on every query and key column.
//! MLA (DeepSeek-V3): `q = x W_q^T` (per head `[q_nope (dn), q_rope (dr)]`);
//! `[c_kv (r), k_rope (dr)] = x W_kva^T`, `c_kv` through an RMSNorm; `W_kvb c_kv` gives per
//! head `[k_nope (dn), v (dv)]`; RoPE on the `dr` parts only, the one `k_rope` shared by all
//! heads; scale `1/sqrt(dn + dr)`. Rotations use the rotate-half pairing `(i, i + d/2)`.

use muon_core::{ParamRole, ParamSpec, Real, Shape};

use super::{declare, linear_backward, linear_forward, Mat, ModelError};
use crate::config::{Attention as AttentionKind, ModelConfig};
use crate::ops::ModelOps;

/// The projections and their per-kind buffers.
enum Proj<B: ModelOps> {
    Mha {
        wq: usize, // [H*D, C]
        wk: usize, // [H*D, C]
        wv: usize, // [H*D, C]
        q: Mat<B>, // [N, H*D] scratch
        k: Mat<B>,
        v: Mat<B>,
        dq: Mat<B>, // [N, H*D] scratch
        dk: Mat<B>,
        dv: Mat<B>,
    },
    Mla {
        r: usize,
        dn: usize,
        dr: usize,
        wq: usize,      // [H*(dn+dr), C]
        wkv_a: usize,   // [r+dr, C]
        kv_norm: usize, // [1, r]
        wkv_b: usize,   // [H*(dn+dv), r]
        q: Mat<B>,      // [N, H*(dn+dr)] scratch
        kva: Mat<B>,    // [N, r+dr] scratch
        c: Mat<B>,      // [N, r] cache: c_kv before its norm
        c_rstd: Mat<B>, // [1, N] cache
        cn: Mat<B>,     // [N, r] cache: rmsnorm(c_kv)
        kvb: Mat<B>,    // [N, H*(dn+dv)] scratch
        dq: Mat<B>,     // [N, H*(dn+dr)] scratch
        dkva: Mat<B>,   // [N, r+dr]
        dkvb: Mat<B>,   // [N, H*(dn+dv)]
        dc: Mat<B>,     // [N, r]
        dcn: Mat<B>,    // [N, r]
    },
}

/// One attention layer: parameter indices, cache and scratch.
pub struct Attention<B: ModelOps> {
    proj: Proj<B>,
    wo: usize, // [C, H*Dv]
    /// `1 / sqrt(qk head width)`.
    scale: f64,
    /// Width of the rotated part of each query/key head, and where it starts.
    rope_col: usize,
    rope_table: Mat<B>, // [T, rope width]
    eps: f64,
    qk: usize,      // query/key head width Dq
    dv: usize,      // value head width Dv
    qh: Mat<B>,     // [B*H, T, Dq] cache (rotated)
    kh: Mat<B>,     // [B*H, T, Dq] cache (rotated)
    vh: Mat<B>,     // [B*H, T, Dv] cache
    probs: Mat<B>,  // [B*H, T, T] cache
    o: Mat<B>,      // [N, H*Dv] cache: heads merged back to token rows
    oh: Mat<B>,     // [B*H, T, Dv] scratch
    d_o: Mat<B>,    // [N, H*Dv] scratch
    doh: Mat<B>,    // [B*H, T, Dv]
    dprobs: Mat<B>, // [B*H, T, T]
    dqh: Mat<B>,    // [B*H, T, Dq]
    dkh: Mat<B>,    // [B*H, T, Dq]
    dvh: Mat<B>,    // [B*H, T, Dv]
}

impl<B: ModelOps> Attention<B> {
    /// Declares the parameters under `prefix` (e.g. `layers.3.attn`) and allocates the buffers
    /// for `batch x seq` tokens.
    pub fn new(
        b: &B,
        specs: &mut Vec<ParamSpec>,
        prefix: &str,
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
    ) -> Result<Self, ModelError> {
        let (n, c, h) = (batch * seq, cfg.dim, cfg.n_heads);
        let (qk, dv) = (cfg.qk_head_dim(), cfg.v_head_dim());
        let mut hidden = |name: &str, rows: usize, cols: usize| {
            declare(
                specs,
                format!("{prefix}.{name}"),
                Shape::matrix(rows, cols),
                ParamRole::Hidden,
            )
        };
        let z = |rows: usize, cols: usize| b.zeros(Shape::matrix(rows, cols));
        let (proj, rope_col, rope_width) = match &cfg.attention {
            AttentionKind::Mha => {
                let d = cfg.head_dim;
                let (wq, wk, wv) = (
                    hidden("wq", h * d, c),
                    hidden("wk", h * d, c),
                    hidden("wv", h * d, c),
                );
                let proj = Proj::Mha {
                    wq,
                    wk,
                    wv,
                    q: z(n, h * d)?,
                    k: z(n, h * d)?,
                    v: z(n, h * d)?,
                    dq: z(n, h * d)?,
                    dk: z(n, h * d)?,
                    dv: z(n, h * d)?,
                };
                (proj, 0, d)
            }
            &AttentionKind::Mla {
                kv_lora_rank: r,
                qk_nope_head_dim: dn,
                qk_rope_head_dim: dr,
                v_head_dim: dv,
            } => {
                let wq = hidden("wq", h * (dn + dr), c);
                let wkv_a = hidden("wkv_a", r + dr, c);
                let kv_norm = declare(
                    specs,
                    format!("{prefix}.kv_norm"),
                    Shape::vector(r),
                    ParamRole::Norm,
                );
                let wkv_b = declare(
                    specs,
                    format!("{prefix}.wkv_b"),
                    Shape::matrix(h * (dn + dv), r),
                    ParamRole::Hidden,
                );
                let proj = Proj::Mla {
                    r,
                    dn,
                    dr,
                    wq,
                    wkv_a,
                    kv_norm,
                    wkv_b,
                    q: z(n, h * (dn + dr))?,
                    kva: z(n, r + dr)?,
                    c: z(n, r)?,
                    c_rstd: z(1, n)?,
                    cn: z(n, r)?,
                    kvb: z(n, h * (dn + dv))?,
                    dq: z(n, h * (dn + dr))?,
                    dkva: z(n, r + dr)?,
                    dkvb: z(n, h * (dn + dv))?,
                    dc: z(n, r)?,
                    dcn: z(n, r)?,
                };
                (proj, dn, dr)
            }
        };
        let wo = declare(
            specs,
            format!("{prefix}.wo"),
            Shape::matrix(c, h * dv),
            ParamRole::Hidden,
        );
        let mut rope_table = z(seq, rope_width)?;
        b.rope_table(&mut rope_table, cfg.rope_theta)?;
        let heads = |d: usize| b.zeros(Shape::batched(batch * h, seq, d));
        Ok(Attention {
            proj,
            wo,
            scale: 1.0 / (qk as f64).sqrt(),
            rope_col,
            rope_table,
            eps: cfg.kv_norm_eps,
            qk,
            dv,
            qh: heads(qk)?,
            kh: heads(qk)?,
            vh: heads(dv)?,
            probs: heads(seq)?,
            o: z(n, h * dv)?,
            oh: heads(dv)?,
            d_o: z(n, h * dv)?,
            doh: heads(dv)?,
            dprobs: heads(seq)?,
            dqh: heads(qk)?,
            dkh: heads(qk)?,
            dvh: heads(dv)?,
        })
    }
}

/// `out = attention(xn)`. xn: `[N, C]` (the normed residual), out: `[N, C]`.
pub fn attention_forward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    a: &mut Attention<B>,
    xn: &Mat<B>,      // [N, C]
    out: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    let (qk, dv) = (a.qk, a.dv);
    match &mut a.proj {
        Proj::Mha {
            wq, wk, wv, q, k, v, ..
        } => {
            linear_forward(b, q, xn, &p[*wq])?; // q = xn W_q^T          [N, H*D]
            linear_forward(b, k, xn, &p[*wk])?; // k = xn W_k^T
            linear_forward(b, v, xn, &p[*wv])?; // v = xn W_v^T
            b.split_heads(&mut a.qh, 0, q, 0, qk, qk)?; // Qh = heads(q)  [B*H, T, D]
            b.split_heads(&mut a.kh, 0, k, 0, qk, qk)?;
            b.split_heads(&mut a.vh, 0, v, 0, dv, dv)?;
        }
        Proj::Mla {
            r,
            dn,
            dr,
            wq,
            wkv_a,
            kv_norm,
            wkv_b,
            q,
            kva,
            c,
            c_rstd,
            cn,
            kvb,
            ..
        } => {
            let (r, dn, dr) = (*r, *dn, *dr);
            linear_forward(b, q, xn, &p[*wq])?; // q = xn W_q^T                [N, H*(dn+dr)]
            linear_forward(b, kva, xn, &p[*wkv_a])?; // [c_kv, k_rope] = xn W_kva^T [N, r+dr]
            b.copy_columns(c, 0, kva, 0, r, false)?; // c = c_kv                  [N, r]
            b.rmsnorm_forward(cn, c_rstd, c, &p[*kv_norm], a.eps)?; // cn = rmsnorm(c)
            linear_forward(b, kvb, cn, &p[*wkv_b])?; // [k_nope, v] = cn W_kvb^T [N, H*(dn+dv)]
            b.split_heads(&mut a.qh, 0, q, 0, dn + dr, dn + dr)?; // Qh = [q_nope, q_rope]
            b.split_heads(&mut a.kh, 0, kvb, 0, dn + dv, dn)?; // Kh[.., :dn] = k_nope
            b.split_heads(&mut a.kh, dn, kva, r, 0, dr)?; // Kh[.., dn:] = k_rope (shared)
            b.split_heads(&mut a.vh, 0, kvb, dn, dn + dv, dv)?; // Vh = v
        }
    }
    b.rope(&mut a.qh, a.rope_col, &a.rope_table, false)?; // rotate the RoPE columns
    b.rope(&mut a.kh, a.rope_col, &a.rope_table, false)?;
    // P = causal_softmax(scale Qh Kh^T)   [B*H, T, T];   Oh = P Vh   [B*H, T, Dv]
    let scale = B::Elem::from_f64(a.scale);
    b.attention_core_forward(&mut a.probs, &mut a.oh, &a.qh, &a.kh, &a.vh, scale)?;
    b.merge_heads(&mut a.o, 0, dv, &a.oh, 0, dv, false)?; // o = tokens(Oh)   [N, H*Dv]
    linear_forward(b, out, &a.o, &p[a.wo])?; // out = o W_o^T                [N, C]
    Ok(())
}

/// Backward of [`attention_forward`]: accumulates parameter gradients into `g`, overwrites
/// `dxn` `[N, C]` with dL/dxn given `dout` `[N, C]`.
pub fn attention_backward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    g: &mut [Mat<B>],
    a: &mut Attention<B>,
    xn: &Mat<B>,      // [N, C]
    dout: &Mat<B>,    // [N, C]
    dxn: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    let (qk, dv) = (a.qk, a.dv);
    let zero = B::Elem::ZERO;
    let scale = B::Elem::from_f64(a.scale);
    // out = o W_o^T
    linear_backward(b, &mut a.d_o, &mut g[a.wo], dout, &a.o, &p[a.wo], false)?;
    // o = tokens(Oh)
    b.split_heads(&mut a.doh, 0, &a.d_o, 0, dv, dv)?;
    // Oh = P Vh and P = causal_softmax(scale Qh Kh^T): dVh, dQh, dKh (dS in dprobs)
    b.attention_core_backward(
        &mut a.dqh,
        &mut a.dkh,
        &mut a.dvh,
        &mut a.dprobs,
        &a.doh,
        &a.probs,
        &a.qh,
        &a.kh,
        &a.vh,
        scale,
    )?;
    // rope(Qh), rope(Kh): rotate the gradients back
    b.rope(&mut a.dqh, a.rope_col, &a.rope_table, true)?;
    b.rope(&mut a.dkh, a.rope_col, &a.rope_table, true)?;
    match &mut a.proj {
        Proj::Mha {
            wq,
            wk,
            wv,
            dq,
            dk,
            dv: dvm,
            ..
        } => {
            // Qh, Kh, Vh = heads(q), heads(k), heads(v)
            b.merge_heads(dq, 0, qk, &a.dqh, 0, qk, false)?;
            b.merge_heads(dk, 0, qk, &a.dkh, 0, qk, false)?;
            b.merge_heads(dvm, 0, dv, &a.dvh, 0, dv, false)?;
            // q, k, v = xn W_q^T, xn W_k^T, xn W_v^T
            linear_backward(b, dxn, &mut g[*wq], dq, xn, &p[*wq], false)?;
            linear_backward(b, dxn, &mut g[*wk], dk, xn, &p[*wk], true)?;
            linear_backward(b, dxn, &mut g[*wv], dvm, xn, &p[*wv], true)?;
        }
        Proj::Mla {
            r,
            dn,
            dr,
            wq,
            wkv_a,
            kv_norm,
            wkv_b,
            c,
            c_rstd,
            cn,
            dq,
            dkva,
            dkvb,
            dc,
            dcn,
            ..
        } => {
            let (r, dn, dr) = (*r, *dn, *dr);
            // Qh = [q_nope, q_rope]
            b.merge_heads(dq, 0, dn + dr, &a.dqh, 0, dn + dr, false)?;
            // Kh[.., :dn] = k_nope and Vh = v, both from kvb
            b.merge_heads(dkvb, 0, dn + dv, &a.dkh, 0, dn, false)?;
            b.merge_heads(dkvb, dn, dn + dv, &a.dvh, 0, dv, false)?;
            // Kh[.., dn:] = k_rope, shared: the heads' gradients sum
            b.merge_heads(dkva, r, 0, &a.dkh, dn, dr, false)?;
            // [k_nope, v] = cn W_kvb^T
            linear_backward(b, dcn, &mut g[*wkv_b], dkvb, cn, &p[*wkv_b], false)?;
            // cn = rmsnorm(c)
            b.fill(dc, zero)?;
            b.rmsnorm_backward(dc, &mut g[*kv_norm], dcn, c, &p[*kv_norm], c_rstd)?;
            // c = c_kv = kva[.., :r]
            b.copy_columns(dkva, 0, dc, 0, r, false)?;
            // [c_kv, k_rope] = xn W_kva^T and q = xn W_q^T
            linear_backward(b, dxn, &mut g[*wq], dq, xn, &p[*wq], false)?;
            linear_backward(b, dxn, &mut g[*wkv_a], dkva, xn, &p[*wkv_a], true)?;
        }
    }
    Ok(())
}
