//! The MLX inference engine: Llama 3.x checkpoints in the mlx-community
//! layout, loaded one tensor-parallel slice per rank and run on MLX.
//!
//! - [`config`] reads `config.json` and `generation_config.json`.
//! - [`safetensors`] is the file format, read by byte ranges (and written).
//! - [`weights`] decides which slice of which tensor a rank reads, and holds
//!   linear layers and embeddings, dense or quantized.
//! - [`model`] is the forward pass and KV cache.
//! - [`sampling`] chooses tokens.
//! - [`batch`] runs one batched step on a rank, as a plan says; [`schedule`]
//!   is rank 0's batching policy, prefix cache and the one decode loop;
//!   [`generate`] is a batch of one for the command line.
//! - [`run`] is one rank's whole `generate` run and its report; [`cli`] the
//!   `make-model` and `generate` subcommands.
//! - [`tokenizer`] handles `tokenizer.json` and the chat template; [`text`]
//!   is rank 0's text side over it (encoding, streamed decoding).
//! - [`make_model`] writes random-weight checkpoints of any Llama shape.
//! - [`launch`] runs N local ranks over the ring backend.
//! - [`stats`] reads process figures (peak RSS).
//! - [`error`] defines [`EngineError`].

pub mod batch;
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
pub mod schedule;
pub mod stats;
pub mod text;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};
