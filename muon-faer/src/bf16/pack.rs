//! f32 -> bf16 rounding and the packed operand layouts the bf16 instructions read (safe code).
//!
//! Both instructions multiply *pairs*: a 32-bit lane holds two bf16 values of consecutive `k`
//! (`k` even in the low half, `k` odd in the high half), and a lane of the result gains the
//! dot product of an A pair and a B pair. Operands are packed into those pairs:
//!
//! - [`pack_pair_major`]: `out[p][r]`, pair `p` of rows `r0..r0 + R` side by side. The
//!   AVX512-BF16 kernel reads its A and B panels this way (a B row of `NR` lanes per pair, an A
//!   pair broadcast per row), and it is the VNNI layout of an AMX B tile: tile row `p` holds
//!   k-pair `p` for 16 columns, 64 bytes.
//! - [`pack_row_major`]: `out[r][p]`, each row's pairs contiguous: an AMX A tile, 16 rows of
//!   32 bf16 (64 bytes).
//!
//! Rows and pairs past the matrix are zero, so kernels always run whole panels (a zero pair
//! adds `+0` to a lane); a `k` of odd length ends with a pair whose high half is zero.

/// The bf16 bit pattern nearest to `x`: round to nearest, ties to even, the rounding of
/// `muon_core::round_to_bf16` bit for bit. A NaN stays a NaN with its sign and top payload bits
/// and the quiet bit set (keeping only the high half of a NaN whose payload sits in the low
/// half would make it an infinity). What VCVTNE2PS2BF16 does differently, flushing f32
/// subnormals to zero, makes no difference to a product: the dot-product instructions treat
/// bf16 subnormal inputs as zero.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = (bits >> 16) as u16 | 0x0040;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// The f32 value of a bf16 bit pattern (exact).
#[inline(always)]
pub(crate) fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Two values of consecutive `k` as one pair lane: `lo` (k even) in the low half.
#[inline(always)]
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// One GEMM operand seen as `rows x k` with `k` the inner (summed) dimension: A (`m x k`) as
/// it is, B (`k x n`) as `op(B)^T` (`n x k`), so both pack with the same code. A row-major
/// matrix stored with `k` along its rows (`k_contiguous`: A untransposed, B transposed) or
/// down its columns (A transposed, B untransposed).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KView<'a> {
    data: &'a [f32],
    /// Elements between consecutive rows of the stored matrix.
    ld: usize,
    k_contiguous: bool,
    /// The view's first row (a view of rows of a larger operand, for the team's splits).
    first: usize,
    rows: usize,
    k: usize,
}

impl<'a> KView<'a> {
    /// A stored row-major `rows x k` matrix (`k_contiguous`) or `k x rows` matrix (not).
    pub(crate) fn new(data: &'a [f32], rows: usize, k: usize, k_contiguous: bool) -> Self {
        let ld = if k_contiguous { k } else { rows };
        Self::strided(data, rows, k, k_contiguous, ld)
    }

    /// As [`new`](Self::new), with the stored rows `ld` elements apart.
    pub(crate) fn strided(data: &'a [f32], rows: usize, k: usize, k_contiguous: bool, ld: usize) -> Self {
        let (stored_rows, stored_cols) = if k_contiguous { (rows, k) } else { (k, rows) };
        crate::matmul::check_strided("KView", data.len(), stored_rows, stored_cols, ld);
        KView {
            data,
            ld,
            k_contiguous,
            first: 0,
            rows,
            k,
        }
    }

    /// Rows `start..start + len` of this view.
    pub(crate) fn subrows(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.rows, "KView::subrows out of range");
        KView {
            first: self.first + start,
            rows: len,
            ..self
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Whether `k` runs along the stored rows.
    pub(crate) fn k_contiguous(&self) -> bool {
        self.k_contiguous
    }

    /// Pairs in `k`: `ceil(k / 2)`.
    pub(crate) fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }
}

/// How a pack converts f32 to bf16 pairs: the scalar loop ([`pair`]), or AVX-512 sixteen lanes
/// at a time (`arch`), which gives the same bits (the same integer rounding, the same NaNs).
/// The real kernels pack with AVX-512, their scalar models with the loop, so every test of a
/// kernel against its model checks the two conversions against each other.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Packer {
    Scalar,
    Avx512(super::arch::Avx512Bf16),
}

