//! The CUDA backend: device matrices, the stream, cuBLAS, and the modules of kernels loaded
//! by name (the backend's own and anyone's).

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, PushKernelArg, ValidAsZeroBits,
};
use muon_core::{
    check_shape, check_slot, newton_schulz_folded, AdamWCoefficients, Backend, Error, NewtonSchulz,
    NsWorkspace, Result, Shape, Transpose,
};

use crate::kernels::{self, KernelSource};
use crate::launch::{sealed, KernelArg};
use crate::layout::{row_major_gemm, ColumnMajorGemm};
use crate::modules::ModuleCache;
use crate::raw::ops::{self, REDUCE_THREADS};
use crate::raw::{self, CudaKernel, GemmInput};
use crate::{nvrtc, Precision};

/// Most blocks one reduction gives a stack item; each thread then sums at least 4 elements
/// before the block sum, and the partials scratch holds `batch * MAX_REDUCE_BLOCKS` doubles.
const MAX_REDUCE_BLOCKS: usize = 1024;
/// Grid limit of `gridDim.y`, which indexes stack items in the reduction kernels.
const MAX_BATCH: usize = 65535;

/// Whether a CUDA GPU can be used: the driver library loads and reports at least one device.
/// Never panics, also on machines without any CUDA library.
pub fn is_available() -> bool {
    raw::driver_library_present() && CudaContext::device_count().is_ok_and(|n| n > 0)
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

/// A matrix as a kernel argument: its device pointer, `float*`.
impl sealed::Sealed for &CudaMatrix {}
impl<'a> KernelArg<'a> for &'a CudaMatrix {
    fn push(self, builder: &mut LaunchArgs<'a>) {
        builder.arg(&self.data);
    }
}

/// A matrix the kernel writes as a kernel argument: its device pointer, `float*`.
impl sealed::Sealed for &mut CudaMatrix {}
impl<'a> KernelArg<'a> for &'a mut CudaMatrix {
    fn push(self, builder: &mut LaunchArgs<'a>) {
        builder.arg(&mut self.data);
    }
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

