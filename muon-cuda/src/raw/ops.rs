//! The backend's own kernels ([`crate::kernels`]), launched: one safe function per kernel,
//! which checks that it was handed that kernel and everything the kernel's memory accesses
//! rely on, and returns an error instead of launching when a check fails.
//!
//! The argument list of each launch is the CUDA signature of its kernel, in order and type,
//! as the `// SAFETY:` comment next to it spells out.

use cudarc::driver::CudaSlice;
use muon_core::{AdamWCoefficients, Error, Result};

use super::CudaKernel;
use crate::kernels::{self, KernelSource};
use crate::launch::{grid_stride, LaunchConfig};

/// Threads per block of the reduction kernels: whole warps, at most 1024, as
/// `muon_block_sum` needs.
pub(crate) const REDUCE_THREADS: u32 = 256;
const _: () = assert!(REDUCE_THREADS.is_multiple_of(32) && REDUCE_THREADS <= 1024);

/// Checks that `k` is `want` of the backend's module, whose signature the launch passes.
fn check_kernel(k: &CudaKernel, want: KernelSource) -> Result<()> {
    if k.module() == kernels::MODULE && k.name() == want.name {
        return Ok(());
    }
    Err(Error::Backend(format!(
        "CUDA: the launch of {} was handed kernel `{}` of module `{}`",
        want.name,
        k.name(),
        k.module()
    )))
}

/// An error for a launch whose buffers do not fit it.
fn misfit(kernel: KernelSource, what: String) -> Error {
    Error::Backend(format!("CUDA: {}: {what}", kernel.name))
}

/// `n` as the `long long` the kernels take.
fn count(kernel: KernelSource, n: usize) -> Result<i64> {
    i64::try_from(n).map_err(|_| misfit(kernel, format!("{n} elements exceed a long long")))
}

