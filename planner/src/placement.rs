//! Rank placement: which LlamaNode runs each rank of a deployment, and on
//! which ports.
//!
//! # Rules
//! - One rank per node, on nodes that match the deployment's selector and are
//!   Ready. A node's free memory is its capacity minus what *other*
//!   deployments' shards hold there; a rank fits when its estimate
//!   ([`memory_per_rank`] for the deployment's [`ServingBudget`]: weights,
//!   the batch's KV cache and the prefix cache) is no more than that, so
//!   capacity is never exceeded counting every deployment.
//! - **Stable:** a current rank stays on its node, with its ports, while the
//!   node is still Ready, still matches the selector and still fits the rank.
//!   If only its ports became unusable it stays on the node with new ports.
//!   A placement that is still valid therefore comes back unchanged, and
//!   growing the world size keeps ranks `0..old` where they are. Shrinking
//!   drops ranks `new..old`.
//! - **Cordon** (`unschedulable`) works as in kubelet: a cordoned node gets no
//!   *new* rank, but ranks already on it stay. A node that is not Ready (its
//!   Lease expired) loses its ranks, which are placed again elsewhere.
//! - **New ranks** go, in rank order, to the free eligible node with the most
//!   free memory; ties go to the node whose name sorts first. Rank 0 comes
//!   first, because only it has extra needs (see ports below). If rank 0's
//!   node was lost and no free node can host it, it takes over the node of
//!   the lowest kept rank that can, and that rank moves. If keeping ranks
//!   makes the plan impossible, the planner plans from scratch instead.
//! - **Deterministic:** nodes are taken in name order and current ranks in rank
//!   order, so the plan depends on the input's content, never on its order.
//!
//! # Ports
//! Each node offers a [`PortRange`] for ranks; ports held there by other
//! deployments are in [`NodeInfo::used_ports`]. Every rank takes one *ring*
//! port (MLX's ring backend listens on it). Rank 0 also takes a *control*
//! port (its gRPC control service) and serves HTTP on the deployment's fixed
//! serving port, which therefore must not be in use on rank 0's node; the
//! serving port may lie outside the range. Ring and control ports are the
//! lowest free ports of the range.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::RangeInclusive;

use crate::error::PlanError;
use crate::model::{
    MAX_WORLD_SIZE, ModelShape, ServingBudget, check_world_size, memory_per_rank, valid_world_sizes,
};
use crate::selector::LabelSelector;

/// How a model is split across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ShardingStrategy {
    /// Tensor parallelism: every rank holds a slice of every layer.
    #[default]
    Tensor,
    /// Pipeline parallelism: reserved; the planner refuses it with `InvalidSharding`.
    Pipeline,
}

/// An inclusive range of TCP ports a node offers to ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range, included. A range with `last < first` is empty.
    pub last: u16,
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.ports().contains(&port)
    }

    /// The ports of the range, ascending.
    pub fn ports(&self) -> RangeInclusive<u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// What the deployment asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRequest {
    /// Namespace of the LlamaDeployment.
    pub namespace: String,
    /// Name of the LlamaDeployment.
    pub name: String,
    /// Number of ranks (`spec.sharding.worldSize`).
    pub world_size: u32,
    /// Sharding strategy (`spec.sharding.strategy`).
    pub strategy: ShardingStrategy,
    /// Which nodes may run ranks (`spec.placement.nodeSelector`).
    pub selector: LabelSelector,
    /// What each rank keeps for serving besides its weights: the batch's KV
    /// cache and the prefix cache; sizes the memory estimate.
    pub budget: ServingBudget,
    /// Port of rank 0's OpenAI-compatible API (`spec.serving.port`).
    pub serving_port: u16,
}

/// A LlamaNode as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeInfo {
    /// LlamaNode name. Names are unique; given duplicates, the planner keeps
    /// the one that sorts first.
    pub name: String,
    /// IP address peers use to reach the node's ranks.
    pub address: String,
    /// Labels, matched against the deployment's selector.
    pub labels: BTreeMap<String, String>,
    /// Whether the node is alive (Ready, Lease not expired).
    pub ready: bool,
    /// Cordoned: no new ranks, existing ranks stay.
    pub unschedulable: bool,
    /// Memory the node offers to ranks, in bytes (on macOS, the wired limit).
    pub capacity_bytes: u64,
    /// Memory held on this node by shards of *other* deployments.
    pub allocated_bytes: u64,
    /// Ports ranks may listen on.
    pub port_range: PortRange,
    /// Ports held on this node by *other* deployments (ring, control and serving ports).
    pub used_ports: BTreeSet<u16>,
}

impl NodeInfo {
    /// Memory not held by other deployments.
    pub fn free_bytes(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.allocated_bytes)
    }
}

