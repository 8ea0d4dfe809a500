//! The element types the optimizer works in.

use core::fmt::Debug;
use core::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

/// A real floating-point element type: `f32` or `f64`.
///
/// The generic math never touches elements (they may live on a GPU); this trait exists for
/// host-side code such as the portable backend, state export and tests. `Pod` (any bit
/// pattern is a value, no padding) lets host buffers be viewed as bytes without a copy, for
/// checkpoints and transports: [`HostMatrix::as_bytes`](crate::HostMatrix::as_bytes), or
/// `bytemuck::cast_slice` on a `&[T]`.
pub trait Real:
    Copy
    + Debug
    + Default
    + PartialOrd
    + bytemuck::Pod
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// A short name for messages and file formats (`"f32"`, `"f64"`).
    const NAME: &'static str;

    /// Rounds an `f64` to this type.
    fn from_f64(x: f64) -> Self;
    /// Widens this value to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `true` unless NaN or infinite.
    fn is_finite(self) -> bool;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn sqrt(self) -> Self {
        libm::sqrtf(self)
    }
    #[inline]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn sqrt(self) -> Self {
        libm::sqrt(self)
    }
    #[inline]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}
