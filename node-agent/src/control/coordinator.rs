//! Rank 0's side of the group: the barriers (which ranks have arrived at
//! which [`Stage`]), the step streams to ranks 1..N, and whether the group
//! is broken (a rank's stream closed). The coordinator is the [`PlanSink`]
//! rank 0's decode loop hands every step's plan to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;

use super::*;
use crate::engine::batch::{PlanSink, StepPlan};

/// Why a barrier did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// Some ranks did not arrive in time.
    #[error("ranks {missing:?} did not reach the {stage} barrier within {waited:?}")]
    Timeout {
        /// The stage.
        stage: &'static str,
        /// Ranks missing when the wait ended.
        missing: Vec<i32>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The group has already formed; no rank can join it any more.
    #[error("the group of epoch {epoch} has already formed")]
    AlreadyFormed {
        /// The group's epoch.
        epoch: i64,
    },
    /// A rank arrived at the ready barrier without passing the connect one.
    #[error("rank {rank} skipped the connect barrier")]
    OutOfOrder {
        /// The rank.
        rank: i32,
    },
    /// The group broke while waiting.
    #[error("the group broke: {0}")]
    Broken(String),
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Connect => "connect",
        Stage::Ready => "ready",
        Stage::Unspecified => "unspecified",
    }
}

#[derive(Debug, Default)]
struct State {
    connect: BTreeSet<i32>,
    ready: BTreeSet<i32>,
    /// Step streams to ranks 1..N.
    streams: BTreeMap<i32, mpsc::Sender<Result<pb::Step, Status>>>,
    /// Both barriers opened.
    formed: bool,
    /// Why the group broke, once it has.
    broken: Option<String>,
}

/// The group's state on rank 0.
#[derive(Debug)]
pub struct Coordinator {
    pub(super) identity: GroupIdentity,
    barrier_timeout: Duration,
    state: Mutex<State>,
    /// Bumped on every change, to wake barrier waiters.
    changes: watch::Sender<u64>,
    /// `Some(reason)` once the group is broken.
    broken: watch::Sender<Option<String>>,
}

