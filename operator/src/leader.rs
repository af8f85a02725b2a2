//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it:
//! read the Lease, and create it, renew it, or take it over once it has
//! expired, always writing with the `resourceVersion` that was read, so that
//! of two replicas racing for it exactly one wins (the other gets a 409).
//!
//! A leader that cannot renew within the renew deadline (two thirds of the
//! lease duration) stops acting before any other replica may take over. On
//! shutdown it releases the Lease (empty holder), so a standby takes over at
//! once instead of waiting for it to expire.

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
}

impl ElectionConfig {
    /// How long a leader keeps acting without a successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
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
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
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
    /// An elector for the Lease `cfg` names.
    pub fn new(client: kube::Client, cfg: ElectionConfig) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Elector { api, cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    /// One round: whether this process holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
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
            match self.try_acquire_or_renew().await {
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

    /// Renews until shutdown or until leadership is lost.
    pub async fn hold(&self, shutdown: &mut watch::Receiver<bool>) -> TermEnd {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.retry_interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return TermEnd::Shutdown,
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    tracing::warn!("leader election: another replica holds the Lease now");
                    return TermEnd::Lost;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renewing the Lease failed");
                    if last_renewal.elapsed() >= self.cfg.renew_deadline() {
                        return TermEnd::Lost;
                    }
                }
            }
        }
    }

    /// Hands the Lease back if this process holds it.
    pub async fn release(&self) -> Result<(), kube::Error> {
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
        assert_eq!(cfg("a").renew_deadline(), Duration::from_secs(10));
    }
}
