//! `moonlight-ref repro`: every experiment's `--quick` version end to end through the binary
//! (its table, plots, analysis and summary exist and parse, REPRODUCTION.md names them all),
//! a second run trains nothing, and an interrupted experiment resumes to the same losses as
//! one that never stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use moonlight_ref::repro::experiments::{self, Experiment};
use moonlight_ref::repro::record::{read_records, RECORDS_FILE};
use moonlight_ref::repro::summary::{Analysis, ANALYSIS_FILE};
use moonlight_ref::repro::{self, ReproError, ReproOptions};

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moonlight-ref-repro-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn repro(args: &[&str], out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
        .arg("repro")
        .args(args)
        .arg("--out")
        .arg(out)
        .args(["--threads", "2", "--quiet"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "repro {args:?} failed: {stderr}");
    stdout.into_owned()
}

#[test]
fn every_quick_experiment_writes_its_table_plots_and_summary() {
    let out = scratch("all");
    let clock = std::time::Instant::now();
    repro(&["all", "--quick"], &out);
    eprintln!("repro all --quick: {:.1} s", clock.elapsed().as_secs_f64());
    let records = read_records(&out.join(RECORDS_FILE)).unwrap();
    for e in Experiment::ALL {
        let plan = experiments::plan(e, true, None).unwrap();
        for run in &plan.runs {
            let r = records
                .iter()
                .find(|r| r.name == run.name)
                .unwrap_or_else(|| panic!("no record of {}", run.name));
            assert!(
                r.final_val_loss.is_finite() && r.final_val_loss > 0.0,
                "{}",
                r.name
            );
            assert!(
                r.flops > 0.0 && !r.curve.is_empty() && r.settings == run.settings,
                "{}",
                r.name
            );
        }
        let dir = out.join(e.name());
        let a: Analysis = serde_json::from_slice(&std::fs::read(dir.join(ANALYSIS_FILE)).unwrap()).unwrap();
        assert!(
            a.quick && a.runs == plan.runs.len() && !a.figures.is_empty(),
            "{e}: {a:?}"
        );
        assert!(!a.plots.is_empty(), "{e}");
        for p in &a.plots {
            let svg = std::fs::read_to_string(dir.join(p)).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{e}: {p}"
            );
        }
        let csv = std::fs::read_to_string(dir.join("table.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), plan.runs.len() + 1, "{e}: a header and a row per run");
        let width = rows[0].split(',').count();
        assert!(
            rows.iter().all(|r| r.split(',').count() == width),
            "{e}: ragged CSV"
        );
        let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
        assert!(
            md.contains(&format!("## {}", e.name())) && md.contains("| figure |"),
            "{e}"
        );
    }
    // The scaling fit's figures are numbers.
    let fits: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("scaling").join("fits.json")).unwrap()).unwrap();
    assert!(fits["adamw"]["b"].as_f64().unwrap().is_finite());

    // Again: everything is done, nothing trains and no record is added.
    let lines = std::fs::read_to_string(out.join(RECORDS_FILE))
        .unwrap()
        .lines()
        .count();
    repro(&["curves", "--quick"], &out);
    assert_eq!(
        std::fs::read_to_string(out.join(RECORDS_FILE))
            .unwrap()
            .lines()
            .count(),
        lines
    );

    let md = out.join("REPRODUCTION.md");
    let o = Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
        .args(["repro", "report", "--out"])
        .arg(&out)
        .arg("--to")
        .arg(&md)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&md).unwrap();
    for e in Experiment::ALL {
        assert!(
            text.contains(&format!("## {} (--quick)", e.name())),
            "{e} missing from REPRODUCTION.md"
        );
        assert!(
            text.contains(&format!("| [{0}](#{0}---quick) | no verdict |", e.name())),
            "{e}'s line missing from REPRODUCTION.md's verdict table"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_interrupted_experiment_resumes_to_the_same_losses() {
    let (stopped, straight) = (scratch("stopped"), scratch("straight"));
    let opts = |out: &Path, interrupt: Option<Arc<AtomicBool>>| ReproOptions {
        quick: true,
        out: out.to_path_buf(),
        seeds: Some(1),
        threads: 2,
        progress: false,
        interrupt,
    };
    // A flag already set stops the first run after its first step, with a checkpoint.
    let flag = Arc::new(AtomicBool::new(true));
    match repro::run(Experiment::Curves, &opts(&stopped, Some(flag.clone()))) {
        Err(ReproError::Interrupted(msg)) => assert!(msg.contains("again"), "{msg}"),
        other => panic!("expected an interruption, got {other:?}"),
    }
    assert!(read_records(&stopped.join(RECORDS_FILE)).unwrap().is_empty());
    flag.store(false, Ordering::Relaxed);
    repro::run(Experiment::Curves, &opts(&stopped, Some(flag))).unwrap();
    repro::run(Experiment::Curves, &opts(&straight, None)).unwrap();
    let (a, b) = (
        read_records(&stopped.join(RECORDS_FILE)).unwrap(),
        read_records(&straight.join(RECORDS_FILE)).unwrap(),
    );
    assert_eq!(a.len(), 2);
    assert!(a[0].resumed && !a[1].resumed && !b[0].resumed);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name, y.name);
        // Same seed, same data, resumed from an exact checkpoint: the same bits.
        assert_eq!(
            x.final_val_loss.to_bits(),
            y.final_val_loss.to_bits(),
            "{}",
            x.name
        );
        assert_eq!(
            x.final_train_loss.to_bits(),
            y.final_train_loss.to_bits(),
            "{}",
            x.name
        );
    }
    // A finished run recorded with other data (a plan whose corpus size changed) is refused,
    // not mixed in.
    let mut other = b[0].clone();
    assert!(other.data.starts_with("corpus-"), "{}", other.data);
    other.data = "corpus-1.txt".into();
    moonlight_ref::repro::record::append(&straight.join(RECORDS_FILE), &other).unwrap();
    match repro::run(Experiment::Curves, &opts(&straight, None)) {
        Err(ReproError::Failed(msg)) => assert!(msg.contains("other settings or data"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&stopped);
    let _ = std::fs::remove_dir_all(&straight);
}

#[test]
fn bad_input_is_refused_by_name() {
    let out = scratch("bad");
    for (args, needle) in [
        (&["sideways"][..], "unknown experiment `sideways`"),
        (&["curves", "--seeds", "0"][..], "--seeds must be at least 1"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
            .arg("repro")
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
