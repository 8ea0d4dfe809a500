//! moonlight-ref: a compact Moonlight-style (DeepSeek-V3 family) MoE language model and the
//! trainer that pretrains it with muon-core's hybrid optimizer.
//!
//! Files are read and written by viewing memory as numbers (safetensors checkpoints, llm.c
//! token shards, both little-endian), so the crate builds for little-endian targets only.

#[cfg(target_endian = "big")]
compile_error!("moonlight-ref reads and writes little-endian files by viewing memory; big-endian targets are not supported");

// The model: configuration and presets, the backend ops the model needs beyond muon-core's
// trait, their CPU implementation, and the layers with forward/backward passes.
pub mod config;
pub mod cpu;
// Inference: KV-cache decoding and sampling.
pub mod infer;
pub mod model;
pub mod ops;

// The trainer: data, checkpoints, logging and the training loop.
pub mod checkpoint;
pub mod corpus;
pub mod data;
// Using a trained checkpoint: evaluation, and HF transformers' DeepseekV3 layout.
pub mod eval;
pub mod files;
pub mod hf;
pub mod log;
pub mod memory;
pub mod repro;
pub mod rng;
pub mod tokenizer;
pub mod train;
