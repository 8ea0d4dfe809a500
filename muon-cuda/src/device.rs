//! The CUDA backend: device matrices, the stream, cuBLAS and the NVRTC kernels.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;
use muon_core::{
    check_shape, newton_schulz_folded, AdamWCoefficients, Backend, Error, NewtonSchulz, NsWorkspace, Result,
    Shape, Transpose,
};

use crate::ffi::{self, GemmInput};
use crate::kernels::{self, REDUCE_THREADS};
use crate::layout::row_major_gemm;
use crate::Precision;

/// Most blocks one reduction gives a stack item; each thread then sums at least 4 elements
/// before the block sum, and the partials scratch holds `batch * MAX_REDUCE_BLOCKS` doubles.
const MAX_REDUCE_BLOCKS: usize = 1024;
/// Grid limit of `gridDim.y`, which indexes stack items in the reduction kernels.
const MAX_BATCH: usize = 65535;

/// Whether a CUDA GPU can be used: the driver library loads and reports at least one device.
/// Never panics, also on machines without any CUDA library.
pub fn is_available() -> bool {
    ffi::driver_library_present() && CudaContext::device_count().is_ok_and(|n| n > 0)
}

fn backend_error(what: &str, e: impl core::fmt::Display) -> Error {
    Error::Backend(format!("CUDA: {what} failed: {e}"))
}

/// A dense row-major stack of `f32` matrices in device memory, owned by one [`CudaBackend`]
/// and used on its stream.
#[derive(Debug)]
pub struct CudaMatrix {
    shape: Shape,
    data: CudaSlice<f32>,
}

impl CudaMatrix {
    /// The shape of the stack.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The device buffer (`shape().len()` elements, row-major), for interop with other cudarc
    /// code. It belongs to the backend's stream ([`CudaBackend::stream`]): work on another
    /// stream must synchronize with it first.
    pub fn as_cuda_slice(&self) -> &CudaSlice<f32> {
        &self.data
    }

    /// The device buffer, mutable; see [`as_cuda_slice`](Self::as_cuda_slice).
    pub fn as_cuda_slice_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.data
    }
}

/// The NVRTC kernels, loaded once per backend from a CUBIN compiled once per process.
struct Kernels {
    axpby: CudaFunction,
    momentum_nesterov: CudaFunction,
    apply_update: CudaFunction,
    adamw_direction: CudaFunction,
    sumsq_partials: CudaFunction,
    sumsq_finish: CudaFunction,
    norm_finish: CudaFunction,
    scale_items: CudaFunction,
    cast_bf16: CudaFunction,
    add_diagonal: CudaFunction,
    widen_bf16: CudaFunction,
}

/// Device scratch reused by every call: it grows to the largest size seen (warm-up), then a
/// step allocates nothing.
struct Scratch {
    /// Per-block partial sums of the reductions.
    partials: CudaSlice<f64>,
    /// Per-item `1 / (scale * norm + eps)` of the Frobenius normalization.
    inv: CudaSlice<f32>,
    /// bf16 copies of the GEMM operands (`Precision::Bf16`).
    bf16_a: CudaSlice<u16>,
    bf16_b: CudaSlice<u16>,
}

/// Grows `buf` to at least `len` elements (contents not kept).
pub(crate) fn ensure<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    len: usize,
) -> Result<()> {
    if buf.len() < len {
        *buf = stream
            .alloc_zeros(len)
            .map_err(|e| backend_error("growing scratch", e))?;
    }
    Ok(())
}

/// NVRTC compilations of the kernel module so far in this process (a test checks the cache).
static MODULE_COMPILATIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The CUBIN of the kernel module for `arch` (`"sm_90"`), compiled at most once per process.
fn module_cubin(arch: &str) -> Result<Vec<u8>> {
    /// `(architecture, CUBIN)` pairs compiled so far.
    type Compiled = Vec<(String, Vec<u8>)>;
    static CACHE: OnceLock<Mutex<Compiled>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut cache = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, cubin)) = cache.iter().find(|(a, _)| a == arch) {
        return Ok(cubin.clone());
    }
    let cubin = kernels::compile_cubin(&kernels::module_source(), arch).map_err(Error::Backend)?;
    MODULE_COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    cache.push((arch.to_string(), cubin.clone()));
    Ok(cubin)
}

/// The GPU backend: one CUDA context and stream, a cuBLAS handle bound to that stream, the
/// NVRTC kernels, and the reduction and bf16 scratch.
///
/// All work is queued on the one stream in call order; only [`Backend::download`] (and
/// [`synchronize`](Self::synchronize)) wait for it. Elements are `f32`; GEMMs run in the
/// backend's [`Precision`].
pub struct CudaBackend {
    precision: Precision,
    kernels: Kernels,
    scratch: Mutex<Scratch>,
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    name: String,
    capability: (i32, i32),
}

