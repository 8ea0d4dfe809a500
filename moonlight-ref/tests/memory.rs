//! The memory estimate a training run checks before it starts, against what the process then
//! really used: the peak resident set (`VmHWM`) of the binary on `tiny` and `small` at several
//! batch shapes and thread counts. The estimate must be an upper bound (a run it admits does
//! not run out of memory) and a useful one (not wildly above the measured peak).

use std::path::PathBuf;
use std::process::Command;

use moonlight_ref::log::{Record, Summary};

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("muon-memory-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Trains two steps (with an evaluation and the final checkpoint, the run's memory peaks) and
/// returns the run's summary.
fn run(preset: &str, batch: usize, seq: usize, threads: usize) -> Summary {
    let out = scratch(&format!("{preset}-{batch}-{seq}-{threads}"));
    let status = Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
        .args([
            "train", "--preset", preset, "--steps", "2", "--warmup", "1", "--quiet",
        ])
        .args([
            "--eval-batches",
            "1",
            "--batch",
            &batch.to_string(),
            "--seq",
            &seq.to_string(),
        ])
        .args(["--threads", &threads.to_string(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let last = log.lines().last().unwrap();
    let _ = std::fs::remove_dir_all(&out);
    match serde_json::from_str(last).unwrap() {
        Record::Summary(summary) => summary,
        other => panic!("the log ends in {other:?}, not a summary"),
    }
}

#[test]
fn the_estimate_bounds_the_measured_peak_and_stays_near_it() {
    const MIB: f64 = (1 << 20) as f64;
    let cases = [
        ("tiny", 2, 16, 1),
        ("tiny", 2, 16, 2),
        ("tiny", 16, 64, 2),
        ("tiny", 32, 128, 2),
        ("small", 4, 64, 2),
        ("small", 16, 128, 1),
    ];
    for (preset, batch, seq, threads) in cases {
        let summary = run(preset, batch, seq, threads);
        let estimate = summary
            .memory_estimate_bytes
            .expect("the summary has the estimate") as f64;
        let Some(peak) = summary.memory_peak_bytes.map(|p| p as f64) else {
            muon_test_support::skip("this OS reports no peak resident set (VmHWM)");
            return;
        };
        println!(
            "{preset} B={batch} T={seq} threads={threads}: estimate {:.1} MiB, peak {:.1} MiB ({:.2}x)",
            estimate / MIB,
            peak / MIB,
            estimate / peak
        );
        assert!(
            estimate >= peak,
            "{preset} {batch}x{seq}: the estimate {estimate} is below the peak {peak}"
        );
        // Tight where the run is large (activations and state dominate, counted exactly up
        // to allocator rounding); the fixed runtime allowance (48 MiB at 2 threads) is what
        // a small run is over by.
        assert!(
            estimate <= 1.5 * peak + 48.0 * MIB,
            "{preset} {batch}x{seq}: the estimate {estimate} is far above the peak {peak}"
        );
    }
}

#[test]
fn a_run_larger_than_the_machine_is_refused_before_it_starts() {
    let out = scratch("too-big");
    let result = Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
        .args([
            "train", "--preset", "small", "--steps", "2", "--warmup", "1", "--batch", "10000000", "--quiet",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    let _ = std::fs::remove_dir_all(&out);
    if moonlight_ref::memory::available().is_none() {
        muon_test_support::skip("this OS reports no available memory (MemAvailable)");
        return;
    }
    assert!(!result.status.success());
    assert!(
        err.contains("needs an estimated") && err.contains("--batch"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
