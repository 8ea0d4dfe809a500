//! Whether each CUDA library can be loaded. cudarc panics on the first use of a library it
//! cannot load, so the crate asks these first.

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
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
