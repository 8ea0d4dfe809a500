//! moonlight-ref: a compact Moonlight-style (DeepSeek-V3 family) MoE language model and the
//! trainer that pretrains it with muon-core's hybrid optimizer (issue 5; being written).

// The model: configuration and presets, the backend ops the model needs beyond muon-core's
// trait, their CPU implementation, and the layers with forward/backward passes.
pub mod config;
pub mod cpu;
pub mod model;
pub mod ops;

// The trainer: data, checkpoints, logging and the training loop.
pub mod checkpoint;
pub mod data;
pub mod log;
pub mod train;
