//! Between the HTTP handlers and the engine thread: a bounded queue of
//! requests, the engine thread's decode loop ([`run_leader`], the engine's
//! one loop with rank 0's plans handed to the other ranks), and the routing
//! of every request's tokens back to its handler.
//!
//! Requests join the running batch at step boundaries as it has room
//! (`engine::schedule`); the queue holds those that wait for a place. A
//! full queue is refused at once (HTTP 429). When the group breaks, every
//! running and queued request gets an error immediately, even while the
//! engine thread is still blocked in a collective that will never finish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::error::ApiError;
use super::metrics::ServeMetrics;
use super::watchdog::StepWatch;
use crate::engine::EngineError;
use crate::engine::batch::{BatchEngine, PlanSink, StepPlan, TokenLogprobs};
use crate::engine::schedule::{self, BatchLimits, Event, Outcome, Request};

/// Set to stop a generation (client gone, stop string matched).
pub type CancelFlag = Arc<AtomicBool>;

/// What the engine reports for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The request joined the batch.
    Admitted {
        /// Prompt tokens reused from the prefix cache.
        cached_tokens: usize,
    },
    /// A generated token.
    Token {
        /// The token.
        id: u32,
        /// Its log-probabilities, when asked for.
        logprobs: Option<TokenLogprobs>,
    },
    /// The generation ended.
    Finished(Outcome),
    /// The generation failed.
    Failed(ApiError),
}

/// How rank 0 learns that the group broke.
pub trait Fanout: Send + Sync + 'static {
    /// Resolves with the reason once the group cannot run steps.
    fn wait_broken(&self) -> impl Future<Output = String> + Send;
}

/// A group of one: never broken by a peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl Fanout for Alone {
    async fn wait_broken(&self) -> String {
        std::future::pending().await
    }
}

impl Fanout for Arc<crate::control::Coordinator> {
    async fn wait_broken(&self) -> String {
        crate::control::Coordinator::wait_broken(self).await
    }
}

/// Sets the cancel flag when dropped: a request whose client went away
/// stops generating (or never starts).
#[derive(Debug)]
pub struct CancelGuard(CancelFlag);

impl CancelGuard {
    /// Asks the generation to stop at the next step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A queued request, from the caller's side.
#[derive(Debug)]
pub struct Ticket {
    /// The engine's reports.
    pub steps: mpsc::UnboundedReceiver<Step>,
    /// Cancels on drop.
    pub guard: CancelGuard,
}

struct Route {
    steps: mpsc::UnboundedSender<Step>,
    admitted: bool,
}

#[derive(Default)]
struct Routes {
    open: HashMap<u64, Route>,
    broken: Option<String>,
}

struct Shared {
    routes: Mutex<Routes>,
    /// Requests submitted and not yet admitted into the batch.
    depth: AtomicUsize,
    capacity: usize,
    metrics: Arc<ServeMetrics>,
}

/// The bounded request queue in front of the engine thread.
#[derive(Clone)]
pub struct Scheduler {
    requests: std::sync::mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("capacity", &self.shared.capacity)
            .field("depth", &self.shared.depth.load(Ordering::Relaxed))
            .finish()
    }
}

fn unavailable(reason: &str) -> ApiError {
    ApiError::unavailable(format!("the model group is unavailable: {reason}"))
}

impl Shared {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self, reason: &str) {
        let failed: Vec<Route> = {
            let mut routes = self.routes();
            if routes.broken.is_none() {
                routes.broken = Some(reason.to_owned());
            }
            routes.open.drain().map(|(_, r)| r).collect()
        };
        for route in failed {
            let _ = route.steps.send(Step::Failed(unavailable(reason)));
        }
        self.depth.store(0, Ordering::SeqCst);
        self.metrics.set_queue_depth(0);
        self.metrics.set_in_flight(0);
    }

    fn left_queue(&self) {
        let _ = self
            .depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                Some(d.saturating_sub(1))
            });
    }

    /// Routes one engine event to its request's handler.
    fn deliver(&self, event: Event) {
        let mut routes = self.routes();
        match event {
            Event::Admitted { id, cached_tokens } => {
                if let Some(route) = routes.open.get_mut(&id) {
                    route.admitted = true;
                    let _ = route.steps.send(Step::Admitted { cached_tokens });
                }
                self.left_queue();
                self.metrics.cached(cached_tokens);
            }
            Event::Token {
                id,
                token,
                logprobs,
            } => {
                if let Some(route) = routes.open.get(&id) {
                    // The receiver may be gone (client left); the cancel
                    // flag says so.
                    let _ = route.steps.send(Step::Token {
                        id: token,
                        logprobs,
                    });
                }
            }
            Event::Finished { id, outcome } => {
                if let Some(route) = routes.open.remove(&id) {
                    if !route.admitted {
                        self.left_queue();
                    }
                    let _ = route.steps.send(Step::Finished(outcome));
                }
                self.metrics.generation(
                    outcome.prompt_tokens,
                    outcome.generated,
                    outcome.time_to_first_token,
                    outcome.decode_time,
                );
            }
            Event::Failed { id, error } => {
                if let Some(route) = routes.open.remove(&id) {
                    if !route.admitted {
                        self.left_queue();
                    }
                    let _ = route.steps.send(Step::Failed(ApiError::internal(format!(
                        "the engine failed on this request's batch: {error}"
                    ))));
                }
            }
        }
    }
}

