//! Batched steps: the part of continuous batching every rank runs.
//!
//! A [`StepPlan`] says exactly what one step does: which sequences join
//! (with their prompts, sampling parameters and any reused prefix), which
//! leave (and which of them to keep as prefix-cache entries), which cache
//! entries to drop, and which sequences are fed this step and how many of
//! their prompt tokens. Rank 0's [`Scheduler`](super::schedule::Scheduler)
//! writes the plans; every rank applies the same plans in the same order to
//! its [`BatchEngine`], so every rank runs the same batched forward and its
//! collectives line up. No rank decides anything on its own.
//!
//! A step is lazy: [`BatchEngine::step`] builds the graph and queues it
//! (`async_eval`), and the tokens are read from the returned
//! [`PendingStep`] only after the next step has been queued, so the device
//! computes while the host plans. A sequence's next input is its own
//! sampled token, still on the device; the host never has to see it first.
//!
//! Every rank samples the same tokens without talking: after the last
//! `all_sum` the logits are identical on every rank, and each sequence's
//! sampler draws from its own seeded stream in the same order everywhere.

use std::collections::{BTreeMap, HashMap};

use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype, ops};

use super::error::{EngineError, Result};
use super::model::{KvCache, Llama, Segment};
use super::sampling::{Sampler, SamplingParams};

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A sequence joining the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Admit {
    /// Rank 0's id for the sequence.
    pub id: u64,
    /// The whole prompt.
    pub prompt: Vec<u32>,
    /// How its tokens are chosen (the seed is shared by every rank).
    pub sampling: SamplingParams,
    /// The prefix-cache entry whose first `tokens` positions this sequence
    /// starts from, instead of prefilling them.
    pub reuse: Option<Reuse>,
    /// Alternatives to report with each token's log-probability; `None`
    /// reports none. Only rank 0 computes them (no collective involved).
    pub logprobs: Option<usize>,
}

/// A prefix reused from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// The entry.
    pub entry: u64,
    /// How many of its positions (a prefix of the prompt).
    pub tokens: usize,
}

/// A sequence leaving the batch whose KV is kept as a prefix-cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Save {
    /// The sequence.
    pub id: u64,
    /// The new entry's id.
    pub entry: u64,
    /// Positions to keep (those whose tokens rank 0 knows).
    pub tokens: usize,
}

/// One sequence's input in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feed {
    /// The sequence.
    pub id: u64,
    /// Prompt tokens to prefill now; 0 feeds the token sampled last step.
    pub prompt_tokens: usize,
}

/// Everything one step changes and runs, identical on every rank.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepPlan {
    /// The step's number (0, 1, 2, ...); every rank checks it follows on.
    pub step: u64,
    /// Cache entries dropped first.
    pub evict: Vec<u64>,
    /// Sequences saved to the cache as they leave (before `retire`).
    pub save: Vec<Save>,
    /// Sequences leaving: finished, cancelled, or failed.
    pub retire: Vec<u64>,
    /// Sequences joining.
    pub admit: Vec<Admit>,
    /// What runs, in batch order.
    pub feed: Vec<Feed>,
}

impl StepPlan {
    /// Whether the plan runs a forward pass.
    pub fn runs(&self) -> bool {
        !self.feed.is_empty()
    }
}

/// Where rank 0's plans go before it runs them: the other ranks.
pub trait PlanSink {
    /// Hands `plan` to every other rank; `Err` says why the group cannot
    /// follow (it is then broken).
    fn send(&self, plan: &StepPlan) -> std::result::Result<(), String>;

    /// Whether there are no other ranks (a failed step can then be
    /// abandoned without leaving a peer inside a collective).
    fn alone(&self) -> bool {
        false
    }
}

/// A group of one: no one to tell.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl PlanSink for Alone {
    fn send(&self, _plan: &StepPlan) -> std::result::Result<(), String> {
        Ok(())
    }

    fn alone(&self) -> bool {
        true
    }
}

/// A token's log-probability and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens with theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One sequence's token from a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The sequence.
    pub id: u64,
    /// The token.
    pub token: u32,
    /// Log-probabilities, if the sequence asked.
    pub logprobs: Option<TokenLogprobs>,
}

struct LazyLogprobs {
    chosen: Array,
    top_ids: Option<Array>,
    top_values: Option<Array>,
}

/// A queued step whose tokens have not been read yet.
pub struct PendingStep {
    step: u64,
    samples: Vec<(u64, Array, Option<LazyLogprobs>)>,
    /// What to evaluate when nothing is sampled (a prompt chunk).
    sync: Option<Array>,
}

impl std::fmt::Debug for PendingStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingStep")
            .field("step", &self.step)
            .field("samples", &self.samples.len())
            .finish()
    }
}

