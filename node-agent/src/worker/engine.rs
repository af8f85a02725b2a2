//! The seam between a rank worker and the inference engine.
//!
//! - [`RankEngine`]: runs one [`GenerationJob`] on this rank, in lockstep
//!   with the other ranks, handing each token to a [`StepSink`] and asking it
//!   after each step whether to stop.
//! - [`TextCodec`]: rank 0's text side (chat template, encoding, decoding).
//!
//! [`MlxRankEngine`] and [`TokenizerCodec`] implement them with the real
//! engine (`crate::engine`). Tests of the HTTP and control layers may use
//! other implementations; anything that claims inference uses these.
//!
//! Stopping early in a tensor-parallel group: every rank must run exactly
//! the same number of steps, or one rank would wait forever in an `all_sum`
//! the others never join. So the decision to stop (a client went away, a
//! stop string matched) travels through the group itself: each step also
//! sums a one-element "stop" flag over the ranks, and every rank stops at
//! the first step whose sum is non-zero. The flag is queued with the step,
//! so it costs one tiny collective and no extra round trip.

use std::path::Path;
use std::time::{Duration, Instant};

use mlx_rs::Array;

use crate::engine::config::ModelConfig;
use crate::engine::model::Llama;
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::tokenizer::{ChatMessage, TextTokenizer};
use crate::engine::{EngineError, Result};
use crate::mlx::distributed::Group;

/// One generation, identical on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationJob {
    /// Rank 0's id for the request.
    pub id: u64,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters (with the seed every rank shares).
    pub sampling: SamplingParams,
    /// Tokens that end the generation.
    pub stop_ids: Vec<u32>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// A rank asked to stop.
    Cancelled,
}

/// What a generation did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Tokens handed to the sink.
    pub generated: usize,
    /// Why it ended.
    pub finish: Finish,
    /// From the start to the first token.
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
}

/// Where a rank's tokens go, and who may stop the generation.
pub trait StepSink {
    /// Whether this rank wants the group to stop (asked once per step).
    fn stop_requested(&self) -> bool;
    /// One generated token.
    fn token(&mut self, id: u32);
}

/// Runs generations on one rank.
pub trait RankEngine {
    /// Runs `job` to its end, in lockstep with the other ranks.
    fn run(&mut self, job: &GenerationJob, sink: &mut dyn StepSink) -> Result<Outcome>;
}

/// Rank 0's text handling.
pub trait TextCodec: Send + Sync {
    /// Prompt ids of a chat, through the model's chat template.
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>>;
    /// Prompt ids of plain text.
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of generated ids.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Ids that end a generation.
    fn stop_ids(&self) -> Vec<u32>;
}

/// The real engine on one rank: this rank's slice of a Llama model.
#[derive(Debug)]
pub struct MlxRankEngine {
    model: Llama,
    /// A second handle on the process's group, for the stop flags (the
    /// model owns the first). `None` for a group of one.
    flags: Option<Group>,
}

