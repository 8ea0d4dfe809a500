//! The inference path against the training forward: KV-cache decoding one token at a time
//! gives [`Model::logits`] at every position, and the samplers are deterministic.
//!
//! Both are f64 (`Portable<f64>`). The decoder reorders the sums (absorbed MLA attention,
//! per-token dot products instead of GEMMs) over at most a few hundred terms, so the two agree
//! to ~1e-14; 1e-12 is the bar, and any semantic slip (a RoPE position off by one, the
//! un-normed latent cached, a router bias ignored) moves logits by O(0.01..1).

use moonlight_ref::config::{Attention, ModelConfig};
use moonlight_ref::infer::{Decoder, Sampler, SamplingOptions};
use moonlight_ref::model::{Model, Tensor};
use moonlight_ref::rng::Rng;
use muon_core::{Backend, Portable};

type B64 = Portable<f64>;

fn config(attention: Attention, shared: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        dim: 16,
        n_layers: 3,
        n_heads: 2,
        head_dim: 6,
        attention,
        dense_layers: 1,
        dense_ffn_width: 20,
        n_routed_experts: 5,
        n_shared_experts: shared,
        expert_width: 7,
        top_k: 2,
        routed_scaling: 2.446,
        bias_update_rate: 1e-3,
        aux_loss_alpha: 0.0,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        kv_norm_eps: 1e-6,
        max_seq_len: 32,
    }
}

fn mla() -> Attention {
    Attention::Mla {
        kv_lora_rank: 6,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 5,
    }
}

/// A model with parameters of std 0.4 (norm gains around 1) and random router biases: at the
/// initial std 0.02 attention would be nearly uniform and the routing nearly arbitrary, and a
/// slip could hide in the rounding.
fn random_model(b: &B64, cfg: &ModelConfig, batch: usize, seq: usize, seed: u64) -> Model<B64> {
    let mut model = Model::new(b, cfg.clone(), batch, seq, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xabc);
    let specs = model.param_specs();
    for (spec, p) in specs.iter().zip(model.params_mut()) {
        let norm = spec.name.ends_with("norm");
        let data: Vec<f64> = (0..spec.shape.len())
            .map(|_| {
                if norm {
                    1.0 + 0.2 * rng.normal()
                } else {
                    0.4 * rng.normal()
                }
            })
            .collect();
        b.upload(p, &data).unwrap();
    }
    let bufs: Vec<Tensor<f64>> = model
        .buffers(b)
        .unwrap()
        .into_iter()
        .map(|t| Tensor {
            data: (0..t.data.len()).map(|_| 0.3 * rng.normal()).collect(),
            ..t
        })
        .collect();
    model.load_buffers(b, &bufs).unwrap();
    model
}

#[test]
fn kv_cache_decoding_gives_the_full_forwards_logits_at_every_position() {
    let b = B64::new();
    let (batch, seq) = (2, 12);
    let cases = [
        ("MLA, dense + MoE with a shared expert", config(mla(), 1)),
        ("MLA, MoE without a shared expert", config(mla(), 0)),
        ("MHA, dense + MoE with a shared expert", config(Attention::Mha, 1)),
        ("MHA, MoE without a shared expert", config(Attention::Mha, 0)),
    ];
    for (name, cfg) in cases {
        let mut model = random_model(&b, &cfg, batch, seq, 7);
        let mut rng = Rng::new(11);
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|_| rng.below(cfg.vocab_size) as u32)
            .collect();
        let full = model.logits(&b, &tokens, false).unwrap();
        let last = model.logits(&b, &tokens, true).unwrap();
        let v = cfg.vocab_size;
        let mut decoder = Decoder::from_model(&b, &model, seq).unwrap();
        let mut worst = 0.0f64;
        for s in 0..batch {
            decoder.reset();
            for t in 0..seq {
                let got = decoder.step(tokens[s * seq + t]).unwrap();
                let want = &full[(s * seq + t) * v..(s * seq + t + 1) * v];
                for (g, w) in got.iter().zip(want) {
                    worst = worst.max((g - w).abs());
                }
            }
            assert_eq!(decoder.position(), seq);
            // The last position alone, and the decoder's own all-positions form.
            assert_eq!(
                &last[s * v..(s + 1) * v],
                &full[(s * seq + seq - 1) * v..(s * seq + seq) * v]
            );
            let all = decoder.logits(&tokens[s * seq..(s + 1) * seq], false).unwrap();
            let only = decoder.logits(&tokens[s * seq..(s + 1) * seq], true).unwrap();
            assert_eq!(&all[(seq - 1) * v..], &only[..]);
        }
        let spread = full.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        eprintln!("{name}: max |decoder - forward| {worst:.2e} (logits up to {spread:.2})");
        assert!(
            spread > 1.0,
            "{name}: logits too flat to test anything ({spread})"
        );
        assert!(
            worst < 1e-12,
            "{name}: decoding differs from the forward by {worst:e}"
        );
        // A full cache is an error, not a wrap-around.
        let err = decoder.step(0).unwrap_err().to_string();
        assert!(err.contains("cache is full"), "{err}");
        let err = decoder
            .logits(&[cfg.vocab_size as u32], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }
}

