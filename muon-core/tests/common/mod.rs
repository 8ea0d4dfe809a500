//! Shared helpers for muon-core's tests: a deterministic RNG and matrix builders.
#![allow(dead_code)]

use nalgebra::DMatrix;

/// splitmix64: tiny, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }
    pub fn gaussian(&mut self, rows: usize, cols: usize) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |_, _| self.normal())
    }
    /// A `rows x cols` matrix `U diag(s) V^T` with random orthonormal `U`, `V` and the given
    /// singular values (`s.len() == min(rows, cols)`).
    pub fn with_spectrum(&mut self, rows: usize, cols: usize, s: &[f64]) -> DMatrix<f64> {
        let k = rows.min(cols);
        assert_eq!(s.len(), k);
        let u = self.gaussian(rows, k).qr().q();
        let v = self.gaussian(cols, k).qr().q();
        &u * DMatrix::from_diagonal(&nalgebra::DVector::from_column_slice(s)) * v.transpose()
    }
}

/// Row-major elements of a nalgebra matrix.
pub fn row_major(m: &DMatrix<f64>) -> Vec<f64> {
    m.transpose().iter().copied().collect()
}

/// A nalgebra matrix from row-major elements.
pub fn from_row_major(rows: usize, cols: usize, data: &[f64]) -> DMatrix<f64> {
    DMatrix::from_row_slice(rows, cols, data)
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
