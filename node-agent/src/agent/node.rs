//! This node's LlamaNode and Lease.
//!
//! - [`Registration`]: creates and keeps up to date the LlamaNode (labels,
//!   the port-range annotation and the address, by server-side apply, so
//!   labels an admin added and `spec.unschedulable` stay theirs), and its
//!   status: capacity, chip, versions, the Ready condition and the shards
//!   this node runs.
//! - [`renew_lease`]: the `coordination.k8s.io/v1` Lease named after the
//!   node, renewed like a kubelet's node Lease.
//! - [`NodeShards`]: the shard list the status reports, shared with the
//!   shard runners.
//!
//! `lastTransitionTime` of Ready changes only when its status flips; that
//! is decided by [`ready_condition`], a pure function of the old condition
//! and the clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tandem_crds::{LlamaNode, NodeShard};
use tokio::sync::watch;

use super::config::AgentConfig;
use super::hardware::{AGENT_VERSION, Hardware};

/// Field manager of everything the agent writes.
pub const MANAGER: &str = "tandem-agent";
pub use tandem_crds::ANNOTATION_PORT_RANGE;
/// The node condition the agent keeps.
pub const READY: &str = "Ready";

/// The shards this node runs, as its status reports them; every change
/// wakes the status writer.
#[derive(Debug, Clone)]
pub struct NodeShards {
    entries: Arc<Mutex<BTreeMap<(String, String), NodeShard>>>,
    changed: watch::Sender<u64>,
}

impl Default for NodeShards {
    fn default() -> Self {
        NodeShards {
            entries: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl NodeShards {
    /// Adds or replaces a shard's entry.
    pub fn set(&self, entry: NodeShard) {
        let key = (entry.namespace.clone(), entry.name.clone());
        let changed = {
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.insert(key, entry.clone()) != Some(entry)
        };
        if changed {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Removes a shard's entry (it is released).
    pub fn remove(&self, namespace: &str, name: &str) {
        let removed = {
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&(namespace.to_owned(), name.to_owned()))
                .is_some()
        };
        if removed {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Every entry, in namespace and name order.
    pub fn list(&self) -> Vec<NodeShard> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The Ready condition for `ready`, keeping `lastTransitionTime` from
/// `previous` unless the status flips.
pub fn ready_condition(
    previous: Option<&Condition>,
    ready: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Registers the LlamaNode and writes its status.
#[derive(Debug, Clone)]
pub struct Registration {
    api: Api<LlamaNode>,
    config: Arc<AgentConfig>,
    hardware: Hardware,
}

impl Registration {
    /// A registration for this node.
    pub fn new(client: kube::Client, config: Arc<AgentConfig>, hardware: Hardware) -> Registration {
        Registration {
            api: Api::all(client),
            config,
            hardware,
        }
    }

    /// The machine as detected.
    pub fn hardware(&self) -> &Hardware {
        &self.hardware
    }

    /// Creates the LlamaNode or brings its labels, annotation and address
    /// up to date.
    pub async fn register(&self) -> Result<(), kube::Error> {
        let labels = self.hardware.labels(&self.config.labels);
        let body = json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "LlamaNode",
            "metadata": {
                "name": self.config.node_name,
                "labels": labels,
                "annotations": {ANNOTATION_PORT_RANGE: self.config.port_range.to_string()},
            },
            "spec": {"address": self.config.advertise_address.to_string()},
        });
        self.api
            .patch(
                &self.config.node_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        Ok(())
    }

    /// Writes the status: hardware, versions, Ready and the shards.
    pub async fn write_status(
        &self,
        ready: bool,
        reason: &str,
        message: &str,
        shards: &[NodeShard],
    ) -> Result<(), kube::Error> {
        let current = self.api.get_opt(&self.config.node_name).await?;
        let previous = current
            .as_ref()
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
        let generation = current.as_ref().and_then(|n| n.metadata.generation);
        let condition = ready_condition(
            previous,
            ready,
            reason,
            message,
            generation,
            Timestamp::now(),
        );
        let allocated: i64 = shards.iter().map(|s| s.memory_bytes).sum();
        let hw = &self.hardware;
        let body = json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "LlamaNode",
            "status": {
                "capacity": hw.capacity(),
                "allocatedBytes": allocated,
                "chip": hw.chip_label(),
                "os": hw.os,
                "backend": hw.backend.as_str(),
                "mlxVersion": hw.mlx_version,
                "agentVersion": AGENT_VERSION,
                "conditions": [condition],
                "shards": shards,
            },
        });
        self.api
            .patch_status(
                &self.config.node_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        Ok(())
    }
}

fn lease_spec(
    holder: &str,
    duration: Duration,
    acquired: Option<MicroTime>,
    now: Timestamp,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(holder.to_owned()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(0),
        ..LeaseSpec::default()
    }
}

/// Renews the node Lease once: creates it, or updates renewTime (taking
/// it over, with a transition counted, if another holder had it).
pub async fn renew_once(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    duration: Duration,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(lease_spec(holder, duration, None, now)),
            };
            api.create(&PostParams::default(), &lease).await?;
        }
        Some(mut lease) => {
            let old = lease.spec.take().unwrap_or_default();
            let same_holder = old.holder_identity.as_deref() == Some(holder);
            let mut spec = lease_spec(
                holder,
                duration,
                if same_holder {
                    old.acquire_time.clone()
                } else {
                    None
                },
                now,
            );
            let transitions = old.lease_transitions.unwrap_or(0);
            spec.lease_transitions = Some(if same_holder {
                transitions
            } else {
                transitions + 1
            });
            lease.spec = Some(spec);
            // The resourceVersion makes this a compare-and-swap.
            api.replace(name, &PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Renews the Lease every `interval` until `shutdown` turns true. Records
/// the time of the last success in `last_renewed` for /healthz.
pub async fn renew_lease(
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
    interval: Duration,
    last_renewed: Arc<Mutex<Option<std::time::Instant>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match renew_once(&api, &name, &holder, duration).await {
            Ok(()) => {
                *last_renewed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(std::time::Instant::now());
            }
            Err(e) => tracing::warn!(lease = %name, error = %e, "renewing the node Lease failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = super::until_true(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("timestamp")
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first = ready_condition(None, true, "AgentReady", "up", Some(1), ts(100));
        assert_eq!(first.last_transition_time, Time(ts(100)));
        let same = ready_condition(
            Some(&first),
            true,
            "AgentReady",
            "still up",
            Some(1),
            ts(200),
        );
        assert_eq!(same.last_transition_time, Time(ts(100)));
        assert_eq!(same.message, "still up");
        let flipped = ready_condition(Some(&same), false, "AgentStopped", "down", Some(1), ts(300));
        assert_eq!(flipped.last_transition_time, Time(ts(300)));
        assert_eq!(flipped.status, "False");
    }

    #[test]
    fn node_shards_notify_on_change_only() {
        let shards = NodeShards::default();
        let rx = shards.subscribe();
        let entry = NodeShard {
            namespace: "ns".into(),
            name: "llama-e1-r0".into(),
            rank: 0,
            epoch: 1,
            phase: None,
            memory_bytes: 5,
        };
        shards.set(entry.clone());
        assert!(rx.has_changed().expect("open"));
        let version = *rx.borrow();
        shards.set(entry);
        assert_eq!(*rx.borrow(), version, "an identical entry is no change");
        shards.remove("ns", "llama-e1-r0");
        assert!(shards.list().is_empty());
    }
}
