//! From the records to the results: per experiment a CSV table, SVG plots, `analysis.json`
//! (the figures beside the report's, and a verdict) and `summary.md`; and REPRODUCTION.md,
//! gathered from the experiments' analyses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::experiments::{Experiment, Plan};
use super::fit::{self, PowerLaw};
use super::plots::{self, Axes, Series};
use super::record::RunRecord;

/// The analysis file inside `DIR/<experiment>`.
pub const ANALYSIS_FILE: &str = "analysis.json";

/// One figure: ours beside the report's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// What it is.
    pub what: String,
    /// This project's value, from the records.
    pub ours: String,
    /// The report's value.
    pub report: String,
}

/// Reproduced, partly, or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The report's effect shows.
    Reproduced,
    /// Some of it shows.
    Partly,
    /// It does not show.
    Not,
    /// `--quick` runs: the pipeline ran, the figures mean nothing.
    Quick,
}

/// What an experiment found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The experiment's name.
    pub experiment: String,
    /// Whether these were `--quick` runs.
    pub quick: bool,
    /// Seeds per configuration.
    pub seeds: usize,
    /// The command that runs it (relative to the output directory's parent).
    pub command: String,
    /// The machine the runs trained on.
    pub machine: String,
    /// The commits the runs were trained at.
    pub commits: Vec<String>,
    /// Runs in the experiment.
    pub runs: usize,
    /// Summed wall-clock seconds of the runs.
    pub wall_s: f64,
    /// The plots, file names inside `DIR/<experiment>`.
    pub plots: Vec<String>,
    /// The table, a file name inside `DIR/<experiment>`.
    pub table: String,
    /// What the setup is, in words.
    pub setup: String,
    /// The figures beside the report's.
    pub figures: Vec<Figure>,
    /// The verdict.
    pub verdict: Verdict,
    /// Why.
    pub why: String,
}

/// Mean, sample standard deviation (0 for one value), min and max.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

/// The [`Stats`] of `values` (`None` for none).
pub fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some(Stats {
        mean,
        sd: var.sqrt(),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

fn pm(s: Stats) -> String {
    format!("{:.4} ± {:.4}", s.mean, s.sd)
}

fn tag<'a>(r: &'a RunRecord, key: &str) -> &'a str {
    r.tags.get(key).map_or("", String::as_str)
}

/// The final validation losses of the records whose tag `key` is `value`.
fn val_losses(records: &[RunRecord], key: &str, value: &str) -> Vec<f64> {
    records
        .iter()
        .filter(|r| tag(r, key) == value)
        .map(|r| r.final_val_loss)
        .collect()
}

