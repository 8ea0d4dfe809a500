//! `mpirun -np N moonlight-ref train ...` (the `mpi` feature): the binary on 1, 2 and 4 MPI
//! processes (oversubscribed on a 2-core machine) takes the single process's per-step losses
//! for the same global batch, with Muon and AdamW, MLA and MHA; one rank alone writes the log
//! and the checkpoint, which resumes on another rank count; a rank killed mid-run ends the
//! job, and a rank that stops answering makes the others end it at their deadline, both within
//! a bounded time.
//!
//! The bound: as in tests/trainer_parallel.rs (the same loop on `ThreadGroup` ranks), the
//! ranks' mean gradients add up in another order than one process's, so losses agree to f32
//! rounding; one rank is the single process to the bit. MPI gives `ThreadGroup`'s
//! bits (muon-faer's tests/mpi.rs); the bound, `LOSS_N`, is derived where it is defined.
//!
//! Without `mpirun` the tests skip, saying so, except under `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use std::{fs, thread};

use moonlight_ref::log::{read_log, Record};

/// f32 rounding carried through the updates. Muon's runs part by 2.4e-7 at most (measured,
/// 10 steps, 2 and 4 processes). AdamW's first update is nearly `lr * sign(g)`, so an entry
/// whose mean gradient is rounding-sized (a sum that cancels) moves by a full `lr` either way
/// with the order of the sum: AdamW with MLA parts by up to 2.1e-5 (measured on AMD Zen 5;
/// 2.4e-7 with MHA). The bound leaves 5x over that and is still 1000x below a step's loss
/// decrease, so a rank's rows dropped or a sum taken for a mean is caught.
const LOSS_N: f64 = 1e-4;

/// One MPI job at a time: the machine has two cores.
static ONE_JOB: Mutex<()> = Mutex::new(());

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moonlight-ref"))
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moonlight-mpi-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `mpirun` is here; if not, the test skips (or fails under CI).
fn have_mpirun(test: &str) -> bool {
    let present = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        let why = "mpirun not found: install Open MPI (Debian: openmpi-bin libopenmpi-dev; .ci/install-mpi.sh does)";
        assert!(!ci, "{test}: {why}");
        println!("{test}: skipped, {why}");
    }
    present
}

/// The training flags of every run here: the tiny preset on a batch of 4 windows of 16.
fn train_args(optimizer: &str, attention: &str, steps: u64, out: &Path) -> Vec<String> {
    with_batch(optimizer, attention, steps, out, 4)
}

fn with_batch(optimizer: &str, attention: &str, steps: u64, out: &Path, batch: usize) -> Vec<String> {
    let batch = batch.to_string();
    let mut args: Vec<String> = [
        "train",
        "--optimizer",
        optimizer,
        "--attention",
        attention,
        "--batch",
        &batch,
        "--seq",
        "16",
        "--warmup",
        "1",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--threads",
        "1",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--steps".into());
    args.push(steps.to_string());
    args.push("--out".into());
    args.push(out.display().to_string());
    args
}

/// `mpirun -np ranks moonlight-ref ARGS`.
fn mpirun(ranks: usize, args: &[String]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(bin())
        .args(args)
        // Open MPI refuses to run as root without these (CI runs as root).
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `(step, loss)` of every step record in `dir`'s log.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    (read_log(&dir.join("log.jsonl")).unwrap().into_iter())
        .filter_map(|r| match r {
            Record::Step(s) => Some((s.step, s.loss)),
            _ => None,
        })
        .collect()
}

fn assert_close(what: &str, a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0, "{what}: step numbers");
        let d = (x.1 - y.1).abs();
        assert!(
            d <= LOSS_N,
            "{what}: step {}: {} vs {} (off by {d:e})",
            x.0,
            x.1,
            y.1
        );
    }
}

#[test]
fn one_two_and_four_processes_take_the_single_process_losses() {
    if !have_mpirun("one_two_and_four_processes_take_the_single_process_losses") {
        return;
    }
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("losses");
    for optimizer in ["muon", "adamw"] {
        for attention in ["mla", "mha"] {
            let what = format!("{optimizer}, {attention}");
            let single_dir = dir.join(format!("{optimizer}-{attention}-single"));
            let out = Command::new(bin())
                .args(train_args(optimizer, attention, 4, &single_dir))
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}, single: {}", text(&out));
            let single = losses(&single_dir);
            assert_eq!(single.len(), 4);
            for ranks in [1, 2, 4] {
                let run_dir = dir.join(format!("{optimizer}-{attention}-{ranks}"));
                let out = mpirun(ranks, &train_args(optimizer, attention, 4, &run_dir))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{what}, -np {ranks}: {}", text(&out));
                // Rank 0 alone reports: one summary line on stdout.
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    stdout.matches("steps: train loss").count(),
                    1,
                    "{what}, -np {ranks}: {stdout}"
                );
                let run = losses(&run_dir);
                if ranks == 1 {
                    assert_eq!(
                        run, single,
                        "{what}: one process under mpirun is not the plain run"
                    );
                } else {
                    assert_close(&format!("{what}, -np {ranks}"), &run, &single);
                }
            }
        }
    }
}

