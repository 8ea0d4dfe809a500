//! The experiments: which training runs each one is, at full size and `--quick`.
//!
//! Every run is a [`RunSpec`]: a name (its directory under `DIR/runs`), the tags the analysis
//! groups it by, and the [`RunSettings`] the library trains. A plan is fixed by the experiment,
//! `--quick` and `--seeds`, so running it again finds the same runs.

use std::collections::BTreeMap;
use std::fmt;

use muon_core::UpdateScale;

use crate::config::{Attention, ModelConfig};
use crate::train::{OptimizerChoice, RunSettings};

/// One experiment of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Experiment {
    /// Muon vs AdamW over model sizes, compute-optimal tokens, lr tuned per size.
    Scaling,
    /// Muon vs AdamW loss curves over seeds.
    Curves,
    /// Muon at update RMS 0.05 .. 0.8 against AdamW (the report's Table 8).
    RmsSweep,
    /// Muon's update-scale methods (the report's Table 1).
    ScaleMethods,
    /// Muon with and without weight decay, trained well past compute-optimal.
    WdOvertrain,
    /// Normalized SVD entropy per kind of matrix, Muon vs AdamW.
    SvdEntropy,
}

impl Experiment {
    /// All experiments, in the order `all` runs them (cheap and shared runs first).
    pub const ALL: [Experiment; 6] = [
        Experiment::Curves,
        Experiment::SvdEntropy,
        Experiment::Scaling,
        Experiment::RmsSweep,
        Experiment::ScaleMethods,
        Experiment::WdOvertrain,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Experiment::Scaling => "scaling",
            Experiment::Curves => "curves",
            Experiment::RmsSweep => "rms-sweep",
            Experiment::ScaleMethods => "scale-methods",
            Experiment::WdOvertrain => "wd-overtrain",
            Experiment::SvdEntropy => "svd-entropy",
        }
    }

    /// The experiment named `name`.
    pub fn parse(name: &str) -> Result<Experiment, String> {
        Experiment::ALL
            .into_iter()
            .find(|e| e.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Experiment::ALL.iter().map(|e| e.name()).collect();
                format!(
                    "unknown experiment `{name}`; the experiments are: {}, all",
                    names.join(", ")
                )
            })
    }

    /// Seeds when `--seeds` is not given: 3 (2 for the long weight-decay runs, 1 for the
    /// scaling law, whose interval comes from a bootstrap over sizes).
    pub fn default_seeds(self) -> usize {
        match self {
            Experiment::Scaling => 1,
            Experiment::WdOvertrain => 2,
            _ => 3,
        }
    }
}

impl fmt::Display for Experiment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One training run of an experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// Its directory name under `DIR/runs`, unique to its settings within the plan.
    pub name: String,
    /// What the analysis groups it by (`optimizer`, `seed`, `lr`, `size`, `rms`, ...).
    pub tags: BTreeMap<String, String>,
    /// What the library trains.
    pub settings: RunSettings,
    /// Evaluate every this many steps.
    pub eval_every: u64,
    /// Batches per evaluation.
    pub eval_batches: usize,
}

/// The runs of one experiment.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The experiment.
    pub experiment: Experiment,
    /// `--quick`.
    pub quick: bool,
    /// Seeds per configuration.
    pub seeds: usize,
    /// The runs, in the order they train.
    pub runs: Vec<RunSpec>,
}

impl Plan {
    /// The most training tokens of any run: the generated corpus is sized from it.
    pub fn max_tokens(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.settings.steps * (r.settings.batch * r.settings.seq) as u64)
            .max()
            .unwrap_or(0)
    }
}

/// Training tokens per active parameter in the scaling experiment (Chinchilla's rule).
pub const TOKENS_PER_PARAM: u64 = 20;
/// Quick runs of the token-rule experiments train on this fraction of the rule's tokens.
const QUICK_DIVISOR: u64 = 200;
/// How many times over compute-optimal the weight-decay experiment trains.
pub const OVERTRAIN_FACTOR: u64 = 10;

