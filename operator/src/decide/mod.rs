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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{
    DeploymentPhase, LlamaDeployment, LlamaDeploymentStatus, LlamaShard, RankStatus, RestartRecord,
    ShardPhase,
};
use tandem_planner::{
    MAX_WORLD_SIZE, ModelShape, NodeInfo, Plan, PlanInput, memory_per_rank, plan_placement,
    valid_world_sizes,
};

use crate::conditions::{self, GROUP_FORMED, PLACED, READY, SHARDS_LOADED, Verdict};
use crate::convert::{self, Blocker, HeldShard};
use crate::objects;
use crate::restart::RestartPolicy;
use crate::time;

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
    /// [`convert::node_infos`]).
    pub nodes: &'a [NodeInfo],
    /// The nodes among `nodes` that cannot run the deployment's
    /// `spec.backend`, with why (see [`convert::backend_mismatches`]); the
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

/// What went wrong with the current group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `RankFailed`, `NodeLost` or `ShardMissing`.
    pub reason: &'static str,
    /// Rank affected.
    pub rank: i32,
    /// The rank only lost the group (its agent reported `PeerUnreachable`):
    /// usually the consequence of another rank's failure, not a cause.
    pub lost_peer: bool,
    /// The agent's message for a failed rank, without its retry note
    /// (`; restarting in 1s (restart 1)`); empty otherwise.
    pub detail: String,
    /// What happened, in words.
    pub message: String,
}

/// The shard reason agents report when a rank loses the group because a
/// peer went away (see docs/design.md).
const PEER_LOST: &str = "PeerUnreachable";

/// How much of an agent's message a deployment's condition repeats; the
/// whole message stays on the LlamaShard.
const DETAIL_CHARS: usize = 200;

/// The failures of the current epoch's group: failed ranks, ranks whose node
/// is lost or gone, and ranks whose shard is missing.
pub fn detect_failures(current: &[&LlamaShard], world: u32, nodes: &[NodeInfo]) -> Vec<Failure> {
    let by_name: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut out = Vec::new();
    for rank in 0..world {
        let rank = i32::try_from(rank).unwrap_or(i32::MAX);
        let Some(shard) = current.iter().find(|s| s.spec.rank == rank) else {
            out.push(Failure {
                reason: "ShardMissing",
                rank,
                lost_peer: false,
                detail: String::new(),
                message: format!("rank {rank}: its shard was deleted"),
            });
            continue;
        };
        let node = &shard.spec.node_name;
        let status = shard.status.as_ref();
        if status.and_then(|s| s.phase) == Some(ShardPhase::Failed) {
            let reason = status.and_then(|s| s.reason.as_deref());
            let detail = status
                .and_then(|s| s.message.as_deref())
                .map(without_retry_note)
                .unwrap_or_default()
                .to_owned();
            let clipped = clip(&detail, DETAIL_CHARS);
            let why: Vec<&str> = reason
                .into_iter()
                .chain([clipped.as_str()])
                .filter(|w| !w.is_empty())
                .collect();
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(": {}", why.join(": "))
            };
            out.push(Failure {
                reason: "RankFailed",
                rank,
                lost_peer: reason == Some(PEER_LOST),
                message: format!("rank {rank} on {node} failed{why}"),
                detail,
            });
            continue;
        }
        let lost = match by_name.get(node.as_str()) {
            None => Some("node gone"),
            Some(n) if !n.ready => Some("node lost (Lease expired or agent not Ready)"),
            Some(_) => None,
        };
        if let Some(lost) = lost {
            out.push(Failure {
                reason: "NodeLost",
                rank,
                lost_peer: false,
                detail: String::new(),
                message: format!("rank {rank} on {node}: {lost}"),
            });
        }
    }
    out
}

/// An agent's shard message without the retry note its agent appends
/// (`…; restarting in 2s (restart 3)`): the operator says itself what it does.
fn without_retry_note(message: &str) -> &str {
    match message.rsplit_once("; restarting in ") {
        Some((cause, note))
            if note.starts_with(|c: char| c.is_ascii_digit()) && note.ends_with(')') =>
        {
            cause
        }
        _ => message,
    }
}

/// At most `max` characters of `text`, with `…` when cut.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", text.get(..at).unwrap_or_default()),
        None => text.to_owned(),
    }
}

/// What a rank that lost the group says about one of its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mention {
    /// The peer went away or never came, with what it did.
    Gone(i32, &'static str),
    /// The peer acted (closed the job stream, refused a caller): it is alive.
    Alive(i32),
}

const STOPPED: &str = "stopped answering";
const LATE: &str = "did not reach the group barrier in time";

