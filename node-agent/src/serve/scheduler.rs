//! Keeps inference off the async threads: a bounded queue of requests, a
//! dispatcher that hands each one to every rank (through a [`Fanout`]) and
//! then to the thread that owns the engine, and that thread's loop.
//!
//! A request leaves the queue only when the previous one has finished, so
//! the queue depth is the number of requests waiting. A full queue is
//! refused at once (HTTP 429). When the group breaks, the request being
//! generated and every queued one get an error immediately, even while the
//! engine thread is still blocked in a collective that will never finish.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::error::ApiError;
use super::metrics::ServeMetrics;
use crate::engine::EngineError;
use crate::worker::engine::{GenerationJob, Outcome, RankEngine, StepSink};

/// Set to stop a generation (client gone, stop string matched).
pub type CancelFlag = Arc<AtomicBool>;

/// What the engine reports for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A generated token.
    Token(u32),
    /// The generation ended.
    Finished(Outcome),
    /// The generation failed.
    Failed(ApiError),
}

/// One request for the engine thread.
#[derive(Debug)]
pub struct EngineTask {
    /// The job.
    pub job: GenerationJob,
    /// Asked after every step.
    pub cancel: CancelFlag,
    /// Where tokens go.
    pub steps: mpsc::UnboundedSender<Step>,
    /// Signalled when the engine is done with the task.
    pub done: Option<oneshot::Sender<()>>,
}

struct TaskSink<'a> {
    cancel: &'a AtomicBool,
    steps: &'a mpsc::UnboundedSender<Step>,
}

impl StepSink for TaskSink<'_> {
    fn stop_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn token(&mut self, id: u32) {
        // The receiver may be gone (client left); the cancel flag says so.
        let _ = self.steps.send(Step::Token(id));
    }
}

/// Whether an engine error leaves the rank unable to run more jobs. Bad
/// arguments concern one request; anything from MLX or the group may leave
/// the ranks out of step, so the worker must stop.
pub fn is_fatal(e: &EngineError) -> bool {
    !matches!(
        e,
        EngineError::Argument(_) | EngineError::Tokenizer { .. } | EngineError::Template { .. }
    )
}

/// Runs tasks on the thread that owns the engine until the channel closes,
/// or until a fatal engine error, which is returned. Rank 0 passes its
/// metrics to have every generation recorded.
pub fn run_tasks(
    engine: &mut dyn RankEngine,
    tasks: std::sync::mpsc::Receiver<EngineTask>,
    metrics: Option<&ServeMetrics>,
) -> Result<(), EngineError> {
    for mut task in tasks {
        let mut sink = TaskSink {
            cancel: &task.cancel,
            steps: &task.steps,
        };
        let result = engine.run(&task.job, &mut sink);
        let fatal = match result {
            Ok(outcome) => {
                if let Some(m) = metrics {
                    m.generation(
                        task.job.prompt_ids.len(),
                        outcome.generated,
                        outcome.time_to_first_token,
                        outcome.decode_time,
                    );
                }
                let _ = task.steps.send(Step::Finished(outcome));
                None
            }
            Err(e) => {
                let _ = task.steps.send(Step::Failed(ApiError::internal(format!(
                    "generation failed: {e}"
                ))));
                is_fatal(&e).then_some(e)
            }
        };
        if let Some(done) = task.done.take() {
            let _ = done.send(());
        }
        if let Some(e) = fatal {
            return Err(e);
        }
    }
    Ok(())
}

/// How rank 0 hands a job to the other ranks, and learns that the group broke.
pub trait Fanout: Send + Sync + 'static {
    /// Sends `job` to every other rank.
    fn broadcast(&self, job: &GenerationJob) -> impl Future<Output = Result<(), String>> + Send;
    /// Resolves with the reason once the group cannot run jobs.
    fn wait_broken(&self) -> impl Future<Output = String> + Send;
}

/// A group of one: nothing to send, never broken by a peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl Fanout for Alone {
    async fn broadcast(&self, _job: &GenerationJob) -> Result<(), String> {
        Ok(())
    }

    async fn wait_broken(&self) -> String {
        std::future::pending().await
    }
}

impl Fanout for Arc<crate::control::Coordinator> {
    async fn broadcast(&self, job: &GenerationJob) -> Result<(), String> {
        crate::control::Coordinator::broadcast(self, to_proto(job)).await
    }

    async fn wait_broken(&self) -> String {
        crate::control::Coordinator::wait_broken(self).await
    }
}

/// The wire form of a job.
pub fn to_proto(job: &GenerationJob) -> crate::control::pb::Job {
    crate::control::pb::Job {
        id: job.id,
        prompt_ids: job.prompt_ids.clone(),
        max_tokens: u32::try_from(job.max_tokens).unwrap_or(u32::MAX),
        temperature: job.sampling.temperature,
        top_p: job.sampling.top_p,
        seed: job.sampling.seed,
        stop_ids: job.stop_ids.clone(),
    }
}

/// A job from the wire.
pub fn from_proto(job: crate::control::pb::Job) -> GenerationJob {
    GenerationJob {
        id: job.id,
        prompt_ids: job.prompt_ids,
        max_tokens: usize::try_from(job.max_tokens).unwrap_or(usize::MAX),
        sampling: crate::engine::sampling::SamplingParams {
            temperature: job.temperature,
            top_p: job.top_p,
            seed: job.seed,
        },
        stop_ids: job.stop_ids,
    }
}

