//! Rank 0's half of continuous batching: which requests run in each step.
//!
//! The [`Scheduler`] keeps the waiting requests, the running ones and the
//! prefix-cache index, and turns them into one [`StepPlan`] per step:
//! - finished and cancelled requests leave (their KV kept as a cache entry
//!   when the prefix cache is on, evicting the least recently used entries
//!   past its byte budget);
//! - waiting requests join while the batch has room: at most
//!   `max_sequences`, and at most `max_tokens` of KV reserved, each starting
//!   from the longest cached prefix of its prompt. A request reserves its
//!   prompt plus its `max_tokens`; the batch's KV cache is one rectangular
//!   buffer (a row per sequence, as long as the longest), so what the batch
//!   reserves is its sequences times the longest reservation;
//! - every decoding request is fed its last token, and prompts are
//!   prefilled in chunks of at most `prefill_chunk_tokens` tokens per step in
//!   arrival order, so a long prompt shares steps with the running streams
//!   instead of stalling them.
//!
//! [`lead`] is the one decode loop: plan, hand the plan to the other ranks,
//! queue it, read the step before, report. The CLI's `generate`, the
//! benchmarks and the server all run it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::batch::{
    Admit, BatchEngine, Feed, PendingStep, PlanSink, Reuse, Sampled, Save, StepPlan, TokenLogprobs,
};
use super::error::{EngineError, Result};
use super::sampling::SamplingParams;

/// The batch's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most sequences in one step.
    pub max_sequences: usize,
    /// Most KV positions the batch reserves: its sequences times the longest
    /// reservation among them (each request reserves its prompt plus its
    /// `max_tokens`), since the cache gives every sequence a row as long as
    /// the longest.
    pub max_tokens: usize,
    /// Most prompt tokens prefilled in one step.
    pub prefill_chunk_tokens: usize,
    /// Bytes of KV (per rank) kept for reuse; 0 turns the cache off.
    pub prefix_cache_bytes: u64,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_sequences: 16,
            max_tokens: 32768,
            prefill_chunk_tokens: 2048,
            prefix_cache_bytes: 512 << 20,
        }
    }
}

impl BatchLimits {
    /// One request at a time, whole prompts, no cache: what a single
    /// command-line generation needs.
    pub fn single(max_context: usize) -> BatchLimits {
        BatchLimits {
            max_sequences: 1,
            max_tokens: max_context.max(1),
            prefill_chunk_tokens: max_context.max(1),
            prefix_cache_bytes: 0,
        }
    }
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// It was cancelled (client gone, stop string matched).
    Cancelled,
}

impl Finish {
    /// The OpenAI-style name (`stop` for a cancellation, which the server
    /// only asks for once a stop string matched or no one is listening).
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop | Finish::Cancelled => "stop",
            Finish::Length => "length",
        }
    }
}

/// One request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Unique id.
    pub id: u64,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to choose them (with the seed every rank shares).
    pub sampling: SamplingParams,
    /// Tokens that end the generation (not reported).
    pub stop_ids: Vec<u32>,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Set to stop the request at the next step.
    pub cancel: Arc<AtomicBool>,
    /// When it arrived (time to first token counts from here).
    pub arrived: Instant,
    /// Set when the request ran in a batch whose step failed without being
    /// the cause, and was queued again to go on: its prompt then ends with
    /// the tokens it had generated, and its `max_tokens` is what is left.
    pub resumed: Option<Resumed>,
}

/// What a request queued again after a failed step had done before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resumed {
    /// Its own prompt's length (the rest of the prompt now is generated).
    pub prompt_tokens: usize,
    /// Tokens it had generated and reported.
    pub generated: usize,
    /// Prompt tokens it had taken from the prefix cache.
    pub cached_tokens: usize,
    /// When it was first admitted.
    pub admitted: Instant,
    /// When its first token came, if it had come.
    pub first_at: Option<Instant>,
}

impl Request {
    /// A request with defaults: greedy, no stop ids, no log-probabilities.
    pub fn new(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Request {
        Request {
            id,
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            logprobs: None,
            cancel: Arc::default(),
            arrived: Instant::now(),
            resumed: None,
        }
    }

    fn reservation(&self) -> usize {
        self.prompt.len().saturating_add(self.max_tokens)
    }
}

/// How one request went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Why it ended.
    pub finish: Finish,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache.
    pub cached_tokens: usize,
    /// Tokens reported.
    pub generated: usize,
    /// From arrival to the first token on the host.
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
    /// From arrival to admission into the batch.
    pub queued: Duration,
}

