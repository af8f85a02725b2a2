//! How far an epoch's ranks are (placed, loaded, formed, ready), the
//! conditions and phase that follow, and the load and formation timeouts.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{DeploymentPhase, LlamaDeploymentStatus, LlamaShard, RankStatus, ShardPhase};

use super::*;
use crate::conditions::{GROUP_FORMED, READY, SHARDS_LOADED, Verdict};
use crate::convert;
use crate::time;

/// How far the ranks of one epoch are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Progress {
    pub(super) world: u32,
    pub(super) ranks: Vec<RankStatus>,
    /// Ranks past the group barrier (Loading, Loaded, Ready).
    pub(super) joined: u32,
    /// Ranks with their weights in memory (Loaded, Ready).
    pub(super) loaded: u32,
    pub(super) ready: u32,
    /// Ranks not yet Ready, with their phase, for messages.
    pub(super) waiting: Vec<String>,
    pub(super) endpoint: Option<String>,
}

pub(super) fn progress(shards: &[&LlamaShard], world: u32) -> Progress {
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

pub(super) fn phase_name(phase: Option<ShardPhase>) -> String {
    phase.map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"))
}

/// At most four items, then how many more.
pub(super) fn short(items: &[String]) -> String {
    tandem_planner::text::short_list(items, 4)
}

/// ShardsLoaded, GroupFormed and Ready from progress, with the phase they imply.
pub(super) fn progress_verdicts(p: &Progress) -> (DeploymentPhase, [Verdict; 3]) {
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

pub(super) fn placed_message(epoch: i64, ranks: &[RankStatus]) -> String {
    let on: Vec<String> = ranks
        .iter()
        .map(|r| format!("rank {} on {}", r.rank, r.node))
        .collect();
    format!("epoch {epoch}: {}", short(&on))
}

/// The reasons of a group that stopped making progress.
pub(super) const LOAD_TIMEOUT: &str = "LoadTimeout";
pub(super) const FORMATION_TIMEOUT: &str = "FormationTimeout";

pub(super) fn is_timeout(reason: &str) -> bool {
    reason == LOAD_TIMEOUT || reason == FORMATION_TIMEOUT
}

/// The Ready reason while a failed group is re-formed: `Recovering`, except
/// after a timeout, whose reason says more than any rank's phase does.
pub(super) fn recovering_reason(failure: &str) -> &str {
    if is_timeout(failure) {
        failure
    } else {
        "Recovering"
    }
}

/// When the group of `epoch` last made progress: the prior status's time if
/// it described the same epoch with the same ranks, phases and downloaded
/// bytes; else `now` (something moved, or nothing was recorded).
pub(super) fn last_progress_at(
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
pub(super) fn stalled(
    p: &Progress,
    since: Timestamp,
    now: Timestamp,
    limit: Duration,
) -> Option<Failure> {
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
