//! moonlight-ref's training loop end to end on a shrunken `tiny`: the loss falls, a resumed
//! run equals an uninterrupted one exactly, and bad input ends in clear errors.

use std::path::PathBuf;

use moonlight_ref::checkpoint;
use moonlight_ref::config::{Attention, ModelConfig};
use moonlight_ref::train::{self, OptimizerChoice, RunSettings, TrainError, TrainOptions, CHECKPOINT_FILE};
use muon_faer::Faer;

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("muon-trainer-train-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(optimizer: OptimizerChoice, steps: u64) -> TrainOptions {
    let mut settings = RunSettings::new("micro", ModelConfig::micro(), optimizer);
    settings.steps = steps;
    settings.batch = 4;
    settings.seq = 16;
    settings.lr = 1e-2;
    settings.warmup = 3;
    let mut opts = TrainOptions::new(settings);
    opts.eval_every = 0;
    opts.eval_batches = 2;
    opts
}

fn backend() -> Faer<f32> {
    Faer::with_threads(2)
}

#[test]
fn loss_falls_with_muon_and_with_adamw() {
    for optimizer in [OptimizerChoice::Muon, OptimizerChoice::AdamW] {
        let run = train::train(&backend(), &options(optimizer, 40)).unwrap();
        let first = run.losses[0].1;
        let last: f64 = run.losses[35..].iter().map(|p| p.1).sum::<f64>() / 5.0;
        // Uniform over 256 bytes is ln 256 = 5.55 nats; the byte frequencies alone are worth
        // more than a nat, which 40 steps find.
        assert!(
            (first - 256f64.ln()).abs() < 0.5,
            "{optimizer}: first loss {first}"
        );
        assert!(last < first - 1.0, "{optimizer}: loss {first} -> {last}");
        let val = run.summary.final_val_loss.unwrap();
        assert!(val < first - 1.0, "{optimizer}: val loss {val}");
        assert!(run.summary.optimizer_share > 0.0 && run.summary.optimizer_share < 1.0);
        // Normalized SVD entropies lie in (0, 1]; every config here has hidden matrices and
        // a router.
        for h in [run.summary.svd_entropy_hidden, run.summary.svd_entropy_router] {
            let h = h.unwrap();
            assert!(h > 0.0 && h <= 1.0 + 1e-12, "{optimizer}: SVD entropy {h}");
        }
    }
}

#[test]
fn resumed_run_equals_uninterrupted_step_for_step() {
    let dir = scratch("resume");
    let steps = 12;
    let whole = train::train(&backend(), &options(OptimizerChoice::Muon, steps)).unwrap();

    let mut first = options(OptimizerChoice::Muon, steps);
    first.out = Some(dir.clone());
    first.stop_at = Some(5);
    let part1 = train::train(&backend(), &first).unwrap();
    assert_eq!(part1.losses.len(), 5);

    let mut second = options(OptimizerChoice::Muon, steps);
    second.out = Some(dir.clone());
    second.resume = Some(dir.join(CHECKPOINT_FILE));
    let part2 = train::train(&backend(), &second).unwrap();
    assert_eq!(part2.losses.first().unwrap().0, 6);

    let resumed: Vec<(u64, f64)> = part1.losses.iter().chain(&part2.losses).copied().collect();
    assert_eq!(resumed, whole.losses, "losses of the resumed run differ");
    assert_eq!(part2.val_losses.last(), whole.val_losses.last());

    // The log holds every step once, across the two processes.
    let log = moonlight_ref::log::read_log(&dir.join(train::LOG_FILE)).unwrap();
    let steps_logged = log
        .iter()
        .filter(|r| matches!(r, moonlight_ref::log::Record::Step(_)))
        .count();
    assert_eq!(steps_logged, 12);
}

