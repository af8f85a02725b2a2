//! What the operator sees of the world, in the planner's terms: LlamaNodes
//! plus their Leases plus the shards of other deployments to [`NodeInfo`]s,
//! which nodes cannot run a deployment's backend, which shards live nodes
//! still hold, and the ports and memory one shard takes on its node. No I/O
//! and no clock: `now` is an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{Backend, LlamaNode, LlamaShard};
use tandem_planner::{NodeInfo, PortRange, memory_per_rank};

use crate::convert::{endpoint_port, serving_budget};
use crate::objects::shard_name;
use crate::time;

pub use tandem_crds::ANNOTATION_PORT_RANGE;

/// Memory a shard holds on its node, computed from its own spec (its resolved
/// architecture, world size, context and batch limits), so no other object is
/// needed. A shard without batch limits runs with its agent's, which the
/// operator cannot see; it is counted at the defaults the agent's flags have.
pub fn shard_memory_bytes(shard: &LlamaShard) -> u64 {
    let shape = shard.spec.architecture.shape();
    let world = u32::try_from(shard.spec.world_size).unwrap_or(1);
    let limits = shard.spec.batching.unwrap_or_default();
    let budget = serving_budget(&limits, shard.spec.max_context_tokens);
    memory_per_rank(&shape, world, budget).total()
}

/// Ports a shard holds on its node: its ring port, and for rank 0 the
/// control port and the serving port.
pub fn shard_ports(shard: &LlamaShard) -> Vec<u16> {
    let s = &shard.spec;
    let mut ports: Vec<u16> = s
        .peers
        .iter()
        .filter(|p| p.rank == s.rank)
        .filter_map(|p| endpoint_port(&p.address))
        .collect();
    if s.rank == 0 {
        ports.extend(endpoint_port(&s.control_address));
        ports.extend(s.serving_port.and_then(|p| u16::try_from(p).ok()));
    }
    ports
}

/// How the operator judges node Leases. A Lease has expired when
/// `renewTime + leaseDurationSeconds` is before `now`; but right after the
/// operator's Lease watch (re)started it cannot know whether a Lease was
/// renewed while it was not looking (say, while the API server restarted and
/// agents could not renew), so it gives every Lease one full duration from
/// `watching_since` before calling it expired, as the node lifecycle
/// controller does after its own restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClock {
    /// The current time.
    pub now: Timestamp,
    /// When the Lease watch last (re)listed.
    pub watching_since: Timestamp,
}

/// Whether a node Lease is live at `clock.now`.
pub fn lease_live(lease: &Lease, clock: &LeaseClock) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return false;
    };
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    clock.now < time::add(renewed.0, duration)
        || clock.now < time::add(clock.watching_since, duration)
}

/// Whether the agent says the node is not Ready. A node whose agent has not
/// written a Ready condition is judged by its Lease alone.
fn reported_not_ready(node: &LlamaNode) -> bool {
    node.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False")
    })
}

/// Memory, ports and GPUs one node has taken by shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUsage {
    /// Bytes held by shards.
    pub bytes: u64,
    /// Ports held by shards.
    pub ports: BTreeSet<u16>,
    /// `Nccl` shards, each holding one of the node's GPUs.
    pub gpus: u32,
}

/// What the shards of every deployment other than `(namespace, name)` hold on
/// each node. Shards being deleted still count: their agent has not let go yet.
pub fn usage_by_node<'a>(
    shards: impl IntoIterator<Item = &'a LlamaShard>,
    exclude: (&str, &str),
) -> BTreeMap<String, NodeUsage> {
    let mut usage: BTreeMap<String, NodeUsage> = BTreeMap::new();
    for shard in shards {
        let ns = shard.metadata.namespace.as_deref().unwrap_or_default();
        if ns == exclude.0 && shard.spec.deployment == exclude.1 {
            continue;
        }
        let entry = usage.entry(shard.spec.node_name.clone()).or_default();
        entry.bytes = entry.bytes.saturating_add(shard_memory_bytes(shard));
        entry.ports.extend(shard_ports(shard));
        if shard.spec.backend == Backend::Nccl {
            entry.gpus = entry.gpus.saturating_add(1);
        }
    }
    usage
}

