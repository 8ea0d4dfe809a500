//! The CUDA modules one backend has loaded, by name: each compiled on first request (through
//! the process-wide CUBIN cache of [`crate::nvrtc`]), loaded into the backend's context once,
//! and its kernels handed out from then on without compiling, loading or allocating.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use muon_core::{Error, Result};

use crate::nvrtc::{cached_cubin, same_source};
use crate::raw::CudaKernel;

/// A backend's loaded modules (the backend's own kernels are the module
/// [`kernels::MODULE`](crate::kernels::MODULE), loaded like any other).
pub(crate) struct ModuleCache {
    stream: Arc<CudaStream>,
    /// The `sm_XY` architecture of the backend's GPU.
    arch: String,
    modules: Mutex<HashMap<String, Loaded>>,
}

/// One loaded module and the kernels asked of it so far.
struct Loaded {
    source: &'static str,
    module: Arc<CudaModule>,
    name: Arc<str>,
    kernels: HashMap<String, CudaKernel>,
}

impl ModuleCache {
    /// An empty cache for the GPU of `stream`, whose architecture is `arch` (`"sm_90"`).
    pub(crate) fn new(stream: Arc<CudaStream>, arch: String) -> Self {
        ModuleCache {
            stream,
            arch,
            modules: Mutex::new(HashMap::new()),
        }
    }

    /// The kernel `function` of `module`, loading the module from `source` first if this is
    /// the first request for it. See `CudaBackend::get_or_load_func`.
    pub(crate) fn get_or_load(
        &self,
        module: &str,
        source: &'static str,
        function: &str,
    ) -> Result<CudaKernel> {
        // A panic while holding the lock leaves the map as it was (entries are inserted whole),
        // so recovering the guard is sound.
        let mut modules = self
            .modules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let loaded = match modules.get_mut(module) {
            Some(loaded) => loaded,
            None => {
                let loaded = self.load(module, source)?;
                modules.entry(module.to_string()).or_insert(loaded)
            }
        };
        if !same_source(loaded.source, source) {
            return Err(Error::Backend(format!(
                "CUDA module `{module}` is already loaded from another source: give each module \
                 its own name"
            )));
        }
        if let Some(kernel) = loaded.kernels.get(function) {
            return Ok(kernel.clone());
        }
        if function.contains('\0') {
            return Err(Error::Backend(format!(
                "CUDA module `{module}`: the kernel name {function:?} contains a NUL byte"
            )));
        }
        let f = loaded.module.load_function(function).map_err(|e| {
            Error::Backend(format!(
                "CUDA module `{module}` has no kernel `{function}` (is it `extern \"C\"`?): {e}"
            ))
        })?;
        let kernel = CudaKernel::new(f, self.stream.clone(), loaded.name.clone(), function);
        loaded.kernels.insert(function.to_string(), kernel.clone());
        Ok(kernel)
    }

    /// Compiles (or finds in the process's cache) and loads `module`.
    fn load(&self, module: &str, source: &'static str) -> Result<Loaded> {
        let cubin = cached_cubin(module, source, &self.arch)?;
        let loaded = self
            .stream
            .context()
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| {
                Error::Backend(format!(
                    "CUDA: loading module `{module}` ({}) failed: {e}",
                    self.arch
                ))
            })?;
        Ok(Loaded {
            source,
            module: loaded,
            name: module.into(),
            kernels: HashMap::new(),
        })
    }
}
