//! HF transformers' DeepseekV3 layout: [`export`] writes a model as `config.json` +
//! `model.safetensors` that `AutoModelForCausalLM.from_pretrained` loads, and [`import`] reads
//! such a directory back into a checkpoint.
//!
//! Tensor names and shapes follow transformers 5's `modeling_deepseek_v3.py` (`C` width, `H`
//! heads, `E` experts, `F` expert width, `Fd` dense width, `r` latent, `dn`/`dr`/`dv` head
//! parts):
//!
//! ```text
//! model.embed_tokens.weight                              [V, C]      embed
//! model.layers.L.input_layernorm.weight                  [C]         layers.L.attn_norm
//! model.layers.L.self_attn.q_proj.weight                 [H*(dn+dr), C]   .attn.wq
//! model.layers.L.self_attn.kv_a_proj_with_mqa.weight     [r+dr, C]   .attn.wkv_a
//! model.layers.L.self_attn.kv_a_layernorm.weight         [r]         .attn.kv_norm
//! model.layers.L.self_attn.kv_b_proj.weight              [H*(dn+dv), r]   .attn.wkv_b
//! model.layers.L.self_attn.o_proj.weight                 [C, H*dv]   .attn.wo
//! model.layers.L.post_attention_layernorm.weight         [C]         .ffn_norm
//! model.layers.L.mlp.{gate,up,down}_proj.weight          dense       .ffn.w_{gate,up,down}
//! model.layers.L.mlp.gate.weight                         [E, C]      .moe.router
//! model.layers.L.mlp.gate.e_score_correction_bias        [E]         .moe.router_bias (buffer)
//! model.layers.L.mlp.experts.gate_up_proj                [E, 2F, C]  .moe.experts.w_gate ; w_up
//! model.layers.L.mlp.experts.down_proj                   [E, C, F]   .moe.experts.w_down
//! model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight       .moe.shared.w_*
//! model.norm.weight                                      [C]         final_norm
//! lm_head.weight                                         [V, C]      lm_head
//! ```
//!
//! The routed experts' gate and up projections are one fused tensor, gate rows first
//! (transformers splits the product with `chunk(2, dim=-1)`). transformers 5 loads that and
//! the original per-expert layout (`mlp.experts.{e}.{gate,up,down}_proj.weight`), and its
//! `save_pretrained` writes the latter; import reads both.
//!
//! **RoPE.** This model rotates halves (pairs `(i, i + d/2)`); transformers' DeepseekV3
//! defaults to interleaved pairs `(2i, 2i+1)`, the layout of the original DeepSeek and
//! Moonlight weights. Export writes `rope_interleave: false`, so the weights go out unchanged
//! and transformers rotates halves too. Import honours either: with `rope_interleave: true`
//! it permutes the RoPE rows of `q_proj` (each head's last `dr` rows) and
//! `kv_a_proj_with_mqa` (its last `dr` rows) from `(x0, x1, x2, ...)` to `(x0, x2, ..., x1,
//! x3, ...)`, which turns the interleaved rotation into the rotate-half one exactly.
//!
//! **Epsilons.** transformers normalizes the latent with its RMSNorm's default 1e-6 whatever
//! `rms_norm_eps` says; a model whose `kv_norm_eps` differs exports with a warning (its
//! logits then differ from transformers' by the epsilon's effect, ~1e-6 relative).
//!
//! `config.json` also carries the model's own configuration under `moonlight_ref`, so that a
//! round trip restores the fields transformers has no name for (`bias_update_rate`,
//! `kv_norm_eps`, ...) exactly; without it (a model made by transformers) they take defaults.
//! Only MLA models with shared experts have a DeepseekV3 form: MHA models, and MoE layers
//! without shared experts, are refused with a message saying so.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use muon_core::{OptimizerKind, OptimizerState, ParamRole, ParamState, Shape};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::{Attention, ModelConfig};
use crate::files;

