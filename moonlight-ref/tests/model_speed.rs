//! Forward + backward throughput of the model on `Faer<f32>` (no optimizer).
//!
//! `cargo test --release -p moonlight-ref --test model_speed -- --ignored --nocapture`
//! prints tokens/s and the split between forward and backward for `tiny` (batch 16 x 64) and
//! `small` (batch 8 x 256).

use std::time::Instant;

use moonlight_ref::config::ModelConfig;
use moonlight_ref::model::Model;
use muon_faer::Faer;

fn measure(preset: &str, batch: usize, seq: usize, steps: usize) {
    let b = Faer::<f32>::new();
    let cfg = ModelConfig::preset(preset).unwrap();
    let mut model = Model::new(&b, cfg.clone(), batch, seq, 1).unwrap();
    let n = batch * seq;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 31 + 5) % cfg.vocab_size) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|i| ((i * 17 + 3) % cfg.vocab_size) as u32).collect();
    // Warm-up (first touches of every buffer, faer's packing buffers).
    model.forward(&b, &tokens, &targets).unwrap();
    model.backward(&b).unwrap();
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for _ in 0..steps {
        let t0 = Instant::now();
        let loss = model.forward(&b, &tokens, &targets).unwrap();
        let t1 = Instant::now();
        model.backward(&b).unwrap();
        let t2 = Instant::now();
        assert!(loss.is_finite());
        fwd += (t1 - t0).as_secs_f64();
        bwd += (t2 - t1).as_secs_f64();
    }
    let per_step = (fwd + bwd) / steps as f64;
    println!(
        "{preset} B={batch} T={seq} on {} threads: {:.0} tokens/s forward+backward ({:.1} ms/step: forward {:.1}, backward {:.1})",
        b.threads(),
        n as f64 / per_step,
        per_step * 1e3,
        fwd / steps as f64 * 1e3,
        bwd / steps as f64 * 1e3
    );
}

#[test]
#[ignore = "timing, not a check: run with --release -- --ignored --nocapture"]
fn model_throughput() {
    measure("tiny", 16, 64, 10);
    measure("small", 8, 256, 3);
    // Inside rayon's pool (as the allocation test runs): no hand-over per parallel loop.
    rayon::scope(|_| {
        print!("inside rayon::scope: ");
        measure("tiny", 16, 64, 10);
        print!("inside rayon::scope: ");
        measure("small", 8, 256, 3);
    });
}
