//! Diagnostics a trainer logs beyond the optimizer's own (which reports gradient norms and
//! update RMS): the normalized SVD entropy the Moonlight report compares between optimizers.

/// Normalized SVD entropy of a matrix with singular values `s` (docs/DESIGN.md §5):
/// `p_i = s_i^2 / sum_j s_j^2`, `H = -sum_i p_i ln p_i / ln(n)`. It is 1 for a flat spectrum
/// (all directions used equally) and 0 for rank one. Returns `None` for fewer than two values,
/// an all-zero spectrum, or a negative or non-finite value.
///
/// ```
/// use muon_core::svd_entropy;
/// assert!((svd_entropy(&[2.0, 2.0, 2.0]).unwrap() - 1.0).abs() < 1e-12);
/// assert_eq!(svd_entropy(&[3.0, 0.0]), Some(0.0));
/// ```
pub fn svd_entropy(s: &[f64]) -> Option<f64> {
    if s.len() < 2 || s.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return None;
    }
    let total: f64 = s.iter().map(|v| v * v).sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let h: f64 = s
        .iter()
        .map(|v| v * v / total)
        .filter(|p| *p > 0.0)
        .map(|p| -p * libm::log(p))
        .sum();
    Some(h / libm::log(s.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::svd_entropy;

    #[test]
    fn entropy_of_a_two_value_spectrum_by_hand() {
        // s = (1, 2): p = (0.2, 0.8), H = -(0.2 ln 0.2 + 0.8 ln 0.8) / ln 2 = 0.7219280948873623.
        let h = svd_entropy(&[1.0, 2.0]).unwrap();
        assert!((h - 0.721_928_094_887_362_3).abs() < 1e-15, "{h}");
    }

    #[test]
    fn degenerate_spectra_have_no_entropy() {
        assert_eq!(svd_entropy(&[1.0]), None);
        assert_eq!(svd_entropy(&[0.0, 0.0]), None);
        assert_eq!(svd_entropy(&[1.0, f64::NAN]), None);
        assert_eq!(svd_entropy(&[1.0, -1.0]), None);
    }
}