/// Writes the experiment's table, plots, analysis and summary into `out/<experiment>` from
/// `records` (one per run of `plan`). Returns the files written.
pub fn write(plan: &Plan, records: &[RunRecord], out: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = out.join(plan.experiment.name());
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut a = Analysis {
        experiment: plan.experiment.name().into(),
        quick: plan.quick,
        seeds: plan.seeds,
        command: command(plan, out),
        machine: records.first().map_or_else(String::new, |r| r.machine.clone()),
        commits: {
            let mut c: Vec<String> = records.iter().filter_map(|r| r.commit.clone()).collect();
            c.sort();
            c.dedup();
            c
        },
        runs: records.len(),
        wall_s: records.iter().map(|r| r.wall_s).sum(),
        plots: Vec::new(),
        table: "table.csv".into(),
        setup: String::new(),
        figures: Vec::new(),
        verdict: Verdict::Quick,
        why: String::new(),
    };
    let mut files = vec![dir.join("table.csv")];
    write_table(records, &dir.join("table.csv"))?;
    match plan.experiment {
        Experiment::Scaling => scaling(records, &dir, &mut a)?,
        Experiment::Curves => curves(records, &dir, &mut a)?,
        Experiment::RmsSweep => rms_sweep(records, &dir, &mut a)?,
        Experiment::ScaleMethods => scale_methods(records, &dir, &mut a)?,
        Experiment::WdOvertrain => wd_overtrain(records, &dir, &mut a)?,
        Experiment::SvdEntropy => svd_entropy(records, &dir, &mut a)?,
    }
    if plan.quick {
        a.why = format!(
            "--quick runs (a pipeline check; the figures mean nothing). Had they been full runs: {}",
            a.why
        );
        a.verdict = Verdict::Quick;
    }
    files.extend(a.plots.iter().map(|p| dir.join(p)));
    let json = serde_json::to_string_pretty(&a).map_err(|e| e.to_string())?;
    crate::files::write_atomic(&dir.join(ANALYSIS_FILE), json.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", dir.join(ANALYSIS_FILE).display()))?;
    let md = render(&a, Path::new(""));
    crate::files::write_atomic(&dir.join("summary.md"), md.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", dir.join("summary.md").display()))?;
    files.push(dir.join(ANALYSIS_FILE));
    files.push(dir.join("summary.md"));
    Ok(files)
}

fn command(plan: &Plan, out: &Path) -> String {
    let mut c = format!("moonlight-ref repro {}", plan.experiment.name());
    if plan.quick {
        c.push_str(" --quick");
    }
    if plan.seeds != plan.experiment.default_seeds() {
        let _ = write!(c, " --seeds {}", plan.seeds);
    }
    let _ = write!(c, " --out {}", out.display());
    c
}

/// One row per run: its tags, sizes, FLOPs and losses.
fn write_table(records: &[RunRecord], path: &Path) -> Result<(), String> {
    let mut keys: Vec<&String> = records.iter().flat_map(|r| r.tags.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut csv = String::from("name");
    for k in &keys {
        let _ = write!(csv, ",{k}");
    }
    csv.push_str(",params_active,tokens,flops,steps,final_train_loss,final_val_loss,wall_s\n");
    for r in records {
        csv.push_str(&r.name);
        for k in &keys {
            let _ = write!(csv, ",{}", tag(r, k));
        }
        let _ = writeln!(
            csv,
            ",{},{},{:.6e},{},{:.6},{:.6},{:.2}",
            r.params_active,
            r.tokens,
            r.flops,
            r.settings.steps,
            r.final_train_loss,
            r.final_val_loss,
            r.wall_s
        );
    }
    crate::files::write_atomic(path, csv.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The scaling law, both protocols.
fn scaling(records: &[RunRecord], dir: &Path, a: &mut Analysis) -> Result<(), String> {
    // The sizes in order of compute.
    let mut sized: Vec<(f64, &str)> = records.iter().map(|r| (r.flops, tag(r, "size"))).collect();
    sized.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut sizes: Vec<&str> = sized.into_iter().map(|s| s.1).collect();
    sizes.dedup();
    // Per size and optimizer: mean val loss over seeds at each lr.
    let mean_at = |size: &str, opt: &str, lr: &str| -> Option<(f64, f64)> {
        let rs: Vec<&RunRecord> = records
            .iter()
            .filter(|r| tag(r, "size") == size && tag(r, "optimizer") == opt && tag(r, "lr") == lr)
            .collect();
        let s = stats(&rs.iter().map(|r| r.final_val_loss).collect::<Vec<_>>())?;
        Some((rs[0].flops, s.mean))
    };
    let lrs = |size: &str, opt: &str| -> Vec<String> {
        let mut l: Vec<String> = records
            .iter()
            .filter(|r| tag(r, "size") == size && tag(r, "optimizer") == opt)
            .map(|r| tag(r, "lr").to_string())
            .collect();
        l.sort();
        l.dedup();
        l
    };
    let best = |size: &str, opt: &str| -> Option<(String, f64, f64)> {
        lrs(size, opt)
            .into_iter()
            .filter_map(|lr| mean_at(size, opt, &lr).map(|(c, l)| (lr, c, l)))
            .min_by(|x, y| x.2.total_cmp(&y.2))
    };
    let (mut adamw, mut muon, mut muon_transfer) = (Vec::new(), Vec::new(), Vec::new());
    let mut lines = String::new();
    // Tuned lrs at an end of the grid: the optimum may lie beyond it.
    let mut edges: Vec<String> = Vec::new();
    for size in &sizes {
        let (Some(ba), Some(bm)) = (best(size, "adamw"), best(size, "muon")) else {
            continue;
        };
        for (opt, b) in [("AdamW", &ba), ("Muon", &bm)] {
            let grid = lrs(size, &opt.to_lowercase());
            let f = |l: &String| l.parse::<f64>().unwrap_or(f64::NAN);
            let (lo, hi) = grid
                .iter()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
                    (l.min(v), h.max(v))
                });
            if grid.len() > 1 && (f(&b.0) == lo || f(&b.0) == hi) {
                edges.push(format!("{opt} at {size} (lr {})", b.0));
            }
        }
        adamw.push((ba.1, ba.2));
        muon.push((bm.1, bm.2));
        let transfer = mean_at(size, "muon", &ba.0);
        if let Some(t) = transfer {
            muon_transfer.push(t);
        }
        let _ = write!(
            lines,
            "{size}: C = {:.2e}, AdamW {:.4} (lr {}), Muon {:.4} (lr {}), Muon at AdamW's lr {}; ",
            ba.1,
            ba.2,
            ba.0,
            bm.2,
            bm.0,
            transfer.map_or("-".into(), |t| format!("{:.4}", t.1))
        );
    }
    let fit_a = fit::fit_power_law(&adamw)?;
    let fit_m = fit::fit_power_law(&muon)?;
    let fit_t = fit::fit_power_law(&muon_transfer)?;
    let ci = fit::bootstrap_ratio(&muon, &adamw, 2000, 1);
    let ci_t = fit::bootstrap_ratio(&muon_transfer, &adamw, 2000, 2);
    let law = |f: &PowerLaw| format!("{:.3}·C^-{:.4}", f.a, f.b);
    let ratio = |r: &Result<fit::RatioInterval, String>| match r {
        Ok(r) => format!(
            "{:.2} (95% bootstrap CI {:.2}–{:.2}, {} resamples)",
            r.estimate, r.lo, r.hi, r.resamples
        ),
        Err(e) => format!("none: {e}"),
    };
    let (c_lo, c_hi) = adamw
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(l, h), p| (l.min(p.0), h.max(p.0)));
    a.setup = format!(
        "{} sizes from {:.2e} to {:.2e} training FLOPs ({:.0}x), each trained on {} tokens per active parameter of fresh generated text (FLOPs = 6·N_active·D plus attention's scores and weighted sum, 6·L·T·H·(d_qk+d_v) per token), lr tuned on the grid {{{}}} per optimizer and size by final validation loss. Fits by least squares in log space; the ratio is Muon's FLOPs over AdamW's at AdamW's fitted loss in the middle of the range (log scale), its interval a bootstrap over the sizes. Per size: {}",
        adamw.len(),
        c_lo,
        c_hi,
        c_hi / c_lo,
        super::experiments::TOKENS_PER_PARAM,
        lrs(sizes.first().copied().unwrap_or(""), "adamw").join(", "),
        lines.trim_end_matches("; ")
    );
    a.figures = vec![
        Figure {
            what: "fit, AdamW".into(),
            ours: law(&fit_a),
            report: "2.608·C^-0.054".into(),
        },
        Figure {
            what: "fit, Muon tuned on its own".into(),
            ours: law(&fit_m),
            report: "2.506·C^-0.052".into(),
        },
        Figure {
            what: "fit, Muon at AdamW's tuned lr (0.2·√max(A,B) scale)".into(),
            ours: law(&fit_t),
            report: "(the report's protocol; same law)".into(),
        },
        Figure {
            what: "Muon's FLOPs for AdamW's loss, tuned on its own".into(),
            ours: ratio(&ci),
            report: "~0.52".into(),
        },
        Figure {
            what: "Muon's FLOPs for AdamW's loss, at AdamW's lr".into(),
            ours: ratio(&ci_t),
            report: "~0.52".into(),
        },
    ];
    (a.verdict, a.why) = match (&ci, &ci_t) {
        (Ok(r), Ok(t)) if r.hi < 1.0 && t.hi < 1.0 && (0.3..=0.8).contains(&r.estimate) => (
            Verdict::Reproduced,
            format!("Muon needs {:.0}% of AdamW's FLOPs (interval below 1 in both protocols)", 100.0 * r.estimate),
        ),
        (Ok(r), _) if r.estimate < 1.0 => (
            Verdict::Partly,
            format!(
                "Muon is more compute-efficient ({:.2}), but the interval reaches {:.2} or the protocols disagree",
                r.estimate, r.hi
            ),
        ),
        (Ok(r), _) => (Verdict::Not, format!("Muon needs {:.2}x AdamW's FLOPs", r.estimate)),
        (Err(e), _) => (Verdict::Not, format!("no ratio: {e}")),
    };
    if !edges.is_empty() {
        let _ = write!(
            a.why,
            ". The best lr is at an end of the grid for {}: those optimizers may be under-tuned there, and the ratio is uncertain by that much more",
            edges.join(", ")
        );
    }
    // The plot: measured best losses as dots, the fits as dashed lines over the range.
    let fit_line = |f: &PowerLaw| -> Vec<(f64, f64)> {
        (0..=20)
            .map(|i| {
                let c = c_lo * (c_hi / c_lo).powf(i as f64 / 20.0);
                (c, f.loss(c))
            })
            .collect()
    };
    let series = vec![
        Series {
            label: "AdamW (tuned)".into(),
            dots: adamw.clone(),
            ..Series::default()
        },
        Series {
            label: format!("AdamW fit {}", law(&fit_a)),
            line: fit_line(&fit_a),
            dashed: true,
            ..Series::default()
        },
        Series {
            label: "Muon (tuned)".into(),
            dots: muon.clone(),
            ..Series::default()
        },
        Series {
            label: format!("Muon fit {}", law(&fit_m)),
            line: fit_line(&fit_m),
            dashed: true,
            ..Series::default()
        },
        Series {
            label: "Muon at AdamW's lr".into(),
            dots: muon_transfer.clone(),
            ..Series::default()
        },
        Series {
            label: format!("Muon at AdamW's lr fit {}", law(&fit_t)),
            line: fit_line(&fit_t),
            dashed: true,
            ..Series::default()
        },
    ];
    let axes = Axes {
        title: "scaling: validation loss vs training FLOPs",
        x: "training FLOPs",
        y: "validation loss (nats/token)",
        log: true,
    };
    plots::plot(&series, &axes, &dir.join("loss_vs_flops.svg"))?;
    a.plots.push("loss_vs_flops.svg".into());
    let fits = serde_json::json!({ "adamw": fit_a, "muon": fit_m, "muon_at_adamw_lr": fit_t,
        "ratio": ci.ok(), "ratio_at_adamw_lr": ci_t.ok() });
    crate::files::write_atomic(&dir.join("fits.json"), fits.to_string().as_bytes())
        .map_err(|e| format!("cannot write fits.json: {e}"))?;
    Ok(())
}

/// `(x, low, high)` of a band.
type Band = (f64, f64, f64);

/// The x value of a curve's point `i`.
type XOf = Box<dyn Fn(&RunRecord, usize) -> f64>;

/// Mean and spread over seeds of the curves of `records`, point by point (the runs of one
/// configuration share their steps). `x` picks the x value of a point: step, FLOPs, seconds.
fn mean_curve(records: &[&RunRecord], x: impl Fn(&RunRecord, usize) -> f64) -> (Vec<(f64, f64)>, Vec<Band>) {
    let n = records.iter().map(|r| r.curve.len()).min().unwrap_or(0);
    let (mut line, mut band) = (Vec::new(), Vec::new());
    for i in 0..n {
        let ys: Vec<f64> = records.iter().map(|r| r.curve[i].loss).collect();
        let xs: Vec<f64> = records.iter().map(|r| x(r, i)).collect();
        let (Some(s), Some(xm)) = (stats(&ys), stats(&xs)) else {
            continue;
        };
        line.push((xm.mean, s.mean));
        band.push((xm.mean, s.min, s.max));
    }
    (line, band)
}

/// Muon vs AdamW curves against steps, FLOPs and time.
fn curves(records: &[RunRecord], dir: &Path, a: &mut Analysis) -> Result<(), String> {
    let by =
        |opt: &str| -> Vec<&RunRecord> { records.iter().filter(|r| tag(r, "optimizer") == opt).collect() };
    let (muon, adamw) = (by("muon"), by("adamw"));
    let flops_per_step = |r: &RunRecord| r.flops / r.settings.steps as f64;
    let xs: [(&str, &str, XOf); 3] = [
        (
            "loss_vs_steps.svg",
            "step",
            Box::new(|r: &RunRecord, i| r.curve[i].step as f64),
        ),
        (
            "loss_vs_flops.svg",
            "training FLOPs",
            Box::new(move |r: &RunRecord, i| r.curve[i].step as f64 * flops_per_step(r)),
        ),
        (
            "loss_vs_time.svg",
            "seconds in training steps",
            Box::new(|r: &RunRecord, i| r.curve[i].time_s),
        ),
    ];
    for (file, xlabel, x) in xs.iter() {
        let mut series = Vec::new();
        for (label, rs) in [("Muon", &muon), ("AdamW", &adamw)] {
            let (line, band) = mean_curve(rs, x);
            series.push(Series {
                label: format!("{label} (mean, min–max over {} seeds)", rs.len()),
                line,
                band,
                ..Series::default()
            });
        }
        let axes = Axes {
            title: "Muon vs AdamW: training loss",
            x: xlabel,
            y: "training loss (nats/token)",
            log: false,
        };
        plots::plot(&series, &axes, &dir.join(file))?;
        a.plots.push(file.to_string());
    }
    let vm = stats(&muon.iter().map(|r| r.final_val_loss).collect::<Vec<_>>()).ok_or("no Muon runs")?;
    let va = stats(&adamw.iter().map(|r| r.final_val_loss).collect::<Vec<_>>()).ok_or("no AdamW runs")?;
    let (lm, _) = mean_curve(&muon, |r, i| r.curve[i].step as f64);
    let (la, _) = mean_curve(&adamw, |r, i| r.curve[i].step as f64);
    let target = la.last().map_or(f64::NAN, |p| p.1);
    let reach = lm.iter().find(|p| p.1 <= target).map(|p| p.0);
    let steps = la.last().map_or(f64::NAN, |p| p.0);
    let ratio = reach.map(|s| s / steps);
    let first = &records[0].settings;
    a.setup = format!(
        "{} ({} active parameters), B={} T={}, {} steps, lr {} and wd {} for both, {} seeds each; the curves are the training loss averaged over {} buckets",
        first.preset,
        records[0].params_active,
        first.batch,
        first.seq,
        first.steps,
        first.lr,
        first.hybrid.muon.weight_decay,
        muon.len(),
        super::record::CURVE_POINTS
    );
    a.figures = vec![
        Figure {
            what: "final val loss, Muon".into(),
            ours: pm(vm),
            report: "-".into(),
        },
        Figure {
            what: "final val loss, AdamW".into(),
            ours: pm(va),
            report: "-".into(),
        },
        Figure {
            what: "Muon's steps (= FLOPs) to AdamW's final training loss, over AdamW's".into(),
            ours: ratio.map_or("not reached".into(), |r| format!("{r:.2}")),
            report: "~0.52 (compute efficiency in the scaling study)".into(),
        },
    ];
    (a.verdict, a.why) = match ratio {
        Some(r) if r < 0.8 && vm.mean < va.mean => (
            Verdict::Reproduced,
            format!(
                "Muon reaches AdamW's final loss in {:.0}% of the steps",
                100.0 * r
            ),
        ),
        Some(r) if vm.mean < va.mean => (
            Verdict::Partly,
            format!(
                "Muon ends lower, but needs {:.0}% of AdamW's steps for its loss",
                100.0 * r
            ),
        ),
        _ => (
            Verdict::Not,
            "Muon does not reach AdamW's final loss sooner".into(),
        ),
    };
    Ok(())
}

/// The update-RMS sweep (Table 8).
fn rms_sweep(records: &[RunRecord], dir: &Path, a: &mut Analysis) -> Result<(), String> {
    let rmss = [0.05, 0.1, 0.2, 0.4, 0.8];
    let report = [3.503, 3.374, 3.325, 3.314, 3.543];
    let muon: Vec<Stats> = rmss
        .iter()
        .map(|r| stats(&val_losses(records, "rms", &r.to_string())).ok_or(format!("no runs at rms {r}")))
        .collect::<Result<_, _>>()?;
    let adamw = stats(&val_losses(records, "rms", "adamw")).ok_or("no AdamW runs")?;
    a.figures = rmss
        .iter()
        .zip(&muon)
        .zip(report)
        .map(|((r, s), rep)| Figure {
            what: format!("val loss, Muon at update RMS {r}"),
            ours: pm(*s),
            report: format!("{rep}"),
        })
        .collect();
    a.figures.push(Figure {
        what: "val loss, AdamW".into(),
        ours: pm(adamw),
        report: "3.679".into(),
    });
    let best = (0..5)
        .min_by(|&i, &j| muon[i].mean.total_cmp(&muon[j].mean))
        .unwrap_or(0);
    let mut order: Vec<usize> = (0..5).collect();
    order.sort_by(|&i, &j| muon[j].mean.total_cmp(&muon[i].mean));
    let extremes_worst = order[..2].contains(&0) && order[..2].contains(&4);
    let middle_beat = (1..4).all(|i| muon[i].mean < adamw.mean);
    (a.verdict, a.why) = match (best == 2 || best == 3, extremes_worst, middle_beat) {
        (true, true, true) => (Verdict::Reproduced, format!("U-shape: best at {}, the extremes worst, 0.1–0.4 beat AdamW", rmss[best])),
        (false, false, false) => (Verdict::Not, format!("no U-shape: best at {}, and not all of 0.1–0.4 beat AdamW", rmss[best])),
        _ => (
            Verdict::Partly,
            format!("best at {} (report: 0.4, 0.2 close), extremes worst: {extremes_worst}, 0.1–0.4 beat AdamW: {middle_beat}", rmss[best]),
        ),
    };
    let first = &records[0].settings;
    a.setup = format!(
        "{} B={} T={}, {} steps, lr {}, {} seeds; Muon's update scale MatchAdamW at each RMS",
        first.preset, first.batch, first.seq, first.steps, first.lr, a.seeds
    );
    let series = vec![
        Series {
            label: "Muon".into(),
            line: rmss.iter().zip(&muon).map(|(r, s)| (*r, s.mean)).collect(),
            band: rmss.iter().zip(&muon).map(|(r, s)| (*r, s.min, s.max)).collect(),
            ..Series::default()
        },
        Series {
            label: "AdamW".into(),
            line: vec![(0.05, adamw.mean), (0.8, adamw.mean)],
            dashed: true,
            ..Series::default()
        },
    ];
    let axes = Axes {
        title: "update-RMS sweep: final val loss (min–max over seeds)",
        x: "Muon update RMS",
        y: "validation loss",
        log: true,
    };
    plots::plot(&series, &axes, &dir.join("val_vs_rms.svg"))?;
    a.plots.push("val_vs_rms.svg".into());
    Ok(())
}

/// Update-scale methods (Table 1).
fn scale_methods(records: &[RunRecord], dir: &Path, a: &mut Analysis) -> Result<(), String> {
    let methods = super::experiments::ScaleMethod::ALL;
    let report = [
        "2.734 / 2.812",
        "2.72 / 2.789",
        "2.721 / 2.789",
        "(not in the table)",
    ];
    let mut means = Vec::new();
    for (m, rep) in methods.iter().zip(report) {
        let rs: Vec<&RunRecord> = records.iter().filter(|r| tag(r, "method") == m.name()).collect();
        let t = stats(&rs.iter().map(|r| r.final_train_loss).collect::<Vec<_>>())
            .ok_or(format!("no runs of {}", m.name()))?;
        let v = stats(&rs.iter().map(|r| r.final_val_loss).collect::<Vec<_>>())
            .ok_or(format!("no runs of {}", m.name()))?;
        a.figures.push(Figure {
            what: format!("train / val loss, {}", m.name()),
            ours: format!("{} / {}", pm(t), pm(v)),
            report: rep.into(),
        });
        means.push(v);
    }
    let (none, matched) = (means[0], means[1]);
    (a.verdict, a.why) = if matched.mean + matched.sd.max(none.sd) < none.mean {
        (
            Verdict::Reproduced,
            "matching AdamW's update RMS beats no scaling by more than the seeds' spread".to_string(),
        )
    } else if matched.mean < none.mean {
        (
            Verdict::Partly,
            "matching AdamW's RMS is better than no scaling, within the seeds' spread".to_string(),
        )
    } else {
        (
            Verdict::Not,
            "no scaling is as good as matching AdamW's RMS".to_string(),
        )
    };
    let first = &records[0].settings;
    a.setup = format!(
        "{} B={} T={}, {} steps, lr {}, {} seeds; none = Unit, match-adamw = 0.2·√max(A,B), adjusted-lr = the same with Muon's weight decay scaled by 0.2·√dim (the lr scaled instead of the update, so decay grows with it), aspect-ratio = √max(1, A/B)",
        first.preset, first.batch, first.seq, first.steps, first.lr, a.seeds
    );
    let series = vec![Series {
        label: "val loss (0 none, 1 match-adamw, 2 adjusted-lr, 3 aspect-ratio)".into(),
        line: means
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64, s.mean))
            .collect(),
        band: means
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64, s.min, s.max))
            .collect(),
        ..Series::default()
    }];
    let axes = Axes {
        title: "update-scale methods: final val loss (min–max over seeds)",
        x: "method",
        y: "validation loss",
        log: false,
    };
    plots::plot(&series, &axes, &dir.join("val_by_method.svg"))?;
    a.plots.push("val_by_method.svg".into());
    Ok(())
}

