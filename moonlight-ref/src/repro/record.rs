//! The machine-readable record of every run: one JSON object per line of `DIR/runs.jsonl`,
//! appended whole when a run finishes, and what goes into it (FLOPs, the machine, the commit,
//! the loss curves, the SVD entropy per kind of matrix).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::config::{Attention, ModelConfig};
use crate::log::Record;
use crate::train::RunSettings;

/// The record file inside the output directory.
pub const RECORDS_FILE: &str = "runs.jsonl";

/// One point of a run's curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// The step, from 1.
    pub step: u64,
    /// The training loss, a running mean over the steps since the previous point.
    pub loss: f64,
    /// Seconds spent in training steps up to this one (all segments of a resumed run).
    pub time_s: f64,
}

/// Everything kept of one finished run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's directory name under `DIR/runs`.
    pub name: String,
    /// The experiment that asked for it.
    pub experiment: String,
    /// What the experiment varies, by name (`lr`, `size`, `rms`, `method`, ...).
    pub tags: BTreeMap<String, String>,
    /// The run's full settings (model, optimizer, hyperparameters, schedule, seed).
    pub settings: RunSettings,
    /// The data it trained on: the corpus file's name inside `DIR/data` (its size is in the
    /// name), so that a finished run is never mixed with runs on other data.
    #[serde(default)]
    pub data: String,
    /// The seed (also in `settings`), for grouping.
    pub seed: u64,
    /// The git commit when the record was written, when known: `MOONLIGHT_REF_COMMIT` if set
    /// (at run or build time), else the checked-out `HEAD` (which a binary built from a dirty
    /// tree or an older checkout does not match: set the variable to pin it).
    pub commit: Option<String>,
    /// The machine: CPU model and core count.
    pub machine: String,
    /// Worker threads the run used.
    pub threads: usize,
    /// Wall-clock seconds of the process that finished the run (the whole run unless it
    /// resumed from a checkpoint).
    pub wall_s: f64,
    /// Seconds in training steps, over all segments.
    pub step_s: f64,
    /// Whether some steps ran in an earlier process.
    pub resumed: bool,
    /// Training tokens: steps * batch * seq.
    pub tokens: u64,
    /// Parameters a token uses.
    pub params_active: u64,
    /// All parameters.
    pub params_total: u64,
    /// Training FLOPs ([`training_flops`]).
    pub flops: f64,
    /// Mean training loss of the last 10 steps.
    pub final_train_loss: f64,
    /// The last validation loss.
    pub final_val_loss: f64,
    /// Mean normalized SVD entropy per kind of hidden matrix (`attention`, `dense_ffn`,
    /// `experts`, `router`).
    pub svd_entropy: BTreeMap<String, f64>,
    /// The training loss, at most [`CURVE_POINTS`] points.
    pub curve: Vec<CurvePoint>,
    /// `(step, validation loss)` of every evaluation.
    pub val_curve: Vec<(u64, f64)>,
}

/// The most points a record keeps of a training curve.
pub const CURVE_POINTS: usize = 100;

/// Appends `record` to `path` as one line, written with one call so that a reader never sees
/// half of it (a crash mid-write leaves at most an unterminated last line, which
/// [`read_records`] skips).
pub fn append(path: &Path, record: &RunRecord) -> Result<(), String> {
    let mut line = serde_json::to_string(record)
        .map_err(|e| format!("cannot encode the record of {}: {e}", record.name))?;
    line.push('\n');
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("cannot append to {}: {e}", path.display()))
}

/// The records of `path` (none if it does not exist), the last one per run name winning.
/// An unterminated last line is a write in progress and is skipped; any other bad line is an
/// error naming it.
pub fn read_records(path: &Path) -> Result<Vec<RunRecord>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut out: Vec<RunRecord> = Vec::new();
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        if !line.ends_with(b"\n") {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let r: RunRecord = serde_json::from_slice(line)
            .map_err(|e| format!("{} line {}: not a run record: {e}", path.display(), i + 1))?;
        match out.iter_mut().find(|o| o.name == r.name) {
            Some(old) => *old = r,
            None => out.push(r),
        }
    }
    Ok(out)
}

/// Training FLOPs of `steps` steps: `6 * N_active * D` for the weights (forward 2, backward 4
/// FLOPs per active parameter per token) plus attention's scores and weighted sum, which have
/// no parameters: per token and layer, forward `2 * T * H * (d_qk + d_v)` (a query against
/// all T keys, as Chinchilla counts it, without halving for the causal mask), times 3 for the
/// backward pass. Evaluation is not counted.
pub fn training_flops(model: &ModelConfig, batch: usize, seq: usize, steps: u64) -> f64 {
    let tokens = steps as f64 * (batch * seq) as f64;
    tokens * flops_per_token(model, seq)
}

/// Training FLOPs per token of a `seq`-token context (see [`training_flops`]).
pub fn flops_per_token(model: &ModelConfig, seq: usize) -> f64 {
    let active = model.param_counts().active as f64;
    let (qk, v) = match model.attention {
        Attention::Mha => (model.head_dim, model.head_dim),
        Attention::Mla {
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            ..
        } => (qk_nope_head_dim + qk_rope_head_dim, v_head_dim),
    };
    let attention = 6.0 * (model.n_layers * seq * model.n_heads * (qk + v)) as f64;
    6.0 * active + attention
}

/// The git commit: `MOONLIGHT_REF_COMMIT` at run time, else at build time, else `git
/// rev-parse HEAD` in the working directory; `None` when none of them knows.
pub fn git_commit() -> Option<String> {
    if let Ok(c) = std::env::var("MOONLIGHT_REF_COMMIT") {
        return Some(c);
    }
    if let Some(c) = option_env!("MOONLIGHT_REF_COMMIT") {
        return Some(c.to_string());
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let c = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !c.is_empty()).then_some(c)
}