/// A rank of this deployment's current placement (its current epoch's shards).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CurrentRank {
    /// Rank number, from 0.
    pub rank: u32,
    /// LlamaNode running it.
    pub node: String,
    /// Its ring port.
    pub ring_port: u16,
    /// Its control port (rank 0 only).
    pub control_port: Option<u16>,
}

/// Everything [`plan_placement`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    /// What the deployment asks for.
    pub deployment: DeploymentRequest,
    /// The model's resolved shape (see [`resolve_model`](crate::resolve_model)).
    pub shape: ModelShape,
    /// Every LlamaNode, in any order.
    pub nodes: Vec<NodeInfo>,
    /// This deployment's current ranks, in any order; empty before the first plan.
    pub current: Vec<CurrentRank>,
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RankPlacement {
    /// Rank number, from 0.
    pub rank: u32,
    /// LlamaNode running the rank.
    pub node: String,
    /// The node's IP address.
    pub address: String,
    /// Port of the rank's ring backend.
    pub ring_port: u16,
    /// Port of rank 0's gRPC control service; `None` for other ranks.
    pub control_port: Option<u16>,
}

/// `ip:port`, with brackets around IPv6 addresses.
fn endpoint(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

impl RankPlacement {
    /// `ip:port` of the ring backend, as the MLX hostfile wants it.
    pub fn ring_endpoint(&self) -> String {
        endpoint(&self.address, self.ring_port)
    }

    /// `ip:port` of the control service (rank 0 only).
    pub fn control_endpoint(&self) -> Option<String> {
        self.control_port.map(|p| endpoint(&self.address, p))
    }
}

/// A placement for every rank.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Plan {
    /// Number of ranks.
    pub world_size: u32,
    /// Memory each rank needs (see [`memory_per_rank`]); what each rank adds
    /// to its node's allocation.
    pub memory_per_rank_bytes: u64,
    /// One entry per rank, in rank order.
    pub ranks: Vec<RankPlacement>,
}

impl Plan {
    /// The plan in the form of [`PlanInput::current`], for the next round.
    pub fn as_current(&self) -> Vec<CurrentRank> {
        self.ranks
            .iter()
            .map(|p| CurrentRank {
                rank: p.rank,
                node: p.node.clone(),
                ring_port: p.ring_port,
                control_port: p.control_port,
            })
            .collect()
    }

    /// Whether `current` already is this plan (same ranks, nodes and ports),
    /// so that no new epoch is needed.
    pub fn same_placement_as(&self, current: &[CurrentRank]) -> bool {
        let mut current = current.to_vec();
        current.sort();
        current == self.as_current()
    }
}

/// Plans where each rank of a deployment runs; see the module docs for the rules.
///
/// Errors: `InvalidSharding` when the strategy is Pipeline, the shape is
/// inconsistent or the world size does not split the model;
/// `NoMatchingNodes` when too few nodes match, are ready and schedulable, or
/// have free ports; `InsufficientMemory` when too few of those have the memory.
pub fn plan_placement(input: &PlanInput) -> Result<Plan, PlanError> {
    let d = &input.deployment;
    check_sharding(d, &input.shape)?;
    let memory = memory_per_rank(&input.shape, d.world_size, d.budget).total();
    let planner = Planner::new(input, memory);
    let ranks = planner
        .assign(true)
        .or_else(|| {
            if planner.current.is_empty() {
                None
            } else {
                planner.assign(false)
            }
        })
        .ok_or_else(|| planner.diagnose())?;
    Ok(Plan {
        world_size: d.world_size,
        memory_per_rank_bytes: memory,
        ranks,
    })
}

fn join_sizes(sizes: &[u32]) -> String {
    let parts: Vec<String> = sizes.iter().map(u32::to_string).collect();
    parts.join(", ")
}

fn check_sharding(d: &DeploymentRequest, shape: &ModelShape) -> Result<(), PlanError> {
    let valid = valid_world_sizes(shape, MAX_WORLD_SIZE);
    let invalid = |message: String| PlanError::InvalidSharding {
        world_size: d.world_size,
        valid_world_sizes: valid.clone(),
        message,
    };
    if let Err(e) = shape.validate() {
        return Err(invalid(format!(
            "the model's architecture is inconsistent: {e}; fix spec.architecture"
        )));
    }
    if d.strategy == ShardingStrategy::Pipeline {
        return Err(invalid(format!(
            "sharding strategy Pipeline is reserved and not implemented; use Tensor \
             (valid world sizes: {})",
            join_sizes(&valid)
        )));
    }
    check_world_size(shape, d.world_size).map_err(|e| {
        invalid(format!(
            "world size {} does not split the model evenly: {e}; valid world sizes: {}",
            d.world_size,
            join_sizes(&valid)
        ))
    })
}