/// Why `node` cannot run a rank of a deployment whose `spec.backend` is
/// `backend`, as a short phrase naming the node; `None` when it can.
///
/// - `Ring` runs everywhere.
/// - `Nccl` needs the agent's CUDA backend (`status.backend` is `cuda`) and a
///   GPU (`status.capacity.gpus`) not held by another deployment's `Nccl`
///   shard there (`usage`, of the other deployments): one rank per GPU.
/// - `Jaccl` needs macOS (`status.os` is `macos`).
pub fn backend_mismatch(
    backend: Backend,
    node: &LlamaNode,
    usage: Option<&NodeUsage>,
) -> Option<String> {
    let name = node.name_any();
    let status = node.status.as_ref();
    match backend {
        Backend::Ring => None,
        Backend::Jaccl => match status.and_then(|s| s.os.as_deref()) {
            Some("macos") => None,
            Some(os) => Some(format!("{name} runs {os}")),
            None => Some(format!("{name} reports no OS")),
        },
        Backend::Nccl => {
            match status.and_then(|s| s.backend.as_deref()) {
                Some("cuda") => {}
                Some(other) => return Some(format!("{name} runs {other}")),
                None => return Some(format!("{name} reports no backend")),
            }
            let gpus = status
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.gpus)
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0);
            let taken = usage.map_or(0, |u| u.gpus);
            if gpus == 0 {
                Some(format!("{name} offers no GPUs"))
            } else if taken >= gpus {
                Some(format!(
                    "{name} has all {gpus} GPU{} taken by other Nccl ranks",
                    if gpus == 1 { "" } else { "s" }
                ))
            } else {
                None
            }
        }
    }
}

/// The nodes that cannot run `backend`, by name, with why (see
/// [`backend_mismatch`]); `usage` is that of the other deployments.
pub fn backend_mismatches<'a>(
    backend: Backend,
    nodes: impl IntoIterator<Item = &'a LlamaNode>,
    usage: &BTreeMap<String, NodeUsage>,
) -> BTreeMap<String, String> {
    nodes
        .into_iter()
        .filter_map(|node| {
            let name = node.name_any();
            let why = backend_mismatch(backend, node, usage.get(&name))?;
            Some((name, why))
        })
        .collect()
}

/// What `backend` needs of a node, and what to do instead, for messages.
pub(crate) fn backend_needs(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::Ring => ("any node", "label more nodes"),
        Backend::Jaccl => (
            "macOS nodes wired together with Thunderbolt RDMA",
            "label more macOS nodes, lower spec.sharding.worldSize, or use backend Ring",
        ),
        Backend::Nccl => (
            "nodes running the agent's CUDA backend with a free GPU (one rank per GPU)",
            "run the agent with --backend cuda (and --gpus N) on more nodes, free GPUs held \
             by other Nccl deployments, lower spec.sharding.worldSize, or use backend Ring",
        ),
    }
}

/// Every LlamaNode as the planner sees it. A node is ready when its Lease in
/// `leases` (keyed by node name) is live and its agent does not report it not
/// Ready. Capacity is the wired limit when the agent reports one (macOS), else
/// the physical memory.
pub fn node_infos<'a>(
    nodes: impl IntoIterator<Item = &'a LlamaNode>,
    leases: &BTreeMap<String, &Lease>,
    usage: &BTreeMap<String, NodeUsage>,
    default_ports: PortRange,
    clock: &LeaseClock,
) -> Vec<NodeInfo> {
    nodes
        .into_iter()
        .map(|node| {
            let name = node.name_any();
            let live = leases.get(&name).is_some_and(|l| lease_live(l, clock));
            let capacity = node
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .map_or(0, |c| c.wired_limit_bytes.unwrap_or(c.memory_bytes));
            let port_range = node
                .annotations()
                .get(ANNOTATION_PORT_RANGE)
                .and_then(|r| r.parse().ok())
                .unwrap_or(default_ports);
            let used = usage.get(&name).cloned().unwrap_or_default();
            NodeInfo {
                address: node.spec.address.clone(),
                labels: node.labels().clone(),
                ready: live && !reported_not_ready(node),
                unschedulable: node.spec.unschedulable,
                capacity_bytes: u64::try_from(capacity).unwrap_or(0),
                allocated_bytes: used.bytes,
                port_range,
                used_ports: used.ports,
                name,
            }
        })
        .collect()
}

