//! The decision for a deployment being deleted: release its shards, wait
//! for the agents, and give up waiting on nodes that are gone.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{DeploymentPhase, LlamaDeployment, LlamaDeploymentStatus, LlamaShard};

use super::progress::progress;
use super::progress::{phase_name, short};
use super::render::transition_notices;
use super::*;
use crate::conditions::{self, GROUP_FORMED, PLACED, READY, SHARDS_LOADED, Verdict};
use crate::time;

/// What a deletion pass looks at.
#[derive(Debug, Clone)]
pub struct CleanupInput<'a> {
    /// The deployment being deleted.
    pub deployment: &'a LlamaDeployment,
    /// The latest status known.
    pub prior: &'a LlamaDeploymentStatus,
    /// Shard objects the deployment still controls, of every epoch.
    pub shards: &'a [&'a LlamaShard],
    /// Its shards that live nodes still report running (see
    /// [`observe::held_shards`](crate::observe::held_shards)); lost nodes cannot release anything and are
    /// left out.
    pub held: &'a [HeldShard],
    /// The time the decision is made at.
    pub now: Timestamp,
}

/// What a deletion pass does.
#[derive(Debug, Clone)]
pub struct CleanupOutcome {
    /// The status to write (unless `done`).
    pub status: LlamaDeploymentStatus,
    /// Shards to delete.
    pub delete: Vec<String>,
    /// Events to publish.
    pub notices: Vec<Notice>,
    /// Every shard is released, or the wait timed out: the deployment's
    /// finalizer may go.
    pub done: bool,
    /// When to look again if nothing changes.
    pub requeue_after: Duration,
}

/// Decides one pass of deleting a deployment (the release protocol, see
/// docs/operator.md): delete every shard; then wait until no shard object is
/// left and no live node reports running one; give up waiting
/// `release_timeout` after the deletion began.
pub fn cleanup(input: &CleanupInput<'_>, settings: &Settings) -> CleanupOutcome {
    let d = input.deployment;
    let now = input.now;
    let deleted_at = d.metadata.deletion_timestamp.as_ref().map_or(now, |t| t.0);
    let deadline = time::add(deleted_at, settings.release_timeout);
    let mut shards = input.shards.to_vec();
    shards.sort_by_key(|s| (s.spec.epoch, s.spec.rank));
    let delete: Vec<String> = shards
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .map(|s| s.name_any())
        .collect();
    // One line per shard still somewhere: as an object, on a node, or both.
    let mut waiting: BTreeMap<String, String> = BTreeMap::new();
    for s in &shards {
        waiting.insert(
            s.name_any(),
            format!(
                "{} (node {}, object not yet deleted)",
                s.name_any(),
                s.spec.node_name
            ),
        );
    }
    for h in input.held {
        waiting.insert(
            h.name.clone(),
            format!("{} (node {}, {})", h.name, h.node, phase_name(h.phase)),
        );
    }
    let waiting: Vec<String> = waiting.into_values().collect();
    let timed_out = now >= deadline;
    let done = waiting.is_empty() || timed_out;
    let message = if waiting.is_empty() {
        "every shard is released".to_owned()
    } else {
        format!(
            "waiting for agents to release {} shards: {}; giving up at {deadline}",
            waiting.len(),
            short(&waiting)
        )
    };
    let kept: Vec<Verdict> = [PLACED, SHARDS_LOADED, GROUP_FORMED]
        .into_iter()
        .filter_map(|t| conditions::find(&input.prior.conditions, t).map(|c| (t, c)))
        .map(|(t, c): (&'static str, &Condition)| Verdict {
            type_: t,
            ok: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .chain([Verdict::no(READY, "Terminating", message.clone())])
        .collect();
    let p = progress(
        &shards
            .iter()
            .copied()
            .filter(|s| s.spec.epoch == input.prior.epoch)
            .collect::<Vec<_>>(),
        u32::try_from(input.prior.world_size).unwrap_or(0),
    );
    let status = LlamaDeploymentStatus {
        observed_generation: d.metadata.generation,
        phase: Some(DeploymentPhase::Terminating),
        epoch: input.prior.epoch,
        world_size: input.prior.world_size,
        ready_ranks: i32::try_from(p.ready).unwrap_or(0),
        ready: Some(format!("{}/{}", p.ready, input.prior.world_size)),
        ranks: p.ranks,
        endpoint: None,
        valid_world_sizes: input.prior.valid_world_sizes.clone(),
        memory_per_rank_bytes: input.prior.memory_per_rank_bytes,
        conditions: conditions::merge(&input.prior.conditions, &kept, d.metadata.generation, now),
        restart_count: input.prior.restart_count,
        last_restart: input.prior.last_restart.clone(),
        last_progress_time: None,
        ca_bundle: input.prior.ca_bundle.clone(),
    };
    let mut notices = transition_notices(input.prior, &status);
    if timed_out && !waiting.is_empty() {
        notices.push(Notice::new(
            Severity::Warning,
            "ReleaseTimedOut",
            "Delete",
            format!(
                "gave up after {}s waiting for agents to release: {}",
                settings.release_timeout.as_secs(),
                short(&waiting)
            ),
        ));
    }
    let requeue_after = if done {
        settings.resync
    } else {
        time::since(deadline, now).clamp(Duration::from_millis(500), Duration::from_secs(2))
    };
    CleanupOutcome {
        status,
        delete,
        notices,
        done,
        requeue_after,
    }
}
