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
use std::str::FromStr;

use crate::error::PlanError;
use crate::model::{
    MAX_WORLD_SIZE, ModelShape, ServingBudget, check_world_size, memory_per_rank, valid_world_sizes,
};
use crate::selector::LabelSelector;
use crate::text::join_sizes;

mod assign;
mod diagnose;

use assign::Planner;

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

/// `FIRST-LAST`, as the `tandem.dev/port-range` annotation, the agent's
/// `--port-range` and the operator's default spell it: both ports above 0
/// and `FIRST <= LAST`.
impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a port range FIRST-LAST (such as 29000-29999)");
        let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
        let range = PortRange {
            first: first.trim().parse().map_err(|_| bad())?,
            last: last.trim().parse().map_err(|_| bad())?,
        };
        if range.first == 0 || range.first > range.last {
            return Err(bad());
        }
        Ok(range)
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

#[cfg(test)]
mod tests;
