//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it:
//! read the Lease, and create it, renew it, or take it over once it has
//! expired, always writing with the `resourceVersion` that was read, so that
//! of two replicas racing for it exactly one wins (the other gets a 409).
//!
//! # Timing
//! A leader that cannot renew within the renew deadline stops its controller
//! and gives in-flight reconciles at most the drain timeout; the
//! configuration is refused unless renew deadline + drain is strictly less
//! than the lease duration ([`ElectionConfig::validate`]), so the old leader
//! has stopped before another replica may take the Lease over. Every Lease
//! call has a timeout, so a hung request cannot outlast the renew deadline.
//!
//! A process that is frozen (SIGSTOP, a stalled VM) cannot act on any
//! deadline while frozen, so every write also passes the [`Fence`]: each
//! successful renewal opens it until *the instant the renewal started* +
//! renew deadline + drain, on the monotonic clock, and nothing is written
//! once that has passed. A leader that wakes past its lease therefore writes
//! nothing, even before it has noticed that another replica leads.
//!
//! On shutdown the leader releases the Lease (empty holder), so a standby
//! takes over at once instead of waiting for it to expire.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use crate::time;

/// Where the Lease is and who this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This process's identity, written as the holder.
    pub identity: String,
    /// How long a Lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// How often the leader renews, and a follower retries.
    pub retry_interval: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How long a stopping controller may finish its in-flight reconciles.
    pub drain_timeout: Duration,
}

/// A leader-election configuration that could let two leaders overlap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("leader election timing: {0}")]
pub struct ConfigError(String);

impl ElectionConfig {
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// The lease duration as written to the Lease (whole seconds): what
    /// other replicas wait for.
    pub fn written_lease_duration(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.duration_seconds()).unwrap_or(1))
    }

    /// How long after a renewal starts this process may still write: the
    /// renew deadline plus the drain.
    pub fn write_window(&self) -> Duration {
        self.renew_deadline.saturating_add(self.drain_timeout)
    }

    /// Refuses timings under which a leader could still be writing when
    /// another replica may take the Lease over.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let lease = self.written_lease_duration();
        if self.lease_duration < Duration::from_secs(1) {
            return Err(ConfigError(format!(
                "--leader-lease-duration ({:?}) must be at least 1s",
                self.lease_duration
            )));
        }
        if self.retry_interval.is_zero() || self.retry_interval >= self.renew_deadline {
            return Err(ConfigError(format!(
                "--leader-retry-interval ({:?}) must be more than 0 and less than \
                 --leader-renew-deadline ({:?}), so that a leader tries to renew more than once \
                 before it gives up",
                self.retry_interval, self.renew_deadline
            )));
        }
        if self.write_window() >= lease {
            return Err(ConfigError(format!(
                "--leader-renew-deadline ({:?}) plus --drain-timeout ({:?}) is {:?}, which is \
                 not less than --leader-lease-duration ({lease:?}): a leader that cannot renew \
                 could still be writing when another replica takes over; shorten the deadline \
                 or the drain, or lengthen the lease",
                self.renew_deadline,
                self.drain_timeout,
                self.write_window()
            )));
        }
        Ok(())
    }
}

/// Whether this process may write now: open until a deadline on the
/// monotonic clock that each successful renewal moves (see the module docs).
/// Clones share one state.
#[derive(Debug, Clone)]
pub struct Fence {
    /// `None`: no leader election, always open.
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

impl Fence {
    /// Always open: a single replica without leader election.
    pub fn open() -> Fence {
        Fence { until: None }
    }