/// The file names of an HF model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights (one file; sharded models have an index instead, which import reads too).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The MLA sizes of a config, or why it has no DeepseekV3 form.
fn mla_sizes(cfg: &ModelConfig) -> Result<(usize, usize, usize, usize), String> {
    match cfg.attention {
        Attention::Mla {
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        } => Ok((kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)),
        Attention::Mha => Err(
            "this model uses multi-head attention (MHA); transformers' DeepseekV3 has only \
             multi-head latent attention (MLA), and no transformers architecture pairs plain \
             attention with this MoE (sigmoid router, selection bias, normalized and scaled \
             gates), so MHA models cannot be exported"
                .into(),
        ),
    }
}

/// Checks that `cfg` has a DeepseekV3 form.
pub fn check_exportable(cfg: &ModelConfig) -> Result<(), String> {
    mla_sizes(cfg)?;
    if cfg.moe_layers() > 0 && cfg.n_shared_experts == 0 {
        return Err(
            "its MoE layers have no shared expert; transformers' DeepseekV3 always \
                    runs shared experts, so it cannot express this model"
                .into(),
        );
    }
    if cfg.moe_layers() > 0 && cfg.n_routed_experts < 2 {
        return Err("transformers' DeepseekV3 router needs at least 2 routed experts".into());
    }
    Ok(())
}

/// transformers' DeepseekV3 `config.json` for `cfg`.
pub fn hf_config(cfg: &ModelConfig) -> Result<serde_json::Value, String> {
    check_exportable(cfg)?;
    let (r, dn, dr, dv) = mla_sizes(cfg)?;
    Ok(serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.dense_ffn_width,
        "moe_intermediate_size": cfg.expert_width,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.top_k,
        "routed_scaling_factor": cfg.routed_scaling,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": true,
        "first_k_dense_replace": cfg.dense_layers,
        "kv_lora_rank": r,
        "q_lora_rank": null,
        "qk_nope_head_dim": dn,
        "qk_rope_head_dim": dr,
        "v_head_dim": dv,
        "head_dim": dr,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": crate::model::INIT_STD,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": false,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": false,
        "use_cache": true,
        "dtype": "float32",
        "moonlight_ref": cfg,
    }))
}

/// How an HF tensor is made from the model's: one tensor as is, or the fused experts.
enum Source {
    Same(String),
    /// `[E, 2F, C]` from `w_gate` `[E, F, C]` then `w_up`.
    GateUp(String, String),
}

