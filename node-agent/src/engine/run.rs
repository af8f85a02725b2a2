//! One rank's whole `generate` run: load the slice, tokenize, prefill,
//! decode, and report what happened and what it cost, as a value the CLI
//! prints (or, in a local group, the launcher gathers from every rank).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::generate::{GenerateOptions, generate, prefill_logits};
use super::model::{ComputeDtype, EngineOptions, Llama};
use super::sampling::SamplingParams;
use super::stats::peak_rss_bytes;
use super::tokenizer::{ChatMessage, TextTokenizer};
use crate::mlx::distributed::Group;

/// Where the prompt comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Plain text, encoded with BOS.
    Text(String),
    /// A chat: optional system message and one user message, through the
    /// chat template.
    Chat {
        /// System message.
        system: Option<String>,
        /// User message.
        user: String,
    },
    /// Token ids as they are.
    Ids(Vec<u32>),
}

/// A `generate` request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Model directory.
    pub model: PathBuf,
    /// The prompt.
    pub prompt: Prompt,
    /// Token budget.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Generate `max_tokens` whatever comes (benchmarks).
    pub ignore_eos: bool,
    /// Write the prefill's last-position logits here (rank 0).
    pub dump_logits: Option<PathBuf>,
    /// Activation dtype.
    pub compute: ComputeDtype,

    /// Run a short untimed generation first (benchmarks), so one-time costs
    /// are not measured.
    pub warmup: bool,
}

/// Timing figures, in the units printed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimingReport {
    /// Loading this rank's weights.
    pub load_seconds: f64,
    /// Prefill start to the first token.
    pub time_to_first_token_seconds: f64,
    /// Prompt tokens ÷ time to first token.
    pub prefill_tokens_per_second: f64,
    /// First token to last.
    pub decode_seconds: f64,
    /// Tokens after the first ÷ decode seconds.
    pub decode_tokens_per_second: f64,
    /// Process CPU seconds of the prefill (Linux).
    pub prefill_cpu_seconds: Option<f64>,
    /// Process CPU seconds of the decode (Linux).
    pub decode_cpu_seconds: Option<f64>,
}

/// What one rank did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// The prompt's ids.
    pub prompt_ids: Vec<u32>,
    /// Generated ids (stop token excluded).
    pub generated_ids: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// The dtype activations were computed in.
    pub compute_dtype: String,

    /// Timings.
    pub timings: TimingReport,
    /// Bytes this rank read from the checkpoint.
    pub bytes_read: u64,
    /// Bytes of all tensors of the checkpoint.
    pub checkpoint_bytes: u64,
    /// Peak resident memory of this process.
    pub peak_rss_bytes: Option<u64>,
    /// MLX's own peak of allocated memory.
    pub mlx_peak_memory_bytes: Option<u64>,
}

/// Loads and runs one rank. `on_text` receives the generated text as it
/// grows (rank 0 of a single process streams it to the terminal).
pub fn run_rank(
    request: &GenerateRequest,
    group: Option<Group>,
    mut on_text: Option<&mut dyn FnMut(&str)>,
) -> Result<RankReport> {
    let tokenizer = TextTokenizer::load(&request.model)?;
    let started = Instant::now();
    let options = EngineOptions {
        compute: request.compute,
    };
    let model = Llama::load_with(&request.model, group, options)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let shard = model.shard();

    let prompt_ids = match &request.prompt {
        Prompt::Text(text) => tokenizer.encode_plain(text)?,
        Prompt::Chat { system, user } => {
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: user.clone(),
            });
            tokenizer.encode_chat(&messages)?
        }
        Prompt::Ids(ids) => ids.clone(),
    };
    if let Some(bad) = prompt_ids
        .iter()
        .find(|id| **id as usize >= model.config().vocab_size)
    {
        return Err(EngineError::Argument(format!(
            "prompt token id {bad} is outside the vocabulary of {}",
            model.config().vocab_size
        )));
    }

    if let Some(path) = &request.dump_logits {
        let logits = prefill_logits(&model, &prompt_ids)?;
        if shard.rank == 0 {
            write_logits(path, &prompt_ids, &logits)?;
        }
    }

    let mut stop_ids = model.config().eos_token_ids.clone();
    if let Some(eos) = tokenizer.eos_token_id()
        && !stop_ids.contains(&eos)
    {
        stop_ids.push(eos);
    }
    if request.ignore_eos {
        stop_ids.clear();
    }
    let options = GenerateOptions {
        max_tokens: request.max_tokens,
        sampling: request.sampling,
        stop_ids,
    };
    if request.warmup {
        // The measured prompt itself: on a GPU, MLX compiles kernels per
        // shape on first use, and a shorter prompt would leave the measured
        // prefill paying for its own.
        let short = GenerateOptions {
            max_tokens: 2,
            sampling: request.sampling,
            stop_ids: Vec::new(),
        };
        generate(&model, &prompt_ids, &short, |_| {})?;
        let _ = mlx_rs::memory::reset_peak_memory();
    }
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let generation = generate(&model, &prompt_ids, &options, |token| {
        if let Some(sink) = on_text.as_mut() {
            so_far.push(token);
            if let Ok(text) = tokenizer.decode(&so_far) {
                // Print only whole characters: a token can end mid-UTF-8.
                if !text.ends_with('\u{FFFD}') && text.len() > printed {
                    if let Some(fresh) = text.get(printed..) {
                        sink(fresh);
                    }
                    printed = text.len();
                }
            }
        }
    })?;
    let text = tokenizer.decode(&generation.tokens)?;
    let load = model.load_stats();
    let t = generation.timings;
    Ok(RankReport {
        rank: shard.rank,
        world_size: shard.world,
        prompt_ids,
        generated_ids: generation.tokens,
        text,
        finish_reason: generation.finish_reason.as_str().into(),
        compute_dtype: format!("{:?}", model.compute_dtype()).to_lowercase(),
        timings: TimingReport {
            load_seconds,
            time_to_first_token_seconds: t.time_to_first_token,
            prefill_tokens_per_second: t.prefill_tokens_per_second,
            decode_seconds: t.decode_seconds,
            decode_tokens_per_second: t.decode_tokens_per_second,
            prefill_cpu_seconds: t.prefill_cpu_seconds,
            decode_cpu_seconds: t.decode_cpu_seconds,
        },
        bytes_read: load.bytes_read,
        checkpoint_bytes: load.checkpoint_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        mlx_peak_memory_bytes: mlx_rs::memory::peak_memory().ok().map(|b| b as u64),
    })
}

/// Writes `{"prompt_ids": [...], "logits": [...]}`.
fn write_logits(path: &Path, prompt_ids: &[u32], logits: &[f32]) -> Result<()> {
    let json = serde_json::json!({ "prompt_ids": prompt_ids, "logits": logits });
    let text = serde_json::to_string(&json).map_err(|source| EngineError::Json {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(path, text).map_err(EngineError::io(path))
}
