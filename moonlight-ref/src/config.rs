//! The model's configuration: sizes, presets, validation and parameter counts.
//!
//! The same struct describes the real Moonlight (`moonlight-16b-a3b`, as the report and its published config describe it) and the
//! scaled-down models that train on a CPU (`tiny`, `small`). Everything is plain data, checked
//! once by [`ModelConfig::validate`].

use std::fmt;

/// Which attention the decoder blocks use.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Attention {
    /// Standard multi-head attention: `n_heads` heads of `head_dim`, RoPE on the whole head.
    Mha,
    /// Multi-head latent attention (DeepSeek-V2/V3, Moonlight): keys and values come from a
    /// compressed `kv_lora_rank` latent; a separate `qk_rope_head_dim` part carries RoPE, its
    /// key shared by all heads.
    Mla {
        /// Width of the compressed key-value latent `c_kv` (Moonlight: 512).
        kv_lora_rank: usize,
        /// Per-head query/key width without RoPE (Moonlight: 128).
        qk_nope_head_dim: usize,
        /// Per-head query/key width with RoPE; the key part is shared by the heads (64).
        qk_rope_head_dim: usize,
        /// Per-head value width (128).
        v_head_dim: usize,
    },
}

/// The sizes and constants of a Moonlight-style MoE decoder.
///
/// (De)serialized as a plain JSON object of its fields. A field added since a file was written
/// takes its old behaviour: `aux_loss_alpha` 0, `kv_norm_eps` the file's `norm_eps`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(remote = "Self")]
pub struct ModelConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab_size: usize,
    /// Model width (hidden size) C.
    pub dim: usize,
    /// Decoder blocks.
    pub n_layers: usize,
    /// Attention heads H.
    pub n_heads: usize,
    /// Head width of multi-head attention (unused by MLA).
    pub head_dim: usize,
    /// MHA or MLA.
    pub attention: Attention,
    /// Leading blocks with a dense FFN (Moonlight: 1); the others are MoE.
    pub dense_layers: usize,
    /// Width of the dense FFN.
    pub dense_ffn_width: usize,
    /// Routed experts per MoE block E.
    pub n_routed_experts: usize,
    /// Shared experts per MoE block (always run; stored as one FFN of
    /// `n_shared_experts * expert_width`, as DeepSeek-V3 does).
    pub n_shared_experts: usize,
    /// Width of one expert's FFN.
    pub expert_width: usize,
    /// Experts each token is routed to, K.
    pub top_k: usize,
    /// Gates are the selected sigmoid scores normalized to sum 1, times this (Moonlight: 2.446).
    pub routed_scaling: f64,
    /// Step of the auxiliary-loss-free bias update, gamma (~1e-3).
    pub bias_update_rate: f64,
    /// Weight of DeepSeek-V3's sequence-wise balance loss (`seq_aux`; Moonlight: 0.001), added
    /// to the training objective; 0 turns it off.
    #[serde(default)]
    pub aux_loss_alpha: f64,
    /// RoPE base (Moonlight: 50,000).
    pub rope_theta: f64,
    /// RMSNorm epsilon of the residual-stream norms (before attention, before the FFN, final):
    /// transformers' `rms_norm_eps` (1e-5).
    pub norm_eps: f64,
    /// RMSNorm epsilon of MLA's compressed-latent norm (`c_kv`, transformers'
    /// `kv_a_layernorm`). DeepSeek-V3's and Moonlight's reference code and transformers use the
    /// norm's default 1e-6 there, whatever `rms_norm_eps` says, so the presets say 1e-6: an
    /// exported model then equals transformers' to rounding. (For tiny and small the choice is
    /// otherwise immaterial: at initialization the latent's mean square is about
    /// `dim * 0.02^2`, 0.026 for tiny and 0.077 for small, so either epsilon shifts its rstd by
    /// under 0.02%.) Files written before this field existed used `norm_eps` here and still do.
    #[serde(default = "unset_eps")]
    pub kv_norm_eps: f64,
    /// Longest context the model accepts.
    pub max_seq_len: usize,
}