/// A shard that a live node still reports running (its agent has not
/// released it yet), from `LlamaNode.status.shards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldShard {
    /// Name of the shard.
    pub name: String,
    /// Node running it.
    pub node: String,
    /// Phase the node reports, such as `Terminating`.
    pub phase: Option<tandem_crds::ShardPhase>,
}

/// The epoch and rank in a shard name `<deployment>-e<epoch>-r<rank>`.
pub fn shard_epoch_rank(name: &str) -> Option<(i64, u32)> {
    let (rest, rank) = name.rsplit_once("-r")?;
    let (_, epoch) = rest.rsplit_once("-e")?;
    Some((epoch.parse().ok()?, rank.parse().ok()?))
}

/// The shards of deployment `namespace/deployment` that nodes in `live`
/// report running. A name belongs to the deployment when it is exactly the
/// name the operator gives that deployment's shard of the same epoch and rank.
pub fn held_shards<'a>(
    nodes: impl IntoIterator<Item = &'a LlamaNode>,
    live: &BTreeSet<String>,
    namespace: &str,
    deployment: &str,
) -> Vec<HeldShard> {
    let mut out = Vec::new();
    for node in nodes {
        let node_name = node.name_any();
        if !live.contains(&node_name) {
            continue;
        }
        for entry in node.status.iter().flat_map(|s| s.shards.iter()) {
            let ours = entry.namespace == namespace
                && shard_epoch_rank(&entry.name)
                    .is_some_and(|(e, r)| shard_name(deployment, e, r) == entry.name);
            if ours {
                out.push(HeldShard {
                    name: entry.name.clone(),
                    node: node_name.clone(),
                    phase: entry.phase,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::current_ranks;
    use crate::fixtures::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
    use tandem_crds::BatchLimits;
    use tandem_planner::ServingBudget;

    use tandem_planner::lookup_model;

    #[test]
    fn held_shards_are_those_live_nodes_still_report() {
        use tandem_crds::{NodeShard, ShardPhase};
        let entry = |ns: &str, name: &str| NodeShard {
            namespace: ns.into(),
            name: name.into(),
            rank: 0,
            epoch: 1,
            phase: Some(ShardPhase::Terminating),
            memory_bytes: 0,
        };
        let mut a = node("a", "10.0.0.1", 8);
        let mut b = node("b", "10.0.0.2", 8);
        if let Some(s) = a.status.as_mut() {
            s.shards = vec![
                entry("ns", "llama-e3-r0"),
                entry("ns", "llama-2-e1-r0"),
                entry("other", "llama-e3-r1"),
            ];
        }
        if let Some(s) = b.status.as_mut() {
            s.shards = vec![entry("ns", "llama-e3-r1")];
        }
        let live: BTreeSet<String> = ["a".to_owned()].into();
        let held = held_shards([&a, &b], &live, "ns", "llama");
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].name, "llama-e3-r0");
        assert_eq!(held[0].node, "a");
        assert_eq!(shard_epoch_rank("x-y-e12-r3"), Some((12, 3)));
        assert_eq!(shard_epoch_rank("nope"), None);
        let long = "d".repeat(250);
        let name = shard_name(&long, 4, 1);
        assert_eq!(shard_epoch_rank(&name), Some((4, 1)));
    }

    #[test]
    fn leases_expire_after_their_duration_with_a_grace_after_a_relist() {
        let l = lease("n1", ts(1000), 10);
        let watching = |now, since| LeaseClock {
            now: ts(now),
            watching_since: ts(since),
        };
        assert!(lease_live(&l, &watching(1005, 0)));
        assert!(lease_live(&l, &watching(1009, 0)));
        assert!(!lease_live(&l, &watching(1010, 0)));
        // The watch re-listed at 1008: the agent gets until 1018 to renew.
        assert!(lease_live(&l, &watching(1015, 1008)));
        assert!(!lease_live(&l, &watching(1018, 1008)));
        let mut never = l.clone();
        if let Some(spec) = never.spec.as_mut() {
            spec.renew_time = None;
        }
        assert!(!lease_live(&never, &watching(1000, 1000)));
    }

    #[test]
    fn shards_report_their_memory_and_ports() {
        let s0 = shard("a", "n1", "10.0.0.1:47000", 0, 2);
        let s1 = shard("a", "n2", "10.0.0.2:47003", 1, 2);
        assert_eq!(shard_ports(&s0), vec![47000, 47001, 8080]);
        assert_eq!(shard_ports(&s1), vec![47003]);
        let shape = lookup_model(MODEL_1B).expect("1b").shape;
        let batch = ServingBudget::batched(8192, 32768, 512 << 20);
        assert_eq!(
            shard_memory_bytes(&s1),
            memory_per_rank(&shape, 2, batch).total()
        );
        // Limits of the shard's own: a bigger batch, no prefix cache.
        let mut big = s1.clone();
        big.spec.batching = Some(BatchLimits {
            max_tokens: 65536,
            prefix_cache_bytes: 0,
            ..BatchLimits::default()
        });
        let budget = ServingBudget::batched(8192, 65536, 0);
        assert_eq!(
            shard_memory_bytes(&big),
            memory_per_rank(&shape, 2, budget).total()
        );
        // None: the agent's defaults.
        big.spec.batching = None;
        assert_eq!(shard_memory_bytes(&big), shard_memory_bytes(&s1));
        let current = current_ranks(&[&s0, &s1]);
        assert_eq!(current[0].control_port, Some(47001));
        assert_eq!(current[1].ring_port, 47003);
        assert_eq!(current[1].control_port, None);
    }

    #[test]
    fn node_infos_join_nodes_leases_and_other_deployments_usage() {
        let mut cordoned = node("n2", "10.0.0.2", 32);
        cordoned.spec.unschedulable = true;
        cordoned
            .annotations_mut()
            .insert(ANNOTATION_PORT_RANGE.into(), "41000-41009".into());
        let mut wired = node("n3", "10.0.0.3", 64);
        if let Some(c) = wired.status.as_mut().and_then(|s| s.capacity.as_mut()) {
            c.wired_limit_bytes = Some(48 * GIB);
        }
        let mut sick = node("n4", "10.0.0.4", 64);
        if let Some(s) = sick.status.as_mut() {
            s.conditions.push(metav1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "AgentStopping".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: metav1::Time(ts(0)),
            });
        }
        let nodes = [node("n1", "10.0.0.1", 64), cordoned, wired, sick];
        let l1 = lease("n1", ts(1000), 10);
        let l2 = lease("n2", ts(1000), 10);
        let l3 = lease("n3", ts(900), 10);
        let l4 = lease("n4", ts(1000), 10);
        let leases: BTreeMap<String, &Lease> = [
            ("n1".to_owned(), &l1),
            ("n2".to_owned(), &l2),
            ("n3".to_owned(), &l3),
            ("n4".to_owned(), &l4),
        ]
        .into();
        let other = shard("b", "n1", "10.0.0.1:47000", 0, 1);
        let own = shard("a", "n1", "10.0.0.1:47005", 1, 2);
        let usage = usage_by_node([&other, &own], ("ns", "a"));
        let clock = LeaseClock {
            now: ts(1005),
            watching_since: ts(0),
        };
        let default_ports = PortRange {
            first: 47000,
            last: 47999,
        };
        let infos = node_infos(&nodes, &leases, &usage, default_ports, &clock);
        let by_name: BTreeMap<&str, &NodeInfo> =
            infos.iter().map(|n| (n.name.as_str(), n)).collect();
        let n1 = by_name["n1"];
        assert!(n1.ready);
        assert_eq!(n1.allocated_bytes, shard_memory_bytes(&other));
        assert_eq!(n1.used_ports, [47000, 47001, 8080].into());
        assert_eq!(n1.port_range, default_ports);
        assert!(by_name["n2"].unschedulable);
        assert_eq!(by_name["n2"].port_range.first, 41000);
        assert!(!by_name["n3"].ready, "lease expired");
        assert_eq!(by_name["n3"].capacity_bytes, 48 << 30);
        assert!(!by_name["n4"].ready, "agent reports not Ready");
    }

    #[test]
    fn nccl_needs_cuda_and_a_free_gpu_jaccl_needs_macos() {
        let cpu = node("cpu-1", "10.0.0.1", 64);
        let none = cuda_node("gpu-0", "10.0.0.2", 64, 0);
        let two = cuda_node("gpu-2", "10.0.0.3", 64, 2);
        let mut mac = node("mac-1", "10.0.0.4", 64);
        if let Some(s) = mac.status.as_mut() {
            s.os = Some("macos".into());
            s.backend = Some("metal".into());
        }
        let mut unknown = node("old-1", "10.0.0.5", 64);
        unknown.status = None;

        for n in [&cpu, &none, &two, &mac, &unknown] {
            assert_eq!(backend_mismatch(Backend::Ring, n, None), None);
        }
        assert_eq!(
            backend_mismatch(Backend::Nccl, &cpu, None).as_deref(),
            Some("cpu-1 runs cpu")
        );
        assert_eq!(
            backend_mismatch(Backend::Nccl, &mac, None).as_deref(),
            Some("mac-1 runs metal")
        );
        assert_eq!(
            backend_mismatch(Backend::Nccl, &unknown, None).as_deref(),
            Some("old-1 reports no backend")
        );
        assert_eq!(
            backend_mismatch(Backend::Nccl, &none, None).as_deref(),
            Some("gpu-0 offers no GPUs")
        );
        assert_eq!(backend_mismatch(Backend::Nccl, &two, None), None);

        // Other deployments' Nccl shards hold GPUs; Ring shards hold none.
        let nccl = |deployment: &str, rank: i32| {
            let mut s = shard(deployment, "gpu-2", "10.0.0.3:47000", rank, 2);
            s.spec.backend = Backend::Nccl;
            s
        };
        let ring = shard("ring", "gpu-2", "10.0.0.3:47010", 0, 1);
        let (b0, b1, own) = (nccl("b", 0), nccl("c", 1), nccl("a", 1));
        let usage = usage_by_node([&b0, &ring, &own], ("ns", "a"));
        assert_eq!(usage["gpu-2"].gpus, 1);
        assert_eq!(
            backend_mismatch(Backend::Nccl, &two, usage.get("gpu-2")),
            None
        );
        let usage = usage_by_node([&b0, &b1, &ring, &own], ("ns", "a"));
        assert_eq!(usage["gpu-2"].gpus, 2);
        assert_eq!(
            backend_mismatch(Backend::Nccl, &two, usage.get("gpu-2")).as_deref(),
            Some("gpu-2 has all 2 GPUs taken by other Nccl ranks")
        );

        assert_eq!(
            backend_mismatch(Backend::Jaccl, &cpu, None).as_deref(),
            Some("cpu-1 runs linux")
        );
        assert_eq!(backend_mismatch(Backend::Jaccl, &mac, None), None);
        let all = [cpu, none, two, mac, unknown];
        let mismatched = backend_mismatches(Backend::Nccl, &all, &BTreeMap::new());
        assert_eq!(
            mismatched.keys().map(String::as_str).collect::<Vec<_>>(),
            ["cpu-1", "gpu-0", "mac-1", "old-1"]
        );
        assert!(backend_mismatches(Backend::Ring, &all, &BTreeMap::new()).is_empty());
    }
}