/// Weight decay when over-trained: the validation curves.
fn wd_overtrain(records: &[RunRecord], dir: &Path, a: &mut Analysis) -> Result<(), String> {
    let mut curves: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut series = Vec::new();
    for variant in ["muon-wd", "muon-nowd", "adamw-wd"] {
        let rs: Vec<&RunRecord> = records.iter().filter(|r| tag(r, "variant") == variant).collect();
        let n = rs.iter().map(|r| r.val_curve.len()).min().unwrap_or(0);
        let mut line = Vec::new();
        let mut band = Vec::new();
        for i in 0..n {
            let ys: Vec<f64> = rs.iter().map(|r| r.val_curve[i].1).collect();
            let s = stats(&ys).ok_or("no values")?;
            let tokens = rs[0].val_curve[i].0 as f64 * (rs[0].settings.batch * rs[0].settings.seq) as f64;
            line.push((tokens, s.mean));
            band.push((tokens, s.min, s.max));
        }
        curves.insert(variant, line.clone());
        series.push(Series {
            label: format!("{variant} ({} seeds)", rs.len()),
            line,
            band,
            ..Series::default()
        });
    }
    let axes = Axes {
        title: "over-trained: validation loss",
        x: "training tokens",
        y: "validation loss",
        log: false,
    };
    plots::plot(&series, &axes, &dir.join("val_vs_tokens.svg"))?;
    a.plots.push("val_vs_tokens.svg".into());
    let (wd, nowd, adamw) = (&curves["muon-wd"], &curves["muon-nowd"], &curves["adamw-wd"]);
    let last = |c: &Vec<(f64, f64)>| c.last().map_or(f64::NAN, |p| p.1);
    let first = |c: &Vec<(f64, f64)>| c.first().map_or(f64::NAN, |p| p.1);
    let crossing = wd
        .iter()
        .zip(nowd)
        .rev()
        .take_while(|(w, n)| w.1 < n.1)
        .last()
        .map(|(w, _)| w.0);
    a.figures = vec![
        Figure {
            what: "final val loss, Muon + wd".into(),
            ours: format!("{:.4}", last(wd)),
            report: "~2.239".into(),
        },
        Figure {
            what: "final val loss, Muon without wd".into(),
            ours: format!("{:.4}", last(nowd)),
            report: "~2.256".into(),
        },
        Figure {
            what: "final val loss, AdamW + wd".into(),
            ours: format!("{:.4}", last(adamw)),
            report: "~2.262".into(),
        },
        Figure {
            what: "Muon + wd ahead of vanilla Muon from".into(),
            ours: crossing.map_or("never at the end".into(), |t| format!("{t:.3e} tokens")),
            report: "near the end of 100B tokens".into(),
        },
    ];
    let leads_early = first(nowd) < first(wd);
    let ends_ahead = last(wd) < last(nowd);
    (a.verdict, a.why) = match (leads_early, ends_ahead) {
        (true, true) => (
            Verdict::Reproduced,
            "vanilla Muon leads early, Muon with weight decay overtakes it".into(),
        ),
        (false, true) => (
            Verdict::Partly,
            "Muon with weight decay ends ahead, but vanilla Muon does not lead early".into(),
        ),
        (_, false) => (
            Verdict::Not,
            "Muon with weight decay does not end ahead of vanilla Muon".into(),
        ),
    };
    let r = &records[0];
    // What limits the verdict, from the curves: how the gap moves, and whether the model is
    // still learning at the end (the report's regime is a loss near its floor).
    let gaps: Vec<(f64, f64)> = wd.iter().zip(nowd).map(|(w, n)| (w.0, w.1 - n.1)).collect();
    let widest = gaps
        .iter()
        .copied()
        .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
        .unwrap_or((f64::NAN, f64::NAN));
    let near = |c: &Vec<(f64, f64)>, t: f64| {
        c.iter()
            .min_by(|x, y| (x.0 - t).abs().total_cmp(&(y.0 - t).abs()))
            .map_or(f64::NAN, |p| p.1)
    };
    // Per seed: the final losses' range within a variant, and the seeds where wd is behind.
    let final_of = |variant: &str, seed: &str| {
        records
            .iter()
            .find(|r| tag(r, "variant") == variant && tag(r, "seed") == seed)
            .map(|r| r.final_val_loss)
    };
    let seeds: std::collections::BTreeSet<&str> = records.iter().map(|r| tag(r, "seed")).collect();
    let spread = ["muon-wd", "muon-nowd", "adamw-wd"]
        .iter()
        .filter_map(|v| stats(&seeds.iter().filter_map(|s| final_of(v, s)).collect::<Vec<_>>()))
        .map(|s| s.max - s.min)
        .fold(0.0f64, f64::max);
    let behind = seeds
        .iter()
        .filter(|s| matches!((final_of("muon-wd", s), final_of("muon-nowd", s)), (Some(w), Some(n)) if w > n))
        .count();
    let rule_tokens = (r.params_active * super::experiments::TOKENS_PER_PARAM) as f64;
    let end_tokens = nowd.last().map_or(f64::NAN, |p| p.0);
    let _ = write!(
        a.why,
        ". Muon + wd minus vanilla Muon, validation loss: {:+.3} at the first evaluation, {:+.3} at its widest ({:.2e} tokens), {:+.3} at the end. What limits this: the rule is far from compute-optimal for this model (vanilla Muon's validation loss {:.3} at the rule's tokens, {:.3} at 90% of the run, {:.3} at the end, {:.0}x the rule), so this is not necessarily the over-trained regime of the report's 100B-token run, where decay pays off late; it trains in f32, where the report's reason for decay (without it, weights and layer outputs grow past bf16's precision) cannot act; and {} seeds, whose final losses spread over {:.3} (the widest range of a variant), with wd behind in {} of them",
        gaps.first().map_or(f64::NAN, |g| g.1),
        widest.1,
        widest.0,
        gaps.last().map_or(f64::NAN, |g| g.1),
        near(nowd, rule_tokens),
        near(nowd, 0.9 * end_tokens),
        last(nowd),
        end_tokens / rule_tokens,
        a.seeds,
        spread,
        behind,
    );
    a.setup = format!(
        "{} active parameters trained on {} tokens ({:.1}x the {}-tokens-per-parameter rule, fresh generated text), B={} T={}, lr {}, {} seeds; wd 0.1 vs 0",
        r.params_active,
        r.tokens,
        r.tokens as f64 / (r.params_active * super::experiments::TOKENS_PER_PARAM) as f64,
        super::experiments::TOKENS_PER_PARAM,
        r.settings.batch,
        r.settings.seq,
        r.settings.lr,
        a.seeds
    );
    Ok(())
}