impl Packer {
    /// `out[p] = pair(src[2p], src[2p + 1])`, values past `src`'s end read as zero (the
    /// pairs of one row stored with `k` along it, from its first pair on).
    #[inline(always)]
    pub(crate) fn stream(self, src: &[f32], out: &mut [u32]) {
        match self {
            Packer::Scalar => stream_scalar(src, out),
            Packer::Avx512(t) => super::arch::stream_avx512(t, src, out),
        }
    }

    /// `out[r] = pair(lo[r], hi[r])` (`hi` absent: zero), for `r < out.len()` (the pairs
    /// of two consecutive stored rows when `k` runs down the columns).
    #[inline(always)]
    pub(crate) fn interleave(self, lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
        match self {
            Packer::Scalar => interleave_scalar(lo, hi, out),
            Packer::Avx512(t) => super::arch::interleave_avx512(t, lo, hi, out),
        }
    }
}

/// [`Packer::stream`] one lane at a time.
#[inline(always)]
pub(crate) fn stream_scalar(src: &[f32], out: &mut [u32]) {
    let full = out.len().min(src.len() / 2);
    for (x, two) in out[..full].iter_mut().zip(src.chunks_exact(2)) {
        *x = pair(two[0], two[1]);
    }
    for (p, x) in out.iter_mut().enumerate().skip(full) {
        *x = src.get(2 * p).map_or(0, |&lo| pair(lo, 0.0));
    }
}

/// [`Packer::interleave`] one lane at a time.
#[inline(always)]
pub(crate) fn interleave_scalar(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let lo = &lo[..out.len()];
    match hi {
        Some(hi) => {
            for ((x, &l), &h) in out.iter_mut().zip(lo).zip(&hi[..lo.len()]) {
                *x = pair(l, h);
            }
        }
        None => {
            for (x, &l) in out.iter_mut().zip(lo) {
                *x = pair(l, 0.0);
            }
        }
    }
}

/// Pairs per block of the transposing pack, and the widest panel it serves.
const BLOCK: usize = 16;
const MAX_WIDTH: usize = 64;

/// Pairs `p0..p0 + out.len()` of one row of `k = row.len()` values (zero past its end).
#[inline(always)]
fn row_pairs(pk: Packer, row: &[f32], p0: usize, out: &mut [u32]) {
    pk.stream(row.get(2 * p0..).unwrap_or(&[]), out);
}

/// `out[q * width + r] = tile[r][q]` for `r < width`, `q < len`. Kept out of line: inlined into
/// the AVX-512 drivers, the compiler turns these strided stores into VPSCATTER, which is
/// microcoded and several times slower than plain stores (a quarter of a 2048^3 product's time
/// went there on Zen 4).
#[inline(never)]
fn transpose_store_scalar(tile: &[[u32; BLOCK]; MAX_WIDTH], width: usize, len: usize, out: &mut [u32]) {
    for q in 0..len {
        for (r, lanes) in tile.iter().enumerate().take(width) {
            out[q * width + r] = lanes[q];
        }
    }
}

/// `out[q * width + r] = tile[r][q]` with the packer's instructions.
#[inline(always)]
fn transpose_store(pk: Packer, tile: &[[u32; BLOCK]; MAX_WIDTH], width: usize, len: usize, out: &mut [u32]) {
    match pk {
        Packer::Scalar => transpose_store_scalar(tile, width, len, out),
        Packer::Avx512(t) => super::arch::transpose_store_avx512(t, tile, width, len, out),
    }
}

/// `out[p * width + r]` = pair `p0 + p` of row `r0 + r`, for `p < np`, `r < width`; zero for
/// rows past the view (`out` holds `np * width` lanes).
#[inline(always)]
pub(crate) fn pack_pair_major(
    pk: Packer,
    v: &KView<'_>,
    r0: usize,
    width: usize,
    p0: usize,
    np: usize,
    out: &mut [u32],
) {
    let out = &mut out[..np * width];
    let live = width.min(v.rows.saturating_sub(r0));
    let k = v.k;
    if v.k_contiguous {
        // Row r's pairs are adjacent in memory: convert blocks of `BLOCK` pairs of every row
        // into a tile on the stack (contiguous, so it vectorizes), then store it transposed.
        assert!(width <= MAX_WIDTH, "pack_pair_major: width {width} > {MAX_WIDTH}");
        let mut tile = [[0u32; BLOCK]; MAX_WIDTH];
        for q0 in (0..np).step_by(BLOCK) {
            let len = BLOCK.min(np - q0);
            for (r, lanes) in tile.iter_mut().enumerate().take(width) {
                if r < live {
                    prefetch_row(v, r0 + r + PREFETCH_ROWS, p0 + q0, len);
                    let row = &v.data[(v.first + r0 + r) * v.ld..][..k];
                    row_pairs(pk, row, p0 + q0, &mut lanes[..len]);
                } else {
                    lanes.fill(0);
                }
            }
            transpose_store(pk, &tile, width, len, &mut out[q0 * width..]);
        }
    } else {
        // Pair p is rows 2p and 2p + 1 of the stored matrix, side by side: interleave them.
        for (p, group) in out.chunks_exact_mut(width).enumerate() {
            prefetch_pair(v, r0, width, p0 + p + PREFETCH_PAIRS);
            interleave_group(pk, v, r0, 2 * (p0 + p), group);
        }
    }
}