#[test]
fn a_four_process_checkpoint_resumes_on_two_processes_and_on_one() {
    if !have_mpirun("a_four_process_checkpoint_resumes_on_two_processes_and_on_one") {
        return;
    }
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("resume");
    let whole_dir = dir.join("whole");
    let out = mpirun(4, &train_args("muon", "mla", 6, &whole_dir))
        .output()
        .unwrap();
    assert!(out.status.success(), "whole: {}", text(&out));
    let whole = losses(&whole_dir);
    for ranks in [2, 1] {
        let run_dir = dir.join(format!("from-4-on-{ranks}"));
        let mut first = train_args("muon", "mla", 6, &run_dir);
        first.extend(["--stop-at".to_string(), "3".to_string()]);
        let out = mpirun(4, &first).output().unwrap();
        assert!(out.status.success(), "first part: {}", text(&out));
        let mut second = train_args("muon", "mla", 6, &run_dir);
        second.push("--resume".into());
        second.push(run_dir.join("checkpoint.safetensors").display().to_string());
        let out = if ranks == 1 {
            Command::new(bin()).args(&second).output().unwrap()
        } else {
            mpirun(ranks, &second).output().unwrap()
        };
        assert!(out.status.success(), "resumed on {ranks}: {}", text(&out));
        let resumed = losses(&run_dir);
        assert_eq!(resumed[..3], whole[..3], "the first part on 4 processes");
        assert_close(&format!("resumed on {ranks}"), &resumed, &whole);
    }
}

/// Pids of the processes training into `out` as MPI rank `rank`.
fn rank_pids(out: &Path, rank: usize) -> Vec<u32> {
    let needle = out.display().to_string();
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let env = String::from_utf8_lossy(&environ);
            !cmd.starts_with("mpirun") && cmd.contains(&needle) && env.split('\0').any(|v| v == want)
        })
        .collect()
}

/// Starts a long 2-process run into `out`, waits until it has logged 2 steps, and returns it
/// with rank 1's pid.
fn start_long_run(out: &Path, timeout: &str) -> (std::process::Child, u32) {
    let mut args = train_args("muon", "mla", 100_000, out);
    args.extend(["--collective-timeout".into(), timeout.into()]);
    let mut child = mpirun(2, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let steps = read_log(&out.join("log.jsonl")).map_or(0, |l| l.len());
        let pids = rank_pids(out, 1);
        if steps >= 2 && pids.len() == 1 {
            return (child, pids[0]);
        }
        if start.elapsed() > Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the run did not get to step 2 with one rank 1: {}", text(&out));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `limit` for `child`; its output, and how long it took.
fn wait_for(mut child: std::process::Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running {limit:?} after the fault: {}", text(&out));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    (child.wait_with_output().unwrap(), took)
}

#[test]
fn a_killed_process_ends_the_job_within_30_s() {
    if !have_mpirun("a_killed_process_ends_the_job_within_30_s") {
        return;
    }
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("killed");
    let (child, pid) = start_long_run(&dir, "300");
    let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -KILL {pid}");
    let (out, took) = wait_for(child, Duration::from_secs(30));
    println!(
        "rank 1 killed: the job ended ({}) after {:.2} s",
        out.status,
        took.as_secs_f64()
    );
    assert!(!out.status.success(), "the job succeeded after a rank was killed");
    let text = text(&out);
    assert!(text.contains("rank 1") && text.contains("signal 9"), "{text}");
    assert!(rank_pids(&dir, 0).is_empty(), "rank 0 outlived the job");
}

#[test]
fn a_process_that_stops_answering_ends_the_job_at_the_deadline() {
    if !have_mpirun("a_process_that_stops_answering_ends_the_job_at_the_deadline") {
        return;
    }
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("stopped");
    // Rank 1 frozen (SIGSTOP): alive to the launcher, silent to rank 0, which must give up
    // after its 3 s deadline and end the job.
    let (child, pid) = start_long_run(&dir, "3");
    let status = Command::new("kill").args(["-STOP", &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -STOP {pid}");
    let (out, took) = wait_for(child, Duration::from_secs(60));
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    println!(
        "rank 1 stopped: the job ended ({}) after {:.2} s",
        out.status,
        took.as_secs_f64()
    );
    assert!(!out.status.success());
    let text = text(&out);
    assert!(
        text.contains("rank 0 of 2") && text.contains("did not join within 3.0 s"),
        "{text}"
    );
}

#[test]
fn a_batch_that_does_not_divide_by_the_processes_is_refused() {
    if !have_mpirun("a_batch_that_does_not_divide_by_the_processes_is_refused") {
        return;
    }
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("indivisible");
    let out = mpirun(4, &with_batch("adamw", "mla", 2, &dir, 6))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = text(&out);
    assert!(
        text.contains("--batch 6 does not divide by the 4 ranks"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}
