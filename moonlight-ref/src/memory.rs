//! Memory: what a training run needs, estimated from its settings before anything is
//! allocated, so a run that cannot fit is refused with the figures instead of being ended by
//! the kernel's out-of-memory killer; and what the process used.
//!
//! The estimate is an upper bound built from the same shapes the model and the optimizer
//! allocate: the parameters and their gradients, every activation buffer (forward caches and
//! backward scratch, MoE buffers at their worst case of `N*K` routed rows), the optimizer's
//! state and workspaces, the data, the checkpoint being written (a host copy of everything
//! plus its serialized bytes), and the runtime (the binary, thread stacks, kernel packing
//! buffers). `tests/memory.rs` checks it against the peaks that real runs measure.

use std::collections::BTreeSet;
use std::fmt;

use muon_core::{OptimizerKind, ParamRole, ParamSpec, Shape};

use crate::config::{Attention, ModelConfig};

/// Bytes of a training run, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Parameters and their gradients.
    pub parameters: u64,
    /// Activations: forward caches and backward buffers, for one batch.
    pub activations: u64,
    /// The optimizer's state and its Newton-Schulz and AdamW workspaces.
    pub optimizer: u64,
    /// The training data as read and as tokens.
    pub data: u64,
    /// A checkpoint being written or read: a host copy of the state and its file's bytes.
    pub checkpoint: u64,
    /// The process itself: code, thread stacks, the kernels' packing buffers.
    pub runtime: u64,
}

impl MemoryEstimate {
    /// All parts together.
    pub fn total(&self) -> u64 {
        [
            self.parameters,
            self.activations,
            self.optimizer,
            self.data,
            self.checkpoint,
            self.runtime,
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add)
    }
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (parameters and gradients {}, activations {}, optimizer {}, data {}, checkpoint {}, runtime {})",
            gib(self.total()),
            gib(self.parameters),
            gib(self.activations),
            gib(self.optimizer),
            gib(self.data),
            gib(self.checkpoint),
            gib(self.runtime)
        )
    }
}

/// Saturating arithmetic on element counts: a user's absurd batch makes an absurd estimate
/// (refused), never a wrapped small one.
#[derive(Clone, Copy, Default)]
struct Count(u64);

impl Count {
    fn add(&mut self, factors: &[usize]) {
        let product = factors.iter().fold(1u64, |acc, &x| acc.saturating_mul(x as u64));
        self.0 = self.0.saturating_add(product);
    }
}

/// The model's parameters, as [`Model::new`](crate::model::Model::new) declares them (names,
/// shapes, roles, in its order), computed without building the model.
pub fn param_specs(config: &ModelConfig) -> Vec<ParamSpec> {
    let c = config.dim;
    let mut specs = Vec::new();
    let mut push =
        |name: String, shape: Shape, role: ParamRole| specs.push(ParamSpec::new(name, shape, role));
    push(
        "embed".into(),
        Shape::matrix(config.vocab_size, c),
        ParamRole::Embedding,
    );
    let h = config.n_heads;
    for l in 0..config.n_layers {
        let pre = format!("layers.{l}");
        push(format!("{pre}.attn_norm"), Shape::vector(c), ParamRole::Norm);
        let attn = format!("{pre}.attn");
        let dv = config.v_head_dim();
        match &config.attention {
            Attention::Mha => {
                let d = config.head_dim;
                for w in ["wq", "wk", "wv"] {
                    push(format!("{attn}.{w}"), Shape::matrix(h * d, c), ParamRole::Hidden);
                }
            }
            &Attention::Mla {
                kv_lora_rank: r,
                qk_nope_head_dim: dn,
                qk_rope_head_dim: dr,
                v_head_dim,
            } => {
                push(
                    format!("{attn}.wq"),
                    Shape::matrix(h * (dn + dr), c),
                    ParamRole::Hidden,
                );
                push(
                    format!("{attn}.wkv_a"),
                    Shape::matrix(r + dr, c),
                    ParamRole::Hidden,
                );
                push(format!("{attn}.kv_norm"), Shape::vector(r), ParamRole::Norm);
                let kvb = Shape::matrix(h * (dn + v_head_dim), r);
                push(format!("{attn}.wkv_b"), kvb, ParamRole::Hidden);
            }
        }
        push(format!("{attn}.wo"), Shape::matrix(c, h * dv), ParamRole::Hidden);
        push(format!("{pre}.ffn_norm"), Shape::vector(c), ParamRole::Norm);
        let mut swiglu = |prefix: String, f: usize| {
            push(format!("{prefix}.w_gate"), Shape::matrix(f, c), ParamRole::Hidden);
            push(format!("{prefix}.w_up"), Shape::matrix(f, c), ParamRole::Hidden);
            push(format!("{prefix}.w_down"), Shape::matrix(c, f), ParamRole::Hidden);
        };
        if l < config.dense_layers {
            swiglu(format!("{pre}.ffn"), config.dense_ffn_width);
        } else {
            let (e, f) = (config.n_routed_experts, config.expert_width);
            let moe = format!("{pre}.moe");
            specs_moe(&mut push, &moe, c, e, f);
            if config.n_shared_experts > 0 {
                let width = config.n_shared_experts * f;
                push(
                    format!("{moe}.shared.w_gate"),
                    Shape::matrix(width, c),
                    ParamRole::Hidden,
                );
                push(
                    format!("{moe}.shared.w_up"),
                    Shape::matrix(width, c),
                    ParamRole::Hidden,
                );
                push(
                    format!("{moe}.shared.w_down"),
                    Shape::matrix(c, width),
                    ParamRole::Hidden,
                );
            }
        }
    }
    push("final_norm".into(), Shape::vector(c), ParamRole::Norm);
    push(
        "lm_head".into(),
        Shape::matrix(config.vocab_size, c),
        ParamRole::LmHead,
    );
    specs
}