/// SVD entropy per kind of matrix.
fn svd_entropy(records: &[RunRecord], dir: &Path, a: &mut Analysis) -> Result<(), String> {
    let kinds = ["attention", "dense_ffn", "experts", "router"];
    let mut higher = 0;
    let mut series = Vec::new();
    let mut compared = 0;
    let mut got: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (ki, kind) in kinds.iter().enumerate() {
        let mut pair = Vec::new();
        for opt in ["muon", "adamw"] {
            let v: Vec<f64> = records
                .iter()
                .filter(|r| tag(r, "optimizer") == opt)
                .filter_map(|r| r.svd_entropy.get(*kind).copied())
                .collect();
            if let Some(s) = stats(&v) {
                pair.push(s);
                got.entry(opt).or_default().push((ki as f64, s.mean));
            }
        }
        if let [m, w] = pair[..] {
            compared += 1;
            if m.mean > w.mean {
                higher += 1;
            }
            let report = if *kind == "router" {
                "0.905 vs 0.775"
            } else {
                "higher under Muon"
            };
            a.figures.push(Figure {
                what: format!("SVD entropy, {kind}: Muon vs AdamW"),
                ours: format!("{} vs {}", pm(m), pm(w)),
                report: report.into(),
            });
        }
    }
    for opt in ["muon", "adamw"] {
        series.push(Series {
            label: format!("{opt} (0 attention, 1 dense FFN, 2 experts, 3 router)"),
            dots: got.remove(opt).unwrap_or_default(),
            ..Series::default()
        });
    }
    let axes = Axes {
        title: "normalized SVD entropy of the trained matrices",
        x: "kind",
        y: "mean normalized SVD entropy",
        log: false,
    };
    plots::plot(&series, &axes, &dir.join("svd_entropy.svg"))?;
    a.plots.push("svd_entropy.svg".into());
    (a.verdict, a.why) = if compared > 0 && higher == compared {
        (
            Verdict::Reproduced,
            format!("higher under Muon for all {compared} kinds"),
        )
    } else if higher > 0 {
        (
            Verdict::Partly,
            format!("higher under Muon for {higher} of {compared} kinds"),
        )
    } else {
        (Verdict::Not, "not higher under Muon".into())
    };
    let first = &records[0].settings;
    a.setup = format!("the curves experiment's runs ({}, {} steps, {} seeds); every matrix of an expert stack counted on its own, shared experts with the experts", first.preset, first.steps, a.seeds);
    Ok(())
}