/// The machine in words: the CPU model (Linux) and the cores this process may use.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{cpu}, {cores} cores")
}

/// The kind of a hidden matrix by its parameter name, for the SVD entropy: `attention`,
/// `dense_ffn`, `experts` (routed and shared) or `router`; `None` for anything else
/// (embedding, head, norms).
pub fn matrix_kind(name: &str) -> Option<&'static str> {
    if name.ends_with(".router") {
        Some("router")
    } else if name.contains(".moe.") {
        Some("experts")
    } else if name.contains(".ffn.") {
        Some("dense_ffn")
    } else if name.contains(".attn.") && !name.ends_with("_norm") {
        Some("attention")
    } else {
        None
    }
}

/// Mean normalized SVD entropy per kind of the checkpoint's matrices, each matrix of an
/// expert stack on its own. A matrix whose SVD does not converge is left out of this
/// diagnostic.
pub fn svd_entropy_by_kind(ckpt: &Checkpoint) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for t in &ckpt.params {
        let Some(kind) = matrix_kind(&t.name) else {
            continue;
        };
        if !t.shape.is_matrix() {
            continue;
        }
        let (rows, cols) = (t.shape.rows, t.shape.cols);
        for item in t.data.chunks_exact(rows * cols) {
            let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| item[i * cols + j] as f64);
            if let Some(h) = m.singular_values().ok().and_then(|s| muon_core::svd_entropy(&s)) {
                let e = sums.entry(kind.to_string()).or_insert((0.0, 0));
                e.0 += h;
                e.1 += 1;
            }
        }
    }
    sums.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect()
}

/// The curves of a run's log: the training loss averaged into at most [`CURVE_POINTS`]
/// buckets (each point the mean of its bucket, at the bucket's last step), the cumulative
/// step time, and the evaluations. Also returns the total step time.
pub fn curves(records: &[Record]) -> (Vec<CurvePoint>, Vec<(u64, f64)>, f64) {
    let steps: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some(s),
            _ => None,
        })
        .collect();
    let bucket = steps.len().div_ceil(CURVE_POINTS).max(1);
    let (mut curve, mut time) = (Vec::new(), 0.0);
    for chunk in steps.chunks(bucket) {
        let mut sum = 0.0;
        for s in chunk {
            sum += s.loss;
            time += (s.fwd_bwd_ms + s.optimizer_ms) / 1e3;
        }
        curve.push(CurvePoint {
            step: chunk[chunk.len() - 1].step,
            loss: sum / chunk.len() as f64,
            time_s: time,
        });
    }
    let val = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some((e.step, e.val_loss)),
            _ => None,
        })
        .collect();
    (curve, val, time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_count_the_weights_and_attention_by_hand() {
        // MHA, 2 layers, 2 heads of 8, context 16: attention is 6 * 2 * 16 * 2 * (8 + 8) per
        // token = 6144; the weights 6 * N_active.
        let model = ModelConfig {
            attention: Attention::Mha,
            n_layers: 2,
            n_heads: 2,
            head_dim: 8,
            dim: 16,
            dense_layers: 2,
            dense_ffn_width: 32,
            ..ModelConfig::tiny()
        };
        let n = model.param_counts().active as f64;
        let per_token = 6.0 * n + 6144.0;
        assert_eq!(flops_per_token(&model, 16), per_token);
        assert_eq!(training_flops(&model, 4, 16, 10), per_token * 640.0);
    }

    #[test]
    fn kinds_by_name() {
        assert_eq!(matrix_kind("layers.0.attn.wq"), Some("attention"));
        assert_eq!(matrix_kind("layers.0.attn.kv_norm"), None);
        assert_eq!(matrix_kind("layers.0.ffn.w_up"), Some("dense_ffn"));
        assert_eq!(matrix_kind("layers.1.moe.experts.w_up"), Some("experts"));
        assert_eq!(matrix_kind("layers.1.moe.shared.w_down"), Some("experts"));
        assert_eq!(matrix_kind("layers.1.moe.router"), Some("router"));
        assert_eq!(matrix_kind("embed"), None);
        assert_eq!(matrix_kind("layers.1.ffn_norm"), None);
    }

    #[test]
    fn records_append_whole_lines_and_the_last_of_a_name_wins() {
        let dir = std::env::temp_dir().join(format!("repro-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(RECORDS_FILE);
        assert!(read_records(&path).unwrap().is_empty());
        let settings = RunSettings::new("tiny", ModelConfig::tiny(), crate::train::OptimizerChoice::Muon);
        let mut r = RunRecord {
            name: "a".into(),
            experiment: "curves".into(),
            tags: BTreeMap::new(),
            settings,
            data: "corpus-1000.txt".into(),
            seed: 1,
            commit: None,
            machine: machine(),
            threads: 1,
            wall_s: 1.0,
            step_s: 0.5,
            resumed: false,
            tokens: 10,
            params_active: 5,
            params_total: 6,
            flops: 300.0,
            final_train_loss: 2.0,
            final_val_loss: 2.1,
            svd_entropy: BTreeMap::new(),
            curve: vec![],
            val_curve: vec![(1, 2.1)],
        };
        append(&path, &r).unwrap();
        r.name = "b".into();
        append(&path, &r).unwrap();
        r.final_val_loss = 1.5;
        append(&path, &r).unwrap();
        // A line cut short by a crash is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"name\":\"c\"")
            .unwrap();
        let got = read_records(&path).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[1].name.as_str(), got[1].final_val_loss), ("b", 1.5));
        std::fs::write(&path, "not json\n").unwrap();
        assert!(read_records(&path).unwrap_err().contains("line 1"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
