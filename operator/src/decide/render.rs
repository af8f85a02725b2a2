//! Rendering the chosen step: the shards to write and delete, the status
//! (phase, ranks, conditions, restart record) and the Events the change
//! deserves. One function per step; [`finish`] does what every step shares.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{
    DeploymentPhase, LlamaDeployment, LlamaDeploymentStatus, LlamaShard, RestartRecord,
};
use tandem_planner::{MAX_WORLD_SIZE, ModelShape, Plan, memory_per_rank, valid_world_sizes};

use super::blocker::Blocker;
use super::choose::{Group, Step};
use super::failures::summarize;
use super::progress::{
    Progress, is_timeout, placed_message, progress, progress_verdicts, recovering_reason,
};
use super::{EpochCause, Failure, Notice, Outcome, ReconcileInput, Settings, Severity};
use crate::conditions::{self, GROUP_FORMED, PLACED, READY, SHARDS_LOADED, Verdict};
use crate::{convert, objects, time};

/// What a step renders: the phase, the four conditions' verdicts (Placed,
/// ShardsLoaded, GroupFormed, Ready) and the progress of the group shown.
type Rendered = (DeploymentPhase, [Verdict; 4], Progress);

/// The outcome under construction.
struct Draft<'i, 'a> {
    input: &'i ReconcileInput<'a>,
    group: Group<'a>,
    /// The restart budget, for messages.
    budget: u32,
    status: LlamaDeploymentStatus,
    notices: Vec<Notice>,
    apply: Vec<LlamaShard>,
    delete: Vec<String>,
    requeue_after: Duration,
    new_epoch: Option<EpochCause>,
}

/// Renders `step` for `group` into the outcome of this pass.
pub(super) fn outcome(
    input: &ReconcileInput<'_>,
    settings: &Settings,
    mut group: Group<'_>,
    step: Step,
) -> Outcome {
    let d = input.deployment;
    let prior = input.prior;
    let (valid_sizes, memory) = spec_sizes(d);
    let status = LlamaDeploymentStatus {
        observed_generation: d.metadata.generation,
        epoch: group.epoch,
        valid_world_sizes: valid_sizes,
        memory_per_rank_bytes: memory.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
        restart_count: i32::try_from(group.restarts).unwrap_or(i32::MAX),
        last_restart: prior.last_restart.clone(),
        last_progress_time: group.last_progress.map(Time),
        ..LlamaDeploymentStatus::default()
    };
    let mut draft = Draft {
        input,
        delete: std::mem::take(&mut group.stale),
        group,
        budget: settings.restart.budget,
        status,
        notices: Vec::new(),
        apply: Vec::new(),
        requeue_after: settings.resync,
        new_epoch: None,
    };
    let rendered = match step {
        Step::New { plan, shape, cause } => draft.new_epoch(plan, &shape, cause),
        Step::Keep => draft.keep(),
        Step::Hold(blocker) => draft.hold(&blocker),
        Step::Backoff { until, failures } => draft.backoff(until, &failures),
        Step::GiveUp(failures) => draft.give_up(&failures),
    };
    draft.finish(settings, rendered)
}

/// The world sizes the spec's model allows, and the memory a rank needs at
/// the spec's world size (when that size is one of them).
fn spec_sizes(d: &LlamaDeployment) -> (Vec<i32>, Option<u64>) {
    let shape = convert::resolve_shape(d);
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
    let spec_world = u32::try_from(d.spec.sharding.world_size).unwrap_or(0);
    let memory = shape.as_ref().ok().zip(budget).and_then(|(s, budget)| {
        valid_sizes
            .contains(&d.spec.sharding.world_size)
            .then(|| memory_per_rank(s, spec_world, budget).total())
    });
    (valid_sizes, memory)
}

impl Draft<'_, '_> {
    fn current_progress(&self) -> Progress {
        progress(&self.group.current, self.group.world)
    }

