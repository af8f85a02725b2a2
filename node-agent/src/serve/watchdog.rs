//! Rank 0's progress watchdog: notices a group that stopped making
//! progress while it has work.
//!
//! A rank that stops answering (a stopped process, a stalled engine thread,
//! a ring link partitioned while the control link stays up) leaves every
//! other rank blocked in `all_sum` for good: no stream closes and no process
//! dies, so nothing else would notice. The engine thread tells [`StepWatch`]
//! when a step goes out and when one comes back; [`StepWatch::stalled`]
//! resolves once work has been outstanding for longer than the bound with no
//! step finishing. The bound is derived from the measured step time:
//! `max(floor, factor × the longest gap between finished steps seen since
//! the warm-up)`: the warm-up's steps carry first-use costs (weights paged
//! in, kernels compiled) and are forgotten ([`StepWatch::settle`]); the
//! floor covers a first use after it. An idle group (no work) is never
//! stalled.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How the stall bound is derived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallPolicy {
    /// The bound is never shorter than this.
    pub floor: Duration,
    /// Multiple of the longest step seen.
    pub factor: u32,
}

impl Default for StallPolicy {
    fn default() -> StallPolicy {
        StallPolicy {
            floor: Duration::from_secs(30),
            factor: 4,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Since when work has been outstanding with no step finishing;
    /// `None` while the engine is idle.
    waiting_since: Option<Instant>,
    /// The longest gap between a step going out (or the previous one
    /// finishing) and a step finishing.
    longest: Duration,
    /// Steps finished.
    steps: u64,
}

/// The engine thread's progress, shared with the watchdog.
#[derive(Debug, Clone)]
pub struct StepWatch {
    state: Arc<Mutex<State>>,
    policy: StallPolicy,
}

impl StepWatch {
    /// StepWatch judged by `policy`.
    pub fn new(policy: StallPolicy) -> StepWatch {
        StepWatch {
            state: Arc::default(),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A step went out to the ranks.
    pub fn sent(&self) {
        self.sent_at(Instant::now());
    }

    /// The engine absorbed finished steps; `outstanding` says whether a
    /// step is still running.
    pub fn finished(&self, outstanding: bool) {
        self.finished_at(Instant::now(), outstanding);
    }

    fn sent_at(&self, now: Instant) {
        let mut s = self.lock();
        if s.waiting_since.is_none() {
            s.waiting_since = Some(now);
        }
    }

    fn finished_at(&self, now: Instant, outstanding: bool) {
        let mut s = self.lock();
        if let Some(since) = s.waiting_since {
            s.longest = s.longest.max(now.saturating_duration_since(since));
        }
        s.steps += 1;
        s.waiting_since = outstanding.then_some(now);
    }

    /// Forgets the steps measured so far: called after the warm-up, whose
    /// steps carry first-use costs (weights paged in, kernels compiled)
    /// that later steps do not; the floor still covers a later first use.
    pub fn settle(&self) {
        self.lock().longest = Duration::ZERO;
    }

    /// The current bound: no step may take longer.
    pub fn bound(&self) -> Duration {
        let longest = self.lock().longest;
        self.policy
            .floor
            .max(longest.saturating_mul(self.policy.factor))
    }

    /// Why the group is stalled at `now`, if it is.
    fn check(&self, now: Instant) -> Option<String> {
        let bound = self.bound();
        let s = self.lock();
        let since = s.waiting_since?;
        let waited = now.saturating_duration_since(since);
        (waited > bound).then(|| {
            format!(
                "no step finished for {:.1}s (the bound is {:.1}s: {}× the longest step so far, {:.3}s, and at least {:.1}s); a rank stopped answering or a ring link is down",
                waited.as_secs_f64(),
                bound.as_secs_f64(),
                self.policy.factor,
                s.longest.as_secs_f64(),
                self.policy.floor.as_secs_f64(),
            )
        })
    }

    /// Resolves with the reason once the group is stalled. Checks a few
    /// times per bound, at most every second.
    pub async fn stalled(&self) -> String {
        loop {
            let every = (self.bound() / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
            tokio::time::sleep(every).await;
            if let Some(reason) = self.check(Instant::now()) {
                return reason;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(floor_ms: u64, factor: u32) -> StallPolicy {
        StallPolicy {
            floor: Duration::from_millis(floor_ms),
            factor,
        }
    }

    #[test]
    fn an_idle_engine_is_never_stalled() {
        let p = StepWatch::new(policy(10, 2));
        let t0 = Instant::now();
        assert_eq!(p.check(t0 + Duration::from_secs(3600)), None);
        p.sent_at(t0);
        p.finished_at(t0 + Duration::from_millis(5), false);
        assert_eq!(p.check(t0 + Duration::from_secs(3600)), None);
    }

    #[test]
    fn outstanding_work_past_the_bound_is_a_stall() {
        let p = StepWatch::new(policy(100, 4));
        let t0 = Instant::now();
        p.sent_at(t0);
        assert_eq!(p.check(t0 + Duration::from_millis(99)), None);
        let reason = p.check(t0 + Duration::from_millis(150)).expect("stalled");
        assert!(reason.contains("no step finished for 0.1s"), "{reason}");
    }

    #[test]
    fn the_bound_grows_with_the_longest_step() {
        let p = StepWatch::new(policy(100, 4));
        let t0 = Instant::now();
        p.sent_at(t0);
        // A 60 ms step, a next one already out: the bound is 240 ms.
        p.finished_at(t0 + Duration::from_millis(60), true);
        assert_eq!(p.bound(), Duration::from_millis(240));
        let t1 = t0 + Duration::from_millis(60);
        assert_eq!(p.check(t1 + Duration::from_millis(200)), None);
        assert!(p.check(t1 + Duration::from_millis(300)).is_some());
        // StepWatch resets the wait.
        p.finished_at(t1 + Duration::from_millis(100), true);
        assert_eq!(p.check(t1 + Duration::from_millis(300)), None);
        // After the warm-up only the floor is left.
        p.settle();
        assert_eq!(p.bound(), Duration::from_millis(100));
    }

    #[test]
    fn a_step_sent_while_waiting_does_not_restart_the_wait() {
        let p = StepWatch::new(policy(100, 1));
        let t0 = Instant::now();
        p.sent_at(t0);
        p.sent_at(t0 + Duration::from_millis(90));
        assert!(p.check(t0 + Duration::from_millis(120)).is_some());
    }
}
