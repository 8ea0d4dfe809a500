//! Inference: a decoder that runs the trained network one token at a time with a KV cache,
//! and the samplers that turn its logits into text.
//!
//! [`Decoder`] holds only what inference needs: the parameters and the router biases (in f64 on
//! the host, whatever the checkpoint's precision), the cache of every position seen so far,
//! and one token's worth of scratch, all allocated in [`Decoder::new`]. There are no gradients
//! and no activation stacks: a step costs one pass through the weights plus attention over the
//! cache. It computes the same function as [`crate::model::Model`]'s forward (the tests hold
//! them to 1e-12 in f64 at every position), written independently, on single token rows.
//!
//! What the cache keeps per layer and position:
//! - MHA: the rotated key and the value of every head (`2 * H * D` numbers);
//! - MLA: the compressed latent **after** its RMSNorm (`rmsnorm(c_kv) * kv_norm`, `r`
//!   numbers) and the rotated shared RoPE key (`dr` numbers), as DeepSeek-V2 does, not the
//!   expanded per-head keys and values. Caching the normed latent is what lets a step skip the
//!   norm for old positions; the un-normed one would have to be normed again at every step.
//!
//! MLA attention then runs in the "absorbed" form (DeepSeek-V2 §2.1.2): for head `h` with
//! `W_kvb = [W_k_h (dn rows); W_v_h (dv rows)]` per head,
//!
//! ```text
//! q_abs = W_k_h^T q_nope                                  [r]
//! s_t   = scale * (q_abs . cn_t + q_rope . k_rope_t)       t <= pos
//! o_h   = W_v_h (sum_t softmax(s)_t cn_t)                 [dv]
//! ```
//!
//! which equals attention over the expanded keys `W_k_h cn_t` and values `W_v_h cn_t` by
//! associativity, and touches `r + dr` cached numbers per position and head instead of
//! `dn + dr + dv`.

use std::collections::HashMap;

use muon_core::{Real, Shape};
use rayon::prelude::*;

use crate::config::{Attention as AttentionKind, ModelConfig};
use crate::model::{Model, ModelError, Tensor};
use crate::ops::ModelOps;
use crate::rng::Rng;

/// `out[o] = w[o, :] . x` for a row-major `[out.len(), x.len()]` matrix. Each output is one
/// sequential dot product, so the result does not depend on the thread count; rows split
/// across rayon's threads when the matrix is large enough to pay for it.
fn matvec(out: &mut [f64], w: &[f64], x: &[f64]) {
    let cols = x.len();
    debug_assert_eq!(w.len(), out.len() * cols);
    let dot = |(o, row): (&mut f64, &[f64])| {
        *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
    };
    if out.len() * cols >= 1 << 16 {
        out.par_iter_mut()
            .zip(w.par_chunks_exact(cols))
            .with_min_len(64)
            .for_each(dot);
    } else {
        out.iter_mut().zip(w.chunks_exact(cols)).for_each(dot);
    }
}