/// The HF tensors of `cfg`, in file order: `(hf name, shape, source)`.
fn hf_layout(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>, Source)>, String> {
    check_exportable(cfg)?;
    let (r, dn, dr, dv) = mla_sizes(cfg)?;
    let (c, h, v) = (cfg.dim, cfg.n_heads, cfg.vocab_size);
    let mut out = Vec::new();
    let mut add = |hf: String, shape: Vec<usize>, src: Source| out.push((hf, shape, src));
    let same = |s: &str| Source::Same(s.to_string());
    add("model.embed_tokens.weight".into(), vec![v, c], same("embed"));
    for l in 0..cfg.n_layers {
        let m = format!("model.layers.{l}");
        let p = format!("layers.{l}");
        add(
            format!("{m}.input_layernorm.weight"),
            vec![c],
            same(&format!("{p}.attn_norm")),
        );
        let attn = [
            ("q_proj", vec![h * (dn + dr), c], "wq"),
            ("kv_a_proj_with_mqa", vec![r + dr, c], "wkv_a"),
            ("kv_a_layernorm", vec![r], "kv_norm"),
            ("kv_b_proj", vec![h * (dn + dv), r], "wkv_b"),
            ("o_proj", vec![c, h * dv], "wo"),
        ];
        for (name, shape, ours) in attn {
            add(
                format!("{m}.self_attn.{name}.weight"),
                shape,
                same(&format!("{p}.attn.{ours}")),
            );
        }
        add(
            format!("{m}.post_attention_layernorm.weight"),
            vec![c],
            same(&format!("{p}.ffn_norm")),
        );
        let mlp = |add: &mut dyn FnMut(String, Vec<usize>, Source), hf: String, ours: String, f: usize| {
            add(
                format!("{hf}.gate_proj.weight"),
                vec![f, c],
                Source::Same(format!("{ours}.w_gate")),
            );
            add(
                format!("{hf}.up_proj.weight"),
                vec![f, c],
                Source::Same(format!("{ours}.w_up")),
            );
            add(
                format!("{hf}.down_proj.weight"),
                vec![c, f],
                Source::Same(format!("{ours}.w_down")),
            );
        };
        if l < cfg.dense_layers {
            mlp(
                &mut add,
                format!("{m}.mlp"),
                format!("{p}.ffn"),
                cfg.dense_ffn_width,
            );
        } else {
            let (e, f) = (cfg.n_routed_experts, cfg.expert_width);
            add(
                format!("{m}.mlp.gate.weight"),
                vec![e, c],
                same(&format!("{p}.moe.router")),
            );
            add(
                format!("{m}.mlp.gate.e_score_correction_bias"),
                vec![e],
                same(&format!("{p}.moe.router_bias")),
            );
            add(
                format!("{m}.mlp.experts.gate_up_proj"),
                vec![e, 2 * f, c],
                Source::GateUp(format!("{p}.moe.experts.w_gate"), format!("{p}.moe.experts.w_up")),
            );
            add(
                format!("{m}.mlp.experts.down_proj"),
                vec![e, c, f],
                same(&format!("{p}.moe.experts.w_down")),
            );
            mlp(
                &mut add,
                format!("{m}.mlp.shared_experts"),
                format!("{p}.moe.shared"),
                cfg.n_shared_experts * f,
            );
        }
    }
    add("model.norm.weight".into(), vec![c], same("final_norm"));
    add("lm_head.weight".into(), vec![v, c], same("lm_head"));
    Ok(out)
}

/// Writes `config.json` and `model.safetensors` of `cfg`'s model with the checkpoint's
/// parameters and buffers into `dir` (created if missing; both files written atomically).
/// Returns the warnings to show (an epsilon transformers does not honour).
pub fn export(cfg: &ModelConfig, ckpt: &Checkpoint, dir: &Path) -> Result<Vec<String>, String> {
    let layout = hf_layout(cfg)?;
    let config = hf_config(cfg)?;
    let ours: HashMap<&str, &Tensor> = ckpt
        .params
        .iter()
        .chain(&ckpt.buffers)
        .map(|t| (t.name.as_str(), t))
        .collect();
    let get = |name: &str| -> Result<&Tensor, String> {
        ours.get(name)
            .copied()
            .ok_or_else(|| format!("the checkpoint has no tensor `{name}`"))
    };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(layout.len());
    for (hf, shape, src) in layout {
        let values: Vec<f32> = match &src {
            Source::Same(name) => get(name)?.data.clone(),
            Source::GateUp(gate, up) => {
                let (g, u) = (get(gate)?, get(up)?);
                let (e, f, c) = (g.shape.batch, g.shape.rows, g.shape.cols);
                let mut fused = Vec::with_capacity(2 * g.data.len());
                for x in 0..e {
                    fused.extend_from_slice(&g.data[x * f * c..(x + 1) * f * c]);
                    fused.extend_from_slice(&u.data[x * f * c..(x + 1) * f * c]);
                }
                fused
            }
        };
        if values.len() != shape.iter().product::<usize>() {
            return Err(format!(
                "`{hf}` needs {shape:?} ({} values), the checkpoint gives {}",
                shape.iter().product::<usize>(),
                values.len()
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("`{hf}` holds {} at element {i}", values[i]));
        }
        data.push((hf, shape, bytemuck::cast_slice(&values).to_vec()));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("`{name}`: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        files::write_atomic(&path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(WEIGHTS_FILE, &bytes)?;
    let mut json = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
    json.push('\n');
    write(CONFIG_FILE, json.as_bytes())?;
    let mut warnings = Vec::new();
    if cfg.kv_norm_eps != 1e-6 {
        warnings.push(format!(
            "this model normalizes the MLA latent with epsilon {:e}; transformers' DeepseekV3 uses 1e-6 there, so its logits will differ slightly",
            cfg.kv_norm_eps
        ));
    }
    Ok(warnings)
}

// ---------------------------------------------------------------------------------------------
// Import

fn field<'a>(hf: &'a serde_json::Value, key: &str, path: &Path) -> Result<&'a serde_json::Value, String> {
    hf.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| format!("{}: `{key}` is missing", path.display()))
}

