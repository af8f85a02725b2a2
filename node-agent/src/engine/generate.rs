//! One generation from the command line: a batch of one through the same
//! loop the server runs ([`super::schedule::lead`]), with its timings.
//!
//! Every rank of a local group runs this on identical inputs, so each
//! rank's scheduler plans the same steps and the collectives line up
//! without a control plane.

use std::time::Instant;

use mlx_rs::{Array, Dtype};

use super::batch::{Alone, BatchEngine};
use super::error::{EngineError, Result};
use super::model::Llama;
use super::sampling::SamplingParams;
use super::schedule::{self, BatchLimits, Event, Finish, Request, Scheduler};
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
    pub finish_reason: Finish,
    /// How long it took.
    pub timings: Timings,
}

/// Logits `[vocab]` (as f32) of the last prompt position, from a fresh cache.
pub fn prefill_logits(model: &Llama, prompt: &[u32]) -> Result<Vec<f32>> {
    let ids = prompt_array(prompt)?;
    let mut cache = model.new_cache();
    let row = cache.claim();
    let logits = model
        .forward_last(&ids, &mut cache, row)?
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
    prompt_array(prompt)?;
    let mut request = Request::new(0, prompt.to_vec(), options.max_tokens);
    request.sampling = options.sampling;
    request.stop_ids = options.stop_ids.clone();
    let cpu_at_start = process_cpu_seconds();
    let mut engine = BatchEngine::new(model);
    let limits = BatchLimits::single(prompt.len() + options.max_tokens);
    let mut scheduler = Scheduler::new(limits, model.kv_bytes_per_token());
    let mut tokens = Vec::with_capacity(options.max_tokens);
    let mut outcome = None;
    let mut cpu_at_first = None;
    let mut cpu_at_last = None;
    let mut first_at: Option<Instant> = None;
    let mut failed = None;
    let mut on_event = |event: Event| match event {
        Event::Token { token, .. } => {
            let cpu = process_cpu_seconds();
            if first_at.is_none() {
                first_at = Some(Instant::now());
                cpu_at_first = cpu;
            }
            cpu_at_last = cpu;
            tokens.push(token);
            on_token(token);
        }
        Event::Finished { outcome: o, .. } => {
            if first_at.is_none() {
                // Ended on its first token (a stop token).
                first_at = Some(Instant::now());
                cpu_at_first = process_cpu_seconds();
            }
            cpu_at_last = process_cpu_seconds();
            outcome = Some(o);
        }
        Event::Failed { error, .. } => failed = Some(error),
        Event::Admitted { .. } => {}
    };
    schedule::lead(
        &mut engine,
        &mut scheduler,
        &Alone,
        &mut vec![request],
        &mut on_event,
        &mut |_, _| {},
    )?;
    if let Some(error) = failed {
        return Err(EngineError::Argument(format!(
            "the generation failed: {error}"
        )));
    }
    let Some(outcome) = outcome else {
        return Err(EngineError::Argument(
            "the generation did not finish".into(),
        ));
    };
    let ttft = outcome.time_to_first_token.as_secs_f64();
    let decode_seconds = outcome.decode_time.as_secs_f64();
    // Tokens read after the first (a stop token counts: it was computed).
    let decoded_after_first = match outcome.finish {
        Finish::Stop => tokens.len(),
        _ => tokens.len().saturating_sub(1),
    };
    let per_second = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    Ok(Generation {
        tokens,
        finish_reason: outcome.finish,
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
