//! The reconcile decision, as a pure function of what was observed and `now`:
//! which epoch the deployment is in, which shards to write and delete, whether
//! the group-token must rotate, the status (phase, ranks, conditions) and the
//! Events that the change deserves.
//!
//! # Epochs
//! The epoch is the group's incarnation. The current epoch is the highest of
//! `status.epoch` and the epochs of the deployment's shards (so a status write
//! lost after the shards were written is recovered). A new epoch starts when:
//! - no shard of the current epoch is left (first placement, or after all
//!   shards vanished) and a plan exists;
//! - the current group has a failure (a rank `Failed`, its node lost, or its
//!   shard gone): after the restart backoff, if the budget allows, and if a
//!   plan exists; this is a *restart*;
//! - the plan, or the shards built from it, differ from the current shards:
//!   a new world size (scaling), a node that no longer fits, or a changed spec.
//!
//! A new epoch writes every shard of the new epoch and deletes every shard of
//! older epochs in the same pass; agents stop a rank of an older epoch before
//! they start the newer one on the same node (see docs/operator.md).
//!
//! When no plan exists the running group, if any, is left alone: a bad edit or
//! a full cluster never takes a serving group down.
//!
//! # Layout
//! - this file: the inputs and outcome, choosing the step and rendering it
//!   into shards and status ([`reconcile`]);
//! - `failures`: what went wrong with the current group and which rank the
//!   others' reports blame ([`detect_failures`]);
//! - `progress`: how far an epoch's ranks are, the conditions and phase
//!   that follow, and the load and formation timeouts;
//! - `cleanup`: the decision for a deployment being deleted ([`cleanup`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{
    DeploymentPhase, LlamaDeployment, LlamaDeploymentStatus, LlamaShard, RestartRecord,
};
use tandem_planner::{
    MAX_WORLD_SIZE, ModelShape, NodeInfo, Plan, PlanInput, memory_per_rank, plan_placement,
    valid_world_sizes,
};

use crate::conditions::{self, GROUP_FORMED, PLACED, READY, SHARDS_LOADED, Verdict};
use crate::convert;
use crate::objects;
use crate::observe::HeldShard;
use crate::restart::RestartPolicy;
use crate::time;

mod blocker;
pub use blocker::Blocker;
mod cleanup;
mod failures;
mod progress;

pub use cleanup::{CleanupInput, CleanupOutcome, cleanup};
use failures::summarize;
pub use failures::{Failure, detect_failures};
use progress::{
    is_timeout, last_progress_at, placed_message, progress, progress_verdicts, recovering_reason,
    stalled,
};

/// The operator's policy knobs that the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Restart backoff and budget.
    pub restart: RestartPolicy,
    /// How long deletion waits for agents to release their shards before the
    /// operator releases them itself.
    pub release_timeout: Duration,
    /// Re-check a deployment this often even when nothing changes.
    pub resync: Duration,
    /// A group that is not serving and makes no progress (no rank changes
    /// phase, no download advances) for this long has failed
    /// (`LoadTimeout` or `FormationTimeout`) and is restarted.
    pub load_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            restart: RestartPolicy::default(),
            release_timeout: Duration::from_secs(120),
            resync: Duration::from_secs(300),
            load_timeout: Duration::from_secs(600),
        }
    }
}

/// What one reconcile of a live (not deleting) deployment looks at.
#[derive(Debug, Clone)]
pub struct ReconcileInput<'a> {
    /// The deployment.
    pub deployment: &'a LlamaDeployment,
    /// Its owner reference for children (see [`objects::owner_reference`]).
    pub owner: &'a OwnerReference,
    /// The latest status known: the one this operator last wrote, else the
    /// object's.
    pub prior: &'a LlamaDeploymentStatus,
    /// Shards the deployment controls, of every epoch.
    pub shards: &'a [&'a LlamaShard],
    /// Every LlamaNode, with only *other* deployments' usage (see
    /// [`observe::node_infos`](crate::observe::node_infos)).
    pub nodes: &'a [NodeInfo],
    /// The nodes among `nodes` that cannot run the deployment's
    /// `spec.backend`, with why (see [`observe::backend_mismatches`](crate::observe::backend_mismatches)); the
    /// plan leaves them out.
    pub mismatched: &'a BTreeMap<String, String>,
    /// The time the decision is made at.
    pub now: Timestamp,
}

