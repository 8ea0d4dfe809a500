//! The Moonlight-style (DeepSeek-V3 family) MoE decoder: parameters, activations, forward and
//! backward passes, written once over [`ModelOps`] so the same code runs on any backend.
//!
//! Read it like llm.c's `train_gpt2.c`: the layers are free `*_forward` / `*_backward` pairs in
//! [`attention`] and [`ffn`]; this file holds the parameters (one list of backend matrices,
//! described by [`ParamSpec`]s, with the gradients in the same layout), the activation cache,
//! and `forward` / `backward` / `update_router_bias`.
//!
//! Dimension letters, used in every shape comment:
//!
//! ```text
//! B batch   T sequence   N = B*T tokens   C model width   V vocabulary
//! H heads   E routed experts   K experts per token   R = N*K routed rows   F FFN width
//! ```
//!
//! The network (DeepSeek-V3's, as Moonlight uses it):
//!
//! ```text
//! x = embed[tokens]                                             [N, C]
//! for each block l:
//!     x = x + attention(rmsnorm(x))         MHA or MLA, RoPE, causal softmax
//!     x = x + ffn(rmsnorm(x))               SwiGLU (l < dense_layers) or MoE
//! loss = mean cross_entropy(rmsnorm(x) W_head^T, targets)
//! ```
//!
//! Every activation buffer is allocated in [`Model::new`] for the (batch, seq) it is built for;
//! MoE buffers hold the worst case (all `N*K` routed rows are always present, whatever the
//! split between experts), so nothing is allocated in `forward` or `backward`. On the CPU
//! backends the row-parallel kernels use rayon: call the model from inside rayon's pool (wrap
//! the training loop in `rayon::scope`) and a step allocates nothing at all; from outside,
//! rayon's injector queue allocates a block every 63 parallel loops (~3 per tiny step).
//! `tests/model_alloc.rs` checks it.

pub mod attention;
pub mod ffn;
#[cfg(test)]
mod tests;

use std::fmt;

use muon_core::{Backend, ParamRole, ParamSpec, Real, Shape, Transpose};

use crate::config::ModelConfig;
use crate::ops::ModelOps;
use crate::rng::Rng;
use attention::Attention;
use ffn::{Moe, SwiGlu};

/// A matrix stack of backend `B`.
pub type Mat<B> = <B as Backend>::Matrix;

/// A named tensor on the host, as checkpoints hold parameters, optimizer state and the model's
/// buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<E = f32> {
    /// Its name (a parameter's as its `ParamSpec` says, `layers.1.attn.wq`).
    pub name: String,
    /// Its shape.
    pub shape: Shape,
    /// Row-major elements, `shape.len()` of them.
    pub data: Vec<E>,
}

/// What went wrong in the model.
#[derive(Debug)]
pub enum ModelError {
    /// The configuration cannot work (the message names the field).
    Config(String),
    /// Bad input: wrong token count, a token outside the vocabulary, backward before forward.
    Input(String),
    /// The backend failed.
    Backend(muon_core::Error),
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Config(m) => write!(f, "invalid model configuration: {m}"),
            ModelError::Input(m) => write!(f, "invalid model input: {m}"),
            ModelError::Backend(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ModelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ModelError::Backend(e) => Some(e),
            _ => None,
        }
    }
}

impl From<muon_core::Error> for ModelError {
    fn from(e: muon_core::Error) -> Self {
        ModelError::Backend(e)
    }
}

// ----------------------------------------------------------------------------------------
// Helpers shared by the layers.

/// The forward of a bias-free linear layer: `out = x w^T`. out: `[N, O]`, x: `[N, I]`,
/// w: `[O, I]` (PyTorch's `[out, in]` layout).
pub(crate) fn linear_forward<B: ModelOps>(
    b: &B,
    out: &mut Mat<B>,
    x: &Mat<B>,
    w: &Mat<B>,
) -> muon_core::Result<()> {
    b.gemm(
        out,
        B::Elem::ONE,
        x,
        Transpose::No,
        w,
        Transpose::Yes,
        B::Elem::ZERO,
    )
}

