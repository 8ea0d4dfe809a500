//! Scalar models of the two bf16 dot-product instructions, written from their documented
//! semantics (Intel SDM vol. 2: VDPBF16PS, TDPBF16PS, TILELOADD, TILESTORED, TILEZERO), in
//! safe code. They serve as the reference the real instructions are checked against where
//! the CPU has them, and run the same blocked drivers where it does not
//! ([`Bf16Kernel::Avx512Bf16Model`](crate::Bf16Kernel), [`Bf16Kernel::AmxModel`](crate::Bf16Kernel)).
//!
//! Both instructions multiply bf16 inputs exactly (an 8-bit by 8-bit significand product fits
//! in f32's 24 bits) and add with f32 fused multiply-adds, rounding to nearest even; bf16
//! subnormal inputs count as zero (DAZ) and subnormal results are flushed to zero (FTZ);
//! MXCSR plays no part.

use super::driver::{APanel, RegisterKernel, TileOps, TileUnit, TILE_BYTES};
use super::pack::{bf16_value, Packer};
use faer::MatMut;

/// A bf16 input as the instructions read it: subnormals are zero (sign kept).
#[inline]
fn daz(b: u16) -> f32 {
    if b & 0x7f80 == 0 {
        bf16_value(b & 0x8000)
    } else {
        bf16_value(b)
    }
}

/// A result as the instructions write it: subnormals become zero (sign kept).
#[inline]
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// An f32 input to the fused multiply-adds: subnormals count as zero.
#[inline]
fn daz32(x: f32) -> f32 {
    ftz(x)
}

/// `acc + a b` as one FP32 FMA with DAZ and FTZ, for bf16 `a` and `b`.
#[inline]
fn fma(a: f32, b: f32, acc: f32) -> f32 {
    // A product of two bf16 values has at most 16 significant bits, so when it is a normal
    // f32 it is exact and one rounded addition is the FMA (`mul_add` is a slow libm call
    // where the build has no FMA instruction).
    let p = a * b;
    let sum = if p.is_normal() || p == 0.0 && a.is_finite() && b.is_finite() {
        p + daz32(acc)
    } else {
        a.mul_add(b, daz32(acc))
    };
    ftz(sum)
}

/// One lane of VDPBF16PS: `acc += a.hi b.hi`, then `acc += a.lo b.lo` (the SDM's order: the
/// odd element first), each an FMA.
pub(crate) fn vdpbf16ps_lane(acc: f32, a: u32, b: u32) -> f32 {
    let (a_lo, a_hi) = (daz(a as u16), daz((a >> 16) as u16));
    let (b_lo, b_hi) = (daz(b as u16), daz((b >> 16) as u16));
    fma(a_lo, b_lo, fma(a_hi, b_hi, acc))
}

/// `c = alpha acc + beta c` (`beta == 0`: `c` is not read), the merge every kernel ends with:
/// one FMA when `beta != 0`, so the scalar model and the vector kernels round alike.
#[inline(always)]
pub(crate) fn merge(acc: f32, c: &mut f32, alpha: f32, beta: f32) {
    *c = if beta == 0.0 {
        alpha * acc
    } else {
        alpha.mul_add(acc, beta * *c)
    };
}

/// The register kernel of the AVX512-BF16 path with each VDPBF16PS lane computed by
/// [`vdpbf16ps_lane`]: the same tile shape and the same order of operations per element, so
/// the same bits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vdpbf16psModel;

impl RegisterKernel for Vdpbf16psModel {
    const MR: usize = super::arch::AVX512_MR;
    const NR: usize = super::arch::AVX512_NR;

    fn packer(self) -> Packer {
        Packer::Scalar
    }