/// Severity of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Progress.
    Normal,
    /// Something failed or needs attention.
    Warning,
}

/// An Event to publish about the deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Normal or Warning.
    pub severity: Severity,
    /// CamelCase reason.
    pub reason: String,
    /// What the operator did, such as `Place` or `Reconcile`.
    pub action: &'static str,
    /// Human-readable detail.
    pub note: String,
}

impl Notice {
    fn new(severity: Severity, reason: &str, action: &'static str, note: String) -> Self {
        Notice {
            severity,
            reason: reason.to_owned(),
            action,
            note,
        }
    }
}

/// Why a new epoch started; its [`label`](EpochCause::label) is a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochCause {
    /// The first placement.
    Initial,
    /// No shard of the current epoch was left.
    Replace,
    /// The world size changed.
    Scale {
        /// Old world size.
        from: u32,
        /// New world size.
        to: u32,
    },
    /// The spec or the nodes changed so that the group must move.
    SpecChange,
    /// The group failed.
    Restart {
        /// CamelCase reason of the failure.
        reason: &'static str,
        /// What failed.
        message: String,
    },
}

impl EpochCause {
    /// A bounded label: `initial`, `replace`, `scale`, `spec_change` or `restart`.
    pub fn label(&self) -> &'static str {
        match self {
            EpochCause::Initial => "initial",
            EpochCause::Replace => "replace",
            EpochCause::Scale { .. } => "scale",
            EpochCause::SpecChange => "spec_change",
            EpochCause::Restart { .. } => "restart",
        }
    }
}

/// What one reconcile does.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The status to write.
    pub status: LlamaDeploymentStatus,
    /// The epoch the group-token Secret must belong to; a Secret of another
    /// epoch (or none) gets a fresh token. `None` when no group exists.
    pub token_epoch: Option<i64>,
    /// Shards to apply (only those of a new epoch).
    pub apply: Vec<LlamaShard>,
    /// Names of shards to delete (older epochs).
    pub delete: Vec<String>,
    /// Events to publish.
    pub notices: Vec<Notice>,
    /// When to look again if nothing changes.
    pub requeue_after: Duration,
    /// Set when this pass starts a new epoch.
    pub new_epoch: Option<EpochCause>,
}

/// What this pass does with the group.
enum Step {
    New {
        plan: Plan,
        shape: ModelShape,
        cause: EpochCause,
    },
    Keep,
    Hold(Blocker),
    Backoff {
        until: Timestamp,
        failures: Vec<Failure>,
    },
    GiveUp(Vec<Failure>),
}

/// The restart count to carry: reset when the spec changed (a new spec gets
/// a fresh budget) or when the group has served long enough.
fn carried_restarts(
    d: &LlamaDeployment,
    prior: &LlamaDeploymentStatus,
    policy: &RestartPolicy,
    now: Timestamp,
) -> u32 {
    if prior.observed_generation != d.metadata.generation {
        return 0;
    }
    let serving_long = conditions::find(&prior.conditions, READY).is_some_and(|c| {
        c.status == "True" && time::since(now, c.last_transition_time.0) >= policy.reset_after
    });
    if serving_long {
        0
    } else {
        u32::try_from(prior.restart_count).unwrap_or(0)
    }
}

fn same_specs(desired: &[LlamaShard], current: &[&LlamaShard]) -> bool {
    desired.len() == current.len()
        && desired.iter().all(|want| {
            current
                .iter()
                .any(|have| have.spec.rank == want.spec.rank && have.spec == want.spec)
        })
}