#[test]
fn a_checkpoint_from_before_a_new_setting_still_resumes() {
    // A checkpoint written before `aux_loss_alpha` existed has no such key in its settings; the
    // setting takes its default (0, off) and the run resumes, step for step.
    let dir = scratch("older");
    let steps = 8;
    let whole = train::train(&backend(), &options(OptimizerChoice::Muon, steps)).unwrap();
    let mut first = options(OptimizerChoice::Muon, steps);
    first.out = Some(dir.clone());
    first.stop_at = Some(3);
    let part1 = train::train(&backend(), &first).unwrap();
    let path = dir.join(CHECKPOINT_FILE);
    let mut ckpt = checkpoint::load(&path).unwrap();
    for (key, pointer) in [("run", "/model"), ("config", "")] {
        let mut v: serde_json::Value = serde_json::from_str(&ckpt.metadata[key]).unwrap();
        let obj = v.pointer_mut(pointer).unwrap().as_object_mut().unwrap();
        assert!(obj.remove("aux_loss_alpha").is_some(), "{key} has aux_loss_alpha");
        ckpt.metadata.insert(key.into(), v.to_string());
    }
    // Nor `precision` (runs before it were f32, its default).
    let mut run: serde_json::Value = serde_json::from_str(&ckpt.metadata["run"]).unwrap();
    assert!(
        run.as_object_mut().unwrap().remove("precision").is_some(),
        "run has precision"
    );
    ckpt.metadata.insert("run".into(), run.to_string());
    checkpoint::save(&path, &ckpt).unwrap();
    let mut second = options(OptimizerChoice::Muon, steps);
    second.resume = Some(path);
    let part2 = train::train(&backend(), &second).unwrap();
    let resumed: Vec<(u64, f64)> = part1.losses.iter().chain(&part2.losses).copied().collect();
    assert_eq!(resumed, whole.losses);
}

#[test]
fn resume_refuses_a_checkpoint_of_another_run() {
    let dir = scratch("mismatch");
    let mut opts = options(OptimizerChoice::AdamW, 6);
    opts.out = Some(dir.clone());
    opts.stop_at = Some(2);
    train::train(&backend(), &opts).unwrap();
    let ckpt_path = dir.join(CHECKPOINT_FILE);

    let resume = |mutate: &dyn Fn(&mut TrainOptions)| {
        let mut o = options(OptimizerChoice::AdamW, 6);
        o.resume = Some(ckpt_path.clone());
        mutate(&mut o);
        match train::train(&backend(), &o) {
            Err(TrainError::Checkpoint(e)) => e.to_string(),
            other => panic!("expected a checkpoint error, got {:?}", other.map(|r| r.summary)),
        }
    };
    let err = resume(&|o| o.settings.lr = 2e-2);
    assert!(err.contains("lr (checkpoint 0.01, now 0.02)"), "{err}");
    let err = resume(&|o| o.settings.precision = muon_core::Precision::Bf16);
    assert!(err.contains("precision"), "{err}");
    let err = resume(&|o| o.settings.optimizer = OptimizerChoice::Muon);
    assert!(err.contains("optimizer"), "{err}");
    let err = resume(&|o| o.settings.model.expert_width = 16);
    assert!(
        err.contains("model.expert_width (checkpoint 32, now 16)"),
        "{err}"
    );
    let err = resume(&|o| {
        o.data = moonlight_ref::data::DataSource::File {
            path: write_text(&dir),
            format: None,
        };
    });
    assert!(err.contains("other data"), "{err}");

    // A checkpoint whose tensor has the wrong shape (same settings).
    let mut ckpt = checkpoint::load(&ckpt_path).unwrap();
    let p = &mut ckpt.params[1];
    p.shape = muon_core::Shape::matrix(p.shape.cols, p.shape.rows * p.shape.batch);
    let bad = dir.join("bad-shape.safetensors");
    checkpoint::save(&bad, &ckpt).unwrap();
    let mut o = options(OptimizerChoice::AdamW, 6);
    o.resume = Some(bad);
    let err = train::train(&backend(), &o).unwrap_err().to_string();
    assert!(err.contains("has shape"), "{err}");

    // A truncated one.
    let bytes = std::fs::read(&ckpt_path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut o = options(OptimizerChoice::AdamW, 6);
    o.resume = Some(cut);
    let err = train::train(&backend(), &o).unwrap_err().to_string();
    assert!(err.contains("corrupt checkpoint"), "{err}");
}

fn write_text(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("other.txt");
    std::fs::write(&path, "a different corpus, repeated. ".repeat(200)).unwrap();
    path
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = scratch("nan");
    let mut opts = options(OptimizerChoice::AdamW, 20);
    // AdamW moves every weight by about lr per step: at 1e30 the activations overflow.
    opts.settings.lr = 1e30;
    opts.settings.warmup = 0; // the full rate from the first step
    opts.out = Some(dir.clone());
    opts.checkpoint_every = 1;
    let err = train::train(&backend(), &opts).unwrap_err();
    let TrainError::NonFinite {
        step,
        ref last_checkpoint,
        ..
    } = err
    else {
        panic!("expected a non-finite error, got {err}");
    };
    let msg = err.to_string();
    assert!(msg.contains(&format!("at step {step}")), "{msg}");
    let (path, saved) = last_checkpoint.clone().expect("a checkpoint before the bad step");
    assert_eq!(saved, step - 1);
    let ckpt = checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.metadata["step"], (step - 1).to_string());
}