#[test]
fn a_decoder_refuses_tensors_of_another_model() {
    let b = B64::new();
    let cfg = config(mla(), 1);
    let model = random_model(&b, &cfg, 1, 4, 3);
    let mut specs_params: Vec<Tensor<f64>> = Vec::new();
    for (spec, p) in model.param_specs().into_iter().zip(model.params()) {
        let mut data = vec![0.0; spec.shape.len()];
        b.download(p, &mut data).unwrap();
        specs_params.push(Tensor {
            name: spec.name,
            shape: spec.shape,
            data,
        });
    }
    let bufs = model.buffers(&b).unwrap();
    let other = ModelConfig {
        dim: 24,
        ..cfg.clone()
    };
    let err = Decoder::new(&other, &specs_params, &bufs, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("embed") && err.contains("needs"), "{err}");
    let mha = config(Attention::Mha, 1);
    let err = Decoder::new(&mha, &specs_params, &bufs, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("layers.0.attn.wq"), "{err}");
    let err = Decoder::new(&cfg, &specs_params, &[], 4)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("router_bias") && err.contains("missing"), "{err}");
    let err = Decoder::new(&cfg, &specs_params, &bufs, 33)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("max_seq_len"), "{err}");
}

#[test]
fn sampling_is_deterministic_for_a_seed_and_honours_its_options() {
    let mut rng = Rng::new(5);
    let logits: Vec<f64> = (0..50).map(|_| 2.0 * rng.normal()).collect();
    let draw = |opts: SamplingOptions, seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(opts, seed, logits.len());
        (0..300).map(|_| s.sample(&logits)).collect()
    };
    let opts = SamplingOptions::default();
    assert_eq!(draw(opts, 1), draw(opts, 1));
    assert_ne!(draw(opts, 1), draw(opts, 2));
    let mut by_logit: Vec<usize> = (0..logits.len()).collect();
    by_logit.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
    // Greedy takes the arg max, whatever the seed.
    let greedy = SamplingOptions {
        temperature: 0.0,
        ..opts
    };
    assert!(draw(greedy, 9).iter().all(|&t| t as usize == by_logit[0]));
    // top-k 3 draws only the three most likely, and all of them over 300 draws.
    let top3 = SamplingOptions { top_k: 3, ..opts };
    let got = draw(top3, 4);
    for &t in &by_logit[..3] {
        assert!(got.contains(&(t as u32)));
    }
    assert!(got.iter().all(|&t| by_logit[..3].contains(&(t as usize))));
    // top-p: only the nucleus of the softmax.
    let max = logits[by_logit[0]];
    let p: Vec<f64> = by_logit.iter().map(|&i| (logits[i] - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    let mut cum = 0.0;
    let nucleus = p
        .iter()
        .position(|x| {
            cum += x / sum;
            cum >= 0.5
        })
        .unwrap()
        + 1;
    let got = draw(SamplingOptions { top_p: 0.5, ..opts }, 4);
    assert!(got.iter().all(|&t| by_logit[..nucleus].contains(&(t as usize))));
    // The empirical frequencies follow the softmax (full sampling, 20k draws): the most
    // likely token's share within 4 standard errors.
    let mut s = Sampler::new(opts, 77, logits.len());
    let n = 20_000;
    let hits = (0..n)
        .filter(|_| s.sample(&logits) as usize == by_logit[0])
        .count();
    let want = p[0] / sum;
    let se = (want * (1.0 - want) / n as f64).sqrt();
    assert!(
        ((hits as f64 / n as f64) - want).abs() < 4.0 * se,
        "{hits} of {n}, want {want}"
    );
}

/// The decoder against `fixtures/model_reference.py`, the NumPy evaluation of the same network
/// (its own parameters, MLA and MHA, dense and MoE layers): f64 both, 1e-10 as the model's own
/// test of it.
#[test]
fn decoding_matches_the_numpy_reference() {
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/model_reference.json")).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for case in cases.as_array().unwrap() {
        let cfg: ModelConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let seq = case["seq"].as_u64().unwrap() as usize;
        let tensors = |key: &str| -> Vec<Tensor<f64>> {
            let b = B64::new();
            // Shapes from a model of the same configuration.
            let model = Model::new(&b, cfg.clone(), 1, seq, 0).unwrap();
            let mut named: Vec<(String, muon_core::Shape)> = model
                .param_specs()
                .into_iter()
                .map(|s| (s.name, s.shape))
                .collect();
            if key == "buffers" {
                named = model
                    .buffers(&b)
                    .unwrap()
                    .into_iter()
                    .map(|t| (t.name, t.shape))
                    .collect();
            }
            named
                .into_iter()
                .map(|(name, shape)| Tensor {
                    data: floats(&case[key][&name]),
                    name,
                    shape,
                })
                .collect()
        };
        let mut decoder = Decoder::new(&cfg, &tensors("params"), &tensors("buffers"), seq).unwrap();
        let tokens: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want = floats(&case["logits"]);
        let mut worst = 0.0f64;
        for (s, window) in tokens.chunks(seq).enumerate() {
            let got = decoder.logits(window, false).unwrap();
            let v = cfg.vocab_size;
            for (g, w) in got.iter().zip(&want[s * seq * v..(s + 1) * seq * v]) {
                worst = worst.max((g - w).abs());
            }
        }
        eprintln!("{:?}: max |decoder - numpy| {worst:.2e}", cfg.attention);
        assert!(worst < 1e-10, "{:?}: {worst:e}", cfg.attention);
    }
}
