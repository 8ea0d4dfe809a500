//! The model's operations beyond muon-core's [`Backend`]: what a device must offer to run the
//! forward and backward passes of [`crate::model`].
//!
//! The model never reads an element: activations, parameters and gradients are opaque
//! `Self::Matrix` stacks, integer data (token ids, routing choices, expert offsets) opaque
//! `Self::Indices` buffers. Every matrix product goes through [`Backend::gemm`] (dense, batched,
//! transpose flags) or [`FfnOps::grouped_gemm`] / [`FfnOps::grouped_gemm_weight_grad`]
//! (the per-expert products on row ranges of one stack, which a GPU runs as a grouped GEMM).
//! The remaining ops are elementwise or row-wise and map one-to-one to small CUDA kernels.
//!
//! The ops come in families, one trait each, as the model's files use them: [`BaseOps`]
//! (index buffers, fill, memory, warm-up), [`TokenOps`] (embedding, RMSNorm, cross-entropy),
//! [`AttentionOps`] (column blocks, RoPE, causal softmax, the attention core) and [`FfnOps`] (SwiGLU and
//! the MoE layer). [`ModelOps`] is their union, implemented for every backend that has them
//! all; the model's code asks for `B: ModelOps`. A backend implements each family in its own
//! file (the host backends: `cpu/`). Code that calls an op on a concrete backend imports the
//! op's family trait.
//!
//! Conventions (row-major throughout, see [`muon_core::Shape`]):
//! - Dimension letters: `N = B*T` tokens (row `b*T + t`), `C` model width, `V` vocabulary,
//!   `H` heads, `E` routed experts, `K` experts per token, `R = N*K` routed rows.
//! - A vector (norm gain, rstd, selection bias) is a `1 x n` matrix.
//! - Attention's heads stay in the token rows their projections write: head `h` of sequence
//!   `b` is rows `b*T..(b+1)*T` and a block of columns ([`HeadCols`]) of a `[B*T, S]`
//!   matrix. Only its scores and probabilities are a stack, `[B*H, T, T]`, matrix `b*H + h`
//!   holding head `h` of sequence `b`.
//! - Ops named `*_backward` with an "accumulate" note add into their gradient outputs
//!   (`+=`); all others overwrite.
//! - Ops check their operands like muon-core's [`Backend`] methods: a wrong shape is an
//!   [`Error::ShapeMismatch`](muon_core::Error::ShapeMismatch) naming the operand, an index
//!   buffer of the wrong length an [`Error::CountMismatch`](muon_core::Error::CountMismatch);
//!   they never panic on a caller's mistake. The host backends also check every index they
//!   read (a token outside the vocabulary, an expert, a row) and write nothing when a check
//!   fails; a GPU cannot check index values without reading them back, so the model validates
//!   the token ids it is given itself.

use muon_core::{Backend, Precision, Result};

/// Index buffers, fills and what a backend says about itself: the base of every op family.
pub trait BaseOps: Backend {
    /// A buffer of `u32` on the backend (token ids, expert choices, offsets).
    type Indices;

    // ----- integer buffers -----

    /// A buffer of `len` zeros.
    fn indices_zeros(&self, len: usize) -> Result<Self::Indices>;
    /// Its length.
    fn indices_len(idx: &Self::Indices) -> usize;
    /// Copies `src` into `dst` (same length).
    fn indices_upload(&self, dst: &mut Self::Indices, src: &[u32]) -> Result<()>;
    /// Copies `src` into `dst` (same length); on a GPU this waits for the work writing `src`.
    fn indices_download(&self, src: &Self::Indices, dst: &mut [u32]) -> Result<()>;

    /// Bytes the backend can still allocate, if it knows (host: the OS's available memory;
    /// a GPU: free device memory). [`crate::model::Model::new`] refuses a model that cannot
    /// fit with a clear error instead of dying in the allocator.
    fn available_memory(&self) -> Option<u64> {
        None
    }

    /// This backend with its matrix products (dense layers, attention, the grouped expert
    /// GEMMs, and the optimizer's Newton-Schulz) in `precision`, sharing its threads and
    /// buffers; an error naming the precision if the backend has no such products.
    /// [`Precision::F32`] runs everywhere. Elementwise work, norms, softmax, the loss and every
    /// buffer stay in the element type.
    fn in_precision(&self, precision: Precision) -> Result<Self>
    where
        Self: Sized;

    /// The precision this backend's products run in.
    fn product_precision(&self) -> Precision;