fn size(hf: &serde_json::Value, key: &str, path: &Path) -> Result<usize, String> {
    field(hf, key, path)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| format!("{}: `{key}` is not a count", path.display()))
}

fn number(hf: &serde_json::Value, key: &str, path: &Path) -> Result<f64, String> {
    field(hf, key, path)?
        .as_f64()
        .ok_or_else(|| format!("{}: `{key}` is not a number", path.display()))
}

/// The model configuration of a DeepseekV3 `config.json` (read from `path`), or why this
/// model cannot express it. Also returns whether the weights use interleaved RoPE pairs.
pub fn config_from_hf(hf: &serde_json::Value, path: &Path) -> Result<(ModelConfig, bool), String> {
    let at = path.display();
    let model_type = hf.get("model_type").and_then(|v| v.as_str()).unwrap_or("(none)");
    if model_type != "deepseek_v3" {
        return Err(format!(
            "{at}: model_type is `{model_type}`; only transformers' `deepseek_v3` models can be imported"
        ));
    }
    let flag = |key: &str, default: bool| hf.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    let unsupported = |what: &str| Err(format!("{at}: {what}; moonlight-ref's model cannot express it"));
    if hf.get("q_lora_rank").is_some_and(|v| !v.is_null()) {
        return unsupported("q_lora_rank is set (a low-rank query projection)");
    }
    let (n_group, topk_group) = (
        hf.get("n_group").and_then(|v| v.as_u64()).unwrap_or(1),
        hf.get("topk_group").and_then(|v| v.as_u64()).unwrap_or(1),
    );
    if n_group != topk_group {
        return unsupported(&format!(
            "group-limited routing (n_group {n_group}, topk_group {topk_group})"
        ));
    }
    if !flag("norm_topk_prob", true) {
        return unsupported("norm_topk_prob is false (unnormalized gates)");
    }
    if flag("attention_bias", false) {
        return unsupported("attention_bias is true");
    }
    if flag("tie_word_embeddings", false) {
        return unsupported("tie_word_embeddings is true (one matrix for embedding and head)");
    }
    if hf.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        return unsupported("rope_scaling is set (YaRN)");
    }
    if let Some(t) = hf
        .get("rope_parameters")
        .and_then(|p| p.get("rope_type"))
        .and_then(|t| t.as_str())
    {
        if t != "default" {
            return unsupported(&format!("rope_parameters.rope_type is `{t}`"));
        }
    }
    let act = hf.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
    if act != "silu" {
        return unsupported(&format!("hidden_act is `{act}`"));
    }
    let heads = size(hf, "num_attention_heads", path)?;
    let kv_heads = hf
        .get("num_key_value_heads")
        .and_then(|v| v.as_u64())
        .unwrap_or(heads as u64);
    if kv_heads as usize != heads {
        return unsupported(&format!(
            "num_key_value_heads {kv_heads} differs from num_attention_heads {heads}"
        ));
    }
    let rope_theta = match hf.get("rope_theta").and_then(|v| v.as_f64()) {
        Some(t) => t,
        None => hf
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .ok_or_else(|| format!("{at}: neither `rope_theta` nor `rope_parameters.rope_theta` is given"))?,
    };
    let v_head_dim = size(hf, "v_head_dim", path)?;
    let mut cfg = ModelConfig {
        vocab_size: size(hf, "vocab_size", path)?,
        dim: size(hf, "hidden_size", path)?,
        n_layers: size(hf, "num_hidden_layers", path)?,
        n_heads: heads,
        head_dim: v_head_dim,
        attention: Attention::Mla {
            kv_lora_rank: size(hf, "kv_lora_rank", path)?,
            qk_nope_head_dim: size(hf, "qk_nope_head_dim", path)?,
            qk_rope_head_dim: size(hf, "qk_rope_head_dim", path)?,
            v_head_dim,
        },
        dense_layers: size(hf, "first_k_dense_replace", path)?,
        dense_ffn_width: size(hf, "intermediate_size", path)?,
        n_routed_experts: size(hf, "n_routed_experts", path)?,
        n_shared_experts: size(hf, "n_shared_experts", path)?,
        expert_width: size(hf, "moe_intermediate_size", path)?,
        top_k: size(hf, "num_experts_per_tok", path)?,
        routed_scaling: number(hf, "routed_scaling_factor", path)?,
        bias_update_rate: 1e-3,
        aux_loss_alpha: 0.0,
        rope_theta,
        norm_eps: number(hf, "rms_norm_eps", path)?,
        // transformers' latent norm epsilon, whatever rms_norm_eps says.
        kv_norm_eps: 1e-6,
        max_seq_len: size(hf, "max_position_embeddings", path)?,
    };
    cfg.dense_layers = cfg.dense_layers.min(cfg.n_layers);
    // Our own fields, when this directory came from `export`: they must agree with the rest.
    if let Some(ours) = hf.get("moonlight_ref") {
        let saved: ModelConfig = serde_json::from_value(ours.clone())
            .map_err(|e| format!("{at}: its `moonlight_ref` block is not a model configuration: {e}"))?;
        let with_ours = ModelConfig {
            head_dim: saved.head_dim,
            bias_update_rate: saved.bias_update_rate,
            aux_loss_alpha: saved.aux_loss_alpha,
            kv_norm_eps: saved.kv_norm_eps,
            ..cfg.clone()
        };
        if with_ours != saved {
            return Err(format!(
                "{at}: its `moonlight_ref` block disagrees with its transformers fields (edited?); remove the block to import the transformers fields alone"
            ));
        }
        cfg = saved;
    }
    cfg.validate().map_err(|e| format!("{at}: {e}"))?;
    check_exportable(&cfg).map_err(|e| format!("{at}: {e}"))?;
    Ok((cfg, flag("rope_interleave", true)))
}

