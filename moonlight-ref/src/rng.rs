//! The one random number generator of the crate: SplitMix64 (Steele, Lea, Flood 2014), for the
//! initial weights, the data order and the embedded corpus.
//!
//! Its whole uniform state is one `u64`, so a checkpoint saves the data sampler's position
//! exactly. Normals come from Box-Muller, both numbers of each pair used: the second waits in
//! `spare` for the next call.

/// SplitMix64, with uniform, integer and normal draws.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rng {
    state: u64,
    /// The second normal of the last Box-Muller pair, not handed out yet.
    spare: Option<f64>,
}

impl Rng {
    /// A generator seeded with `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            spare: None,
        }
    }

    /// The uniform stream's state: `Rng::new(state)` continues exactly here, as long as no
    /// normal is pending (the data sampler draws none).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift (bias below `n / 2^64`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// A uniformly chosen element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * sin);
        r * cos
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn the_first_outputs_are_splitmix64s() {
        // The published SplitMix64 sequence for seed 0 (as in Vigna's reference C code).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn the_state_resumes_the_uniform_stream() {
        let mut a = Rng::new(42);
        for _ in 0..5 {
            a.below(10);
        }
        let mut b = Rng::new(a.state());
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn uniform_integers_cover_their_range_evenly() {
        let mut r = Rng::new(3);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[r.below(7)] += 1;
        }
        // Each count is binomial(70000, 1/7): mean 10000, sd ~93; 6 sd is far out.
        assert!(counts.iter().all(|&c| c.abs_diff(10_000) < 560), "{counts:?}");
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = Rng::new(123);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        // Standard errors: 1/sqrt(n) = 2.2e-3 for the mean, sqrt(2/n) = 3.2e-3 for the variance.
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.015,
            "mean {mean}, variance {var}"
        );
        let mut again = Rng::new(123);
        assert!(xs.iter().take(100).all(|&x| x == again.normal()));
    }
}