/// `out = x * rstd * gain`, `rstd = 1 / sqrt(mean(x^2) + eps)`.
fn rmsnorm(out: &mut [f64], x: &[f64], gain: &[f64], eps: f64) {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let rstd = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(gain) {
        *o = v * rstd * g;
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// In place: `s = softmax(s)`.
fn softmax(s: &mut [f64]) {
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}

/// Rotates `v` (width `d`, even) by position `pos`, rotate-half pairing `(i, i + d/2)`, with
/// the table's `cos`/`sin` rows `[pos][d/2]`.
fn rope(v: &mut [f64], cos: &[f64], sin: &[f64]) {
    let half = v.len() / 2;
    for i in 0..half {
        let (a, b) = (v[i], v[half + i]);
        v[i] = a * cos[i] - b * sin[i];
        v[half + i] = a * sin[i] + b * cos[i];
    }
}

/// RoPE angles for positions `0..context` and a rotated width `d`: `cos`, `sin` of
/// `pos * theta^(-2i/d)`, `[context][d/2]` each (the backend's `rope_table`, computed alike).
fn rope_table(context: usize, d: usize, theta: f64) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let (mut cos, mut sin) = (vec![0.0; context * half], vec![0.0; context * half]);
    for pos in 0..context {
        for i in 0..half {
            let angle = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
            cos[pos * half + i] = angle.cos();
            sin[pos * half + i] = angle.sin();
        }
    }
    (cos, sin)
}

/// A SwiGLU FFN's weights: `down (silu(gate x) * up x)`.
struct Mlp {
    gate: Vec<f64>, // [F, C]
    up: Vec<f64>,   // [F, C]
    down: Vec<f64>, // [C, F]
    width: usize,
}

/// `out = mlp(x)`; `h`, `u` are `[F]` scratch.
fn mlp(out: &mut [f64], gate: &[f64], up: &[f64], down: &[f64], x: &[f64], h: &mut [f64], u: &mut [f64]) {
    matvec(h, gate, x);
    matvec(u, up, x);
    for (h, &u) in h.iter_mut().zip(u.iter()) {
        *h = *h * sigmoid(*h) * u;
    }
    matvec(out, down, h);
}

enum AttnWeights {
    Mha {
        wq: Vec<f64>, // [H*D, C]
        wk: Vec<f64>,
        wv: Vec<f64>,
        k: Vec<f64>, // cache [context, H*D], rotated
        v: Vec<f64>, // cache [context, H*D]
    },
    Mla {
        r: usize,
        dn: usize,
        dr: usize,
        wq: Vec<f64>,      // [H*(dn+dr), C]
        wkv_a: Vec<f64>,   // [r+dr, C]
        kv_norm: Vec<f64>, // [r]
        wkv_b: Vec<f64>,   // [H*(dn+dv), r]
        latent: Vec<f64>,  // cache [context, r]: rmsnorm(c_kv) * kv_norm
        k_rope: Vec<f64>,  // cache [context, dr], rotated
    },
}

enum FfnWeights {
    Dense(Mlp),
    Moe {
        router: Vec<f64>, // [E, C]
        bias: Vec<f64>,   // [E]
        gate: Vec<f64>,   // [E, F, C]
        up: Vec<f64>,     // [E, F, C]
        down: Vec<f64>,   // [E, C, F]
        shared: Option<Mlp>,
    },
}

struct Layer {
    attn_norm: Vec<f64>,
    attn: AttnWeights,
    wo: Vec<f64>, // [C, H*Dv]
    ffn_norm: Vec<f64>,
    ffn: FfnWeights,
}

/// Per-token scratch, sized once.
struct Scratch {
    x: Vec<f64>,      // [C] the residual stream
    xn: Vec<f64>,     // [C]
    out: Vec<f64>,    // [C] a sub-layer's output
    acc: Vec<f64>,    // [C]
    q: Vec<f64>,      // [H*Dq]
    kv: Vec<f64>,     // [max(r+dr, H*D)] MHA's new key / MLA's [c_kv, k_rope]
    vnew: Vec<f64>,   // [H*D] MHA's new value
    q_abs: Vec<f64>,  // [r]
    ctx: Vec<f64>,    // [r]
    o: Vec<f64>,      // [H*Dv]
    scores: Vec<f64>, // [context]
    h: Vec<f64>,      // [max FFN width]
    u: Vec<f64>,      // [max FFN width]
    router: Vec<f64>, // [E]
    chosen: Vec<usize>,
    logits: Vec<f64>, // [V]
}

/// The network of a [`ModelConfig`] for inference: weights, a KV cache for up to `context`
/// positions, and one token's scratch. Feed it tokens with [`step`](Self::step); each returns
/// the logits of the next token.
pub struct Decoder {
    config: ModelConfig,
    context: usize,
    pos: usize,
    embed: Vec<f64>, // [V, C]
    layers: Vec<Layer>,
    final_norm: Vec<f64>,
    lm_head: Vec<f64>, // [V, C]
    rope_cos: Vec<f64>,
    rope_sin: Vec<f64>,
    s: Scratch,
}

/// The named tensors a decoder is built from.
struct Named<'a, E> {
    by_name: HashMap<&'a str, &'a Tensor<E>>,
}