impl core::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("compute_capability", &self.capability)
            .field("precision", &self.precision)
            .finish()
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` (0 for the first), compiles the kernels with NVRTC for its
    /// architecture (once per process) and creates the stream and the cuBLAS handle. GEMMs
    /// start in [`Precision::F32`].
    ///
    /// Errors, never panics, when the CUDA driver, cuBLAS or NVRTC library cannot be loaded,
    /// when there is no such device, or when the kernels do not compile (with NVRTC's log).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !ffi::driver_library_present() {
            return Err(Error::Backend(
                "no CUDA driver library (libcuda.so) could be loaded: muon-cuda needs an NVIDIA GPU and driver"
                    .into(),
            ));
        }
        let devices = CudaContext::device_count().map_err(|e| backend_error("counting devices", e))?;
        if ordinal >= devices.max(0) as usize {
            return Err(Error::Backend(format!(
                "CUDA device {ordinal} requested, but the driver reports {devices} device(s)"
            )));
        }
        if !ffi::cublas_library_present() {
            return Err(Error::Backend(
                "the cuBLAS library (libcublas.so.12) could not be loaded: install the CUDA toolkit \
                 or `pip install nvidia-cublas-cu12` and add its lib directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| backend_error("creating the context", e))?;
        ffi::disable_event_tracking(&ctx);
        let capability = ctx
            .compute_capability()
            .map_err(|e| backend_error("reading the compute capability", e))?;
        let name = ctx
            .name()
            .map_err(|e| backend_error("reading the device name", e))?;
        let arch = format!("sm_{}{}", capability.0, capability.1);
        let cubin = module_cubin(&arch)?;
        let module = ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| backend_error(&format!("loading the {arch} kernels"), e))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| backend_error(&format!("loading kernel {name}"), e))
        };
        let kernels = Kernels {
            axpby: load("muon_axpby")?,
            momentum_nesterov: load("muon_momentum_nesterov")?,
            apply_update: load("muon_apply_update")?,
            adamw_direction: load("muon_adamw_direction")?,
            sumsq_partials: load("muon_sumsq_partials")?,
            sumsq_finish: load("muon_sumsq_finish")?,
            norm_finish: load("muon_norm_finish")?,
            scale_items: load("muon_scale_items")?,
            cast_bf16: load("muon_cast_bf16")?,
            add_diagonal: load("muon_add_diagonal")?,
            widen_bf16: load("muon_widen_bf16")?,
        };
        let stream = ctx
            .new_stream()
            .map_err(|e| backend_error("creating the stream", e))?;
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| backend_error("creating the cuBLAS handle", e))?;
        let alloc_err = |e| backend_error("allocating scratch", e);
        let scratch = Scratch {
            partials: stream.alloc_zeros(MAX_REDUCE_BLOCKS).map_err(alloc_err)?,
            inv: stream.alloc_zeros(64).map_err(alloc_err)?,
            bf16_a: stream.alloc_zeros(1).map_err(alloc_err)?,
            bf16_b: stream.alloc_zeros(1).map_err(alloc_err)?,
        };
        Ok(CudaBackend {
            precision: Precision::F32,
            kernels,
            scratch: Mutex::new(scratch),
            blas,
            stream,
            ctx,
            name,
            capability,
        })
    }

    /// The same backend with GEMMs in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Sets the precision of the GEMMs that follow.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The precision of the GEMMs.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device's name and compute capability, e.g. `"NVIDIA H100 80GB HBM3 (sm_90)"`.
    pub fn device_name(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.capability.0, self.capability.1)
    }

    /// `y[..x.len()] = bf16 bits of x` (round to nearest even), on the stream.
    pub(crate) fn cast_to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
        ffi::cast_bf16(&self.stream, &self.kernels.cast_bf16, x, y).map_err(|e| backend_error("bf16 cast", e))
    }

    /// `y = x[..y.len()]` widened from bf16 bits to `f32`, on the stream.
    pub(crate) fn widen_from_bf16(&self, x: &CudaSlice<u16>, y: &mut CudaSlice<f32>) -> Result<()> {
        ffi::widen_bf16(&self.stream, &self.kernels.widen_bf16, x, y)
            .map_err(|e| backend_error("bf16 widening", e))
    }

    /// The stream all of the backend's work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all work queued on the backend's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| backend_error("synchronizing", e))
    }

    /// Seconds per `n x n x n` cuBLAS GEMM in the backend's precision, averaged over
    /// `iterations` after two warm-up runs, on operands already in the precision's input type
    /// (no cast timed): the GEMM peak benchmarks compare Newton-Schulz against.
    pub fn time_gemm(&self, n: usize, iterations: usize) -> Result<f64> {
        let shape = Shape::matrix(n, n);
        let host: Vec<f32> = (0..shape.len())
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_error("binding the CUDA context", e))?;
        let mut a = self.zeros(shape)?;
        self.upload(&mut a, &host)?;
        let mut c = self.zeros(shape)?;
        let g = row_major_gemm(shape, shape, Transpose::No, shape, Transpose::No)?;
        let bf16 = if self.precision == Precision::Bf16 {
            let mut y: CudaSlice<u16> = self
                .stream
                .alloc_zeros(shape.len())
                .map_err(|e| backend_error("allocating", e))?;
            ffi::cast_bf16(&self.stream, &self.kernels.cast_bf16, &a.data, &mut y)
                .map_err(|e| backend_error("casting to bf16", e))?;
            Some(y)
        } else {
            None
        };
        let run = |c: &mut CudaMatrix| {
            let input = match &bf16 {
                Some(y) => GemmInput::Bf16(y),
                None => GemmInput::F32(&a.data),
            };
            ffi::gemm(
                &self.blas,
                &self.stream,
                &g,
                self.precision,
                1.0,
                input,
                input,
                0.0,
                &mut c.data,
            )
            .map_err(|e| backend_error("cuBLAS GEMM", e))
        };
        for _ in 0..2 {
            run(&mut c)?;
        }
        self.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..iterations.max(1) {
            run(&mut c)?;
        }
        self.synchronize()?;
        Ok(start.elapsed().as_secs_f64() / iterations.max(1) as f64)
    }

    /// Bytes of device scratch the backend holds (reduction partials, inverse norms, bf16
    /// operands). It grows to the largest sizes seen, then stays: after a warm-up step an
    /// optimizer step allocates nothing, which this lets a test check.
    pub fn scratch_bytes(&self) -> usize {
        let s = self.scratch();
        s.partials.num_bytes() + s.inv.num_bytes() + s.bf16_a.num_bytes() + s.bf16_b.num_bytes()
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        // A panic while holding the lock leaves only stale scratch contents, which every user
        // overwrites before reading: recovering the guard is sound.
        self.scratch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Blocks per stack item for a reduction over `item_len` elements.
fn reduce_blocks(item_len: usize) -> usize {
    item_len
        .div_ceil(REDUCE_THREADS as usize * 4)
        .clamp(1, MAX_REDUCE_BLOCKS)
}

impl Backend for CudaBackend {
    type Elem = f32;
    type Matrix = CudaMatrix;

    fn shape(m: &CudaMatrix) -> Shape {
        m.shape
    }

    fn zeros(&self, shape: Shape) -> Result<CudaMatrix> {
        let data = if shape.is_empty() {
            self.stream.null()
        } else {
            self.stream.alloc_zeros(shape.len())
        };
        let data = data.map_err(|e| backend_error(&format!("allocating a {shape} matrix"), e))?;
        Ok(CudaMatrix { shape, data })
    }

    fn upload(&self, dst: &mut CudaMatrix, src: &[f32]) -> Result<()> {
        if src.len() != dst.shape.len() {
            return Err(Error::Backend(format!(
                "upload of {} elements into a {} matrix",
                src.len(),
                dst.shape
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(src, &mut dst.data)
            .map_err(|e| backend_error("host-to-device copy", e))
    }

    fn download(&self, src: &CudaMatrix, dst: &mut [f32]) -> Result<()> {
        if dst.len() != src.shape.len() {
            return Err(Error::Backend(format!(
                "download of a {} matrix into {} elements",
                src.shape,
                dst.len()
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtoh(&src.data, dst)
            .map_err(|e| backend_error("device-to-host copy", e))?;
        self.synchronize()
    }

    fn gemm(
        &self,
        dst: &mut CudaMatrix,
        alpha: f32,
        a: &CudaMatrix,
        ta: Transpose,
        b: &CudaMatrix,
        tb: Transpose,
        beta: f32,
    ) -> Result<()> {
        let g = row_major_gemm(dst.shape, a.shape, ta, b.shape, tb)?;
        // cuBLAS runs in the calling thread's current context; kernel launches and copies bind
        // it themselves (cudarc), raw cuBLAS calls do not.
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_error("binding the CUDA context", e))?;
        let blas_err = |e| backend_error("cuBLAS GEMM", e);
        if self.precision != Precision::Bf16 {
            let (x, y) = (GemmInput::F32(&a.data), GemmInput::F32(&b.data));
            return ffi::gemm(
                &self.blas,
                &self.stream,
                &g,
                self.precision,
                alpha,
                x,
                y,
                beta,
                &mut dst.data,
            )
            .map_err(blas_err);
        }
        // bf16: round the operands into scratch (once when both are the same matrix, as in
        // the Gram products of Newton-Schulz); the product accumulates and lands in f32.
        let cast_err = |e| backend_error("casting to bf16", e);
        let mut scratch = self.scratch();
        let scratch = &mut *scratch;
        ensure(&self.stream, &mut scratch.bf16_a, a.data.len())?;
        ffi::cast_bf16(
            &self.stream,
            &self.kernels.cast_bf16,
            &a.data,
            &mut scratch.bf16_a,
        )
        .map_err(cast_err)?;
        let same = std::ptr::eq(a, b);
        if !same {
            ensure(&self.stream, &mut scratch.bf16_b, b.data.len())?;
            ffi::cast_bf16(
                &self.stream,
                &self.kernels.cast_bf16,
                &b.data,
                &mut scratch.bf16_b,
            )
            .map_err(cast_err)?;
        }
        let x = GemmInput::Bf16(&scratch.bf16_a);
        let y = if same { x } else { GemmInput::Bf16(&scratch.bf16_b) };
        ffi::gemm(
            &self.blas,
            &self.stream,
            &g,
            self.precision,
            alpha,
            x,
            y,
            beta,
            &mut dst.data,
        )
        .map_err(blas_err)
    }

    fn axpby(&self, dst: &mut CudaMatrix, alpha: f32, x: &CudaMatrix, beta: f32) -> Result<()> {
        check_shape("axpby source", dst.shape, x.shape)?;
        ffi::axpby(
            &self.stream,
            &self.kernels.axpby,
            &mut dst.data,
            alpha,
            &x.data,
            beta,
        )
        .map_err(|e| backend_error("axpby kernel", e))
    }

    fn sum_squares(&self, x: &CudaMatrix, out: &mut CudaMatrix, index: usize) -> Result<()> {
        let err = |e| backend_error("sum-of-squares kernel", e);
        let len = x.shape.len();
        let blocks = reduce_blocks(len);
        let mut scratch = self.scratch();
        ensure(&self.stream, &mut scratch.partials, blocks)?;
        ffi::sumsq_partials(
            &self.stream,
            &self.kernels.sumsq_partials,
            &x.data,
            len,
            1,
            blocks,
            &mut scratch.partials,
        )
        .map_err(err)?;
        ffi::sumsq_finish(
            &self.stream,
            &self.kernels.sumsq_finish,
            &scratch.partials,
            blocks,
            &mut out.data,
            index,
        )
        .map_err(err)
    }

    fn normalize_frobenius(&self, x: &mut CudaMatrix, norm_scale: f32, eps: f32) -> Result<()> {
        let (batch, item_len) = (x.shape.batch, x.shape.batch_stride());
        if x.shape.is_empty() {
            return Ok(());
        }
        if batch > MAX_BATCH {
            return Err(Error::Backend(format!(
                "normalize_frobenius: a stack of {batch} matrices exceeds the {MAX_BATCH} the kernels support"
            )));
        }
        let err = |e| backend_error("Frobenius normalization kernel", e);
        let blocks = reduce_blocks(item_len);
        let mut scratch = self.scratch();
        let scratch = &mut *scratch;
        ensure(&self.stream, &mut scratch.partials, blocks * batch)?;
        ensure(&self.stream, &mut scratch.inv, batch)?;
        let k = &self.kernels;
        ffi::sumsq_partials(
            &self.stream,
            &k.sumsq_partials,
            &x.data,
            item_len,
            batch,
            blocks,
            &mut scratch.partials,
        )
        .map_err(err)?;
        ffi::norm_finish(
            &self.stream,
            &k.norm_finish,
            &scratch.partials,
            blocks,
            batch,
            norm_scale,
            eps,
            &mut scratch.inv,
        )
        .map_err(err)?;
        ffi::scale_items(
            &self.stream,
            &k.scale_items,
            &mut x.data,
            item_len,
            batch,
            blocks,
            &scratch.inv,
        )
        .map_err(err)
    }

    fn adamw_direction(
        &self,
        dir: &mut CudaMatrix,
        grad: &CudaMatrix,
        m: &mut CudaMatrix,
        v: &mut CudaMatrix,
        c: &AdamWCoefficients<f32>,
    ) -> Result<()> {
        check_shape("adamw direction", grad.shape, dir.shape)?;
        check_shape("adamw first moment", grad.shape, m.shape)?;
        check_shape("adamw second moment", grad.shape, v.shape)?;
        let k = &self.kernels.adamw_direction;
        ffi::adamw_direction(
            &self.stream,
            k,
            &mut dir.data,
            &grad.data,
            &mut m.data,
            &mut v.data,
            c,
        )
        .map_err(|e| backend_error("AdamW kernel", e))
    }

    fn copy(&self, dst: &mut CudaMatrix, x: &CudaMatrix) -> Result<()> {
        check_shape("copy source", dst.shape, x.shape)?;
        if x.shape.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(&x.data, &mut dst.data)
            .map_err(|e| backend_error("device-to-device copy", e))
    }

    // `gram` and `symmetric_square` keep the trait's defaults: both are one `gemm` on the
    // same matrix twice, which goes to cuBLAS and, in bf16, casts that matrix once. cuBLAS's
    // `syrk` would halve the flops of the Gram product but has no strided-batched form and no
    // TF32/bf16-input variant, and would need a kernel to mirror the triangle.

    /// muon-core's routine with `a_k X` folded into the product, `X = (a_k I + P) X`: a kernel
    /// on the diagonal of the small `P` replaces a device copy of `X` per step, and the last
    /// GEMM of each step overwrites its destination (`beta = 0`).
    fn newton_schulz(&self, config: &NewtonSchulz, ws: &mut NsWorkspace<Self>) -> Result<()> {
        let m = ws.shape().min_side();
        newton_schulz_folded(self, config, ws, |p, a| {
            ffi::add_diagonal(&self.stream, &self.kernels.add_diagonal, &mut p.data, m, a)
                .map_err(|e| backend_error("add-diagonal kernel", e))
        })
    }

    fn momentum_nesterov(
        &self,
        momentum: &mut CudaMatrix,
        grad: &CudaMatrix,
        mu: f32,
        nesterov: bool,
        out: &mut CudaMatrix,
    ) -> Result<()> {
        check_shape("momentum", grad.shape, momentum.shape)?;
        check_shape("momentum output", grad.shape, out.shape)?;
        let k = &self.kernels.momentum_nesterov;
        ffi::momentum_nesterov(
            &self.stream,
            k,
            &mut momentum.data,
            &grad.data,
            mu,
            nesterov,
            &mut out.data,
        )
        .map_err(|e| backend_error("momentum kernel", e))
    }

    fn apply_update(&self, param: &mut CudaMatrix, update: &CudaMatrix, step: f32, decay: f32) -> Result<()> {
        check_shape("update", param.shape, update.shape)?;
        // `1 - decay` rounded in f32 on the host, as the trait's default computes it.
        let keep = 1.0f32 - decay;
        ffi::apply_update(
            &self.stream,
            &self.kernels.apply_update,
            &mut param.data,
            &update.data,
            step,
            keep,
        )
        .map_err(|e| backend_error("update kernel", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_kernel_module_is_compiled_once_per_process_and_architecture() {
        if !kernels::nvrtc_available() {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true but NVRTC is missing: {}", crate::NO_NVRTC);
            eprintln!(
                "the_kernel_module_is_compiled_once...: skipped: {}",
                crate::NO_NVRTC
            );
            return;
        }
        // sm_86 is used by no other test, so the counter moves only here.
        let before = MODULE_COMPILATIONS.load(Ordering::Relaxed);
        let first = module_cubin("sm_86").unwrap();
        let second = module_cubin("sm_86").unwrap();
        assert_eq!(first, second);
        assert_eq!(&first[..4], b"\x7fELF", "a CUBIN is an ELF image");
        assert_eq!(
            MODULE_COMPILATIONS.load(Ordering::Relaxed) - before,
            1,
            "compiled twice"
        );
    }

    #[test]
    fn reductions_use_enough_blocks_and_no_more_than_the_scratch_holds() {
        assert_eq!(reduce_blocks(0), 1);
        assert_eq!(reduce_blocks(1), 1);
        assert_eq!(reduce_blocks(REDUCE_THREADS as usize * 4 + 1), 2);
        assert_eq!(reduce_blocks(usize::MAX / 2), MAX_REDUCE_BLOCKS);
    }

    #[test]
    fn without_a_driver_is_available_is_false_and_new_errors() {
        if ffi::driver_library_present() {
            return; // covered by the GPU tests
        }
        assert!(!is_available());
        let err = CudaBackend::new(0).unwrap_err().to_string();
        assert!(err.contains("no CUDA driver library"), "{err}");
    }
}