/// Bytes as GiB with one decimal, for messages.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// "1 node has" / "3 nodes have".
fn nodes_have(n: usize) -> String {
    if n == 1 {
        "1 node has".to_owned()
    } else {
        format!("{n} nodes have")
    }
}

/// "1 rank was requested" / "4 ranks were requested".
fn ranks_requested(w: u32) -> String {
    if w == 1 {
        "1 rank was requested".to_owned()
    } else {
        format!("{w} ranks were requested")
    }
}

/// "a", "a or b", "a, b, or c".
fn or_list(options: &[String]) -> String {
    match options {
        [] => String::new(),
        [one] => one.clone(),
        [first, second] => format!("{first} or {second}"),
        [rest @ .., last] => format!("{}, or {last}", rest.join(", ")),
    }
}

/// At most five items, then how many more.
fn short_list(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        text.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    text
}

/// One planning run over normalized input.
struct Planner<'a> {
    d: &'a DeploymentRequest,
    shape: &'a ModelShape,
    memory: u64,
    /// Nodes by name, one per name.
    nodes: BTreeMap<&'a str, &'a NodeInfo>,
    /// Current ranks below the world size, in rank order, at most one per
    /// rank and one per node.
    current: Vec<&'a CurrentRank>,
}

impl<'a> Planner<'a> {
    fn new(input: &'a PlanInput, memory: u64) -> Self {
        let mut sorted: Vec<&NodeInfo> = input.nodes.iter().collect();
        sorted.sort();
        let mut nodes = BTreeMap::new();
        for n in sorted {
            nodes.entry(n.name.as_str()).or_insert(n);
        }

        let mut current: Vec<&CurrentRank> = input
            .current
            .iter()
            .filter(|c| c.rank < input.deployment.world_size)
            .collect();
        current.sort();
        let mut ranks = BTreeSet::new();
        let mut hosts = BTreeSet::new();
        current.retain(|c| ranks.insert(c.rank) && hosts.insert(c.node.as_str()));

        Planner {
            d: &input.deployment,
            shape: &input.shape,
            memory,
            nodes,
            current,
        }
    }

    /// Matches the selector, is Ready and has room for a rank's memory.
    fn can_run(&self, n: &NodeInfo) -> bool {
        n.ready && self.d.selector.matches(&n.labels) && n.free_bytes() >= self.memory
    }

    /// Whether `port` is free for this deployment's rank on `n`.
    fn port_free(&self, n: &NodeInfo, port: u16, rank0: bool) -> bool {
        n.port_range.contains(port)
            && !n.used_ports.contains(&port)
            && !(rank0 && port == self.d.serving_port)
    }

    /// The lowest free ring port (and control port, for rank 0) on `n`;
    /// `None` when they are not there or rank 0 cannot serve on `n`.
    fn free_ports(&self, n: &NodeInfo, rank0: bool) -> Option<(u16, Option<u16>)> {
        if rank0 && n.used_ports.contains(&self.d.serving_port) {
            return None;
        }
        let mut free = n
            .port_range
            .ports()
            .filter(|&p| self.port_free(n, p, rank0));
        let ring = free.next()?;
        let control = if rank0 { Some(free.next()?) } else { None };
        Some((ring, control))
    }

    fn placement(&self, rank: u32, n: &NodeInfo, ports: (u16, Option<u16>)) -> RankPlacement {
        RankPlacement {
            rank,
            node: n.name.clone(),
            address: n.address.clone(),
            ring_port: ports.0,
            control_port: ports.1,
        }
    }

    /// The current rank's placement if it may stay on its node: same ports
    /// when they are still free, else new ones.
    fn keep(&self, cur: &CurrentRank) -> Option<RankPlacement> {
        let n = *self.nodes.get(cur.node.as_str())?;
        if !self.can_run(n) {
            return None;
        }
        let rank0 = cur.rank == 0;
        let same_ports = if rank0 {
            match cur.control_port {
                Some(control)
                    if control != cur.ring_port
                        && !n.used_ports.contains(&self.d.serving_port)
                        && self.port_free(n, cur.ring_port, true)
                        && self.port_free(n, control, true) =>
                {
                    Some((cur.ring_port, Some(control)))
                }
                _ => None,
            }
        } else if self.port_free(n, cur.ring_port, false) {
            Some((cur.ring_port, None))
        } else {
            None
        };
        let ports = same_ports.or_else(|| self.free_ports(n, rank0))?;
        Some(self.placement(cur.rank, n, ports))
    }