impl<E: Real> Named<'_, E> {
    fn take(&mut self, name: &str, shape: Shape) -> Result<Vec<f64>, ModelError> {
        let t = self
            .by_name
            .remove(name)
            .ok_or_else(|| ModelError::Input(format!("tensor `{name}` is missing")))?;
        if t.shape != shape || t.data.len() != shape.len() {
            return Err(ModelError::Input(format!(
                "tensor `{name}` is {} with {} values, the configuration needs {shape}",
                t.shape,
                t.data.len()
            )));
        }
        Ok(t.data.iter().map(|v| v.to_f64()).collect())
    }
}

impl Decoder {
    /// Builds a decoder for `config` from the parameters and buffers as
    /// [`Model::param_specs`] and [`Model::buffers`] name them (a checkpoint's), with a cache
    /// for `context` positions (at most `max_seq_len`). Every tensor must be there with its
    /// shape, and no other.
    pub fn new<E: Real>(
        config: &ModelConfig,
        params: &[Tensor<E>],
        buffers: &[Tensor<E>],
        context: usize,
    ) -> Result<Decoder, ModelError> {
        config.validate().map_err(ModelError::Config)?;
        if context == 0 || context > config.max_seq_len {
            return Err(ModelError::Config(format!(
                "a context of {context} positions: it must be between 1 and max_seq_len {}",
                config.max_seq_len
            )));
        }
        let mut named = Named {
            by_name: params
                .iter()
                .chain(buffers)
                .map(|t| (t.name.as_str(), t))
                .collect(),
        };
        if named.by_name.len() != params.len() + buffers.len() {
            return Err(ModelError::Input("two tensors have the same name".into()));
        }
        let cfg = config;
        let (c, v, h) = (cfg.dim, cfg.vocab_size, cfg.n_heads);
        let m = Shape::matrix;
        let embed = named.take("embed", m(v, c))?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let (qk, dv) = (cfg.qk_head_dim(), cfg.v_head_dim());
        let mut ffn_max = 0;
        for l in 0..cfg.n_layers {
            let pre = format!("layers.{l}");
            let attn_norm = named.take(&format!("{pre}.attn_norm"), Shape::vector(c))?;
            let a = |n: &str| format!("{pre}.attn.{n}");
            let attn = match cfg.attention {
                AttentionKind::Mha => {
                    let d = cfg.head_dim;
                    AttnWeights::Mha {
                        wq: named.take(&a("wq"), m(h * d, c))?,
                        wk: named.take(&a("wk"), m(h * d, c))?,
                        wv: named.take(&a("wv"), m(h * d, c))?,
                        k: vec![0.0; context * h * d],
                        v: vec![0.0; context * h * d],
                    }
                }
                AttentionKind::Mla {
                    kv_lora_rank: r,
                    qk_nope_head_dim: dn,
                    qk_rope_head_dim: dr,
                    v_head_dim: dv,
                } => AttnWeights::Mla {
                    r,
                    dn,
                    dr,
                    wq: named.take(&a("wq"), m(h * (dn + dr), c))?,
                    wkv_a: named.take(&a("wkv_a"), m(r + dr, c))?,
                    kv_norm: named.take(&a("kv_norm"), Shape::vector(r))?,
                    wkv_b: named.take(&a("wkv_b"), m(h * (dn + dv), r))?,
                    latent: vec![0.0; context * r],
                    k_rope: vec![0.0; context * dr],
                },
            };
            let wo = named.take(&a("wo"), m(c, h * dv))?;
            let ffn_norm = named.take(&format!("{pre}.ffn_norm"), Shape::vector(c))?;
            let dense = |named: &mut Named<E>, prefix: String, f: usize| -> Result<Mlp, ModelError> {
                Ok(Mlp {
                    gate: named.take(&format!("{prefix}.w_gate"), m(f, c))?,
                    up: named.take(&format!("{prefix}.w_up"), m(f, c))?,
                    down: named.take(&format!("{prefix}.w_down"), m(c, f))?,
                    width: f,
                })
            };
            let ffn = if l < cfg.dense_layers {
                ffn_max = ffn_max.max(cfg.dense_ffn_width);
                FfnWeights::Dense(dense(&mut named, format!("{pre}.ffn"), cfg.dense_ffn_width)?)
            } else {
                let (e, f) = (cfg.n_routed_experts, cfg.expert_width);
                let sw = cfg.n_shared_experts * f;
                ffn_max = ffn_max.max(f).max(sw);
                let mo = |n: &str| format!("{pre}.moe.{n}");
                FfnWeights::Moe {
                    router: named.take(&mo("router"), m(e, c))?,
                    bias: named.take(&mo("router_bias"), Shape::vector(e))?,
                    gate: named.take(&mo("experts.w_gate"), Shape::batched(e, f, c))?,
                    up: named.take(&mo("experts.w_up"), Shape::batched(e, f, c))?,
                    down: named.take(&mo("experts.w_down"), Shape::batched(e, c, f))?,
                    shared: if sw > 0 {
                        Some(dense(&mut named, mo("shared"), sw)?)
                    } else {
                        None
                    },
                }
            };
            layers.push(Layer {
                attn_norm,
                attn,
                wo,
                ffn_norm,
                ffn,
            });
        }
        let final_norm = named.take("final_norm", Shape::vector(c))?;
        let lm_head = named.take("lm_head", m(v, c))?;
        if let Some(extra) = named.by_name.keys().min() {
            return Err(ModelError::Input(format!(
                "tensor `{extra}` is not part of this configuration's model"
            )));
        }
        let (rope_width, kv_width, r) = match cfg.attention {
            AttentionKind::Mha => (cfg.head_dim, h * cfg.head_dim, 0),
            AttentionKind::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => (qk_rope_head_dim, kv_lora_rank + qk_rope_head_dim, kv_lora_rank),
        };
        let (rope_cos, rope_sin) = rope_table(context, rope_width, cfg.rope_theta);
        let s = Scratch {
            x: vec![0.0; c],
            xn: vec![0.0; c],
            out: vec![0.0; c],
            acc: vec![0.0; c],
            q: vec![0.0; h * qk],
            kv: vec![0.0; kv_width],
            vnew: vec![0.0; h * dv],
            q_abs: vec![0.0; r],
            ctx: vec![0.0; r],
            o: vec![0.0; h * dv],
            scores: vec![0.0; context],
            h: vec![0.0; ffn_max],
            u: vec![0.0; ffn_max],
            router: vec![0.0; cfg.n_routed_experts],
            chosen: Vec::with_capacity(cfg.top_k),
            logits: vec![0.0; v],
        };
        Ok(Decoder {
            config: cfg.clone(),
            context,
            pos: 0,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_cos,
            rope_sin,
            s,
        })
    }

