//! NVRTC's CUBIN output, which cudarc's safe NVRTC API (PTX only) does not offer.

use std::ffi::{c_char, CStr, CString};

use cudarc::nvrtc::{result, sys};

/// Compiles `source` with NVRTC, as the program `{name}.cu`, for the real architecture `arch`
/// (`"sm_90"`) with `options`, and returns the CUBIN (device code the driver loads without
/// JIT). An error carries NVRTC's log.
///
/// The caller checks that NVRTC can be loaded first: cudarc panics when it cannot.
pub(crate) fn cubin(name: &str, source: &str, arch: &str, options: &[&str]) -> Result<Vec<u8>, String> {
    /// Destroys the program on every path out.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: `self.0` came from a successful `create_program` and is destroyed
            // exactly once, here; nothing uses it afterwards.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }

    let src = CString::new(source).map_err(|_| "the source contains a NUL byte".to_string())?;
    let file = CString::new(format!("{name}.cu")).map_err(|_| "the name contains a NUL byte".to_string())?;
    let program = Program(
        result::create_program(&src, Some(&file))
            .map_err(|e| format!("NVRTC could not create a program: {e:?}"))?,
    );
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    opts.extend(options.iter().map(|o| o.to_string()));
    // SAFETY: `program.0` is a live program (dropped only at the end of this function); cudarc
    // converts the options to NUL-terminated strings that outlive the call.
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
        return Err(format!("{e:?}, options {opts:?}:\n{log}"));
    }
    let mut size = 0usize;
    // SAFETY: the program compiled for a real architecture, so it has a CUBIN; `size` is a
    // valid place for its size.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(|e| format!("NVRTC has no CUBIN ({e:?})"))?;
    let mut cubin = vec![0u8; size];
    let out: &mut [c_char] = bytemuck::cast_slice_mut(&mut cubin);
    // SAFETY: `out` is the `size` bytes NVRTC reported, which it fills, and nothing else.
    unsafe { sys::nvrtcGetCUBIN(program.0, out.as_mut_ptr()) }
        .result()
        .map_err(|e| format!("NVRTC could not return the CUBIN ({e:?})"))?;
    Ok(cubin)
}