#[test]
fn impossible_configs_are_errors_not_panics() {
    type Mutation = Box<dyn Fn(&mut TrainOptions)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("top_k", Box::new(|o| o.settings.model.top_k = 5)),
        ("n_heads", Box::new(|o| o.settings.model.n_heads = 0)),
        ("max_seq_len", Box::new(|o| o.settings.seq = 64)),
        ("--warmup", Box::new(|o| o.settings.warmup = 50)),
        ("--lr", Box::new(|o| o.settings.lr = -1.0)),
        ("momentum", Box::new(|o| o.settings.hybrid.muon.momentum = 1.5)),
    ];
    for (what, mutate) in cases {
        let mut o = options(OptimizerChoice::Muon, 10);
        mutate(&mut o);
        let err = train::train(&backend(), &o).unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
}

#[test]
fn trains_on_a_bin_shard_and_with_either_attention() {
    let dir = scratch("bin");
    // The embedded corpus's first bytes as a token shard.
    let tokens: Vec<u16> = moonlight_ref::corpus::embedded_corpus()[..20_000]
        .iter()
        .map(|&b| b as u16)
        .collect();
    let shard = dir.join("corpus.bin");
    std::fs::write(&shard, moonlight_ref::data::encode_bin(&tokens)).unwrap();
    let mut opts = options(OptimizerChoice::Muon, 6);
    opts.data = moonlight_ref::data::DataSource::File {
        path: shard,
        format: None,
    };
    let run = train::train(&backend(), &opts).unwrap();
    assert_eq!(run.losses.len(), 6);

    // MHA instead of the preset's MLA, and back.
    let mha = train::with_attention(ModelConfig::micro(), false);
    assert_eq!(mha.attention, Attention::Mha);
    let mla = train::with_attention(mha.clone(), true);
    assert!(matches!(mla.attention, Attention::Mla { .. }));
    mla.validate().unwrap();
    let mut opts = options(OptimizerChoice::Muon, 6);
    opts.settings.model = mha;
    let run = train::train(&backend(), &opts).unwrap();
    assert!(run.losses.iter().all(|p| p.1.is_finite()));
}