/// The backward of [`linear_forward`]: `dw += dout^T x`, and `dx = dout w` (or `dx += dout w`
/// with `accumulate_dx`). dx: `[N, I]`, dw: `[O, I]`, dout: `[N, O]`.
pub(crate) fn linear_backward<B: ModelOps>(
    b: &B,
    dx: &mut Mat<B>,
    dw: &mut Mat<B>,
    dout: &Mat<B>,
    x: &Mat<B>,
    w: &Mat<B>,
    accumulate_dx: bool,
) -> muon_core::Result<()> {
    let (one, zero) = (B::Elem::ONE, B::Elem::ZERO);
    b.gemm(dw, one, dout, Transpose::Yes, x, Transpose::No, one)?;
    b.gemm(
        dx,
        one,
        dout,
        Transpose::No,
        w,
        Transpose::No,
        if accumulate_dx { one } else { zero },
    )
}

/// Standard deviation of the initial weights (GPT-2 / DeepSeek `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// Allocates one matrix per spec and initializes it from `seed`: norm gains to 1, every other
/// tensor from `normal(0, INIT_STD)`, drawn in spec order from one stream.
pub(crate) fn init_params<B: ModelOps>(
    b: &B,
    specs: &[ParamSpec],
    seed: u64,
) -> Result<Vec<Mat<B>>, ModelError> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut m = b.zeros(spec.shape)?;
        let host: Vec<B::Elem> = match spec.role {
            ParamRole::Norm => vec![B::Elem::ONE; spec.shape.len()],
            _ => (0..spec.shape.len())
                .map(|_| B::Elem::from_f64(INIT_STD * rng.normal()))
                .collect(),
        };
        b.upload(&mut m, &host)?;
        out.push(m);
    }
    Ok(out)
}

/// Adds a parameter to `specs` and returns its index.
pub(crate) fn declare(specs: &mut Vec<ParamSpec>, name: String, shape: Shape, role: ParamRole) -> usize {
    specs.push(ParamSpec::new(name, shape, role));
    specs.len() - 1
}

// ----------------------------------------------------------------------------------------
// Blocks.

/// The feed-forward half of a block.
enum Ffn<B: ModelOps> {
    Dense(SwiGlu<B>),
    Moe(Moe<B>),
}

/// One pre-norm decoder block and its cache.
struct Block<B: ModelOps> {
    attn_norm: usize,
    ffn_norm: usize,
    attn: Attention<B>,
    ffn: Ffn<B>,
    xn1: Mat<B>,   // [N, C] rmsnorm(x_in)
    rstd1: Mat<B>, // [1, N]
    mid: Mat<B>,   // [N, C] x_in + attention
    xn2: Mat<B>,   // [N, C] rmsnorm(mid)
    rstd2: Mat<B>, // [1, N]
    tmp: Mat<B>,   // [N, C] scratch: a sub-layer's output
}

/// `x_out = mid + ffn(rmsnorm(mid))` with `mid = x_in + attention(rmsnorm(x_in))`.
fn block_forward<B: ModelOps>(
    b: &B,
    cfg: &ModelConfig,
    p: &[Mat<B>],
    blk: &mut Block<B>,
    x_in: &Mat<B>,      // [N, C]
    x_out: &mut Mat<B>, // [N, C]
) -> Result<(), ModelError> {
    let one = B::Elem::ONE;
    b.rmsnorm_forward(
        &mut blk.xn1,
        &mut blk.rstd1,
        x_in,
        &p[blk.attn_norm],
        cfg.norm_eps,
    )?;
    attention::attention_forward(b, p, &mut blk.attn, &blk.xn1, &mut blk.tmp)?;
    b.copy(&mut blk.mid, x_in)?;
    b.axpby(&mut blk.mid, one, &blk.tmp, one)?;
    b.rmsnorm_forward(
        &mut blk.xn2,
        &mut blk.rstd2,
        &blk.mid,
        &p[blk.ffn_norm],
        cfg.norm_eps,
    )?;
    match &mut blk.ffn {
        Ffn::Dense(f) => ffn::swiglu_forward(b, p, f, &blk.xn2, &mut blk.tmp)?,
        Ffn::Moe(m) => ffn::moe_forward(b, p, m, &blk.xn2, &mut blk.tmp)?,
    }
    b.copy(x_out, &blk.mid)?;
    b.axpby(x_out, one, &blk.tmp, one)?;
    Ok(())
}