/// The default of `kv_norm_eps` while deserializing: NaN (JSON has no NaN, so it cannot come
/// from a file), replaced by the file's `norm_eps`.
fn unset_eps() -> f64 {
    f64::NAN
}

impl serde::Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ModelConfig::serialize(self, s)
    }
}

impl<'de> serde::Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut config = ModelConfig::deserialize(d)?;
        if config.kv_norm_eps.is_nan() {
            config.kv_norm_eps = config.norm_eps;
        }
        Ok(config)
    }
}

/// Parameter counts by part, from [`ModelConfig::param_counts`].
///
/// Norm gains are counted with their part: the attention and kv norms with `attention`, a
/// block's FFN norm with `dense_ffn` or `moe`, the final norm with `embedding_and_head`. The
/// router selection biases are buffers, not parameters, and are not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// All parameters.
    pub total: u64,
    /// Parameters a token uses: everything but the routed experts it is not sent to.
    pub active: u64,
    /// Token embedding, LM head and final norm.
    pub embedding_and_head: u64,
    /// All attention blocks with their norms.
    pub attention: u64,
    /// The dense FFN blocks with their norms.
    pub dense_ffn: u64,
    /// The MoE blocks: routers, routed and shared experts, norms.
    pub moe: u64,
}

impl fmt::Display for ParamCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |n: u64| n as f64 / 1e9;
        write!(
            f,
            "total {:.3}B, active {:.3}B ({:.3}B without embedding and head); embedding+head {:.3}B, \
             attention {:.3}B, dense FFN {:.3}B, MoE {:.3}B",
            g(self.total),
            g(self.active),
            g(self.active - self.embedding_and_head),
            g(self.embedding_and_head),
            g(self.attention),
            g(self.dense_ffn),
            g(self.moe)
        )
    }
}

impl Default for ModelConfig {
    /// The `tiny` preset.
    fn default() -> Self {
        ModelConfig::tiny()
    }
}

