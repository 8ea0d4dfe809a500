//! HF transformers' DeepseekV3 layout: export then import is bit-exact, bad directories get
//! clear errors, and — where Python with torch and transformers is installed — transformers
//! computes the same logits from the exported directory, and moonlight-ref the same logits from
//! a random DeepseekV3 that transformers made (interleaved RoPE weights, its default).
//!
//! The Python side is `tests/fixtures/hf_logits.py`, run with `$MOONLIGHT_PYTHON` (default
//! `python3`); without torch or transformers these tests print why and pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use moonlight_ref::checkpoint::Checkpoint;
use moonlight_ref::config::{Attention, ModelConfig};
use moonlight_ref::data::DataSource;
use moonlight_ref::hf;
use moonlight_ref::model::{Model, Tensor};
use moonlight_ref::rng::Rng;
use moonlight_ref::train::{self, OptimizerChoice, RunSettings, TrainOptions};
use muon_core::{Backend, OptimizerState, Portable};

type B32 = Portable<f32>;

fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        dim: 32,
        n_layers: 3,
        n_heads: 2,
        head_dim: 8,
        attention: Attention::Mla {
            kv_lora_rank: 12,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 6,
            v_head_dim: 10,
        },
        dense_layers: 1,
        dense_ffn_width: 48,
        n_routed_experts: 6,
        n_shared_experts: 1,
        expert_width: 16,
        top_k: 2,
        routed_scaling: 2.446,
        bias_update_rate: 1e-3,
        aux_loss_alpha: 0.0,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        kv_norm_eps: 1e-6,
        max_seq_len: 64,
    }
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moonlight-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A checkpoint of a model with parameters of std 0.3 and random router biases (the initial
/// 0.02 would leave attention uniform and logits flat).
fn random_checkpoint(cfg: &ModelConfig) -> Checkpoint {
    let b = B32::new();
    let mut model = Model::new(&b, cfg.clone(), 1, 1, 0).unwrap();
    let mut rng = Rng::new(42);
    let specs = model.param_specs();
    for (spec, p) in specs.iter().zip(model.params_mut()) {
        let norm = spec.name.ends_with("norm");
        let data: Vec<f32> = (0..spec.shape.len())
            .map(|_| {
                (if norm {
                    1.0 + 0.1 * rng.normal()
                } else {
                    0.3 * rng.normal()
                }) as f32
            })
            .collect();
        b.upload(p, &data).unwrap();
    }
    let bufs: Vec<Tensor<f32>> = model
        .buffers(&b)
        .unwrap()
        .into_iter()
        .map(|t| Tensor {
            data: (0..t.data.len()).map(|_| (0.2 * rng.normal()) as f32).collect(),
            ..t
        })
        .collect();
    model.load_buffers(&b, &bufs).unwrap();
    let metadata = BTreeMap::from([("config".to_string(), serde_json::to_string(cfg).unwrap())]);
    let optimizer = OptimizerState {
        step: 0,
        params: Vec::new(),
    };
    Checkpoint::from_model(&b, &model, optimizer, metadata).unwrap()
}

/// moonlight-ref's f32 logits of `tokens` (one sequence) for a checkpoint's tensors.
fn our_logits(cfg: &ModelConfig, ckpt: &Checkpoint, tokens: &[u32]) -> Vec<f32> {
    let b = B32::new();
    let mut model = Model::new(&b, cfg.clone(), 1, tokens.len(), 0).unwrap();
    for (p, t) in model.params_mut().iter_mut().zip(&ckpt.params) {
        b.upload(p, &t.data).unwrap();
    }
    model.load_buffers(&b, &ckpt.buffers).unwrap();
    model.logits(&b, tokens, false).unwrap()
}

/// Runs the Python helper; `None` (after printing why) when torch/transformers is missing.
fn python(args: &[&str]) -> Option<String> {
    let exe = std::env::var("MOONLIGHT_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_logits.py");
    let out = match Command::new(&exe).arg(&script).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            muon_test_support::skip(format!(
                "cannot run {exe} ({e}); set MOONLIGHT_PYTHON to a Python with torch and transformers"
            ));
            return None;
        }
    };
    if out.status.code() == Some(3) {
        muon_test_support::skip(format!(
            "{} (set MOONLIGHT_PYTHON to a Python with torch and transformers)",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        return None;
    }
    assert!(
        out.status.success(),
        "{exe} {}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn hf_logits(dir: &Path, tokens: &[u32]) -> Option<Vec<f32>> {
    let json = python(&[dir.to_str().unwrap(), &serde_json::to_string(&[tokens]).unwrap()])?;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    println!("transformers {}", v["transformers"]);
    Some(
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    )
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    diff / scale
}

fn tokens(cfg: &ModelConfig, n: usize) -> Vec<u32> {
    let mut rng = Rng::new(9);
    (0..n).map(|_| rng.below(cfg.vocab_size) as u32).collect()
}

#[test]
fn export_then_import_is_bit_exact() {
    let cfg = config();
    let ckpt = random_checkpoint(&cfg);
    let dir = tmp("roundtrip");
    let warnings = hf::export(&cfg, &ckpt, &dir).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let hf_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("model_type", serde_json::json!("deepseek_v3")),
        ("architectures", serde_json::json!(["DeepseekV3ForCausalLM"])),
        ("q_lora_rank", serde_json::Value::Null),
        ("n_group", 1.into()),
        ("topk_group", 1.into()),
        ("norm_topk_prob", true.into()),
        ("rope_interleave", false.into()),
        ("tie_word_embeddings", false.into()),
        ("first_k_dense_replace", 1.into()),
    ] {
        assert_eq!(hf_cfg[key], want, "{key}");
    }
    let back = hf::import(&dir).unwrap();
    let back_cfg: ModelConfig = serde_json::from_str(&back.metadata["config"]).unwrap();
    assert_eq!(back_cfg, cfg);
    assert_eq!(back.params.len(), ckpt.params.len());
    for (a, b) in back
        .params
        .iter()
        .chain(&back.buffers)
        .zip(ckpt.params.iter().chain(&ckpt.buffers))
    {
        assert_eq!((&a.name, a.shape), (&b.name, b.shape));
        let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(a) == bits(b), "`{}` changed in the round trip", a.name);
    }
    // The imported checkpoint is a valid file (fresh optimizer state).
    let file = dir.join("back.safetensors");
    moonlight_ref::checkpoint::save(&file, &back).unwrap();
    moonlight_ref::checkpoint::load(&file).unwrap();
    // Without its own block, the transformers fields alone give the same sizes.
    let mut plain = hf_cfg.clone();
    plain.as_object_mut().unwrap().remove("moonlight_ref");
    let (from_hf, interleaved) = hf::config_from_hf(&plain, Path::new("config.json")).unwrap();
    assert!(!interleaved);
    assert_eq!(
        ModelConfig {
            head_dim: cfg.head_dim,
            ..from_hf
        },
        cfg
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_has_no_deepseek_v3_form_and_what_is_no_hf_model_get_clear_errors() {
    let mha = ModelConfig {
        attention: Attention::Mha,
        ..config()
    };
    let err = hf::check_exportable(&mha).unwrap_err();
    assert!(err.contains("MHA") && err.contains("cannot be exported"), "{err}");
    let unshared = ModelConfig {
        n_shared_experts: 0,
        ..config()
    };
    assert!(hf::check_exportable(&unshared).unwrap_err().contains("shared"));

    let dir = tmp("bad");
    let err = hf::import(&dir).unwrap_err();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let err = hf::import(&dir).unwrap_err();
    assert!(err.contains("llama") && err.contains("deepseek_v3"), "{err}");
    // A real config without weights, then with a tensor missing.
    let cfg = config();
    let ckpt = random_checkpoint(&cfg);
    hf::export(&cfg, &ckpt, &dir).unwrap();
    let mut grouped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    grouped["n_group"] = 2.into();
    let err = hf::config_from_hf(&grouped, Path::new("c.json")).unwrap_err();
    assert!(err.contains("group-limited"), "{err}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = hf::import(&dir).unwrap_err();
    assert!(err.contains("model.safetensors"), "{err}");
    let fewer = Checkpoint {
        params: ckpt
            .params
            .iter()
            .filter(|t| t.name != "lm_head")
            .cloned()
            .collect(),
        ..ckpt.clone()
    };
    let err = hf::export(&cfg, &fewer, &dir).unwrap_err();
    assert!(err.contains("lm_head"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// transformers' own forward of the exported directory against moonlight-ref's forward, f32
/// both: the sums differ in order (and transformers computes the router in f32 from the
/// same f32 weights), ~1e-7 relative; 1e-5 is the bar, and a layout slip (gate and up
/// swapped, the RoPE convention, a transposed projection) moves logits by O(1).
#[test]
fn transformers_gives_the_exported_models_logits() {
    let cfg = config();
    let ckpt = random_checkpoint(&cfg);
    let dir = tmp("logits");
    hf::export(&cfg, &ckpt, &dir).unwrap();
    let toks = tokens(&cfg, 24);
    let Some(theirs) = hf_logits(&dir, &toks) else {
        return;
    };
    let ours = our_logits(&cfg, &ckpt, &toks);
    let err = rel_err(&ours, &theirs);
    println!("exported model: transformers vs moonlight-ref logits, max relative error {err:.2e}");
    assert!(err < 1e-5, "relative error {err:e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A random DeepseekV3 made and saved by transformers (interleaved RoPE weights, its default,
/// and its own tensor layout) imports into moonlight-ref with transformers' logits.
#[test]
fn a_random_deepseek_v3_made_by_transformers_imports_with_its_logits_and_trains_on() {
    let dir = tmp("made");
    let hf_config = serde_json::json!({
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
        "n_shared_experts": 1, "n_routed_experts": 6, "num_experts_per_tok": 2,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 12, "q_lora_rank": null,
        "qk_rope_head_dim": 6, "qk_nope_head_dim": 8, "v_head_dim": 10,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": true,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    });
    let made = python(&["--make-random", dir.to_str().unwrap(), &hf_config.to_string()]);
    if made.is_none() {
        return;
    }
    let ckpt = hf::import(&dir).unwrap();
    let cfg: ModelConfig = serde_json::from_str(&ckpt.metadata["config"]).unwrap();
    let toks = tokens(&cfg, 24);
    let theirs = hf_logits(&dir, &toks).unwrap();
    let ours = our_logits(&cfg, &ckpt, &toks);
    let err = rel_err(&ours, &theirs);
    println!("transformers-made model (interleaved RoPE): max relative logit error {err:.2e}");
    assert!(err < 1e-5, "relative error {err:e}");

    // Training goes on from it (`train --init`): a periodic sequence of the model's 40 tokens,
    // which a few steps learn, the run starting from transformers' weights.
    let init = dir.join("imported.safetensors");
    moonlight_ref::checkpoint::save(&init, &ckpt).unwrap();
    let data = dir.join("data.txt");
    let text: Vec<u8> = (0..4000u32).map(|i| ((i * 7) % 40) as u8).collect();
    std::fs::write(&data, text).unwrap();
    let mut settings = RunSettings::new("init", cfg, OptimizerChoice::Muon);
    (settings.steps, settings.batch, settings.seq, settings.warmup) = (8, 4, 16, 1);
    let mut opts = TrainOptions::new(settings);
    opts.data = DataSource::File {
        path: data,
        format: None,
    };
    opts.init = Some(init);
    let run = train::train(&muon_faer::Faer::<f32>::with_threads(1), &opts).unwrap();
    let (first, last) = (run.losses[0].1, run.losses[run.losses.len() - 1].1);
    println!("training on from the transformers-made model: loss {first:.4} -> {last:.4}");
    assert!(last < first, "loss {first} -> {last}");
    let _ = std::fs::remove_dir_all(&dir);
}