/// A Moonlight-shaped model of width `dim` and `layers` blocks: MLA with heads of 8 (latent
/// `dim / 2`, RoPE part 4), one dense block of width `3 * dim`, then MoE blocks of 8 experts of
/// width `dim` (top-2, one shared), byte vocabulary. Context `seq`.
pub fn ladder_model(dim: usize, layers: usize, seq: usize) -> ModelConfig {
    let head = 8;
    ModelConfig {
        dim,
        n_layers: layers,
        n_heads: (dim / head).max(1),
        head_dim: head,
        attention: Attention::Mla {
            kv_lora_rank: (dim / 2).max(4),
            qk_nope_head_dim: head,
            qk_rope_head_dim: 4,
            v_head_dim: head,
        },
        dense_layers: 1,
        dense_ffn_width: 3 * dim,
        n_routed_experts: 8,
        n_shared_experts: 1,
        expert_width: dim,
        top_k: 2,
        max_seq_len: seq,
        ..ModelConfig::tiny()
    }
}

/// The scaling ladder, `(dim, layers)`: five sizes whose compute-optimal training compute
/// spans more than 100x (tested).
pub fn scaling_sizes(quick: bool) -> &'static [(usize, usize)] {
    if quick {
        &[(8, 2), (16, 2), (24, 2), (32, 2), (48, 2)]
    } else {
        &[(8, 2), (12, 2), (16, 2), (24, 3), (32, 4)]
    }
}

/// The learning-rate grid of the scaling experiment, the same for both optimizers (so
/// Muon at AdamW's tuned lr, the second protocol, is one of Muon's runs). Doubling steps from
/// 5e-3: with the grid ending at 2e-2, then at 4e-2, then at 8e-2, the best lr was at its top
/// for most optimizers and sizes, so it goes on to 1.6e-1.
pub fn scaling_lrs(quick: bool) -> &'static [f64] {
    if quick {
        &[1e-2, 3e-2]
    } else {
        &[5e-3, 1e-2, 2e-2, 4e-2, 8e-2, 1.6e-1]
    }
}

/// The plan of `experiment` with `seeds` seeds per configuration (the experiment's default
/// when `None`).
pub fn plan(experiment: Experiment, quick: bool, seeds: Option<usize>) -> Result<Plan, String> {
    let seeds = seeds.unwrap_or_else(|| experiment.default_seeds());
    if seeds == 0 {
        return Err("--seeds must be at least 1".into());
    }
    let mut runs = Vec::new();
    let base = Base::new(quick);
    match experiment {
        Experiment::Scaling => {
            for &(dim, layers) in scaling_sizes(quick) {
                let model = ladder_model(dim, layers, base.seq);
                let n = model.param_counts().active;
                // Quick runs train on a 200th of the rule's tokens: the pipeline, not the law,
                // is what they check.
                let tokens = if quick {
                    n * TOKENS_PER_PARAM / QUICK_DIVISOR
                } else {
                    n * TOKENS_PER_PARAM
                };
                let steps = tokens.div_ceil((base.batch * base.seq) as u64).max(4);
                for optimizer in [OptimizerChoice::AdamW, OptimizerChoice::Muon] {
                    for &lr in scaling_lrs(quick) {
                        for seed in 1..=seeds as u64 {
                            let mut s = base.settings(
                                &format!("d{dim}l{layers}"),
                                model.clone(),
                                optimizer,
                                steps,
                                seed,
                            );
                            s.lr = lr;
                            runs.push(base.spec(
                                format!("scaling-d{dim}l{layers}-{optimizer}-lr{lr}-s{seed}"),
                                &[("size", format!("d{dim}l{layers}")), ("lr", lr.to_string())],
                                s,
                            ));
                        }
                    }
                }
            }
        }
        // SVD entropy is measured on the curves' runs: the same names, trained once.
        Experiment::Curves | Experiment::SvdEntropy => {
            for optimizer in [OptimizerChoice::Muon, OptimizerChoice::AdamW] {
                for seed in 1..=seeds as u64 {
                    let s = base.settings(&base.preset, base.model.clone(), optimizer, base.steps, seed);
                    runs.push(base.spec(format!("curves-{optimizer}-s{seed}"), &[], s));
                }
            }
        }
        Experiment::RmsSweep => {
            for seed in 1..=seeds as u64 {
                for rms in [0.05, 0.1, 0.2, 0.4, 0.8] {
                    let mut s = base.settings(
                        &base.preset,
                        base.model.clone(),
                        OptimizerChoice::Muon,
                        base.sweep_steps,
                        seed,
                    );
                    s.hybrid.muon.update_scale = UpdateScale::MatchAdamW { rms };
                    runs.push(base.spec(format!("rms-{rms}-s{seed}"), &[("rms", rms.to_string())], s));
                }
                let s = base.settings(
                    &base.preset,
                    base.model.clone(),
                    OptimizerChoice::AdamW,
                    base.sweep_steps,
                    seed,
                );
                runs.push(base.spec(format!("rms-adamw-s{seed}"), &[("rms", "adamw".into())], s));
            }
        }
        Experiment::ScaleMethods => {
            for seed in 1..=seeds as u64 {
                for method in ScaleMethod::ALL {
                    let mut s = base.settings(
                        &base.preset,
                        base.model.clone(),
                        OptimizerChoice::Muon,
                        base.sweep_steps,
                        seed,
                    );
                    method.apply(&mut s);
                    runs.push(base.spec(
                        format!("scale-{}-s{seed}", method.name()),
                        &[("method", method.name().into())],
                        s,
                    ));
                }
            }
        }
        Experiment::WdOvertrain => {
            let model = base.overtrain_model.clone();
            let n = model.param_counts().active;
            let factor = if quick { 1 } else { OVERTRAIN_FACTOR };
            let divisor = if quick { QUICK_DIVISOR } else { 1 };
            let tokens = n * TOKENS_PER_PARAM * factor / divisor;
            let steps = tokens.div_ceil((base.batch * base.seq) as u64).max(4);
            for seed in 1..=seeds as u64 {
                for (label, optimizer, wd) in [
                    ("muon-wd", OptimizerChoice::Muon, 0.1),
                    ("muon-nowd", OptimizerChoice::Muon, 0.0),
                    ("adamw-wd", OptimizerChoice::AdamW, 0.1),
                ] {
                    let mut s = base.settings("overtrain", model.clone(), optimizer, steps, seed);
                    s.hybrid.muon.weight_decay = wd;
                    s.hybrid.adamw.weight_decay = wd;
                    let mut spec = base.spec(format!("wd-{label}-s{seed}"), &[("variant", label.into())], s);
                    spec.eval_every = (steps / 20).max(1);
                    runs.push(spec);
                }
            }
        }
    }
    Ok(Plan {
        experiment,
        quick,
        seeds,
        runs,
    })
}

