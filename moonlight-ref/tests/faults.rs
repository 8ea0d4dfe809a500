//! The `moonlight-ref` binary under hostile input and faults: huge numbers, output that cannot
//! be written, non-finite training, runs sharing a directory, logs and checkpoints after
//! `kill -9`. Every case ends in a clear message or a complete file, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use moonlight_ref::checkpoint;
use moonlight_ref::log::{read_log, Record};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moonlight-ref-faults-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and expects failure (exit status 1) with `needle` in stderr, and no panic.
fn fails_with(cmd: &mut Command, needle: &str) -> Output {
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "expected exit 1; stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in stderr: {err}");
    assert!(!err.contains("panicked"), "it panicked: {err}");
    out
}

/// A fast training command writing into `out`; `args` are `(flag, value)` pairs that replace
/// the defaults here or add to them (a flag without a value: `("--overwrite", "")`).
fn train(out: &Path, args: &[(&str, &str)]) -> Command {
    let mut flags: Vec<(&str, &str)> = vec![
        ("--steps", "3"),
        ("--batch", "2"),
        ("--seq", "16"),
        ("--warmup", "1"),
        ("--eval-every", "0"),
        ("--eval-batches", "1"),
        ("--threads", "1"),
        ("--quiet", ""),
    ];
    for &(flag, value) in args {
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some(slot) => slot.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut cmd = bin();
    cmd.arg("train").arg("--out").arg(out);
    for (flag, value) in flags {
        cmd.arg(flag);
        if !value.is_empty() {
            cmd.arg(value);
        }
    }
    cmd
}

fn step_losses(log: &Path) -> Vec<(u64, f64)> {
    read_log(log)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some((s.step, s.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn huge_numbers_are_errors_or_work_never_panics_or_aborts() {
    let dir = scratch("huge");
    // A run of u64::MAX steps starts (nothing is allocated per step up front) and stops
    // where asked.
    let max = u64::MAX.to_string();
    let out = train(&dir.join("long"), &[("--steps", &max), ("--stop-at", "2")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A batch that cannot fit is refused by the memory check, naming the sizes.
    fails_with(
        &mut train(&dir.join("wide"), &[("--batch", "1000000000000")]),
        "GiB",
    );
    fails_with(&mut train(&dir.join("overflow"), &[("--batch", &max)]), "--batch");
    fails_with(
        &mut train(&dir.join("eval"), &[("--eval-batches", "0")]),
        "--eval-batches",
    );
    fails_with(
        &mut train(&dir.join("stop"), &[("--stop-at", "4")]),
        "--stop-at 4",
    );
    fails_with(
        bin()
            .args(["corpus", "--bytes", "1", "--out"])
            .arg(dir.join("c.txt")),
        "--bytes 1 is too few",
    );
}

#[test]
fn a_huge_corpus_streams_in_little_memory_and_a_ctrl_c_leaves_no_file() {
    let dir = scratch("corpus");
    let file = dir.join("big.txt");
    let child = bin()
        .args(["corpus", "--bytes", "1000000000000", "--out"])
        .arg(&file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = moonlight_ref::files::temp_path(&file).with_file_name(format!(".big.txt.{}.tmp", child.id()));
    let start = Instant::now();
    while std::fs::metadata(&tmp).map_or(0, |m| m.len()) < 50 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the corpus is not being written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Peak resident memory while 50 MB were written: a few MB (the binary and one 64 KiB
    // piece), far below the 1 TB asked for.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
        let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
        assert!(kb < 64 << 10, "peak resident memory {kb} kB");
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("was not written"), "{}", stderr(&out));
    assert!(!file.exists() && !tmp.exists(), "a partial file was left");
}

#[test]
fn output_that_cannot_be_written_is_an_error_and_a_closed_pipe_ends_quietly() {
    if Path::new("/dev/full").exists() {
        let full = std::fs::File::create("/dev/full").unwrap();
        let out = bin().args(["params"]).stdout(full).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("cannot write to standard output"),
            "{}",
            stderr(&out)
        );
    }
    // A closed pipe: the reader is gone before the program writes.
    let dir = scratch("pipe");
    for args in [vec!["params".to_string()], {
        let mut a: Vec<String> = ["train", "--steps", "2", "--batch", "2", "--seq", "16"]
            .map(String::from)
            .to_vec();
        a.extend(["--warmup", "0", "--quiet", "--threads", "1", "--out"].map(String::from));
        a.push(dir.join("run").display().to_string());
        a
    }] {
        let mut child = bin()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{args:?}: not quiet: {}", stderr(&out));
    }
    // The run finished its files before its summary line found no reader.
    assert_eq!(step_losses(&dir.join("run/log.jsonl")).len(), 2);
    checkpoint::load(&dir.join("run/checkpoint.safetensors")).unwrap();
}

#[test]
fn a_non_finite_run_stops_and_its_last_checkpoint_is_finite() {
    let dir = scratch("nonfinite");
    // One step at a huge rate: the validation loss after it is not finite.
    let out = fails_with(
        &mut train(
            &dir.join("one"),
            &[("--steps", "1"), ("--warmup", "0"), ("--lr", "3e38")],
        ),
        "not finite",
    );
    assert!(stderr(&out).contains("step 1"), "{}", stderr(&out));
    assert!(
        !dir.join("one/checkpoint.safetensors").exists(),
        "a non-finite checkpoint was written"
    );
    // Checkpoints every step; AdamW at 1e30 keeps the weights finite (about 1e30) after step
    // 1 and overflows the activations at step 2. The checkpoint the error names is step 1's,
    // and it loads (loading checks every value).
    let out = fails_with(
        &mut train(
            &dir.join("every"),
            &[
                ("--steps", "5"),
                ("--optimizer", "adamw"),
                ("--warmup", "0"),
                ("--lr", "1e30"),
                ("--checkpoint-every", "1"),
            ],
        ),
        "not finite",
    );
    let err = stderr(&out);
    assert!(
        err.contains("last good checkpoint") && err.contains("(step 1)"),
        "{err}"
    );
    let ckpt = checkpoint::load(&dir.join("every/checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.metadata["step"], "1");
    assert!(ckpt.non_finite().is_none());
    // Nothing non-finite is in the log either.
    for record in read_log(&dir.join("every/log.jsonl")).unwrap() {
        if let Record::Step(s) = record {
            assert!(s.loss.is_finite() && s.grad_norm.is_finite(), "{s:?}");
        }
    }
}

#[test]
fn a_new_run_never_overwrites_an_old_one_unasked() {
    let dir = scratch("existing");
    let run = dir.join("run");
    let out = train(&run, &[]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = std::fs::read(run.join("log.jsonl")).unwrap();
    let out = fails_with(&mut train(&run, &[("--lr", "0.02")]), "already holds a run");
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(run.join("log.jsonl")).unwrap(),
        log,
        "the old log was touched"
    );
    // Asked: the old checkpoint is gone before the new log starts; a failing new run leaves
    // no old checkpoint beside its log.
    fails_with(
        train(&run, &[("--overwrite", "")])
            .arg("--data")
            .arg(dir.join("missing.txt")),
        "cannot read data file",
    );
    assert!(!run.join("checkpoint.safetensors").exists());
    let out = train(&run, &[("--steps", "2"), ("--overwrite", "")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(step_losses(&run.join("log.jsonl")).len(), 2);
    // `plot` never writes over a log it reads.
    let log_path = run.join("log.jsonl");
    let before = std::fs::read(&log_path).unwrap();
    fails_with(
        bin().arg("plot").arg(&log_path).arg("--out").arg(&log_path),
        "is one of the logs",
    );
    assert_eq!(std::fs::read(&log_path).unwrap(), before);
}

#[test]
fn two_runs_on_one_directory_one_is_refused() {
    let dir = scratch("concurrent");
    let run = dir.join("run");
    let mut first = train(&run, &[("--steps", "400")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first run's lock.
    let start = Instant::now();
    while !run.join(moonlight_ref::train::LOCK_FILE).exists() {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = fails_with(&mut train(&run, &[("--overwrite", "")]), "in use by another run");
    assert!(
        stderr(&out).contains(&format!("pid {}", first.id())),
        "{}",
        stderr(&out)
    );
    Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    let out = first.wait().unwrap();
    assert_eq!(out.code(), Some(130));
    // The interrupted run left a whole log, a checkpoint at its last step, and no lock.
    let losses = step_losses(&run.join("log.jsonl"));
    let ckpt = checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.metadata["step"], losses.len().to_string());
    assert!(!run.join(moonlight_ref::train::LOCK_FILE).exists());
}

#[test]
fn resume_cuts_the_log_back_and_drops_a_torn_line() {
    let dir = scratch("log");
    let run = dir.join("run");
    let whole = dir.join("whole");
    let out = train(&whole, &[("--steps", "6")]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = train(&run, &[("--steps", "6"), ("--stop-at", "3")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // As a run killed after step 5 leaves it: two steps past the checkpoint, half a line.
    let log = run.join("log.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(whole.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"step\":4,") || l.contains("\"step\":5,"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.extend(lines);
    text.push_str("{\"kind\":\"step\",\"step\":6,\"lo");
    std::fs::write(&log, text).unwrap();
    let out = train(&run, &[("--steps", "6")])
        .arg("--resume")
        .arg(run.join("checkpoint.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(step_losses(&log), step_losses(&whole.join("log.jsonl")));
}

#[test]
fn kill_9_at_random_moments_loses_nothing() {
    // The reference: one uninterrupted run.
    let dir = scratch("kill9");
    let steps = 40;
    let reference = dir.join("reference");
    let every_step = [("--steps", "40"), ("--checkpoint-every", "1")];
    let started = Instant::now();
    let out = train(&reference, &every_step).output().unwrap();
    // The kills fall within the first third of a whole run's time (at least 20 ms), so a fast
    // machine, where the run takes well under a second, is interrupted as often as a slow one.
    let window = (started.elapsed().as_millis() as u64 / 3).max(20);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = step_losses(&reference.join("log.jsonl"));
    assert_eq!(want.len(), steps as usize);

    let run = dir.join("run");
    let ckpt = run.join("checkpoint.safetensors");
    let mut rng = moonlight_ref::rng::Rng::new(9);
    let (mut kills, mut finished) = (0, false);
    for _ in 0..60 {
        let mut cmd = train(&run, &every_step);
        if ckpt.exists() {
            // Killed after its last checkpoint but before its summary: every step is done.
            if checkpoint::load(&ckpt).unwrap().metadata["step"] == steps.to_string() {
                finished = true;
                break;
            }
            cmd.arg("--resume").arg(&ckpt);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(10 + rng.below(window as usize) as u64));
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            finished = true;
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // After every kill: the checkpoint is whole (checksums verified) and the log's lines
        // are records of steps already taken, in order.
        if ckpt.exists() {
            let c = checkpoint::load(&ckpt).unwrap();
            let at: usize = c.metadata["step"].parse().unwrap();
            let logged = step_losses(&run.join("log.jsonl"));
            assert!(logged.len() >= at, "the log lost steps before the checkpoint");
            assert_eq!(&logged[..at], &want[..at]);
        }
    }
    assert!(finished, "the run never finished in {kills} attempts");
    assert!(kills >= 3, "only {kills} kills: the test did not test much");
    assert_eq!(step_losses(&run.join("log.jsonl")), want, "after {kills} kills");
}