/// The peers a peer-loss message names, in the agent's wording
/// (node-agent/src/worker and node-agent/src/control): `rank N left the
/// group`, `lost rank N's job stream`, `rank N's control service … was
/// unreachable`, `ranks [a, b] did not reach the … barrier` name the rank
/// that went away; `rank N closed the job stream` and `rank N refused …`
/// show that rank N is alive.
fn mentions(detail: &str) -> Vec<Mention> {
    let mut out = Vec::new();
    for (at, _) in detail.match_indices("rank ") {
        let rest = detail.get(at + "rank ".len()..).unwrap_or_default();
        let after = rest.trim_start_matches(|c: char| c.is_ascii_digit());
        let Ok(rank) = rest
            .get(..rest.len() - after.len())
            .unwrap_or_default()
            .parse::<i32>()
        else {
            continue;
        };
        if after.starts_with(" left the group")
            || after.starts_with("'s job stream")
            || (after.starts_with("'s control service") && after.contains("unreachable"))
        {
            out.push(Mention::Gone(rank, STOPPED));
        } else if after.starts_with(" closed the job stream") || after.starts_with(" refused ") {
            out.push(Mention::Alive(rank));
        }
    }
    for (at, _) in detail.match_indices("ranks [") {
        let rest = detail.get(at + "ranks [".len()..).unwrap_or_default();
        if let Some((list, after)) = rest.split_once(']')
            && after.starts_with(" did not reach the")
        {
            out.extend(
                list.split(',')
                    .filter_map(|r| r.trim().parse().ok())
                    .map(|r| Mention::Gone(r, LATE)),
            );
        }
    }
    out
}

/// Ranks as a short list, runs as ranges: `rank 2`, `ranks 2–3`, `ranks 0, 2–3`.
fn rank_list(ranks: &[i32]) -> String {
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i32, i32)> = Vec::new();
    for r in &sorted {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(*r) => *last = *r,
            _ => runs.push((*r, *r)),
        }
    }
    let text: Vec<String> = runs
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}–{b}")
            }
        })
        .collect();
    let noun = if sorted.len() == 1 { "rank" } else { "ranks" };
    format!("{noun} {}", text.join(", "))
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// When every failed rank only lost the group: the ranks that likely broke
/// it, as phrases such as `rank 1 on demo-b stopped answering`. A rank the
/// failed ranks name as gone comes first; else the ranks that reported
/// nothing although their peers lost the group (their agent stopped
/// writing, as when it is killed, until its node's Lease expires), leaving
/// out those that a peer saw act (`rank 0 closed the job stream`) unless
/// no other is left. Empty when every rank reported a failure.
fn suspects(lost: &[&Failure], current: &[&LlamaShard]) -> Vec<String> {
    let reported: BTreeSet<i32> = lost.iter().map(|f| f.rank).collect();
    let mut acted: BTreeSet<i32> = BTreeSet::new();
    let mut named: BTreeMap<i32, &'static str> = BTreeMap::new();
    for m in lost.iter().flat_map(|f| mentions(&f.detail)) {
        match m {
            Mention::Gone(rank, what) => {
                named.entry(rank).or_insert(what);
            }
            Mention::Alive(rank) => {
                acted.insert(rank);
            }
        }
    }
    named.retain(|rank, _| !reported.contains(rank) && !acted.contains(rank));
    if named.is_empty() {
        let silent: Vec<i32> = current
            .iter()
            .map(|s| s.spec.rank)
            .filter(|rank| !reported.contains(rank))
            .collect();
        let unseen: Vec<i32> = silent
            .iter()
            .copied()
            .filter(|rank| !acted.contains(rank))
            .collect();
        let chosen = if unseen.is_empty() { silent } else { unseen };
        named = chosen.into_iter().map(|rank| (rank, STOPPED)).collect();
    }
    let mut groups: Vec<(&'static str, Vec<String>)> = Vec::new();
    for (rank, what) in named {
        let who = match current.iter().find(|s| s.spec.rank == rank) {
            Some(s) => format!("rank {rank} on {}", s.spec.node_name),
            None => format!("rank {rank}"),
        };
        match groups.iter_mut().find(|(w, _)| *w == what) {
            Some((_, list)) => list.push(who),
            None => groups.push((what, vec![who])),
        }
    }
    groups
        .into_iter()
        .map(|(what, who)| format!("{} {what}", and_list(&who)))
        .collect()
}

/// The failures in a few words, the cause first and once, then the ranks
/// that only lost their peer: `rank 1 on demo-b stopped answering; ranks
/// 2–3 lost their peer`. The reason is the first cause's (`NodeLost`,
/// `ShardMissing`, `RankFailed`). Per-rank detail beyond the cause stays on
/// the LlamaShards.
fn summarize(failures: &[Failure], current: &[&LlamaShard]) -> (&'static str, String) {
    let causes: Vec<&Failure> = failures.iter().filter(|f| !f.lost_peer).collect();
    let mut lost: Vec<&Failure> = failures.iter().filter(|f| f.lost_peer).collect();
    let reason = causes.first().map_or("RankFailed", |f| f.reason);
    let mut text: Vec<String> = causes.iter().take(3).map(|f| f.message.clone()).collect();
    if causes.len() > 3 {
        text.push(format!("and {} more", causes.len() - 3));
    }
    if causes.is_empty() && !lost.is_empty() {
        let suspected = suspects(&lost, current);
        if suspected.is_empty() {
            // Every rank reported losing the group: the one its peers name
            // (else the lowest) says what broke it.
            let named: BTreeSet<i32> = lost
                .iter()
                .flat_map(|f| mentions(&f.detail))
                .filter_map(|m| match m {
                    Mention::Gone(rank, _) => Some(rank),
                    Mention::Alive(_) => None,
                })
                .collect();
            let at = lost
                .iter()
                .position(|f| named.contains(&f.rank))
                .unwrap_or(0);
            text.push(lost.remove(at).message.clone());
        } else {
            text.extend(suspected);
        }
    }
    if !lost.is_empty() {
        let ranks: Vec<i32> = lost.iter().map(|f| f.rank).collect();
        let verb = if ranks.len() == 1 {
            "lost its peer"
        } else {
            "lost their peer"
        };
        text.push(format!("{} {verb}", rank_list(&ranks)));
    }
    (reason, text.join("; "))
}

/// How far the ranks of one epoch are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    world: u32,
    ranks: Vec<RankStatus>,
    /// Ranks past the group barrier (Loading, Loaded, Ready).
    joined: u32,
    /// Ranks with their weights in memory (Loaded, Ready).
    loaded: u32,
    ready: u32,
    /// Ranks not yet Ready, with their phase, for messages.
    waiting: Vec<String>,
    endpoint: Option<String>,
}