impl PendingStep {
    fn arrays(&self) -> Vec<&Array> {
        let mut all = Vec::with_capacity(self.samples.len() * 2 + 1);
        all.extend(self.sync.iter());
        for (_, token, logprobs) in &self.samples {
            all.push(token);
            if let Some(l) = logprobs {
                all.push(&l.chosen);
                all.extend(l.top_ids.iter());
                all.extend(l.top_values.iter());
            }
        }
        all
    }

    /// Waits for the step to finish without reading it (ranks other than
    /// 0, which only have to keep in step).
    pub fn wait(self) -> Result<()> {
        mlx_rs::transforms::eval(self.arrays()).map_err(EngineError::mlx("a batched step"))
    }

    /// Waits for the step and reads every sampled token.
    pub fn read(self) -> Result<Vec<Sampled>> {
        mlx_rs::transforms::eval(self.arrays()).map_err(EngineError::mlx("a batched step"))?;
        let item = |a: &Array, what: &str| -> Result<u32> {
            a.try_item_cast::<u32>()
                .map_err(|e| EngineError::Argument(format!("reading {what}: {e}")))
        };
        let floats = |a: &Array| -> Result<Vec<f32>> {
            a.as_dtype(Dtype::Float32)
                .map_err(EngineError::mlx("reading log-probabilities"))?
                .try_as_slice::<f32>()
                .map(<[f32]>::to_vec)
                .map_err(|e| EngineError::Argument(format!("reading log-probabilities: {e}")))
        };
        let mut out = Vec::with_capacity(self.samples.len());
        for (id, token, logprobs) in self.samples {
            let token = item(&token, "a token")?;
            let logprobs = match logprobs {
                None => None,
                Some(l) => {
                    let logprob = floats(&l.chosen)?.first().copied().unwrap_or(f32::NAN);
                    let mut top = Vec::new();
                    if let (Some(ids), Some(values)) = (l.top_ids, l.top_values) {
                        let ids: Vec<u32> = ids
                            .as_dtype(Dtype::Uint32)
                            .map_err(EngineError::mlx("reading log-probabilities"))?
                            .try_as_slice::<u32>()
                            .map(<[u32]>::to_vec)
                            .map_err(|e| {
                                EngineError::Argument(format!("reading log-probabilities: {e}"))
                            })?;
                        top = ids.into_iter().zip(floats(&values)?).collect();
                        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    }
                    Some(TokenLogprobs { logprob, top })
                }
            };
            out.push(Sampled {
                id,
                token,
                logprobs,
            });
        }
        Ok(out)
    }
}

/// One sequence on one rank.
struct Sequence {
    /// Its row in the batch's KV cache.
    row: usize,
    prompt: Vec<u32>,
    /// Prompt tokens in the cache so far.
    prefilled: usize,
    sampler: Sampler,
    logprobs: Option<usize>,
    /// The token sampled last step, still lazy.
    last: Option<Array>,
}

/// A prefix-cache entry on one rank: keys and values per layer.
struct Entry {
    layers: Vec<(Array, Array)>,
    tokens: usize,
}

/// One rank's side of continuous batching: the running sequences' caches
/// and samplers, and the prefix-cache entries, changed only by plans.
pub struct BatchEngine<'m> {
    model: &'m Llama,
    cache: KvCache,
    sequences: HashMap<u64, Sequence>,
    entries: BTreeMap<u64, Entry>,
    next_step: u64,
}

impl std::fmt::Debug for BatchEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEngine")
            .field("sequences", &self.sequences.len())
            .field("entries", &self.entries.len())
            .field("next_step", &self.next_step)
            .finish()
    }
}

fn plan_error(message: String) -> EngineError {
    // A plan this rank cannot apply means the ranks are out of step.
    EngineError::OutOfStep(message)
}

impl<'m> BatchEngine<'m> {
    /// An empty batch over `model`.
    pub fn new(model: &'m Llama) -> BatchEngine<'m> {
        BatchEngine {
            model,
            cache: model.new_cache(),
            sequences: HashMap::new(),
            entries: BTreeMap::new(),
            next_step: 0,
        }
    }

    /// The model.
    pub fn model(&self) -> &'m Llama {
        self.model
    }

    /// Drops every sequence, the KV cache and the prefix-cache entries,
    /// after a step failed; the step count goes on.
    pub fn reset(&mut self) {
        self.cache = self.model.new_cache();
        self.sequences.clear();
        self.entries.clear();
    }

