//! The four deployment conditions and how a new set is merged with the old
//! one: `lastTransitionTime` moves only when a condition's status flips, and
//! every condition carries the generation it describes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Shards are written for the current spec and their nodes are healthy.
pub const PLACED: &str = "Placed";
/// Every rank of the current epoch has its weights in memory.
pub const SHARDS_LOADED: &str = "ShardsLoaded";
/// Every rank of the current epoch has joined the group.
pub const GROUP_FORMED: &str = "GroupFormed";
/// Rank 0 serves requests.
pub const READY: &str = "Ready";

/// A condition as decided, before timestamps are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Condition type.
    pub type_: &'static str,
    /// True or False.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What it means for the user.
    pub message: String,
}

impl Verdict {
    /// A True condition.
    pub fn yes(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Verdict {
            type_,
            ok: true,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A False condition.
    pub fn no(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Verdict {
            type_,
            ok: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Looks a condition up by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The new condition list, sorted by type. A condition whose status is the
/// same as in `previous` keeps its `lastTransitionTime`; one that flipped, or
/// is new, gets `now`.
pub fn merge(
    previous: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = verdicts
        .iter()
        .map(|v| {
            let status = if v.ok { "True" } else { "False" };
            let since = find(previous, v.type_)
                .filter(|c| c.status == status)
                .map_or(Time(now), |c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.to_owned(),
                status: status.to_owned(),
                reason: v.reason.clone(),
                message: v.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect();
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("ts")
    }

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let first = merge(
            &[],
            &[
                Verdict::no(READY, "Loading", "0 of 2"),
                Verdict::yes(PLACED, "Placed", "epoch 1"),
            ],
            Some(1),
            ts(100),
        );
        assert_eq!(
            first.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            [PLACED, READY]
        );
        assert!(first.iter().all(|c| c.last_transition_time.0 == ts(100)));
        assert!(first.iter().all(|c| c.observed_generation == Some(1)));

        // Same statuses, new reasons and messages: times stay.
        let second = merge(
            &first,
            &[
                Verdict::no(READY, "Forming", "1 of 2"),
                Verdict::yes(PLACED, "Placed", "epoch 1"),
            ],
            Some(2),
            ts(200),
        );
        assert!(second.iter().all(|c| c.last_transition_time.0 == ts(100)));
        assert_eq!(
            find(&second, READY).map(|c| c.reason.as_str()),
            Some("Forming")
        );
        assert!(second.iter().all(|c| c.observed_generation == Some(2)));

        // Ready flips: only it moves.
        let third = merge(
            &second,
            &[
                Verdict::yes(READY, "Serving", "ok"),
                Verdict::yes(PLACED, "Placed", "epoch 1"),
            ],
            Some(2),
            ts(300),
        );
        assert_eq!(
            find(&third, READY).map(|c| c.last_transition_time.0),
            Some(ts(300))
        );
        assert_eq!(
            find(&third, PLACED).map(|c| c.last_transition_time.0),
            Some(ts(100))
        );
        assert!(is_true(&third, READY));
        assert!(!is_true(&third, SHARDS_LOADED));
    }
}
