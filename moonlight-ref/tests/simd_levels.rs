//! The host ops' loops run compiled for the widest vectors the CPU has (`cpu::vectorized`),
//! and that must not change a bit: the loss and every gradient of a forward and backward come
//! out the same at each level the CPU runs as at the baseline build's. (Its own process: the
//! level is global, and other tests would run at whichever level this one set.)

use moonlight_ref::config::ModelConfig;
use moonlight_ref::cpu::{set_simd_level, simd_level, SimdLevel};
use moonlight_ref::model::Model;
use muon_core::Precision;
use muon_faer::Faer;
use muon_test_support::skip;

/// The loss and the gradients' bits after one forward and backward of `tiny` (MLA attention,
/// a dense block and MoE blocks, so every op the levels touch runs) on fixed tokens.
fn pass(b: &Faer<f32>) -> (u64, Vec<u32>) {
    let (batch, seq) = (2, 24);
    let cfg = ModelConfig::tiny();
    let mut model = Model::new(b, cfg.clone(), batch, seq, 7).unwrap();
    let tokens: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 37 % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 11 % cfg.vocab_size) as u32)
        .collect();
    let loss = model.forward(b, &tokens, &targets).unwrap();
    model.backward(b).unwrap();
    let grads = model
        .grads()
        .iter()
        .flat_map(|g| g.as_slice().iter().map(|v| v.to_bits()))
        .collect();
    (loss.to_bits(), grads)
}

#[test]
fn every_simd_level_gives_the_baseline_bits() {
    let widest = simd_level();
    for precision in [Precision::F32, Precision::Bf16] {
        // bf16 runs as f32 on a CPU without a bf16 unit: compared all the same.
        let b = Faer::<f32>::with_threads(2).with_precision(precision);
        set_simd_level(SimdLevel::Baseline).unwrap();
        let (loss, grads) = pass(&b);
        assert!(f64::from_bits(loss).is_finite());
        for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
            if set_simd_level(level).is_err() {
                skip(format!("{level:?}: this CPU lacks it, not compared"));
                continue;
            }
            let (l, g) = pass(&b);
            assert_eq!(l, loss, "{precision} loss at {level:?}");
            let differ = g.iter().zip(&grads).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ, 0,
                "{precision}: {differ} gradient values differ at {level:?}"
            );
            eprintln!(
                "{precision} at {level:?}: loss and {} gradient values equal the baseline's",
                g.len()
            );
        }
    }
    set_simd_level(widest).unwrap();
}