    /// Closed until [`extend`](Fence::extend)ed.
    pub fn closed() -> Fence {
        Fence {
            until: Some(Arc::new(Mutex::new(None))),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, Option<Instant>>> {
        // A panic while holding the lock leaves a plain value behind.
        self.until
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Keeps the fence open until `until`.
    pub fn extend(&self, until: Instant) {
        if let Some(mut g) = self.lock() {
            *g = Some(until);
        }
    }

    /// Closes the fence now.
    pub fn close(&self) {
        if let Some(mut g) = self.lock() {
            *g = None;
        }
    }

    /// Whether a write may start at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        match self.lock() {
            None => true,
            Some(g) => g.is_some_and(|until| now < until),
        }
    }
}

/// What to do with the Lease as it was read.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseAction {
    /// No Lease yet: create it, held by us.
    Create(Lease),
    /// Renew ours, or take over an expired or released one.
    Update(Lease),
    /// Someone else holds it.
    Wait {
        /// The holder.
        holder: String,
    },
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

fn expired(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return true;
    };
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    time::add(renewed.0, Duration::from_secs(secs)) <= now
}

/// Decides what to do with the leader Lease as read (`None`: it does not exist).
pub fn decide(existing: Option<&Lease>, cfg: &ElectionConfig, now: Timestamp) -> LeaseAction {
    let Some(lease) = existing else {
        return LeaseAction::Create(Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(cfg.duration_seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        });
    };
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    match holder(lease) {
        Some(h) if h == cfg.identity => {
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(cfg.duration_seconds());
            LeaseAction::Update(next)
        }
        Some(h) if !expired(lease, now) => LeaseAction::Wait {
            holder: h.to_owned(),
        },
        _ => {
            spec.holder_identity = Some(cfg.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(cfg.duration_seconds());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            LeaseAction::Update(next)
        }
    }
}

/// The Lease handed back: no holder, and a one-second duration.
pub fn released(lease: &Lease, identity: &str, now: Timestamp) -> Option<Lease> {
    if holder(lease) != Some(identity) {
        return None;
    }
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(now));
    Some(next)
}

/// Campaigns for, holds and releases the leader Lease.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    cfg: ElectionConfig,
    fence: Fence,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Why a round of leader election did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The API call failed.
    #[error("reading or writing the leader Lease failed: {0}")]
    Api(#[source] kube::Error),
    /// The round took longer than it was allowed.
    #[error("reading or writing the leader Lease took longer than {0:?}")]
    TimedOut(Duration),
}

/// How a term of leadership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// The process is shutting down.
    Shutdown,
    /// Renewal failed past the deadline, or another process holds the Lease.
    Lost,
}

