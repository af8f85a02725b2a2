//! The generation loop: prefill the prompt in one pass, then decode token by
//! token, with the next step's graph queued (`async_eval`) before the current
//! token is read back, so MLX computes while the host checks for the end.
//!
//! Every rank of a group runs this loop on identical inputs and so stops at
//! the same step; before returning, the step queued past the end is finished
//! too, so no rank leaves while a peer still waits in that step's `all_sum`.

use std::time::Instant;

use mlx_rs::{Array, Dtype};

use super::error::{EngineError, Result};
use super::model::Llama;
use super::sampling::{Sampler, SamplingParams};
use super::stats::process_cpu_seconds;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to choose them.
    pub sampling: SamplingParams,
    /// Tokens that end generation (not included in the output).
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Timing of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Seconds from the start of the prefill to the first token on the host.
    pub time_to_first_token: f64,
    /// Prompt tokens per second of the prefill (prompt length ÷ TTFT).
    pub prefill_tokens_per_second: f64,
    /// Seconds from the first token to the last.
    pub decode_seconds: f64,
    /// Tokens after the first, per second of decode.
    pub decode_tokens_per_second: f64,
    /// Process CPU seconds from the start of the prefill to the first token.
    pub prefill_cpu_seconds: Option<f64>,
    /// Process CPU seconds from the first token to the last.
    pub decode_cpu_seconds: Option<f64>,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, the stop token excluded.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// How long it took.
    pub timings: Timings,
}

/// Logits `[vocab]` (as f32) of the last prompt position, from a fresh cache.
pub fn prefill_logits(model: &Llama, prompt: &[u32]) -> Result<Vec<f32>> {
    let ids = prompt_array(prompt)?;
    let mut cache = model.new_cache();
    let logits = model
        .forward_last(&ids, &mut cache)?
        .as_dtype(Dtype::Float32)
        .map_err(EngineError::mlx("casting logits"))?;
    logits.eval().map_err(EngineError::mlx("prefill"))?;
    logits
        .try_as_slice::<f32>()
        .map(<[f32]>::to_vec)
        .map_err(|e| EngineError::Argument(format!("reading logits: {e}")))
}

fn prompt_array(prompt: &[u32]) -> Result<Array> {
    if prompt.is_empty() {
        return Err(EngineError::Argument("the prompt has no tokens".into()));
    }
    let len = i32::try_from(prompt.len())
        .map_err(|_| EngineError::Argument("the prompt is too long".into()))?;
    Ok(Array::from_slice(prompt, &[1, len]))
}

/// Generates from `prompt` ids, calling `on_token` with each token as it
/// reaches the host.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let mlx = EngineError::mlx;
    let ids = prompt_array(prompt)?;
    if options.max_tokens == 0 {
        return Ok(Generation {
            tokens: Vec::new(),
            finish_reason: FinishReason::Length,
            timings: Timings::default(),
        });
    }
    let mut sampler = Sampler::new(options.sampling)?;
    let mut cache = model.new_cache();

    let started = Instant::now();
    let cpu_at_start = process_cpu_seconds();
    let logits = model.forward_last(&ids, &mut cache)?;
    let mut current = sampler.sample(&logits)?;
    mlx_rs::transforms::async_eval([&current]).map_err(mlx("prefill"))?;

    let mut tokens = Vec::with_capacity(options.max_tokens);
    let mut first_at = None;
    let mut cpu_at_first = None;
    let mut cpu_at_last;
    let mut last_at;
    let finish_reason = loop {
        // Queue the step after this one unless this is the last allowed token.
        let next = if tokens.len() + 1 < options.max_tokens {
            let input = current.reshape(&[1, 1]).map_err(mlx("decode input"))?;
            let logits = model.forward_last(&input, &mut cache)?;
            let next = sampler.sample(&logits)?;
            mlx_rs::transforms::async_eval([&next]).map_err(mlx("decode step"))?;
            Some(next)
        } else {
            None
        };
        current.eval().map_err(mlx("decode step"))?;
        let token = current
            .try_item_cast::<u32>()
            .map_err(|e| EngineError::Argument(format!("reading the token: {e}")))?;
        let now = Instant::now();
        let cpu_now = process_cpu_seconds();
        if first_at.is_none() {
            first_at = Some(now);
            cpu_at_first = cpu_now;
        }
        last_at = now;
        cpu_at_last = cpu_now;
        if options.stop_ids.contains(&token) {
            finish(next)?;
            break FinishReason::Stop;
        }
        tokens.push(token);
        on_token(token);
        match next {
            Some(next) => current = next,
            None => break FinishReason::Length,
        }
    };

    let first_at = first_at.unwrap_or(last_at);
    let ttft = first_at.duration_since(started).as_secs_f64();
    let decode_seconds = last_at.duration_since(first_at).as_secs_f64();
    // Tokens read after the first (a stop token counts: it was computed).
    let decoded_after_first = match finish_reason {
        FinishReason::Stop => tokens.len(),
        FinishReason::Length => tokens.len().saturating_sub(1),
    };
    let per_second = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    Ok(Generation {
        tokens,
        finish_reason,
        timings: Timings {
            time_to_first_token: ttft,
            prefill_tokens_per_second: per_second(prompt.len(), ttft),
            decode_seconds,
            decode_tokens_per_second: per_second(decoded_after_first, decode_seconds),
            prefill_cpu_seconds: cpu_at_first.zip(cpu_at_start).map(|(b, a)| b - a),
            decode_cpu_seconds: cpu_at_last.zip(cpu_at_first).map(|(b, a)| b - a),
        },
    })
}

/// Waits for a step queued past the end, keeping the group in lockstep.
fn finish(pending: Option<Array>) -> Result<()> {
    if let Some(pending) = pending {
        pending
            .eval()
            .map_err(EngineError::mlx("finishing the last queued step"))?;
    }
    Ok(())
}
