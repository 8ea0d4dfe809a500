//! The scaling law: `loss = a * C^-b` fitted by least squares in log space, the compute one
//! optimizer needs to reach another's loss, and a bootstrap confidence interval for that ratio.

use crate::rng::Rng;

/// `loss = a * C^-b` (C: training FLOPs).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PowerLaw {
    /// The loss at one FLOP.
    pub a: f64,
    /// The exponent: how fast the loss falls with compute (> 0 when it falls).
    pub b: f64,
}

impl PowerLaw {
    /// The fitted loss at `compute` FLOPs.
    pub fn loss(&self, compute: f64) -> f64 {
        self.a * compute.powf(-self.b)
    }

    /// The compute at which the fit reaches `loss`: `(a / loss)^(1/b)`; `None` when the fit
    /// does not fall with compute (`b <= 0`) or the result is not finite.
    pub fn compute_at(&self, loss: f64) -> Option<f64> {
        if !(self.b > 0.0 && loss > 0.0) {
            return None;
        }
        let c = (self.a / loss).powf(1.0 / self.b);
        c.is_finite().then_some(c)
    }
}

/// Fits `loss = a * C^-b` to `(C, loss)` points: the least-squares line `ln L = ln a - b ln C`.
/// Errors name the point that cannot be fitted (a non-positive or non-finite value), or say
/// that fewer than two distinct computes were given.
pub fn fit_power_law(points: &[(f64, f64)]) -> Result<PowerLaw, String> {
    if let Some((i, p)) = points
        .iter()
        .enumerate()
        .find(|(_, (c, l))| !(c.is_finite() && *c > 0.0 && l.is_finite() && *l > 0.0))
    {
        return Err(format!(
            "point {i} (C = {}, loss = {}) is not positive and finite: a power law cannot be fitted",
            p.0, p.1
        ));
    }
    if points.len() < 2 {
        return Err(format!(
            "a power law needs at least 2 points, got {}",
            points.len()
        ));
    }
    let n = points.len() as f64;
    let (xs, ys): (Vec<f64>, Vec<f64>) = points.iter().map(|(c, l)| (c.ln(), l.ln())).unzip();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    // Relative to the spread of ln C: all points at one compute leave the slope undefined.
    if sxx <= 1e-24 * n * (1.0 + mx * mx) {
        return Err("the points all have the same compute: the slope is undefined".into());
    }
    let slope = sxy / sxx;
    Ok(PowerLaw {
        a: (my - slope * mx).exp(),
        b: -slope,
    })
}

/// How much compute Muon needs for AdamW's loss: the ratio of the two fits' computes at
/// `loss` (0.5: Muon needs half AdamW's FLOPs).
pub fn flops_ratio(muon: &PowerLaw, adamw: &PowerLaw, loss: f64) -> Option<f64> {
    Some(muon.compute_at(loss)? / adamw.compute_at(loss)?)
}

/// The reference loss of the ratio: AdamW's fitted loss at the geometric mean of its computes
/// (the middle of the range it was measured over, in log space).
pub fn reference_loss(adamw: &PowerLaw, adamw_points: &[(f64, f64)]) -> f64 {
    let n = adamw_points.len().max(1) as f64;
    let mid = (adamw_points.iter().map(|p| p.0.ln()).sum::<f64>() / n).exp();
    adamw.loss(mid)
}

/// A ratio with its bootstrap percentile interval.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RatioInterval {
    /// The ratio from the fits to all points.
    pub estimate: f64,
    /// The lower bound of the interval.
    pub lo: f64,
    /// The upper bound.
    pub hi: f64,
    /// The confidence level (0.95).
    pub level: f64,
    /// Resamples whose fits gave a ratio (a resample of one compute only, or a fit that does
    /// not fall, gives none).
    pub resamples: usize,
}

