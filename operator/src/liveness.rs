//! Node liveness as reconcile triggers. A Lease that stops being renewed
//! produces no watch event when it expires, so a ticker recomputes which
//! nodes are live and, for each node that changed, asks the controller to
//! reconcile the deployments it concerns: those with shards on it, and (when
//! a node comes up) those still waiting for nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tandem_crds::{LlamaDeployment, LlamaNode, LlamaShard};
use tokio::sync::{mpsc, watch};

use crate::conditions::{self, PLACED};
use crate::observe::{LeaseClock, lease_live};

/// When the node-Lease watch last (re)listed; see [`LeaseClock`].
#[derive(Debug)]
pub struct LeaseWatch {
    since: Mutex<Timestamp>,
}

impl LeaseWatch {
    /// A watch that started at `now`.
    pub fn new(now: Timestamp) -> Self {
        LeaseWatch {
            since: Mutex::new(now),
        }
    }

    /// Records a (re)list at `now`.
    pub fn relisted(&self, now: Timestamp) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// The clock to judge Leases with at `now`.
    pub fn clock(&self, now: Timestamp) -> LeaseClock {
        LeaseClock {
            now,
            watching_since: *self.since.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// Names of the nodes whose Lease is live.
pub fn live_nodes(
    nodes: &[Arc<LlamaNode>],
    leases: &[Arc<Lease>],
    clock: &LeaseClock,
) -> BTreeSet<String> {
    let by_name: BTreeMap<String, &Lease> =
        leases.iter().map(|l| (l.name_any(), l.as_ref())).collect();
    nodes
        .iter()
        .map(|n| n.name_any())
        .filter(|name| by_name.get(name).is_some_and(|l| lease_live(l, clock)))
        .collect()
}

/// Deployments a change of `node` concerns: those with a shard on it, and, if
/// the node may now take ranks (`may_take_ranks`), those not yet placed.
pub fn affected_deployments(
    node: &str,
    may_take_ranks: bool,
    shards: &[Arc<LlamaShard>],
    deployments: &[Arc<LlamaDeployment>],
) -> Vec<ObjectRef<LlamaDeployment>> {
    let mut out: BTreeSet<(String, String)> = shards
        .iter()
        .filter(|s| s.spec.node_name == node)
        .map(|s| (s.namespace().unwrap_or_default(), s.spec.deployment.clone()))
        .collect();
    if may_take_ranks {
        out.extend(
            deployments
                .iter()
                .filter(|d| {
                    !d.status
                        .as_ref()
                        .is_some_and(|s| conditions::is_true(&s.conditions, PLACED))
                })
                .map(|d| (d.namespace().unwrap_or_default(), d.name_any())),
        );
    }
    out.into_iter()
        .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
        .collect()
}

/// The stores the liveness ticker reads.
#[derive(Debug, Clone)]
pub struct Watched {
    /// LlamaNodes.
    pub nodes: Store<LlamaNode>,
    /// Node Leases.
    pub leases: Store<Lease>,
    /// LlamaShards.
    pub shards: Store<LlamaShard>,
    /// LlamaDeployments.
    pub deployments: Store<LlamaDeployment>,
}

/// Once the caches are filled, every `tick`, sends the deployments concerned
/// by nodes whose liveness flipped since the last tick. Stops at shutdown or
/// when the receiver is gone.
pub async fn run(
    watched: Watched,
    lease_watch: Arc<LeaseWatch>,
    tick: Duration,
    tx: mpsc::UnboundedSender<ObjectRef<LlamaDeployment>>,
    mut caches_ready: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        ready = caches_ready.wait_for(|r| *r) => if ready.is_err() { return },
        _ = shutdown.wait_for(|stop| *stop) => return,
    }
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<BTreeSet<String>> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let clock = lease_watch.clock(Timestamp::now());
        let live = live_nodes(&watched.nodes.state(), &watched.leases.state(), &clock);
        if let Some(prev) = &last {
            let flipped: Vec<(&String, bool)> = live
                .symmetric_difference(prev)
                .map(|n| (n, live.contains(n)))
                .collect();
            if !flipped.is_empty() {
                let shards = watched.shards.state();
                let deployments = watched.deployments.state();
                for (node, up) in flipped {
                    tracing::info!(node = %node, live = up, "node liveness changed");
                    for r in affected_deployments(node, up, &shards, &deployments) {
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        last = Some(live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{MODEL_1B, deployment, lease, node, shard, ts};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use tandem_crds::LlamaDeploymentStatus;

    #[test]
    fn live_nodes_follow_leases() {
        let nodes = vec![
            Arc::new(node("a", "10.0.0.1", 8)),
            Arc::new(node("b", "10.0.0.2", 8)),
            Arc::new(node("c", "10.0.0.3", 8)),
        ];
        let leases = vec![
            Arc::new(lease("a", ts(100), 10)),
            Arc::new(lease("b", ts(50), 10)),
        ];
        let watch = LeaseWatch::new(ts(0));
        let live = live_nodes(&nodes, &leases, &watch.clock(ts(105)));
        assert_eq!(live, ["a".to_owned()].into());
        watch.relisted(ts(100));
        let live = live_nodes(&nodes, &leases, &watch.clock(ts(105)));
        assert_eq!(
            live,
            ["a".to_owned(), "b".to_owned()].into(),
            "grace after a relist"
        );
    }

    #[test]
    fn a_node_change_concerns_its_deployments_and_the_unplaced_ones() {
        let shards = vec![
            Arc::new(shard("on-a", "a", "10.0.0.1:47000", 0, 1)),
            Arc::new(shard("on-b", "b", "10.0.0.2:47000", 0, 1)),
        ];
        let mut placed = deployment("on-b", MODEL_1B, 1);
        placed.status = Some(LlamaDeploymentStatus {
            conditions: vec![Condition {
                type_: PLACED.into(),
                status: "True".into(),
                reason: "Placed".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(ts(0)),
            }],
            ..Default::default()
        });
        let waiting = deployment("waiting", MODEL_1B, 1);
        let deployments = vec![Arc::new(placed), Arc::new(waiting)];
        let names = |refs: Vec<ObjectRef<LlamaDeployment>>| -> Vec<String> {
            refs.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(
            names(affected_deployments("a", false, &shards, &deployments)),
            ["on-a"]
        );
        assert_eq!(
            names(affected_deployments("a", true, &shards, &deployments)),
            ["on-a", "waiting"]
        );
    }
}