/// The GPU backend: one CUDA context and stream, a cuBLAS handle bound to that stream, the
/// modules of kernels it has loaded, and the reduction and bf16 scratch.
///
/// All work is queued on the one stream in call order; only [`Backend::download`] (and
/// [`synchronize`](Self::synchronize)) wait for it. Elements are `f32`; GEMMs run in the
/// backend's [`Precision`]. Kernels, the backend's own and yours, load by name on first use
/// ([`get_or_load_func`](Self::get_or_load_func)).
pub struct CudaBackend {
    precision: Precision,
    modules: ModuleCache,
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
    /// Opens GPU `ordinal` (0 for the first) and creates the stream and the cuBLAS handle.
    /// GEMMs start in [`Precision::F32`]. The kernels are compiled for the GPU's architecture
    /// when first used (once per process).
    ///
    /// Errors, never panics, when the CUDA driver, cuBLAS or NVRTC library cannot be loaded,
    /// or when there is no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !raw::driver_library_present() {
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
        if !raw::cublas_library_present() {
            return Err(Error::Backend(
                "the cuBLAS library (libcublas.so.12) could not be loaded: install the CUDA toolkit \
                 or `pip install nvidia-cublas-cu12` and add its lib directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        // Checked here, not at the first kernel: the common setup mistake fails early.
        if !nvrtc::is_available() {
            return Err(Error::Backend(crate::NO_NVRTC.into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| backend_error("creating the context", e))?;
        raw::disable_event_tracking(&ctx);
        let capability = ctx
            .compute_capability()
            .map_err(|e| backend_error("reading the compute capability", e))?;
        let name = ctx
            .name()
            .map_err(|e| backend_error("reading the device name", e))?;
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
        let arch = format!("sm_{}{}", capability.0, capability.1);
        Ok(CudaBackend {
            precision: Precision::F32,
            modules: ModuleCache::new(stream.clone(), arch),
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

    /// The kernel `function` of the CUDA C module `module`, which is compiled from `source`
    /// on the first request for `module` on this backend and then served from the backend's
    /// cache: this is how code outside the crate (a model's own kernels) runs on the backend,
    /// through the same compile cache and launch path as the backend's kernels.
    ///
    /// The first request for a module compiles `source` with NVRTC to a CUBIN for this GPU's
    /// architecture (at most once per process for each source and architecture, whichever
    /// backend asks) and loads it into the backend's context. Later requests, for any of its
    /// kernels, compile and load nothing: a look-up by name. Kernels must be `extern "C"`.
    /// The sources are `'static` (a `const`, or a string built once and leaked), so a request
    /// checks its source against the loaded one without copying it.
    ///
    /// Launch the kernel with [`CudaKernel::launch`] (`unsafe`: the argument list must match
    /// the kernel's signature); see the crate docs, "Your own kernels".
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the source does not compile (naming the module, with NVRTC's
    /// log), when `module` was loaded before from another source (or is the backend's own
    /// [`kernels::MODULE`]), or when the module has no kernel `function`.
    pub fn get_or_load_func(&self, module: &str, source: &'static str, function: &str) -> Result<CudaKernel> {
        if module == kernels::MODULE && !nvrtc::same_source(source, kernels::module_source()) {
            return Err(Error::Backend(format!(
                "the CUDA module name `{module}` is the backend's own: give your module another name"
            )));
        }
        self.modules.get_or_load(module, source, function)
    }

    /// One of the backend's own kernels.
    fn kernel(&self, k: KernelSource) -> Result<CudaKernel> {
        self.modules
            .get_or_load(kernels::MODULE, kernels::module_source(), k.name)
    }

    /// `y[..x.len()] = bf16 bits of x` (round to nearest even), on the stream.
    pub(crate) fn cast_to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
        ops::cast_bf16(&self.kernel(kernels::CAST_BF16)?, x, y)
    }

    /// `y = x[..y.len()]` widened from bf16 bits to `f32`, on the stream.
    pub(crate) fn widen_from_bf16(&self, x: &CudaSlice<u16>, y: &mut CudaSlice<f32>) -> Result<()> {
        ops::widen_bf16(&self.kernel(kernels::WIDEN_BF16)?, x, y)
    }

    /// The cuBLAS call `g` on operands already in the precision's input type (see
    /// [`raw::gemm`]), in the backend's precision, into `c`.
    pub(crate) fn cublas_gemm(
        &self,
        g: &ColumnMajorGemm,
        alpha: f32,
        (a, b): (GemmInput<'_>, GemmInput<'_>),
        beta: f32,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // cuBLAS runs in the calling thread's current context; kernel launches and copies bind
        // it themselves (cudarc), raw cuBLAS calls do not.
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_error("binding the CUDA context", e))?;
        raw::gemm(&self.blas, &self.stream, g, self.precision, alpha, a, b, beta, c)
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
        if self.precision != Precision::Bf16 {
            let operands = (GemmInput::F32(&a.data), GemmInput::F32(&b.data));
            return self.cublas_gemm(&g, alpha, operands, beta, &mut dst.data);
        }
        // bf16: round the operands into scratch (once when both are the same matrix, as in
        // the Gram products of Newton-Schulz); the product accumulates and lands in f32.
        let mut scratch = self.scratch();
        let scratch = &mut *scratch;
        ensure(&self.stream, &mut scratch.bf16_a, a.data.len())?;
        self.cast_to_bf16(&a.data, &mut scratch.bf16_a)?;
        let same = std::ptr::eq(a, b);
        if !same {
            ensure(&self.stream, &mut scratch.bf16_b, b.data.len())?;
            self.cast_to_bf16(&b.data, &mut scratch.bf16_b)?;
        }
        let x = GemmInput::Bf16(&scratch.bf16_a);
        let y = if same { x } else { GemmInput::Bf16(&scratch.bf16_b) };
        self.cublas_gemm(&g, alpha, (x, y), beta, &mut dst.data)
    }

    fn axpby(&self, dst: &mut CudaMatrix, alpha: f32, x: &CudaMatrix, beta: f32) -> Result<()> {
        check_shape("axpby source", dst.shape, x.shape)?;
        ops::axpby(&self.kernel(kernels::AXPBY)?, &mut dst.data, alpha, &x.data, beta)
    }

    fn frobenius_norm(&self, x: &CudaMatrix, out: &mut CudaMatrix, index: usize) -> Result<()> {
        check_slot("frobenius_norm", out.shape, index)?;
        let len = x.shape.len();
        let blocks = reduce_blocks(len);
        let mut scratch = self.scratch();
        ensure(&self.stream, &mut scratch.partials, blocks)?;
        let partials = self.kernel(kernels::SUMSQ_PARTIALS)?;
        ops::sumsq_partials(&partials, &x.data, len, 1, blocks, &mut scratch.partials)?;
        let finish = self.kernel(kernels::SUMSQ_FINISH)?;
        ops::sumsq_finish(&finish, &scratch.partials, blocks, &mut out.data, index)
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
        let blocks = reduce_blocks(item_len);
        let mut scratch = self.scratch();
        let scratch = &mut *scratch;
        ensure(&self.stream, &mut scratch.partials, blocks * batch)?;
        ensure(&self.stream, &mut scratch.inv, batch)?;
        let partials = self.kernel(kernels::SUMSQ_PARTIALS)?;
        ops::sumsq_partials(&partials, &x.data, item_len, batch, blocks, &mut scratch.partials)?;
        let finish = self.kernel(kernels::NORM_FINISH)?;
        ops::norm_finish(
            &finish,
            &scratch.partials,
            blocks,
            batch,
            norm_scale,
            eps,
            &mut scratch.inv,
        )?;
        let scale = self.kernel(kernels::SCALE_ITEMS)?;
        ops::scale_items(&scale, &mut x.data, item_len, batch, blocks, &scratch.inv)
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
        let k = self.kernel(kernels::ADAMW_DIRECTION)?;
        ops::adamw_direction(&k, &mut dir.data, &grad.data, &mut m.data, &mut v.data, c)
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
        let add_diagonal = self.kernel(kernels::ADD_DIAGONAL)?;
        newton_schulz_folded(self, config, ws, |p, a| {
            ops::add_diagonal(&add_diagonal, &mut p.data, m, a)
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
        let k = self.kernel(kernels::MOMENTUM_NESTEROV)?;
        ops::momentum_nesterov(&k, &mut momentum.data, &grad.data, mu, nesterov, &mut out.data)
    }

    fn apply_update(&self, param: &mut CudaMatrix, update: &CudaMatrix, step: f32, decay: f32) -> Result<()> {
        check_shape("update", param.shape, update.shape)?;
        // `1 - decay` rounded in f32 on the host, as the trait's default computes it.
        let keep = 1.0f32 - decay;
        let k = self.kernel(kernels::APPLY_UPDATE)?;
        ops::apply_update(&k, &mut param.data, &update.data, step, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_use_enough_blocks_and_no_more_than_the_scratch_holds() {
        assert_eq!(reduce_blocks(0), 1);
        assert_eq!(reduce_blocks(1), 1);
        assert_eq!(reduce_blocks(REDUCE_THREADS as usize * 4 + 1), 2);
        assert_eq!(reduce_blocks(usize::MAX / 2), MAX_REDUCE_BLOCKS);
    }

    #[test]
    fn without_a_driver_is_available_is_false_and_new_errors() {
        if raw::driver_library_present() {
            return; // covered by the GPU tests
        }
        assert!(!is_available());
        let err = CudaBackend::new(0).unwrap_err().to_string();
        assert!(err.contains("no CUDA driver library"), "{err}");
    }
}