    /// A decoder with `model`'s parameters and router biases, downloaded from `backend`.
    pub fn from_model<B: ModelOps>(
        backend: &B,
        model: &Model<B>,
        context: usize,
    ) -> Result<Decoder, ModelError> {
        let mut params = Vec::with_capacity(model.params().len());
        for (spec, p) in model.param_specs().into_iter().zip(model.params()) {
            let mut data = vec![B::Elem::ZERO; spec.shape.len()];
            backend.download(p, &mut data)?;
            params.push(Tensor {
                name: spec.name,
                shape: spec.shape,
                data,
            });
        }
        Decoder::new(&model.config, &params, &model.buffers(backend)?, context)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Positions the cache holds.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Tokens fed since the last [`reset`](Self::reset): the position of the next one.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forgets the cached positions (the next token is at position 0).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Feeds `token` at the next position and returns the logits `[V]` for the token after it.
    /// Errors when the token is outside the vocabulary or the cache is full.
    pub fn step(&mut self, token: u32) -> Result<&[f64], ModelError> {
        let cfg = &self.config;
        let (c, v) = (cfg.dim, cfg.vocab_size);
        if token as usize >= v {
            return Err(ModelError::Input(format!(
                "token {token} is outside the vocabulary of {v}"
            )));
        }
        if self.pos >= self.context {
            return Err(ModelError::Input(format!(
                "the cache is full: {} positions (reset, or build the decoder with a longer context)",
                self.context
            )));
        }
        let pos = self.pos;
        let s = &mut self.s;
        let t = token as usize;
        s.x.copy_from_slice(&self.embed[t * c..(t + 1) * c]);
        let half = self.rope_cos.len() / self.context;
        let (cos, sin) = (
            &self.rope_cos[pos * half..(pos + 1) * half],
            &self.rope_sin[pos * half..(pos + 1) * half],
        );
        for layer in &mut self.layers {
            rmsnorm(&mut s.xn, &s.x, &layer.attn_norm, cfg.norm_eps);
            attention(cfg, layer, s, pos, cos, sin);
            matvec(&mut s.out, &layer.wo, &s.o);
            for (x, o) in s.x.iter_mut().zip(&s.out) {
                *x += o;
            }
            rmsnorm(&mut s.xn, &s.x, &layer.ffn_norm, cfg.norm_eps);
            ffn(cfg, &layer.ffn, s);
            for (x, o) in s.x.iter_mut().zip(&s.out) {
                *x += o;
            }
        }
        rmsnorm(&mut s.xn, &s.x, &self.final_norm, cfg.norm_eps);
        matvec(&mut s.logits, &self.lm_head, &s.xn);
        self.pos += 1;
        Ok(&self.s.logits)
    }

    /// Resets, feeds `tokens` from position 0 and returns the logits of every position
    /// (`[tokens.len(), V]` row-major) or, with `last_only`, of the last one (`[V]`).
    pub fn logits(&mut self, tokens: &[u32], last_only: bool) -> Result<Vec<f64>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        self.reset();
        let v = self.config.vocab_size;
        let mut out = Vec::with_capacity(if last_only { v } else { tokens.len() * v });
        for (i, &t) in tokens.iter().enumerate() {
            let logits = self.step(t)?;
            if !last_only || i + 1 == tokens.len() {
                out.extend_from_slice(logits);
            }
        }
        Ok(out)
    }
}