/// Muon's update-scale methods of the report's Table 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMethod {
    /// No scale: the orthogonalized update as it is (RMS about `1/sqrt(max(A,B))`).
    None,
    /// `0.2 * sqrt(max(A,B))`: the update RMS matches AdamW's.
    MatchAdamW,
    /// The same factor applied to the lr instead, so the weight decay (which uses the lr)
    /// grows with it: the toy trainer's form. Expressed here as `MatchAdamW` with Muon's
    /// weight decay times `0.2 * sqrt(dim)`, the factor of the model's `dim`-sided matrices
    /// (other shapes get that factor too: an approximation).
    AdjustedLr,
    /// Keller Jordan's `sqrt(max(1, A/B))`.
    AspectRatio,
}

impl ScaleMethod {
    /// All methods, in the table's order.
    pub const ALL: [ScaleMethod; 4] = [
        ScaleMethod::None,
        ScaleMethod::MatchAdamW,
        ScaleMethod::AdjustedLr,
        ScaleMethod::AspectRatio,
    ];

    /// The name in run names and tables.
    pub fn name(self) -> &'static str {
        match self {
            ScaleMethod::None => "none",
            ScaleMethod::MatchAdamW => "match-adamw",
            ScaleMethod::AdjustedLr => "adjusted-lr",
            ScaleMethod::AspectRatio => "aspect-ratio",
        }
    }

    fn apply(self, s: &mut RunSettings) {
        let muon = &mut s.hybrid.muon;
        match self {
            ScaleMethod::None => muon.update_scale = UpdateScale::Unit,
            ScaleMethod::MatchAdamW => muon.update_scale = UpdateScale::MatchAdamW { rms: 0.2 },
            ScaleMethod::AdjustedLr => {
                muon.update_scale = UpdateScale::MatchAdamW { rms: 0.2 };
                muon.weight_decay *= 0.2 * (s.model.dim as f64).sqrt();
            }
            ScaleMethod::AspectRatio => muon.update_scale = UpdateScale::AspectRatio,
        }
    }
}