impl Elector {
    /// An elector for the Lease `cfg` names; its fence starts closed.
    pub fn new(client: kube::Client, cfg: ElectionConfig) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Elector {
            api,
            cfg,
            fence: Fence::closed(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    /// The fence every write of this process passes.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Closes the fence: this process writes nothing more until it leads again.
    pub fn stop_writing(&self) {
        self.fence.close();
    }

    /// One round, bounded by `limit`: whether this process holds the Lease
    /// afterwards. A success opens the fence for the write window counted
    /// from the moment the round started; a round that finds another
    /// holder closes it.
    pub async fn try_acquire_or_renew(&self, limit: Duration) -> Result<bool, RenewError> {
        let started = Instant::now();
        let held = tokio::time::timeout(limit, self.round())
            .await
            .map_err(|_| RenewError::TimedOut(limit))?
            .map_err(RenewError::Api)?;
        if held {
            self.fence.extend(started + self.cfg.write_window());
        } else {
            self.fence.close();
        }
        Ok(held)
    }

    async fn round(&self) -> Result<bool, kube::Error> {
        let existing = self.api.get_opt(&self.cfg.name).await?;
        let result = match decide(existing.as_ref(), &self.cfg, Timestamp::now()) {
            LeaseAction::Create(lease) => self.api.create(&PostParams::default(), &lease).await,
            LeaseAction::Update(lease) => {
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
            }
            LeaseAction::Wait { .. } => return Ok(false),
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote it first (create raced, or the resourceVersion moved).
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Campaigns until this process leads (`true`) or shutdown (`false`).
    pub async fn acquire(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew(self.cfg.renew_deadline).await {
                Ok(true) => return true,
                Ok(false) if !announced => {
                    tracing::info!(lease = %self.cfg.name, "standing by: another replica leads");
                    announced = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: reading the Lease failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.retry_interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return false,
            }
        }
    }

    /// Renews until shutdown or until leadership is lost: another replica
    /// holds the Lease, or no renewal succeeded within the renew deadline
    /// (each attempt is cut off at that deadline). Call right after
    /// [`acquire`](Elector::acquire) returned `true`.
    pub async fn hold(&self, shutdown: &mut watch::Receiver<bool>) -> TermEnd {
        // The acquiring round started a moment ago; counting from now is
        // conservative only in the fence, which counts from that round.
        let mut last_renewal = Instant::now();
        loop {
            let deadline = last_renewal + self.cfg.renew_deadline;
            let next = (Instant::now() + self.cfg.retry_interval).min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = shutdown.wait_for(|stop| *stop) => return TermEnd::Shutdown,
            }
            let started = Instant::now();
            let left = deadline.saturating_duration_since(started);
            if left.is_zero() {
                // Frozen or starved past the deadline: do not even try; the
                // fence has closed already, or closes within the drain.
                tracing::warn!(
                    deadline = ?self.cfg.renew_deadline,
                    "leader election: no renewal within the renew deadline; stepping down"
                );
                return TermEnd::Lost;
            }
            match self.try_acquire_or_renew(left).await {
                Ok(true) => last_renewal = started,
                Ok(false) => {
                    tracing::warn!("leader election: another replica holds the Lease now");
                    return TermEnd::Lost;
                }
                Err(e) => tracing::warn!(error = %e, "leader election: renewing the Lease failed"),
            }
        }
    }

    /// Hands the Lease back if this process holds it. The fence closes first.
    pub async fn release(&self) -> Result<(), kube::Error> {
        self.fence.close();
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        if let Some(next) = released(&lease, &self.cfg.identity, Timestamp::now()) {
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &next)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("ts")
    }

    fn cfg(identity: &str) -> ElectionConfig {
        ElectionConfig {
            namespace: "tandem-system".into(),
            name: "tandem-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            retry_interval: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(7),
            drain_timeout: Duration::from_secs(5),
        }
    }

    fn spec(l: &LeaseAction) -> LeaseSpec {
        match l {
            LeaseAction::Create(l) | LeaseAction::Update(l) => l.spec.clone().expect("spec"),
            LeaseAction::Wait { .. } => panic!("no lease to write"),
        }
    }

    #[test]
    fn first_comer_creates_and_holds() {
        let a = decide(None, &cfg("a"), ts(100));
        assert!(matches!(a, LeaseAction::Create(_)));
        let s = spec(&a);
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_duration_seconds, Some(15));
        assert_eq!(s.renew_time.map(|t| t.0), Some(ts(100)));
    }

    #[test]
    fn holder_renews_others_wait_until_expiry_then_take_over() {
        let LeaseAction::Create(mut lease) = decide(None, &cfg("a"), ts(100)) else {
            panic!("create");
        };
        lease.metadata.resource_version = Some("7".into());
        let renew = decide(Some(&lease), &cfg("a"), ts(105));
        assert!(
            matches!(renew, LeaseAction::Update(ref l) if l.metadata.resource_version.as_deref() == Some("7"))
        );
        assert_eq!(spec(&renew).renew_time.map(|t| t.0), Some(ts(105)));
        assert_eq!(spec(&renew).acquire_time.map(|t| t.0), Some(ts(100)));

        assert_eq!(
            decide(Some(&lease), &cfg("b"), ts(114)),
            LeaseAction::Wait { holder: "a".into() }
        );
        let take = decide(Some(&lease), &cfg("b"), ts(115));
        let s = spec(&take);
        assert_eq!(s.holder_identity.as_deref(), Some("b"));
        assert_eq!(s.lease_transitions, Some(1));
        assert_eq!(s.acquire_time.map(|t| t.0), Some(ts(115)));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let LeaseAction::Create(lease) = decide(None, &cfg("a"), ts(100)) else {
            panic!("create");
        };
        assert_eq!(
            released(&lease, "b", ts(101)),
            None,
            "only the holder releases"
        );
        let free = released(&lease, "a", ts(101)).expect("released");
        let take = decide(Some(&free), &cfg("b"), ts(101));
        assert_eq!(spec(&take).holder_identity.as_deref(), Some("b"));
    }

    #[test]
    fn timings_that_let_leaders_overlap_are_refused() {
        assert_eq!(cfg("a").validate(), Ok(()));
        assert_eq!(cfg("a").write_window(), Duration::from_secs(12));
        // The old defaults: a 10 s deadline and an 8 s drain against 15 s.
        let old = ElectionConfig {
            renew_deadline: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(8),
            ..cfg("a")
        };
        let err = old.validate().expect_err("overlap").to_string();
        assert!(
            err.contains("is 18s, which is not less than --leader-lease-duration (15s)"),
            "{err}"
        );
        // Equal is not enough: the old leader could write at the very moment.
        let equal = ElectionConfig {
            drain_timeout: Duration::from_secs(8),
            ..cfg("a")
        };
        assert!(equal.validate().is_err());
        // The lease is written in whole seconds; that is what others wait for.
        let fractional = ElectionConfig {
            lease_duration: Duration::from_millis(12_900),
            ..cfg("a")
        };
        assert!(fractional.validate().is_err());
        let slow_retry = ElectionConfig {
            retry_interval: Duration::from_secs(7),
            ..cfg("a")
        };
        let err = slow_retry.validate().expect_err("retry").to_string();
        assert!(err.contains("--leader-retry-interval (7s)"), "{err}");
        let short = ElectionConfig {
            lease_duration: Duration::from_millis(500),
            ..cfg("a")
        };
        assert!(short.validate().is_err());
    }

    #[test]
    fn the_fence_opens_until_its_deadline_and_closes() {
        let t0 = Instant::now();
        assert!(Fence::open().allows(t0));
        let fence = Fence::closed();
        assert!(!fence.allows(t0), "closed until the first renewal");
        fence.extend(t0 + Duration::from_secs(12));
        let shared = fence.clone();
        assert!(shared.allows(t0 + Duration::from_secs(11)));
        assert!(
            !shared.allows(t0 + Duration::from_secs(12)),
            "a frozen leader wakes past it"
        );
        fence.close();
        assert!(!shared.allows(t0));
    }
}