    /// Places every rank, keeping current ranks when `keep` is set. `None`
    /// when the nodes cannot hold the group.
    fn assign(&self, keep: bool) -> Option<Vec<RankPlacement>> {
        let mut placed: BTreeMap<u32, RankPlacement> = BTreeMap::new();
        if keep {
            for cur in &self.current {
                if let Some(p) = self.keep(cur) {
                    placed.insert(cur.rank, p);
                }
            }
        }
        let taken: BTreeSet<String> = placed.values().map(|p| p.node.clone()).collect();
        let mut candidates: Vec<&NodeInfo> = self
            .nodes
            .values()
            .copied()
            .filter(|n| !n.unschedulable && !taken.contains(&n.name) && self.can_run(n))
            .collect();
        candidates.sort_by(|a, b| {
            b.free_bytes()
                .cmp(&a.free_bytes())
                .then_with(|| a.name.cmp(&b.name))
        });

        if !placed.contains_key(&0) {
            let host = match candidates
                .iter()
                .position(|n| self.free_ports(n, true).is_some())
            {
                Some(i) => candidates.remove(i),
                None => {
                    // Only kept ranks sit on nodes that can serve: move the
                    // lowest of them, so that the group can have a rank 0.
                    let (&rank, p) = placed.iter().find(|(_, p)| {
                        self.nodes
                            .get(p.node.as_str())
                            .is_some_and(|n| !n.unschedulable && self.free_ports(n, true).is_some())
                    })?;
                    let n = *self.nodes.get(p.node.as_str())?;
                    placed.remove(&rank);
                    n
                }
            };
            placed.insert(0, self.placement(0, host, self.free_ports(host, true)?));
        }

        for rank in 1..self.d.world_size {
            if placed.contains_key(&rank) {
                continue;
            }
            let i = candidates
                .iter()
                .position(|n| self.free_ports(n, false).is_some())?;
            let n = candidates.remove(i);
            placed.insert(rank, self.placement(rank, n, self.free_ports(n, false)?));
        }
        Some(placed.into_values().collect())
    }

    /// World sizes that enough of `nodes` could hold, memory-wise, with the
    /// memory each rank would need.
    fn sizes_that_fit(&self, nodes: &[&NodeInfo]) -> Vec<(u32, u64)> {
        valid_world_sizes(self.shape, MAX_WORLD_SIZE)
            .into_iter()
            .filter_map(|size| {
                let need = memory_per_rank(self.shape, size, self.d.budget).total();
                let fitting = nodes.iter().filter(|n| n.free_bytes() >= need).count();
                (fitting >= size as usize).then_some((size, need))
            })
            .collect()
    }

