//! NVRTC: CUDA C source to a CUBIN for one GPU architecture, the form the backend loads.
//!
//! A CUBIN is the GPU's own machine code, which the driver loads without a JIT, so by CUDA's
//! minor-version compatibility it runs on any CUDA 12 driver whatever NVRTC 12.x built it (PTX
//! from a newer NVRTC would need a driver at least as new). Every module is compiled with
//! `--std=c++14` for the real architecture of the GPU (`sm_90` on an H100).
//!
//! [`compile_cubin`] needs no GPU, only the NVRTC library: a crate with its own kernels can
//! check in CI that they compile, as this crate's `kernels_compile` test does.

use std::sync::{Arc, Mutex};

use muon_core::{Error, Result};

use crate::raw;

/// The NVRTC options besides `--gpu-architecture`.
const OPTIONS: [&str; 1] = ["--std=c++14"];

/// Whether the NVRTC library can be loaded (`libnvrtc.so.12`, or another name cudarc tries, on
/// the dynamic loader's path, e.g. `LD_LIBRARY_PATH`).
pub fn is_available() -> bool {
    raw::nvrtc_library_present()
}

/// Compiles the CUDA C module `module` (its name in NVRTC's log: `{module}.cu`) from `source`
/// to a CUBIN for the real architecture `arch` (`"sm_90"`).
///
/// # Errors
///
/// [`Error::Backend`] when NVRTC cannot be loaded ([`NO_NVRTC`](crate::NO_NVRTC)), or naming
/// the module and the architecture, with NVRTC's log, when the source does not compile.
pub fn compile_cubin(module: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    if !is_available() {
        return Err(Error::Backend(crate::NO_NVRTC.into()));
    }
    raw::cubin(module, source, arch, &OPTIONS).map_err(|why| {
        Error::Backend(format!(
            "NVRTC failed to compile the CUDA module `{module}` for {arch}: {why}"
        ))
    })
}

/// One compiled module: the source and architecture it was compiled from, and its CUBIN.
struct Compiled {
    arch: String,
    source: &'static str,
    cubin: Arc<[u8]>,
}

/// Every CUBIN compiled so far in this process.
static CUBINS: Mutex<Vec<Compiled>> = Mutex::new(Vec::new());

/// [`compile_cubin`] at most once per process for each source and architecture: the cache
/// every backend loads its modules through. The same source under another module name is a
/// hit (the name only labels NVRTC's log).
pub(crate) fn cached_cubin(module: &str, source: &'static str, arch: &str) -> Result<Arc<[u8]>> {
    // A panic while holding the lock leaves the list as it was (an entry is pushed whole, after
    // its compilation), so recovering the guard is sound.
    let mut cubins = CUBINS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let hit = cubins
        .iter()
        .find(|c| c.arch == arch && same_source(c.source, source));
    if let Some(c) = hit {
        return Ok(c.cubin.clone());
    }
    let cubin: Arc<[u8]> = compile_cubin(module, source, arch)?.into();
    cubins.push(Compiled {
        arch: arch.to_string(),
        source,
        cubin: cubin.clone(),
    });
    Ok(cubin)
}

/// Whether two sources are the same text; the same string, the usual case, without reading it.
pub(crate) fn same_source(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `true` when NVRTC can be loaded; otherwise prints why the test skips, or fails under CI.
    fn nvrtc_or_skip(test: &str) -> bool {
        if is_available() {
            return true;
        }
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true but {test} cannot run: {}", crate::NO_NVRTC);
        // Straight to the stderr handle: libtest captures eprintln! and hides it for passing tests.
        let _ = writeln!(std::io::stderr(), "{test}: skipped: {}", crate::NO_NVRTC);
        false
    }

    const FILL: &str = r#"
extern "C" __global__ void cache_test_fill(float* x, long long n, float v) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = v;
    }
}
"#;

    #[test]
    fn a_module_compiles_once_per_process_source_and_architecture() {
        if !nvrtc_or_skip("a_module_compiles_once_per_process_source_and_architecture") {
            return;
        }
        // A cache hit hands out the same allocation; a compilation makes a new one.
        let first = cached_cubin("cache_test", FILL, "sm_80").unwrap();
        assert_eq!(&first[..4], b"\x7fELF", "a CUBIN is an ELF image");
        let again = cached_cubin("cache_test", FILL, "sm_80").unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the second load compiled again");
        // The same text at another address, under another name: still the same module.
        let copy: &'static str = String::from(FILL).leak();
        let renamed = cached_cubin("cache_test_renamed", copy, "sm_80").unwrap();
        assert!(Arc::ptr_eq(&first, &renamed), "the same source compiled twice");
        // Another architecture is another CUBIN.
        let other = cached_cubin("cache_test", FILL, "sm_90").unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_ne!(first[..], other[..], "sm_80 and sm_90 code should differ");
    }

    #[test]
    fn a_broken_module_names_itself_and_carries_the_nvrtc_log() {
        if !nvrtc_or_skip("a_broken_module_names_itself_and_carries_the_nvrtc_log") {
            return;
        }
        const BROKEN: &str = "extern \"C\" __global__ void k(float* x) { x[0] = no_such_name; }";
        let err = cached_cubin("broken_test", BROKEN, "sm_90")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`broken_test`"),
            "the error should name the module: {err}"
        );
        assert!(
            err.contains("sm_90"),
            "the error should name the architecture: {err}"
        );
        assert!(
            err.contains("no_such_name"),
            "the NVRTC log should name the problem: {err}"
        );
        assert!(
            err.contains("broken_test.cu"),
            "NVRTC's log should name the file: {err}"
        );
        // A failure is not cached: asking again compiles again, and fails the same way.
        let again = cached_cubin("broken_test", BROKEN, "sm_90")
            .unwrap_err()
            .to_string();
        assert_eq!(err, again);
    }
}