fn specs_moe(push: &mut impl FnMut(String, Shape, ParamRole), moe: &str, c: usize, e: usize, f: usize) {
    push(format!("{moe}.router"), Shape::matrix(e, c), ParamRole::Hidden);
    push(
        format!("{moe}.experts.w_gate"),
        Shape::batched(e, f, c),
        ParamRole::Hidden,
    );
    push(
        format!("{moe}.experts.w_up"),
        Shape::batched(e, f, c),
        ParamRole::Hidden,
    );
    push(
        format!("{moe}.experts.w_down"),
        Shape::batched(e, c, f),
        ParamRole::Hidden,
    );
}

/// Elements of the model's activation buffers for `batch x seq` windows (element type), and of
/// its index buffers (`u32`), as [`Model::new`](crate::model::Model::new) allocates them.
pub fn activation_elements(config: &ModelConfig, batch: usize, seq: usize) -> (u64, u64) {
    let (b, t) = (batch, seq);
    let n = b.saturating_mul(t);
    let (c, v, h, l) = (config.dim, config.vocab_size, config.n_heads, config.n_layers);
    let (qk, dv) = (config.qk_head_dim(), config.v_head_dim());
    let (mut x, mut idx) = (Count::default(), Count::default());
    // The residual stream (L+1), the final norm, logits / probabilities / their gradient, the
    // residual and norm gradients.
    x.add(&[l + 4, n, c]);
    x.add(&[n]);
    x.add(&[3, n, v]);
    x.add(&[1]);
    idx.add(&[2, n]);
    for layer in 0..l {
        // Block: xn1, mid, xn2, tmp; rstd1, rstd2.
        x.add(&[4, n, c]);
        x.add(&[2, n]);
        // Attention projections.
        let rope_width = match &config.attention {
            Attention::Mha => {
                x.add(&[6, n, h, config.head_dim]);
                config.head_dim
            }
            &Attention::Mla {
                kv_lora_rank: r,
                qk_nope_head_dim: dn,
                qk_rope_head_dim: dr,
                v_head_dim,
            } => {
                x.add(&[2, n, h, dn + dr]); // q, dq
                x.add(&[2, n, r + dr]); // kva, dkva
                x.add(&[4, n, r]); // c, cn, dc, dcn
                x.add(&[n]); // c_rstd
                x.add(&[2, n, h, dn + v_head_dim]); // kvb, dkvb
                dr
            }
        };
        x.add(&[t, rope_width]);
        // The core: scores and their gradient, each sequence's key scratch, o and d_o rows
        // (the heads themselves stay in the projections' rows).
        x.add(&[2, b, h, t, t]);
        x.add(&[b, t, 2 * qk]);
        x.add(&[2, n, h, dv]);
        // The feed-forward half.
        let swiglu = |x: &mut Count, f: usize| x.add(&[6, n, f]);
        if layer < config.dense_layers {
            swiglu(&mut x, config.dense_ffn_width);
        } else {
            let (e, k, f) = (config.n_routed_experts, config.top_k, config.expert_width);
            let r = n.saturating_mul(k);
            if config.n_shared_experts > 0 {
                swiglu(&mut x, config.n_shared_experts * f);
            }
            x.add(&[e]); // the selection bias
            x.add(&[3, n, e]); // logits, scores, dlogits
            x.add(&[2, n, k]); // gates, dgates
            x.add(&[4, r, c]); // xg, yg, dyg, dxg
            x.add(&[6, r, f]); // hg, hu, act, dact, dhg, dhu
            x.add(&[1]);
            if config.aux_loss_alpha > 0.0 {
                x.add(&[b, e]);
                x.add(&[n, e]);
            }
            idx.add(&[3, r]);
            idx.add(&[2, e]);
            idx.add(&[1]);
        }
    }
    (x.0, idx.0)
}

/// Bytes of the model alone (parameters, gradients, activations) in elements of `elem` bytes.
pub fn model_bytes(config: &ModelConfig, batch: usize, seq: usize, elem: usize) -> u64 {
    let params = param_elements(&param_specs(config));
    let (acts, indices) = activation_elements(config, batch, seq);
    params
        .saturating_mul(2)
        .saturating_add(acts)
        .saturating_mul(elem as u64)
        .saturating_add(indices.saturating_mul(4))
}

fn param_elements(specs: &[ParamSpec]) -> u64 {
    specs
        .iter()
        .fold(0u64, |acc, s| acc.saturating_add(s.shape.len() as u64))
}