/// How many pairs ahead the packs of a view with `k` down its stored columns ask for the rows
/// they will read. Each pair reads a piece of two stored rows a whole row apart; the
/// operands of a training step come from memory (a weight gradient reads activations the
/// forward wrote long before), and without the hint the packing waited on every row: in
/// `small`'s bf16 step on Zen 5 the weight gradients went from ~256 to ~335 GFLOP/s and the
/// step from 305-315 to 285-291 ms (2 pairs ahead gained less; 4 and 8 the same).
const PREFETCH_PAIRS: usize = 8;

/// Asks for the stored rows of pair `pair` (rows `2 pair`, `2 pair + 1`), columns `r0..r0 +
/// width` of a view with `k` down its stored columns (nothing past the view).
#[inline(always)]
fn prefetch_pair(v: &KView<'_>, r0: usize, width: usize, pair: usize) {
    let live = width.min(v.rows.saturating_sub(r0));
    if live == 0 {
        return;
    }
    for kk in (2 * pair..2 * pair + 2).take_while(|&kk| kk < v.k) {
        super::arch::prefetch(&v.data[kk * v.ld + v.first + r0..][..live]);
    }
}

/// How many rows ahead the packs of a view with `k` along its rows ask for the pairs they
/// will read, when its rows are not adjacent in memory (a block of columns of a wider
/// matrix: an attention head read in its token rows). Rows that follow each other in memory
/// are streamed by the hardware's prefetchers already; rows a stride apart came late.
const PREFETCH_ROWS: usize = 8;

/// Asks for pairs `p0..p0 + np` of row `row` of a view with `k` along its rows, if the view
/// has that row and its rows are a stride apart.
#[inline(always)]
fn prefetch_row(v: &KView<'_>, row: usize, p0: usize, np: usize) {
    let (from, to) = ((2 * p0).min(v.k), (2 * (p0 + np)).min(v.k));
    if v.ld > v.k && row < v.rows && from < to {
        super::arch::prefetch(&v.data[(v.first + row) * v.ld..][from..to]);
    }
}

/// One pair of a pair-major panel of a view with `k` down its stored columns: lane `r` of
/// `group` = pair `kk / 2` of row `r0 + r` (zero past the view's rows or `k`).
#[inline(always)]
fn interleave_group(pk: Packer, v: &KView<'_>, r0: usize, kk: usize, group: &mut [u32]) {
    let live = group.len().min(v.rows.saturating_sub(r0));
    let (lanes, pad) = group.split_at_mut(live);
    pad.iter_mut().for_each(|x| *x = 0);
    if kk >= v.k || live == 0 {
        lanes.iter_mut().for_each(|x| *x = 0);
        return;
    }
    let lo = &v.data[kk * v.ld + v.first + r0..][..live];
    let hi = (kk + 1 < v.k).then(|| &v.data[(kk + 1) * v.ld + v.first + r0..][..live]);
    pk.interleave(lo, hi, lanes);
}

/// Rows `r0..r0 + rows` as consecutive [`pack_pair_major`] panels of `width` rows (the last
/// padded with zero rows), panel `q` at `out[q * width * np..]`: the same lanes as one call per
/// panel. Where `k` runs down the stored columns, each pair's two stored rows are read once,
/// left to right across every panel (the order they lie in memory, which the prefetchers
/// follow), instead of a panel at a time down `2 np` rows a whole stored row apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn pack_pair_major_panels(
    pk: Packer,
    v: &KView<'_>,
    r0: usize,
    rows: usize,
    width: usize,
    p0: usize,
    np: usize,
    out: &mut [u32],
) {
    let panels = rows.div_ceil(width);
    if v.k_contiguous {
        for q in 0..panels {
            pack_pair_major(pk, v, r0 + q * width, width, p0, np, &mut out[q * width * np..]);
        }
        return;
    }
    let out = &mut out[..panels * width * np];
    for p in 0..np {
        prefetch_pair(v, r0, rows, p0 + p + PREFETCH_PAIRS);
        let kk = 2 * (p0 + p);
        for (q, panel) in out.chunks_exact_mut(width * np).enumerate() {
            interleave_group(pk, v, r0 + q * width, kk, &mut panel[p * width..][..width]);
        }
    }
}