/// A grid of `blocks_per_item x batch` reduction blocks.
fn reduction_config(kernel: KernelSource, blocks_per_item: usize, batch: usize) -> Result<LaunchConfig> {
    match (u32::try_from(blocks_per_item), u32::try_from(batch)) {
        (Ok(x @ 1..), Ok(y @ 1..=65535)) => Ok(LaunchConfig {
            grid_dim: (x, y, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }),
        _ => Err(misfit(
            kernel,
            format!("a reduction grid of {blocks_per_item} x {batch} blocks"),
        )),
    }
}

/// `dst = alpha * x + beta * dst` (kernel `muon_axpby`).
pub(crate) fn axpby(
    k: &CudaKernel,
    dst: &mut CudaSlice<f32>,
    alpha: f32,
    x: &CudaSlice<f32>,
    beta: f32,
) -> Result<()> {
    check_kernel(k, kernels::AXPBY)?;
    if dst.len() != x.len() {
        let what = format!("dst holds {} elements, x {}", dst.len(), x.len());
        return Err(misfit(kernels::AXPBY, what));
    }
    let len = dst.len();
    let n = count(kernels::AXPBY, len)?;
    // SAFETY: `muon_axpby(float* dst, const float* x, float alpha, float beta, long long n)`
    // gets exactly these five arguments in this order; `dst` and `x` hold `n` f32 each (checked
    // above) and the kernel touches indices < n only, each from one thread. `dst` is borrowed
    // mutably, so it cannot alias `x`.
    unsafe { k.launch(grid_stride(len), (dst, x, &alpha, &beta, &n)) }
}

/// The fused momentum + Nesterov step (kernel `muon_momentum_nesterov`).
pub(crate) fn momentum_nesterov(
    k: &CudaKernel,
    momentum: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    mu: f32,
    nesterov: bool,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    check_kernel(k, kernels::MOMENTUM_NESTEROV)?;
    let len = grad.len();
    if momentum.len() != len || out.len() != len {
        let what = format!(
            "momentum holds {} elements, grad {len}, out {}",
            momentum.len(),
            out.len()
        );
        return Err(misfit(kernels::MOMENTUM_NESTEROV, what));
    }
    let n = count(kernels::MOMENTUM_NESTEROV, len)?;
    let nesterov = i32::from(nesterov);
    // SAFETY: `muon_momentum_nesterov(float* momentum, const float* grad, float* out, float mu,
    // int nesterov, long long n)`: six arguments in this order and type. All three buffers hold
    // `n` f32 (checked above), each index touched by one thread; `momentum` and `out` are
    // distinct mutable borrows.
    unsafe { k.launch(grid_stride(len), (momentum, grad, out, &mu, &nesterov, &n)) }
}

/// `p_e += a I` for each `m x m` matrix of the stack `p` (kernel `muon_add_diagonal`).
pub(crate) fn add_diagonal(k: &CudaKernel, p: &mut CudaSlice<f32>, m: usize, a: f32) -> Result<()> {
    check_kernel(k, kernels::ADD_DIAGONAL)?;
    if m == 0 {
        return Ok(());
    }
    let item = m.checked_mul(m).filter(|&mm| p.len().is_multiple_of(mm));
    let Some(item) = item else {
        let what = format!("{} elements are not a stack of {m} x {m} matrices", p.len());
        return Err(misfit(kernels::ADD_DIAGONAL, what));
    };
    let batch = p.len() / item;
    let diagonal = m * batch;
    let (m, batch) = (
        count(kernels::ADD_DIAGONAL, m)?,
        count(kernels::ADD_DIAGONAL, batch)?,
    );
    // SAFETY: `muon_add_diagonal(float* p, long long m, long long batch, float a)`: four
    // arguments in order and type. `p` holds `batch * m * m` f32 (checked above) and the kernel
    // writes index `e m^2 + j (m + 1) <= batch m^2 - 1` only, for `e < batch` and `j < m`, each
    // from one thread.
    unsafe { k.launch(grid_stride(diagonal), (p, &m, &batch, &a)) }
}

/// `param = keep * param - step * update` (kernel `muon_apply_update`).
pub(crate) fn apply_update(
    k: &CudaKernel,
    param: &mut CudaSlice<f32>,
    update: &CudaSlice<f32>,
    step: f32,
    keep: f32,
) -> Result<()> {
    check_kernel(k, kernels::APPLY_UPDATE)?;
    if param.len() != update.len() {
        let what = format!("param holds {} elements, update {}", param.len(), update.len());
        return Err(misfit(kernels::APPLY_UPDATE, what));
    }
    let len = param.len();
    let n = count(kernels::APPLY_UPDATE, len)?;
    // SAFETY: `muon_apply_update(float* param, const float* update, float step, float keep,
    // long long n)`: five arguments in order; both buffers hold `n` f32 (checked above), each
    // index touched by one thread; `param` is a mutable borrow, distinct from `update`.
    unsafe { k.launch(grid_stride(len), (param, update, &step, &keep, &n)) }
}

/// The AdamW moments and direction (kernel `muon_adamw_direction`).
pub(crate) fn adamw_direction(
    k: &CudaKernel,
    dir: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    c: &AdamWCoefficients<f32>,
) -> Result<()> {
    check_kernel(k, kernels::ADAMW_DIRECTION)?;
    let len = grad.len();
    if dir.len() != len || m.len() != len || v.len() != len {
        let what = format!(
            "dir holds {} elements, grad {len}, m {}, v {}",
            dir.len(),
            m.len(),
            v.len()
        );
        return Err(misfit(kernels::ADAMW_DIRECTION, what));
    }
    let n = count(kernels::ADAMW_DIRECTION, len)?;
    // SAFETY: `muon_adamw_direction(float* dir, const float* grad, float* m, float* v,
    // float beta1, float beta2, float eps, float bias_correction1, float bias_correction2,
    // long long n)`: ten arguments in this order and type. The four buffers hold `n` f32
    // (checked above), each index touched by one thread; the three mutable ones are distinct
    // borrows.
    unsafe {
        k.launch(
            grid_stride(len),
            (
                dir,
                grad,
                m,
                v,
                &c.beta1,
                &c.beta2,
                &c.eps,
                &c.bias_correction1,
                &c.bias_correction2,
                &n,
            ),
        )
    }
}

/// Per-block partial sums of squares of each of the `batch` items of `x`, `item_len`
/// elements each, into `partials[item * blocks_per_item + block]` (kernel
/// `muon_sumsq_partials`).
pub(crate) fn sumsq_partials(
    k: &CudaKernel,
    x: &CudaSlice<f32>,
    item_len: usize,
    batch: usize,
    blocks_per_item: usize,
    partials: &mut CudaSlice<f64>,
) -> Result<()> {
    let kernel = kernels::SUMSQ_PARTIALS;
    check_kernel(k, kernel)?;
    if item_len.checked_mul(batch).is_none_or(|n| x.len() < n) {
        let what = format!("{batch} items of {item_len} from {} elements", x.len());
        return Err(misfit(kernel, what));
    }
    if blocks_per_item
        .checked_mul(batch)
        .is_none_or(|n| partials.len() < n)
    {
        let what = format!(
            "{batch} x {blocks_per_item} partials in a scratch of {}",
            partials.len()
        );
        return Err(misfit(kernel, what));
    }
    let cfg = reduction_config(kernel, blocks_per_item, batch)?;
    let item_len = count(kernel, item_len)?;
    // SAFETY: `muon_sumsq_partials(const float* x, long long item_len, double* partials)`: three
    // arguments in order. Block (bx, e) reads x[e * item_len .. (e + 1) * item_len] (inside `x`,
    // checked above) and its thread 0 writes partials[e * gridDim.x + bx] with gridDim.x =
    // blocks_per_item, inside `partials` (checked above). The block has REDUCE_THREADS (whole
    // warps) threads, as `muon_block_sum` needs.
    unsafe { k.launch(cfg, (x, &item_len, partials)) }
}

/// Adds `partial_count` partials and writes the `f32` total into `out[index]` (kernel
/// `muon_sumsq_finish`).
pub(crate) fn sumsq_finish(
    k: &CudaKernel,
    partials: &CudaSlice<f64>,
    partial_count: usize,
    out: &mut CudaSlice<f32>,
    index: usize,
) -> Result<()> {
    let kernel = kernels::SUMSQ_FINISH;
    check_kernel(k, kernel)?;
    if partials.len() < partial_count {
        let what = format!("{partial_count} partials in a scratch of {}", partials.len());
        return Err(misfit(kernel, what));
    }
    if index >= out.len() {
        let what = format!("slot {index} of a {}-element output", out.len());
        return Err(misfit(kernel, what));
    }
    let partial_count = i32::try_from(partial_count)
        .map_err(|_| misfit(kernel, format!("{partial_count} partials exceed an int")))?;
    let index = count(kernel, index)?;
    // SAFETY: `muon_sumsq_finish(const double* partials, int count, float* out, long long
    // index)`: four arguments in order. It reads partials[0..count] (inside, checked above) and
    // thread 0 writes out[index] (index < out.len(), checked above). One block of
    // REDUCE_THREADS threads.
    unsafe {
        k.launch(
            reduction_config(kernel, 1, 1)?,
            (partials, &partial_count, out, &index),
        )
    }
}

/// Turns each item's partials into `inv[item] = 1 / (norm_scale * sqrt(sum) + eps)` (kernel
/// `muon_norm_finish`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_finish(
    k: &CudaKernel,
    partials: &CudaSlice<f64>,
    blocks_per_item: usize,
    batch: usize,
    norm_scale: f32,
    eps: f32,
    inv: &mut CudaSlice<f32>,
) -> Result<()> {
    let kernel = kernels::NORM_FINISH;
    check_kernel(k, kernel)?;
    if blocks_per_item
        .checked_mul(batch)
        .is_none_or(|n| partials.len() < n)
    {
        let what = format!(
            "{batch} x {blocks_per_item} partials in a scratch of {}",
            partials.len()
        );
        return Err(misfit(kernel, what));
    }
    if inv.len() < batch {
        let what = format!("{batch} inverse norms in a scratch of {}", inv.len());
        return Err(misfit(kernel, what));
    }
    let blocks = i32::try_from(blocks_per_item)
        .map_err(|_| misfit(kernel, format!("{blocks_per_item} blocks per item exceed an int")))?;
    // One block per item: the grid's x extent is the batch.
    let cfg = reduction_config(kernel, batch, 1)?;
    // SAFETY: `muon_norm_finish(const double* partials, int blocks_per_item, float norm_scale,
    // float eps, float* inv)`: five arguments in order. Block e < batch reads
    // partials[e * blocks_per_item .. (e + 1) * blocks_per_item] and its thread 0 writes
    // inv[e]: both inside their buffers (checked above).
    unsafe { k.launch(cfg, (partials, &blocks, &norm_scale, &eps, inv)) }
}