impl Coordinator {
    /// A coordinator for `identity`; barriers wait `barrier_timeout`.
    pub fn new(identity: GroupIdentity, barrier_timeout: Duration) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            identity,
            barrier_timeout,
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
            broken: watch::channel(None).0,
        })
    }

    /// The group's identity.
    pub fn identity(&self) -> &GroupIdentity {
        &self.identity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the data is still a set
        // of ranks, so carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits at the barrier of `stage` until every rank is there.
    pub async fn arrive(&self, rank: i32, stage: Stage) -> Result<Vec<i32>, BarrierError> {
        {
            let mut s = self.lock();
            if let Some(reason) = &s.broken {
                return Err(BarrierError::Broken(reason.clone()));
            }
            if s.formed {
                return Err(BarrierError::AlreadyFormed {
                    epoch: self.identity.epoch,
                });
            }
            match stage {
                Stage::Ready if !s.connect.contains(&rank) => {
                    return Err(BarrierError::OutOfOrder { rank });
                }
                Stage::Ready => {
                    s.ready.insert(rank);
                }
                _ => {
                    s.connect.insert(rank);
                }
            }
        }
        self.changed();
        // Leave the barrier if this wait is abandoned (the caller went away).
        let mut guard = Arrival {
            coordinator: self,
            rank,
            stage,
            done: false,
        };
        let deadline = Instant::now() + self.barrier_timeout;
        let mut changes = self.changes.subscribe();
        loop {
            {
                let mut s = self.lock();
                if let Some(reason) = &s.broken {
                    return Err(BarrierError::Broken(reason.clone()));
                }
                let set = match stage {
                    Stage::Ready => &s.ready,
                    _ => &s.connect,
                };
                if set.len() >= usize::try_from(self.identity.world_size).unwrap_or(0) {
                    let ranks: Vec<i32> = set.iter().copied().collect();
                    if stage == Stage::Ready {
                        s.formed = true;
                    }
                    guard.done = true;
                    return Ok(ranks);
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let s = self.lock();
                    let set = match stage {
                        Stage::Ready => &s.ready,
                        _ => &s.connect,
                    };
                    let missing = (0..self.identity.world_size)
                        .filter(|r| !set.contains(r))
                        .collect();
                    return Err(BarrierError::Timeout {
                        stage: stage_name(stage),
                        missing,
                        waited: self.barrier_timeout,
                    });
                }
            }
        }
    }

    /// Registers rank `rank`'s step stream.
    pub(super) fn open_stream(
        &self,
        rank: i32,
    ) -> Result<mpsc::Receiver<Result<pb::Step, Status>>, Status> {
        let mut s = self.lock();
        if let Some(reason) = &s.broken {
            return Err(Status::aborted(format!("the group broke: {reason}")));
        }
        if s.formed {
            return Err(Status::aborted(format!(
                "the group of epoch {} has already formed",
                self.identity.epoch
            )));
        }
        if !s.connect.contains(&rank) {
            return Err(Status::failed_precondition(format!(
                "rank {rank} opened its step stream before the connect barrier"
            )));
        }
        let (tx, rx) = mpsc::channel(STEP_BACKLOG);
        s.streams.insert(rank, tx);
        Ok(rx)
    }

    /// Hands `step` to every other rank, in the order steps are run. Never
    /// blocks: rank 0 can be at most a step or two ahead of the others (the
    /// collectives hold it back), so a full stream means a rank stopped
    /// following, and the group is broken.
    pub fn send_step(&self, step: pb::Step) -> Result<(), String> {
        let streams: Vec<(i32, mpsc::Sender<Result<pb::Step, Status>>)> = {
            let s = self.lock();
            if let Some(reason) = &s.broken {
                return Err(reason.clone());
            }
            s.streams.iter().map(|(r, tx)| (*r, tx.clone())).collect()
        };
        let expected = usize::try_from(self.identity.world_size - 1).unwrap_or(0);
        if streams.len() < expected {
            let reason = format!(
                "only {} of {} ranks hold a step stream",
                streams.len(),
                expected
            );
            self.mark_broken(reason.clone());
            return Err(reason);
        }
        for (rank, tx) in streams {
            let reason = match tx.try_send(Ok(step.clone())) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    format!("rank {rank} stopped following ({STEP_BACKLOG} steps behind rank 0)")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    format!("rank {rank} left the group")
                }
            };
            self.mark_broken(reason.clone());
            return Err(reason);
        }
        Ok(())
    }

    /// Records that the group can no longer run steps, and why.
    pub fn mark_broken(&self, reason: String) {
        let first = {
            let mut s = self.lock();
            if s.broken.is_none() {
                s.broken = Some(reason.clone());
                // Ranks still connected learn it when their stream ends.
                s.streams.clear();
                true
            } else {
                false
            }
        };
        if first {
            tracing::warn!(%reason, "the group is broken");
            self.broken.send_replace(Some(reason));
            self.changed();
        }
    }

    /// Resolves with the reason once the group is broken.
    pub async fn wait_broken(&self) -> String {
        let mut rx = self.broken.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "the coordinator is gone".into();
            }
        }
    }

    /// Watches the step streams: the first one to close breaks the group.
    /// Runs until then.
    pub async fn watch_streams(self: Arc<Self>) {
        let streams: Vec<(i32, mpsc::Sender<Result<pb::Step, Status>>)> = {
            let s = self.lock();
            s.streams.iter().map(|(r, tx)| (*r, tx.clone())).collect()
        };
        if streams.is_empty() {
            return;
        }
        let closed = streams.into_iter().map(|(rank, tx)| {
            Box::pin(async move {
                tx.closed().await;
                rank
            })
        });
        let (rank, _, _) = futures::future::select_all(closed).await;
        self.mark_broken(format!(
            "rank {rank} left the group (its step stream closed)"
        ));
    }
}

/// A rank's place at a barrier, given up if the wait is abandoned.
struct Arrival<'a> {
    coordinator: &'a Coordinator,
    rank: i32,
    stage: Stage,
    done: bool,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        {
            let mut s = self.coordinator.lock();
            if s.formed {
                return;
            }
            match self.stage {
                Stage::Ready => s.ready.remove(&self.rank),
                _ => s.connect.remove(&self.rank),
            };
        }
        self.coordinator.changed();
    }
}

impl PlanSink for Arc<Coordinator> {
    fn send(&self, plan: &StepPlan) -> Result<(), String> {
        self.send_step(plan_to_proto(plan))
    }
}
