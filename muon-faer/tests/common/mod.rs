//! Shared helpers: a deterministic RNG, host transfers, and error bounds.
#![allow(dead_code)]

use muon_core::{Backend, Real, Shape};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng};

/// Deterministic test data.
pub struct Rng(SmallRng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SmallRng::seed_from_u64(seed))
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random_range(-1.0..1.0)
    }

    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// A matrix of `shape` on `backend` holding `data` (rounded to the element type).
pub fn upload<B: Backend>(backend: &B, shape: Shape, data: &[f64]) -> B::Matrix {
    let mut m = backend.zeros(shape).unwrap();
    let host: Vec<B::Elem> = data.iter().map(|&v| B::Elem::from_f64(v)).collect();
    backend.upload(&mut m, &host).unwrap();
    m
}

/// The elements of `m` downloaded through `backend`, widened to f64.
pub fn host<B: Backend>(backend: &B, m: &B::Matrix) -> Vec<f64> {
    let mut out = vec![B::Elem::ZERO; B::shape(m).len()];
    backend.download(m, &mut out).unwrap();
    out.iter().map(|v| v.to_f64()).collect()
}

/// Unit roundoff of the element type.
pub fn unit_roundoff<T: Real>() -> f64 {
    if T::NAME == "f32" {
        f32::EPSILON as f64 / 2.0
    } else {
        f64::EPSILON / 2.0
    }
}

/// Largest `|a - b| - bound` over elements; `<= 0` means every element is within its bound.
pub fn worst_excess(a: &[f64], b: &[f64], bound: &[f64]) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    assert_eq!(a.len(), bound.len());
    a.iter()
        .zip(b)
        .zip(bound)
        .map(|((x, y), t)| (x - y).abs() - t)
        .enumerate()
        .fold(
            (f64::MIN, 0),
            |(w, wi), (i, e)| if e > w { (e, i) } else { (w, wi) },
        )
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
