//! What went wrong with the current group, and who is to blame: failed
//! ranks, lost nodes, missing shards, and which rank the others' lost-peer
//! reports point at.

use std::collections::{BTreeMap, BTreeSet};

use tandem_crds::{LlamaShard, ShardPhase};
use tandem_planner::NodeInfo;

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
pub(super) const PEER_LOST: &str = "PeerUnreachable";

/// How much of an agent's message a deployment's condition repeats; the
/// whole message stays on the LlamaShard.
pub(super) const DETAIL_CHARS: usize = 200;

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
pub(super) fn without_retry_note(message: &str) -> &str {
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
pub(super) fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", text.get(..at).unwrap_or_default()),
        None => text.to_owned(),
    }
}

/// What a rank that lost the group says about one of its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mention {
    /// The peer went away or never came, with what it did.
    Gone(i32, &'static str),
    /// The peer acted (closed the job stream, refused a caller): it is alive.
    Alive(i32),
}

pub(super) const STOPPED: &str = "stopped answering";
pub(super) const LATE: &str = "did not reach the group barrier in time";

/// The peers a peer-loss message names, in the agent's wording
/// (node-agent/src/worker and node-agent/src/control): `rank N left the
/// group`, `lost rank N's job stream`, `rank N's control service … was
/// unreachable`, `ranks [a, b] did not reach the … barrier` name the rank
/// that went away; `rank N closed the job stream` and `rank N refused …`
/// show that rank N is alive.
pub(super) fn mentions(detail: &str) -> Vec<Mention> {
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
pub(super) fn rank_list(ranks: &[i32]) -> String {
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
pub(super) fn and_list(items: &[String]) -> String {
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
pub(super) fn suspects(lost: &[&Failure], current: &[&LlamaShard]) -> Vec<String> {
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
pub(super) fn summarize(failures: &[Failure], current: &[&LlamaShard]) -> (&'static str, String) {
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
