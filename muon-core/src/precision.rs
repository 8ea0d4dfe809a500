//! The arithmetic of a backend's matrix products, one word for every backend.

use core::fmt;

/// The arithmetic of a backend's GEMMs (the Newton-Schulz products, and a model's products
/// where the backend runs one). Elementwise work, reductions, momentum, weights and optimizer
/// state stay in the element type whatever the precision (docs/DESIGN.md §8): Newton-Schulz is
/// stable in reduced precision by design, and its inputs may be cast down.
///
/// A backend documents which precisions it runs and what it does with the others (a CPU has no
/// TF32 units, for example).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Precision {
    /// IEEE `f32` products with `f32` accumulation (on a GPU: `CUBLAS_COMPUTE_32F`, no
    /// tensor-core shortcut).
    #[default]
    F32,
    /// TF32 tensor cores: inputs rounded to a 10-bit mantissa, `f32` accumulation
    /// (`CUBLAS_COMPUTE_32F_FAST_TF32`). A GPU format: compute capability 8.0 or newer.
    Tf32,
    /// bf16 inputs (8-bit mantissa, rounded to nearest even), `f32` accumulation and `f32`
    /// output: tensor cores on a GPU; AMX-BF16 or AVX512-BF16 on a CPU.
    Bf16,
}

impl Precision {
    /// Every precision, in the order benchmarks report them.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    /// A short name for reports and command lines: `"f32"`, `"tf32"`, `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The precision called `name` (as [`name`](Self::name) spells it), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(Precision::from_name(p.name()), Some(p));
        }
        assert_eq!(Precision::from_name("fp8"), None);
    }
}
