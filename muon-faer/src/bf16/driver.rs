//! The blocked drivers of the bf16 products (safe code): BLIS's loops around a micro-kernel,
//! one for a register kernel (AVX512-BF16) and one for a tile unit (AMX), each generic over
//! its kernel so the same loops run the real instructions or their scalar models.
//!
//! A product is `C = alpha A B^T + beta C` on [`KView`]s (A: `m x k`, B given as `n x k`),
//! optionally only the tiles of a lower triangle, or only the terms where a triangular A is
//! not zero (`Skip`). The loops, outside in (BLIS's names):
//! `jc` over panels of `NC` columns of C; `pc` over blocks of `KC` pairs of `k`, packing B's
//! panel (`KC x NC`, in L2/L3); `ic` over blocks of `MC` rows, packing A's block (`MC x KC`, in
//! L2); then `jr` over micro-panels of `NR` columns of B (in L1 while `ir` runs) and `ir` over
//! micro-panels of `MR` rows of A; the micro-kernel computes an `MR x NR` tile over the block's
//! pairs and merges it into C: `alpha tile + beta C` for the first block of `k`, `alpha tile +
//! C` for the others.
//!
//! Each element of C sees the same operations in the same order whatever part of a split it
//! falls in (the blocks of `k` are fixed, and a kernel treats every lane alike), so results do
//! not depend on the thread count.

use faer::MatMut;

use super::model::merge;
use super::pack::{pack_pair_major, pack_pair_major_panels, pack_row_major, KView, Packer};
use super::timer::Clock;

/// An A micro-panel of `MR` rows: lane `(i, p)` at `lanes[i * row + p * pair]`. Pair-major
/// (`row = 1`, `pair = MR`) when A is stored with `k` down its columns, row-major (`row =
/// pairs`, `pair = 1`) when `k` runs along its rows: each is packed without a transposition.
#[derive(Clone, Copy)]
pub(crate) struct APanel<'a> {
    pub(crate) lanes: &'a [u32],
    pub(crate) row: usize,
    pub(crate) pair: usize,
}

/// An `MR x NR` register-blocked micro-kernel: A pairs broadcast, B pairs in vectors.
pub(crate) trait RegisterKernel: Copy {
    /// Rows of a tile (A micro-panel width).
    const MR: usize;
    /// Columns of a tile (B micro-panel width).
    const NR: usize;
    /// `c = alpha (A B^T) + beta c` (`beta == 0`: `c` is not read) for the `pairs` pairs of
    /// the panels `a` (`MR x pairs` lanes) and `b` (pair-major, `pairs x NR`); `c` is at most
    /// `MR x NR`, row-major (unit column stride).
    fn tile(self, pairs: usize, a: APanel<'_>, b: &[u32], c: MatMut<'_, f32>, alpha: f32, beta: f32);
    /// How the driver packs this kernel's operands (the same bits either way).
    fn packer(self) -> Packer;
}

/// Pairs of `k` per block (`KC / 2`): a B micro-panel is `256 x 64` lanes, 64 KiB, in L2.
/// Every block of `k` loads and stores all of C once more, so fewer, longer blocks pay: with
/// C prefetched in the kernel, 256 pairs ran a 2048^3 product at ~435 GFLOP/s on a Zen 5 core
/// against ~370 with 128 (`benches/gemm.rs --threads 1 --sizes 2048 --precisions bf16`; a
/// taller A block, 336 rows, gained nothing).
const KC_PAIRS: usize = 256;
/// Rows of A per block: `MC x KC` lanes, 168 KiB, in L2.
const MC: usize = 168;
/// Columns of B per panel: `KC x NC` lanes, 4 MiB (in L3; A's blocks are packed once per
/// panel, so a wide panel packs A fewer times).
const NC: usize = 4096;