#[test]
fn the_log_records_every_step_eval_and_summary() {
    use moonlight_ref::log::{read_log, Record};
    for optimizer in [OptimizerChoice::Muon, OptimizerChoice::AdamW] {
        let dir = scratch(&format!("log-{optimizer}"));
        let mut opts = options(optimizer, 4);
        opts.out = Some(dir.clone());
        opts.eval_every = 2;
        train::train(&backend(), &opts).unwrap();
        let log = read_log(&dir.join(train::LOG_FILE)).unwrap();
        let steps: Vec<_> = log
            .iter()
            .filter_map(|r| if let Record::Step(s) = r { Some(s) } else { None })
            .collect();
        let evals: Vec<_> = log
            .iter()
            .filter_map(|r| {
                if let Record::Eval(e) = r {
                    Some(e.step)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(steps.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(evals, [2, 4]);
        let Some(Record::Summary(summary)) = log.last() else {
            panic!("no summary last: {log:?}")
        };
        assert_eq!(summary.optimizer, optimizer.to_string());
        for s in steps {
            assert!(s.loss.is_finite() && s.grad_norm > 0.0 && s.lr > 0.0 && s.tokens_per_s > 0.0);
            // One MoE block in `micro`; a load ratio is at least 1 (max >= mean).
            assert_eq!(s.expert_load_max_over_mean.len(), 1);
            assert!(s.expert_load_max_over_mean[0] >= 1.0);
            assert!(s.update_rms_adamw.unwrap() > 0.0);
            match optimizer {
                // Moonlight's scale aims Muon's update RMS at 0.2 (the quintic lands a bit under).
                OptimizerChoice::Muon => assert!((0.1..0.3).contains(&s.update_rms_muon.unwrap()), "{s:?}"),
                OptimizerChoice::AdamW => assert_eq!(s.update_rms_muon, None),
            }
        }
    }
}

#[test]
fn the_sequence_balance_loss_trains_and_is_logged_apart() {
    // seq_aux on (alpha 0.01 so it is visible): the loss still falls, and every step logs the
    // balance loss. Bound: sum_i f_i P_i <= max_i f_i <= E / K (f_i is a share of the K
    // selections per token, times E / K; P is a distribution), so 0 < aux <= alpha E / K for
    // `micro`'s one MoE block; an off run logs none.
    use moonlight_ref::log::{read_log, Record};
    let dir = scratch("seq_aux");
    let (alpha, steps) = (0.01, 30);
    let mut opts = options(OptimizerChoice::Muon, steps);
    opts.settings.model.aux_loss_alpha = alpha;
    opts.out = Some(dir.clone());
    let run = train::train(&backend(), &opts).unwrap();
    let first = run.losses[..5].iter().map(|l| l.1).sum::<f64>() / 5.0;
    let last = run.losses[run.losses.len() - 5..]
        .iter()
        .map(|l| l.1)
        .sum::<f64>()
        / 5.0;
    assert!(last < first - 0.3, "loss {first:.3} -> {last:.3}");
    let bound = alpha * ModelConfig::micro().n_routed_experts as f64 / ModelConfig::micro().top_k as f64;
    let log = read_log(&dir.join(train::LOG_FILE)).unwrap();
    let mut seen = 0;
    for r in &log {
        if let Record::Step(s) = r {
            let aux = s.aux_loss.expect("aux_loss logged");
            assert!(aux > 0.0 && aux <= bound, "aux {aux} outside (0, {bound}]");
            seen += 1;
        }
    }
    assert_eq!(seen, steps);
    let mut off = options(OptimizerChoice::Muon, 4);
    off.out = Some(dir.join("off"));
    train::train(&backend(), &off).unwrap();
    let log = read_log(&dir.join("off").join(train::LOG_FILE)).unwrap();
    assert!(log
        .iter()
        .all(|r| !matches!(r, Record::Step(s) if s.aux_loss.is_some())));
}

#[test]
fn evaluations_do_not_change_the_training_steps() {
    let mut quiet = options(OptimizerChoice::Muon, 8);
    quiet.eval_every = 0;
    let mut busy = options(OptimizerChoice::Muon, 8);
    busy.eval_every = 1;
    let (a, b) = (
        train::train(&backend(), &quiet).unwrap(),
        train::train(&backend(), &busy).unwrap(),
    );
    assert_eq!(a.losses, b.losses);
    assert_eq!((a.val_losses.len(), b.val_losses.len()), (1, 8));
}
