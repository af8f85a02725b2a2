//! Restart policy: how long to wait before re-forming a failed group, and how
//! many failure-driven re-placements a deployment gets before it is Failed.
//! Like kubelet's container restarts: the first restart is immediate, each
//! later one waits twice as long as the one before, up to a cap, and a group
//! that has served long enough without failing starts with a fresh count.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::time;

/// The knobs of the restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Failure-driven re-placements allowed before the deployment is Failed.
    pub budget: u32,
    /// Wait before the second restart; doubles for each later one.
    pub backoff_base: Duration,
    /// Longest wait between restarts.
    pub backoff_max: Duration,
    /// How long a group must serve without failing for the count to reset.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            budget: 5,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl RestartPolicy {
    /// Wait between restart number `done` (restarts done so far) and the next
    /// one: none before the first, then `base`, `2 × base`, ... up to `max`.
    pub fn delay_after(&self, done: u32) -> Duration {
        if done == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(done - 1).unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.backoff_max)
    }

    /// When the next restart may happen, given the last one.
    pub fn next_restart_at(&self, last: Option<Timestamp>, done: u32) -> Option<Timestamp> {
        last.map(|t| time::add(t, self.delay_after(done)))
    }

    /// Whether no restart is left.
    pub fn exhausted(&self, done: u32) -> bool {
        done >= self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            budget: 10,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            reset_after: Duration::from_secs(600),
        };
        let delays: Vec<u64> = (0..7).map(|n| p.delay_after(n).as_secs()).collect();
        assert_eq!(delays, [0, 10, 20, 40, 60, 60, 60]);
        assert_eq!(p.delay_after(u32::MAX), Duration::from_secs(60));
        let t = Timestamp::from_second(1000).expect("ts");
        assert_eq!(
            p.next_restart_at(Some(t), 2),
            Some(Timestamp::from_second(1020).expect("ts"))
        );
        assert_eq!(p.next_restart_at(None, 2), None);
    }

    #[test]
    fn budget_counts_restarts_done() {
        let p = RestartPolicy {
            budget: 2,
            ..RestartPolicy::default()
        };
        assert!(!p.exhausted(0));
        assert!(!p.exhausted(1));
        assert!(p.exhausted(2));
        assert!(RestartPolicy { budget: 0, ..p }.exhausted(0));
    }
}