/// Tile shapes of the AMX driver: C in blocks of 32 x 32 (four 16 x 16 f32 tiles), `k` in
/// steps of 16 pairs (one TDPBF16PS per tile per step).
const TILE_PAIRS: usize = 16;
/// Pairs of `k` per block of the AMX driver (16 steps): A and B micro-panels of 32 KiB.
const TILE_KC_PAIRS: usize = 256;
/// Rows of A per block of the AMX driver (128 KiB).
const TILE_MC: usize = 128;
/// Columns of B per panel of the AMX driver (512 KiB).
const TILE_NC: usize = 512;

/// The packing buffer a product needs (`u32` lanes), whichever driver runs it.
pub(crate) const BUFFER_LANES: usize = {
    let register = NC * KC_PAIRS + (MC + 16) * KC_PAIRS;
    let tile = TILE_NC * TILE_KC_PAIRS + TILE_MC * TILE_KC_PAIRS;
    if register > tile {
        register
    } else {
        tile
    }
};

/// `c = beta c` where the product is empty (`k == 0`).
fn scale(mut c: MatMut<'_, f32>, alpha: f32, beta: f32) {
    for i in 0..c.nrows() {
        for j in 0..c.ncols() {
            merge(0.0, &mut c[(i, j)], alpha, beta);
        }
    }
}

/// What a product may leave out: elements of C nobody reads, terms whose A lane is a known
/// zero. Skipping either leaves every needed element's bits as they are: accumulators start
/// at +0, and adding an exact zero product to them (B finite) changes nothing, not even a
/// zero's sign.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Skip {
    /// Only the elements `(i, j)` with `j <= i + offset` are needed (a lower triangle,
    /// `offset` = the block's first row); tiles wholly above are skipped, the rest computed
    /// whole.
    pub(crate) lower_c: Option<usize>,
    /// A is triangular: its zeros (`k > i` for `Lower`, `k < i` for `Upper`) are not
    /// multiplied (per micro-panel of rows, whole pairs).
    pub(crate) a: Option<Triangle>,
}

/// Which triangle of A holds its nonzeros (the diagonal included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Triangle {
    Lower,
    Upper,
}

impl Skip {
    /// Every element, every term.
    pub(crate) const NONE: Skip = Skip {
        lower_c: None,
        a: None,
    };

    /// Only C's lower triangle from the block's row `offset` on.
    pub(crate) fn lower_c(offset: usize) -> Skip {
        Skip {
            lower_c: Some(offset),
            a: None,
        }
    }

    /// Columns of C a product must compute: all, or those left of the diagonal band.
    fn needed_columns(self, m: usize, n: usize) -> usize {
        self.lower_c.map_or(n, |offset| n.min(m + offset))
    }

    /// The first row whose needed columns reach column `jc`.
    fn first_row(self, jc: usize) -> usize {
        self.lower_c.map_or(0, |offset| jc.saturating_sub(offset))
    }

    /// Whether the `rows x cols` tile at `(i0, j0)` lies wholly above the diagonal of a lower
    /// product (element `(i, j)` is needed when `j <= i + offset`).
    fn above_diagonal(self, i0: usize, rows: usize, j0: usize) -> bool {
        self.lower_c.is_some_and(|offset| j0 > i0 + rows - 1 + offset)
    }

    /// The pairs of the block `pc..pc + kc` (numbered from the block's start) that rows
    /// `i0..i0 + rows` of A may hold nonzeros in (`0..0` when none).
    fn live_pairs(self, i0: usize, rows: usize, pc: usize, kc: usize) -> std::ops::Range<usize> {
        let clamp = |pair: usize| pair.saturating_sub(pc).min(kc);
        let live = match self.a {
            None => 0..kc,
            // Lanes k <= i0 + rows - 1: pairs up to (i0 + rows - 1) / 2.
            Some(Triangle::Lower) => 0..clamp((i0 + rows - 1) / 2 + 1),
            // Lanes k >= i0: pairs from i0 / 2 on.
            Some(Triangle::Upper) => clamp(i0 / 2)..kc,
        };
        if live.is_empty() {
            0..0
        } else {
            live
        }
    }
}

