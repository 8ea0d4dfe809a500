//! The same seed gives the same bits whatever the thread count: a run on 1, 2 and 3 threads
//! (muon-faer's team for the optimizer, rayon's pool for the model's ops, as the binary runs
//! them) takes the same losses and ends with the same parameters, bit for bit. So a checkpoint
//! resumes exactly on a machine with another core count.

use moonlight_ref::config::{Attention, ModelConfig};
use moonlight_ref::model::Model;
use moonlight_ref::train::{self, OptimizerChoice, RunSettings, TrainOptions};
use muon_core::{Backend, Portable, Precision};
use muon_faer::Faer;

/// Forward and backward of `config` in f64 on the portable backend inside a rayon pool of
/// `threads`: the loss and every gradient, as bits. f64 shows any change in the order of a
/// sum, which f32's rounding can hide.
fn gradients(config: &ModelConfig, (batch, seq): (usize, usize), threads: usize) -> Vec<u64> {
    let b = Portable::<f64>::new();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut model = Model::new(&b, config.clone(), batch, seq, 5).unwrap();
        let tokens: Vec<u32> = (0..batch * seq).map(|i| (i * 37 % 251) as u32).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|i| (i * 11 % 253) as u32).collect();
        let loss = model.forward(&b, &tokens, &targets).unwrap();
        model.backward(&b).unwrap();
        let mut out = vec![loss.to_bits()];
        for g in model.grads() {
            let mut host = vec![0.0; Portable::<f64>::shape(g).len()];
            b.download(g, &mut host).unwrap();
            out.extend(host.iter().map(|v| v.to_bits()));
        }
        out
    })
}

#[test]
fn the_models_gradients_do_not_depend_on_the_thread_count() {
    let mha = ModelConfig {
        attention: Attention::Mha,
        aux_loss_alpha: 0.01,
        ..ModelConfig::tiny()
    };
    // Odd token counts leave experts with odd row counts, where a split that followed the
    // thread count would cut different blocks.
    for (what, config) in [("mla", ModelConfig::tiny()), ("mha+aux", mha)] {
        for size in [(8, 32), (3, 23), (5, 17), (7, 29)] {
            let one = gradients(&config, size, 1);
            for threads in [2, 3] {
                let other = gradients(&config, size, threads);
                let differing = one.iter().zip(&other).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differing, 0,
                    "{what} {size:?}: {differing} values differ at 1 and {threads} threads"
                );
            }
        }
    }
}

/// A short `tiny` run, as the binary runs it, with `threads` threads.
fn run(optimizer: OptimizerChoice, precision: Precision, threads: usize) -> (Vec<u64>, Vec<u32>) {
    let mut settings = RunSettings::new("tiny", ModelConfig::tiny(), optimizer);
    settings.steps = 4;
    settings.warmup = 2;
    settings.batch = 8;
    settings.seq = 64;
    settings.precision = precision;
    let dir = std::env::temp_dir().join(format!(
        "moonlight-threads-{}-{optimizer}-{precision}-{threads}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = TrainOptions::new(settings);
    opts.eval_every = 3;
    opts.eval_batches = 2;
    opts.out = Some(dir.clone());
    let backend = Faer::<f32>::with_threads(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let result = pool.install(|| train::train(&backend, &opts)).unwrap();
    let ckpt = moonlight_ref::checkpoint::load(&dir.join(train::CHECKPOINT_FILE)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let losses = result
        .losses
        .iter()
        .chain(&result.val_losses)
        .map(|(_, l)| l.to_bits())
        .collect();
    let params = ckpt
        .params
        .iter()
        .chain(&ckpt.buffers)
        .flat_map(|t| t.data.iter().map(|v| v.to_bits()))
        .collect();
    (losses, params)
}

#[test]
fn a_run_on_one_or_three_threads_takes_the_same_steps() {
    for optimizer in [OptimizerChoice::Muon, OptimizerChoice::AdamW] {
        for precision in [Precision::F32, Precision::Bf16] {
            let one = run(optimizer, precision, 1);
            for threads in [2, 3] {
                let other = run(optimizer, precision, threads);
                assert!(
                    one.0 == other.0,
                    "{optimizer} {precision}: losses differ at 1 and {threads} threads: {:?} vs {:?}",
                    one.0.iter().map(|b| f64::from_bits(*b)).collect::<Vec<_>>(),
                    other.0.iter().map(|b| f64::from_bits(*b)).collect::<Vec<_>>()
                );
                let differing = one.1.iter().zip(&other.1).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differing, 0,
                    "{optimizer} {precision}: {differing} parameter values differ at 1 and {threads} threads"
                );
            }
        }
    }
}
