//! Causal self-attention with RoPE: multi-head (MHA) or multi-head latent (MLA, DeepSeek-V2's).
//!
//! Both share one core, per head `h` of each sequence:
//!
//! ```text
//! S  = scale * Q_h K_h^T    [T, T]   (the scores of all heads: [B*H, T, T])
//! P  = causal_softmax(S)
//! O_h = P V_h               [T, Dv]
//! ```
//!
//! where a head's queries, keys and values are blocks of columns of the token rows the
//! projections wrote ([`HeadLayout`]), read in place: no head-major copies.
//!
//! MHA: `q, k, v = x W_q^T, x W_k^T, x W_v^T`, RoPE on every query and key column.
//! MLA (DeepSeek-V3): `q = x W_q^T` (per head `[q_nope (dn), q_rope (dr)]`);
//! `[c_kv (r), k_rope (dr)] = x W_kva^T`, `c_kv` through an RMSNorm; `W_kvb c_kv` gives per
//! head `[k_nope (dn), v (dv)]`; RoPE on the `dr` parts only, the one `k_rope` shared by all
//! heads; scale `1/sqrt(dn + dr)`. Rotations use the rotate-half pairing `(i, i + d/2)`.

use muon_core::{ParamRole, ParamSpec, Real, Shape};

use super::{declare, linear_backward, linear_forward, Mat, ModelError};
use crate::config::{Attention as AttentionKind, ModelConfig};
use crate::ops::{HeadCols, HeadLayout, ModelOps, Qkv, QkvGrads};