    /// Applies `plan` and queues its forward pass; the tokens come from the
    /// returned step (`None` when the plan runs nothing).
    pub fn step(&mut self, plan: &StepPlan) -> Result<Option<PendingStep>> {
        if plan.step != self.next_step {
            return Err(plan_error(format!(
                "expected step {}, got step {}",
                self.next_step, plan.step
            )));
        }
        self.next_step += 1;
        for entry in &plan.evict {
            self.entries.remove(entry);
        }
        for save in &plan.save {
            self.save(save)?;
        }
        let mut released = false;
        for id in &plan.retire {
            if let Some(sequence) = self.sequences.remove(id) {
                self.cache.release(sequence.row);
                released = true;
            }
        }
        if released {
            let moves = self
                .cache
                .settle()
                .map_err(EngineError::mlx("compacting the KV cache"))?;
            for (from, to) in moves {
                if let Some(s) = self.sequences.values_mut().find(|s| s.row == from) {
                    s.row = to;
                }
            }
        }
        for admit in &plan.admit {
            self.admit(admit)?;
        }
        if !plan.runs() {
            return Ok(None);
        }
        self.run(plan).map(Some)
    }

    fn save(&mut self, save: &Save) -> Result<()> {
        let Some(sequence) = self.sequences.get(&save.id) else {
            return Err(plan_error(format!(
                "cannot save sequence {}: it is not running",
                save.id
            )));
        };
        let len = i32::try_from(save.tokens).unwrap_or(i32::MAX);
        let Some(layers) = self
            .cache
            .prefix(sequence.row, len)
            .map_err(EngineError::mlx("keeping a prefix"))?
        else {
            return Err(plan_error(format!(
                "cannot save {} positions of sequence {}: it holds {}",
                save.tokens,
                save.id,
                self.cache.offset(sequence.row).unwrap_or(0)
            )));
        };
        self.entries.insert(
            save.entry,
            Entry {
                layers,
                tokens: save.tokens,
            },
        );
        Ok(())
    }

    fn admit(&mut self, admit: &Admit) -> Result<()> {
        if self.sequences.contains_key(&admit.id) {
            return Err(plan_error(format!(
                "sequence {} is already running",
                admit.id
            )));
        }
        if admit.prompt.is_empty() {
            return Err(EngineError::Argument("the prompt has no tokens".into()));
        }
        let prefilled = match admit.reuse {
            None => 0,
            Some(reuse) => {
                let Some(entry) = self.entries.get(&reuse.entry) else {
                    return Err(plan_error(format!(
                        "sequence {} reuses cache entry {}, which this rank does not hold",
                        admit.id, reuse.entry
                    )));
                };
                if reuse.tokens > entry.tokens || reuse.tokens >= admit.prompt.len() {
                    return Err(plan_error(format!(
                        "sequence {} reuses {} positions of an entry of {} for a prompt of {}",
                        admit.id,
                        reuse.tokens,
                        entry.tokens,
                        admit.prompt.len()
                    )));
                }
                reuse.tokens
            }
        };
        let sampler = Sampler::new(admit.sampling)?;
        let row = self.cache.claim();
        if let Some(reuse) = admit.reuse {
            let len = i32::try_from(reuse.tokens).unwrap_or(i32::MAX);
            let started = match self.entries.get(&reuse.entry) {
                Some(entry) => self.cache.start_from(row, &entry.layers, len),
                None => Ok(()),
            };
            if let Err(e) = started {
                self.cache.release(row);
                return Err(EngineError::mlx("starting from a cached prefix")(e));
            }
        }
        let logprobs = admit.logprobs.map(|k| k.min(MAX_TOP_LOGPROBS));
        self.sequences.insert(
            admit.id,
            Sequence {
                row,
                prompt: admit.prompt.clone(),
                prefilled,
                sampler,
                logprobs,
                last: None,
            },
        );
        Ok(())
    }

    fn run(&mut self, plan: &StepPlan) -> Result<PendingStep> {
        let mlx = EngineError::mlx;
        // Take the fed sequences out, in batch order, so they can be updated
        // while the step writes the batch's cache; they go back in below.
        let mut fed = Vec::with_capacity(plan.feed.len());
        for feed in &plan.feed {
            let Some(sequence) = self.sequences.remove(&feed.id) else {
                for (f, s) in fed {
                    self.sequences.insert(f, s);
                }
                return Err(plan_error(format!(
                    "step {} feeds sequence {}, which is not running",
                    plan.step, feed.id
                )));
            };
            fed.push((feed.id, sequence));
        }
        let result = self.run_fed(plan, &mut fed);
        for (id, sequence) in fed {
            self.sequences.insert(id, sequence);
        }
        let (samples, sync) = result?;
        let pending = PendingStep {
            step: plan.step,
            samples,
            sync,
        };
        mlx_rs::transforms::async_eval(pending.arrays()).map_err(mlx("queueing a batched step"))?;
        Ok(pending)
    }

