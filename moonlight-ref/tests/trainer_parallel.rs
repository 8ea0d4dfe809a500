//! The data-parallel trainer on `ThreadGroup` ranks (threads of this process, no MPI needed):
//! 1, 2 and 4 ranks take the single process's per-step losses for the same global batch, with
//! Muon and AdamW, MLA and MHA; the optimizer state per rank is 1/N; a 4-rank checkpoint
//! resumes on 2 ranks and on 1; a rank that stops or fails alone stops the others with an
//! error instead of a hang.
//!
//! The bound. A rank's gradient is the mean over its own `B/N` rows, and the optimizer's
//! reduce-scatter averages the ranks' means: the same value as the single process's mean over
//! `B` rows, summed in another order, so the two differ by f32 rounding (a few ulps, about
//! 1e-7 relative). The forward of step 1 sees the same parameters, so its loss differs only
//! in how the ranks' mean losses add up (`LOSS_1`); later steps carry the rounding of every
//! update before them, which the training map can grow a little each step: over the short
//! runs here the losses agree to `LOSS_N` (measured: at most 2.4e-7 over 10 steps, half an
//! f32 ulp of a loss near 5.5, for every optimizer, attention and rank count: 40x below the
//! bound), while another batch moves them by more than 100x the bound (checked below, so the
//! comparison can fail). Not bit-exact: the model sums a gradient over its rows in one pass,
//! and no reduction order of the ranks' means reproduces that sum's rounding.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use moonlight_ref::checkpoint;
use moonlight_ref::config::{Attention, ModelConfig};
use moonlight_ref::data::BatchSampler;
use moonlight_ref::model::Model;
use moonlight_ref::train::{
    self, OptimizerChoice, RunResult, RunSettings, TrainError, TrainOptions, CHECKPOINT_FILE,
};
use muon_core::{DistributedOptimizer, HybridOptimizer};
use muon_faer::{Faer, ThreadGroup};

/// Step 1's loss: the same forward on the same parameters, means added in another order
/// (two f32 ulps of a loss near 5.5).
const LOSS_1: f64 = 1e-6;
/// Later steps' losses (see the header).
const LOSS_N: f64 = 1e-5;

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("muon-trainer-parallel-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `micro` model with `attention`.
fn micro(attention: Attention) -> ModelConfig {
    ModelConfig {
        attention,
        ..ModelConfig::micro()
    }
}

fn mla() -> Attention {
    Attention::Mla {
        kv_lora_rank: 16,
        qk_nope_head_dim: 16,
        qk_rope_head_dim: 8,
        v_head_dim: 16,
    }
}

fn options(optimizer: OptimizerChoice, attention: Attention, steps: u64) -> TrainOptions {
    let mut settings = RunSettings::new("micro", micro(attention), optimizer);
    settings.steps = steps;
    settings.batch = 8;
    settings.seq = 16;
    settings.lr = 1e-2;
    settings.warmup = 3;
    let mut opts = TrainOptions::new(settings);
    opts.eval_every = 5;
    opts.eval_batches = 2;
    opts
}

fn backend() -> Faer<f32> {
    Faer::with_threads(1)
}

/// Trains on `world` ThreadGroup ranks, `opts_for(rank)` each; every rank's result.
fn run_ranks(world: usize, opts_for: impl Fn(usize) -> TrainOptions) -> Vec<Result<RunResult, TrainError>> {
    let handles: Vec<_> = ThreadGroup::<f32>::new(world)
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let opts = opts_for(rank);
            std::thread::spawn(move || train::train_on(&backend(), &opts, group))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// `world` ranks on the same options; asserts every rank returned the same losses, to the bit.
fn run_same(world: usize, opts: &TrainOptions) -> RunResult {
    let results: Vec<RunResult> = run_ranks(world, |_| opts.clone())
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for (rank, r) in results.iter().enumerate() {
        assert_eq!(
            r.losses, results[0].losses,
            "rank {rank} of {world}: other losses"
        );
        assert_eq!(r.val_losses, results[0].val_losses, "rank {rank} of {world}");
    }
    results.into_iter().next().unwrap()
}

fn assert_close(what: &str, a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    let mut worst: f64 = 0.0;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.0, y.0, "{what}: step numbers");
        let d = (x.1 - y.1).abs();
        let bound = if i == 0 { LOSS_1 } else { LOSS_N };
        assert!(
            d <= bound,
            "{what}: step {} loss {} vs {} (off by {d:e}, bound {bound:e})",
            x.0,
            x.1,
            y.1
        );
        worst = worst.max(d);
    }
    worst
}

