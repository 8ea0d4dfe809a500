//! Every `unsafe` block of the crate: library probes, kernel launches, raw cuBLAS calls.
//! (NCCL goes through cudarc's safe API, in `nccl.rs`.)
//!
//! Each function here is safe to call: it checks what its `unsafe` block relies on (buffer
//! lengths, index ranges, integer ranges) with assertions, so a caller's mistake panics
//! instead of touching memory out of bounds. The kernel argument lists must match the CUDA
//! signatures in [`crate::kernels`] exactly, in order and type; each launch says so next to
//! its `// SAFETY:` comment.
//!
//! All buffers passed here belong to the backend's single stream (the context's event tracking
//! is off, see [`disable_event_tracking`]), so work on them is ordered by the stream alone.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PushKernelArg,
};
use muon_core::Transpose;

use crate::kernels::REDUCE_THREADS;
use crate::layout::{ColumnMajorGemm, Operand};
use crate::Precision;

/// Whether the CUDA driver library (`libcuda.so`) can be loaded. cudarc panics on first use
/// of a library it cannot load, so the backend probes first.
pub(crate) fn driver_library_present() -> bool {
    // SAFETY: only tries to dlopen the library by name (cudarc's candidate list) and closes
    // it again; no symbol is called. Loading libcuda runs no user-visible initialization.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the cuBLAS library can be loaded.
pub(crate) fn cublas_library_present() -> bool {
    // SAFETY: as in `driver_library_present`: a dlopen probe by name, no symbol called.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded.
pub(crate) fn nvrtc_library_present() -> bool {
    // SAFETY: as in `driver_library_present`: a dlopen probe by name, no symbol called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the NCCL library can be loaded.
pub(crate) fn nccl_library_present() -> bool {
    // SAFETY: as in `driver_library_present`: a dlopen probe by name, no symbol called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Compiles `source` with NVRTC for the real architecture `arch` (`"sm_90"`) and returns the
/// CUBIN (device code the driver loads without JIT). Errors carry NVRTC's log.
///
/// cudarc's safe NVRTC API returns PTX only; PTX from a newer NVRTC needs a driver at least as
/// new to JIT it, whereas a CUBIN runs on any driver of the same CUDA major version (CUDA's
/// minor-version compatibility), so the backend loads CUBINs. Check
/// [`nvrtc_library_present`] first: cudarc panics when the library is missing.
pub(crate) fn nvrtc_cubin(source: &str, arch: &str, options: &[String]) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{c_char, CStr, CString};

    /// Destroys the program on every path out.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: `self.0` came from a successful `create_program` and is destroyed
            // exactly once, here; nothing uses it afterwards.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }

    let src = CString::new(source).map_err(|_| "kernel source contains a NUL byte".to_string())?;
    let name = CString::new("muon_kernels.cu").expect("no NUL in the name");
    let program = Program(
        result::create_program(&src, Some(&name))
            .map_err(|e| format!("NVRTC could not create a program: {e}"))?,
    );
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    opts.extend(options.iter().cloned());
    // SAFETY: `program.0` is a live program (dropped only at the end of this function); the
    // options are converted to NUL-terminated strings that outlive the call by cudarc.
    if let Err(e) = unsafe { result::compile_program(program.0, &opts) } {
        // SAFETY: the program is live; NVRTC writes a NUL-terminated log into a buffer of the
        // size it reported.
        let log = unsafe { result::get_program_log(program.0) }
            .ok()
            .map(|raw| {
                // SAFETY: NVRTC NUL-terminates the log it wrote into `raw`, which is alive here.
                unsafe { CStr::from_ptr(raw.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        return Err(format!(
            "NVRTC failed to compile the muon-cuda kernels for {arch} ({e:?}, options {opts:?}):\n{log}"
        ));
    }
    let mut size = 0usize;
    // SAFETY: the program compiled for a real architecture, so it has a CUBIN; `size` is a
    // valid place for its size.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(|e| format!("NVRTC has no CUBIN for {arch}: {e:?}"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the `size` bytes NVRTC reported and writes.
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(|e| format!("NVRTC could not return the CUBIN for {arch}: {e:?}"))?;
    Ok(cubin)
}

/// Turns off cudarc's per-buffer event tracking for buffers allocated on `ctx` from now on.
/// The backend uses one stream for everything, so the stream already orders every access;
/// tracking would add an event wait and record per kernel argument.
pub(crate) fn disable_event_tracking(ctx: &Arc<CudaContext>) {
    // SAFETY: cudarc requires that untracked buffers are not used on several streams without
    // manual synchronization. Every buffer of this backend is allocated on, and only used by,
    // the backend's one stream (`CudaBackend::stream`); `ctx` is the backend's own
    // `Arc<CudaContext>`, so no other code allocates through it.
    unsafe { ctx.disable_event_tracking() }
}

/// Threads per block of the elementwise kernels.
const ELEMENTWISE_THREADS: u32 = 256;
/// Upper bound on the grid of the elementwise kernels; their grid-stride loops cover the rest.
const MAX_ELEMENTWISE_BLOCKS: usize = 8192;

fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, MAX_ELEMENTWISE_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid of `blocks_per_item x batch` reduction blocks.
fn reduction_config(blocks_per_item: usize, batch: usize) -> LaunchConfig {
    assert!(
        (1..=u32::MAX as usize).contains(&blocks_per_item) && (1..=65535).contains(&batch),
        "reduction grid {blocks_per_item} x {batch} out of range"
    );
    LaunchConfig {
        grid_dim: (blocks_per_item as u32, batch as u32, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).expect("element count exceeds i64")
}

/// `dst = alpha * x + beta * dst` (kernel `muon_axpby`).
pub(crate) fn axpby(
    stream: &CudaStream,
    f: &CudaFunction,
    dst: &mut CudaSlice<f32>,
    alpha: f32,
    x: &CudaSlice<f32>,
    beta: f32,
) -> Result<(), DriverError> {
    assert_eq!(dst.len(), x.len(), "axpby: lengths differ");
    let n = count(dst.len());
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `muon_axpby(float* dst, const float* x, float alpha, float beta, long long n)`
    // gets exactly these five arguments in this order; `dst` and `x` hold `n` f32 each (checked
    // above) and the kernel touches indices < n only. `dst` is borrowed mutably, so it cannot
    // alias `x`.
    unsafe {
        stream
            .launch_builder(f)
            .arg(dst)
            .arg(x)
            .arg(&alpha)
            .arg(&beta)
            .arg(&n)
            .launch(elementwise_config(n as usize))
    }?;
    Ok(())
}

/// The fused momentum + Nesterov step (kernel `muon_momentum_nesterov`).
pub(crate) fn momentum_nesterov(
    stream: &CudaStream,
    f: &CudaFunction,
    momentum: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    mu: f32,
    nesterov: bool,
    out: &mut CudaSlice<f32>,
) -> Result<(), DriverError> {
    assert!(
        momentum.len() == grad.len() && out.len() == grad.len(),
        "momentum_nesterov: lengths differ"
    );
    let n = count(grad.len());
    if n == 0 {
        return Ok(());
    }
    let nesterov = i32::from(nesterov);
    // SAFETY: `muon_momentum_nesterov(float* momentum, const float* grad, float* out, float mu,
    // int nesterov, long long n)`: six arguments in this order and type. All three buffers hold
    // `n` f32 (checked above); `momentum` and `out` are distinct mutable borrows.
    unsafe {
        stream
            .launch_builder(f)
            .arg(momentum)
            .arg(grad)
            .arg(out)
            .arg(&mu)
            .arg(&nesterov)
            .arg(&n)
            .launch(elementwise_config(n as usize))
    }?;
    Ok(())
}

/// `p_e += a I` for each `m x m` matrix of the stack `p` (kernel `muon_add_diagonal`).
pub(crate) fn add_diagonal(
    stream: &CudaStream,
    f: &CudaFunction,
    p: &mut CudaSlice<f32>,
    m: usize,
    a: f32,
) -> Result<(), DriverError> {
    if m == 0 {
        return Ok(());
    }
    assert_eq!(
        p.len() % (m * m),
        0,
        "add_diagonal: not a stack of {m} x {m} matrices"
    );
    let batch = p.len() / (m * m);
    let (m, batch) = (count(m), count(batch));
    // SAFETY: `muon_add_diagonal(float* p, long long m, long long batch, float a)`: four
    // arguments in order and type. `p` holds `batch * m * m` f32 (checked above) and the kernel
    // writes index `e m^2 + j (m + 1) <= batch m^2 - 1` only, for `e < batch` and `j < m`.
    unsafe {
        stream
            .launch_builder(f)
            .arg(p)
            .arg(&m)
            .arg(&batch)
            .arg(&a)
            .launch(elementwise_config((m * batch) as usize))
    }?;
    Ok(())
}

/// `param = keep * param - step * update` (kernel `muon_apply_update`).
pub(crate) fn apply_update(
    stream: &CudaStream,
    f: &CudaFunction,
    param: &mut CudaSlice<f32>,
    update: &CudaSlice<f32>,
    step: f32,
    keep: f32,
) -> Result<(), DriverError> {
    assert_eq!(param.len(), update.len(), "apply_update: lengths differ");
    let n = count(param.len());
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `muon_apply_update(float* param, const float* update, float step, float keep,
    // long long n)`: five arguments in order; both buffers hold `n` f32 (checked above).
    unsafe {
        stream
            .launch_builder(f)
            .arg(param)
            .arg(update)
            .arg(&step)
            .arg(&keep)
            .arg(&n)
            .launch(elementwise_config(n as usize))
    }?;
    Ok(())
}

/// The AdamW moments and direction (kernel `muon_adamw_direction`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_direction(
    stream: &CudaStream,
    f: &CudaFunction,
    dir: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    c: &muon_core::AdamWCoefficients<f32>,
) -> Result<(), DriverError> {
    let n = grad.len();
    assert!(
        dir.len() == n && m.len() == n && v.len() == n,
        "adamw_direction: lengths differ"
    );
    let n = count(n);
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `muon_adamw_direction(float* dir, const float* grad, float* m, float* v,
    // float beta1, float beta2, float eps, float bias_correction1, float bias_correction2,
    // long long n)`: ten arguments in this order and type. The four buffers hold `n` f32
    // (checked above); the three mutable ones are distinct borrows.
    unsafe {
        stream
            .launch_builder(f)
            .arg(dir)
            .arg(grad)
            .arg(m)
            .arg(v)
            .arg(&c.beta1)
            .arg(&c.beta2)
            .arg(&c.eps)
            .arg(&c.bias_correction1)
            .arg(&c.bias_correction2)
            .arg(&n)
            .launch(elementwise_config(n as usize))
    }?;
    Ok(())
}

/// Per-block partial sums of squares of each of the `batch` items of `x`, `item_len`
/// elements each, into `partials[item * blocks_per_item + block]` (kernel
/// `muon_sumsq_partials`).
pub(crate) fn sumsq_partials(
    stream: &CudaStream,
    f: &CudaFunction,
    x: &CudaSlice<f32>,
    item_len: usize,
    batch: usize,
    blocks_per_item: usize,
    partials: &mut CudaSlice<f64>,
) -> Result<(), DriverError> {
    assert!(x.len() >= item_len * batch, "sumsq_partials: x too short");
    assert!(
        partials.len() >= blocks_per_item * batch,
        "sumsq_partials: scratch too short"
    );
    let cfg = reduction_config(blocks_per_item, batch);
    let item_len = count(item_len);
    // SAFETY: `muon_sumsq_partials(const float* x, long long item_len, double* partials)`: three
    // arguments in order. Block (bx, e) reads x[e * item_len .. (e + 1) * item_len] (inside `x`,
    // checked above) and writes partials[e * gridDim.x + bx] with gridDim.x = blocks_per_item,
    // inside `partials` (checked above). The block has REDUCE_THREADS (a multiple of 32) threads,
    // as `muon_block_sum` needs.
    unsafe {
        stream
            .launch_builder(f)
            .arg(x)
            .arg(&item_len)
            .arg(partials)
            .launch(cfg)
    }?;
    Ok(())
}

/// Adds `count` partials and writes the `f32` total into `out[index]` (kernel
/// `muon_sumsq_finish`).
pub(crate) fn sumsq_finish(
    stream: &CudaStream,
    f: &CudaFunction,
    partials: &CudaSlice<f64>,
    partial_count: usize,
    out: &mut CudaSlice<f32>,
    index: usize,
) -> Result<(), DriverError> {
    assert!(partials.len() >= partial_count, "sumsq_finish: scratch too short");
    assert!(
        index < out.len(),
        "sum_squares: slot {index} outside a vector of {}",
        out.len()
    );
    let partial_count = i32::try_from(partial_count).expect("partial count exceeds i32");
    let index = count(index);
    // SAFETY: `muon_sumsq_finish(const double* partials, int count, float* out, long long
    // index)`: four arguments in order. It reads partials[0..count] (inside, checked above) and
    // writes out[index] (index < out.len(), checked above). One block of REDUCE_THREADS threads.
    unsafe {
        stream
            .launch_builder(f)
            .arg(partials)
            .arg(&partial_count)
            .arg(out)
            .arg(&index)
            .launch(reduction_config(1, 1))
    }?;
    Ok(())
}

/// Turns each item's partials into `inv[item] = 1 / (norm_scale * sqrt(sum) + eps)` (kernel
/// `muon_norm_finish`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_finish(
    stream: &CudaStream,
    f: &CudaFunction,
    partials: &CudaSlice<f64>,
    blocks_per_item: usize,
    batch: usize,
    norm_scale: f32,
    eps: f32,
    inv: &mut CudaSlice<f32>,
) -> Result<(), DriverError> {
    assert!(
        partials.len() >= blocks_per_item * batch,
        "norm_finish: scratch too short"
    );
    assert!(inv.len() >= batch, "norm_finish: inverse-norm scratch too short");
    let blocks = i32::try_from(blocks_per_item).expect("blocks per item exceeds i32");
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(batch).expect("batch exceeds u32"), 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `muon_norm_finish(const double* partials, int blocks_per_item, float norm_scale,
    // float eps, float* inv)`: five arguments in order. Block e reads
    // partials[e * blocks_per_item .. (e + 1) * blocks_per_item] and writes inv[e], e < batch:
    // both inside their buffers (checked above).
    unsafe {
        stream
            .launch_builder(f)
            .arg(partials)
            .arg(&blocks)
            .arg(&norm_scale)
            .arg(&eps)
            .arg(inv)
            .launch(cfg)
    }?;
    Ok(())
}

/// Multiplies each item of `x` by its `inv[item]` (kernel `muon_scale_items`).
pub(crate) fn scale_items(
    stream: &CudaStream,
    f: &CudaFunction,
    x: &mut CudaSlice<f32>,
    item_len: usize,
    batch: usize,
    blocks_per_item: usize,
    inv: &CudaSlice<f32>,
) -> Result<(), DriverError> {
    assert!(x.len() >= item_len * batch, "scale_items: x too short");
    assert!(inv.len() >= batch, "scale_items: inverse-norm scratch too short");
    let cfg = reduction_config(blocks_per_item, batch);
    let item_len = count(item_len);
    // SAFETY: `muon_scale_items(float* x, long long item_len, const float* inv)`: three
    // arguments in order. Block (bx, e) touches x[e * item_len .. (e + 1) * item_len] and reads
    // inv[e], e < batch: both inside their buffers (checked above).
    unsafe {
        stream
            .launch_builder(f)
            .arg(x)
            .arg(&item_len)
            .arg(inv)
            .launch(cfg)
    }?;
    Ok(())
}

/// Rounds `x` to bf16 bits in `y[..x.len()]` (kernel `muon_cast_bf16`).
pub(crate) fn cast_bf16(
    stream: &CudaStream,
    f: &CudaFunction,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<u16>,
) -> Result<(), DriverError> {
    convert(stream, f, x, y, x.len())
}

/// Widens bf16 bits `x[..y.len()]` to `f32` in `y` (kernel `muon_widen_bf16`).
pub(crate) fn widen_bf16(
    stream: &CudaStream,
    f: &CudaFunction,
    x: &CudaSlice<u16>,
    y: &mut CudaSlice<f32>,
) -> Result<(), DriverError> {
    convert(stream, f, x, y, y.len())
}

/// Launches one of the two conversion kernels, `muon_cast_bf16(const float* x, unsigned
/// short* y, long long n)` or `muon_widen_bf16(const unsigned short* x, float* y, long long
/// n)`, over the first `n` elements; only `cast_bf16` and `widen_bf16` call it, each with its
/// kernel and the matching element types.
fn convert<A, B>(
    stream: &CudaStream,
    f: &CudaFunction,
    x: &CudaSlice<A>,
    y: &mut CudaSlice<B>,
    n: usize,
) -> Result<(), DriverError> {
    assert!(
        n <= x.len() && n <= y.len(),
        "bf16 conversion: {n} elements of buffers of {} and {}",
        x.len(),
        y.len()
    );
    let n = count(n);
    if n == 0 {
        return Ok(());
    }
    // SAFETY: the kernel is one of the two above (see the callers), three arguments in order,
    // `A` and `B` its element types: `f32` is `float`, `u16` has the size and alignment of
    // `unsigned short`. It reads x[0..n] and writes y[0..n], inside both (asserted above).
    unsafe {
        stream
            .launch_builder(f)
            .arg(x)
            .arg(y)
            .arg(&n)
            .launch(elementwise_config(n as usize))
    }?;
    Ok(())
}

/// The bytes of the first `len` bf16 values of `x`, for NCCL, which moves them without
/// arithmetic.
pub(crate) fn bf16_bytes(x: &CudaSlice<u16>, len: usize) -> CudaView<'_, u8> {
    assert!(
        len <= x.len(),
        "bf16_bytes: {len} values of a buffer of {}",
        x.len()
    );
    // SAFETY: every bit pattern is a valid `u8`; `u8`'s alignment (1) divides `u16`'s; the
    // view covers `2 * len` bytes, inside the allocation (checked above), and borrows `x`.
    unsafe { x.transmute::<u8>(2 * len) }.expect("checked to fit above")
}

/// The bytes of the first `len` bf16 values of `x`, writable; see [`bf16_bytes`].
pub(crate) fn bf16_bytes_mut(x: &mut CudaSlice<u16>, len: usize) -> CudaViewMut<'_, u8> {
    assert!(
        len <= x.len(),
        "bf16_bytes_mut: {len} values of a buffer of {}",
        x.len()
    );
    // SAFETY: as in `bf16_bytes`; any bytes written are valid `u16` bits, and the view
    // borrows `x` mutably.
    unsafe { x.transmute_mut::<u8>(2 * len) }.expect("checked to fit above")
}

/// A GEMM operand in device memory, in the element type its precision needs.
#[derive(Clone, Copy)]
pub(crate) enum GemmInput<'a> {
    /// `f32` elements (`Precision::F32` and `Precision::Tf32`).
    F32(&'a CudaSlice<f32>),
    /// bf16 bit patterns (`Precision::Bf16`).
    Bf16(&'a CudaSlice<u16>),
}

impl GemmInput<'_> {
    fn len(&self) -> usize {
        match self {
            GemmInput::F32(s) => s.len(),
            GemmInput::Bf16(s) => s.len(),
        }
    }

    fn data_type(&self) -> cudaDataType {
        match self {
            GemmInput::F32(_) => cudaDataType::CUDA_R_32F,
            GemmInput::Bf16(_) => cudaDataType::CUDA_R_16BF,
        }
    }
}

fn operation(t: Transpose) -> cublasOperation_t {
    match t {
        Transpose::No => cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
    }
}

fn int(v: usize, what: &str) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("gemm: {what} = {v} exceeds cuBLAS's 32-bit range"))
}

/// Runs the column-major cuBLAS call `g` (made by [`crate::layout::row_major_gemm`]) on the
/// row-major operands `a` and `b`, writing `c = alpha * op(a) op(b) + beta * c` per matrix.
///
/// `precision` picks the compute type; `a` and `b` must hold bf16 exactly when it is
/// [`Precision::Bf16`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    blas: &CudaBlas,
    stream: &CudaStream,
    g: &ColumnMajorGemm,
    precision: Precision,
    alpha: f32,
    a: GemmInput<'_>,
    b: GemmInput<'_>,
    beta: f32,
    c: &mut CudaSlice<f32>,
) -> Result<(), CublasError> {
    let bf16 = precision == Precision::Bf16;
    assert!(
        matches!(a, GemmInput::Bf16(_)) == bf16 && matches!(b, GemmInput::Bf16(_)) == bf16,
        "gemm: operand types do not match precision {precision}"
    );
    let pick = |op: Operand| match op {
        Operand::A => a,
        Operand::B => b,
    };
    let (first, second) = (pick(g.first), pick(g.second));
    // Strides equal the matrix sizes (dense stacks), so a stack needs batch * stride elements.
    assert!(
        first.len() >= g.batch * g.stride_a,
        "gemm: first operand too short"
    );
    assert!(
        second.len() >= g.batch * g.stride_b,
        "gemm: second operand too short"
    );
    assert!(c.len() >= g.batch * g.stride_c, "gemm: result too short");
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let compute = match precision {
        Precision::F32 | Precision::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        Precision::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
    };
    let (m, n, k) = (int(g.m, "m"), int(g.n, "n"), int(g.k, "k"));
    // cuBLAS requires leading dimensions >= 1 even for empty operands.
    let (lda, ldb, ldc) = (
        int(g.lda.max(1), "lda"),
        int(g.ldb.max(1), "ldb"),
        int(g.ldc.max(1), "ldc"),
    );
    let (type_a, type_b) = (first.data_type(), second.data_type());
    let (ptr_a, _read_a) = match first {
        GemmInput::F32(s) => s.device_ptr(stream),
        GemmInput::Bf16(s) => s.device_ptr(stream),
    };
    let (ptr_b, _read_b) = match second {
        GemmInput::F32(s) => s.device_ptr(stream),
        GemmInput::Bf16(s) => s.device_ptr(stream),
    };
    let (ptr_c, _write_c) = c.device_ptr_mut(stream);
    let (alpha, beta) = (
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
    );
    let (transa, transb) = (operation(g.transa), operation(g.transb));
    let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DFALT;
    if g.batch == 1 {
        // SAFETY: the handle is bound to `stream`, on which all three buffers live. With the
        // column-major sizes (m, n, k) and leading dimensions from `row_major_gemm`, cuBLAS
        // reads at most lda * cols(op a) elements of the first operand, ldb * cols(op b) of the
        // second and writes ldc * n of c: each is one matrix, inside the buffers (checked
        // above). The element types match `type_a`/`type_b` and C is f32 (CUDA_R_32F);
        // alpha and beta are host f32 pointers, valid for the call, as the default host
        // pointer mode and the 32F compute types expect. `c` is a distinct mutable borrow.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                transa,
                transb,
                m,
                n,
                k,
                alpha,
                ptr_a as *const c_void,
                type_a,
                lda,
                ptr_b as *const c_void,
                type_b,
                ldb,
                beta,
                ptr_c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ldc,
                compute,
                algo,
            )
        }
    } else {
        let batch = int(g.batch, "batch");
        let stride = |s: usize| i64::try_from(s).expect("stride exceeds i64");
        // SAFETY: as for the single GEMM above, per matrix of the stack; matrix e of each
        // operand starts at e * stride, and batch * stride elements are inside each buffer
        // (checked above).
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                transa,
                transb,
                m,
                n,
                k,
                alpha,
                ptr_a as *const c_void,
                type_a,
                lda,
                stride(g.stride_a),
                ptr_b as *const c_void,
                type_b,
                ldb,
                stride(g.stride_b),
                beta,
                ptr_c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ldc,
                stride(g.stride_c),
                batch,
                compute,
                algo,
            )
        }
    }
}