/// Decides one reconcile of a deployment that is not being deleted.
pub fn reconcile(input: &ReconcileInput<'_>, settings: &Settings) -> Outcome {
    let d = input.deployment;
    let now = input.now;
    let prior = input.prior;
    let generation = d.metadata.generation;
    let policy = &settings.restart;

    let epoch = input
        .shards
        .iter()
        .map(|s| s.spec.epoch)
        .chain([prior.epoch])
        .max()
        .unwrap_or(0);
    let mut current: Vec<&LlamaShard> = input
        .shards
        .iter()
        .copied()
        .filter(|s| s.spec.epoch == epoch && s.metadata.deletion_timestamp.is_none())
        .collect();
    current.sort_by_key(|s| s.spec.rank);
    let mut stale: Vec<String> = input
        .shards
        .iter()
        .filter(|s| s.spec.epoch != epoch && s.metadata.deletion_timestamp.is_none())
        .map(|s| s.name_any())
        .collect();
    let mut current_world = current
        .iter()
        .map(|s| u32::try_from(s.spec.world_size).unwrap_or(0))
        .max()
        .unwrap_or(0);
    // An epoch whose writing stopped half-way before the status recorded it
    // is not a group that failed: it never existed. Start over without
    // charging the restart budget.
    if epoch > prior.epoch && current.len() < current_world as usize {
        stale.extend(current.drain(..).map(|s| s.name_any()));
        current_world = 0;
    }
    let restarts = carried_restarts(d, prior, policy, now);

    let shape = convert::resolve_shape(d);
    let spec_world = u32::try_from(d.spec.sharding.world_size).unwrap_or(0);
    let valid_sizes: Vec<i32> = shape
        .as_ref()
        .map(|s| valid_world_sizes(s, MAX_WORLD_SIZE))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| i32::try_from(n).ok())
        .collect();
    let budget = convert::batch_limits(d)
        .ok()
        .map(|limits| convert::serving_budget(&limits, d.spec.max_context_tokens));
    let memory = shape.as_ref().ok().zip(budget).and_then(|(s, budget)| {
        valid_sizes
            .contains(&d.spec.sharding.world_size)
            .then(|| memory_per_rank(s, spec_world, budget).total())
    });
    let plan = convert::deployment_request(d).and_then(|request| {
        let shape = shape.clone()?;
        let plan_input = PlanInput {
            deployment: request,
            shape,
            nodes: input
                .nodes
                .iter()
                .filter(|n| !input.mismatched.contains_key(&n.name))
                .cloned()
                .collect(),
            current: convert::current_ranks(&current),
        };
        plan_placement(&plan_input)
            .map(|plan| (plan, shape))
            .map_err(|e| {
                blocker::backend_blocker(
                    d.spec.backend,
                    e,
                    &plan_input.deployment,
                    input.nodes,
                    input.mismatched,
                )
            })
    });
    let mut failures = if current.is_empty() {
        Vec::new()
    } else {
        detect_failures(&current, current_world, input.nodes)
    };
    // A group on its way to serving: when it last moved, and whether it
    // has been still for too long.
    let mut last_progress = None;
    if !current.is_empty() && failures.is_empty() {
        let p = progress(&current, current_world);
        if p.ready < p.world {
            let since = last_progress_at(prior, epoch, &p.ranks, now);
            last_progress = Some(since);
            if let Some(stall) = stalled(&p, since, now, settings.load_timeout) {
                failures.push(stall);
            }
        }
    }

    let step = if current.is_empty() {
        match plan {
            Ok((plan, shape)) => Step::New {
                plan,
                shape,
                cause: if epoch == 0 {
                    EpochCause::Initial
                } else {
                    EpochCause::Replace
                },
            },
            Err(b) => Step::Hold(b),
        }
    } else if !failures.is_empty() {
        let last = prior.last_restart.as_ref().map(|r| r.time.0);
        let next = policy.next_restart_at(last, restarts);
        if policy.exhausted(restarts) {
            Step::GiveUp(failures.clone())
        } else if let Some(until) = next.filter(|t| now < *t) {
            Step::Backoff {
                until,
                failures: failures.clone(),
            }
        } else {
            match plan {
                Ok((plan, shape)) => {
                    let (reason, message) = summarize(&failures, &current);
                    Step::New {
                        plan,
                        shape,
                        cause: EpochCause::Restart { reason, message },
                    }
                }
                Err(b) => Step::Hold(b),
            }
        }
    } else {
        match plan {
            Ok((plan, shape)) => {
                let desired = objects::build_shards(d, input.owner, &plan, &shape, epoch);
                if same_specs(&desired, &current) {
                    Step::Keep
                } else if plan.world_size != current_world {
                    Step::New {
                        cause: EpochCause::Scale {
                            from: current_world,
                            to: plan.world_size,
                        },
                        plan,
                        shape,
                    }
                } else {
                    Step::New {
                        plan,
                        shape,
                        cause: EpochCause::SpecChange,
                    }
                }
            }
            Err(b) => Step::Hold(b),
        }
    };

    let mut status = LlamaDeploymentStatus {
        observed_generation: generation,
        epoch,
        valid_world_sizes: valid_sizes,
        memory_per_rank_bytes: memory.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
        restart_count: i32::try_from(restarts).unwrap_or(i32::MAX),
        last_restart: prior.last_restart.clone(),
        last_progress_time: last_progress.map(Time),
        ..LlamaDeploymentStatus::default()
    };
    let mut notices = Vec::new();
    let mut apply = Vec::new();
    let mut delete = stale;
    let mut requeue_after = settings.resync;
    let mut new_epoch = None;
    let budget = policy.budget;

    let (phase, verdicts, group) = match step {
        Step::New { plan, shape, cause } => {
            let next = epoch + 1;
            apply = objects::build_shards(d, input.owner, &plan, &shape, next);
            delete.extend(current.iter().map(|s| s.name_any()));
            status.epoch = next;
            status.last_progress_time = Some(Time(now));
            let built: Vec<&LlamaShard> = apply.iter().collect();
            let p = progress(&built, plan.world_size);
            let placed = placed_message(next, &p.ranks);
            let (_, [loaded, formed, _]) = progress_verdicts(&p);
            let (phase, ready) = match &cause {
                EpochCause::Restart { reason, message } => {
                    status.restart_count = i32::try_from(restarts + 1).unwrap_or(i32::MAX);
                    status.last_restart = Some(RestartRecord {
                        epoch: next,
                        time: Time(now),
                        reason: (*reason).to_owned(),
                        message: message.clone(),
                    });
                    let action = format!("re-forming, restart {} of {budget}", restarts + 1);
                    if is_timeout(reason) {
                        notices.push(Notice::new(
                            Severity::Warning,
                            reason,
                            "Reconcile",
                            message.clone(),
                        ));
                    }
                    notices.push(Notice::new(
                        Severity::Warning,
                        "Restarting",
                        "Place",
                        format!("{message}; {action} ({placed})"),
                    ));
                    (
                        DeploymentPhase::Degraded,
                        Verdict::no(
                            READY,
                            recovering_reason(reason),
                            format!("{message}; {action}"),
                        ),
                    )
                }
                other => {
                    let (reason, note) = match other {
                        EpochCause::Scale { from, to } => {
                            ("Scaling", format!("world size {from} → {to}: {placed}"))
                        }
                        EpochCause::SpecChange => {
                            ("Replacing", format!("spec or nodes changed: {placed}"))
                        }
                        _ => ("Placed", placed.clone()),
                    };
                    notices.push(Notice::new(Severity::Normal, reason, "Place", note));
                    (
                        DeploymentPhase::Loading,
                        Verdict::no(
                            READY,
                            "Loading",
                            format!("0 of {} ranks loaded", plan.world_size),
                        ),
                    )
                }
            };
            new_epoch = Some(cause);
            (
                phase,
                [
                    Verdict::yes(PLACED, "Placed", placed),
                    loaded,
                    formed,
                    ready,
                ],
                p,
            )
        }
        Step::Keep => {
            let p = progress(&current, current_world);
            let (mut phase, [loaded, formed, mut ready]) = progress_verdicts(&p);
            let recovering = status.last_restart.as_ref().filter(|r| r.epoch == epoch);
            if let Some(r) = recovering
                && phase != DeploymentPhase::Serving
            {
                phase = DeploymentPhase::Degraded;
                ready = Verdict::no(
                    READY,
                    recovering_reason(&r.reason),
                    format!(
                        "{}; re-forming, restart {} of {budget}; {}",
                        r.message, status.restart_count, ready.message
                    ),
                );
            }
            let placed = Verdict::yes(PLACED, "Placed", placed_message(epoch, &p.ranks));
            (phase, [placed, loaded, formed, ready], p)
        }
        Step::Hold(blocker) => {
            let p = progress(&current, current_world);
            let reason = blocker.reason();
            let message = blocker.message();
            if current.is_empty() {
                let phase = if blocker.is_spec_error() {
                    DeploymentPhase::Failed
                } else {
                    DeploymentPhase::Placing
                };
                let not_placed = "no shards are placed";
                (
                    phase,
                    [
                        Verdict::no(PLACED, reason, message.clone()),
                        Verdict::no(SHARDS_LOADED, "NotPlaced", not_placed),
                        Verdict::no(GROUP_FORMED, "NotPlaced", not_placed),
                        Verdict::no(READY, reason, message),
                    ],
                    p,
                )
            } else if !failures.is_empty() {
                let (f_reason, f_message) = summarize(&failures, &current);
                let (_, [loaded, formed, _]) = progress_verdicts(&p);
                (
                    DeploymentPhase::Degraded,
                    [
                        Verdict::no(
                            PLACED,
                            reason,
                            format!("cannot re-place the group after {f_reason}: {message}"),
                        ),
                        loaded,
                        formed,
                        Verdict::no(
                            READY,
                            f_reason,
                            format!("{f_message}; waiting for capacity to re-place the group"),
                        ),
                    ],
                    p,
                )
            } else {
                let (phase, [loaded, formed, ready]) = progress_verdicts(&p);
                let placed = Verdict::no(
                    PLACED,
                    reason,
                    format!(
                        "{message} (the group of epoch {epoch} with {current_world} {} keeps running)",
                        if current_world == 1 { "rank" } else { "ranks" }
                    ),
                );
                (phase, [placed, loaded, formed, ready], p)
            }
        }
        Step::Backoff { until, failures } => {
            let p = progress(&current, current_world);
            let (f_reason, f_message) = summarize(&failures, &current);
            let (_, [loaded, formed, _]) = progress_verdicts(&p);
            requeue_after = time::since(until, now).max(Duration::from_millis(100));
            let wait = format!(
                "backing off, re-forming at {until}, restart {} of {budget}",
                restarts + 1
            );
            (
                DeploymentPhase::Degraded,
                [
                    Verdict::no(PLACED, f_reason, format!("{f_message}; {wait}")),
                    loaded,
                    formed,
                    Verdict::no(READY, f_reason, format!("{f_message}; {wait}")),
                ],
                p,
            )
        }
        Step::GiveUp(failures) => {
            let p = progress(&current, current_world);
            let (f_reason, f_message) = summarize(&failures, &current);
            let (_, [loaded, formed, _]) = progress_verdicts(&p);
            let gave_up = format!(
                "gave up after {restarts} restarts (the budget); last failure: {f_message}; \
                 edit the spec to try again"
            );
            (
                DeploymentPhase::Failed,
                [
                    Verdict::no(PLACED, f_reason, f_message),
                    loaded,
                    formed,
                    Verdict::no(READY, "RestartBudgetExhausted", gave_up),
                ],
                p,
            )
        }
    };

    if phase == DeploymentPhase::Serving {
        status.last_progress_time = None;
    } else if let Some(since) = status.last_progress_time.as_ref().map(|t| t.0) {
        let deadline = time::add(since, settings.load_timeout);
        requeue_after =
            requeue_after.min(time::since(deadline, now).max(Duration::from_millis(100)));
    }
    status.phase = Some(phase);
    status.world_size = i32::try_from(group.world).unwrap_or(i32::MAX);
    status.ready_ranks = i32::try_from(group.ready).unwrap_or(i32::MAX);
    let shown_world = if group.world > 0 {
        group.world
    } else {
        spec_world
    };
    status.ready = Some(format!("{}/{shown_world}", group.ready));
    status.endpoint = if phase == DeploymentPhase::Serving {
        group.endpoint.clone()
    } else {
        None
    };
    status.ranks = group.ranks;
    status.conditions = conditions::merge(&prior.conditions, &verdicts, generation, now);
    // A new epoch's own Event already says the group is loading.
    let announced = new_epoch.is_some();
    notices.extend(
        transition_notices(prior, &status)
            .into_iter()
            .filter(|n| !(announced && n.reason == "Loading")),
    );
    let token_epoch = (!status.ranks.is_empty()).then_some(status.epoch);
    Outcome {
        status,
        token_epoch,
        apply,
        delete,
        notices,
        requeue_after,
        new_epoch,
    }
}