/// The old single-process loop, written out here independently of the trainer: a
/// `HybridOptimizer` on the whole batch. A group of one must take exactly its steps.
fn reference_losses(opts: &TrainOptions) -> Vec<f64> {
    let s = &opts.settings;
    let cpu = backend();
    let data = moonlight_ref::data::Dataset::load(&opts.data, s.seq, s.model.vocab_size).unwrap();
    let mut model = Model::new(&cpu, s.model.clone(), s.batch, s.seq, s.seed).unwrap();
    let specs = s.optimizer_specs(model.param_specs());
    let mut opt = HybridOptimizer::new(&cpu, specs, s.hybrid.clone()).unwrap();
    let mut sampler = BatchSampler::new(s.seed, s.batch, s.seq);
    let (mut x, mut y) = (vec![0; s.batch * s.seq], vec![0; s.batch * s.seq]);
    let schedule = s.schedule();
    (0..s.steps)
        .map(|step| {
            sampler.next_batch(&data.train, &mut x, &mut y);
            let loss = model.forward(&cpu, &x, &y).unwrap();
            model.backward(&cpu).unwrap();
            let (params, grads) = model.params_and_grads();
            opt.step(&cpu, params, grads, schedule.lr(s.lr, step)).unwrap();
            model.update_router_bias(&cpu).unwrap();
            loss
        })
        .collect()
}

#[test]
fn one_two_and_four_ranks_take_the_single_process_losses() {
    for optimizer in [OptimizerChoice::Muon, OptimizerChoice::AdamW] {
        for attention in [mla(), Attention::Mha] {
            let what = format!("{optimizer}, {attention:?}");
            let opts = options(optimizer, attention, 10);
            let single = train::train(&backend(), &opts).unwrap();
            // The loop on a group of one is the single-process loop, to the bit.
            let reference = reference_losses(&opts);
            let losses: Vec<f64> = single.losses.iter().map(|p| p.1).collect();
            assert_eq!(losses, reference, "{what}: a group of one is not the old loop");
            assert_eq!(run_same(1, &opts).losses, single.losses, "{what}: 1 rank");
            for world in [2, 4] {
                let run = run_same(world, &opts);
                let worst = assert_close(&format!("{what}, {world} ranks"), &run.losses, &single.losses);
                assert_close(
                    &format!("{what}, {world} ranks, val"),
                    &run.val_losses,
                    &single.val_losses,
                );
                println!("{what}, {world} ranks: largest loss difference {worst:e}");
            }
        }
    }
    // The comparison can fail: another batch (another seed) moves the losses far beyond it.
    let opts = options(OptimizerChoice::Muon, mla(), 3);
    let mut other = opts.clone();
    other.settings.seed += 1;
    let (a, b) = (
        train::train(&backend(), &opts).unwrap(),
        train::train(&backend(), &other).unwrap(),
    );
    let d = (a.losses[2].1 - b.losses[2].1).abs();
    assert!(
        d > 100.0 * LOSS_N,
        "another batch moved step 3's loss by {d:e} only"
    );
}

#[test]
fn each_rank_holds_a_quarter_of_the_optimizer_state() {
    for optimizer in [OptimizerChoice::Muon, OptimizerChoice::AdamW] {
        let s = options(optimizer, mla(), 1).settings;
        let cpu = backend();
        let model = Model::new(&cpu, s.model.clone(), 2, s.seq, s.seed).unwrap();
        let specs = s.optimizer_specs(model.param_specs());
        let whole = DistributedOptimizer::new(
            &cpu,
            ThreadGroup::<f32>::new(1).pop().unwrap(),
            specs.clone(),
            s.hybrid.clone(),
        )
        .unwrap()
        .state_len();
        for world in [2, 4] {
            let ranks: Vec<usize> = ThreadGroup::<f32>::new(world)
                .into_iter()
                .map(|g| {
                    DistributedOptimizer::new(&cpu, g, specs.clone(), s.hybrid.clone())
                        .unwrap()
                        .state_len()
                })
                .collect();
            // Every rank holds the same padded share: ceil(len / world) per buffer, so at most
            // one element per buffer more than whole / world.
            let buffers: usize = specs
                .iter()
                .map(|p| {
                    if p.optimizer() == muon_core::OptimizerKind::Muon {
                        1
                    } else {
                        2
                    }
                })
                .sum();
            for (rank, &n) in ranks.iter().enumerate() {
                assert_eq!(n, ranks[0], "{optimizer}: rank {rank} of {world}");
                assert!(
                    n * world >= whole && n * world < whole + world * buffers,
                    "{optimizer}: {n} x {world} vs {whole}"
                );
            }
            println!(
                "{optimizer}: {world} ranks hold {} of {whole} state elements each",
                ranks[0]
            );
        }
    }
}