/// Multiplies each item of `x` by its `inv[item]` (kernel `muon_scale_items`).
pub(crate) fn scale_items(
    k: &CudaKernel,
    x: &mut CudaSlice<f32>,
    item_len: usize,
    batch: usize,
    blocks_per_item: usize,
    inv: &CudaSlice<f32>,
) -> Result<()> {
    let kernel = kernels::SCALE_ITEMS;
    check_kernel(k, kernel)?;
    if item_len.checked_mul(batch).is_none_or(|n| x.len() < n) {
        let what = format!("{batch} items of {item_len} in {} elements", x.len());
        return Err(misfit(kernel, what));
    }
    if inv.len() < batch {
        let what = format!("{batch} inverse norms in a scratch of {}", inv.len());
        return Err(misfit(kernel, what));
    }
    let cfg = reduction_config(kernel, blocks_per_item, batch)?;
    let item_len = count(kernel, item_len)?;
    // SAFETY: `muon_scale_items(float* x, long long item_len, const float* inv)`: three
    // arguments in order. Block (bx, e) touches x[e * item_len .. (e + 1) * item_len], each
    // element from one thread, and reads inv[e], e < batch: both inside their buffers (checked
    // above).
    unsafe { k.launch(cfg, (x, &item_len, inv)) }
}