    /// Prepares the backend for allocation-free steps: whatever it creates lazily on first use
    /// (the host: faer's per-thread workspaces on every thread of the current rayon pool) is
    /// created now, so that no training step allocates it. Call it once before the first step.
    fn warm_up(&self) -> Result<()> {
        Ok(())
    }

    // ----- elementwise -----

    /// Sets every element of `dst` to `value`.
    fn fill(&self, dst: &mut Self::Matrix, value: Self::Elem) -> Result<()>;
}

/// The ops on token rows at the ends of the network and around each sub-layer: the embedding
/// lookup, RMSNorm, and the softmax cross-entropy of the LM head.
pub trait TokenOps: BaseOps {
    // ----- embedding -----

    /// `out[n] = table[tokens[n]]`. out: `[N, C]`, table: `[V, C]`, tokens: `[N]`.
    fn embedding_forward(
        &self,
        out: &mut Self::Matrix,
        table: &Self::Matrix,
        tokens: &Self::Indices,
    ) -> Result<()>;
    /// Accumulates `dtable[tokens[n]] += dout[n]`. dtable: `[V, C]`, dout: `[N, C]`.
    fn embedding_backward(
        &self,
        dtable: &mut Self::Matrix,
        dout: &Self::Matrix,
        tokens: &Self::Indices,
    ) -> Result<()>;

    // ----- RMSNorm -----

    /// `rstd[n] = 1/sqrt(mean_c x[n,c]^2 + eps)`, `out[n,c] = x[n,c] * rstd[n] * gain[c]`.
    /// out, x: `[N, W]`, rstd: `[1, N]`, gain: `[1, W]`.
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Matrix,
        rstd: &mut Self::Matrix,
        x: &Self::Matrix,
        gain: &Self::Matrix,
        eps: f64,
    ) -> Result<()>;
    /// Accumulates the gradients of [`rmsnorm_forward`](Self::rmsnorm_forward) into `dx`
    /// `[N, W]` and `dgain` `[1, W]`, given `dout` `[N, W]` and the forward's `x`, `gain`,
    /// `rstd`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Matrix,
        dgain: &mut Self::Matrix,
        dout: &Self::Matrix,
        x: &Self::Matrix,
        gain: &Self::Matrix,
        rstd: &Self::Matrix,
    ) -> Result<()>;

    // ----- loss -----

    /// Softmax cross-entropy: `probs = softmax(logits)` per row and `loss[0] = mean_n
    /// -log probs[n, targets[n]]`. probs, logits: `[N, V]`, loss: `[1, 1]`.
    fn cross_entropy_forward(
        &self,
        probs: &mut Self::Matrix,
        loss: &mut Self::Matrix,
        logits: &Self::Matrix,
        targets: &Self::Indices,
    ) -> Result<()>;
    /// `dlogits = scale * (probs - onehot(targets))`, overwriting; `scale = dL/dloss / N` for a
    /// mean.
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Matrix,
        probs: &Self::Matrix,
        targets: &Self::Indices,
        scale: f64,
    ) -> Result<()>;
}

/// Where attention's heads lie in a token-rows matrix `[B*T, S]`: head `h` of sequence `b`
/// is rows `b*T..(b+1)*T`, columns `col + h*stride .. col + h*stride + width`. With
/// `stride == 0` every head reads the same block (MLA's shared RoPE key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadCols {
    /// Head 0's first column.
    pub col: usize,
    /// Columns from one head's block to the next.
    pub stride: usize,
    /// Columns per head.
    pub width: usize,
}

impl HeadCols {
    /// `width` columns from `col`, heads `stride` apart.
    pub const fn new(col: usize, stride: usize, width: usize) -> Self {
        HeadCols { col, stride, width }
    }

    /// Head `h`'s first column.
    pub const fn start(&self, h: usize) -> usize {
        self.col + h * self.stride
    }
}

/// The head layout of attention's core: `heads` heads, and where each operand's head lives
/// in its token-rows matrix. Gradients have their values' layout (dQ `q`'s, dK `k`'s, ...).
///
/// A head's keys are its own block `k` followed, when `k_shared` is given, by the block all
/// heads share (MLA: `k_nope` per head, then the one `k_rope`); their widths add up to `q`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayout {
    /// Heads per sequence, `H`.
    pub heads: usize,
    /// Queries, `Dqk` wide.
    pub q: HeadCols,
    /// Each head's own key columns.
    pub k: HeadCols,
    /// The key columns every head shares (stride 0), in a matrix of their own.
    pub k_shared: Option<HeadCols>,
    /// Values, `Dv` wide.
    pub v: HeadCols,
    /// The output (and its gradient), `Dv` wide.
    pub out: HeadCols,
}

