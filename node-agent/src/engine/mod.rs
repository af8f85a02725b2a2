//! The MLX inference engine: Llama 3.x checkpoints in the mlx-community
//! layout, loaded one tensor-parallel slice per rank and run on MLX.
//!
//! - [`config`] reads `config.json` and `generation_config.json`.
//! - [`safetensors`] is the file format, read by byte ranges (and written).
//! - [`weights`] decides which slice of which tensor a rank reads, and holds
//!   linear layers and embeddings, dense or quantized.
//! - [`model`] is the forward pass and KV cache.
//! - [`sampling`] and [`generate`] choose tokens and run the decode loop.
//! - [`run`] is one rank's whole `generate` run and its report; [`cli`] the
//!   `make-model` and `generate` subcommands.
//! - [`tokenizer`] handles `tokenizer.json` and the chat template.
//! - [`make_model`] writes random-weight checkpoints of any Llama shape.
//! - [`launch`] runs N local ranks over the ring backend.
//! - [`stats`] reads process figures (peak RSS).
//! - [`error`] defines [`EngineError`].

pub mod cli;
pub mod config;
pub mod error;
pub mod generate;
pub mod launch;
pub mod make_model;
pub mod model;
pub mod run;
pub mod safetensors;
pub mod sampling;
pub mod stats;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};
