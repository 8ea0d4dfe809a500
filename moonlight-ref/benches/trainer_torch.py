#!/usr/bin/env python3
"""Training-step throughput of HuggingFace transformers' DeepseekV3 on the CPU, built like
moonlight-ref's presets: the peer of moonlight-ref's own `fwd_bwd_s` / `optimizer_s`.

For each (preset, B x T, threads, dtype) it times forward + backward and a torch AdamW step over
--steps steps after --warmup, and prints one JSON line:
  {"impl": "hf-deepseekv3", "preset": ..., "batch": B, "seq": T, "threads": t, "dtype": "f32",
   "fwd_bwd_ms_median": ..., "adamw_ms_median": ..., "tokens_per_s": ..., "params": ...}
"bf16" runs the model under torch.autocast(cpu, bfloat16) (oneDNN, AMX where the CPU has it).

The presets are moonlight-ref's `ModelConfig::tiny()` and `small()` (src/config.rs) in HF's
names: dim -> hidden_size, dense_ffn_width -> intermediate_size, expert_width ->
moe_intermediate_size, top_k -> num_experts_per_tok, dense_layers -> first_k_dense_replace,
max_seq_len -> max_position_embeddings; MLA without query compression, rotate-half RoPE
(rope_interleave=False). HF's model differs in what a throughput peer does not care about: it
has no sequence-wise balance loss and does not update the selection bias, and its kv-latent
norm uses eps 1e-6. The script reports HF's parameter count next to moonlight-ref's.

  pip install torch transformers
  python3 trainer_torch.py [--presets tiny,small] [--shapes 16x64,32x128] [--threads 1,2]
      [--dtypes f32,bf16] [--steps 20] [--warmup 3]
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 intermediate_size=192, moe_intermediate_size=64, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                 max_position_embeddings=128),
    "small": dict(vocab_size=256, hidden_size=192, num_hidden_layers=6, num_attention_heads=6,
                  kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                  max_position_embeddings=256),
}
# `moonlight-ref params --preset NAME`: every trained parameter (router biases are buffers).
MOONLIGHT_REF_PARAMS = {"tiny": 343_072, "small": 7_470_912}


def make_model(name):
    p = dict(PRESETS[name])
    cfg = DeepseekV3Config(
        **p, num_key_value_heads=p["num_attention_heads"], q_lora_rank=None, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.446, rope_theta=50_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_interleave=False, rope_scaling=None, attention_dropout=0.0,
        use_cache=False)
    cfg._attn_implementation = "sdpa"
    return DeepseekV3ForCausalLM(cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--shapes", default="16x64,32x128", help="B x T per step")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    for preset in a.presets.split(","):
        params = sum(p.numel() for p in make_model(preset).parameters())
        if params != MOONLIGHT_REF_PARAMS[preset]:
            print(f"{preset}: HF's model has {params} parameters, moonlight-ref's "
                  f"{MOONLIGHT_REF_PARAMS[preset]}", file=sys.stderr)
        for shape in a.shapes.split(","):
            b, t = (int(x) for x in shape.split("x"))
            for threads in (int(x) for x in a.threads.split(",")):
                torch.set_num_threads(threads)
                for dtype in a.dtypes.split(","):
                    model = make_model(preset)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                            weight_decay=0.1, foreach=True)
                    ids = torch.randint(0, 256, (b, t + 1))
                    fwd_bwd, step = [], []
                    for i in range(a.warmup + a.steps):
                        t0 = time.perf_counter()
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(dtype == "bf16")):
                            out = model(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous())
                        # HF shifts the labels itself; feeding shifted ones changes which pairs
                        # are scored, not the cost.
                        out.loss.backward()
                        t1 = time.perf_counter()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        t2 = time.perf_counter()
                        if i >= a.warmup:
                            fwd_bwd.append((t1 - t0) * 1e3)
                            step.append((t2 - t1) * 1e3)
                    fb, op = statistics.median(fwd_bwd), statistics.median(step)
                    print(json.dumps({"impl": "hf-deepseekv3", "preset": preset, "batch": b, "seq": t,
                                      "threads": threads, "dtype": dtype,
                                      "fwd_bwd_ms_median": round(fb, 3), "adamw_ms_median": round(op, 3),
                                      "tokens_per_s": round(b * t / ((fb + op) / 1e3), 1),
                                      "params": params}), flush=True)


if __name__ == "__main__":
    main()