/// Elements of the optimizer's state and workspaces for `specs` on one rank of `world`, as
/// muon-core's `DistributedOptimizer` allocates them (a single process is a group of one):
/// per parameter a gradient shard and its state shards (Muon's momentum, AdamW's two
/// moments) of `shard_capacity(len, world)` elements; per distinct shard length an update and
/// a parameter scratch; per distinct Muon shape a Newton-Schulz workspace (`x`, `next`, the
/// Gram and polynomial matrices, a transposed item for tall Gram products); and with more
/// than one rank, the round-robin Newton-Schulz result of every Muon matrix. Returns
/// `(state, workspaces)`.
pub fn optimizer_elements(specs: &[ParamSpec], world: usize) -> (u64, u64) {
    let (mut state, mut work) = (Count::default(), Count::default());
    let (mut muon_shapes, mut shard_lens) = (BTreeSet::new(), BTreeSet::new());
    for s in specs {
        let shape = s.shape;
        let shard = muon_core::shard_capacity(shape.len(), world);
        work.add(&[shard]); // the gradient shard
        if shard_lens.insert(shard) {
            work.add(&[2, shard]);
        }
        match s.optimizer() {
            OptimizerKind::Muon => {
                state.add(&[shard]);
                if world > 1 {
                    work.add(&[shape.len()]);
                }
                if muon_shapes.insert((shape.batch, shape.rows, shape.cols)) {
                    let m = shape.min_side();
                    work.add(&[2, shape.len()]);
                    work.add(&[2, shape.batch, m, m]);
                    work.add(&[shape.rows, shape.cols]);
                }
            }
            OptimizerKind::AdamW => state.add(&[2, shard]),
        }
    }
    (state.0, work.0)
}

/// The process's fixed cost: code and libraries, and per thread its stack, its malloc arena
/// and the GEMM kernels' packing buffers (muon-faer's bf16 products take 4.2 MiB a thread,
/// plus one more buffer). Measured on this crate's binary by `tests/memory.rs` (a 2-thread
/// `tiny` run at 2x16 tokens peaks at about 25 MiB in all), with room to spare.
pub fn runtime_bytes(threads: usize) -> u64 {
    const BASE: u64 = 36 << 20;
    const PER_THREAD: u64 = 12 << 20;
    BASE.saturating_add(PER_THREAD.saturating_mul(threads as u64))
}

/// The whole training run, for one process of `world` data-parallel ranks: the model at
/// `batch x seq` (the rank's own rows), the optimizer over `specs` (the optimizer's list: the
/// model's, or all AdamW), `data_bytes` of input (a file is read whole,
/// then held as `u16` tokens: three bytes per input byte at the peak), and a checkpoint of it
/// all on the host twice over (the copy, then its serialized bytes).
pub fn training(
    config: &ModelConfig,
    specs: &[ParamSpec],
    batch: usize,
    seq: usize,
    data_bytes: u64,
    threads: usize,
    world: usize,
) -> MemoryEstimate {
    const ELEM: u64 = 4; // f32
    let params = param_elements(specs);
    let (acts, indices) = activation_elements(config, batch, seq);
    let (state, work) = optimizer_elements(specs, world);
    let buffers = (config.moe_layers() * config.n_routed_experts) as u64;
    let snapshot = params.saturating_add(state).saturating_add(buffers);
    MemoryEstimate {
        parameters: params.saturating_mul(2 * ELEM),
        activations: acts
            .saturating_mul(ELEM)
            .saturating_add(indices.saturating_mul(4)),
        optimizer: state.saturating_add(work).saturating_mul(ELEM),
        data: data_bytes.saturating_mul(3),
        checkpoint: snapshot.saturating_mul(2 * ELEM),
        runtime: runtime_bytes(threads),
    }
}

/// Bytes the OS can still give this process (`MemAvailable` of `/proc/meminfo`, Linux);
/// `None` where that is unknown.
pub fn available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The most resident memory this process has used so far (`VmHWM` of `/proc/self/status`,
/// Linux); `None` where that is unknown.
pub fn peak_resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use muon_core::Portable;

    #[test]
    fn the_specs_are_the_models() {
        let mha = ModelConfig {
            attention: Attention::Mha,
            n_shared_experts: 0,
            ..ModelConfig::tiny()
        };
        for config in [ModelConfig::tiny(), mha] {
            let model = Model::new(&Portable::<f32>::new(), config.clone(), 1, 4, 1).unwrap();
            assert_eq!(param_specs(&config), model.param_specs());
        }
        // The counts agree with the configuration's own arithmetic too (for the real Moonlight,
        // which is not built here).
        let big = ModelConfig::moonlight_16b_a3b();
        assert_eq!(param_elements(&param_specs(&big)), big.param_counts().total);
    }

    #[test]
    fn absurd_sizes_saturate() {
        let e = training(
            &ModelConfig::tiny(),
            &param_specs(&ModelConfig::tiny()),
            usize::MAX,
            64,
            u64::MAX,
            2,
            1,
        );
        assert_eq!(e.total(), u64::MAX);
    }
}