/// Backward of [`block_forward`]: `dres` holds dL/dx_out on entry and dL/dx_in on exit (the
/// residual connections pass the gradient through; each norm's backward adds its part).
fn block_backward<B: ModelOps>(
    b: &B,
    p: &[Mat<B>],
    g: &mut [Mat<B>],
    blk: &mut Block<B>,
    x_in: &Mat<B>,     // [N, C]
    dres: &mut Mat<B>, // [N, C]
    dxn: &mut Mat<B>,  // [N, C] scratch
) -> Result<(), ModelError> {
    // x_out = mid + ffn(xn2): dxn2 = ffn^T dres; dmid = dres + rmsnorm^T dxn2.
    match &mut blk.ffn {
        Ffn::Dense(f) => ffn::swiglu_backward(b, p, g, f, &blk.xn2, dres, dxn)?,
        Ffn::Moe(m) => ffn::moe_backward(b, p, g, m, &blk.xn2, dres, dxn)?,
    }
    let (norm, gain) = (blk.ffn_norm, &p[blk.ffn_norm]);
    b.rmsnorm_backward(dres, &mut g[norm], dxn, &blk.mid, gain, &blk.rstd2)?;
    // mid = x_in + attention(xn1): the same, one level down.
    attention::attention_backward(b, p, g, &mut blk.attn, &blk.xn1, dres, dxn)?;
    let (norm, gain) = (blk.attn_norm, &p[blk.attn_norm]);
    b.rmsnorm_backward(dres, &mut g[norm], dxn, x_in, gain, &blk.rstd1)?;
    Ok(())
}

// ----------------------------------------------------------------------------------------
// The model.

/// A Moonlight-style MoE decoder with its parameters, gradients and activations on backend
/// `B`, built for token windows of `batch x seq`.
pub struct Model<B: ModelOps> {
    /// The configuration it was built from.
    pub config: ModelConfig,
    batch: usize,
    seq: usize,
    specs: Vec<ParamSpec>,
    params: Vec<Mat<B>>,
    grads: Vec<Mat<B>>,
    embed: usize,
    final_norm: usize,
    lm_head: usize,
    blocks: Vec<Block<B>>,
    tokens: B::Indices,  // [N]
    targets: B::Indices, // [N]
    resid: Vec<Mat<B>>,  // L+1 x [N, C]: the embedding, then each block's output
    xf: Mat<B>,          // [N, C] final rmsnorm
    rstdf: Mat<B>,       // [1, N]
    logits: Mat<B>,      // [N, V]
    probs: Mat<B>,       // [N, V]
    loss: Mat<B>,        // [1, 1]
    dlogits: Mat<B>,     // [N, V]
    dres: Mat<B>,        // [N, C] gradient of the residual stream
    dxn: Mat<B>,         // [N, C] gradient of a norm's output
    loss_host: Vec<B::Elem>,
    /// The sequence-wise balance loss of the last forward, summed over the MoE layers.
    aux_loss: f64,
    loads: Vec<Vec<u32>>, // [moe layer][E] from the last forward
    forwarded: bool,
}

