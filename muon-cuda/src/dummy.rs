//! The backend's public types in a build without the `cuda` feature.
//!
//! They hold an uninhabited field, so no value of them can exist: every constructor returns
//! [`NOT_COMPILED`](crate::NOT_COMPILED) as an error, and the trait methods below are
//! statically unreachable (`match self.never {}`), not stubs. Code that names the backend
//! compiles the same with and without the feature (candle's dummy CUDA backend pattern).

use muon_core::{AdamWCoefficients, Backend, Collective, Error, Result, Shape, Transpose};

use crate::launch::{sealed, KernelArg, KernelArgs, LaunchConfig};
use crate::Precision;

/// No value: the type of a backend that was not compiled.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// Whether a CUDA GPU can be used: always `false` without the `cuda` feature.
pub fn is_available() -> bool {
    false
}

/// The CUDA backend; this build has no `cuda` feature, so [`CudaBackend::new`] fails.
#[derive(Debug)]
pub struct CudaBackend {
    never: Never,
}

/// A stack of `f32` matrices in device memory (none can exist in this build).
#[derive(Debug)]
pub struct CudaMatrix {
    never: Never,
}

impl CudaMatrix {
    /// The shape of the stack.
    pub fn shape(&self) -> Shape {
        match self.never {}
    }
}

// The trait has a method in the `cuda` build, where this module is compiled (and linted)
// too: there the method exists and, as no value of the type exists, is never called.

/// A matrix as a kernel argument (see the `cuda` build).
impl sealed::Sealed for &CudaMatrix {}
impl<'a> KernelArg<'a> for &'a CudaMatrix {
    #[cfg(feature = "cuda")]
    fn push(self, _: &mut cudarc::driver::LaunchArgs<'a>) {
        match self.never {}
    }
}

/// A matrix the kernel writes as a kernel argument (see the `cuda` build).
impl sealed::Sealed for &mut CudaMatrix {}
impl<'a> KernelArg<'a> for &'a mut CudaMatrix {
    #[cfg(feature = "cuda")]
    fn push(self, _: &mut cudarc::driver::LaunchArgs<'a>) {
        match self.never {}
    }
}

impl CudaBackend {
    /// Always an error in this build: muon-cuda was built without the `cuda` feature.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _ = ordinal;
        Err(Error::Backend(crate::NOT_COMPILED.into()))
    }

    /// The same backend with GEMMs in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        let _ = precision;
        match self.never {}
    }

    /// Sets the precision of the GEMMs that follow.
    pub fn set_precision(&mut self, precision: Precision) {
        let _ = precision;
        match self.never {}
    }

    /// The precision of the GEMMs.
    pub fn precision(&self) -> Precision {
        match self.never {}
    }

    /// The device's name and compute capability.
    pub fn device_name(&self) -> String {
        match self.never {}
    }

    /// Waits for all work queued on the backend's stream.
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }

    /// Bytes of device scratch the backend holds.
    pub fn scratch_bytes(&self) -> usize {
        match self.never {}
    }

    /// The kernel `function` of the CUDA C module `module` (see the `cuda` build).
    pub fn get_or_load_func(&self, module: &str, source: &'static str, function: &str) -> Result<CudaKernel> {
        let _ = (module, source, function);
        match self.never {}
    }
}

/// A kernel loaded on a backend (none can exist in this build).
#[derive(Clone, Debug)]
pub struct CudaKernel {
    never: Never,
}

impl CudaKernel {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        match self.never {}
    }

    /// The name of the module it was loaded from.
    pub fn module(&self) -> &str {
        match self.never {}
    }

    /// Launches the kernel (see the `cuda` build).
    ///
    /// # Safety
    ///
    /// As in the `cuda` build; no value of this type exists, so it is never called.
    // `unsafe` to keep the contract of the `cuda` build; there is no unsafe operation here.
    #[allow(unsafe_code)]
    pub unsafe fn launch<'a>(&'a self, config: LaunchConfig, args: impl KernelArgs<'a>) -> Result<()> {
        let _ = (config, args);
        match self.never {}
    }
}

/// NVRTC, which this build cannot use: see the `cuda` build.
pub mod nvrtc {
    use muon_core::{Error, Result};

    /// Always `false` without the `cuda` feature.
    pub fn is_available() -> bool {
        false
    }