impl Scheduler {
    /// A queue of at most `capacity` waiting requests, and the receiving
    /// end the engine thread's [`run_leader`] takes.
    pub fn new(
        capacity: usize,
        metrics: Arc<ServeMetrics>,
    ) -> (Scheduler, std::sync::mpsc::Receiver<Request>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let scheduler = Scheduler {
            requests: tx,
            shared: Arc::new(Shared {
                routes: Mutex::new(Routes::default()),
                depth: AtomicUsize::new(0),
                capacity,
                metrics,
            }),
        };
        (scheduler, rx)
    }

    /// Fails every request as soon as `fanout` says the group broke.
    pub fn watch<F: Fanout>(&self, fanout: F) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reason = fanout.wait_broken().await;
            shared.fail_all(&reason);
        });
    }

    /// Fails every running and queued request with `reason` and refuses
    /// new ones from now on.
    pub fn break_with(&self, reason: &str) {
        self.shared.fail_all(reason);
    }

    /// Why the group cannot serve, once it cannot.
    pub fn broken(&self) -> Option<String> {
        self.shared.routes().broken.clone()
    }

    /// Whether a request could be queued now: 429 when the queue is full,
    /// 503 when the group broke. [`Scheduler::submit`] decides for good;
    /// this lets a handler refuse before it spends work on the request.
    pub fn check_room(&self) -> Result<(), ApiError> {
        if let Some(reason) = &self.shared.routes().broken {
            return Err(unavailable(reason));
        }
        if self.shared.depth.load(Ordering::SeqCst) >= self.shared.capacity {
            return Err(ApiError::queue_full(self.shared.capacity));
        }
        Ok(())
    }

    /// Queues `request`; 429 when the queue is full, 503 when the group
    /// broke. Its cancel flag is replaced by the ticket's.
    pub fn submit(&self, mut request: Request) -> Result<Ticket, ApiError> {
        let cancel: CancelFlag = Arc::new(AtomicBool::new(false));
        request.cancel = cancel.clone();
        let (steps_tx, steps_rx) = mpsc::unbounded_channel();
        {
            let mut routes = self.shared.routes();
            if let Some(reason) = &routes.broken {
                return Err(unavailable(reason));
            }
            let reserved =
                self.shared
                    .depth
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                        (d < self.shared.capacity).then_some(d + 1)
                    });
            let Ok(depth) = reserved else {
                return Err(ApiError::queue_full(self.shared.capacity));
            };
            self.shared.metrics.set_queue_depth(depth + 1);
            routes.open.insert(
                request.id,
                Route {
                    steps: steps_tx,
                    admitted: false,
                },
            );
        }
        let id = request.id;
        if self.requests.send(request).is_err() {
            self.shared.routes().open.remove(&id);
            self.shared.left_queue();
            return Err(unavailable("the engine stopped"));
        }
        Ok(Ticket {
            steps: steps_rx,
            guard: CancelGuard(cancel),
        })
    }
}

/// A sink that tells the watchdog when a step goes out.
struct Watched<'a> {
    sink: &'a dyn PlanSink,
    progress: &'a StepWatch,
}

impl PlanSink for Watched<'_> {
    fn send(&self, plan: &StepPlan) -> Result<(), String> {
        self.progress.sent();
        self.sink.send(plan)
    }

    fn alone(&self) -> bool {
        self.sink.alone()
    }
}

/// Rank 0's engine thread: runs the batch until the queue closes or a
/// fatal error (returned, after every open request was failed with it).
/// Each step's plan goes to `sink` (the other ranks) before it runs;
/// `progress` hears of every step going out and coming back.
pub fn run_leader(
    engine: &mut BatchEngine<'_>,
    limits: BatchLimits,
    sink: &dyn PlanSink,
    mut requests: std::sync::mpsc::Receiver<Request>,
    scheduler: &Scheduler,
    progress: &StepWatch,
) -> Result<(), EngineError> {
    let shared = scheduler.shared.clone();
    let mut batch = schedule::Scheduler::new(limits, engine.model().kv_bytes_per_token());
    let result = schedule::lead(
        engine,
        &mut batch,
        &Watched { sink, progress },
        &mut requests,
        &mut |event| shared.deliver(event),
        &mut |batch, outstanding| {
            progress.finished(outstanding);
            shared.metrics.step(
                batch.running(),
                shared.depth.load(Ordering::Relaxed),
                batch.cache_bytes(),
            )
        },
    );
    if let Err(e) = &result {
        shared.fail_all(&format!("generation failed: {e}"));
    }
    result
}