    /// A new epoch: its shards written, the old ones deleted, an Event for
    /// why, and for a restart the restart record.
    fn new_epoch(&mut self, plan: Plan, shape: &ModelShape, cause: EpochCause) -> Rendered {
        let input = self.input;
        let now = input.now;
        let restarts = self.group.restarts;
        let budget = self.budget;
        let next = self.group.epoch + 1;
        self.apply = objects::build_shards(input.deployment, input.owner, &plan, shape, next);
        self.delete
            .extend(self.group.current.iter().map(|s| s.name_any()));
        self.status.epoch = next;
        self.status.last_progress_time = Some(Time(now));
        let built: Vec<&LlamaShard> = self.apply.iter().collect();
        let p = progress(&built, plan.world_size);
        let placed = placed_message(next, &p.ranks);
        let (_, [loaded, formed, _]) = progress_verdicts(&p);
        let (phase, ready) = match &cause {
            EpochCause::Restart { reason, message } => {
                self.status.restart_count = i32::try_from(restarts + 1).unwrap_or(i32::MAX);
                self.status.last_restart = Some(RestartRecord {
                    epoch: next,
                    time: Time(now),
                    reason: (*reason).to_owned(),
                    message: message.clone(),
                });
                let action = format!("re-forming, restart {} of {budget}", restarts + 1);
                if is_timeout(reason) {
                    self.notices.push(Notice::new(
                        Severity::Warning,
                        reason,
                        "Reconcile",
                        message.clone(),
                    ));
                }
                self.notices.push(Notice::new(
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
                self.notices
                    .push(Notice::new(Severity::Normal, reason, "Place", note));
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
        self.new_epoch = Some(cause);
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

    /// The group matches the plan: its progress, and while it re-forms
    /// after a restart, the restart's cause.
    fn keep(&mut self) -> Rendered {
        let p = self.current_progress();
        let (mut phase, [loaded, formed, mut ready]) = progress_verdicts(&p);
        let epoch = self.group.epoch;
        let recovering = self
            .status
            .last_restart
            .as_ref()
            .filter(|r| r.epoch == epoch);
        if let Some(r) = recovering
            && phase != DeploymentPhase::Serving
        {
            phase = DeploymentPhase::Degraded;
            ready = Verdict::no(
                READY,
                recovering_reason(&r.reason),
                format!(
                    "{}; re-forming, restart {} of {}; {}",
                    r.message, self.status.restart_count, self.budget, ready.message
                ),
            );
        }
        let placed = Verdict::yes(PLACED, "Placed", placed_message(epoch, &p.ranks));
        (phase, [placed, loaded, formed, ready], p)
    }

    /// No plan: nothing placed yet, a failed group that cannot be
    /// re-placed, or a running group that keeps running.
    fn hold(&mut self, blocker: &Blocker) -> Rendered {
        let p = self.current_progress();
        let reason = blocker.reason();
        let message = blocker.message();
        let group = &self.group;
        if group.current.is_empty() {
            let phase = if blocker.is_spec_error() {
                DeploymentPhase::Failed
            } else {
                DeploymentPhase::Placing
            };
            let not_placed = "no shards are placed";
            return (
                phase,
                [
                    Verdict::no(PLACED, reason, message.clone()),
                    Verdict::no(SHARDS_LOADED, "NotPlaced", not_placed),
                    Verdict::no(GROUP_FORMED, "NotPlaced", not_placed),
                    Verdict::no(READY, reason, message),
                ],
                p,
            );
        }
        if !group.failures.is_empty() {
            let (f_reason, f_message) = summarize(&group.failures, &group.current);
            let (_, [loaded, formed, _]) = progress_verdicts(&p);
            return (
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
            );
        }
        let (phase, [loaded, formed, ready]) = progress_verdicts(&p);
        let (epoch, world) = (group.epoch, group.world);
        let placed = Verdict::no(
            PLACED,
            reason,
            format!(
                "{message} (the group of epoch {epoch} with {world} {} keeps running)",
                if world == 1 { "rank" } else { "ranks" }
            ),
        );
        (phase, [placed, loaded, formed, ready], p)
    }

    /// A failed group waiting out the restart backoff until `until`.
    fn backoff(&mut self, until: Timestamp, failures: &[Failure]) -> Rendered {
        let p = self.current_progress();
        let (f_reason, f_message) = summarize(failures, &self.group.current);
        let (_, [loaded, formed, _]) = progress_verdicts(&p);
        self.requeue_after = time::since(until, self.input.now).max(Duration::from_millis(100));
        let wait = format!(
            "backing off, re-forming at {until}, restart {} of {}",
            self.group.restarts + 1,
            self.budget
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

    /// A failed group with the restart budget spent.
    fn give_up(&mut self, failures: &[Failure]) -> Rendered {
        let p = self.current_progress();
        let (f_reason, f_message) = summarize(failures, &self.group.current);
        let (_, [loaded, formed, _]) = progress_verdicts(&p);
        let gave_up = format!(
            "gave up after {} restarts (the budget); last failure: {f_message}; \
             edit the spec to try again",
            self.group.restarts
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

    /// What every step shares: the phase and ranks in the status, the
    /// conditions merged, the load deadline's requeue, and the Events of
    /// the status's transitions.
    fn finish(mut self, settings: &Settings, (phase, verdicts, shown): Rendered) -> Outcome {
        let input = self.input;
        let (prior, now) = (input.prior, input.now);
        let status = &mut self.status;
        if phase == DeploymentPhase::Serving {
            status.last_progress_time = None;
        } else if let Some(since) = status.last_progress_time.as_ref().map(|t| t.0) {
            let deadline = time::add(since, settings.load_timeout);
            self.requeue_after = self
                .requeue_after
                .min(time::since(deadline, now).max(Duration::from_millis(100)));
        }
        status.phase = Some(phase);
        status.world_size = i32::try_from(shown.world).unwrap_or(i32::MAX);
        status.ready_ranks = i32::try_from(shown.ready).unwrap_or(i32::MAX);
        let shown_world = if shown.world > 0 {
            shown.world
        } else {
            u32::try_from(input.deployment.spec.sharding.world_size).unwrap_or(0)
        };
        status.ready = Some(format!("{}/{shown_world}", shown.ready));
        status.endpoint = if phase == DeploymentPhase::Serving {
            shown.endpoint.clone()
        } else {
            None
        };
        status.ranks = shown.ranks;
        status.conditions = conditions::merge(
            &prior.conditions,
            &verdicts,
            input.deployment.metadata.generation,
            now,
        );
        // A new epoch's own Event already says the group is loading.
        let announced = self.new_epoch.is_some();
        self.notices.extend(
            transition_notices(prior, status)
                .into_iter()
                .filter(|n| !(announced && n.reason == "Loading")),
        );
        let token_epoch = (!self.status.ranks.is_empty()).then_some(self.status.epoch);
        Outcome {
            status: self.status,
            token_epoch,
            apply: self.apply,
            delete: self.delete,
            notices: self.notices,
            requeue_after: self.requeue_after,
            new_epoch: self.new_epoch,
        }
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
pub(super) fn transition_notices(
    prior: &LlamaDeploymentStatus,
    next: &LlamaDeploymentStatus,
) -> Vec<Notice> {
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