    /// Explains why [`assign`](Self::assign) found no placement.
    fn diagnose(&self) -> PlanError {
        let w = self.d.world_size;
        let selector = &self.d.selector;
        let hosts: BTreeSet<&str> = self.current.iter().map(|c| c.node.as_str()).collect();
        let matching: Vec<&NodeInfo> = self
            .nodes
            .values()
            .copied()
            .filter(|n| selector.matches(&n.labels))
            .collect();
        let not_ready = matching.iter().filter(|n| !n.ready).count();
        let cordoned = matching
            .iter()
            .filter(|n| n.ready && n.unschedulable && !hosts.contains(n.name.as_str()))
            .count();
        let usable: Vec<&NodeInfo> = matching
            .iter()
            .copied()
            .filter(|n| n.ready && (!n.unschedulable || hosts.contains(n.name.as_str())))
            .collect();
        let fits = self.sizes_that_fit(&usable);

        if usable.len() < w as usize {
            let matched = if selector.is_empty() {
                match matching.len() {
                    0 => "no LlamaNodes are registered".to_owned(),
                    1 => "1 LlamaNode is registered".to_owned(),
                    m => format!("{m} LlamaNodes are registered"),
                }
            } else {
                match matching.len() {
                    0 => format!("no LlamaNodes match selector {selector}"),
                    1 => format!("1 node matches selector {selector}"),
                    m => format!("{m} nodes match selector {selector}"),
                }
            };
            let mut message = matched;
            if usable.len() < matching.len() {
                let mut why = Vec::new();
                if not_ready > 0 {
                    why.push(format!("{not_ready} not ready"));
                }
                if cordoned > 0 {
                    why.push(format!("{cordoned} cordoned"));
                }
                message.push_str(&format!(
                    ", of which {} ready and schedulable ({}),",
                    match usable.len() {
                        1 => "1 is".to_owned(),
                        u => format!("{u} are"),
                    },
                    why.join(", ")
                ));
            }
            message.push_str(&format!(" but {}; ", ranks_requested(w)));
            let mut options = Vec::new();
            if let Some((size, _)) = fits.last() {
                options.push(format!("scale to {size}"));
            }
            if usable.len() < matching.len() {
                options.push("uncordon or repair nodes".to_owned());
            }
            options.push(if selector.is_empty() {
                "start tandem-agent on more machines".to_owned()
            } else {
                "label more nodes".to_owned()
            });
            message.push_str(&or_list(&options));
            return PlanError::NoMatchingNodes {
                world_size: w,
                eligible_nodes: u32::try_from(usable.len()).unwrap_or(u32::MAX),
                message,
            };
        }

        let (fitting, short): (Vec<&NodeInfo>, Vec<&NodeInfo>) = usable
            .iter()
            .copied()
            .partition(|n| n.free_bytes() >= self.memory);
        if fitting.len() < w as usize {
            let mut short = short;
            short.sort_by(|a, b| {
                b.free_bytes()
                    .cmp(&a.free_bytes())
                    .then_with(|| a.name.cmp(&b.name))
            });
            let shortfalls: Vec<String> = short
                .iter()
                .map(|n| format!("node {} has {} free", n.name, gib(n.free_bytes())))
                .collect();
            let budget = self.d.budget;
            let held = if budget.cache_bytes > 0 {
                format!(
                    "weights, a {}-token KV cache for the batch and a {} prefix cache",
                    budget.kv_tokens,
                    gib(budget.cache_bytes)
                )
            } else {
                format!("weights and a {}-token KV cache", budget.kv_tokens)
            };
            let mut message = format!(
                "{} and each rank needs {} ({held}), but only {} of the {} eligible nodes \
                 have that much free ({}); ",
                ranks_requested(w),
                gib(self.memory),
                fitting.len(),
                usable.len(),
                short_list(&shortfalls)
            );
            if !fits.is_empty() {
                let options: Vec<String> = fits
                    .iter()
                    .map(|(size, need)| format!("{size} ({} per rank)", gib(*need)))
                    .collect();
                message.push_str(&format!(
                    "world sizes that would fit: {}; or ",
                    options.join(", ")
                ));
            }
            message.push_str(
                "free memory on these nodes, add nodes, or lower spec.serving.maxBatchTokens \
                 (at least spec.maxContextTokens) or spec.serving.prefixCacheBytes",
            );
            return PlanError::InsufficientMemory {
                world_size: w,
                bytes_per_rank: self.memory,
                message,
            };
        }

        // Enough nodes with enough memory: ports are what is missing.
        let serving = self.d.serving_port;
        let problems: Vec<String> = fitting
            .iter()
            .filter_map(|n| {
                if self.free_ports(n, false).is_none() {
                    Some(format!(
                        "node {} has no free port in {}",
                        n.name, n.port_range
                    ))
                } else if n.used_ports.contains(&serving) {
                    Some(format!(
                        "node {} has serving port {serving} in use, so it cannot run rank 0",
                        n.name
                    ))
                } else if self.free_ports(n, true).is_none() {
                    Some(format!(
                        "node {} has one free port in {}, and rank 0 needs two",
                        n.name, n.port_range
                    ))
                } else {
                    None
                }
            })
            .collect();
        let eligible = fitting.len() - problems.len();
        PlanError::NoMatchingNodes {
            world_size: w,
            eligible_nodes: u32::try_from(eligible).unwrap_or(u32::MAX),
            message: format!(
                "{} and {} the memory, but not the ports ranks need ({}); widen the \
                 agents' port ranges, change spec.serving.port, or label more nodes",
                ranks_requested(w),
                nodes_have(fitting.len()),
                if problems.is_empty() {
                    "one rank per node".to_owned()
                } else {
                    short_list(&problems)
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::lookup_model;
    use crate::selector::{SelectorOperator, SelectorRequirement};

    const GIB: u64 = 1 << 30;
    const CHIP: &str = "tandem.dev/chip";

    fn shape(id: &str) -> ModelShape {
        lookup_model(id).expect("bundled").shape
    }

    fn node(name: &str, free_gib: u64) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            address: format!("10.0.0.{}", name.len()),
            labels: [(CHIP.to_owned(), "apple-m3-ultra".to_owned())].into(),
            ready: true,
            unschedulable: false,
            capacity_bytes: free_gib * GIB,
            allocated_bytes: 0,
            port_range: PortRange {
                first: 40000,
                last: 40099,
            },
            used_ports: BTreeSet::new(),
        }
    }

    fn m3_selector() -> LabelSelector {
        LabelSelector {
            match_labels: [(CHIP.to_owned(), "apple-m3-ultra".to_owned())].into(),
            match_expressions: vec![],
        }
    }

    /// Llama 3.3 70B 4-bit with an 8k context: 10.7 GiB per rank at 4 ranks.
    fn input(world_size: u32, nodes: Vec<NodeInfo>) -> PlanInput {
        PlanInput {
            deployment: DeploymentRequest {
                namespace: "default".into(),
                name: "llama".into(),
                world_size,
                strategy: ShardingStrategy::Tensor,
                selector: m3_selector(),
                budget: ServingBudget {
                    kv_tokens: 8192,
                    cache_bytes: 0,
                },
                serving_port: 8080,
            },
            shape: shape("mlx-community/Llama-3.3-70B-Instruct-4bit"),
            nodes,
            current: vec![],
        }
    }

    fn nodes_of(plan: &Plan) -> Vec<&str> {
        plan.ranks.iter().map(|r| r.node.as_str()).collect()
    }

    #[test]
    fn places_one_rank_per_node_most_free_memory_first() {
        let nodes = vec![
            node("mac-a", 32),
            node("mac-b", 64),
            node("mac-c", 32),
            node("mac-d", 48),
            node("mac-e", 16),
        ];
        let plan = plan_placement(&input(4, nodes)).expect("fits");
        // 64, 48, then the two 32 GiB nodes by name.
        assert_eq!(nodes_of(&plan), ["mac-b", "mac-d", "mac-a", "mac-c"]);
        assert_eq!(plan.memory_per_rank_bytes, 11_481_661_440);
        assert_eq!(plan.ranks[0].ring_port, 40000);
        assert_eq!(plan.ranks[0].control_port, Some(40001));
        assert_eq!(plan.ranks[0].ring_endpoint(), "10.0.0.5:40000");
        assert_eq!(
            plan.ranks[0].control_endpoint().as_deref(),
            Some("10.0.0.5:40001")
        );
        assert!(plan.ranks[1..].iter().all(|r| r.ring_port == 40000));
        assert!(plan.ranks[1..].iter().all(|r| r.control_port.is_none()));
    }

    #[test]
    fn too_few_matching_nodes_suggests_a_world_size() {
        let mut other = node("pc-1", 64);
        other.labels.insert(CHIP.into(), "intel".into());
        let nodes = vec![
            node("mac-1", 64),
            node("mac-2", 64),
            node("mac-3", 64),
            other,
        ];
        let err = plan_placement(&input(4, nodes)).expect_err("3 nodes for 4 ranks");
        assert_eq!(err.reason(), "NoMatchingNodes");
        assert_eq!(
            err.message(),
            "3 nodes match selector tandem.dev/chip=apple-m3-ultra but 4 ranks were \
             requested; scale to 2 or label more nodes"
        );
    }

    #[test]
    fn not_ready_and_cordoned_nodes_are_counted_out() {
        let mut lost = node("mac-3", 64);
        lost.ready = false;
        let mut cordoned = node("mac-4", 64);
        cordoned.unschedulable = true;
        let nodes = vec![node("mac-1", 64), node("mac-2", 64), lost, cordoned];
        let err = plan_placement(&input(4, nodes)).expect_err("2 usable");
        assert_eq!(
            err.message(),
            "4 nodes match selector tandem.dev/chip=apple-m3-ultra, of which 2 are ready and \
             schedulable (1 not ready, 1 cordoned), but 4 ranks were requested; scale to 2, \
             uncordon or repair nodes, or label more nodes"
        );
    }

    #[test]
    fn no_nodes_at_all() {
        let mut i = input(1, vec![]);
        let err = plan_placement(&i).expect_err("no nodes");
        assert_eq!(
            err.message(),
            "no LlamaNodes match selector tandem.dev/chip=apple-m3-ultra but 1 rank was \
             requested; label more nodes"
        );
        i.deployment.selector = LabelSelector::default();
        let err = plan_placement(&i).expect_err("no nodes");
        assert_eq!(err.reason(), "NoMatchingNodes");
        assert!(err.message().starts_with("no LlamaNodes are registered"));
    }

    #[test]
    fn short_memory_names_the_nodes_and_what_would_fit() {
        let mut busy = node("mac-2", 24);
        busy.allocated_bytes = 16 * GIB; // 8 GiB left
        let nodes = vec![
            node("mac-1", 64),
            busy,
            node("mac-3", 64),
            node("mac-4", 64),
        ];
        let err = plan_placement(&input(4, nodes)).expect_err("mac-2 is short");
        assert_eq!(err.reason(), "InsufficientMemory");
        assert_eq!(
            err.message(),
            "4 ranks were requested and each rank needs 10.7 GiB (weights and a 8192-token KV \
             cache), but only 3 of the 4 eligible nodes have that much free (node mac-2 has \
             8.0 GiB free); world sizes that would fit: 1 (39.5 GiB per rank), 2 (20.3 GiB \
             per rank); or free memory on these nodes, add nodes, or lower \
             spec.serving.maxBatchTokens (at least spec.maxContextTokens) or \
             spec.serving.prefixCacheBytes"
        );
        let PlanError::InsufficientMemory { bytes_per_rank, .. } = err else {
            panic!("wrong variant");
        };
        assert_eq!(bytes_per_rank, 11_481_661_440);
    }

    #[test]
    fn the_batch_budget_and_the_prefix_cache_count_against_memory() {
        // 10.7 GiB per rank for one 8k request; a 32k batch adds 1.9 GiB and
        // a 512 MiB prefix cache 0.5 GiB: 13.1 GiB, more than 12 GiB nodes have.
        let nodes: Vec<NodeInfo> = (1..=4).map(|i| node(&format!("mac-{i}"), 12)).collect();
        assert!(plan_placement(&input(4, nodes.clone())).is_ok());
        let mut batched = input(4, nodes);
        batched.deployment.budget = ServingBudget::batched(8192, 32768, 512 << 20);
        let err = plan_placement(&batched).expect_err("the batch does not fit");
        assert_eq!(err.reason(), "InsufficientMemory");
        assert!(
            err.message().starts_with(
                "4 ranks were requested and each rank needs 13.1 GiB (weights, a \
                 32768-token KV cache for the batch and a 0.5 GiB prefix cache), but only 0 \
                 of the 4 eligible nodes"
            ),
            "{}",
            err.message()
        );
        let PlanError::InsufficientMemory { bytes_per_rank, .. } = err else {
            panic!("wrong variant");
        };
        assert_eq!(
            bytes_per_rank,
            memory_per_rank(&batched.shape, 4, batched.deployment.budget).total()
        );
    }

    #[test]
    fn invalid_world_size_lists_the_valid_ones() {
        let nodes = (1..=4).map(|i| node(&format!("mac-{i}"), 64)).collect();
        let err = plan_placement(&input(3, nodes)).expect_err("3 does not divide");
        assert_eq!(err.reason(), "InvalidSharding");
        assert_eq!(
            err.message(),
            "world size 3 does not split the model evenly: 64 attention heads do not divide \
             by 3; valid world sizes: 1, 2, 4, 8"
        );
        let mut zero = input(0, vec![]);
        assert_eq!(
            plan_placement(&zero).map_err(|e| e.reason()),
            Err("InvalidSharding")
        );
        zero.deployment.world_size = 2;
        zero.deployment.strategy = ShardingStrategy::Pipeline;
        let err = plan_placement(&zero).expect_err("pipeline");
        assert!(err.message().contains("Pipeline is reserved"), "{err}");
        zero.deployment.strategy = ShardingStrategy::Tensor;
        zero.shape.num_key_value_heads = 0;
        let err = plan_placement(&zero).expect_err("bad shape");
        assert_eq!(err.reason(), "InvalidSharding");
        assert!(
            err.message()
                .contains("num_key_value_heads must be positive"),
            "{err}"
        );
    }

    #[test]
    fn valid_current_placement_stays_even_if_a_better_node_appears() {
        let mut i = input(2, vec![node("mac-1", 32), node("mac-2", 32)]);
        let first = plan_placement(&i).expect("fits");
        i.current = first.as_current();
        i.nodes.push(node("mac-0", 128));
        let second = plan_placement(&i).expect("fits");
        assert_eq!(second, first);
        assert!(second.same_placement_as(&i.current));
    }

    #[test]
    fn cordon_keeps_ranks_but_takes_no_new_ones() {
        let mut i = input(
            2,
            vec![node("mac-1", 64), node("mac-2", 32), node("mac-3", 16)],
        );
        let first = plan_placement(&i).expect("fits");
        assert_eq!(nodes_of(&first), ["mac-1", "mac-2"]);
        i.current = first.as_current();
        for n in &mut i.nodes {
            n.unschedulable = n.name != "mac-3";
        }
        assert_eq!(plan_placement(&i).expect("kept"), first);
        // Growing to 4 needs two new nodes; only mac-3 is schedulable.
        i.deployment.world_size = 4;
        i.nodes.push(node("mac-4", 16));
        let grown = plan_placement(&i).expect("grows");
        assert_eq!(nodes_of(&grown), ["mac-1", "mac-2", "mac-3", "mac-4"]);
        // A fresh plan could not use the cordoned nodes.
        i.current.clear();
        assert_eq!(
            plan_placement(&i).map_err(|e| e.reason()),
            Err("NoMatchingNodes")
        );
    }

    #[test]
    fn a_lost_node_loses_its_rank() {
        let mut i = input(
            2,
            vec![node("mac-1", 64), node("mac-2", 48), node("mac-3", 32)],
        );
        let first = plan_placement(&i).expect("fits");
        i.current = first.as_current();
        i.nodes[0].ready = false;
        let second = plan_placement(&i).expect("re-placed");
        // Rank 1 stays; rank 0 moves to the only free node.
        assert_eq!(nodes_of(&second), ["mac-3", "mac-2"]);
        assert_eq!(second.ranks[1], first.ranks[1]);
        assert!(!second.same_placement_as(&i.current));
    }

    #[test]
    fn a_node_that_no_longer_matches_loses_its_rank() {
        let mut i = input(1, vec![node("mac-1", 64), node("mac-2", 48)]);
        i.current = plan_placement(&i).expect("fits").as_current();
        i.nodes[0].labels.clear();
        assert_eq!(nodes_of(&plan_placement(&i).expect("moves")), ["mac-2"]);
    }

    #[test]
    fn growing_keeps_ranks_and_shrinking_drops_the_highest() {
        let nodes: Vec<NodeInfo> = (1..=8).map(|i| node(&format!("mac-{i}"), 64)).collect();
        let mut i = input(2, nodes);
        let two = plan_placement(&i).expect("2");
        i.current = two.as_current();
        i.deployment.world_size = 8;
        let eight = plan_placement(&i).expect("8");
        assert_eq!(eight.ranks[..2], two.ranks[..]);
        i.current = eight.as_current();
        i.deployment.world_size = 4;
        let four = plan_placement(&i).expect("4");
        assert_eq!(four.ranks[..], eight.ranks[..4]);
    }

    #[test]
    fn ports_avoid_other_deployments_and_the_serving_port() {
        let mut a = node("mac-1", 64);
        a.port_range = PortRange {
            first: 8079,
            last: 8083,
        };
        a.used_ports = [8079, 8081].into();
        let plan = plan_placement(&input(1, vec![a])).expect("fits");
        // 8079 and 8081 are taken, 8080 is this deployment's serving port.
        assert_eq!(plan.ranks[0].ring_port, 8082);
        assert_eq!(plan.ranks[0].control_port, Some(8083));
    }

    #[test]
    fn rank_0_goes_where_the_serving_port_is_free() {
        let mut busy = node("mac-1", 128);
        busy.used_ports.insert(8080);
        let plan = plan_placement(&input(2, vec![busy.clone(), node("mac-2", 64)])).expect("ok");
        assert_eq!(nodes_of(&plan), ["mac-2", "mac-1"]);
        let mut also_busy = node("mac-2", 64);
        also_busy.used_ports.insert(8080);
        let err = plan_placement(&input(2, vec![busy, also_busy])).expect_err("no rank 0");
        assert_eq!(err.reason(), "NoMatchingNodes");
        assert!(
            err.message()
                .contains("node mac-1 has serving port 8080 in use, so it cannot run rank 0"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_rank_0_takes_over_a_kept_rank_that_can_serve() {
        let mut i = input(
            2,
            vec![node("mac-1", 64), node("mac-2", 48), node("mac-3", 32)],
        );
        i.nodes[2].used_ports.insert(8080); // mac-3 cannot serve
        let first = plan_placement(&i).expect("fits");
        assert_eq!(nodes_of(&first), ["mac-1", "mac-2"]);
        i.current = first.as_current();
        i.nodes[0].ready = false;
        let second = plan_placement(&i).expect("re-placed");
        assert_eq!(nodes_of(&second), ["mac-2", "mac-3"]);
    }

    #[test]
    fn exhausted_port_ranges_are_explained() {
        let mut full = node("mac-1", 64);
        full.port_range = PortRange {
            first: 40000,
            last: 40000,
        };
        full.used_ports.insert(40000);
        let err = plan_placement(&input(1, vec![full])).expect_err("no port");
        assert_eq!(
            err.message(),
            "1 rank was requested and 1 node has the memory, but not the ports ranks need \
             (node mac-1 has no free port in 40000-40000); widen the agents' port ranges, \
             change spec.serving.port, or label more nodes"
        );
    }

    #[test]
    fn current_ports_that_clash_now_are_replaced_on_the_same_node() {
        let mut i = input(2, vec![node("mac-1", 64), node("mac-2", 32)]);
        let first = plan_placement(&i).expect("fits");
        i.current = first.as_current();
        i.nodes[1].used_ports.insert(first.ranks[1].ring_port);
        let second = plan_placement(&i).expect("fits");
        assert_eq!(second.ranks[1].node, "mac-2");
        assert_eq!(second.ranks[1].ring_port, 40001);
        assert_eq!(second.ranks[0], first.ranks[0]);
    }

    #[test]
    fn expressions_select_nodes() {
        let mut i = input(1, vec![node("mac-1", 64), node("mac-2", 48)]);
        i.deployment.selector = LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![SelectorRequirement {
                key: "tandem.dev/pool".into(),
                operator: SelectorOperator::DoesNotExist,
                values: vec![],
            }],
        };
        i.nodes[0]
            .labels
            .insert("tandem.dev/pool".into(), "x".into());
        assert_eq!(nodes_of(&plan_placement(&i).expect("ok")), ["mac-2"]);
    }
}
