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
//! The pipeline's steps, one module each:
//! - this file: the inputs and the outcome, and [`reconcile`], which runs
//!   the steps in order;
//! - `choose`: the current epoch and group, and the step this pass takes
//!   (new epoch, keep, hold, back off, give up);
//! - `failures`: what went wrong with the current group and which rank the
//!   others' reports blame ([`detect_failures`]);
//! - `progress`: how far an epoch's ranks are, the conditions and phase
//!   that follow, and the load and formation timeouts;
//! - `render`: the chosen step as shards to write and delete, the status
//!   and the Events ([`secret_conflict`] too);
//! - `blocker`: why no plan exists ([`Blocker`]);
//! - `cleanup`: the decision for a deployment being deleted ([`cleanup`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use tandem_crds::{LlamaDeployment, LlamaDeploymentStatus, LlamaShard};
use tandem_planner::NodeInfo;

use crate::observe::HeldShard;
use crate::restart::RestartPolicy;

mod blocker;
mod choose;
mod cleanup;
mod failures;
mod progress;
mod render;

pub use blocker::Blocker;
pub use render::{SECRET_CONFLICT, secret_conflict};

pub use cleanup::{CleanupInput, CleanupOutcome, cleanup};
pub use failures::{Failure, detect_failures};

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
    /// Its owner reference for children (see [`objects::owner_reference`](crate::objects::owner_reference)).
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

/// Decides one reconcile of a deployment that is not being deleted: finds
/// the current group and what went wrong with it, chooses the step, and
/// renders it into shards, status and Events.
pub fn reconcile(input: &ReconcileInput<'_>, settings: &Settings) -> Outcome {
    let group = choose::find_group(input, settings);
    let step = choose::step(input, settings, &group);
    render::outcome(input, settings, group, step)
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