/// An analysis as markdown; plot links are `plot_dir` joined with the file name.
pub fn render(a: &Analysis, plot_dir: &Path) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## {}{}\n",
        a.experiment,
        if a.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(md, "- command: `{}`", a.command);
    let _ = writeln!(md, "- machine: {}", a.machine);
    let _ = writeln!(md, "- runs: {}, {:.0} s of wall time in all", a.runs, a.wall_s);
    if !a.commits.is_empty() {
        let _ = writeln!(md, "- commit: {}", a.commits.join(", "));
    }
    let _ = writeln!(md, "- setup: {}", a.setup);
    let _ = writeln!(
        md,
        "- table: [{}]({})\n",
        a.table,
        plot_dir.join(&a.table).display()
    );
    for p in &a.plots {
        let _ = writeln!(md, "![{p}]({})\n", plot_dir.join(p).display());
    }
    let _ = writeln!(md, "| figure | this project | the report |\n| --- | --- | --- |");
    for f in &a.figures {
        let _ = writeln!(md, "| {} | {} | {} |", f.what, f.ours, f.report);
    }
    let _ = writeln!(md, "\n**Verdict: {}.** {}\n", verdict_words(a.verdict), a.why);
    md
}

/// A verdict in words.
fn verdict_words(v: Verdict) -> &'static str {
    match v {
        Verdict::Reproduced => "reproduced",
        Verdict::Partly => "partly reproduced",
        Verdict::Not => "not reproduced",
        Verdict::Quick => "no verdict",
    }
}