fn progress(shards: &[&LlamaShard], world: u32) -> Progress {
    let mut p = Progress {
        world,
        ..Progress::default()
    };
    let mut sorted = shards.to_vec();
    sorted.sort_by_key(|s| s.spec.rank);
    for s in sorted {
        let status = s.status.as_ref();
        let phase = status.and_then(|st| st.phase);
        let address = s
            .spec
            .peers
            .iter()
            .find(|peer| peer.rank == s.spec.rank)
            .map(|peer| peer.address.clone());
        // Agents form the group (Connecting) before they load the weights
        // (Loading, Loaded), then serve (Ready); see docs/design.md.
        if matches!(
            phase,
            Some(ShardPhase::Loading | ShardPhase::Loaded | ShardPhase::Ready)
        ) {
            p.joined += 1;
        }
        if matches!(phase, Some(ShardPhase::Loaded | ShardPhase::Ready)) {
            p.loaded += 1;
        }
        if phase == Some(ShardPhase::Ready) {
            p.ready += 1;
            if s.spec.rank == 0 {
                let scheme = if s.spec.tls_secret_ref.is_some() {
                    "https"
                } else {
                    "http"
                };
                p.endpoint = address
                    .as_deref()
                    .and_then(convert::endpoint_host)
                    .zip(s.spec.serving_port)
                    .map(|(host, port)| format!("{scheme}://{host}:{port}"));
            }
        } else {
            let mut what = format!(
                "rank {} on {}: {}",
                s.spec.rank,
                s.spec.node_name,
                phase_name(phase)
            );
            if let Some(pr) = status.and_then(|st| st.progress.as_ref())
                && let Some(total) = pr.bytes_total.filter(|t| *t > 0)
            {
                what.push_str(&format!(" {}%", pr.bytes_done.saturating_mul(100) / total));
            }
            p.waiting.push(what);
        }
        p.ranks.push(RankStatus {
            rank: s.spec.rank,
            node: s.spec.node_name.clone(),
            shard: s.name_any(),
            phase,
            address,
            bytes_done: status
                .and_then(|st| st.progress.as_ref())
                .filter(|_| phase == Some(ShardPhase::Downloading))
                .map(|pr| pr.bytes_done),
        });
    }
    if p.ready < world {
        p.endpoint = None;
    }
    p
}

fn phase_name(phase: Option<ShardPhase>) -> String {
    phase.map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"))
}