/// What the loop reports, per request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request joined the batch.
    Admitted {
        /// The request.
        id: u64,
        /// Prompt tokens reused from the prefix cache.
        cached_tokens: usize,
    },
    /// A generated token.
    Token {
        /// The request.
        id: u64,
        /// The token.
        token: u32,
        /// Its log-probabilities, if asked for.
        logprobs: Option<TokenLogprobs>,
    },
    /// The request ended.
    Finished {
        /// The request.
        id: u64,
        /// How it went.
        outcome: Outcome,
    },
    /// The engine failed on a step this request was part of; the request
    /// ended, and the loop went on without it.
    Failed {
        /// The request.
        id: u64,
        /// The engine's error.
        error: String,
    },
}

struct Running {
    request: Request,
    cached: usize,
    /// Prompt tokens fed (cached ones included).
    prefilled: usize,
    /// Samples planned (each decode feed and the prompt's last chunk).
    scheduled: usize,
    /// Generated tokens fed back in (their positions are in the cache).
    fed_generated: usize,
    /// Tokens read, the stop token included.
    sampled: Vec<u32>,
    finish: Option<Finish>,
    admitted: Instant,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl Running {
    fn reported(&self) -> usize {
        match self.finish {
            Some(Finish::Stop) => self.sampled.len().saturating_sub(1),
            _ => self.sampled.len(),
        }
    }

    fn outcome(&self, finish: Finish) -> Outcome {
        let now = Instant::now();
        let first = self.first_at.unwrap_or(now);
        let before = self.request.resumed;
        Outcome {
            finish,
            prompt_tokens: before.map_or(self.request.prompt.len(), |b| b.prompt_tokens),
            cached_tokens: before.map_or(self.cached, |b| b.cached_tokens),
            generated: self.reported() + before.map_or(0, |b| b.generated),
            time_to_first_token: first.duration_since(self.request.arrived),
            decode_time: self.last_at.unwrap_or(first).duration_since(first),
            queued: before
                .map_or(self.admitted, |b| b.admitted)
                .duration_since(self.request.arrived),
        }
    }

    /// The request again, to go on from where this one is: its prompt
    /// extended by what it generated, `max_tokens` reduced by as much.
    fn resume(self) -> Request {
        let before = self.request.resumed;
        let mut request = self.request;
        let generated = self.sampled.len();
        let first_at = before.and_then(|b| b.first_at).or(self.first_at);
        request.resumed = Some(Resumed {
            prompt_tokens: before.map_or(request.prompt.len(), |b| b.prompt_tokens),
            generated: before.map_or(0, |b| b.generated) + generated,
            cached_tokens: before.map_or(self.cached, |b| b.cached_tokens),
            admitted: before.map_or(self.admitted, |b| b.admitted),
            first_at,
        });
        request.prompt.extend_from_slice(&self.sampled);
        request.max_tokens = request.max_tokens.saturating_sub(generated);
        request
    }
}

struct CacheEntry {
    id: u64,
    tokens: Vec<u32>,
    bytes: u64,
    last_used: u64,
}

/// Rank 0's batch state and policy.
pub struct Scheduler {
    limits: BatchLimits,
    kv_bytes_per_token: u64,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    entries: Vec<CacheEntry>,
    cache_bytes: u64,
    next_step: u64,
    next_entry: u64,
    clock: u64,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("limits", &self.limits)
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("entries", &self.entries.len())
            .field("cache_bytes", &self.cache_bytes)
            .finish()
    }
}

