//! `moonlight-ref sample`, `eval`, `export` and `import` end to end, on a tiny model trained
//! for a few steps: sampling is deterministic for a seed, eval on the validation split gives
//! the trainer's validation loss, the HF round trip keeps the model, and bad input gets a
//! clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

/// Standard output of a run that must succeed (bytes: sampled text need not be UTF-8).
fn ok_bytes(args: &[&str]) -> Vec<u8> {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ok(args: &[&str]) -> String {
    String::from_utf8(ok_bytes(args)).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

const SEQ: usize = 32;

/// A tiny run on a text file of `10 * (SEQ + 1)` bytes, so that its held-out split is exactly
/// the last `SEQ + 1` bytes: one window, which every validation batch repeats.
struct Run {
    dir: PathBuf,
    checkpoint: PathBuf,
    val_file: PathBuf,
    val_loss: f64,
}

fn trained() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("moonlight-infer-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text: Vec<u8> = moonlight_ref::corpus::embedded_corpus()
            .into_iter()
            .take(10 * (SEQ + 1))
            .collect();
        let data = dir.join("data.txt");
        std::fs::write(&data, &text).unwrap();
        let val_file = dir.join("val.txt");
        std::fs::write(&val_file, &text[text.len() - (SEQ + 1)..]).unwrap();
        let out = dir.join("run");
        let seq = SEQ.to_string();
        ok(&[
            "train",
            "--steps",
            "6",
            "--batch",
            "2",
            "--seq",
            &seq,
            "--warmup",
            "1",
            "--eval-batches",
            "2",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--threads",
            "1",
        ]);
        let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
        let val_loss = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|r| r["kind"] == "eval")
            .and_then(|r| r["val_loss"].as_f64())
            .expect("an eval record");
        Run {
            checkpoint: out.join("checkpoint.safetensors"),
            dir,
            val_file,
            val_loss,
        }
    })
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn eval_on_the_validation_split_equals_the_trainers_validation_loss() {
    let r = trained();
    let line = ok(&[
        "eval",
        "--checkpoint",
        path(&r.checkpoint),
        "--data",
        path(&r.val_file),
        "--quiet",
    ]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert_eq!(v["tokens"], SEQ as u64);
    assert_eq!(v["windows"], 1);
    // The same window through the same f32 forward; the trainer's mean runs over two copies
    // of it per batch, which can move the last bit or so.
    assert!(
        (loss - r.val_loss).abs() <= 1e-6 * r.val_loss,
        "eval {loss} vs the trainer's {}",
        r.val_loss
    );
    let bpb = v["bits_per_byte"].as_f64().unwrap();
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-12);
}

#[test]
fn eval_scores_every_token_once_whatever_the_window() {
    let r = trained();
    let data = r.dir.join("data.txt");
    let mut losses = Vec::new();
    for (seq, batch) in [("32", "2"), ("7", "3"), ("32", "1")] {
        let line = ok(&[
            "eval",
            "--checkpoint",
            path(&r.checkpoint),
            "--data",
            path(&data),
            "--seq",
            seq,
            "--batch",
            batch,
            "--quiet",
        ]);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["tokens"], (10 * (SEQ + 1) - 1) as u64);
        losses.push(v["loss"].as_f64().unwrap());
    }
    // Batching does not change a window's loss (to f32 rounding); shorter windows see less
    // context, so they score worse or about the same.
    assert!((losses[0] - losses[2]).abs() < 1e-5 * losses[0], "{losses:?}");
    assert!(losses[1] > losses[0] - 1e-3, "{losses:?}");
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let r = trained();
    let ck = path(&r.checkpoint);
    let args = |seed: &'static str| {
        [
            "sample",
            "--checkpoint",
            ck,
            "--prompt",
            "The ",
            "--tokens",
            "200",
            "--seed",
            seed,
        ]
    };
    let a = ok_bytes(&args("1"));
    assert_eq!(a, ok_bytes(&args("1")));
    assert_ne!(a, ok_bytes(&args("2")));
    assert!(a.starts_with(b"The "));
    assert_eq!(a.len(), 4 + 200 + 1, "prompt, 200 bytes and a newline: {a:?}");
    // Greedy ignores the seed; more tokens than the context (128) slide the window.
    let greedy = |seed| {
        ok_bytes(&[
            "sample",
            "--checkpoint",
            ck,
            "--tokens",
            "300",
            "--temperature",
            "0",
            "--seed",
            seed,
        ])
    };
    assert_eq!(greedy("1"), greedy("2"));
}