    /// Always an error in this build: muon-cuda was built without the `cuda` feature.
    pub fn compile_cubin(module: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
        let _ = (module, source, arch);
        Err(Error::Backend(crate::NOT_COMPILED.into()))
    }
}

impl Backend for CudaBackend {
    type Elem = f32;
    type Matrix = CudaMatrix;

    fn shape(m: &CudaMatrix) -> Shape {
        match m.never {}
    }

    fn zeros(&self, _shape: Shape) -> Result<CudaMatrix> {
        match self.never {}
    }

    fn upload(&self, _dst: &mut CudaMatrix, _src: &[f32]) -> Result<()> {
        match self.never {}
    }

    fn download(&self, _src: &CudaMatrix, _dst: &mut [f32]) -> Result<()> {
        match self.never {}
    }

    fn gemm(
        &self,
        _dst: &mut CudaMatrix,
        _alpha: f32,
        _a: &CudaMatrix,
        _ta: Transpose,
        _b: &CudaMatrix,
        _tb: Transpose,
        _beta: f32,
    ) -> Result<()> {
        match self.never {}
    }

    fn axpby(&self, _dst: &mut CudaMatrix, _alpha: f32, _x: &CudaMatrix, _beta: f32) -> Result<()> {
        match self.never {}
    }

    fn frobenius_norm(&self, _x: &CudaMatrix, _out: &mut CudaMatrix, _index: usize) -> Result<()> {
        match self.never {}
    }

    fn normalize_frobenius(&self, _x: &mut CudaMatrix, _norm_scale: f32, _eps: f32) -> Result<()> {
        match self.never {}
    }

    fn adamw_direction(
        &self,
        _dir: &mut CudaMatrix,
        _grad: &CudaMatrix,
        _m: &mut CudaMatrix,
        _v: &mut CudaMatrix,
        _c: &AdamWCoefficients<f32>,
    ) -> Result<()> {
        match self.never {}
    }
}

/// The identity of an NCCL group (128 bytes); see the `cuda` build.
#[derive(Clone, Copy, Debug)]
pub struct NcclId([u8; 128]);

impl NcclId {
    /// The id's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> [u8; 128] {
        self.0
    }

    /// An id received from rank 0.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        NcclId(bytes)
    }
}

/// One rank of an NCCL group; this build has no `cuda` feature, so none can be made.
#[derive(Debug)]
pub struct NcclGroup {
    never: Never,
}

impl NcclGroup {
    /// Always an error in this build: muon-cuda was built without the `cuda` feature.
    pub fn unique_id() -> Result<NcclId> {
        Err(Error::Backend(crate::NOT_COMPILED.into()))
    }

    /// Always an error in this build: muon-cuda was built without the `cuda` feature.
    pub fn new(backend: &CudaBackend, rank: usize, world: usize, id: NcclId) -> Result<Self> {
        let _ = (rank, world, id);
        match backend.never {}
    }
}

impl Collective<CudaBackend> for NcclGroup {
    fn rank(&self) -> usize {
        match self.never {}
    }

    fn world_size(&self) -> usize {
        match self.never {}
    }

    fn reduce_scatter_mean(
        &self,
        _: &CudaBackend,
        _full: &CudaMatrix,
        _shard: &mut CudaMatrix,
    ) -> Result<()> {
        match self.never {}
    }

    fn all_gather(&self, _: &CudaBackend, _shard: &CudaMatrix, _full: &mut CudaMatrix) -> Result<()> {
        match self.never {}
    }

    fn copy_shard(&self, _: &CudaBackend, _full: &CudaMatrix, _shard: &mut CudaMatrix) -> Result<()> {
        match self.never {}
    }

    fn broadcast(&self, _: &CudaBackend, _root: usize, _full: &mut CudaMatrix) -> Result<()> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructing_the_backend_says_the_feature_is_missing() {
        let err = CudaBackend::new(0).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("built without the `cuda` feature"), "{msg}");
        assert!(!is_available());
        let err = NcclGroup::unique_id().unwrap_err();
        assert!(
            err.to_string().contains("built without the `cuda` feature"),
            "{err}"
        );
        let id = NcclId::from_bytes([7; 128]);
        assert_eq!(id.as_bytes(), [7; 128]);
        assert!(!nvrtc::is_available());
        let err = nvrtc::compile_cubin("m", "", "sm_90").unwrap_err();
        assert_eq!(
            err.to_string(),
            Error::Backend(crate::NOT_COMPILED.into()).to_string()
        );
    }
}