/// Length of the common prefix of two token lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler {
    /// A scheduler with `limits`; the cache budget is counted with
    /// `kv_bytes_per_token` (this rank's; every rank's is the same).
    pub fn new(limits: BatchLimits, kv_bytes_per_token: u64) -> Scheduler {
        Scheduler {
            limits: BatchLimits {
                max_sequences: limits.max_sequences.max(1),
                max_tokens: limits.max_tokens.max(1),
                prefill_chunk_tokens: limits.prefill_chunk_tokens.max(1),
                prefix_cache_bytes: limits.prefix_cache_bytes,
            },
            kv_bytes_per_token: kv_bytes_per_token.max(1),
            waiting: VecDeque::new(),
            running: Vec::new(),
            entries: Vec::new(),
            cache_bytes: 0,
            next_step: 0,
            next_entry: 1,
            clock: 0,
        }
    }

    /// Queues a request.
    pub fn enqueue(&mut self, request: Request) {
        self.waiting.push_back(request);
    }

    /// Requests waiting for a place in the batch.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests in the batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Bytes of KV held by the prefix cache (per rank).
    pub fn cache_bytes(&self) -> u64 {
        self.cache_bytes
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn entry_bytes(&self, tokens: usize) -> u64 {
        tokens as u64 * self.kv_bytes_per_token
    }

    /// Moves finished requests out (saving their prefixes) and drops cache
    /// entries past the budget.
    fn retire(&mut self, plan: &mut StepPlan) {
        let mut kept = Vec::with_capacity(self.running.len());
        for r in std::mem::take(&mut self.running) {
            if r.finish.is_none() {
                kept.push(r);
                continue;
            }
            plan.retire.push(r.request.id);
            if self.limits.prefix_cache_bytes == 0 {
                continue;
            }
            let fed = r.fed_generated.min(r.sampled.len());
            let mut tokens: Vec<u32> = r.request.prompt[..r.prefilled].to_vec();
            if r.prefilled == r.request.prompt.len() {
                tokens.extend_from_slice(&r.sampled[..fed]);
            }
            let bytes = self.entry_bytes(tokens.len());
            if tokens.is_empty() || bytes > self.limits.prefix_cache_bytes {
                continue;
            }
            // Nothing to add if an entry already starts with all of it.
            if self
                .entries
                .iter()
                .any(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
            {
                continue;
            }
            // Entries this one extends (a chat's earlier turn) are now
            // redundant.
            let mut i = 0;
            while i < self.entries.len() {
                if tokens.starts_with(&self.entries[i].tokens) {
                    let old = self.entries.swap_remove(i);
                    self.cache_bytes -= old.bytes;
                    plan.evict.push(old.id);
                } else {
                    i += 1;
                }
            }
            let id = self.next_entry;
            self.next_entry += 1;
            self.clock += 1;
            plan.save.push(Save {
                id: r.request.id,
                entry: id,
                tokens: tokens.len(),
            });
            self.cache_bytes += bytes;
            self.entries.push(CacheEntry {
                id,
                tokens,
                bytes,
                last_used: self.clock,
            });
        }
        self.running = kept;
        while self.cache_bytes > self.limits.prefix_cache_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let old = self.entries.swap_remove(oldest);
            self.cache_bytes -= old.bytes;
            // An entry saved in this very plan and evicted again is simply
            // not saved.
            if let Some(at) = plan.save.iter().position(|s| s.entry == old.id) {
                plan.save.remove(at);
            } else {
                plan.evict.push(old.id);
            }
        }
    }

    /// The longest cached prefix of `prompt`, leaving at least one prompt
    /// token to run (its logits give the first token).
    fn lookup(&mut self, prompt: &[u32]) -> Option<Reuse> {
        let limit = prompt.len().saturating_sub(1);
        let (index, tokens) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|(_, n)| *n)?;
        if tokens == 0 {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.last_used = self.clock;
        Some(Reuse {
            entry: entry.id,
            tokens,
        })
    }

    /// The next step's plan, or `None` when there is nothing to do or tell.
    /// Cancelled waiting requests are reported through `on_event`.
    pub fn plan(&mut self, on_event: &mut dyn FnMut(Event)) -> Option<StepPlan> {
        let mut plan = StepPlan {
            step: self.next_step,
            ..StepPlan::default()
        };
        for r in &mut self.running {
            if r.finish.is_none() && r.request.cancel.load(Ordering::Relaxed) {
                r.finish = Some(Finish::Cancelled);
                on_event(Event::Finished {
                    id: r.request.id,
                    outcome: r.outcome(Finish::Cancelled),
                });
            }
        }
        self.waiting.retain(|w| {
            let cancelled = w.cancel.load(Ordering::Relaxed);
            if cancelled {
                on_event(Event::Finished {
                    id: w.id,
                    outcome: Outcome {
                        finish: Finish::Cancelled,
                        prompt_tokens: w.prompt.len(),
                        cached_tokens: 0,
                        generated: 0,
                        time_to_first_token: Duration::ZERO,
                        decode_time: Duration::ZERO,
                        queued: w.arrived.elapsed(),
                    },
                });
            }
            !cancelled
        });
        self.retire(&mut plan);

        let mut longest = self
            .running
            .iter()
            .map(|r| r.request.reservation())
            .max()
            .unwrap_or(0);
        while let Some(next) = self.waiting.front() {
            let rows = self.running.len() + 1;
            let fits = self.running.len() < self.limits.max_sequences
                && (self.running.is_empty()
                    || rows.saturating_mul(longest.max(next.reservation()))
                        <= self.limits.max_tokens);
            if !fits {
                break;
            }
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            longest = longest.max(request.reservation());
            let reuse = if self.limits.prefix_cache_bytes > 0 {
                self.lookup(&request.prompt)
            } else {
                None
            };
            let cached = reuse.map_or(0, |r| r.tokens);
            if request.resumed.is_none() {
                on_event(Event::Admitted {
                    id: request.id,
                    cached_tokens: cached,
                });
            }
            plan.admit.push(Admit {
                id: request.id,
                prompt: request.prompt.clone(),
                sampling: request.sampling,
                reuse,
                logprobs: request.logprobs,
            });
            let running = Running {
                cached,
                prefilled: cached,
                scheduled: 0,
                fed_generated: 0,
                sampled: Vec::new(),
                finish: (request.max_tokens == 0).then_some(Finish::Length),
                admitted: Instant::now(),
                first_at: request.resumed.and_then(|b| b.first_at),
                last_at: None,
                request,
            };
            if running.finish.is_some() {
                // Nothing to generate: done as soon as it is in.
                on_event(Event::Finished {
                    id: running.request.id,
                    outcome: running.outcome(Finish::Length),
                });
            }
            self.running.push(running);
        }

        // Decoding sequences first: one token each.
        for r in &mut self.running {
            let prompt = r.request.prompt.len();
            if r.finish.is_some() || r.prefilled < prompt || r.scheduled >= r.request.max_tokens {
                continue;
            }
            plan.feed.push(Feed {
                id: r.request.id,
                prompt_tokens: 0,
            });
            r.scheduled += 1;
            r.fed_generated += 1;
        }
        // Then prompt chunks, oldest first, within the step's budget.
        let mut budget = self.limits.prefill_chunk_tokens;
        for r in &mut self.running {
            let prompt = r.request.prompt.len();
            if budget == 0 {
                break;
            }
            if r.finish.is_some() || r.prefilled >= prompt {
                continue;
            }
            let n = budget.min(prompt - r.prefilled);
            plan.feed.push(Feed {
                id: r.request.id,
                prompt_tokens: n,
            });
            budget -= n;
            r.prefilled += n;
            if r.prefilled == prompt {
                r.scheduled += 1;
            }
        }
        let empty = plan.feed.is_empty()
            && plan.admit.is_empty()
            && plan.retire.is_empty()
            && plan.save.is_empty()
            && plan.evict.is_empty();
        if empty {
            return None;
        }
        self.next_step += 1;
        Some(plan)
    }

    /// After the engine failed on a step (and was reset): ends the requests
    /// named in `culprits` (those whose prompt the failed step was
    /// prefilling), or every request of the batch when none is named, with
    /// `error`; the others go back to the front of the queue to go on where
    /// they were ([`Request::resumed`]). The prefix cache is forgotten (the
    /// engine's went with the reset).
    pub fn abandon(&mut self, culprits: &[u64], error: &str, on_event: &mut dyn FnMut(Event)) {
        let mut again = Vec::new();
        for r in std::mem::take(&mut self.running) {
            if r.finish.is_some() {
                continue;
            }
            if culprits.is_empty() || culprits.contains(&r.request.id) {
                on_event(Event::Failed {
                    id: r.request.id,
                    error: error.to_owned(),
                });
            } else {
                again.push(r.resume());
            }
        }
        for request in again.into_iter().rev() {
            self.waiting.push_front(request);
        }
        self.entries.clear();
        self.cache_bytes = 0;
    }

    /// Takes a step's tokens: reports them, and ends requests that reached
    /// a stop token or their `max_tokens`.
    pub fn absorb(&mut self, sampled: Vec<Sampled>, on_event: &mut dyn FnMut(Event)) {
        let now = Instant::now();
        for s in sampled {
            let Some(r) = self.running.iter_mut().find(|r| r.request.id == s.id) else {
                continue;
            };
            if r.finish.is_some() {
                // Computed before the request ended; nobody wants it.
                continue;
            }
            r.sampled.push(s.token);
            r.first_at.get_or_insert(now);
            r.last_at = Some(now);
            if r.request.stop_ids.contains(&s.token) {
                r.finish = Some(Finish::Stop);
            } else {
                on_event(Event::Token {
                    id: s.id,
                    token: s.token,
                    logprobs: s.logprobs,
                });
                if r.sampled.len() >= r.request.max_tokens {
                    r.finish = Some(Finish::Length);
                }
            }
            if let Some(finish) = r.finish {
                on_event(Event::Finished {
                    id: s.id,
                    outcome: r.outcome(finish),
                });
            }
        }
    }
}