#[test]
fn export_and_import_keep_the_model() {
    let r = trained();
    let hf_dir = r.dir.join("hf");
    ok(&[
        "export",
        "--checkpoint",
        path(&r.checkpoint),
        "--out",
        path(&hf_dir),
    ]);
    let back = r.dir.join("back.safetensors");
    ok(&["import", path(&hf_dir), "--out", path(&back)]);
    let eval = |ck: &Path| {
        ok(&[
            "eval",
            "--checkpoint",
            path(ck),
            "--data",
            path(&r.val_file),
            "--quiet",
        ])
    };
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(eval(&r.checkpoint).trim()).unwrap(),
        serde_json::from_str(eval(&back).trim()).unwrap(),
    );
    assert_eq!(a["loss"], b["loss"]);
    // The imported checkpoint has no run metadata: --context gives both the trained one.
    let sample = |ck: &Path| {
        ok_bytes(&[
            "sample",
            "--checkpoint",
            path(ck),
            "--context",
            "32",
            "--tokens",
            "100",
            "--seed",
            "3",
        ])
    };
    assert_eq!(sample(&r.checkpoint), sample(&back));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let r = trained();
    let ck = path(&r.checkpoint);
    let err = fails(&["sample", "--checkpoint", ck, "--prompt", ""]);
    assert!(err.contains("--prompt is empty"), "{err}");
    let err = fails(&["sample", "--checkpoint", path(&r.dir.join("nope.safetensors"))]);
    assert!(err.contains("no such file"), "{err}");
    // A file that is not a checkpoint, and an HF weights file (another model's format).
    let err = fails(&["sample", "--checkpoint", path(&r.val_file)]);
    assert!(err.contains("val.txt"), "{err}");
    let hf_dir = r.dir.join("hf-bad");
    ok(&["export", "--checkpoint", ck, "--out", path(&hf_dir)]);
    let err = fails(&[
        "eval",
        "--checkpoint",
        path(&hf_dir.join("model.safetensors")),
        "--data",
        path(&r.val_file),
    ]);
    assert!(err.contains("moonlight-ref import"), "{err}");
    let empty = r.dir.join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let err = fails(&["eval", "--checkpoint", ck, "--data", path(&empty)]);
    assert!(err.contains("empty"), "{err}");
    let one = r.dir.join("one.txt");
    std::fs::write(&one, b"x").unwrap();
    let err = fails(&["eval", "--checkpoint", ck, "--data", path(&one)]);
    assert!(err.contains("at least 2"), "{err}");
    let err = fails(&[
        "eval",
        "--checkpoint",
        ck,
        "--data",
        path(&r.val_file),
        "--seq",
        "1000",
    ]);
    assert!(err.contains("max_seq_len"), "{err}");
    let err = fails(&["sample", "--checkpoint", ck, "--context", "0"]);
    assert!(err.contains("--context"), "{err}");
    let err = fails(&["sample", "--checkpoint", ck, "--top-p", "0"]);
    assert!(err.contains("--top-p"), "{err}");
    let err = fails(&[
        "import",
        path(&r.dir),
        "--out",
        path(&r.dir.join("x.safetensors")),
    ]);
    assert!(err.contains("config.json"), "{err}");
    // An MHA checkpoint has no DeepseekV3 form.
    let mha = r.dir.join("mha");
    let data = r.dir.join("data.txt");
    ok(&[
        "train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "1",
        "--seq",
        "8",
        "--attention",
        "mha",
        "--data",
        path(&data),
        "--out",
        path(&mha),
        "--quiet",
        "--threads",
        "1",
    ]);
    let err = fails(&[
        "export",
        "--checkpoint",
        path(&mha.join("checkpoint.safetensors")),
        "--out",
        path(&r.dir.join("mha-hf")),
    ]);
    assert!(err.contains("MHA"), "{err}");
}

/// The step losses of a run's log, in order.
fn step_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "step")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn training_continues_from_trained_or_imported_weights() {
    let r = trained();
    let hf_dir = r.dir.join("init-hf");
    ok(&[
        "export",
        "--checkpoint",
        path(&r.checkpoint),
        "--out",
        path(&hf_dir),
    ]);
    let imported = r.dir.join("init-imported.safetensors");
    ok(&["import", path(&hf_dir), "--out", path(&imported)]);
    let data = r.dir.join("data.txt");
    let seq = SEQ.to_string();
    let train = |init: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--init",
            path(init),
            "--steps",
            "4",
            "--batch",
            "2",
            "--seq",
            &seq,
            "--warmup",
            "1",
            "--eval-batches",
            "2",
            "--data",
            path(&data),
            "--out",
            path(out),
            "--quiet",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        step_losses(out)
    };
    let from_checkpoint = train(&r.checkpoint, &r.dir.join("init-a"), &[]);
    let from_import = train(&imported, &r.dir.join("init-b"), &[]);
    // The round trip through the HF layout is bit-exact, and the run is seeded: same bits.
    assert_eq!(from_checkpoint, from_import);
    // Step 1 draws the batch the original run's step 1 drew (same seed, fresh sampler): the
    // trained weights must score it well below the random initialization did. The original
    // run's own loss fell by more than `drop` over its 6 steps, so half of that is a margin
    // no random start meets.
    let original = step_losses(&r.dir.join("run"));
    let drop = original[0] - original[original.len() - 1];
    assert!(drop > 0.05, "the original run did not learn: {original:?}");
    assert!(
        from_checkpoint[0] < original[0] - drop / 2.0,
        "--init's first loss {} vs the random start's {} (the run fell by {drop})",
        from_checkpoint[0],
        original[0]
    );
    // Stopped and resumed (with --init again, which names the model), the run is the same.
    let split = r.dir.join("init-split");
    let first = train(&imported, &split, &["--stop-at", "2"]);
    assert_eq!(first, from_import[..2]);
    let ck = split.join("checkpoint.safetensors");
    let resumed = train(&imported, &split, &["--resume", path(&ck)]);
    assert_eq!(resumed, from_import);
    // Clear errors: a missing file, a model option beside --init.
    let err = fails(&[
        "train",
        "--init",
        path(&r.dir.join("nope.safetensors")),
        "--out",
        path(&r.dir.join("init-nope")),
    ]);
    assert!(err.contains("--init") && err.contains("no such file"), "{err}");
    let err = fails(&["train", "--init", path(&imported), "--preset", "small"]);
    assert!(err.contains("--preset"), "{err}");
}