/// An HF tensor as f32 (F32, BF16 or F16 in the file).
fn to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let bytes = view.data();
    let halves = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => halves().map(|h| f32::from_bits((h as u32) << 16)).collect(),
        Dtype::F16 => halves().map(f16_to_f32).collect(),
        other => return Err(format!("`{name}` is {other:?}; import reads F32, BF16 and F16")),
    })
}

/// IEEE half to single, exactly.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: frac * 2^-24.
            let v = frac as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// Rows `(x0, x1, x2, x3, ...)` of one RoPE block of width `d` (rows of `cols` numbers
/// starting at row `start`) to `(x0, x2, ..., x1, x3, ...)`: interleaved pairs to halves.
fn deinterleave(data: &mut [f32], start: usize, d: usize, cols: usize) {
    let block = data[start * cols..(start + d) * cols].to_vec();
    for i in 0..d {
        let from = if i < d / 2 { 2 * i } else { 2 * (i - d / 2) + 1 };
        data[(start + i) * cols..(start + i + 1) * cols]
            .copy_from_slice(&block[from * cols..(from + 1) * cols]);
    }
}

/// transformers 5 loads the routed experts from either layout but saves the original one (a
/// tensor per expert and projection, `mlp.experts.{e}.{gate,up,down}_proj.weight`): those are
/// stacked here into the fused `gate_up_proj` / `down_proj` the layout names.
fn fuse_per_expert(
    cfg: &ModelConfig,
    tensors: &mut HashMap<String, (Vec<usize>, Vec<f32>)>,
    dir: &Path,
) -> Result<(), String> {
    let (c, e, f) = (cfg.dim, cfg.n_routed_experts, cfg.expert_width);
    for l in cfg.dense_layers..cfg.n_layers {
        let m = format!("model.layers.{l}.mlp.experts");
        if tensors.contains_key(&format!("{m}.gate_up_proj"))
            || !tensors.contains_key(&format!("{m}.0.gate_proj.weight"))
        {
            continue;
        }
        let (mut gate_up, mut down) = (Vec::with_capacity(e * 2 * f * c), Vec::with_capacity(e * c * f));
        for x in 0..e {
            for (proj, shape) in [
                ("gate_proj", vec![f, c]),
                ("up_proj", vec![f, c]),
                ("down_proj", vec![c, f]),
            ] {
                let into = if proj == "down_proj" {
                    &mut down
                } else {
                    &mut gate_up
                };
                let name = format!("{m}.{x}.{proj}.weight");
                let (got, data) = tensors
                    .remove(&name)
                    .ok_or_else(|| format!("{}: tensor `{name}` is missing", dir.display()))?;
                if got != shape {
                    return Err(format!(
                        "{}: tensor `{name}` is {got:?}, the config needs {shape:?}",
                        dir.display()
                    ));
                }
                into.extend_from_slice(&data);
            }
        }
        tensors.insert(format!("{m}.gate_up_proj"), (vec![e, 2 * f, c], gate_up));
        tensors.insert(format!("{m}.down_proj"), (vec![e, c, f], down));
    }
    Ok(())
}

