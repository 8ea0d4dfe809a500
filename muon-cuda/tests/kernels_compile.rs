//! Every kernel compiles to PTX, and the module to a CUBIN (what the backend loads), with NVRTC
//! for sm_80 (A100) and sm_90 (H100), on any machine:
//! no GPU and no CUDA toolkit needed, only the NVRTC library (the `nvidia-cuda-nvrtc-cu12`
//! wheel; `.ci/install-nvrtc.sh` installs it and `.ci/env.sh` puts it on LD_LIBRARY_PATH).
//!
//! Without NVRTC the tests skip, saying so; under CI (`CI=true`) a missing NVRTC fails them,
//! so CI cannot pass without compiling the kernels.
#![cfg(feature = "cuda")]

use std::io::Write;

use muon_cuda::kernels::{self, KERNELS};

const ARCHES: [&str; 2] = ["sm_80", "sm_90"];

/// `true` when NVRTC can be loaded; otherwise prints why the test skips, or panics under CI.
fn nvrtc_or_skip(test: &str) -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "CI=true but {test} cannot run: {}", muon_cuda::NO_NVRTC);
    // Straight to the stderr handle: libtest captures eprintln! and hides it for passing tests.
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {}", muon_cuda::NO_NVRTC);
    false
}

fn assert_entry(ptx: &str, name: &str, arch: &str) {
    assert!(
        ptx.contains(&format!(".entry {name}(")),
        "the {arch} PTX lacks the entry point {name}"
    );
    let target = format!(".target {arch}");
    assert!(ptx.contains(&target), "the PTX is not for {arch} (no `{target}`)");
}

#[test]
fn every_kernel_compiles_on_its_own_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_on_its_own_for_sm80_and_sm90") {
        return;
    }
    for arch in ARCHES {
        for (name, src) in KERNELS {
            let ptx = kernels::compile(&kernels::single_kernel_source(src), arch)
                .unwrap_or_else(|log| panic!("{name} for {arch}: {log}"));
            assert_entry(&ptx, name, arch);
        }
    }
}

#[test]
fn the_whole_module_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("the_whole_module_compiles_for_sm80_and_sm90") {
        return;
    }
    for arch in ARCHES {
        let ptx =
            kernels::compile(&kernels::module_source(), arch).unwrap_or_else(|log| panic!("{arch}: {log}"));
        for (name, _) in KERNELS {
            assert_entry(&ptx, name, arch);
        }
    }
}

/// The CUBIN path the backend loads: NVRTC runs the whole compiler down to SASS (ptxas
/// included), so this also catches what only the assembler rejects.
#[test]
fn the_whole_module_compiles_to_cubin_for_sm80_and_sm90() {
    if !nvrtc_or_skip("the_whole_module_compiles_to_cubin_for_sm80_and_sm90") {
        return;
    }
    for arch in ARCHES {
        let cubin = kernels::compile_cubin(&kernels::module_source(), arch)
            .unwrap_or_else(|log| panic!("{arch}: {log}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: a CUBIN is an ELF image");
        for (name, _) in KERNELS {
            let found = cubin.windows(name.len()).any(|w| w == name.as_bytes());
            assert!(found, "{arch}: the CUBIN lacks the kernel {name}");
        }
    }
    let err = kernels::compile_cubin("extern \"C\" __global__ void k() { nope(); }", "sm_90").unwrap_err();
    assert!(
        err.contains("nope"),
        "the NVRTC log should name the problem: {err}"
    );
}

#[test]
fn a_compile_error_surfaces_the_nvrtc_log() {
    if !nvrtc_or_skip("a_compile_error_surfaces_the_nvrtc_log") {
        return;
    }
    let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }";
    let err = kernels::compile(broken, "sm_80").unwrap_err();
    assert!(
        err.contains("undefined_name"),
        "the NVRTC log should name the problem: {err}"
    );
    assert!(
        err.contains("sm_80"),
        "the error should name the architecture: {err}"
    );
}