/// Where the loop gets its requests.
pub trait Intake {
    /// New requests; waits for one when `wait` is set. `None`: no more
    /// will come.
    fn poll(&mut self, wait: bool) -> Option<Vec<Request>>;
}

impl Intake for std::sync::mpsc::Receiver<Request> {
    fn poll(&mut self, wait: bool) -> Option<Vec<Request>> {
        let mut out = Vec::new();
        if wait {
            out.push(self.recv().ok()?);
        }
        loop {
            match self.try_recv() {
                Ok(r) => out.push(r),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Some(out),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    return if out.is_empty() { None } else { Some(out) };
                }
            }
        }
    }
}

/// A fixed list of requests, all there from the start.
impl Intake for Vec<Request> {
    fn poll(&mut self, _wait: bool) -> Option<Vec<Request>> {
        if self.is_empty() {
            None
        } else {
            Some(std::mem::take(self))
        }
    }
}

/// Runs requests from `intake` through `engine` until the intake closes and
/// every request has ended, handing each plan to `sink` (the other ranks)
/// before running it, and reporting through `on_event`. Every plan is
/// queued before the step before it is read, so the device is never idle
/// waiting for the host. `after_step` sees the scheduler after each step,
/// and whether a step is still running on the device.
pub fn lead(
    engine: &mut BatchEngine<'_>,
    scheduler: &mut Scheduler,
    sink: &dyn PlanSink,
    intake: &mut dyn Intake,
    on_event: &mut dyn FnMut(Event),
    after_step: &mut dyn FnMut(&Scheduler, bool),
) -> Result<()> {
    // The step running on the device, and the requests it prefills.
    let mut pending: Option<(PendingStep, Vec<u64>)> = None;
    let mut open = true;
    loop {
        if open {
            let wait = scheduler.is_idle() && pending.is_none();
            match intake.poll(wait) {
                Some(requests) => requests.into_iter().for_each(|r| scheduler.enqueue(r)),
                None => open = false,
            }
        }
        let plan = scheduler.plan(on_event);
        let changed = plan.is_some() || pending.is_some();
        let queued = match plan {
            Some(plan) => {
                sink.send(&plan).map_err(|reason| {
                    EngineError::OutOfStep(format!("the other ranks cannot follow: {reason}"))
                })?;
                let prefilling = prefilling(&plan);
                match engine.step(&plan) {
                    Ok(queued) => queued.map(|q| (q, prefilling)),
                    Err(e) => {
                        recover(e, &prefilling, sink, engine, scheduler, on_event)?;
                        pending = None;
                        continue;
                    }
                }
            }
            None => None,
        };
        if let Some((before, prefilled)) = pending.take() {
            match before.read() {
                Ok(sampled) => scheduler.absorb(sampled, on_event),
                Err(e) => {
                    drop(queued);
                    recover(e, &prefilled, sink, engine, scheduler, on_event)?;
                    continue;
                }
            }
        }
        if changed {
            after_step(scheduler, queued.is_some());
        }
        pending = queued;
        if !open && pending.is_none() && scheduler.is_idle() {
            return Ok(());
        }
    }
}