/// One position's attention for `layer`: caches its key and value (or latent), leaves the
/// merged heads in `s.o` `[H*Dv]`. `s.xn` is the normed input.
fn attention(cfg: &ModelConfig, layer: &mut Layer, s: &mut Scratch, pos: usize, cos: &[f64], sin: &[f64]) {
    let h = cfg.n_heads;
    let scale = 1.0 / (cfg.qk_head_dim() as f64).sqrt();
    let scores = &mut s.scores[..=pos];
    match &mut layer.attn {
        AttnWeights::Mha { wq, wk, wv, k, v } => {
            let d = cfg.head_dim;
            let hd = h * d;
            matvec(&mut s.q, wq, &s.xn);
            matvec(&mut s.kv[..hd], wk, &s.xn);
            matvec(&mut s.vnew, wv, &s.xn);
            for head in 0..h {
                rope(&mut s.q[head * d..(head + 1) * d], cos, sin);
                rope(&mut s.kv[head * d..(head + 1) * d], cos, sin);
            }
            k[pos * hd..(pos + 1) * hd].copy_from_slice(&s.kv[..hd]);
            v[pos * hd..(pos + 1) * hd].copy_from_slice(&s.vnew);
            for head in 0..h {
                let q = &s.q[head * d..(head + 1) * d];
                for (t, sc) in scores.iter_mut().enumerate() {
                    let kt = &k[t * hd + head * d..t * hd + (head + 1) * d];
                    *sc = scale * q.iter().zip(kt).map(|(a, b)| a * b).sum::<f64>();
                }
                softmax(scores);
                let o = &mut s.o[head * d..(head + 1) * d];
                o.fill(0.0);
                for (t, &p) in scores.iter().enumerate() {
                    let vt = &v[t * hd + head * d..t * hd + (head + 1) * d];
                    for (o, &vv) in o.iter_mut().zip(vt) {
                        *o += p * vv;
                    }
                }
            }
        }
        AttnWeights::Mla {
            r,
            dn,
            dr,
            wq,
            wkv_a,
            kv_norm,
            wkv_b,
            latent,
            k_rope,
        } => {
            let (r, dn, dr) = (*r, *dn, *dr);
            let dv = cfg.v_head_dim();
            let dq = dn + dr;
            matvec(&mut s.q, wq, &s.xn); // per head [q_nope, q_rope]
            matvec(&mut s.kv, wkv_a, &s.xn); // [c_kv, k_rope]
            rmsnorm(
                &mut latent[pos * r..(pos + 1) * r],
                &s.kv[..r],
                kv_norm,
                cfg.kv_norm_eps,
            );
            rope(&mut s.kv[r..r + dr], cos, sin);
            k_rope[pos * dr..(pos + 1) * dr].copy_from_slice(&s.kv[r..r + dr]);
            for head in 0..h {
                let q = &mut s.q[head * dq..(head + 1) * dq];
                rope(&mut q[dn..], cos, sin);
                let (q_nope, q_rope) = q.split_at(dn);
                // The head's rows of W_kvb: dn key rows, then dv value rows, each [r].
                let rows = &wkv_b[head * (dn + dv) * r..(head + 1) * (dn + dv) * r];
                let (w_k, w_v) = rows.split_at(dn * r);
                // q_abs = W_k^T q_nope
                s.q_abs.fill(0.0);
                for (qi, wrow) in q_nope.iter().zip(w_k.chunks_exact(r)) {
                    for (a, &w) in s.q_abs.iter_mut().zip(wrow) {
                        *a += qi * w;
                    }
                }
                for (t, sc) in scores.iter_mut().enumerate() {
                    let ct = &latent[t * r..(t + 1) * r];
                    let kt = &k_rope[t * dr..(t + 1) * dr];
                    let nope: f64 = s.q_abs.iter().zip(ct).map(|(a, b)| a * b).sum();
                    let rot: f64 = q_rope.iter().zip(kt).map(|(a, b)| a * b).sum();
                    *sc = scale * (nope + rot);
                }
                softmax(scores);
                s.ctx.fill(0.0);
                for (t, &p) in scores.iter().enumerate() {
                    for (cx, &cv) in s.ctx.iter_mut().zip(&latent[t * r..(t + 1) * r]) {
                        *cx += p * cv;
                    }
                }
                matvec(&mut s.o[head * dv..(head + 1) * dv], w_v, &s.ctx);
            }
        }
    }
}

