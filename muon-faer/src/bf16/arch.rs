//! The bf16 path's `unsafe` code, kept to what needs it: CPU feature detection (CPUID,
//! XGETBV, the Linux request for the AMX tile-data permission), the AVX512-BF16 register
//! kernel, the AMX tile instructions in `asm!`, and the target-feature entry points that
//! compile the safe drivers for the CPU they run on.
//!
//! Each fast path is reached only through a token ([`Avx512Bf16`], [`Amx`]) that [`support`]
//! makes after detecting everything it needs: holding one is the proof the instructions exist
//! and the OS has enabled their state, which is what every `SAFETY` comment below rests on.
//! Off x86-64 the tokens hold an uninhabited field and cannot exist.
//!
//! Instruction encodings (checked by disassembling the test binary, `objdump -d -M intel`,
//! against Intel SDM vol. 2): LDTILECFG `C4 E2 78 49 /0`, TILERELEASE `C4 E2 78 49 C0`,
//! TILEZERO `C4 E2 7B 49 11:rrr:000`, TILELOADD `C4 E2 7B 4B !(11):rrr:100` (SIB),
//! TILESTORED `C4 E2 7A 4B !(11):rrr:100`, TDPBF16PS `C4 E2 vvvv 5C 11:rrr:bbb` with
//! `tmm1 += tmm2 tmm3`, tmm3 in VEX.vvvv (`tdpbf16ps tmm0, tmm4, tmm6` is `C4 E2 4A 5C C4`).

use std::sync::OnceLock;

use faer::MatMut;

use super::driver::{self, APanel, RegisterKernel, Skip};
use super::pack::{KView, Packer};

/// Rows of the AVX512-BF16 kernel's tile: 6 x 4 accumulators, 4 B registers and a broadcast
/// use 29 of the 32 zmm registers, and a pair costs 6 broadcasts for 24 VDPBF16PS (measured on
/// Zen 4 against 14 x 2, 8 x 3 and 4 x 6: 6 x 4 was the fastest, 14 x 2 the slowest by ~20%).
pub(crate) const AVX512_MR: usize = 6;
/// zmm registers (16 f32 lanes) per row of the AVX512-BF16 kernel's tile.
const AVX512_NV: usize = 4;
/// Columns of the AVX512-BF16 kernel's tile.
pub(crate) const AVX512_NR: usize = 16 * AVX512_NV;

/// The AVX512-BF16 register kernel with an `MR x 16 NV` tile: 6 x 4 for most products, and
/// narrower tiles of the same 24 accumulators (12 x 2, 8 x 3) for products of at most 32 or
/// 48 columns, of which a 64-column tile would leave half (or a quarter) padding
/// (attention's `P V` and its gradients, 32 and 48 columns wide in moonlight-ref's `small`).
/// Every tile shape gives the same bits: each element of C sees the same VDPBF16PS lanes over
/// the same blocks of `k` in the same order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Tile<const MR: usize, const NV: usize>(Avx512Bf16);

#[cfg(target_arch = "x86_64")]
type Proof = ();
#[cfg(not(target_arch = "x86_64"))]
type Proof = core::convert::Infallible;

/// Proof that this CPU runs AVX512F, BW, VL and BF16 and the OS saves the ZMM state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Bf16 {
    _proof: Proof,
}

/// Proof that this CPU runs AMX-TILE and AMX-BF16 (and the AVX-512 the driver packs with), and
/// that the OS has granted this process the tile-data state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Amx {
    _proof: Proof,
}

/// What this machine runs, or why not (detected once per process).
pub(crate) struct Support {
    pub(crate) avx512: Result<Avx512Bf16, String>,
    pub(crate) amx: Result<Amx, String>,
}

