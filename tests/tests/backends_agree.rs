//! The whole stack on two backends: moonlight-ref's model, trained by muon-core's hybrid
//! optimizer (Muon on the hidden matrices and expert stacks, AdamW on the rest), takes the
//! same steps on muon-core's portable backend (naive loops) and on muon-faer (faer's kernels,
//! its own Newton-Schulz, several threads), in f64.

use moonlight_ref::config::ModelConfig;
use moonlight_ref::corpus::embedded_corpus;
use moonlight_ref::data::BatchSampler;
use moonlight_ref::model::Model;
use moonlight_ref::ops::ModelOps;
use muon_core::{HybridConfig, HybridOptimizer, LrSchedule, Portable};
use muon_faer::Faer;

/// Six training steps; returns the losses and the final parameters.
fn train<B: ModelOps<Elem = f64>>(backend: &B) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (batch, seq, steps) = (4, 16, 6);
    let data: Vec<u16> = embedded_corpus()[..20_000].iter().map(|&b| b as u16).collect();
    let mut model = Model::new(backend, ModelConfig::micro(), batch, seq, 7).unwrap();
    let mut optimizer = HybridOptimizer::new(backend, model.param_specs(), HybridConfig::default()).unwrap();
    let mut sampler = BatchSampler::new(3, batch, seq);
    let schedule = LrSchedule::moonlight(2, steps);
    let (mut tokens, mut targets) = (vec![0; batch * seq], vec![0; batch * seq]);
    let mut losses = Vec::new();
    for step in 0..steps {
        sampler.next_batch(&data, &mut tokens, &mut targets);
        losses.push(model.forward(backend, &tokens, &targets).unwrap());
        model.backward(backend).unwrap();
        let (params, grads) = model.params_and_grads();
        optimizer
            .step(backend, params, grads, schedule.lr(1e-2, step))
            .unwrap();
        model.update_router_bias(backend).unwrap();
    }
    let params = model
        .params()
        .iter()
        .map(|p| {
            let mut host = vec![0.0; B::shape(p).len()];
            backend.download(p, &mut host).unwrap();
            host
        })
        .collect();
    (losses, params)
}

#[test]
fn portable_and_faer_take_the_same_training_steps() {
    let (portable_losses, portable_params) = train(&Portable::<f64>::new());
    for threads in [1, 3] {
        let (losses, params) = train(&Faer::<f64>::with_threads(threads));
        for (step, (a, b)) in portable_losses.iter().zip(&losses).enumerate() {
            // Both backends round each product differently (summation order), by ~1e-16
            // relative; six steps of Newton-Schulz and AdamW keep that far below 1e-12 (measured: 3e-16). A
            // wrong kernel on either side (a transpose, a missing term) moves the loss by
            // 1e-3 or more.
            assert!(
                (a - b).abs() <= 1e-12 * a.abs(),
                "threads {threads}, step {step}: {a} vs {b}"
            );
        }
        let worst = portable_params
            .iter()
            .flatten()
            .zip(params.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        eprintln!("threads {threads}: worst parameter difference {worst:e}");
        // Parameters are O(0.02-1); the same argument bounds their difference.
        assert!(
            worst <= 1e-12,
            "threads {threads}: parameters differ by {worst:e}"
        );
    }
}