/// The requests whose prompt `plan` prefills.
fn prefilling(plan: &StepPlan) -> Vec<u64> {
    plan.feed
        .iter()
        .filter(|f| f.prompt_tokens > 0)
        .map(|f| f.id)
        .collect()
}

/// After a step failed with `error`: a group of one resets its engine,
/// fails the requests the step was prefilling (a prompt that cannot run,
/// such as one whose prefill does not fit in memory; every request of the
/// batch when the step prefilled none), queues the others again to go on
/// where they were, and goes on serving. In a larger group the error ends
/// the loop, since the other ranks may be inside a collective this rank
/// will never join, and the group re-forms.
fn recover(
    error: EngineError,
    prefilling: &[u64],
    sink: &dyn PlanSink,
    engine: &mut BatchEngine<'_>,
    scheduler: &mut Scheduler,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    if !sink.alone() || !matches!(error, EngineError::Mlx { .. }) {
        return Err(error);
    }
    tracing::warn!(
        %error,
        running = scheduler.running(),
        failed = ?prefilling,
        "a step failed; the requests it prefilled fail, the others go on from a fresh cache"
    );
    engine.reset();
    scheduler.abandon(prefilling, &error.to_string(), on_event);
    Ok(())
}

/// Ranks other than 0: applies rank 0's plans in order until `plans` ends.
/// Each step is queued before the one before it is waited for; when no plan
/// is waiting, the last step is finished first, so a peer never waits on
/// this rank's part of it.
pub fn follow(
    engine: &mut BatchEngine<'_>,
    plans: &std::sync::mpsc::Receiver<StepPlan>,
) -> Result<()> {
    let mut pending: Option<PendingStep> = None;
    loop {
        let plan = match plans.try_recv() {
            Ok(plan) => plan,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if let Some(before) = pending.take() {
                    before.wait()?;
                }
                match plans.recv() {
                    Ok(plan) => plan,
                    Err(_) => break,
                }
            }
        };
        let queued = engine.step(&plan)?;
        if let Some(before) = pending.take() {
            before.wait()?;
        }
        pending = queued;
    }
    if let Some(before) = pending {
        before.wait()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KV: u64 = 10;

    fn limits(max_sequences: usize, max_tokens: usize, chunk: usize, cache: u64) -> BatchLimits {
        BatchLimits {
            max_sequences,
            max_tokens,
            prefill_chunk_tokens: chunk,
            prefix_cache_bytes: cache,
        }
    }

    fn plan(s: &mut Scheduler) -> (Option<StepPlan>, Vec<Event>) {
        let mut events = Vec::new();
        let plan = s.plan(&mut |e| events.push(e));
        (plan, events)
    }

    fn tokens(s: &mut Scheduler, plan: &StepPlan, token: u32) -> Vec<Event> {
        // Every sequence that samples this step gets `token`: the decoding
        // ones and those whose prompt's last chunk ran.
        let sampled = plan
            .feed
            .iter()
            .filter(|f| {
                f.prompt_tokens == 0
                    || s.running
                        .iter()
                        .any(|r| r.request.id == f.id && r.prefilled == r.request.prompt.len())
            })
            .map(|f| Sampled {
                id: f.id,
                token,
                logprobs: None,
            })
            .collect();
        let mut events = Vec::new();
        s.absorb(sampled, &mut |e| events.push(e));
        events
    }

    #[test]
    fn admission_keeps_to_the_sequence_and_token_limits() {
        let mut s = Scheduler::new(limits(2, 100, 1000, 0), KV);
        for id in 0..3 {
            s.enqueue(Request::new(id, vec![1; 10], 20));
        }
        let (p, events) = plan(&mut s);
        let p = p.expect("a plan");
        assert_eq!(p.admit.iter().map(|a| a.id).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(s.waiting(), 1);
        assert_eq!(events.len(), 2);

        // 30 reserved each: a third fits the tokens but not the sequences.
        let mut s = Scheduler::new(limits(8, 70, 1000, 0), KV);
        for id in 0..3 {
            s.enqueue(Request::new(id, vec![1; 10], 20));
        }
        let p = plan(&mut s).0.expect("a plan");
        assert_eq!(p.admit.len(), 2, "a third would reserve 90 of 70");
        // A request larger than the whole budget still runs, alone.
        let mut s = Scheduler::new(limits(8, 5, 1000, 0), KV);
        s.enqueue(Request::new(9, vec![1; 10], 20));
        assert_eq!(plan(&mut s).0.expect("a plan").admit.len(), 1);
    }

    #[test]
    fn an_abandoned_batch_fails_its_requests_and_keeps_the_queue() {
        let mut s = Scheduler::new(limits(2, 10_000, 100, 1 << 20), KV);
        for id in 0..3 {
            s.enqueue(Request::new(id, vec![1; 4], 5));
        }
        let p = plan(&mut s).0.expect("a plan");
        assert_eq!(p.admit.len(), 2);
        tokens(&mut s, &p, 7);
        let mut events = Vec::new();
        s.abandon(&[], "boom", &mut |e| events.push(e));
        assert_eq!(
            events,
            vec![
                Event::Failed {
                    id: 0,
                    error: "boom".into()
                },
                Event::Failed {
                    id: 1,
                    error: "boom".into()
                }
            ]
        );
        assert_eq!((s.running(), s.waiting(), s.cache_bytes()), (0, 1, 0));
        // The waiting request runs next, from a fresh cache.
        let p = plan(&mut s).0.expect("the next plan");
        assert_eq!(p.admit.len(), 1);
        assert_eq!(p.admit[0].id, 2);
        assert!(p.admit[0].reuse.is_none());
    }

    #[test]
    fn a_failed_prefill_fails_its_request_and_the_others_go_on() {
        let mut s = Scheduler::new(limits(4, 10_000, 100, 0), KV);
        s.enqueue(Request::new(1, vec![1; 4], 6));
        let p = plan(&mut s).0.expect("first");
        tokens(&mut s, &p, 5);
        let p = plan(&mut s).0.expect("a decode");
        tokens(&mut s, &p, 6);
        // Request 2 arrives; its prefill step fails.
        s.enqueue(Request::new(2, vec![2; 8], 6));
        let p = plan(&mut s).0.expect("2 is admitted and prefilled");
        assert_eq!(super::prefilling(&p), vec![2]);
        let mut events = Vec::new();
        s.abandon(&super::prefilling(&p), "no memory", &mut |e| events.push(e));
        assert_eq!(
            events,
            vec![Event::Failed {
                id: 2,
                error: "no memory".into()
            }]
        );
        // Request 1 goes on from its prompt and the two tokens it has, with
        // four to go, and is not announced again.
        let p = plan(&mut s).0.expect("1 again");
        assert_eq!(p.admit.len(), 1);
        assert_eq!(p.admit[0].prompt, vec![1, 1, 1, 1, 5, 6]);
        let events = tokens(&mut s, &p, 7);
        assert!(
            !events.iter().any(|e| matches!(e, Event::Admitted { .. })),
            "{events:?}"
        );
        let mut finished = None;
        for _ in 0..3 {
            let p = plan(&mut s).0.expect("a decode");
            for e in tokens(&mut s, &p, 7) {
                if let Event::Finished { outcome, .. } = e {
                    finished = Some(outcome);
                }
            }
        }
        let outcome = finished.expect("request 1 finished");
        assert_eq!(outcome.finish, Finish::Length);
        assert_eq!(outcome.prompt_tokens, 4, "its own prompt");
        assert_eq!(outcome.generated, 6, "all it generated, before and after");
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_beside_the_decoding_streams() {
        let mut s = Scheduler::new(limits(4, 10_000, 8, 0), KV);
        s.enqueue(Request::new(1, vec![1; 3], 50));
        let p = plan(&mut s).0.expect("first");
        assert_eq!(
            p.feed,
            vec![Feed {
                id: 1,
                prompt_tokens: 3
            }]
        );
        tokens(&mut s, &p, 5);
        // A 20-token prompt arrives: 8 tokens a step, and request 1 decodes
        // in every one of those steps.
        s.enqueue(Request::new(2, vec![2; 20], 5));
        let mut chunks = Vec::new();
        for _ in 0..3 {
            let p = plan(&mut s).0.expect("a step");
            assert!(
                p.feed.contains(&Feed {
                    id: 1,
                    prompt_tokens: 0
                }),
                "{p:?}"
            );
            let chunk: usize = p.feed.iter().map(|f| f.prompt_tokens).sum();
            assert!(chunk <= 8);
            chunks.push(chunk);
            tokens(&mut s, &p, 5);
        }
        assert_eq!(chunks, vec![8, 8, 4]);
        let p = plan(&mut s).0.expect("both decode");
        assert_eq!(p.feed.len(), 2);
        assert!(p.feed.iter().all(|f| f.prompt_tokens == 0));
    }

    #[test]
    fn stop_tokens_and_max_tokens_end_requests_and_they_retire() {
        let mut s = Scheduler::new(limits(4, 10_000, 100, 0), KV);
        let mut stopper = Request::new(1, vec![1; 4], 10);
        stopper.stop_ids = vec![0];
        s.enqueue(stopper);
        s.enqueue(Request::new(2, vec![1; 4], 2));
        let p = plan(&mut s).0.expect("prefill");
        let events = tokens(&mut s, &p, 7);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Token { .. }))
                .count(),
            2
        );
        let p = plan(&mut s).0.expect("decode");
        assert_eq!(p.feed.len(), 2);
        let mut events = Vec::new();
        s.absorb(
            vec![
                Sampled {
                    id: 1,
                    token: 0,
                    logprobs: None,
                },
                Sampled {
                    id: 2,
                    token: 8,
                    logprobs: None,
                },
            ],
            &mut |e| events.push(e),
        );
        let finished: Vec<(u64, Finish, usize)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Finished { id, outcome } => Some((*id, outcome.finish, outcome.generated)),
                _ => None,
            })
            .collect();
        assert_eq!(finished, vec![(1, Finish::Stop, 1), (2, Finish::Length, 2)]);
        let p = plan(&mut s).0.expect("retirements");
        assert_eq!(p.retire, vec![1, 2]);
        assert!(p.feed.is_empty());
        assert!(s.is_idle());
        assert!(plan(&mut s).0.is_none(), "nothing left to do or tell");
    }

    #[test]
    fn cancelled_requests_leave_at_the_next_step() {
        let mut s = Scheduler::new(limits(4, 10_000, 100, 0), KV);
        let waiting = Request::new(1, vec![1; 4], 10);
        let cancel = waiting.cancel.clone();
        s.enqueue(waiting);
        cancel.store(true, Ordering::Relaxed);
        let (p, events) = plan(&mut s);
        assert!(p.is_none());
        assert!(matches!(
            events.as_slice(),
            [Event::Finished { id: 1, outcome }] if outcome.finish == Finish::Cancelled
        ));

        let running = Request::new(2, vec![1; 4], 10);
        let cancel = running.cancel.clone();
        s.enqueue(running);
        let p = plan(&mut s).0.expect("prefill");
        tokens(&mut s, &p, 3);
        cancel.store(true, Ordering::Relaxed);
        let (p, events) = plan(&mut s);
        let p = p.expect("the retirement");
        assert_eq!(p.retire, vec![2]);
        assert!(p.feed.is_empty());
        assert!(matches!(
            events.as_slice(),
            [Event::Finished { id: 2, outcome }] if outcome.finish == Finish::Cancelled && outcome.generated == 1
        ));
    }

    #[test]
    fn a_later_prompt_reuses_the_longest_cached_prefix() {
        let mut s = Scheduler::new(limits(4, 10_000, 100, 1_000), KV);
        let first: Vec<u32> = (0..10).collect();
        s.enqueue(Request::new(1, first.clone(), 2));
        let p = plan(&mut s).0.expect("prefill");
        tokens(&mut s, &p, 50);
        let p = plan(&mut s).0.expect("decode");
        tokens(&mut s, &p, 51);
        // Finished after 2 tokens; the next plan saves prompt + the one
        // generated token that was fed back (50); 51 never entered the cache.
        let p = plan(&mut s).0.expect("retire and save");
        assert_eq!(p.retire, vec![1]);
        assert_eq!(p.save.len(), 1);
        assert_eq!(p.save[0].tokens, 11);
        let entry = p.save[0].entry;
        assert_eq!(s.cache_bytes(), 11 * KV);

        // The next turn: the whole conversation so far, and more.
        let mut next = first.clone();
        next.extend([50, 51, 60, 61]);
        s.enqueue(Request::new(2, next, 2));
        let (p, events) = plan(&mut s);
        let p = p.expect("admission");
        assert_eq!(p.admit[0].reuse, Some(Reuse { entry, tokens: 11 }));
        assert!(events.contains(&Event::Admitted {
            id: 2,
            cached_tokens: 11
        }));
        // Only the uncached rest is prefilled.
        assert_eq!(
            p.feed,
            vec![Feed {
                id: 2,
                prompt_tokens: 3
            }]
        );
        // A prompt equal to a cached one still runs its last token.
        let mut s2 = Scheduler::new(limits(4, 10_000, 100, 1_000), KV);
        s2.entries.push(CacheEntry {
            id: 7,
            tokens: vec![1, 2, 3],
            bytes: 30,
            last_used: 0,
        });
        s2.enqueue(Request::new(3, vec![1, 2, 3], 1));
        let p = plan(&mut s2).0.expect("admission");
        assert_eq!(
            p.admit[0].reuse,
            Some(Reuse {
                entry: 7,
                tokens: 2
            })
        );
    }

    #[test]
    fn the_cache_evicts_least_recently_used_entries_past_its_budget() {
        let mut s = Scheduler::new(limits(4, 10_000, 100, 250), KV);
        for (id, base) in [(1u64, 100u32), (2, 200), (3, 300)] {
            let prompt: Vec<u32> = (base..base + 10).collect();
            s.enqueue(Request::new(id, prompt, 1));
            let p = plan(&mut s).0.expect("prefill");
            tokens(&mut s, &p, 1);
        }
        // Each entry is 10 tokens (100 bytes): the third evicts the first.
        let p = plan(&mut s).0.expect("retire the last");
        assert_eq!(p.evict.len(), 1, "{p:?}");
        assert!(s.cache_bytes() <= 250);
        assert_eq!(s.entries.len(), 2);
        assert!(s.entries.iter().all(|e| e.tokens[0] != 100));
        // An extension replaces the entry it extends.
        let mut s = Scheduler::new(limits(4, 10_000, 100, 10_000), KV);
        s.entries.push(CacheEntry {
            id: 9,
            tokens: vec![1, 2],
            bytes: 20,
            last_used: 0,
        });
        s.cache_bytes = 20;
        s.enqueue(Request::new(1, vec![1, 2, 3, 4], 1));
        let p = plan(&mut s).0.expect("admission");
        tokens(&mut s, &p, 5);
        let p = plan(&mut s).0.expect("retire");
        assert_eq!(p.evict, vec![9]);
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].tokens, vec![1, 2, 3, 4]);
    }
}