/// Rounds `x` to bf16 bits in `y[..x.len()]` (kernel `muon_cast_bf16`).
pub(crate) fn cast_bf16(k: &CudaKernel, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
    let kernel = kernels::CAST_BF16;
    check_kernel(k, kernel)?;
    let len = x.len();
    if y.len() < len {
        return Err(misfit(kernel, format!("{len} values into {} bf16", y.len())));
    }
    let n = count(kernel, len)?;
    // SAFETY: `muon_cast_bf16(const float* x, unsigned short* y, long long n)`: three arguments
    // in order; `u16` has the size and alignment of `unsigned short`. It reads x[0..n] and
    // writes y[0..n], inside both (checked above), each index from one thread; `y` is a
    // mutable borrow, distinct from `x`.
    unsafe { k.launch(grid_stride(len), (x, y, &n)) }
}

/// Widens bf16 bits `x[..y.len()]` to `f32` in `y` (kernel `muon_widen_bf16`).
pub(crate) fn widen_bf16(k: &CudaKernel, x: &CudaSlice<u16>, y: &mut CudaSlice<f32>) -> Result<()> {
    let kernel = kernels::WIDEN_BF16;
    check_kernel(k, kernel)?;
    let len = y.len();
    if x.len() < len {
        return Err(misfit(kernel, format!("{len} values from {} bf16", x.len())));
    }
    let n = count(kernel, len)?;
    // SAFETY: `muon_widen_bf16(const unsigned short* x, float* y, long long n)`: three
    // arguments in order, `u16` for `unsigned short`. It reads x[0..n] and writes y[0..n],
    // inside both (checked above), each index from one thread.
    unsafe { k.launch(grid_stride(len), (x, y, &n)) }
}