impl MlxRankEngine {
    /// Loads this rank's slice of the model in `dir`.
    pub fn load(dir: &Path, group: Option<Group>) -> Result<MlxRankEngine> {
        // MLX keeps one group per backend per process: joining again hands
        // back the same group.
        let flags = match &group {
            Some(g) if g.size() > 1 => Some(Group::join(g.backend())?),
            _ => None,
        };
        let model = Llama::load(dir, group)?;
        Ok(MlxRankEngine { model, flags })
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Bytes this rank read from the checkpoint.
    pub fn bytes_read(&self) -> u64 {
        self.model.load_stats().bytes_read
    }

    /// The stop flag of this step, summed over the group (lazy).
    fn flag(&self, stop: bool) -> Result<Option<Array>> {
        let Some(group) = &self.flags else {
            return Ok(None);
        };
        let local = Array::from_slice(&[if stop { 1.0f32 } else { 0.0 }], &[1]);
        Ok(Some(group.all_sum(&local)?))
    }
}

fn read_flag(flag: &Option<Array>, local: bool) -> Result<bool> {
    match flag {
        Some(sum) => {
            sum.eval()
                .map_err(EngineError::mlx("reading the stop flag"))?;
            let value = sum
                .try_item_cast::<f32>()
                .map_err(|e| EngineError::Argument(format!("reading the stop flag: {e}")))?;
            Ok(value > 0.0)
        }
        None => Ok(local),
    }
}

impl RankEngine for MlxRankEngine {
    fn run(&mut self, job: &GenerationJob, sink: &mut dyn StepSink) -> Result<Outcome> {
        let mlx = EngineError::mlx;
        let started = Instant::now();
        if job.prompt_ids.is_empty() {
            return Err(EngineError::Argument("the prompt has no tokens".into()));
        }
        if job.max_tokens == 0 {
            return Ok(Outcome {
                generated: 0,
                finish: Finish::Length,
                time_to_first_token: Duration::ZERO,
                decode_time: Duration::ZERO,
            });
        }
        let len = i32::try_from(job.prompt_ids.len())
            .map_err(|_| EngineError::Argument("the prompt is too long".into()))?;
        let ids = Array::from_slice(&job.prompt_ids, &[1, len]);
        let mut sampler = Sampler::new(job.sampling)?;
        let mut cache = self.model.new_cache();

        let logits = self.model.forward_last(&ids, &mut cache)?;
        let mut current = sampler.sample(&logits)?;
        let mut current_flag = self.flag(sink.stop_requested())?;
        let mut queued: Vec<&Array> = vec![&current];
        queued.extend(current_flag.as_ref());
        mlx_rs::transforms::async_eval(queued).map_err(mlx("prefill"))?;

        let mut generated = 0usize;
        let mut first_at: Option<Instant> = None;
        let mut last_at;
        let finish = loop {
            // Queue the next step (and its flag) before reading this one.
            let next = if generated + 1 < job.max_tokens {
                let input = current.reshape(&[1, 1]).map_err(mlx("decode input"))?;
                let logits = self.model.forward_last(&input, &mut cache)?;
                let token = sampler.sample(&logits)?;
                let flag = self.flag(sink.stop_requested())?;
                let mut queued: Vec<&Array> = vec![&token];
                queued.extend(flag.as_ref());
                mlx_rs::transforms::async_eval(queued).map_err(mlx("decode step"))?;
                Some((token, flag))
            } else {
                None
            };
            current.eval().map_err(mlx("decode step"))?;
            let stop = read_flag(&current_flag, sink.stop_requested())?;
            let token = current
                .try_item_cast::<u32>()
                .map_err(|e| EngineError::Argument(format!("reading the token: {e}")))?;
            let now = Instant::now();
            first_at.get_or_insert(now);
            last_at = now;
            if stop {
                finish_pending(next)?;
                break Finish::Cancelled;
            }
            if job.stop_ids.contains(&token) {
                finish_pending(next)?;
                break Finish::Stop;
            }
            generated += 1;
            sink.token(token);
            match next {
                Some((token, flag)) => {
                    current = token;
                    current_flag = flag;
                }
                None => break Finish::Length,
            }
        };
        let first_at = first_at.unwrap_or(last_at);
        Ok(Outcome {
            generated,
            finish,
            time_to_first_token: first_at.duration_since(started),
            decode_time: last_at.duration_since(first_at),
        })
    }
}

/// Completes a step queued past the end, so no peer is left waiting in it.
fn finish_pending(pending: Option<(Array, Option<Array>)>) -> Result<()> {
    if let Some((token, flag)) = pending {
        token
            .eval()
            .map_err(EngineError::mlx("finishing the last step"))?;
        if let Some(flag) = flag {
            flag.eval()
                .map_err(EngineError::mlx("finishing the last step"))?;
        }
    }
    Ok(())
}

/// Rank 0's text side, from the model directory's tokenizer and config.
#[derive(Debug)]
pub struct TokenizerCodec {
    tokenizer: TextTokenizer,
    stop_ids: Vec<u32>,
}

impl TokenizerCodec {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and the end-of-sequence
    /// ids of `config.json`.
    pub fn load(dir: &Path) -> Result<TokenizerCodec> {
        let tokenizer = TextTokenizer::load(dir)?;
        let config = ModelConfig::load(dir)?;
        let mut stop_ids = config.eos_token_ids.clone();
        if let Some(eos) = tokenizer.eos_token_id()
            && !stop_ids.contains(&eos)
        {
            stop_ids.push(eos);
        }
        Ok(TokenizerCodec {
            tokenizer,
            stop_ids,
        })
    }
}

impl TextCodec for TokenizerCodec {
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.tokenizer.encode_chat(messages)
    }

    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_plain(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    fn stop_ids(&self) -> Vec<u32> {
        self.stop_ids.clone()
    }
}

/// Turns a growing list of token ids into text pieces, holding back a piece
/// while it ends in the middle of a UTF-8 character.
///
/// Only a short window is decoded per token (the tokens since the last
/// emitted piece, plus the piece before them for context), as vLLM's
/// incremental detokenizer does, so a long generation costs linear time.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the new text, if any whole characters arrived.
    pub fn push(&mut self, codec: &dyn TextCodec, id: u32) -> Option<String> {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix..self.read]).ok()?;
        let now = codec.decode(&self.ids[self.prefix..]).ok()?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return None;
        }
        let fresh = now.get(before.len()..)?.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Some(fresh)
    }

    /// The text not yet returned, even if it ends mid-character (the
    /// generation is over; nothing will complete it).
    pub fn flush(&mut self, codec: &dyn TextCodec) -> Option<String> {
        let before = codec.decode(&self.ids[self.prefix..self.read]).ok()?;
        let now = codec.decode(&self.ids[self.prefix..]).ok()?;
        let rest = now.get(before.len()..)?.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        (!rest.is_empty()).then_some(rest)
    }

    /// Everything decoded so far.
    pub fn text(&self, codec: &dyn TextCodec) -> String {
        codec.decode(&self.ids).unwrap_or_default()
    }

    /// The ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte: multi-byte characters arrive in pieces, as with
    /// Llama 3's byte-level BPE.
    struct Bytes;

    impl TextCodec for Bytes {
        fn encode_chat(&self, _: &[ChatMessage]) -> Result<Vec<u32>> {
            Ok(Vec::new())
        }
        fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let bytes: Vec<u8> = ids.iter().map(|i| *i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn stop_ids(&self) -> Vec<u32> {
            Vec::new()
        }
    }

    #[test]
    fn pieces_are_whole_characters_and_add_up_to_the_text() {
        let text = "héllo wörld → 🦙!";
        let mut d = Detokenizer::default();
        let mut out = String::new();
        for id in Bytes.encode_plain(text).expect("encode") {
            if let Some(piece) = d.push(&Bytes, id) {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                out.push_str(&piece);
            }
        }
        assert_eq!(out, text);
        assert_eq!(d.text(&Bytes), text);
        assert_eq!(d.flush(&Bytes), None);
    }

    #[test]
    fn an_unfinished_character_is_flushed_at_the_end() {
        let mut d = Detokenizer::default();
        assert_eq!(d.push(&Bytes, u32::from(b'a')), Some("a".into()));
        // The first byte of "é" alone is held back...
        assert_eq!(d.push(&Bytes, 0xC3), None);
        // ...and comes out as a replacement character when nothing follows.
        assert_eq!(d.flush(&Bytes), Some("\u{FFFD}".into()));
    }
}