/// Reads an HF DeepseekV3 directory (`config.json` and `model.safetensors`, or sharded
/// weights with their index) into a checkpoint: the parameters, the router biases, the
/// configuration as `config` metadata, and a fresh (zero) optimizer state.
pub fn import(dir: &Path) -> Result<Checkpoint, String> {
    let config_path = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        format!(
            "{}: cannot read it ({e}); an HF model directory holds config.json and model.safetensors",
            config_path.display()
        )
    })?;
    let hf: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", config_path.display()))?;
    let (cfg, interleaved) = config_from_hf(&hf, &config_path)?;
    // The weight files: one, or those an index names.
    let index_path = dir.join(INDEX_FILE);
    let files: Vec<String> = if dir.join(WEIGHTS_FILE).is_file() {
        vec![WEIGHTS_FILE.to_string()]
    } else if index_path.is_file() {
        let index: serde_json::Value = std::fs::read_to_string(&index_path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", index_path.display()))?;
        let map = index["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{}: no `weight_map`", index_path.display()))?;
        let mut names: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        names
    } else {
        return Err(format!(
            "{}: neither {WEIGHTS_FILE} nor {INDEX_FILE} is there",
            dir.display()
        ));
    };
    let mut bytes = Vec::with_capacity(files.len());
    for f in &files {
        let path = dir.join(f);
        bytes.push((
            path.clone(),
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        ));
    }
    let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    for (path, b) in &bytes {
        let st = SafeTensors::deserialize(b)
            .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
        for (name, view) in st.tensors() {
            let data = to_f32(&name, &view).map_err(|e| format!("{}: {e}", path.display()))?;
            tensors.insert(name, (view.shape().to_vec(), data));
        }
    }
    fuse_per_expert(&cfg, &mut tensors, dir)?;
    let layout = hf_layout(&cfg)?;
    let mut ours: BTreeMap<String, Tensor> = BTreeMap::new();
    let shape_of = |dims: &[usize]| match *dims {
        [n] => Shape::vector(n),
        [r, c] => Shape::matrix(r, c),
        [b, r, c] => Shape::batched(b, r, c),
        _ => unreachable!("the layout has 1-3 dimensions"),
    };
    for (hf_name, shape, src) in &layout {
        let (got_shape, data) = tensors
            .remove(hf_name)
            .ok_or_else(|| format!("{}: tensor `{hf_name}` is missing", dir.display()))?;
        if &got_shape != shape {
            return Err(format!(
                "{}: tensor `{hf_name}` is {got_shape:?}, the config needs {shape:?}",
                dir.display()
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "{}: tensor `{hf_name}` holds {} at element {i}",
                dir.display(),
                data[i]
            ));
        }
        match src {
            Source::Same(name) => {
                ours.insert(
                    name.clone(),
                    Tensor {
                        name: name.clone(),
                        shape: shape_of(shape),
                        data,
                    },
                );
            }
            Source::GateUp(gate, up) => {
                let (e, f2, c) = (shape[0], shape[1], shape[2]);
                let f = f2 / 2;
                let (mut g, mut u) = (Vec::with_capacity(e * f * c), Vec::with_capacity(e * f * c));
                for x in 0..e {
                    let block = &data[x * f2 * c..(x + 1) * f2 * c];
                    g.extend_from_slice(&block[..f * c]);
                    u.extend_from_slice(&block[f * c..]);
                }
                for (name, d) in [(gate, g), (up, u)] {
                    ours.insert(
                        name.clone(),
                        Tensor {
                            name: name.clone(),
                            shape: Shape::batched(e, f, c),
                            data: d,
                        },
                    );
                }
            }
        }
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(format!(
            "{}: tensor `{extra}` is not part of the model its config describes",
            dir.display()
        ));
    }
    if interleaved {
        let (r, dn, dr, _) = mla_sizes(&cfg)?;
        for l in 0..cfg.n_layers {
            let wq = ours
                .get_mut(&format!("layers.{l}.attn.wq"))
                .expect("in the layout");
            for h in 0..cfg.n_heads {
                deinterleave(&mut wq.data, h * (dn + dr) + dn, dr, cfg.dim);
            }
            let wkv_a = ours
                .get_mut(&format!("layers.{l}.attn.wkv_a"))
                .expect("in the layout");
            deinterleave(&mut wkv_a.data, r, dr, cfg.dim);
        }
    }
    // The model's order: its parameter specs and buffers.
    let b = muon_core::Portable::<f32>::new();
    let model = crate::model::Model::new(&b, cfg.clone(), 1, 1, 0).map_err(|e| e.to_string())?;
    let take = |name: &str, ours: &mut BTreeMap<String, Tensor>| {
        ours.remove(name)
            .ok_or_else(|| format!("internal: `{name}` has no HF tensor"))
    };
    let params = model
        .param_specs()
        .iter()
        .map(|s| take(&s.name, &mut ours))
        .collect::<Result<Vec<_>, _>>()?;
    let buffers = model
        .buffers(&b)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|t| take(&t.name, &mut ours))
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = BTreeMap::from([
        (
            "config".to_string(),
            serde_json::to_string(&cfg).map_err(|e| e.to_string())?,
        ),
        ("source".to_string(), format!("imported from {}", dir.display())),
    ]);
    // A fresh optimizer state (zero moments at step 0; Muon for the hidden matrices, AdamW
    // for the rest, as the default run assigns them): the checkpoint format holds one.
    let optimizer = OptimizerState {
        step: 0,
        params: model
            .param_specs()
            .into_iter()
            .map(|s| {
                let (kind, n) = match s.role {
                    ParamRole::Hidden => (OptimizerKind::Muon, 1),
                    _ => (OptimizerKind::AdamW, 2),
                };
                ParamState {
                    buffers: vec![vec![0.0; s.shape.len()]; n],
                    name: s.name,
                    shape: s.shape,
                    kind,
                }
            })
            .collect(),
    };
    Ok(Checkpoint {
        metadata,
        params,
        buffers,
        optimizer,
    })
}
