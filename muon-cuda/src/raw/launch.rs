//! [`CudaKernel`]: a function of a loaded module, launched on its backend's stream. Every
//! kernel launch of the crate, and of code built on it, goes through
//! [`CudaKernel::launch`].

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use muon_core::{Error, Result};

use crate::launch::{KernelArgs, LaunchConfig};

/// A kernel loaded on a [`CudaBackend`](crate::CudaBackend) by
/// [`get_or_load_func`](crate::CudaBackend::get_or_load_func), launched on that backend's
/// stream.
///
/// Cloning is cheap (reference counts); the module stays loaded while a clone lives.
#[derive(Clone, Debug)]
pub struct CudaKernel {
    function: CudaFunction,
    stream: Arc<CudaStream>,
    module: Arc<str>,
    name: Arc<str>,
}

impl CudaKernel {
    /// The kernel `name` of `module`, `function` in cudarc's terms, launched on `stream`.
    pub(crate) fn new(function: CudaFunction, stream: Arc<CudaStream>, module: Arc<str>, name: &str) -> Self {
        CudaKernel {
            function,
            stream,
            module,
            name: name.into(),
        }
    }

    /// The kernel's name: its `extern "C"` entry point.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the module it was loaded from.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// cudarc's handle of the kernel, for cudarc's own launch builder
    /// (`backend.stream().launch_builder(kernel.function())`), e.g. to pass a `#[repr(C)]`
    /// struct by value. Such a launch is `unsafe` on the same terms as
    /// [`launch`](Self::launch).
    pub fn function(&self) -> &CudaFunction {
        &self.function
    }

    /// Queues the kernel on the backend's stream, on the grid `config`, with `args` as its
    /// parameters, first to last: a tuple such as `(&mut out, &x, &n)` (see
    /// [`KernelArgs`](crate::KernelArgs)). It runs after the work queued before it and before
    /// what follows, like every call on the backend.
    ///
    /// # Safety
    ///
    /// The crate cannot see the kernel's signature or what it does, so the caller vouches
    /// that:
    /// - `args` matches the kernel's parameter list in number, order and type: a `T*`
    ///   parameter gets a buffer of `T` (`&mut` when the kernel writes through it), `float`
    ///   gets `&f32`, `int` `&i32`, `long long` `&i64`, and so on;
    /// - on the grid of `config`, the kernel reads and writes only inside the buffers it is
    ///   given, and an element one thread writes is not read or written by another thread
    ///   unless the kernel orders those accesses itself;
    /// - the buffers belong to this kernel's backend (its GPU) and are used on its stream
    ///   only, or synchronized with it by the caller: the backend does not track buffers
    ///   across streams ([`CudaBackend::stream`](crate::CudaBackend::stream)).
    ///
    /// # Errors
    ///
    /// When the driver refuses the launch (a grid or block beyond the device's limits, too
    /// much shared memory), naming the kernel. A fault of the running kernel surfaces as an
    /// error of a later call that waits for the stream.
    pub unsafe fn launch<'a>(&'a self, config: LaunchConfig, args: impl KernelArgs<'a>) -> Result<()> {
        let mut builder = self.stream.launch_builder(&self.function);
        args.push_all(&mut builder);
        // SAFETY: what cudarc's `launch` requires (the arguments match the kernel, and its
        // memory accesses are valid and race-free for the buffers passed) is this function's
        // own contract, which the caller upholds. The buffers are borrowed for `'a`, through
        // the launch; a buffer dropped later is freed on the stream it belongs to, which the
        // contract makes this stream, so after the kernel.
        unsafe { builder.launch(config) }.map(drop).map_err(|e| {
            Error::Backend(format!(
                "CUDA: launching kernel `{}` of module `{}` failed: {e}",
                self.name, self.module
            ))
        })
    }
}

/// Turns off cudarc's per-buffer event tracking for buffers allocated on `ctx` from now on.
/// The backend uses one stream for everything, so the stream already orders every access;
/// tracking would add an event wait and record per kernel argument.
pub(crate) fn disable_event_tracking(ctx: &Arc<CudaContext>) {
    // SAFETY: cudarc requires that untracked buffers are not used on several streams without
    // manual synchronization. Every buffer of this backend is allocated on, and only used by,
    // the backend's one stream (`CudaBackend::stream`), and so are the buffers of kernels
    // launched through `CudaKernel::launch`, whose contract says so; `ctx` is the backend's
    // own `Arc<CudaContext>`, so no other code allocates through it.
    unsafe { ctx.disable_event_tracking() }
}
