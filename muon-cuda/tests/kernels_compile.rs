//! The backend's kernels compile with NVRTC to what the backend loads, a CUBIN, for sm_80
//! (A100) and sm_90 (H100), on any machine: no GPU and no CUDA toolkit needed, only the NVRTC
//! library (the `nvidia-cuda-nvrtc-cu12` wheel; `.ci/install-nvrtc.sh` installs it and
//! `.ci/env.sh` puts it on LD_LIBRARY_PATH). NVRTC runs the whole compiler down to machine
//! code (ptxas included) for a CUBIN, so this also catches what only the assembler rejects.
//! Each CUBIN is read as the ELF image it is, and must define every kernel as a function with
//! code.
//!
//! Without NVRTC the tests skip, saying so; under CI (`CI=true`) a missing NVRTC fails them,
//! so CI cannot pass without compiling the kernels.
#![cfg(feature = "cuda")]

use std::io::Write;

use muon_cuda::kernels::{self, KERNELS};
use muon_cuda::nvrtc;

const ARCHES: [&str; 2] = ["sm_80", "sm_90"];

/// `true` when NVRTC can be loaded; otherwise prints why the test skips, or panics under CI.
fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc::is_available() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "CI=true but {test} cannot run: {}", muon_cuda::NO_NVRTC);
    // Straight to the stderr handle: libtest captures eprintln! and hides it for passing tests.
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {}", muon_cuda::NO_NVRTC);
    false
}

/// The kernels a CUBIN defines: the global function symbols (`STB_GLOBAL`, `STT_FUNC`) of
/// its ELF64 (little-endian) symbol table, with a section and code (NVRTC's own helpers are
/// weak symbols). Panics, failing the test, on anything that is not such an image for a CUDA
/// GPU.
fn kernels_defined(cubin: &[u8]) -> Vec<String> {
    const STT_FUNC: u8 = 2;
    const STB_GLOBAL: u8 = 1;
    let bytes = |at: usize, n: usize| -> &[u8] {
        cubin
            .get(at..at + n)
            .unwrap_or_else(|| panic!("CUBIN truncated at byte {at}"))
    };
    let u16_at = |at| u16::from_le_bytes(bytes(at, 2).try_into().unwrap()) as usize;
    let u32_at = |at| u32::from_le_bytes(bytes(at, 4).try_into().unwrap()) as usize;
    let u64_at = |at| u64::from_le_bytes(bytes(at, 8).try_into().unwrap()) as usize;
    assert_eq!(bytes(0, 4), b"\x7fELF", "a CUBIN is an ELF image");
    assert_eq!(bytes(4, 2), [2, 1], "ELF64, little-endian");
    const EM_CUDA: usize = 190;
    assert_eq!(u16_at(18), EM_CUDA, "e_machine is CUDA");
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    // Section header fields: sh_type at 4, sh_offset at 24, sh_size at 32, sh_link at 40.
    let section = |i: usize| shoff + i * shentsize;
    let symtab = (0..shnum)
        .map(section)
        .find(|&s| u32_at(s + 4) == 2)
        .expect("the CUBIN has a symbol table (SHT_SYMTAB)");
    let strtab = section(u32_at(symtab + 40));
    let (names, names_len) = (u64_at(strtab + 24), u64_at(strtab + 32));
    let name = |offset: usize| {
        let s = bytes(names + offset, names_len - offset);
        let end = s.iter().position(|&b| b == 0).expect("NUL-terminated name");
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    // Elf64_Sym: st_name at 0, st_info at 4, st_shndx at 6, st_size at 16; 24 bytes each.
    let (symbols, count) = (u64_at(symtab + 24), u64_at(symtab + 32) / 24);
    (0..count)
        .map(|i| symbols + 24 * i)
        .filter(|&sym| {
            let info = bytes(sym + 4, 1)[0];
            info & 0xf == STT_FUNC && info >> 4 == STB_GLOBAL && u16_at(sym + 6) != 0 && u64_at(sym + 16) > 0
        })
        .map(|sym| name(u32_at(sym)))
        .collect()
}

/// The backend's module, exactly as the backend compiles it, and each kernel on its own (so a
/// kernel never depends on another's source).
#[test]
fn the_module_and_every_kernel_compile_to_cubin_for_sm80_and_sm90() {
    if !nvrtc_or_skip("the_module_and_every_kernel_compile_to_cubin_for_sm80_and_sm90") {
        return;
    }
    for arch in ARCHES {
        let cubin = nvrtc::compile_cubin(kernels::MODULE, kernels::module_source(), arch)
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        let mut defined = kernels_defined(&cubin);
        defined.sort();
        let mut want: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        want.sort();
        assert_eq!(defined, want, "{arch}: the kernels of the module's CUBIN");
        for kernel in KERNELS {
            let source = kernels::single_kernel_source(kernel);
            let cubin = nvrtc::compile_cubin(kernel.name, &source, arch)
                .unwrap_or_else(|e| panic!("{} alone for {arch}: {e}", kernel.name));
            assert_eq!(
                kernels_defined(&cubin),
                [kernel.name],
                "{} alone for {arch}",
                kernel.name
            );
        }
    }
}

#[test]
fn a_compile_error_names_the_module_and_architecture_with_the_nvrtc_log() {
    if !nvrtc_or_skip("a_compile_error_names_the_module_and_architecture_with_the_nvrtc_log") {
        return;
    }
    let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }";
    let err = nvrtc::compile_cubin("my_module", broken, "sm_80")
        .unwrap_err()
        .to_string();
    for part in ["`my_module`", "sm_80", "my_module.cu", "undefined_name"] {
        assert!(err.contains(part), "the error should contain {part}: {err}");
    }
}