    fn tile(self, pairs: usize, a: APanel<'_>, b: &[u32], mut c: MatMut<'_, f32>, alpha: f32, beta: f32) {
        let (mr, nr) = (Self::MR, Self::NR);
        assert!(b.len() >= pairs * nr);
        assert!(c.nrows() <= mr && c.ncols() <= nr);
        for i in 0..c.nrows() {
            for j in 0..c.ncols() {
                let mut acc = 0.0f32;
                for p in 0..pairs {
                    acc = vdpbf16ps_lane(acc, a.lanes[i * a.row + p * a.pair], b[p * nr + j]);
                }
                merge(acc, &mut c[(i, j)], alpha, beta);
            }
        }
    }
}

/// A tile register's configuration: rows, and bytes per row.
#[derive(Clone, Copy, Debug, Default)]
struct Shape {
    rows: usize,
    colsb: usize,
}

/// The AMX tile unit in scalar code: eight 1 KiB tile registers and their configuration,
/// loaded from the same 64-byte LDTILECFG block the hardware reads.
pub(crate) struct TileModel {
    tiles: [[u8; TILE_BYTES]; 8],
    shapes: [Shape; 8],
}

/// The model's tiles between `configure` and the end of a product.
pub(crate) struct ModelTiles(TileModel);

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AmxModel;

impl TileUnit for AmxModel {
    type Tiles = ModelTiles;

    fn packer(&self) -> Packer {
        Packer::Scalar
    }

    fn configure(&self) -> ModelTiles {
        let cfg = &super::driver::TILE_CONFIG.0;
        // The SDM's layout: byte 0 palette, byte 1 start_row, colsb[16] as u16 from byte 16,
        // rows[16] as u8 from byte 48.
        assert_eq!(cfg[0], 1, "palette 1");
        let mut shapes = [Shape::default(); 8];
        for (t, s) in shapes.iter_mut().enumerate() {
            *s = Shape {
                rows: cfg[48 + t] as usize,
                colsb: u16::from_le_bytes([cfg[16 + 2 * t], cfg[17 + 2 * t]]) as usize,
            };
        }
        ModelTiles(TileModel {
            tiles: [[0; TILE_BYTES]; 8],
            shapes,
        })
    }
}

impl TileModel {
    /// TILELOADD: row `r` of tile `t` from `src[r * stride..]`, `colsb` bytes; the rest zero.
    fn tileloadd(&mut self, t: usize, src: &[u8], stride: usize) {
        let Shape { rows, colsb } = self.shapes[t];
        let tile = &mut self.tiles[t];
        tile.fill(0);
        for r in 0..rows {
            tile[r * 64..r * 64 + colsb].copy_from_slice(&src[r * stride..r * stride + colsb]);
        }
    }

    /// TILESTORED: row `r` of tile `t` to `dst[r * stride..]`, `colsb` bytes.
    fn tilestored(&self, t: usize, dst: &mut [u8], stride: usize) {
        let Shape { rows, colsb } = self.shapes[t];
        for r in 0..rows {
            dst[r * stride..r * stride + colsb].copy_from_slice(&self.tiles[t][r * 64..r * 64 + colsb]);
        }
    }

    fn tilezero(&mut self, t: usize) {
        self.tiles[t].fill(0);
    }

    fn dword(&self, t: usize, row: usize, i: usize) -> u32 {
        let at = row * 64 + 4 * i;
        u32::from_le_bytes(self.tiles[t][at..at + 4].try_into().expect("4 bytes"))
    }