/// REPRODUCTION.md from the analyses under `out`: each experiment's section, or, for one
/// not run at full size, the command that runs it. `md` is where the file goes (plot links
/// are relative to it).
pub fn report(out: &Path, md: &Path, notes: &str) -> Result<String, String> {
    let base = md
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let rel = relative(out, base);
    let mut text = String::from(
        "# Reproducing the Moonlight report's experiments\n\nGenerated by `moonlight-ref repro report` from the run records in ",
    );
    let _ = writeln!(text, "`{}` (`runs.jsonl`: one line per run with its settings, seed, commit, wall time, FLOPs and losses). Every figure under \"this project\" comes from those runs; the report's figures are quoted beside them.\n", rel.display());
    if !notes.is_empty() {
        let _ = writeln!(text, "{notes}\n");
    }
    // The verdicts at a glance, each with the first sentence of its reason.
    let mut glance = String::from("| experiment | verdict | in short |\n| --- | --- | --- |\n");
    let mut any = false;
    for e in Experiment::ALL {
        let path = out.join(e.name()).join(ANALYSIS_FILE);
        if let Ok(bytes) = std::fs::read(&path) {
            let a: Analysis =
                serde_json::from_slice(&bytes).map_err(|err| format!("{}: {err}", path.display()))?;
            let short = a.why.split(". ").next().unwrap_or("").trim_end_matches('.');
            let _ = writeln!(
                glance,
                "| [{}](#{}{}) | {} | {short} |",
                e.name(),
                e.name(),
                // The section's anchor, as GitHub makes it from the heading `render` writes.
                if a.quick { "---quick" } else { "" },
                verdict_words(a.verdict)
            );
            any = true;
        }
    }
    if any {
        let _ = writeln!(text, "{glance}");
    }
    for e in Experiment::ALL {
        let path = out.join(e.name()).join(ANALYSIS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let a: Analysis =
                    serde_json::from_slice(&bytes).map_err(|err| format!("{}: {err}", path.display()))?;
                text.push_str(&render(&a, &rel.join(e.name())));
                if a.quick {
                    let _ = writeln!(
                        text,
                        "Not run at full size here: `moonlight-ref repro {} --out {}` runs it.\n",
                        e.name(),
                        rel.display()
                    );
                }
            }
            Err(_) => {
                let _ = writeln!(
                    text,
                    "## {}\n\nNot run here (no time on this machine). `moonlight-ref repro {} --out {}` runs it; it resumes where it stopped.\n",
                    e.name(),
                    e.name(),
                    rel.display()
                );
            }
        }
    }
    Ok(text)
}

/// `path` relative to `base` when both resolve and one contains the other, else `path`.
fn relative(path: &Path, base: &Path) -> PathBuf {
    match (path.canonicalize(), base.canonicalize()) {
        (Ok(p), Ok(b)) => p
            .strip_prefix(&b)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_by_hand() {
        let s = stats(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.mean, s.sd, s.min, s.max), (2.0, 1.0, 1.0, 3.0));
        assert_eq!(stats(&[5.0]).unwrap().sd, 0.0);
        assert!(stats(&[]).is_none());
    }
}