/// `C = alpha A B^T + beta C` with a register kernel, leaving out what `skip` allows. `buf`
/// holds [`BUFFER_LANES`] lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn register_product<K: RegisterKernel>(
    kernel: K,
    a: &KView<'_>,
    b: &KView<'_>,
    mut c: MatMut<'_, f32>,
    alpha: f32,
    beta: f32,
    skip: Skip,
    buf: &mut [u32],
) {
    let (m, n) = (c.nrows(), c.ncols());
    debug_assert!(a.rows() == m && b.rows() == n && a.k() == b.k());
    let pairs = a.pairs();
    if pairs == 0 {
        return scale(c, alpha, beta);
    }
    let (mr, nr) = (K::MR, K::NR);
    let pk = kernel.packer();
    let mc_max = MC.div_ceil(mr) * mr;
    let (b_panel, a_block) = buf.split_at_mut(NC * KC_PAIRS);
    let a_block = &mut a_block[..mc_max * KC_PAIRS];
    let n_needed = skip.needed_columns(m, n);
    let mut clock = Clock::start();
    for jc in (0..n_needed).step_by(NC) {
        let nc = NC.min(n_needed - jc);
        // Rows whose needed columns reach this panel.
        let first_row = skip.first_row(jc);
        for pc in (0..pairs).step_by(KC_PAIRS) {
            let kc = KC_PAIRS.min(pairs - pc);
            let beta = if pc == 0 { beta } else { 1.0 };
            clock.pack(false, || {
                pack_pair_major_panels(pk, b, jc, nc, nr, pc, kc, b_panel)
            });
            for ic in (first_row..m).step_by(mc_max) {
                let mc = mc_max.min(m - ic);
                // A's micro-panel `qi` starts at lane `qi * panel`; lane `(i, p)` of it lies at
                // `i * row + p * pair`.
                let mc_pad = mc.div_ceil(mr) * mr;
                let k_rows = a.k_contiguous();
                let (panel, pair) = clock.pack(true, || {
                    if k_rows {
                        // Row-major panels hold only the pairs their rows may be nonzero in (all,
                        // unless A is triangular), `live.len()` of them a row.
                        for (q, ir) in (0..mc).step_by(mr).enumerate() {
                            let live = skip.live_pairs(ic + ir, mr.min(mc - ir), pc, kc);
                            if !live.is_empty() {
                                let out = &mut a_block[q * mr * kc..];
                                pack_row_major(pk, a, ic + ir, mr, pc + live.start, live.len(), out);
                            }
                        }
                        (mr * kc, 1)
                    } else {
                        // `k` down A's stored columns: the whole block pair-major, each pair one
                        // pass over two stored rows. Panels of `mr` rows packed one by one would
                        // cut every pass into `mr`-lane pieces (copied into place, the copies
                        // took two thirds of a 128x32x128 product's time on Zen 5).
                        pack_pair_major(pk, a, ic, mc_pad, pc, kc, a_block);
                        (mr, mc_pad)
                    }
                });
                let a_block = &a_block[..mc_pad * kc];
                for (qj, jr) in (0..nc).step_by(nr).enumerate() {
                    let b_micro = &b_panel[qj * nr * kc..][..nr * kc];
                    let cols = nr.min(nc - jr);
                    for (qi, ir) in (0..mc).step_by(mr).enumerate() {
                        let rows = mr.min(mc - ir);
                        let (i0, j0) = (ic + ir, jc + jr);
                        if skip.above_diagonal(i0, rows, j0) {
                            continue;
                        }
                        let live = skip.live_pairs(i0, rows, pc, kc);
                        if live.is_empty() && pc > 0 {
                            continue; // nothing to add to what the first block stored
                        }
                        let a_micro = if k_rows {
                            let lanes = &a_block[qi * panel..];
                            APanel {
                                lanes,
                                row: live.len(),
                                pair,
                            }
                        } else {
                            let lanes = &a_block[qi * panel + live.start * pair..];
                            APanel { lanes, row: 1, pair }
                        };
                        let b_micro = &b_micro[live.start * nr..];
                        let tile = c.as_mut().submatrix_mut(i0, j0, rows, cols);
                        kernel.tile(live.len(), a_micro, b_micro, tile, alpha, beta);
                    }
                }
            }
        }
    }
    clock.stop(
        (m, n, a.k()),
        a.k_contiguous(),
        b.k_contiguous(),
        skip != Skip::NONE,
    );
}