/// At most four items, then how many more.
fn short(items: &[String]) -> String {
    tandem_planner::text::short_list(items, 4)
}

/// ShardsLoaded, GroupFormed and Ready from progress, with the phase they imply.
fn progress_verdicts(p: &Progress) -> (DeploymentPhase, [Verdict; 3]) {
    let w = p.world;
    let waiting = short(&p.waiting);
    let loaded = if p.loaded >= w && w > 0 {
        Verdict::yes(
            SHARDS_LOADED,
            "AllLoaded",
            format!("all {w} ranks have their weights loaded"),
        )
    } else {
        Verdict::no(
            SHARDS_LOADED,
            "Loading",
            format!("{} of {w} ranks loaded; {waiting}", p.loaded),
        )
    };
    let formed = if p.joined >= w && w > 0 {
        Verdict::yes(
            GROUP_FORMED,
            "Formed",
            format!("all {w} ranks joined the group"),
        )
    } else {
        Verdict::no(
            GROUP_FORMED,
            "Connecting",
            format!("{} of {w} ranks joined the group; {waiting}", p.joined),
        )
    };
    let (phase, ready) = if p.ready >= w && w > 0 {
        let at = p.endpoint.clone().unwrap_or_default();
        (
            DeploymentPhase::Serving,
            Verdict::yes(READY, "Serving", format!("serving at {at}")),
        )
    } else if p.loaded >= w && w > 0 {
        (
            DeploymentPhase::Forming,
            Verdict::no(
                READY,
                "Forming",
                format!("every rank is loaded; {} of {w} ranks ready", p.ready),
            ),
        )
    } else {
        (
            DeploymentPhase::Loading,
            Verdict::no(
                READY,
                "Loading",
                format!("{} of {w} ranks loaded", p.loaded),
            ),
        )
    };
    (phase, [loaded, formed, ready])
}

fn placed_message(epoch: i64, ranks: &[RankStatus]) -> String {
    let on: Vec<String> = ranks
        .iter()
        .map(|r| format!("rank {} on {}", r.rank, r.node))
        .collect();
    format!("epoch {epoch}: {}", short(&on))
}

/// The reasons of a group that stopped making progress.
const LOAD_TIMEOUT: &str = "LoadTimeout";
const FORMATION_TIMEOUT: &str = "FormationTimeout";

fn is_timeout(reason: &str) -> bool {
    reason == LOAD_TIMEOUT || reason == FORMATION_TIMEOUT
}

/// The Ready reason while a failed group is re-formed: `Recovering`, except
/// after a timeout, whose reason says more than any rank's phase does.
fn recovering_reason(failure: &str) -> &str {
    if is_timeout(failure) {
        failure
    } else {
        "Recovering"
    }
}

/// When the group of `epoch` last made progress: the prior status's time if
/// it described the same epoch with the same ranks, phases and downloaded
/// bytes; else `now` (something moved, or nothing was recorded).
fn last_progress_at(
    prior: &LlamaDeploymentStatus,
    epoch: i64,
    ranks: &[RankStatus],
    now: Timestamp,
) -> Timestamp {
    match &prior.last_progress_time {
        Some(t) if prior.epoch == epoch && prior.ranks.as_slice() == ranks => t.0,
        _ => now,
    }
}

/// The failure of a group that has not moved for `limit` since `since`:
/// `LoadTimeout` while ranks are still getting their weights (downloading,
/// meeting at the barrier, loading), `FormationTimeout` once every rank is
/// loaded and the group only has to become Ready.
fn stalled(p: &Progress, since: Timestamp, now: Timestamp, limit: Duration) -> Option<Failure> {
    let still = time::since(now, since);
    if still < limit {
        return None;
    }
    let (reason, waited) = if p.loaded < p.world {
        (
            LOAD_TIMEOUT,
            format!(
                "every rank to load its weights ({} of {} loaded)",
                p.loaded, p.world
            ),
        )
    } else {
        (
            FORMATION_TIMEOUT,
            format!("every rank to be Ready ({} of {} ready)", p.ready, p.world),
        )
    };
    let rank = p
        .ranks
        .iter()
        .find(|r| r.phase != Some(ShardPhase::Ready))
        .map_or(0, |r| r.rank);
    Some(Failure {
        reason,
        rank,
        lost_peer: false,
        detail: String::new(),
        message: format!(
            "no progress for {}s (the limit is {}s) while waiting for {waited}: {}",
            still.as_secs(),
            limit.as_secs(),
            short(&p.waiting)
        ),
    })
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
                convert::backend_blocker(
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
    /// [`convert::held_shards`]); lost nodes cannot release anything and are
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
