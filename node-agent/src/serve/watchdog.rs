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
//! the warm-up)`. The warm-up runs under a floor of its own (ten minutes:
//! a fresh GPU compiles kernels for minutes, seen on an H200); its steps,
//! which carry those first-use costs, are then forgotten
//! ([`StepWatch::settle`]), and the configured floor covers a first use
//! after it. An idle group (no work) is never stalled.
//!
//! A step that compiles kernels is slow without being stuck: on a fresh
//! CUDA machine a request with a new shape or a new operation (log-
//! probabilities, say) can spend half a minute in NVRTC (seen on an H200:
//! steps of 8 s and 34 s). CPU time tells nothing (a rank blocked in the
//! ring's `all_sum` spins at 100 % as well), but the compiled kernels land
//! in MLX's kernel cache directory one by one: an `activity` probe over it
//! ([`kernel_cache_activity`]) that changes counts as progress.

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
    /// The floor in force: the warm-up's until [`StepWatch::settle`].
    floor: Duration,
}

/// Something that changes while the engine works without finishing steps
/// (kernels being compiled).
pub type Activity = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The engine thread's progress, shared with the watchdog.
#[derive(Clone)]
pub struct StepWatch {
    state: Arc<Mutex<State>>,
    policy: StallPolicy,
    activity: Option<Activity>,
}

impl std::fmt::Debug for StepWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepWatch")
            .field("policy", &self.policy)
            .field("activity", &self.activity.is_some())
            .finish()
    }
}

/// A probe of MLX's kernel cache directory (`MLX_PTX_CACHE_DIR`, where the
/// CUDA backend writes every kernel it compiles): its number of entries
/// and their latest modification time, folded into one number. `None`
/// when the variable is unset.
pub fn kernel_cache_activity() -> Option<Activity> {
    let dir = std::path::PathBuf::from(std::env::var_os("MLX_PTX_CACHE_DIR")?);
    Some(dir_activity(dir))
}

/// A probe of `dir`: its number of entries and their latest modification
/// time, folded into one number (0 while it cannot be read).
pub fn dir_activity(dir: std::path::PathBuf) -> Activity {
    Arc::new(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let (mut count, mut latest) = (0u64, 0u64);
        for entry in entries.flatten() {
            count += 1;
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            latest = latest.max(modified);
        }
        latest ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}

impl StepWatch {
    /// StepWatch judged by `policy`.
    pub fn new(policy: StallPolicy) -> StepWatch {
        StepWatch {
            state: Arc::new(Mutex::new(State {
                floor: policy.floor,
                ..State::default()
            })),
            policy,
            activity: None,
        }
    }

    /// Counts a change of `activity` as progress.
    pub fn with_activity(mut self, activity: Option<Activity>) -> StepWatch {
        self.activity = activity;
        self
    }

    /// The engine was seen working at `now` (a kernel compiled): a wait in
    /// progress starts again from here.
    fn worked_at(&self, now: Instant) {
        let mut s = self.lock();
        if s.waiting_since.is_some() {
            s.waiting_since = Some(now);
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

    /// Forgets the steps measured so far and puts `floor` in force: called
    /// after the warm-up, whose steps carry first-use costs (weights paged
    /// in, kernels compiled: minutes on a fresh GPU) that later steps do
    /// not, and which therefore runs under a floor of its own.
    pub fn settle(&self, floor: Duration) {
        let mut s = self.lock();
        s.longest = Duration::ZERO;
        s.floor = floor;
    }

    /// The current bound: no step may take longer.
    pub fn bound(&self) -> Duration {
        let s = self.lock();
        s.floor.max(s.longest.saturating_mul(self.policy.factor))
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
                s.floor.as_secs_f64(),
            )
        })
    }

    /// Resolves with the reason once the group is stalled. Checks a few
    /// times per bound, at most every second.
    pub async fn stalled(&self) -> String {
        let probe = |a: &Activity| {
            let a = a.clone();
            async move { tokio::task::spawn_blocking(move || a()).await.ok() }
        };
        let mut seen = match &self.activity {
            Some(a) => probe(a).await,
            None => None,
        };
        loop {
            let every = (self.bound() / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
            tokio::time::sleep(every).await;
            if let Some(a) = &self.activity {
                let now = probe(a).await;
                if now.is_some() && now != seen {
                    seen = now;
                    self.worked_at(Instant::now());
                }
            }
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
        // After the warm-up only the floor is left, the one put in force.
        p.settle(Duration::from_millis(70));
        assert_eq!(p.bound(), Duration::from_millis(70));
    }

    #[test]
    fn kernels_being_compiled_count_as_progress() {
        let p = StepWatch::new(policy(100, 1));
        let t0 = Instant::now();
        p.sent_at(t0);
        p.worked_at(t0 + Duration::from_millis(90));
        assert_eq!(p.check(t0 + Duration::from_millis(150)), None);
        assert!(p.check(t0 + Duration::from_millis(200)).is_some());
        // Idle, work seen changes nothing.
        let idle = StepWatch::new(policy(100, 1));
        idle.worked_at(t0);
        assert_eq!(idle.check(t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn the_kernel_cache_probe_sees_a_new_kernel() {
        let dir = std::env::temp_dir().join(format!("tandem-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let probe = dir_activity(dir.clone());
        let before = probe();
        assert_eq!(probe(), before, "nothing changed");
        std::fs::write(dir.join("kernel.ptx"), b"ptx").expect("write");
        assert_ne!(probe(), before);
        let _ = std::fs::remove_dir_all(&dir);
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