struct Submission {
    job: GenerationJob,
    cancel: CancelFlag,
    steps: mpsc::UnboundedSender<Step>,
}

/// Sets the cancel flag when dropped: a request whose client went away
/// stops generating (or never starts).
#[derive(Debug)]
pub struct CancelGuard(CancelFlag);

impl CancelGuard {
    /// Asks the generation to stop now.
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

/// The bounded request queue.
#[derive(Debug, Clone)]
pub struct Scheduler {
    queue: mpsc::Sender<Submission>,
    capacity: usize,
    depth: Arc<AtomicUsize>,
    broken: Arc<Mutex<Option<String>>>,
    metrics: Arc<ServeMetrics>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("job", &self.job.id)
            .finish()
    }
}

impl Scheduler {
    /// Starts the dispatcher; `engine` is the engine thread's task channel.
    pub fn start<F: Fanout>(
        capacity: usize,
        fanout: F,
        engine: std::sync::mpsc::Sender<EngineTask>,
        metrics: Arc<ServeMetrics>,
    ) -> Scheduler {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let scheduler = Scheduler {
            queue: tx,
            capacity,
            depth: Arc::new(AtomicUsize::new(0)),
            broken: Arc::new(Mutex::new(None)),
            metrics,
        };
        tokio::spawn(dispatch(rx, fanout, engine, scheduler.clone()));
        scheduler
    }

    /// Why the group cannot serve, once it cannot.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_broken(&self, reason: &str) {
        let mut slot = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason.to_owned());
        }
    }

    /// Queues `job`; 429 when the queue is full, 503 when the group broke.
    pub fn submit(&self, job: GenerationJob) -> Result<Ticket, ApiError> {
        if let Some(reason) = self.broken() {
            return Err(ApiError::unavailable(format!(
                "the model group is unavailable: {reason}"
            )));
        }
        let cancel: CancelFlag = Arc::new(AtomicBool::new(false));
        let (steps_tx, steps_rx) = mpsc::unbounded_channel();
        let submission = Submission {
            job,
            cancel: cancel.clone(),
            steps: steps_tx,
        };
        match self.queue.try_send(submission) {
            Ok(()) => {
                let depth = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
                self.metrics.set_queue_depth(depth);
                Ok(Ticket {
                    steps: steps_rx,
                    guard: CancelGuard(cancel),
                })
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError::queue_full(self.capacity)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ApiError::unavailable(format!(
                "the model group is unavailable: {}",
                self.broken().unwrap_or_else(|| "the engine stopped".into())
            ))),
        }
    }

    fn dequeued(&self) {
        let depth = self
            .depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                Some(d.saturating_sub(1))
            })
            .map_or(0, |d| d.saturating_sub(1));
        self.metrics.set_queue_depth(depth);
    }
}

async fn dispatch<F: Fanout>(
    mut rx: mpsc::Receiver<Submission>,
    fanout: F,
    engine: std::sync::mpsc::Sender<EngineTask>,
    scheduler: Scheduler,
) {
    let broken = fanout.wait_broken();
    tokio::pin!(broken);
    let fail_all = |rx: &mut mpsc::Receiver<Submission>, reason: &str| {
        scheduler.set_broken(reason);
        rx.close();
        while let Ok(s) = rx.try_recv() {
            scheduler.dequeued();
            let _ = s.steps.send(Step::Failed(unavailable(reason)));
        }
    };
    loop {
        let submission = tokio::select! {
            biased;
            reason = &mut broken => {
                fail_all(&mut rx, &reason);
                return;
            }
            s = rx.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        scheduler.dequeued();
        if submission.cancel.load(Ordering::Relaxed) {
            continue;
        }
        if let Err(reason) = fanout.broadcast(&submission.job).await {
            let _ = submission.steps.send(Step::Failed(unavailable(&reason)));
            fail_all(&mut rx, &reason);
            return;
        }
        let (done_tx, done_rx) = oneshot::channel();
        let task = EngineTask {
            job: submission.job,
            cancel: submission.cancel,
            steps: submission.steps.clone(),
            done: Some(done_tx),
        };
        scheduler.metrics.set_in_flight(1);
        if engine.send(task).is_err() {
            let reason = "the engine stopped";
            let _ = submission.steps.send(Step::Failed(unavailable(reason)));
            fail_all(&mut rx, reason);
            scheduler.metrics.set_in_flight(0);
            return;
        }
        tokio::select! {
            biased;
            reason = &mut broken => {
                let _ = submission.steps.send(Step::Failed(unavailable(&reason)));
                fail_all(&mut rx, &reason);
                scheduler.metrics.set_in_flight(0);
                return;
            }
            finished = done_rx => {
                scheduler.metrics.set_in_flight(0);
                if finished.is_err() {
                    // The engine thread ended mid-task: it hit a fatal error.
                    let reason = "the engine stopped";
                    fail_all(&mut rx, reason);
                    return;
                }
            }
        }
    }
}

fn unavailable(reason: &str) -> ApiError {
    ApiError::unavailable(format!("the model group is unavailable: {reason}"))
}