/// `out[r * np + p]` = pair `p0 + p` of row `r0 + r`, for `r < height`, `p < np`; zero past
/// the view.
#[inline(always)]
pub(crate) fn pack_row_major(
    pk: Packer,
    v: &KView<'_>,
    r0: usize,
    height: usize,
    p0: usize,
    np: usize,
    out: &mut [u32],
) {
    let out = &mut out[..height * np];
    let live = height.min(v.rows.saturating_sub(r0));
    let k = v.k;
    let (rows, pad) = out.split_at_mut(live * np);
    pad.iter_mut().for_each(|x| *x = 0);
    if v.k_contiguous {
        for (r, lanes) in rows.chunks_exact_mut(np).enumerate() {
            prefetch_row(v, r0 + r + PREFETCH_ROWS, p0, np);
            row_pairs(pk, &v.data[(v.first + r0 + r) * v.ld..][..k], p0, lanes);
        }
        return;
    }
    // `k` down the stored columns (an AMX A tile of a weight gradient): blocks of 16 rows x 16
    // pairs packed pair-major (each pair one pass over two stored rows), then transposed into
    // rows. Lane by lane, every lane cost two loads a stored row apart.
    let mut tile = [[0u32; BLOCK]; MAX_WIDTH];
    let mut block = [0u32; BLOCK * BLOCK];
    for rb in (0..live).step_by(BLOCK) {
        let w = BLOCK.min(live - rb);
        for pb in (0..np).step_by(BLOCK) {
            let len = BLOCK.min(np - pb);
            // block[p * w + r], then tile[p][r]: the pairs as the tile's rows.
            pack_pair_major(pk, v, r0 + rb, w, p0 + pb, len, &mut block);
            for (lanes, pairs) in tile.iter_mut().zip(block.chunks_exact(w)).take(len) {
                lanes[..w].copy_from_slice(pairs);
            }
            // block[r * len + p] = tile[p][r].
            transpose_store(pk, &tile, len, w, &mut block);
            for (r, row) in block.chunks_exact(len).take(w).enumerate() {
                rows[(rb + r) * np + pb..][..len].copy_from_slice(row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_bits_round_like_muon_core() {
        let mut checked = 0;
        // Every 16-bit high half with a spread of low halves: ties, just below, just above.
        for hi in (0u32..=0xffff).step_by(7) {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                let x = f32::from_bits(hi << 16 | lo);
                let got = bf16_value(bf16_bits(x));
                let want = muon_core::round_to_bf16(x);
                if x.is_nan() {
                    assert!(got.is_nan(), "{:#x}: NaN became {got}", x.to_bits());
                    assert_eq!(got.to_bits() >> 31, x.to_bits() >> 31, "NaN sign");
                } else {
                    assert_eq!(got.to_bits(), want.to_bits(), "{:#x}", x.to_bits());
                }
                checked += 1;
            }
        }
        assert!(checked > 50_000);
        // A NaN whose payload is only in the low half stays a NaN (truncation would give Inf).
        assert!(bf16_value(bf16_bits(f32::from_bits(0x7f80_0001))).is_nan());
    }

    /// A stored matrix and the view of it, for each of the two storage orders.
    fn views(data: &[f32], rows: usize, k: usize) -> [(Vec<f32>, bool); 2] {
        // `data` is row-major rows x k; the other storage is its transpose (k x rows).
        let mut t = vec![0.0; rows * k];
        for r in 0..rows {
            for kk in 0..k {
                t[kk * rows + r] = data[r * k + kk];
            }
        }
        [(data.to_vec(), true), (t, false)]
    }

    /// The packers this machine runs: the scalar loop, and AVX-512 where the CPU has it.
    fn packers() -> Vec<Packer> {
        let fast = super::super::arch::support().avx512.as_ref().ok();
        [Packer::Scalar]
            .into_iter()
            .chain(fast.map(|&t| Packer::Avx512(t)))
            .collect()
    }

    #[test]
    fn packs_hold_the_right_pairs_with_zero_padding() {
        for pk in packers() {
            packs_hold_the_right_pairs(pk);
        }
    }

    fn packs_hold_the_right_pairs(pk: Packer) {
        for (rows, k) in [(1, 1), (5, 7), (16, 32), (17, 33), (40, 3), (70, 45)] {
            let data: Vec<f32> = (0..rows * k).map(|i| 1.0 + i as f32).collect();
            for (stored, kc) in views(&data, rows, k) {
                let full = KView::new(&stored, rows, k, kc);
                // A sub-view, as the team's splits use.
                let (start, len) = (rows / 3, rows - rows / 3);
                let v = full.subrows(start, len);
                let expect = |r: usize, p: usize| -> u32 {
                    let at = |kk: usize| {
                        if r < len && kk < k {
                            data[(start + r) * k + kk]
                        } else {
                            0.0
                        }
                    };
                    pair(at(2 * p), at(2 * p + 1))
                };
                for (r0, width, p0, np) in [
                    (0, 16, 0, 17),
                    (1, 5, 1, 3),
                    (len, 4, 0, 2),
                    (0, 32, 2, 16),
                    (1, 64, 1, 20),
                    (0, 6, 0, 9),
                ] {
                    let mut out = vec![u32::MAX; width * np];
                    pack_pair_major(pk, &v, r0, width, p0, np, &mut out);
                    for p in 0..np {
                        for r in 0..width {
                            assert_eq!(
                                out[p * width + r],
                                expect(r0 + r, p0 + p),
                                "pair-major {rows}x{k} {kc} {pk:?}"
                            );
                        }
                    }
                    // Three panels at once, as one call each.
                    let rows = (3 * width).min(len.saturating_sub(r0)).max(1);
                    let panels = rows.div_ceil(width);
                    let mut want = vec![u32::MAX; panels * width * np];
                    for q in 0..panels {
                        pack_pair_major(pk, &v, r0 + q * width, width, p0, np, &mut want[q * width * np..]);
                    }
                    let mut got = vec![u32::MAX - 1; panels * width * np];
                    pack_pair_major_panels(pk, &v, r0, rows, width, p0, np, &mut got);
                    assert_eq!(got, want, "panels {rows}x{k} {kc} {pk:?}");
                    let mut out = vec![u32::MAX; width * np];
                    pack_row_major(pk, &v, r0, width, p0, np, &mut out);
                    for r in 0..width {
                        for p in 0..np {
                            assert_eq!(
                                out[r * np + p],
                                expect(r0 + r, p0 + p),
                                "row-major {rows}x{k} {kc} {pk:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 conversions give the scalar loop's bits on every kind of value (ties,
    /// neighbours of ties, subnormals, infinities, NaNs with payloads in either half, values
    /// that round up to infinity) and every length and tail.
    #[test]
    fn avx512_packing_matches_the_scalar_loop() {
        let Ok(&t) = super::super::arch::support().avx512.as_ref() else {
            eprintln!("no AVX512-BF16 here: only the scalar packing runs");
            return;
        };
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let special = [
            0x0000_0000u32,
            0x8000_0000,
            0x0000_0001,
            0x807f_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x3f80_8001,
            0x7f7f_ffff,
            0xff7f_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc0_0000,
            0x7fbf_ffff,
            0x7fff_ffff,
            0x0080_0000,
            0x007f_8000,
        ];
        let values: Vec<f32> = (0..4096)
            .map(|i| {
                let r = next();
                let bits = match i % 3 {
                    0 => special[(r % special.len() as u64) as usize],
                    1 => r as u32,
                    _ => (r as u32 & 0xffff_0000) | [0x7fff, 0x8000, 0x8001][(r >> 40) as usize % 3],
                };
                f32::from_bits(bits)
            })
            .collect();
        let fast = Packer::Avx512(t);
        for len in (0..70).chain([127, 128, 129, 255, 256, 257, 1000, 4096]) {
            let src = &values[4096 - len..];
            for lanes in [0, 1, len / 2, len.div_ceil(2), len.div_ceil(2) + 3, 17, 40] {
                let (mut want, mut got) = (vec![1u32; lanes], vec![2u32; lanes]);
                Packer::Scalar.stream(src, &mut want);
                fast.stream(src, &mut got);
                assert_eq!(got, want, "stream of {len} into {lanes}");
            }
            let lanes = len / 2;
            let (lo, hi) = (&values[..lanes], &values[1000..1000 + lanes]);
            for h in [Some(hi), None] {
                let (mut want, mut got) = (vec![1u32; lanes], vec![2u32; lanes]);
                Packer::Scalar.interleave(lo, h, &mut want);
                fast.interleave(lo, h, &mut got);
                assert_eq!(got, want, "interleave of {lanes}");
            }
        }
    }
}