    /// TDPBF16PS `c += a b`, as the SDM's pseudo-code: per row of `c`, the even and odd
    /// products accumulate separately over `k` (FMAs), then their sum is added to `c`.
    fn tdpbf16ps(&mut self, c: usize, a: usize, b: usize) {
        let (sc, sa, sb) = (self.shapes[c], self.shapes[a], self.shapes[b]);
        // The shape checks the hardware makes (#UD otherwise).
        assert!(sa.colsb / 4 == sb.rows && sc.colsb == sb.colsb && sc.rows == sa.rows);
        let (pairs, cols) = (sa.colsb / 4, sc.colsb / 4);
        for m in 0..sc.rows {
            let mut even = [0.0f32; 16];
            let mut odd = [0.0f32; 16];
            for k in 0..pairs {
                let x = self.dword(a, m, k);
                for n in 0..cols {
                    let y = self.dword(b, k, n);
                    even[n] = fma(daz(x as u16), daz(y as u16), even[n]);
                    odd[n] = fma(daz((x >> 16) as u16), daz((y >> 16) as u16), odd[n]);
                }
            }
            for n in 0..cols {
                let at = m * 64 + 4 * n;
                let old = f32::from_le_bytes(self.tiles[c][at..at + 4].try_into().expect("4 bytes"));
                let sum = ftz(daz32(even[n]) + daz32(odd[n]));
                let new = ftz(daz32(old) + sum);
                self.tiles[c][at..at + 4].copy_from_slice(&new.to_le_bytes());
            }
        }
    }
}

/// Bytes of a tile buffer of `u32` lanes, little-endian (what TILELOADD reads from memory).
fn bytes_of(src: &[u32], out: &mut [u8]) {
    for (o, &x) in out.chunks_exact_mut(4).zip(src) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

impl TileOps for ModelTiles {
    // The same instruction sequences as the asm in `arch.rs`, one call per instruction.
    fn zero_accumulators(&mut self) {
        for t in 0..4 {
            self.0.tilezero(t);
        }
    }

    fn step(&mut self, a: &[u32; 512], b: &[u32; 512]) {
        let mut bytes = [0u8; 2 * TILE_BYTES];
        bytes_of(a, &mut bytes);
        self.0.tileloadd(4, &bytes[..TILE_BYTES], 64);
        self.0.tileloadd(5, &bytes[TILE_BYTES..], 64);
        bytes_of(b, &mut bytes);
        self.0.tileloadd(6, &bytes[..TILE_BYTES], 64);
        self.0.tileloadd(7, &bytes[TILE_BYTES..], 64);
        self.0.tdpbf16ps(0, 4, 6);
        self.0.tdpbf16ps(1, 4, 7);
        self.0.tdpbf16ps(2, 5, 6);
        self.0.tdpbf16ps(3, 5, 7);
    }

    fn store_accumulators(&mut self, out: &mut [f32; 1024]) {
        // tmm0..3 hold C[0..16][0..16], C[0..16][16..32], C[16..32][0..16], C[16..32][16..32]
        // of a 32 x 32 row-major block: stride 128 bytes.
        let mut bytes = [0u8; 4096];
        for (t, offset) in [(0, 0), (1, 64), (2, 16 * 128), (3, 16 * 128 + 64)] {
            self.0.tilestored(t, &mut bytes[offset..], 128);
        }
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::pack::bf16_bits;

    #[test]
    fn lane_follows_the_documented_order_and_flushes_subnormals() {
        let p = |lo: f32, hi: f32| bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16;
        assert_eq!(vdpbf16ps_lane(1.0, p(2.0, 3.0), p(5.0, 7.0)), 1.0 + 21.0 + 10.0);
        // Odd first: (1 + 2^24) is 2^24 in f32; then + 1 is lost again. Even first would give
        // 2^24 + 2 (1 + 1 = 2 exactly, then + 2^24).
        let big = 4096.0; // 4096^2 = 2^24
        assert_eq!(vdpbf16ps_lane(1.0, p(1.0, big), p(1.0, big)), 16_777_216.0);
        // A subnormal bf16 input counts as zero.
        let tiny = bf16_value(0x0001);
        assert!(tiny > 0.0);
        assert_eq!(vdpbf16ps_lane(0.0, p(tiny, 0.0), p(1e30, 0.0)), 0.0);
        // A subnormal result is flushed.
        let small = 2.0f32.powi(-70);
        assert_eq!(vdpbf16ps_lane(0.0, p(small, 0.0), p(small, 0.0)), 0.0);
    }
}