/// One position's FFN on `s.xn`, into `s.out`.
fn ffn(cfg: &ModelConfig, w: &FfnWeights, s: &mut Scratch) {
    match w {
        FfnWeights::Dense(m) => {
            let f = m.width;
            mlp(
                &mut s.out,
                &m.gate,
                &m.up,
                &m.down,
                &s.xn,
                &mut s.h[..f],
                &mut s.u[..f],
            );
        }
        FfnWeights::Moe {
            router,
            bias,
            gate,
            up,
            down,
            shared,
        } => {
            let (c, e, f, k) = (cfg.dim, cfg.n_routed_experts, cfg.expert_width, cfg.top_k);
            matvec(&mut s.router, router, &s.xn);
            for l in s.router.iter_mut() {
                *l = sigmoid(*l);
            }
            // Top-k of score + bias by repeated selection, ties to the lower index.
            s.chosen.clear();
            for _ in 0..k {
                let mut best: Option<(usize, f64)> = None;
                for j in (0..e).filter(|j| !s.chosen.contains(j)) {
                    let v = s.router[j] + bias[j];
                    if best.is_none_or(|(_, bv)| v > bv) {
                        best = Some((j, v));
                    }
                }
                s.chosen.push(best.map_or(0, |(j, _)| j));
            }
            let sum: f64 = s.chosen.iter().map(|&j| s.router[j]).sum();
            match shared {
                Some(m) => {
                    let sw = m.width;
                    mlp(
                        &mut s.out,
                        &m.gate,
                        &m.up,
                        &m.down,
                        &s.xn,
                        &mut s.h[..sw],
                        &mut s.u[..sw],
                    );
                }
                None => s.out.fill(0.0),
            }
            for &j in &s.chosen {
                let g = cfg.routed_scaling * s.router[j] / sum;
                let (wf, ff) = (f * c, c * f);
                mlp(
                    &mut s.acc,
                    &gate[j * wf..(j + 1) * wf],
                    &up[j * wf..(j + 1) * wf],
                    &down[j * ff..(j + 1) * ff],
                    &s.xn,
                    &mut s.h[..f],
                    &mut s.u[..f],
                );
                for (o, a) in s.out.iter_mut().zip(&s.acc) {
                    *o += g * a;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling

/// How the next token is drawn from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Divides the logits; 0 takes the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Then only the fewest most likely tokens whose probability sums to at least `top_p`
    /// (nucleus sampling; 1: all).
    pub top_p: f64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplingOptions {
    /// Checks the ranges; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("--temperature {} must be 0 or more", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

/// Draws tokens from logits as [`SamplingOptions`] say, from a seeded stream: the same seed and
/// logits give the same tokens.
pub struct Sampler {
    options: SamplingOptions,
    rng: Rng,
    order: Vec<usize>,
    probs: Vec<f64>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab`.
    pub fn new(options: SamplingOptions, seed: u64, vocab: usize) -> Sampler {
        Sampler {
            options,
            rng: Rng::new(seed),
            order: Vec::with_capacity(vocab),
            probs: Vec::with_capacity(vocab),
        }
    }

    /// The next token for `logits` `[V]`.
    pub fn sample(&mut self, logits: &[f64]) -> u32 {
        let o = self.options;
        // Most likely first, ties to the lower id (a stable sort): the candidates' order, and
        // so the draw, depends on the logits alone.
        self.order.clear();
        self.order.extend(0..logits.len());
        self.order.sort_by(|&a, &b| {
            logits[b]
                .partial_cmp(&logits[a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        if o.temperature == 0.0 {
            return self.order[0] as u32;
        }
        let keep = if o.top_k == 0 {
            logits.len()
        } else {
            o.top_k.min(logits.len())
        };
        let top = logits[self.order[0]];
        self.probs.clear();
        self.probs.extend(
            self.order[..keep]
                .iter()
                .map(|&i| ((logits[i] - top) / o.temperature).exp()),
        );
        let sum: f64 = self.probs.iter().sum();
        // Nucleus: the shortest prefix whose probability reaches top_p.
        let mut cum = 0.0;
        let mut nucleus = self.probs.len();
        for (i, p) in self.probs.iter().enumerate() {
            cum += p / sum;
            if cum >= o.top_p {
                nucleus = i + 1;
                break;
            }
        }
        let kept: f64 = self.probs[..nucleus].iter().sum();
        let mut u = self.rng.uniform() * kept;
        for (i, p) in self.probs[..nucleus].iter().enumerate() {
            if u < *p {
                return self.order[i] as u32;
            }
            u -= p;
        }
        self.order[nucleus - 1] as u32
    }
}