    #[allow(clippy::type_complexity)]
    fn run_fed(
        &mut self,
        plan: &StepPlan,
        fed: &mut [(u64, Sequence)],
    ) -> Result<(Vec<(u64, Array, Option<LazyLogprobs>)>, Option<Array>)> {
        let mlx = EngineError::mlx;
        let mut inputs = Vec::with_capacity(fed.len());
        let mut segments = Vec::with_capacity(fed.len());
        // Which sequences sample this step (their index in `fed`), and at
        // which flat position.
        let mut samplers = Vec::new();
        let mut position = 0i32;
        for (index, (feed, (id, sequence))) in plan.feed.iter().zip(fed.iter_mut()).enumerate() {
            let len = if feed.prompt_tokens > 0 {
                let start = sequence.prefilled;
                let end = start + feed.prompt_tokens;
                let Some(chunk) = sequence.prompt.get(start..end) else {
                    return Err(plan_error(format!(
                        "step {} prefills tokens {start}..{end} of sequence {id}, whose prompt has {}",
                        plan.step,
                        sequence.prompt.len()
                    )));
                };
                let len = i32::try_from(chunk.len()).unwrap_or(i32::MAX);
                inputs.push(Array::from_slice(chunk, &[len]));
                sequence.prefilled = end;
                if end == sequence.prompt.len() {
                    samplers.push((index, position + len - 1));
                }
                len
            } else {
                let Some(last) = &sequence.last else {
                    return Err(plan_error(format!(
                        "step {} decodes sequence {id}, which has no token yet",
                        plan.step
                    )));
                };
                inputs.push(last.reshape(&[1]).map_err(mlx("decode input"))?);
                samplers.push((index, position));
                1
            };
            segments.push(Segment {
                row: sequence.row,
                len,
            });
            position += len;
        }
        let ids = if inputs.len() == 1 {
            inputs.remove(0)
        } else {
            ops::concatenate(&inputs, 0).map_err(mlx("batching the inputs"))?
        };
        let ids = ids
            .as_dtype(Dtype::Int32)
            .and_then(|a| a.reshape(&[1, position]))
            .map_err(mlx("batching the inputs"))?;
        let hidden = self
            .model
            .forward_segments(&ids, &mut self.cache, &segments)?;
        if samplers.is_empty() {
            // Only prompt chunks that do not finish their prompt: the step
            // still has to run (its collectives and cache writes).
            let done = hidden
                .try_index((.., position - 1, ..))
                .map_err(mlx("selecting a position"))?;
            return Ok((Vec::new(), Some(done)));
        }
        let rows: Vec<i32> = samplers.iter().map(|(_, p)| *p).collect();
        let picked = if rows.len() == 1 && rows[0] == position - 1 {
            hidden
                .try_index((.., position - 1, ..))
                .map_err(mlx("selecting the last position"))?
        } else {
            let index = Array::from_slice(&rows, &[rows.len() as i32]);
            hidden
                .take_axis(&index, 1)
                .map_err(mlx("selecting the sampled positions"))?
        };
        // [1, S, vocab] (or [1, vocab] for one row).
        let logits = self.model.logits(&picked)?;
        let mut out = Vec::with_capacity(samplers.len());
        for (row, &(index, _)) in samplers.iter().enumerate() {
            let (id, sequence) = &mut fed[index];
            let row_logits = if logits.ndim() == 2 {
                logits.clone()
            } else {
                logits
                    .try_index((.., row as i32, ..))
                    .map_err(mlx("selecting a row of logits"))?
            };
            let token = sequence.sampler.sample(&row_logits)?;
            let logprobs = match sequence.logprobs {
                None => None,
                Some(top) => {
                    Some(logprobs_of(&row_logits, &token, top).map_err(mlx("log-probabilities"))?)
                }
            };
            sequence.last = Some(token.clone());
            out.push((*id, token, logprobs));
        }
        Ok((out, None))
    }
}

/// The chosen token's log-probability and the `top` most likely, from one
/// row of logits `[1, vocab]` (in float32, as OpenAI reports them).
fn logprobs_of(logits: &Array, token: &Array, top: usize) -> mlx_rs::error::Result<LazyLogprobs> {
    let x = logits.as_dtype(Dtype::Float32)?;
    let logprobs = x.subtract(x.logsumexp_axis(-1, true)?)?;
    let index = token.reshape(&[1, 1])?.as_dtype(Dtype::Int32)?;
    let chosen = logprobs.take_along_axis(&index, -1)?.reshape(&[1])?;
    if top == 0 {
        return Ok(LazyLogprobs {
            chosen,
            top_ids: None,
            top_values: None,
        });
    }
    let vocab = logprobs.shape()[1];
    let k = (top as i32).min(vocab);
    let negated = logprobs.multiply(Array::from_f32(-1.0))?;
    let ids = ops::argpartition_axis(&negated, k - 1, -1)?.try_index((.., ..k))?;
    let values = logprobs.take_along_axis(&ids, -1)?;
    Ok(LazyLogprobs {
        chosen,
        top_ids: Some(ids.reshape(&[k])?),
        top_values: Some(values.reshape(&[k])?),
    })
}