#[test]
fn a_four_rank_checkpoint_resumes_on_four_two_and_one() {
    let dir = scratch("resume");
    let steps = 10;
    let opts = options(OptimizerChoice::Muon, mla(), steps);
    let whole = run_same(4, &opts);

    let mut first = opts.clone();
    first.out = Some(dir.join("four"));
    first.stop_at = Some(4);
    let part1 = run_same(4, &first);
    assert_eq!(part1.losses, whole.losses[..4]);
    // Rank 0 wrote the whole state: every buffer of every parameter at full length.
    let path = dir.join("four").join(CHECKPOINT_FILE);
    let ckpt = checkpoint::load(&path).unwrap();
    for p in &ckpt.optimizer.params {
        for b in &p.buffers {
            assert_eq!(
                b.len(),
                p.shape.len(),
                "`{}`: a shard, not the whole state",
                p.name
            );
        }
    }
    let log = moonlight_ref::log::read_log(&dir.join("four").join(train::LOG_FILE)).unwrap();
    let logged = log
        .iter()
        .filter(|r| matches!(r, moonlight_ref::log::Record::Step(_)))
        .count();
    assert_eq!(logged, 4, "rank 0 alone logs each step once");

    for world in [4, 2, 1] {
        let mut second = opts.clone();
        second.resume = Some(path.clone());
        let part2 = run_same(world, &second);
        assert_eq!(
            part2.losses.first().unwrap().0,
            5,
            "{world} ranks resume at step 5"
        );
        let resumed: Vec<(u64, f64)> = part1.losses.iter().chain(&part2.losses).copied().collect();
        if world == 4 {
            assert_eq!(resumed, whole.losses, "resumed on 4 ranks: not step for step");
        } else {
            // The same steps on another rank count: the rounding bound.
            assert_close(&format!("resumed on {world}"), &resumed[4..], &whole.losses[4..]);
        }
    }
}

#[test]
fn a_batch_that_does_not_divide_by_the_ranks_is_refused() {
    let mut opts = options(OptimizerChoice::AdamW, mla(), 4);
    opts.settings.batch = 6;
    for r in run_ranks(4, |_| opts.clone()) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("--batch 6 does not divide by the 4 ranks"), "{e}");
    }
}

#[test]
fn a_rank_that_fails_to_start_stops_the_others() {
    let dir = scratch("blocked");
    // Rank 0's output directory is a file: it cannot start; rank 1 must not wait for it.
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, "x").unwrap();
    let mut opts = options(OptimizerChoice::AdamW, mla(), 3);
    opts.out = Some(blocked);
    let results = run_ranks(2, |_| opts.clone());
    let e0 = results[0].as_ref().unwrap_err().to_string();
    assert!(e0.contains("cannot create the output directory"), "rank 0: {e0}");
    let e1 = results[1].as_ref().unwrap_err().to_string();
    assert!(e1.contains("rank 0 of 2 failed to start the run"), "rank 1: {e1}");
}

#[test]
fn a_rank_that_stops_early_makes_the_others_fail_not_hang() {
    let opts = options(OptimizerChoice::Muon, mla(), 6);
    let results = run_ranks(2, |rank| {
        let mut o = opts.clone();
        if rank == 1 {
            o.stop_at = Some(2); // rank 1 returns after step 2 and leaves the group
        }
        o
    });
    assert!(results[1].is_ok());
    let e = results[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("collective"), "rank 0: {e}");
}

#[test]
fn a_stop_asked_of_one_rank_stops_every_rank_at_the_same_step() {
    let opts = options(OptimizerChoice::AdamW, mla(), 6);
    let results = run_ranks(2, |rank| {
        let mut o = opts.clone();
        o.interrupt = Some(Arc::new(AtomicBool::new(rank == 1)));
        o
    });
    for (rank, r) in results.iter().enumerate() {
        match r {
            Err(TrainError::Interrupted { step: 1, .. }) => {}
            other => panic!("rank {rank}: {:?}", other.as_ref().map(|r| &r.losses)),
        }
    }
}