/// Attention's inputs as token-rows matrices `[B*T, .]`, laid out as a [`HeadLayout`] says:
/// the forward's operands, which the backward reads again.
#[derive(Debug)]
pub struct Qkv<'a, M> {
    /// Queries, rotated.
    pub q: &'a M,
    /// Each head's own keys (rotated where RoPE applies to them).
    pub k: &'a M,
    /// The shared keys, when the layout has them.
    pub k_shared: Option<&'a M>,
    /// Values (may be `k`'s matrix: MLA's `kvb` holds both).
    pub v: &'a M,
}

// By hand: a derive would ask `M: Copy`, and these are references.
impl<M> Clone for Qkv<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for Qkv<'_, M> {}

/// Where [`AttentionOps::attention_core_backward`] writes the gradients of a [`Qkv`], at the
/// same columns: dQ, dK (own columns), the shared keys' gradient (the heads' sum), and dV,
/// in a matrix of its own or, when `None`, in dK's (MLA's `kvb` holds both).
#[derive(Debug)]
pub struct QkvGrads<'a, M> {
    /// dQ, in `q`'s layout.
    pub dq: &'a mut M,
    /// dK of each head's own key columns.
    pub dk: &'a mut M,
    /// dK of the shared columns, summed over the heads.
    pub dk_shared: Option<&'a mut M>,
    /// dV, or `None` to write it into `dk`'s matrix at `v`'s columns.
    pub dv: Option<&'a mut M>,
}

/// The ops of causal self-attention ([`crate::model::attention`]): column blocks, RoPE, the
/// causal softmax and the attention core, on heads that stay in their token rows.
pub trait AttentionOps: BaseOps {
    // ----- layout -----

    /// Copies (or with `accumulate` adds) the column block `src[:, src_col..src_col+width]`
    /// into `dst[:, dst_col..dst_col+width]`. dst: `[N, Wd]`, src: `[N, Ws]`.
    #[allow(clippy::too_many_arguments)]
    fn copy_columns(
        &self,
        dst: &mut Self::Matrix,
        dst_col: usize,
        src: &Self::Matrix,
        src_col: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()>;

    // ----- RoPE -----

    /// The rotation table for positions `0..T` and a rotary width `d` (even):
    /// `table[t][i] = cos(t * theta^(-2i/d))`, `table[t][d/2 + i] = sin(...)`, `i < d/2`.
    /// table: `[T, d]`.
    fn rope_table(&self, table: &mut Self::Matrix, theta: f64) -> Result<()>;
    /// Rotates, in place, the columns `cols` (`d` = the table's width) of each of `heads`
    /// heads in every row of the token-rows matrix `x` `[B*T, S]`, by the row's position
    /// `t = row % seq`, rotate-half convention: the pairs are `(c + i, c + d/2 + i)` from each
    /// head's first column `c`. `inverse` rotates by minus the angle, which is the backward
    /// pass (a rotation's transpose is its inverse).
    fn rope(
        &self,
        x: &mut Self::Matrix,
        seq: usize,
        heads: usize,
        cols: HeadCols,
        table: &Self::Matrix,
        inverse: bool,
    ) -> Result<()>;

    // ----- attention -----

    /// In place on `[M, T, T]` scores: row `i` becomes `softmax(s[i, 0..=i])`, zeros after
    /// `i` (causal).
    fn causal_softmax_forward(&self, scores: &mut Self::Matrix) -> Result<()>;
    /// In place: `grad` holds dL/dP on entry and dL/dS on exit,
    /// `dS[i,j] = P[i,j] * (dP[i,j] - sum_k P[i,k] dP[i,k])`. grad, probs: `[M, T, T]`.
    fn causal_softmax_backward(&self, grad: &mut Self::Matrix, probs: &Self::Matrix) -> Result<()>;

    /// Attention's core, head by head, on heads read and written in their token rows
    /// (`layout`), for `B` sequences of `T` positions:
    ///
    /// ```text
    /// K_h                = [k_h | k_shared]                         [T, Dqk]
    /// probs[b*H + h]     = causal_softmax(scale Q_h K_h^T)          [T, T]
    /// out_h              = probs[b*H + h] V_h                       [T, Dv]
    /// ```
    ///
    /// probs: `[B*H, T, T]`; keys: `[B, T, 2 Dqk]` scratch (a head's keys gathered when
    /// they come in two blocks). The same values as [`BaseOps`]'s `gemm` on each head's
    /// columns, then [`causal_softmax_forward`](Self::causal_softmax_forward), then `gemm`
    /// again, with each head's scores still in cache for the softmax and the second product.
    fn attention_core_forward(
        &self,
        probs: &mut Self::Matrix,
        keys: &mut Self::Matrix,
        out: &mut Self::Matrix,
        x: Qkv<'_, Self::Matrix>,
        layout: &HeadLayout,
        scale: Self::Elem,
    ) -> Result<()>;

    /// The backward of [`attention_core_forward`](Self::attention_core_forward), head by
    /// head, given `d_out` (in `out`'s layout) and the forward's `probs`:
    ///
    /// ```text
    /// dV_h       = probs[m]^T dout_h
    /// dS[m]      = causal_softmax_backward(dout_h V_h^T, probs[m])   (left in dprobs)
    /// dQ_h       = scale dS[m] K_h,   dK_h = scale dS[m]^T Q_h
    /// ```
    ///
    /// with `m = b*H + h`; dK_h's shared columns are summed over the heads. Every gradient
    /// block is overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_core_backward(
        &self,
        grads: QkvGrads<'_, Self::Matrix>,
        dprobs: &mut Self::Matrix,
        keys: &mut Self::Matrix,
        d_out: &Self::Matrix,
        probs: &Self::Matrix,
        x: Qkv<'_, Self::Matrix>,
        layout: &HeadLayout,
        scale: Self::Elem,
    ) -> Result<()>;
}