/// Reason of the conditions set when the group-token Secret's name is taken.
pub const SECRET_CONFLICT: &str = "SecretConflict";

/// The status when the group-token Secret's name (`secret`, as
/// `namespace/name`) is taken by a Secret this deployment did not create:
/// nothing of the new epoch was written, so the epoch and ranks stay as
/// `prior` has them, `Placed` and `Ready` turn False with reason
/// [`SECRET_CONFLICT`], and the phase is Failed until the Secret goes away.
/// Returns the status and the Events the change deserves.
pub fn secret_conflict(
    deployment: &LlamaDeployment,
    prior: &LlamaDeploymentStatus,
    secret: &str,
    now: Timestamp,
) -> (LlamaDeploymentStatus, Vec<Notice>) {
    let message = format!(
        "Secret {secret} already exists and was not created by this deployment (it has no \
         controller reference to it); Tandem never overwrites, adopts or deletes a Secret it did \
         not create, so no rank is started: delete or rename that Secret, or give the \
         deployment another name"
    );
    let generation = deployment.metadata.generation;
    let mut status = prior.clone();
    status.observed_generation = generation;
    status.phase = Some(DeploymentPhase::Failed);
    let mut verdicts: Vec<Verdict> = prior
        .conditions
        .iter()
        .filter_map(|c| {
            let type_ = [SHARDS_LOADED, GROUP_FORMED]
                .into_iter()
                .find(|t| *t == c.type_)?;
            Some(Verdict {
                type_,
                ok: c.status == "True",
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
        })
        .collect();
    verdicts.push(Verdict::no(PLACED, SECRET_CONFLICT, message.clone()));
    verdicts.push(Verdict::no(READY, SECRET_CONFLICT, message));
    status.conditions = conditions::merge(&prior.conditions, &verdicts, generation, now);
    let notices = transition_notices(prior, &status);
    (status, notices)
}

/// Events for what changed between two statuses: a Placed condition that
/// became False for a new reason (a bad spec, no capacity, a failure), and
/// every phase change.
fn transition_notices(prior: &LlamaDeploymentStatus, next: &LlamaDeploymentStatus) -> Vec<Notice> {
    let mut out = Vec::new();
    let was = conditions::find(&prior.conditions, PLACED);
    if let Some(now) = conditions::find(&next.conditions, PLACED)
        && now.status == "False"
        && was.is_none_or(|w| w.status != now.status || w.reason != now.reason)
    {
        out.push(Notice::new(
            Severity::Warning,
            &now.reason,
            "Place",
            now.message.clone(),
        ));
    }
    if next.phase != prior.phase
        && let Some(phase) = next.phase
    {
        let severity = match phase {
            DeploymentPhase::Degraded | DeploymentPhase::Failed => Severity::Warning,
            _ => Severity::Normal,
        };
        let note = conditions::find(&next.conditions, READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        out.push(Notice::new(
            severity,
            &format!("{phase:?}"),
            "Reconcile",
            note,
        ));
    }
    out
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
        })
    }
}

#[cfg(test)]
mod tests;