impl<B: ModelOps> Model<B> {
    /// Allocates params (initialized from `seed`), grads and every activation buffer for
    /// (batch, seq) token windows. Errors on an invalid config or seq > max_seq_len.
    pub fn new(
        backend: &B,
        config: ModelConfig,
        batch: usize,
        seq: usize,
        seed: u64,
    ) -> Result<Self, ModelError> {
        config.validate().map_err(ModelError::Config)?;
        if batch == 0 || seq == 0 {
            return Err(ModelError::Config(format!(
                "batch {batch} and seq {seq} must be at least 1"
            )));
        }
        if seq > config.max_seq_len {
            return Err(ModelError::Config(format!(
                "seq {seq} exceeds the model's max_seq_len {}",
                config.max_seq_len
            )));
        }
        let b = backend;
        let need = crate::memory::model_bytes(&config, batch, seq, std::mem::size_of::<B::Elem>());
        if let Some(avail) = b.available_memory() {
            if need > avail {
                return Err(ModelError::Config(format!(
                    "the model needs {} for batch {batch} x seq {seq} (parameters, gradients and \
                     activations), but only {} are available",
                    crate::memory::gib(need),
                    crate::memory::gib(avail)
                )));
            }
        }
        let (n, c, v) = (batch * seq, config.dim, config.vocab_size);
        let mut specs = Vec::new();
        let embed = declare(
            &mut specs,
            "embed".into(),
            Shape::matrix(v, c),
            ParamRole::Embedding,
        );
        let mut blocks = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let pre = format!("layers.{l}");
            let attn_norm = declare(
                &mut specs,
                format!("{pre}.attn_norm"),
                Shape::vector(c),
                ParamRole::Norm,
            );
            let attn = Attention::new(b, &mut specs, &format!("{pre}.attn"), &config, batch, seq)?;
            let ffn_norm = declare(
                &mut specs,
                format!("{pre}.ffn_norm"),
                Shape::vector(c),
                ParamRole::Norm,
            );
            let ffn = if l < config.dense_layers {
                Ffn::Dense(SwiGlu::new(
                    b,
                    &mut specs,
                    &format!("{pre}.ffn"),
                    c,
                    config.dense_ffn_width,
                    n,
                )?)
            } else {
                Ffn::Moe(Moe::new(
                    b,
                    &mut specs,
                    &format!("{pre}.moe"),
                    &config,
                    batch,
                    seq,
                )?)
            };
            let nc = Shape::matrix(n, c);
            blocks.push(Block {
                attn_norm,
                ffn_norm,
                attn,
                ffn,
                xn1: b.zeros(nc)?,
                rstd1: b.zeros(Shape::vector(n))?,
                mid: b.zeros(nc)?,
                xn2: b.zeros(nc)?,
                rstd2: b.zeros(Shape::vector(n))?,
                tmp: b.zeros(nc)?,
            });
        }
        let final_norm = declare(&mut specs, "final_norm".into(), Shape::vector(c), ParamRole::Norm);
        let lm_head = declare(
            &mut specs,
            "lm_head".into(),
            Shape::matrix(v, c),
            ParamRole::LmHead,
        );
        let params = init_params(b, &specs, seed)?;
        let grads = specs
            .iter()
            .map(|s| b.zeros(s.shape))
            .collect::<Result<Vec<_>, _>>()?;
        let resid = (0..=config.n_layers)
            .map(|_| b.zeros(Shape::matrix(n, c)))
            .collect::<Result<Vec<_>, _>>()?;
        let loads = vec![vec![0; config.n_routed_experts]; config.moe_layers()];
        Ok(Model {
            batch,
            seq,
            specs,
            params,
            grads,
            embed,
            final_norm,
            lm_head,
            blocks,
            tokens: b.indices_zeros(n)?,
            targets: b.indices_zeros(n)?,
            resid,
            xf: b.zeros(Shape::matrix(n, c))?,
            rstdf: b.zeros(Shape::vector(n))?,
            logits: b.zeros(Shape::matrix(n, v))?,
            probs: b.zeros(Shape::matrix(n, v))?,
            loss: b.zeros(Shape::matrix(1, 1))?,
            dlogits: b.zeros(Shape::matrix(n, v))?,
            dres: b.zeros(Shape::matrix(n, c))?,
            dxn: b.zeros(Shape::matrix(n, c))?,
            loss_host: vec![B::Elem::ZERO; 1],
            aux_loss: 0.0,
            loads,
            forwarded: false,
            config,
        })
    }

    /// The (batch, seq) this model was built for.
    pub fn batch_seq(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    /// One ParamSpec per parameter tensor, in the order of params()/grads().
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.specs.clone()
    }

    /// The parameters.
    pub fn params(&self) -> &[Mat<B>] {
        &self.params
    }

    /// The parameters, mutable (the optimizer, checkpoint loading).
    pub fn params_mut(&mut self) -> &mut [Mat<B>] {
        &mut self.params
    }

    /// The gradients of the last backward, same layout as the parameters.
    pub fn grads(&self) -> &[Mat<B>] {
        &self.grads
    }

    /// Both at once, for `HybridOptimizer::step(backend, params, grads, lr)`.
    pub fn params_and_grads(&mut self) -> (&mut [Mat<B>], &[Mat<B>]) {
        (&mut self.params, &self.grads)
    }

    fn check_ids(&self, what: &str, ids: &[u32]) -> Result<(), ModelError> {
        let n = self.batch * self.seq;
        if ids.len() != n {
            return Err(ModelError::Input(format!(
                "{} {what}, expected batch {} x seq {} = {n}",
                ids.len(),
                self.batch,
                self.seq
            )));
        }
        let v = self.config.vocab_size;
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(ModelError::Input(format!(
                "{what}[{i}] = {t} is outside the vocabulary of {v}"
            )));
        }
        Ok(())
    }

    /// Forward over batch*seq tokens (row-major `[batch][seq]`), mean cross-entropy against
    /// `targets` (same layout). Caches what backward needs. Returns the cross-entropy; the
    /// balance loss, when on, is [`aux_loss`](Self::aux_loss).
    pub fn forward(&mut self, backend: &B, tokens: &[u32], targets: &[u32]) -> Result<f64, ModelError> {
        self.check_ids("targets", targets)?;
        self.forward_logits(backend, tokens)?;
        let b = backend;
        b.indices_upload(&mut self.targets, targets)?;
        b.cross_entropy_forward(&mut self.probs, &mut self.loss, &self.logits, &self.targets)?;
        // The one read-back of a step: the loss, the expert loads and the balance losses (a few
        // numbers).
        b.download(&self.loss, &mut self.loss_host)?;
        let loss = self.loss_host[0].to_f64();
        let mut moe = 0;
        self.aux_loss = 0.0;
        for blk in &self.blocks {
            if let Ffn::Moe(m) = &blk.ffn {
                b.indices_download(&m.counts, &mut self.loads[moe])?;
                if self.config.aux_loss_alpha > 0.0 {
                    b.download(&m.aux_loss, &mut self.loss_host)?;
                    self.aux_loss += self.loss_host[0].to_f64();
                }
                moe += 1;
            }
        }
        self.forwarded = true;
        Ok(loss)
    }

    /// The logits of a forward over batch*seq tokens (row-major `[batch][seq]`): every
    /// position's, `[batch*seq, V]` row-major, or with `last_only` each sequence's last,
    /// `[batch, V]`. No loss, and [`backward`](Self::backward) refuses to follow it. (For
    /// inference without the training buffers, see [`crate::infer::Decoder`].)
    pub fn logits(
        &mut self,
        backend: &B,
        tokens: &[u32],
        last_only: bool,
    ) -> Result<Vec<B::Elem>, ModelError> {
        self.forward_logits(backend, tokens)?;
        let v = self.config.vocab_size;
        let mut all = vec![B::Elem::ZERO; self.batch * self.seq * v];
        backend.download(&self.logits, &mut all)?;
        if !last_only {
            return Ok(all);
        }
        let t = self.seq;
        Ok((0..self.batch)
            .flat_map(|b| all[(b * t + t - 1) * v..(b * t + t) * v].iter().copied())
            .collect())
    }

    /// The forward up to the logits (in `self.logits`), caching what backward needs.
    fn forward_logits(&mut self, backend: &B, tokens: &[u32]) -> Result<(), ModelError> {
        self.check_ids("tokens", tokens)?;
        let b = backend;
        self.forwarded = false;
        b.indices_upload(&mut self.tokens, tokens)?;
        let p = &self.params;
        // x = embed[tokens]
        b.embedding_forward(&mut self.resid[0], &p[self.embed], &self.tokens)?;
        for (l, blk) in self.blocks.iter_mut().enumerate() {
            let (done, rest) = self.resid.split_at_mut(l + 1);
            block_forward(b, &self.config, p, blk, &done[l], &mut rest[0])?;
        }
        // loss = mean cross_entropy(rmsnorm(x) W_head^T, targets)
        let x_last = &self.resid[self.config.n_layers];
        b.rmsnorm_forward(
            &mut self.xf,
            &mut self.rstdf,
            x_last,
            &p[self.final_norm],
            self.config.norm_eps,
        )?;
        linear_forward(b, &mut self.logits, &self.xf, &p[self.lm_head])?;
        Ok(())
    }

    /// DeepSeek-V3's sequence-wise balance loss of the last forward, summed over the MoE
    /// layers (0 when `aux_loss_alpha` is 0). The training objective is `forward`'s
    /// cross-entropy plus this; [`backward`](Self::backward) differentiates both.
    pub fn aux_loss(&self) -> f64 {
        self.aux_loss
    }

    /// Overwrites grads with d(loss)/d(params) for the last forward.
    pub fn backward(&mut self, backend: &B) -> Result<(), ModelError> {
        if !self.forwarded {
            return Err(ModelError::Input(
                "backward called before a successful forward".into(),
            ));
        }
        let b = backend;
        let (p, g) = (&self.params, &mut self.grads);
        for gi in g.iter_mut() {
            b.fill(gi, B::Elem::ZERO)?;
        }
        let n = self.batch * self.seq;
        // loss = mean_n cross_entropy(logits[n]): dlogits = (probs - onehot) / N
        b.cross_entropy_backward(&mut self.dlogits, &self.probs, &self.targets, 1.0 / n as f64)?;
        // logits = xf W_head^T
        linear_backward(
            b,
            &mut self.dxn,
            &mut g[self.lm_head],
            &self.dlogits,
            &self.xf,
            &p[self.lm_head],
            false,
        )?;
        // xf = rmsnorm(x_last)
        b.fill(&mut self.dres, B::Elem::ZERO)?;
        let x_last = &self.resid[self.config.n_layers];
        let fnorm = self.final_norm;
        b.rmsnorm_backward(
            &mut self.dres,
            &mut g[fnorm],
            &self.dxn,
            x_last,
            &p[fnorm],
            &self.rstdf,
        )?;
        for (l, blk) in self.blocks.iter_mut().enumerate().rev() {
            block_backward(b, p, g, blk, &self.resid[l], &mut self.dres, &mut self.dxn)?;
        }
        // x = embed[tokens]
        b.embedding_backward(&mut g[self.embed], &self.dres, &self.tokens)?;
        Ok(())
    }

    /// Auxiliary-loss-free balancing after each optimizer step:
    /// `b_i += rate * sign(mean_load - load_i)`, with the loads of the last forward.
    pub fn update_router_bias(&mut self, backend: &B) -> Result<(), ModelError> {
        let rate = self.config.bias_update_rate;
        for blk in &mut self.blocks {
            if let Ffn::Moe(m) = &mut blk.ffn {
                backend.router_bias_update(&mut m.bias, &m.counts, rate)?;
            }
        }
        Ok(())
    }

    /// Tokens routed to each expert in the last forward, per MoE layer: `[moe_layer][expert]`.
    pub fn expert_load(&self) -> &[Vec<u32>] {
        &self.loads
    }

    /// Replaces the last forward's expert loads (the host copy [`expert_load`](Self::expert_load)
    /// reads and the device counts [`update_router_bias`](Self::update_router_bias) uses) with
    /// `loads`, `[moe_layer][expert]`: data-parallel ranks sum theirs, so that every rank's
    /// biases take the same update, the one the whole batch calls for. The backward does not
    /// read the counts, so this may come before or after it.
    pub fn set_expert_load(&mut self, backend: &B, loads: &[Vec<u32>]) -> Result<(), ModelError> {
        let fits =
            loads.len() == self.loads.len() && loads.iter().zip(&self.loads).all(|(a, b)| a.len() == b.len());
        if !fits {
            return Err(ModelError::Input(format!(
                "expert loads for {} MoE layers of {:?} experts; the model has {} of {}",
                loads.len(),
                loads.first().map(Vec::len),
                self.loads.len(),
                self.config.n_routed_experts
            )));
        }
        let mut moe = 0;
        for blk in &mut self.blocks {
            if let Ffn::Moe(m) = &mut blk.ffn {
                backend.indices_upload(&mut m.counts, &loads[moe])?;
                self.loads[moe].copy_from_slice(&loads[moe]);
                moe += 1;
            }
        }
        Ok(())
    }

    fn bias_name(layer: usize) -> String {
        format!("layers.{layer}.moe.router_bias")
    }

    /// Non-trained state to checkpoint: the router selection biases.
    pub fn buffers(&self, backend: &B) -> Result<Vec<Tensor<B::Elem>>, ModelError> {
        let mut out = Vec::new();
        for (l, blk) in self.blocks.iter().enumerate() {
            if let Ffn::Moe(m) = &blk.ffn {
                let shape = B::shape(&m.bias);
                let mut host = vec![B::Elem::ZERO; shape.len()];
                backend.download(&m.bias, &mut host)?;
                out.push(Tensor {
                    name: Self::bias_name(l),
                    shape,
                    data: host,
                });
            }
        }
        Ok(out)
    }

    /// Restores what [`buffers`](Self::buffers) returned; every buffer must be present with
    /// its shape, and no other.
    pub fn load_buffers(&mut self, backend: &B, buffers: &[Tensor<B::Elem>]) -> Result<(), ModelError> {
        let expected = self
            .blocks
            .iter()
            .filter(|b| matches!(b.ffn, Ffn::Moe(_)))
            .count();
        if buffers.len() != expected {
            return Err(ModelError::Input(format!(
                "{} model buffers given, the model has {expected}",
                buffers.len()
            )));
        }
        for (l, blk) in self.blocks.iter_mut().enumerate() {
            if let Ffn::Moe(m) = &mut blk.ffn {
                let name = Self::bias_name(l);
                let t = buffers
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or_else(|| ModelError::Input(format!("model buffer `{name}` is missing")))?;
                let want = B::shape(&m.bias);
                if t.shape != want || t.data.len() != want.len() {
                    return Err(ModelError::Input(format!(
                        "model buffer `{name}` is {} with {} values, expected {want}",
                        t.shape,
                        t.data.len()
                    )));
                }
                backend.upload(&mut m.bias, &t.data)?;
            }
        }
        Ok(())
    }
}