/// The shared shape of the runs: batch, context, steps and models, full size or quick.
struct Base {
    preset: String,
    model: ModelConfig,
    overtrain_model: ModelConfig,
    batch: usize,
    seq: usize,
    /// Steps of the curves.
    steps: u64,
    /// Steps of the RMS and scale-method sweeps.
    sweep_steps: u64,
    eval_batches: usize,
}

impl Base {
    fn new(quick: bool) -> Base {
        if quick {
            Base {
                preset: "quick".into(),
                model: ladder_model(16, 2, 16),
                overtrain_model: ladder_model(16, 2, 16),
                batch: 4,
                seq: 16,
                steps: 12,
                sweep_steps: 8,
                eval_batches: 1,
            }
        } else {
            Base {
                preset: "tiny".into(),
                model: ModelConfig::tiny(),
                overtrain_model: ladder_model(16, 2, 64),
                batch: 16,
                seq: 64,
                steps: 500,
                sweep_steps: 300,
                eval_batches: 8,
            }
        }
    }

    /// Moonlight's recipe (RunSettings::new) at this size, warm-up a tenth of the run.
    fn settings(
        &self,
        preset: &str,
        model: ModelConfig,
        optimizer: OptimizerChoice,
        steps: u64,
        seed: u64,
    ) -> RunSettings {
        let mut s = RunSettings::new(preset, model, optimizer);
        s.steps = steps;
        s.warmup = (steps / 10).max(1);
        s.batch = self.batch;
        s.seq = self.seq;
        s.seed = seed;
        s
    }

    fn spec(&self, name: String, tags: &[(&str, String)], settings: RunSettings) -> RunSpec {
        let mut t: BTreeMap<String, String> = tags.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        t.insert("optimizer".into(), settings.optimizer.to_string());
        t.insert("seed".into(), settings.seed.to_string());
        RunSpec {
            name,
            tags: t,
            eval_every: (settings.steps / 10).max(1),
            eval_batches: self.eval_batches,
            settings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repro::record::training_flops;

    #[test]
    fn the_scaling_ladder_spans_100x_compute_at_the_rule() {
        for quick in [false, true] {
            let plan = plan(Experiment::Scaling, quick, None).unwrap();
            let flops: Vec<f64> = plan
                .runs
                .iter()
                .map(|r| {
                    training_flops(
                        &r.settings.model,
                        r.settings.batch,
                        r.settings.seq,
                        r.settings.steps,
                    )
                })
                .collect();
            let (lo, hi) = flops
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(l, h), &f| (l.min(f), h.max(f)));
            assert!(hi / lo >= 100.0, "quick {quick}: {lo:e} .. {hi:e}");
            for r in &plan.runs {
                r.settings.validate().unwrap();
                if !quick {
                    let n = r.settings.model.param_counts().active;
                    let tokens = r.settings.steps * (r.settings.batch * r.settings.seq) as u64;
                    // Rounded up to whole steps: at most one step's tokens over the rule.
                    assert!(
                        tokens >= n * TOKENS_PER_PARAM && tokens < n * TOKENS_PER_PARAM + 1024,
                        "{}",
                        r.name
                    );
                }
            }
            assert_eq!(plan.runs.len(), 5 * 2 * scaling_lrs(quick).len());
        }
    }

    #[test]
    fn plans_are_valid_and_their_names_unique() {
        for e in Experiment::ALL {
            for quick in [false, true] {
                let p = plan(e, quick, None).unwrap();
                let mut names: Vec<_> = p.runs.iter().map(|r| r.name.clone()).collect();
                names.sort();
                names.dedup();
                assert_eq!(names.len(), p.runs.len(), "{e}");
                for r in &p.runs {
                    r.settings
                        .validate()
                        .unwrap_or_else(|err| panic!("{}: {err}", r.name));
                }
            }
        }
        assert_eq!(plan(Experiment::RmsSweep, false, None).unwrap().runs.len(), 3 * 6);
        assert!(plan(Experiment::Curves, true, Some(0)).is_err());
        assert_eq!(Experiment::parse("rms-sweep"), Ok(Experiment::RmsSweep));
        assert!(Experiment::parse("nope").unwrap_err().contains("scaling"));
    }
}