/// Detection, on the first call (it asks Linux for the AMX permission then).
pub(crate) fn support() -> &'static Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let avx512 = detect_avx512();
        let amx = detect_amx(avx512.is_ok());
        Support { avx512, amx }
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512() -> Result<Avx512Bf16, String> {
    Err("not an x86-64 CPU: no AVX512-BF16".into())
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_amx(_: bool) -> Result<Amx, String> {
    Err("not an x86-64 CPU: no AMX-BF16".into())
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512() -> Result<Avx512Bf16, String> {
    // std checks CPUID (leaf 7 subleaf 1 EAX bit 5 for BF16) and that XCR0 enables the
    // opmask and ZMM state.
    let missing: Vec<&str> = [
        ("avx512f", is_x86_feature_detected!("avx512f")),
        ("avx512bw", is_x86_feature_detected!("avx512bw")),
        ("avx512vl", is_x86_feature_detected!("avx512vl")),
        ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
    ]
    .into_iter()
    .filter_map(|(name, present)| (!present).then_some(name))
    .collect();
    if missing.is_empty() {
        Ok(Avx512Bf16 { _proof: () })
    } else {
        Err(format!(
            "this CPU has no AVX512-BF16 (missing: {})",
            missing.join(", ")
        ))
    }
}

/// `arch_prctl` (syscall 158 on x86-64 Linux) codes and the tile-data state component.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const ARCH_GET_XCOMP_PERM: usize = 0x1022;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const XFEATURE_XTILEDATA: usize = 18;

#[cfg(target_arch = "x86_64")]
fn detect_amx(avx512: bool) -> Result<Amx, String> {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // `__cpuid` is a safe function from Rust 1.94 on and `unsafe` before: the allow keeps
    // both building.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU.
    let max_leaf = unsafe { __cpuid(0) }.eax;
    if max_leaf < 7 {
        return Err("this CPU has no AMX-BF16 (no CPUID leaf 7)".into());
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above; leaf 7 exists (checked).
    let edx = unsafe { __cpuid_count(7, 0) }.edx;
    let (tile, bf16) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1);
    if !(tile && bf16) {
        return Err(format!(
            "this CPU has no AMX-BF16 (CPUID.(EAX=7,ECX=0):EDX AMX-TILE bit 24 = {}, AMX-BF16 bit 22 = {})",
            tile as u8, bf16 as u8
        ));
    }
    if !avx512 {
        return Err("this CPU has AMX but not the AVX512-BF16 its driver packs and merges with".into());
    }
    request_tile_permission()?;
    if !is_x86_feature_detected!("xsave") {
        return Err("the OS has not enabled XSAVE, so not the AMX tile state".into());
    }
    // SAFETY: XGETBV needs XSAVE enabled by the OS (CPUID.1:ECX.OSXSAVE), detected just above.
    let xcr0 = unsafe { std::arch::x86_64::_xgetbv(0) };
    if xcr0 >> 17 & 3 != 3 {
        return Err(format!(
            "the OS has not enabled the AMX tile state (XCR0 = {xcr0:#x}: bits 17 XTILECFG and 18 XTILEDATA must be set)"
        ));
    }
    Ok(Amx { _proof: () })
}

/// Asks Linux for the tile-data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`),
/// then checks it was granted (`ARCH_GET_XCOMP_PERM`). Without it the first tile instruction
/// would kill the process with SIGILL.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> Result<(), String> {
    fn arch_prctl(code: usize, arg: usize) -> isize {
        let ret: isize;
        // SAFETY: the arch_prctl system call (158) reads its two arguments from rdi and rsi and
        // returns in rax; the kernel clobbers rcx and r11, declared. `arg` is a number or, for
        // ARCH_GET_XCOMP_PERM, the address of a live u64 the kernel writes.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") 158isize => ret,
                in("rdi") code,
                in("rsi") arg,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        ret
    }
    let ret = arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
    if ret != 0 {
        return Err(format!(
            "the OS did not grant the AMX tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM, \
             XFEATURE_XTILEDATA) returned {ret})"
        ));
    }
    let mut permitted = 0u64;
    let ret = arch_prctl(ARCH_GET_XCOMP_PERM, &mut permitted as *mut u64 as usize);
    if ret != 0 || permitted >> XFEATURE_XTILEDATA & 1 == 0 {
        return Err(format!(
            "the OS did not grant the AMX tile-data permission (ARCH_GET_XCOMP_PERM: {ret}, mask {permitted:#x})"
        ));
    }
    Ok(())
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> Result<(), String> {
    Err("AMX is used on Linux only (this backend asks for the tile state with Linux's arch_prctl)".into())
}

// ----- AVX512-BF16 -----

#[cfg(target_arch = "x86_64")]
impl<const MR: usize, const NV: usize> RegisterKernel for Avx512Tile<MR, NV> {
    const MR: usize = MR;
    const NR: usize = 16 * NV;

    #[inline(always)]
    fn packer(self) -> Packer {
        Packer::Avx512(self.0)
    }

    #[inline(always)]
    fn tile(self, pairs: usize, a: APanel<'_>, b: &[u32], c: MatMut<'_, f32>, alpha: f32, beta: f32) {
        let (rows, cols) = (c.nrows(), c.ncols());
        let last = (MR - 1) * a.row + pairs.saturating_sub(1) * a.pair;
        assert!(pairs == 0 || a.lanes.len() > last);
        assert!(b.len() >= pairs * 16 * NV);
        assert!(rows <= MR && cols <= 16 * NV && (cols <= 1 || c.col_stride() == 1));
        // SAFETY: the token in `self` proves the target features. The kernel reads the lanes
        // `i * row + p * pair` of `a` (`i < MR`, `p < pairs`: all below `last`) and
        // `pairs * 16 NV` of `b` (checked above) and reads and writes elements `(i, j)`,
        // `i < rows`, `j < cols`, of `c` at `ptr + i * row_stride + j` (unit column stride,
        // checked): exactly the elements the `MatMut` grants, through masked loads and stores
        // that touch no lane outside them.
        unsafe {
            avx512_tile::<MR, NV>(
                pairs,
                a.lanes.as_ptr(),
                (a.row, a.pair),
                b.as_ptr(),
                c.as_ptr_mut(),
                c.row_stride(),
                rows,
                cols,
                alpha,
                beta,
            )
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl<const MR: usize, const NV: usize> RegisterKernel for Avx512Tile<MR, NV> {
    const MR: usize = MR;
    const NR: usize = 16 * NV;
    fn packer(self) -> Packer {
        match self.0._proof {}
    }
    fn tile(self, _: usize, _: APanel<'_>, _: &[u32], _: MatMut<'_, f32>, _: f32, _: f32) {
        match self.0._proof {}
    }
}

/// The `MR x NR` tile: per pair, the B pair row in `NV` zmm, each A pair broadcast and
/// multiplied into its row's accumulators (VDPBF16PS); then `alpha acc +
/// beta c` with masked loads and stores for partial tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_tile<const MR: usize, const NV: usize>(
    pairs: usize,
    a: *const u32,
    (a_row, a_pair): (usize, usize),
    b: *const u32,
    c: *mut f32,
    ldc: isize,
    rows: usize,
    cols: usize,
    alpha: f32,
    beta: f32,
) {
    use std::arch::x86_64::*;
    // Ask for the tile of C now, while the loop over `k` runs: otherwise the merge below
    // waits on each of its lines (C's rows lie a whole row of C apart, in L3 or memory; on
    // Zen 5 the merge took a quarter of a 2048^3 product's time). With write intent, as the
    // merge stores to them.
    for i in 0..rows {
        for v in 0..NV {
            if 16 * v < cols {
                // SAFETY: row `i < rows`, column `16 v < cols`: inside the tile the caller
                // owns (a prefetch reads nothing and cannot fault, but the pointer stays in
                // bounds all the same).
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(c.offset(i as isize * ldc).add(16 * v).cast()) };
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..pairs {
        // SAFETY (this block and the loads below): the caller guarantees `pairs * 16 NV` lanes
        // at `b` and the lanes `i * a_row + p * a_pair` at `a`; `__m512i` and `__m512bh` are
        // both 64 plain bytes.
        let bp = unsafe { b.add(p * 16 * NV) };
        let bv: [__m512bh; NV] = std::array::from_fn(|v| unsafe {
            std::mem::transmute(_mm512_loadu_si512(bp.add(16 * v).cast()))
        });
        let ap = unsafe { a.add(p * a_pair) };
        for (i, row) in acc.iter_mut().enumerate() {
            let lane = unsafe { ap.add(i * a_row).read_unaligned() };
            let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(lane as i32)) };
            for (acc, &bv) in row.iter_mut().zip(&bv) {
                *acc = _mm512_dpbf16_ps(*acc, av, bv);
            }
        }
    }
    let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
    for (i, row) in acc.iter().enumerate() {
        if i >= rows {
            break;
        }
        for (v, &acc) in row.iter().enumerate() {
            let lanes = cols.saturating_sub(16 * v).min(16);
            if lanes == 0 {
                break;
            }
            let mask: __mmask16 = if lanes == 16 { 0xffff } else { (1 << lanes) - 1 };
            // SAFETY: row `i < rows` and the `lanes` columns from `16 v` are inside the tile
            // the caller owns; masked-off lanes are neither read nor written.
            unsafe {
                let ptr = c.offset(i as isize * ldc).add(16 * v);
                let out = if beta == 0.0 {
                    _mm512_mul_ps(va, acc)
                } else {
                    _mm512_fmadd_ps(va, acc, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(mask, ptr)))
                };
                _mm512_mask_storeu_ps(ptr, mask, out);
            }
        }
    }
}

/// [`driver::register_product`] compiled for AVX512-BF16 (so its packing and merging use
/// AVX-512 too).
#[allow(clippy::too_many_arguments)]
pub(crate) fn avx512_product(
    token: Avx512Bf16,
    a: &KView<'_>,
    b: &KView<'_>,
    c: MatMut<'_, f32>,
    alpha: f32,
    beta: f32,
    skip: Skip,
    buf: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        #[allow(clippy::too_many_arguments)]
        fn compiled(
            token: Avx512Bf16,
            a: &KView<'_>,
            b: &KView<'_>,
            c: MatMut<'_, f32>,
            alpha: f32,
            beta: f32,
            skip: Skip,
            buf: &mut [u32],
        ) {
            // The tile that pads C's columns least, the widest of those that tie (all three
            // hold 24 accumulators). A team's half of 192 columns, 96, ran half its last
            // 64-wide pass on padding: 25% of the work wasted.
            let n = b.rows();
            let padding = |nr: usize| n.div_ceil(nr) * nr - n;
            let (p64, p48, p32) = (padding(64), padding(48), padding(32));
            if p64 <= p48.min(p32) {
                let tile = Avx512Tile::<AVX512_MR, AVX512_NV>(token);
                driver::register_product(tile, a, b, c, alpha, beta, skip, buf)
            } else if p48 <= p32 {
                driver::register_product(Avx512Tile::<8, 3>(token), a, b, c, alpha, beta, skip, buf)
            } else {
                driver::register_product(Avx512Tile::<12, 2>(token), a, b, c, alpha, beta, skip, buf)
            }
        }
        // SAFETY: the token proves the CPU has the features `compiled` is built for.
        unsafe { compiled(token, a, b, c, alpha, beta, skip, buf) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, c, alpha, beta, skip, buf);
        match token._proof {}
    }
}

// ----- Packing: f32 -> bf16 pairs, 16 lanes at a time -----

/// Asks for the cache lines `data` lies in, to be read soon: a hint (PREFETCHT0 on x86-64,
/// nothing elsewhere) for reads the hardware's prefetchers do not foresee, such as rows a
/// stride apart.
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // One address per 64-byte line: every `per_line`-th element, and the last (its line
        // may hold no such element).
        let per_line = (64 / size_of::<T>().max(1)).max(1);
        let last = data.len().checked_sub(1);
        for at in (0..data.len()).step_by(per_line).chain(last) {
            // SAFETY: `at < data.len()`, so the address lies inside `data`; PREFETCHT0 (SSE,
            // in every x86-64) reads nothing into the program and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Each 32-bit lane of `x` (f32 bits) with its high half made the bf16 of `x` rounded to
/// nearest even, as [`bf16_bits`](super::pack::bf16_bits) computes it: `bits + 0x7fff + ((bits
/// >> 16) & 1)`, and for a NaN `bits | 0x0040_0000` (the quiet bit). The low half is garbage.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn round_high(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd);
    let f = _mm512_castsi512_ps(x);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(f, f);
    _mm512_mask_or_epi32(rounded, nan, x, _mm512_set1_epi32(0x0040_0000))
}

/// The mask of the first `n` (at most 16) lanes.
#[inline(always)]
fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// [`Packer::stream`] on AVX-512: 32 values (two loads) give 16 pair lanes, their rounded high
/// halves gathered in order by one VPERMT2W; masked loads read zeros past `src`'s end and
/// masked stores write only `out`.
#[inline(always)]
pub(crate) fn stream_avx512(token: Avx512Bf16, src: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn run(src: &[f32], out: &mut [u32]) {
            use std::arch::x86_64::*;
            // Word j of the result is word 2j + 1 (a high half) of the 64 words of (t0, t1).
            let idx = _mm512_set_epi16(
                63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19,
                17, 15, 13, 11, 9, 7, 5, 3, 1,
            );
            let (n, lanes) = (src.len(), out.len());
            let (s, o) = (src.as_ptr(), out.as_mut_ptr());
            for q in (0..lanes).step_by(16) {
                let e = 2 * q;
                let (m0, m1) = (
                    first_lanes(n.saturating_sub(e)),
                    first_lanes(n.saturating_sub(e + 16)),
                );
                // SAFETY: elements `e..e + 32` of `src` when they all exist (plain loads);
                // otherwise masked loads, which read only the lanes their masks set (elements
                // below `n = src.len()`) and suppress faults on the others.
                let (x0, x1) = unsafe {
                    if e + 32 <= n {
                        (
                            _mm512_loadu_si512(s.add(e).cast()),
                            _mm512_loadu_si512(s.add(e + 16).cast()),
                        )
                    } else {
                        (
                            _mm512_maskz_loadu_epi32(m0, s.add(e.min(n)).cast()),
                            _mm512_maskz_loadu_epi32(m1, s.add((e + 16).min(n)).cast()),
                        )
                    }
                };
                let pairs = _mm512_permutex2var_epi16(round_high(x0), idx, round_high(x1));
                // SAFETY: the store writes lanes `q..q + 16` below `lanes = out.len()` only
                // (a plain store where all 16 exist, else masked).
                unsafe {
                    if q + 16 <= lanes {
                        _mm512_storeu_si512(o.add(q).cast(), pairs);
                    } else {
                        _mm512_mask_storeu_epi32(o.add(q).cast(), first_lanes(lanes - q), pairs);
                    }
                }
            }
        }
        let _ = token;
        // SAFETY: the token proves AVX512F and AVX512BW (detected at run time).
        unsafe { run(src, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (src, out);
        match token._proof {}
    }
}

/// [`Packer::interleave`] on AVX-512: per 16 lanes, the rounded high halves of `lo` shifted
/// down, blended with those of `hi` (VPBLENDMW on the odd words).
#[inline(always)]
pub(crate) fn interleave_avx512(token: Avx512Bf16, lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let lanes = out.len();
    let lo = &lo[..lanes];
    let hi = hi.map(|h| &h[..lanes]);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn run(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
            use std::arch::x86_64::*;
            let lanes = out.len();
            let o = out.as_mut_ptr();
            for q in (0..lanes).step_by(16) {
                let full = q + 16 <= lanes;
                let m = first_lanes(lanes - q);
                // SAFETY: `lo`, `hi` (when present) and `out` all hold `lanes` elements (cut
                // above); each load and store touches lanes `q..q + 16`, all below `lanes`
                // when `full` (plain), else only those below `lanes` (masked).
                unsafe {
                    let load = |x: &[f32]| {
                        if full {
                            _mm512_loadu_si512(x.as_ptr().add(q).cast())
                        } else {
                            _mm512_maskz_loadu_epi32(m, x.as_ptr().add(q).cast())
                        }
                    };
                    let low = _mm512_srli_epi32::<16>(round_high(load(lo)));
                    let pairs = match hi {
                        Some(hi) => _mm512_mask_blend_epi16(0xaaaa_aaaa, low, round_high(load(hi))),
                        None => low,
                    };
                    if full {
                        _mm512_storeu_si512(o.add(q).cast(), pairs);
                    } else {
                        _mm512_mask_storeu_epi32(o.add(q).cast(), m, pairs);
                    }
                }
            }
        }
        let _ = token;
        // SAFETY: the token proves AVX512F and AVX512BW (detected at run time).
        unsafe { run(lo, hi, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (lo, hi, out);
        match token._proof {}
    }
}

/// [`transpose_store`](super::pack) on AVX-512: `out[q * width + r] = tile[r][q]` for
/// `r < width`, `q < len`, sixteen rows at a time transposed in registers (16 x 16 lanes: two
/// rounds of VPUNPCK, two of VSHUFI32X4) and stored a column per masked store.
#[inline(always)]
pub(crate) fn transpose_store_avx512(
    token: Avx512Bf16,
    tile: &[[u32; 16]; 64],
    width: usize,
    len: usize,
    out: &mut [u32],
) {
    assert!(width <= 64 && len <= 16 && out.len() >= len * width);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn run(tile: &[[u32; 16]; 64], width: usize, len: usize, out: &mut [u32]) {
            use std::arch::x86_64::*;
            let o = out.as_mut_ptr();
            for r0 in (0..width).step_by(16) {
                // SAFETY: rows r0..r0 + 16 of the 64-row tile (r0 < width <= 64, a multiple of
                // 16), 64 bytes each.
                let r: [__m512i; 16] =
                    std::array::from_fn(|i| unsafe { _mm512_loadu_si512(tile[r0 + i].as_ptr().cast()) });
                // a[2i], a[2i + 1]: rows 2i and 2i + 1 interleaved (low and high pairs of each
                // 128-bit lane).
                let a: [__m512i; 16] = std::array::from_fn(|x| {
                    let (i, hi) = (x / 2, x % 2 == 1);
                    if hi {
                        _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1])
                    } else {
                        _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1])
                    }
                });
                // b[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i + 4.
                let b: [__m512i; 16] = std::array::from_fn(|x| {
                    let (i, j) = (x / 4, x % 4);
                    let (u, v) = (a[4 * i + j / 2], a[4 * i + 2 + j / 2]);
                    if j % 2 == 0 {
                        _mm512_unpacklo_epi64(u, v)
                    } else {
                        _mm512_unpackhi_epi64(u, v)
                    }
                });
                let mask = first_lanes(width - r0);
                for j in 0..4 {
                    let p = _mm512_shuffle_i32x4::<0x44>(b[j], b[4 + j]);
                    let q = _mm512_shuffle_i32x4::<0xee>(b[j], b[4 + j]);
                    let p2 = _mm512_shuffle_i32x4::<0x44>(b[8 + j], b[12 + j]);
                    let q2 = _mm512_shuffle_i32x4::<0xee>(b[8 + j], b[12 + j]);
                    let columns = [
                        _mm512_shuffle_i32x4::<0x88>(p, p2),
                        _mm512_shuffle_i32x4::<0xdd>(p, p2),
                        _mm512_shuffle_i32x4::<0x88>(q, q2),
                        _mm512_shuffle_i32x4::<0xdd>(q, q2),
                    ];
                    for (l, &col) in columns.iter().enumerate() {
                        let c = 4 * l + j;
                        if c < len {
                            // SAFETY: lanes `c * width + r0 ..` up to `c * width + width`
                            // (the mask keeps `r < width`), inside `out` (len * width lanes,
                            // checked, and c < len).
                            unsafe {
                                let at = o.add(c * width + r0);
                                if mask == u16::MAX {
                                    _mm512_storeu_si512(at.cast(), col);
                                } else {
                                    _mm512_mask_storeu_epi32(at.cast(), mask, col);
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = token;
        // SAFETY: the token proves AVX512F (detected at run time).
        unsafe { run(tile, width, len, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (tile, width, len, out);
        match token._proof {}
    }
}

// ----- AMX -----

/// The tile state of the calling thread, configured; released when dropped. Not `Send`: the
/// configuration belongs to the thread that loaded it.
pub(crate) struct AmxTiles {
    _thread: std::marker::PhantomData<*mut ()>,
}

#[cfg(target_arch = "x86_64")]
impl driver::TileUnit for Amx {
    type Tiles = AmxTiles;

    #[inline(always)]
    fn packer(&self) -> Packer {
        // detect_amx makes an `Amx` only where AVX512F/BW/VL/BF16 were detected.
        Packer::Avx512(Avx512Bf16 { _proof: self._proof })
    }

    fn configure(&self) -> AmxTiles {
        // SAFETY: the token proves AMX-TILE and the OS permission; LDTILECFG reads the 64-byte
        // block, whose palette (1) and shapes (8 tiles of 16 rows x 64 bytes, within palette
        // 1's limits) are valid, so it cannot fault.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{cfg}]",
                cfg = in(reg) driver::TILE_CONFIG.0.as_ptr(),
                options(nostack, readonly, preserves_flags)
            );
        }
        AmxTiles {
            _thread: std::marker::PhantomData,
        }
    }
}

// The tile registers are invisible to the compiler, which never allocates them: their state
// lives on from one `asm!` block to the next on the same thread (and the OS saves it across
// context switches, the permission having been granted).
#[cfg(target_arch = "x86_64")]
impl driver::TileOps for AmxTiles {
    fn zero_accumulators(&mut self) {
        // SAFETY: the tiles are configured on this thread (an `AmxTiles` exists only after
        // LDTILECFG here, and is not `Send`); TILEZERO touches registers only.
        unsafe {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nomem, nostack, preserves_flags)
            );
        }
    }

    fn step(&mut self, a: &[u32; 512], b: &[u32; 512]) {
        // SAFETY: configured as above. Each TILELOADD reads 16 rows of 64 bytes at a 64-byte
        // stride, 1 KiB, from a half of `a` or `b` (2 KiB each). The shapes agree as
        // TDPBF16PS requires (A: 16 x 16 pairs, B: 16 pairs x 16 columns, C: 16 x 16 f32).
        unsafe {
            std::arch::asm!(
                "tileloadd tmm4, [{a} + {stride} * 1]",
                "tileloadd tmm5, [{a1} + {stride} * 1]",
                "tileloadd tmm6, [{b} + {stride} * 1]",
                "tileloadd tmm7, [{b1} + {stride} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a.as_ptr(),
                a1 = in(reg) a.as_ptr().add(256),
                b = in(reg) b.as_ptr(),
                b1 = in(reg) b.as_ptr().add(256),
                stride = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            );
        }
    }

    fn store_accumulators(&mut self, out: &mut [f32; 1024]) {
        // SAFETY: configured as above. Each TILESTORED writes 16 rows of 64 bytes at a 128-byte
        // stride from its offset (0, 64, 2048, 2112 bytes): the last byte written is
        // 2112 + 15 * 128 + 63 = 4095, inside `out`'s 4 KiB.
        unsafe {
            let o = out.as_mut_ptr();
            std::arch::asm!(
                "tilestored [{o0} + {stride} * 1], tmm0",
                "tilestored [{o1} + {stride} * 1], tmm1",
                "tilestored [{o2} + {stride} * 1], tmm2",
                "tilestored [{o3} + {stride} * 1], tmm3",
                o0 = in(reg) o,
                o1 = in(reg) o.add(16),
                o2 = in(reg) o.add(16 * 32),
                o3 = in(reg) o.add(16 * 32 + 16),
                stride = in(reg) 128usize,
                options(nostack, preserves_flags)
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for AmxTiles {
    fn drop(&mut self) {
        // SAFETY: AMX-TILE is present (an `AmxTiles` exists); TILERELEASE returns the tile
        // state to its initial state, so the thread's context switches save no tile data.
        unsafe { std::arch::asm!("tilerelease", options(nomem, nostack, preserves_flags)) }
    }
}

/// [`driver::tile_product`] on the AMX unit, compiled with AVX-512 for its packing and merging.
#[allow(clippy::too_many_arguments)]
pub(crate) fn amx_product(
    token: Amx,
    a: &KView<'_>,
    b: &KView<'_>,
    c: MatMut<'_, f32>,
    alpha: f32,
    beta: f32,
    skip: Skip,
    buf: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        #[allow(clippy::too_many_arguments)]
        fn compiled(
            token: Amx,
            a: &KView<'_>,
            b: &KView<'_>,
            c: MatMut<'_, f32>,
            alpha: f32,
            beta: f32,
            skip: Skip,
            buf: &mut [u32],
        ) {
            driver::tile_product(token, a, b, c, alpha, beta, skip, buf);
        }
        // SAFETY: the token proves AVX512F/BW/VL/BF16 (detect_amx requires them).
        unsafe { compiled(token, a, b, c, alpha, beta, skip, buf) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, c, alpha, beta, skip, buf);
        match token._proof {}
    }
}