/// The projections and their per-kind buffers.
enum Proj<B: ModelOps> {
    Mha {
        wq: usize,  // [H*D, C]
        wk: usize,  // [H*D, C]
        wv: usize,  // [H*D, C]
        q: Mat<B>,  // [N, H*D] cache (rotated)
        k: Mat<B>,  // [N, H*D] cache (rotated)
        v: Mat<B>,  // [N, H*D] cache
        dq: Mat<B>, // [N, H*D] scratch
        dk: Mat<B>,
        dv: Mat<B>,
    },
    Mla {
        r: usize,
        wq: usize,      // [H*(dn+dr), C]
        wkv_a: usize,   // [r+dr, C]
        kv_norm: usize, // [1, r]
        wkv_b: usize,   // [H*(dn+dv), r]
        q: Mat<B>,      // [N, H*(dn+dr)] cache (q_rope rotated)
        kva: Mat<B>,    // [N, r+dr] cache (k_rope rotated)
        c: Mat<B>,      // [N, r] cache: c_kv before its norm
        c_rstd: Mat<B>, // [1, N] cache
        cn: Mat<B>,     // [N, r] cache: rmsnorm(c_kv)
        kvb: Mat<B>,    // [N, H*(dn+dv)] cache: per head [k_nope, v]
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
    /// Where each head lives in the projections' token rows.
    layout: HeadLayout,
    /// The rotated columns: of each query head, and of each key head (MHA) or of the one
    /// shared key block in `kva` (MLA).
    rope_q: HeadCols,
    rope_k: HeadCols,
    rope_table: Mat<B>, // [T, rope width]
    eps: f64,
    seq: usize,
    probs: Mat<B>,  // [B*H, T, T] cache
    keys: Mat<B>,   // [B, T, 2*Dq] scratch of the core
    o: Mat<B>,      // [N, H*Dv] cache
    d_o: Mat<B>,    // [N, H*Dv] scratch
    dprobs: Mat<B>, // [B*H, T, T]
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
        let (proj, layout, rope_q, rope_k) = match &cfg.attention {
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
                // q, k, v: [N, H*D], head h at columns h*D..(h+1)*D; RoPE on all of them.
                let heads = HeadCols::new(0, d, d);
                let layout = HeadLayout {
                    heads: h,
                    q: heads,
                    k: heads,
                    k_shared: None,
                    v: heads,
                    out: heads,
                };
                (proj, layout, heads, heads)
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
                // q: per head [q_nope, q_rope]; kvb: per head [k_nope, v]; kva: [c_kv, k_rope]
                // with the one k_rope every head shares.
                let layout = HeadLayout {
                    heads: h,
                    q: HeadCols::new(0, dn + dr, dn + dr),
                    k: HeadCols::new(0, dn + dv, dn),
                    k_shared: Some(HeadCols::new(r, 0, dr)),
                    v: HeadCols::new(dn, dn + dv, dv),
                    out: HeadCols::new(0, dv, dv),
                };
                (
                    proj,
                    layout,
                    HeadCols::new(dn, dn + dr, dr),
                    HeadCols::new(r, 0, dr),
                )
            }
        };
        let wo = declare(
            specs,
            format!("{prefix}.wo"),
            Shape::matrix(c, h * dv),
            ParamRole::Hidden,
        );
        let mut rope_table = z(seq, rope_q.width)?;
        b.rope_table(&mut rope_table, cfg.rope_theta)?;
        let scores = || b.zeros(Shape::batched(batch * h, seq, seq));
        Ok(Attention {
            proj,
            wo,
            scale: 1.0 / (qk as f64).sqrt(),
            layout,
            rope_q,
            rope_k,
            rope_table,
            eps: cfg.kv_norm_eps,
            seq,
            probs: scores()?,
            keys: b.zeros(Shape::batched(batch, seq, 2 * qk))?,
            o: z(n, h * dv)?,
            d_o: z(n, h * dv)?,
            dprobs: scores()?,
        })
    }

    /// How many key blocks RoPE rotates: every head's (MHA), or the one shared block (MLA).
    fn rope_k_heads(&self) -> usize {
        if self.layout.k_shared.is_some() {
            1
        } else {
            self.layout.heads
        }
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
    let (seq, heads, k_heads) = (a.seq, a.layout.heads, a.rope_k_heads());
    let x = match &mut a.proj {
        Proj::Mha {
            wq, wk, wv, q, k, v, ..
        } => {
            linear_forward(b, q, xn, &p[*wq])?; // q = xn W_q^T          [N, H*D]
            linear_forward(b, k, xn, &p[*wk])?; // k = xn W_k^T
            linear_forward(b, v, xn, &p[*wv])?; // v = xn W_v^T
            b.rope(q, seq, heads, a.rope_q, &a.rope_table, false)?; // rotate queries and keys
            b.rope(k, seq, k_heads, a.rope_k, &a.rope_table, false)?;
            Qkv {
                q,
                k,
                k_shared: None,
                v,
            }
        }
        Proj::Mla {
            r,
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
            linear_forward(b, q, xn, &p[*wq])?; // q = xn W_q^T                [N, H*(dn+dr)]
            linear_forward(b, kva, xn, &p[*wkv_a])?; // [c_kv, k_rope] = xn W_kva^T [N, r+dr]
            b.copy_columns(c, 0, kva, 0, *r, false)?; // c = c_kv                 [N, r]
            b.rmsnorm_forward(cn, c_rstd, c, &p[*kv_norm], a.eps)?; // cn = rmsnorm(c)
            linear_forward(b, kvb, cn, &p[*wkv_b])?; // [k_nope, v] = cn W_kvb^T [N, H*(dn+dv)]
            b.rope(q, seq, heads, a.rope_q, &a.rope_table, false)?; // rotate q_rope, k_rope
            b.rope(kva, seq, k_heads, a.rope_k, &a.rope_table, false)?;
            Qkv {
                q,
                k: kvb,
                k_shared: Some(kva),
                v: kvb,
            }
        }
    };
    // P = causal_softmax(scale Q_h K_h^T)   [B*H, T, T];   O_h = P V_h   [N, H*Dv]
    let scale = B::Elem::from_f64(a.scale);
    b.attention_core_forward(&mut a.probs, &mut a.keys, &mut a.o, x, &a.layout, scale)?;
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
    let zero = B::Elem::ZERO;
    let scale = B::Elem::from_f64(a.scale);
    let (seq, heads, k_heads) = (a.seq, a.layout.heads, a.rope_k_heads());
    // out = o W_o^T
    linear_backward(b, &mut a.d_o, &mut g[a.wo], dout, &a.o, &p[a.wo], false)?;
    // O_h = P V_h and P = causal_softmax(scale Q_h K_h^T): dQ, dK, dV (dS in dprobs)
    let (x, grads) = match &mut a.proj {
        Proj::Mha {
            q, k, v, dq, dk, dv, ..
        } => {
            let x = Qkv {
                q: &*q,
                k: &*k,
                k_shared: None,
                v: &*v,
            };
            let grads = QkvGrads {
                dq,
                dk,
                dk_shared: None,
                dv: Some(dv),
            };
            (x, grads)
        }
        Proj::Mla {
            q,
            kva,
            kvb,
            dq,
            dkva,
            dkvb,
            ..
        } => {
            let x = Qkv {
                q: &*q,
                k: &*kvb,
                k_shared: Some(&*kva),
                v: &*kvb,
            };
            // dK_nope and dV into dkvb, the heads' k_rope gradients summed into dkva.
            let grads = QkvGrads {
                dq,
                dk: dkvb,
                dk_shared: Some(dkva),
                dv: None,
            };
            (x, grads)
        }
    };
    let (layout, d_o, probs) = (&a.layout, &a.d_o, &a.probs);
    b.attention_core_backward(grads, &mut a.dprobs, &mut a.keys, d_o, probs, x, layout, scale)?;
    match &mut a.proj {
        Proj::Mha {
            wq,
            wk,
            wv,
            dq,
            dk,
            dv,
            ..
        } => {
            // rope(q), rope(k): rotate the gradients back
            b.rope(dq, seq, heads, a.rope_q, &a.rope_table, true)?;
            b.rope(dk, seq, k_heads, a.rope_k, &a.rope_table, true)?;
            // q, k, v = xn W_q^T, xn W_k^T, xn W_v^T
            linear_backward(b, dxn, &mut g[*wq], dq, xn, &p[*wq], false)?;
            linear_backward(b, dxn, &mut g[*wk], dk, xn, &p[*wk], true)?;
            linear_backward(b, dxn, &mut g[*wv], dv, xn, &p[*wv], true)?;
        }
        Proj::Mla {
            r,
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
            // rope(q_rope), rope(k_rope): rotate the gradients back
            b.rope(dq, seq, heads, a.rope_q, &a.rope_table, true)?;
            b.rope(dkva, seq, k_heads, a.rope_k, &a.rope_table, true)?;
            // [k_nope, v] = cn W_kvb^T
            linear_backward(b, dcn, &mut g[*wkv_b], dkvb, cn, &p[*wkv_b], false)?;
            // cn = rmsnorm(c)
            b.fill(dc, zero)?;
            b.rmsnorm_backward(dc, &mut g[*kv_norm], dcn, c, &p[*kv_norm], c_rstd)?;
            // c = c_kv = kva[.., :r]
            b.copy_columns(dkva, 0, dc, 0, *r, false)?;
            // [c_kv, k_rope] = xn W_kva^T and q = xn W_q^T
            linear_backward(b, dxn, &mut g[*wq], dq, xn, &p[*wq], false)?;
            linear_backward(b, dxn, &mut g[*wkv_a], dkva, xn, &p[*wkv_a], true)?;
        }
    }
    Ok(())
}