/// The ops of the feed-forward halves ([`crate::model::ffn`]): SwiGLU, and the MoE layer's
/// router, balance loss, dispatch to experts, grouped products and combination.
pub trait FfnOps: BaseOps {
    // ----- SwiGLU -----

    /// `out = silu(gate) * up`, elementwise on `[R, F]`.
    fn swiglu_forward(&self, out: &mut Self::Matrix, gate: &Self::Matrix, up: &Self::Matrix) -> Result<()>;
    /// Overwrites `dgate`, `dup` `[R, F]` with the gradients of
    /// [`swiglu_forward`](Self::swiglu_forward) given `dout`.
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Matrix,
        dup: &mut Self::Matrix,
        dout: &Self::Matrix,
        gate: &Self::Matrix,
        up: &Self::Matrix,
    ) -> Result<()>;

    // ----- MoE routing -----

    /// Sigmoid router with selection bias: `scores = sigmoid(logits)`; for each token the `K`
    /// experts with the largest `scores + bias` (ties to the lower index), in descending
    /// order, into `experts` `[N*K]`; `gates[n,k] = scaling * s_sel / sum(s_sel)`.
    /// scores, logits: `[N, E]`, bias: `[1, E]`, gates: `[N, K]`.
    #[allow(clippy::too_many_arguments)]
    fn router_forward(
        &self,
        scores: &mut Self::Matrix,
        gates: &mut Self::Matrix,
        experts: &mut Self::Indices,
        logits: &Self::Matrix,
        bias: &Self::Matrix,
        scaling: f64,
    ) -> Result<()>;
    /// Overwrites `dlogits` `[N, E]` with the gradient through the gates (the selection is
    /// not differentiated): zero for unselected experts.
    fn router_backward(
        &self,
        dlogits: &mut Self::Matrix,
        dgates: &Self::Matrix,
        scores: &Self::Matrix,
        experts: &Self::Indices,
        scaling: f64,
    ) -> Result<()>;

    /// DeepSeek-V3's sequence-wise balance loss for `N = B * seq` tokens in `B` sequences of
    /// `seq`, with the selection `experts` held fixed:
    ///
    /// ```text
    /// f[b, i] = E / (K seq) * (tokens of sequence b that chose expert i)      -> frac [B, E]
    /// P[b, i] = mean over the tokens t of b of s[t, i] / sum_j s[t, j]
    /// loss[0] = alpha * mean_b sum_i f[b, i] P[b, i]
    /// ```
    ///
    /// Overwrites `loss` `[1, 1]`, `frac` and `dlogits` `[N, E]` with d(loss)/d(logits), where
    /// `scores = sigmoid(logits)` `[N, E]`.
    #[allow(clippy::too_many_arguments)]
    fn router_seq_aux(
        &self,
        loss: &mut Self::Matrix,
        frac: &mut Self::Matrix,
        dlogits: &mut Self::Matrix,
        scores: &Self::Matrix,
        experts: &Self::Indices,
        seq: usize,
        alpha: f64,
    ) -> Result<()>;

    /// Groups the `R = N*K` (token, choice) slots by expert, stably in slot order:
    /// `counts[e]` tokens per expert, `offsets` `[E+1]` the exclusive prefix sum,
    /// `slot_row[n*K+k]` the grouped row of slot `(n, k)`, `row_token[r]` the token of
    /// grouped row `r`. experts: `[N*K]` with values `< E`, `top_k` = K.
    #[allow(clippy::too_many_arguments)]
    fn moe_dispatch(
        &self,
        counts: &mut Self::Indices,
        offsets: &mut Self::Indices,
        slot_row: &mut Self::Indices,
        row_token: &mut Self::Indices,
        experts: &Self::Indices,
        top_k: usize,
    ) -> Result<()>;
    /// `dst[r] = src[rows[r]]`. dst: `[R, C]`, src: `[N, C]`, rows: `[R]`.
    fn gather_rows(&self, dst: &mut Self::Matrix, src: &Self::Matrix, rows: &Self::Indices) -> Result<()>;
    /// The adjoint of a gather by `row_token` written per token: accumulates
    /// `dsrc[n] += sum_k dgrouped[slot_row[n*K+k]]`. dsrc: `[N, C]`, dgrouped: `[N*K, C]`.
    fn scatter_add_slots(
        &self,
        dsrc: &mut Self::Matrix,
        dgrouped: &Self::Matrix,
        slot_row: &Self::Indices,
    ) -> Result<()>;
    /// Accumulates the weighted expert outputs: `out[n] += sum_k gates[n,k] *
    /// grouped[slot_row[n*K+k]]`. out: `[N, C]`, grouped: `[N*K, C]`, gates: `[N, K]`.
    fn moe_combine(
        &self,
        out: &mut Self::Matrix,
        grouped: &Self::Matrix,
        gates: &Self::Matrix,
        slot_row: &Self::Indices,
    ) -> Result<()>;
    /// The gradients of [`moe_combine`](Self::moe_combine), overwriting:
    /// `dgrouped[slot_row[n*K+k]] = gates[n,k] * dout[n]`,
    /// `dgates[n,k] = dout[n] . grouped[slot_row[n*K+k]]`.
    fn moe_combine_backward(
        &self,
        dgrouped: &mut Self::Matrix,
        dgates: &mut Self::Matrix,
        dout: &Self::Matrix,
        grouped: &Self::Matrix,
        gates: &Self::Matrix,
        slot_row: &Self::Indices,
    ) -> Result<()>;

    /// Per-expert products on row ranges: for each expert `e`, the rows
    /// `offsets[e]..offsets[e+1]` of `dst` `[R, n]` become `alpha * a_rows op(w_e) + beta *
    /// dst_rows`, where `a` is `[R, k]` and `w` an `[E, *, *]` stack with `op(w_e)` of shape
    /// `k x n`. On a GPU: cuBLAS grouped GEMM, or one GEMM per expert on host-side offsets.
    #[allow(clippy::too_many_arguments)]
    fn grouped_gemm(
        &self,
        dst: &mut Self::Matrix,
        alpha: Self::Elem,
        a: &Self::Matrix,
        w: &Self::Matrix,
        transpose_w: muon_core::Transpose,
        offsets: &Self::Indices,
        beta: Self::Elem,
    ) -> Result<()>;
    /// The weight gradient of a grouped product: for each expert `e`,
    /// `dw_e = alpha * x_rows^T y_rows + beta * dw_e` over its row range, where `dw` is
    /// `[E, P, Q]`, `x` `[R, P]`, `y` `[R, Q]`. An expert with no rows gets `beta * dw_e`.
    #[allow(clippy::too_many_arguments)]
    fn grouped_gemm_weight_grad(
        &self,
        dw: &mut Self::Matrix,
        alpha: Self::Elem,
        x: &Self::Matrix,
        y: &Self::Matrix,
        offsets: &Self::Indices,
        beta: Self::Elem,
    ) -> Result<()>;
    /// Auxiliary-loss-free balancing: `bias[e] += rate * sign(mean(counts) - counts[e])`.
    fn router_bias_update(&self, bias: &mut Self::Matrix, counts: &Self::Indices, rate: f64) -> Result<()>;
}

/// Every operation the Moonlight-style model needs from a backend, beyond [`Backend`]: the
/// union of the op families, implemented for every backend that implements them all.
pub trait ModelOps: BaseOps + TokenOps + AttentionOps + FfnOps {}

impl<B: BaseOps + TokenOps + AttentionOps + FfnOps> ModelOps for B {}