/// The bytes of one tile register (16 rows of 64 bytes).
pub(crate) const TILE_BYTES: usize = 1024;

/// The LDTILECFG block (Intel SDM vol. 1, 18.2): 64 bytes, palette 1 at byte 0, start_row 0 at
/// byte 1, bytes per row of tile `t` as a little-endian u16 at byte `16 + 2t`, rows of tile `t`
/// at byte `48 + t`. Eight tiles of 16 rows x 64 bytes: tmm0-3 the f32 accumulators (16 x 16),
/// tmm4-5 A (16 rows x 16 pairs), tmm6-7 B (16 pairs x 16 columns).
#[repr(C, align(64))]
pub(crate) struct TileConfig(pub [u8; 64]);

pub(crate) static TILE_CONFIG: TileConfig = {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    let mut t = 0;
    while t < 8 {
        cfg[16 + 2 * t] = 64; // colsb, low byte (the high byte stays 0)
        cfg[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(cfg)
};

/// A unit that runs the tile instructions: the AMX hardware or its scalar model.
pub(crate) trait TileUnit: Copy {
    /// The configured tiles of the calling thread; dropping them releases the tile state.
    type Tiles: TileOps;
    /// LDTILECFG with [`TILE_CONFIG`], on the calling thread.
    fn configure(&self) -> Self::Tiles;
    /// How the driver packs this unit's operands (the same bits either way).
    fn packer(&self) -> Packer;
}

/// The three instruction sequences the AMX driver issues.
pub(crate) trait TileOps {
    /// TILEZERO tmm0-3.
    fn zero_accumulators(&mut self);
    /// One step of `k`: TILELOADD tmm4-5 from the two A tiles in `a` (rows 0-15, then 16-31,
    /// each 16 rows x 16 pairs, 64-byte rows), tmm6-7 from the two B tiles in `b` (columns
    /// 0-15, then 16-31, each 16 pairs x 16 columns); TDPBF16PS tmm0 += tmm4 tmm6, tmm1 +=
    /// tmm4 tmm7, tmm2 += tmm5 tmm6, tmm3 += tmm5 tmm7.
    fn step(&mut self, a: &[u32; 512], b: &[u32; 512]);
    /// TILESTORED tmm0-3 into the 32 x 32 row-major block `out` (row stride 128 bytes).
    fn store_accumulators(&mut self, out: &mut [f32; 1024]);
}

/// `C = alpha A B^T + beta C` on a tile unit, like [`register_product`] (same `skip` and
/// `buf` contract). A micro-panel of 32 rows (columns) and `kc` pairs holds, per step of 16
/// pairs, its two 1 KiB tiles one after the other.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_product<U: TileUnit>(
    unit: U,
    a: &KView<'_>,
    b: &KView<'_>,
    mut c: MatMut<'_, f32>,
    alpha: f32,
    beta: f32,
    skip: Skip,
    buf: &mut [u32],
) {
    const SIDE: usize = 32;
    const STEP_LANES: usize = 2 * 256;
    let (m, n) = (c.nrows(), c.ncols());
    debug_assert!(a.rows() == m && b.rows() == n && a.k() == b.k());
    let pairs = a.pairs();
    if pairs == 0 {
        return scale(c, alpha, beta);
    }
    let (b_panel, a_block) = buf.split_at_mut(TILE_NC * TILE_KC_PAIRS);
    let n_needed = skip.needed_columns(m, n);
    let pk = unit.packer();
    let mut tiles = unit.configure();
    let mut block = [0.0f32; SIDE * SIDE];
    let mut clock = Clock::start();
    for jc in (0..n_needed).step_by(TILE_NC) {
        let nc = TILE_NC.min(n_needed - jc);
        let first_row = skip.first_row(jc);
        for pc in (0..pairs).step_by(TILE_KC_PAIRS) {
            let steps = TILE_KC_PAIRS.min(pairs - pc).div_ceil(TILE_PAIRS);
            let micro = steps * STEP_LANES;
            let beta = if pc == 0 { beta } else { 1.0 };
            clock.pack(false, || {
                for (q, jr) in (0..nc).step_by(SIDE).enumerate() {
                    let panel = &mut b_panel[q * micro..][..micro];
                    for (s, step) in panel.chunks_exact_mut(STEP_LANES).enumerate() {
                        let (lo, hi) = step.split_at_mut(256);
                        let p0 = pc + s * TILE_PAIRS;
                        pack_pair_major(pk, b, jc + jr, 16, p0, TILE_PAIRS, lo);
                        pack_pair_major(pk, b, jc + jr + 16, 16, p0, TILE_PAIRS, hi);
                    }
                }
            });
            for ic in (first_row..m).step_by(TILE_MC) {
                let mc = TILE_MC.min(m - ic);
                clock.pack(true, || {
                    for (q, ir) in (0..mc).step_by(SIDE).enumerate() {
                        let panel = &mut a_block[q * micro..][..micro];
                        for (s, step) in panel.chunks_exact_mut(STEP_LANES).enumerate() {
                            let (lo, hi) = step.split_at_mut(256);
                            let p0 = pc + s * TILE_PAIRS;
                            pack_row_major(pk, a, ic + ir, 16, p0, TILE_PAIRS, lo);
                            pack_row_major(pk, a, ic + ir + 16, 16, p0, TILE_PAIRS, hi);
                        }
                    }
                });
                for (qj, jr) in (0..nc).step_by(SIDE).enumerate() {
                    let b_micro = &b_panel[qj * micro..][..micro];
                    let cols = SIDE.min(nc - jr);
                    for (qi, ir) in (0..mc).step_by(SIDE).enumerate() {
                        let rows = SIDE.min(mc - ir);
                        let (i0, j0) = (ic + ir, jc + jr);
                        if skip.above_diagonal(i0, rows, j0) {
                            continue;
                        }
                        let live = skip.live_pairs(i0, rows, pc, steps * TILE_PAIRS);
                        let live = live.start / TILE_PAIRS..live.end.div_ceil(TILE_PAIRS);
                        if live.is_empty() && pc > 0 {
                            continue; // nothing to add to what the first block stored
                        }
                        let a_micro = &a_block[qi * micro..][..micro];
                        let lanes = live.start * STEP_LANES..live.end * STEP_LANES;
                        tiles.zero_accumulators();
                        for (sa, sb) in a_micro[lanes.clone()]
                            .chunks_exact(STEP_LANES)
                            .zip(b_micro[lanes].chunks_exact(STEP_LANES))
                        {
                            tiles.step(
                                sa.try_into().expect("512 lanes"),
                                sb.try_into().expect("512 lanes"),
                            );
                        }
                        tiles.store_accumulators(&mut block);
                        let mut tile = c.as_mut().submatrix_mut(i0, j0, rows, cols);
                        for (i, src) in block.chunks_exact(SIDE).take(rows).enumerate() {
                            for (j, &acc) in src[..cols].iter().enumerate() {
                                merge(acc, &mut tile[(i, j)], alpha, beta);
                            }
                        }
                    }
                }
            }
        }
    }
    clock.stop(
        (m, n, a.k()),
        a.k_contiguous(),
        b.k_contiguous(),
        skip != Skip::NONE,
    );
}