impl ModelConfig {
    /// The preset names [`preset`](Self::preset) accepts; the first is the default.
    pub const PRESETS: &'static [&'static str] = &["tiny", "small", "moonlight-16b-a3b"];

    /// A preset by name: `tiny` (trains on a laptop CPU in minutes), `small` (tens of
    /// minutes), `moonlight-16b-a3b` (the real Moonlight; too big to train
    /// here, but its parameter counts are exact).
    pub fn preset(name: &str) -> Result<ModelConfig, String> {
        match name {
            "tiny" => Ok(ModelConfig::tiny()),
            "small" => Ok(ModelConfig::small()),
            "moonlight-16b-a3b" => Ok(ModelConfig::moonlight_16b_a3b()),
            _ => Err(format!(
                "unknown preset `{name}`; the presets are: {}",
                ModelConfig::PRESETS.join(", ")
            )),
        }
    }

    /// Bytes in, 0.34M parameters (0.2M active): MLA, one dense block then two MoE blocks of 8
    /// experts (top-2, one shared).
    pub fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            dim: 64,
            n_layers: 3,
            n_heads: 4,
            head_dim: 16,
            attention: Attention::Mla {
                kv_lora_rank: 32,
                qk_nope_head_dim: 16,
                qk_rope_head_dim: 8,
                v_head_dim: 16,
            },
            dense_layers: 1,
            dense_ffn_width: 192,
            n_routed_experts: 8,
            n_shared_experts: 1,
            expert_width: 64,
            top_k: 2,
            routed_scaling: 2.446,
            bias_update_rate: 1e-3,
            aux_loss_alpha: 0.0,
            rope_theta: 50_000.0,
            norm_eps: 1e-5,
            kv_norm_eps: 1e-6,
            max_seq_len: 128,
        }
    }

    /// `tiny` shrunk so that a training step takes milliseconds, for tests: width 32, one dense
    /// block then one MoE block of 4 experts (top-2, one shared), MLA with a latent of 16.
    pub fn micro() -> ModelConfig {
        ModelConfig {
            dim: 32,
            n_layers: 2,
            n_heads: 2,
            head_dim: 16,
            attention: Attention::Mla {
                kv_lora_rank: 16,
                qk_nope_head_dim: 16,
                qk_rope_head_dim: 8,
                v_head_dim: 16,
            },
            dense_ffn_width: 64,
            n_routed_experts: 4,
            expert_width: 32,
            top_k: 2,
            max_seq_len: 32,
            ..ModelConfig::tiny()
        }
    }

    /// Bytes in, 7.5M parameters (2.3M active): MLA, one dense block then five MoE blocks of 16
    /// experts (top-2, one shared).
    pub fn small() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            dim: 192,
            n_layers: 6,
            n_heads: 6,
            head_dim: 32,
            attention: Attention::Mla {
                kv_lora_rank: 64,
                qk_nope_head_dim: 32,
                qk_rope_head_dim: 16,
                v_head_dim: 32,
            },
            dense_layers: 1,
            dense_ffn_width: 512,
            n_routed_experts: 16,
            n_shared_experts: 1,
            expert_width: 128,
            top_k: 2,
            routed_scaling: 2.446,
            bias_update_rate: 1e-3,
            aux_loss_alpha: 0.0,
            rope_theta: 50_000.0,
            norm_eps: 1e-5,
            kv_norm_eps: 1e-6,
            max_seq_len: 256,
        }
    }

    /// Moonlight-16B-A3B as published (the DeepSeek-V3 architecture at 16B parameters, 3B active).
    pub fn moonlight_16b_a3b() -> ModelConfig {
        ModelConfig {
            vocab_size: 163_840,
            dim: 2048,
            n_layers: 27,
            n_heads: 16,
            head_dim: 128,
            attention: Attention::Mla {
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
            },
            dense_layers: 1,
            dense_ffn_width: 11_264,
            n_routed_experts: 64,
            n_shared_experts: 2,
            expert_width: 1408,
            top_k: 6,
            routed_scaling: 2.446,
            bias_update_rate: 1e-3,
            aux_loss_alpha: 0.001,
            rope_theta: 50_000.0,
            norm_eps: 1e-5,
            kv_norm_eps: 1e-6,
            max_seq_len: 8192,
        }
    }

    /// Number of MoE blocks.
    pub fn moe_layers(&self) -> usize {
        self.n_layers.saturating_sub(self.dense_layers)
    }

    /// Checks that the configuration can work; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!(
                "vocab_size {} does not fit token ids (u32)",
                self.vocab_size
            ));
        }
        match &self.attention {
            Attention::Mha => {
                if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
                    return Err(format!(
                        "head_dim {} must be positive and even (RoPE rotates pairs)",
                        self.head_dim
                    ));
                }
            }
            Attention::Mla {
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                for (name, v) in [
                    ("kv_lora_rank", kv_lora_rank),
                    ("qk_nope_head_dim", qk_nope_head_dim),
                    ("qk_rope_head_dim", qk_rope_head_dim),
                    ("v_head_dim", v_head_dim),
                ] {
                    if *v == 0 {
                        return Err(format!("MLA {name} must be at least 1"));
                    }
                }
                if qk_rope_head_dim % 2 != 0 {
                    return Err(format!(
                        "MLA qk_rope_head_dim {qk_rope_head_dim} must be even (RoPE rotates pairs)"
                    ));
                }
            }
        }
        if self.dense_layers > self.n_layers {
            return Err(format!(
                "dense_layers {} exceeds n_layers {}",
                self.dense_layers, self.n_layers
            ));
        }
        if self.dense_layers > 0 && self.dense_ffn_width == 0 {
            return Err("dense_ffn_width must be at least 1 when there are dense layers".into());
        }
        if self.moe_layers() > 0 {
            if self.n_routed_experts == 0 {
                return Err("n_routed_experts must be at least 1 when there are MoE layers".into());
            }
            if self.expert_width == 0 {
                return Err("expert_width must be at least 1".into());
            }
            if self.top_k == 0 || self.top_k > self.n_routed_experts {
                return Err(format!(
                    "top_k {} must be between 1 and n_routed_experts {}",
                    self.top_k, self.n_routed_experts
                ));
            }
            if !(self.routed_scaling.is_finite() && self.routed_scaling > 0.0) {
                return Err(format!("routed_scaling {} must be positive", self.routed_scaling));
            }
            if !(self.bias_update_rate.is_finite() && self.bias_update_rate >= 0.0) {
                return Err(format!(
                    "bias_update_rate {} must be non-negative",
                    self.bias_update_rate
                ));
            }
            if !(self.aux_loss_alpha.is_finite() && self.aux_loss_alpha >= 0.0) {
                return Err(format!(
                    "aux_loss_alpha {} must be non-negative",
                    self.aux_loss_alpha
                ));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!("rope_theta {} must be greater than 1", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("norm_eps {} must be positive", self.norm_eps));
        }
        if !(self.kv_norm_eps.is_finite() && self.kv_norm_eps > 0.0) {
            return Err(format!("kv_norm_eps {} must be positive", self.kv_norm_eps));
        }
        Ok(())
    }

    /// Width of the query/key dot product per head (MHA: `head_dim`; MLA: nope + rope).
    pub fn qk_head_dim(&self) -> usize {
        match &self.attention {
            Attention::Mha => self.head_dim,
            Attention::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                ..
            } => qk_nope_head_dim + qk_rope_head_dim,
        }
    }

    /// Width of a value (and of an attention output) per head.
    pub fn v_head_dim(&self) -> usize {
        match &self.attention {
            Attention::Mha => self.head_dim,
            Attention::Mla { v_head_dim, .. } => *v_head_dim,
        }
    }

    /// Parameter counts by part (pure arithmetic, exact for any size).
    pub fn param_counts(&self) -> ParamCounts {
        let u = |x: usize| x as u64;
        let (c, h) = (u(self.dim), u(self.n_heads));
        let embedding_and_head = 2 * u(self.vocab_size) * c + c;
        let attn_per_layer = c + match &self.attention {
            Attention::Mha => {
                let d = u(self.head_dim);
                3 * c * h * d + h * d * c
            }
            Attention::Mla {
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let (r, dn, dr, dv) = (
                    u(*kv_lora_rank),
                    u(*qk_nope_head_dim),
                    u(*qk_rope_head_dim),
                    u(*v_head_dim),
                );
                c * h * (dn + dr) + c * (r + dr) + r + r * h * (dn + dv) + h * dv * c
            }
        };
        let dense_per_layer = c + 3 * c * u(self.dense_ffn_width);
        let expert = 3 * c * u(self.expert_width);
        let (e, k, s) = (u(self.n_routed_experts), u(self.top_k), u(self.n_shared_experts));
        let moe_fixed = c + e * c + s * expert;
        let moe_total = moe_fixed + e * expert;
        let moe_active = moe_fixed + k * expert;
        let (nd, nm) = (u(self.dense_layers), u(self.moe_layers()));
        let attention = u(self.n_layers) * attn_per_layer;
        let dense_ffn = nd * dense_per_layer;
        let moe = nm * moe_total;
        ParamCounts {
            total: embedding_and_head + attention + dense_ffn + moe,
            active: embedding_and_head + attention + dense_ffn + nm * moe_active,
            embedding_and_head,
            attention,
            dense_ffn,
            moe,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in ModelConfig::PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(ModelConfig::default(), ModelConfig::preset("tiny").unwrap());
        assert!(ModelConfig::preset("huge").unwrap_err().contains("tiny"));
    }

    /// Moonlight-16B-A3B's published sizes: 15.96B in all (embedding and head 0.67B, attention 0.37B, dense FFN
    /// 0.07B, MoE 14.85B); about 2.9B active counting embedding and head, 2.24B without.
    #[test]
    fn moonlight_16b_a3b_counts_match_the_report() {
        let p = ModelConfig::moonlight_16b_a3b().param_counts();
        let close = |got: u64, want: f64, tol: f64| {
            let got = got as f64 / 1e9;
            assert!((got - want).abs() <= tol * want, "{got:.4}B vs {want}B ({p})");
        };
        close(p.total, 15.96, 0.01);
        close(p.active, 2.9, 0.01);
        close(p.active - p.embedding_and_head, 2.24, 0.01);
        close(p.embedding_and_head, 0.67, 0.01);
        close(p.attention, 0.37, 0.01);
        close(p.dense_ffn, 0.07, 0.02);
        close(p.moe, 14.85, 0.01);
        assert_eq!(p.total, p.embedding_and_head + p.attention + p.dense_ffn + p.moe);
    }

    /// Files written before `kv_norm_eps` existed keep their behaviour (the latent norm used
    /// `norm_eps`); new files round-trip it.
    #[test]
    fn kv_norm_eps_defaults_to_the_files_norm_eps() {
        let tiny = ModelConfig::tiny();
        assert_eq!(ModelConfig::moonlight_16b_a3b().kv_norm_eps, 1e-6);
        let mut json: serde_json::Value = serde_json::to_value(&tiny).unwrap();
        assert_eq!(json["kv_norm_eps"], 1e-6);
        let back: ModelConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, tiny);
        json.as_object_mut().unwrap().remove("kv_norm_eps");
        json["norm_eps"] = 3e-5.into();
        let old: ModelConfig = serde_json::from_value(json).unwrap();
        assert_eq!((old.norm_eps, old.kv_norm_eps), (3e-5, 3e-5));
    }

    #[test]
    fn active_counts_only_the_chosen_experts() {
        let tiny = ModelConfig::tiny();
        let p = tiny.param_counts();
        let all = ModelConfig {
            top_k: tiny.n_routed_experts,
            ..tiny.clone()
        }
        .param_counts();
        assert_eq!(all.active, all.total);
        // Each MoE layer leaves E - K experts of 3 * C * F parameters out.
        let per_expert = 3 * (tiny.dim * tiny.expert_width) as u64;
        let skipped = (tiny.moe_layers() * (tiny.n_routed_experts - tiny.top_k)) as u64 * per_expert;
        assert_eq!(p.total - p.active, skipped);
        let dense = ModelConfig {
            dense_layers: tiny.n_layers,
            ..tiny
        }
        .param_counts();
        assert_eq!((dense.moe, dense.active), (0, dense.total));
    }

    #[test]
    fn bad_configs_are_refused_with_the_field_named() {
        let base = ModelConfig::tiny();
        let cases: Vec<(ModelConfig, &str)> = vec![
            (
                ModelConfig {
                    top_k: 9,
                    ..base.clone()
                },
                "top_k",
            ),
            (
                ModelConfig {
                    top_k: 0,
                    ..base.clone()
                },
                "top_k",
            ),
            (
                ModelConfig {
                    n_heads: 0,
                    ..base.clone()
                },
                "n_heads",
            ),
            (
                ModelConfig {
                    dim: 0,
                    ..base.clone()
                },
                "dim",
            ),
            (
                ModelConfig {
                    vocab_size: 0,
                    ..base.clone()
                },
                "vocab_size",
            ),
            (
                ModelConfig {
                    dense_layers: 4,
                    ..base.clone()
                },
                "dense_layers",
            ),
            (
                ModelConfig {
                    norm_eps: 0.0,
                    ..base.clone()
                },
                "norm_eps",
            ),
            (
                ModelConfig {
                    kv_norm_eps: -1.0,
                    ..base.clone()
                },
                "kv_norm_eps",
            ),
            (
                ModelConfig {
                    rope_theta: f64::NAN,
                    ..base.clone()
                },
                "rope_theta",
            ),
            (
                ModelConfig {
                    attention: Attention::Mha,
                    head_dim: 7,
                    ..base.clone()
                },
                "head_dim",
            ),
            (
                ModelConfig {
                    attention: Attention::Mla {
                        kv_lora_rank: 8,
                        qk_nope_head_dim: 4,
                        qk_rope_head_dim: 3,
                        v_head_dim: 4,
                    },
                    ..base.clone()
                },
                "qk_rope_head_dim",
            ),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
    }
}