/// Muon's FLOPs at AdamW's loss (at [`reference_loss`]) with a 95% percentile bootstrap
/// interval: each of `reps` resamples draws each optimizer's points with replacement, refits
/// both, and takes the ratio at the same reference loss. Deterministic for a `seed`.
pub fn bootstrap_ratio(
    muon: &[(f64, f64)],
    adamw: &[(f64, f64)],
    reps: usize,
    seed: u64,
) -> Result<RatioInterval, String> {
    let fit_m = fit_power_law(muon).map_err(|e| format!("Muon's fit: {e}"))?;
    let fit_a = fit_power_law(adamw).map_err(|e| format!("AdamW's fit: {e}"))?;
    let loss = reference_loss(&fit_a, adamw);
    let estimate = flops_ratio(&fit_m, &fit_a, loss).ok_or_else(|| {
        format!(
            "no ratio: a fit does not fall with compute (Muon b = {:.4}, AdamW b = {:.4})",
            fit_m.b, fit_a.b
        )
    })?;
    let mut rng = Rng::new(seed);
    let mut draw = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        (0..points.len())
            .map(|_| points[rng.below(points.len())])
            .collect()
    };
    let mut ratios = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (m, a) = (draw(muon), draw(adamw));
        if let (Ok(fm), Ok(fa)) = (fit_power_law(&m), fit_power_law(&a)) {
            if let Some(r) = flops_ratio(&fm, &fa, loss) {
                ratios.push(r);
            }
        }
    }
    if ratios.is_empty() {
        return Err(format!("none of {reps} bootstrap resamples gave a ratio"));
    }
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((q * (ratios.len() - 1) as f64).round() as usize).min(ratios.len() - 1)];
    Ok(RatioInterval {
        estimate,
        lo: at(0.025),
        hi: at(0.975),
        level: 0.95,
        resamples: ratios.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points of `a * C^-b` at computes 1e9 .. 1e12, each loss times `exp(noise * N(0,1))`.
    fn synthetic(a: f64, b: f64, noise: f64, seed: u64) -> Vec<(f64, f64)> {
        let mut rng = Rng::new(seed);
        (0..7)
            .map(|i| {
                let c = 1e9 * 10f64.powf(i as f64 * 0.5);
                (c, a * c.powf(-b) * (noise * rng.normal()).exp())
            })
            .collect()
    }

    #[test]
    fn an_exact_power_law_is_recovered() {
        // The report's AdamW fit: the log-space line through exact points is the law itself, to
        // rounding (ln and exp of values near 1e12: a few ulps).
        let fit = fit_power_law(&synthetic(2.608, 0.054, 0.0, 1)).unwrap();
        assert!((fit.a - 2.608).abs() < 1e-10, "{fit:?}");
        assert!((fit.b - 0.054).abs() < 1e-12, "{fit:?}");
        let c = fit.compute_at(fit.loss(3e10)).unwrap();
        assert!((c / 3e10 - 1.0).abs() < 1e-9, "{c}");
    }

    #[test]
    fn a_noisy_power_law_is_recovered_within_its_noise() {
        // 1% noise on 7 points over 3 decades: the slope's standard error is about
        // 0.01 / sqrt(sum (ln C - mean)^2) = 0.01 / 3.05 = 0.0033; 4 sigma is 0.013.
        let fit = fit_power_law(&synthetic(3.0, 0.1, 0.01, 7)).unwrap();
        assert!((fit.b - 0.1).abs() < 0.013, "{fit:?}");
        assert!(fit.b != 0.1, "noise must move the fit");
    }

    #[test]
    fn bad_points_are_refused_by_name() {
        assert!(fit_power_law(&[(1.0, 2.0)]).unwrap_err().contains("at least 2"));
        let e = fit_power_law(&[(1.0, 2.0), (0.0, 1.0)]).unwrap_err();
        assert!(e.contains("point 1"), "{e}");
        assert!(fit_power_law(&[(1.0, 2.0), (1.0, f64::NAN)]).is_err());
        let e = fit_power_law(&[(5.0, 2.0), (5.0, 1.0)]).unwrap_err();
        assert!(e.contains("same compute"), "{e}");
        // A loss that rises with compute has no compute for a lower loss.
        let rising = fit_power_law(&[(1.0, 1.0), (10.0, 2.0)]).unwrap();
        assert!(rising.b < 0.0 && rising.compute_at(0.5).is_none());
    }

    #[test]
    fn the_ratio_of_shifted_laws_is_the_shift() {
        // Muon reaching at C what AdamW reaches at C / r: a_m = a_a * r^b (same b). The ratio of
        // computes at any loss is r.
        let (a, b, r): (f64, f64, f64) = (2.608, 0.054, 0.52);
        let adamw = PowerLaw { a, b };
        let muon = PowerLaw { a: a * r.powf(b), b };
        for loss in [2.0, 1.5, 1.2] {
            let got = flops_ratio(&muon, &adamw, loss).unwrap();
            assert!((got - r).abs() < 1e-9, "{got}");
        }
    }

    #[test]
    fn the_bootstrap_interval_covers_the_true_ratio_and_collapses_without_noise() {
        let (a, b, r): (f64, f64, f64) = (3.0, 0.1, 0.5);
        let am = a * r.powf(b);
        // Noiseless: every resample of at least two computes fits the exact laws.
        let exact = bootstrap_ratio(&synthetic(am, b, 0.0, 1), &synthetic(a, b, 0.0, 2), 200, 3).unwrap();
        for v in [exact.estimate, exact.lo, exact.hi] {
            assert!((v - r).abs() < 1e-6, "{exact:?}");
        }
        // 1% noise: the interval is wide enough to cover 0.5 and narrow enough to tell it from
        // 1 (the law's computes at one loss move by noise / b = 10% per point).
        let noisy = bootstrap_ratio(&synthetic(am, b, 0.01, 4), &synthetic(a, b, 0.01, 5), 1000, 6).unwrap();
        assert!(noisy.lo < r && r < noisy.hi, "{noisy:?}");
        assert!(noisy.hi < 1.0 && noisy.hi - noisy.lo > 0.01, "{noisy:?}");
        assert!(noisy.resamples > 900, "{noisy:?}");
        // The same seed gives the same interval.
        let again = bootstrap_ratio(&synthetic(am, b, 0.01, 4), &synthetic(a, b, 0.01, 5), 1000, 6).unwrap();
        assert_eq!(noisy, again);
    }
}
