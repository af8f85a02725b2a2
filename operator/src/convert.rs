//! From API objects to the planner's plain inputs: a deployment's spec to a
//! [`DeploymentRequest`] and a [`ModelShape`], LlamaNodes plus their Leases
//! plus the shards of other deployments to [`NodeInfo`]s, and a deployment's
//! own shards to [`CurrentRank`]s. No I/O and no clock: `now` is an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{
    Architecture, Backend, BatchLimits, LlamaDeployment, LlamaNode, LlamaShard,
    Quantization as CrdQuantization, ShardingStrategy as CrdStrategy, WeightDtype as CrdDtype,
    default_serving_port,
};
use tandem_planner::{
    CurrentRank, DeploymentRequest, LabelSelector, ModelShape, NodeInfo, PlanError, PortRange,
    Quantization, SelectorOperator, SelectorRequirement, ServingBudget, ShardingStrategy,
    WeightDtype, memory_per_rank, resolve_model,
};

use crate::objects::shard_name;
use crate::time;

pub use tandem_crds::ANNOTATION_PORT_RANGE;

/// Why a deployment's spec cannot be planned at all, before any node is
/// looked at, or why no node fits. Each has a CamelCase reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// The planner's verdict: `InvalidSharding`, `UnknownModel`,
    /// `NoMatchingNodes` or `InsufficientMemory`.
    Plan(PlanError),
    /// `spec.placement.nodeSelector` uses an operator Kubernetes does not have.
    InvalidSelector(String),
    /// `spec.serving`'s batch limits cannot work together with the rest of
    /// the spec (see [`batch_limits`]): `InvalidServing`.
    InvalidServing(String),
    /// Too few of the matching nodes can run `spec.backend` (see
    /// [`backend_mismatch`]): `BackendUnavailable`.
    BackendUnavailable(String),
}

impl Blocker {
    /// The condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::Plan(e) => e.reason(),
            Blocker::InvalidSelector(_) => "InvalidSelector",
            Blocker::InvalidServing(_) => "InvalidServing",
            Blocker::BackendUnavailable(_) => "BackendUnavailable",
        }
    }

    /// What is wrong and what would work.
    pub fn message(&self) -> String {
        match self {
            Blocker::Plan(e) => e.message().to_owned(),
            Blocker::InvalidSelector(m)
            | Blocker::InvalidServing(m)
            | Blocker::BackendUnavailable(m) => m.clone(),
        }
    }

    /// Whether only a change of the spec can lift it (as opposed to nodes
    /// coming, going or freeing memory).
    pub fn is_spec_error(&self) -> bool {
        match self {
            Blocker::Plan(PlanError::InvalidSharding { .. } | PlanError::UnknownModel { .. }) => {
                true
            }
            Blocker::Plan(_) | Blocker::BackendUnavailable(_) => false,
            Blocker::InvalidSelector(_) | Blocker::InvalidServing(_) => true,
        }
    }
}

/// The planner's shape of a model given by `spec.architecture`.
pub fn shape_from_architecture(a: &Architecture) -> ModelShape {
    ModelShape {
        num_hidden_layers: a.num_hidden_layers,
        hidden_size: a.hidden_size,
        num_attention_heads: a.num_attention_heads,
        num_key_value_heads: a.num_key_value_heads,
        intermediate_size: a.intermediate_size,
        vocab_size: a.vocab_size,
        head_dim: a.head_dim,
        tie_word_embeddings: a.tie_word_embeddings,
        quantization: a.quantization.map(|q| Quantization {
            bits: q.bits,
            group_size: q.group_size,
        }),
        dtype: match a.dtype {
            CrdDtype::BFloat16 => WeightDtype::BFloat16,
            CrdDtype::Float16 => WeightDtype::Float16,
            CrdDtype::Float32 => WeightDtype::Float32,
        },
    }
}

/// The resolved architecture written into every shard, so that agents and the
/// planner agree on the same numbers.
pub fn architecture_from_shape(s: &ModelShape) -> Architecture {
    Architecture {
        num_hidden_layers: s.num_hidden_layers,
        hidden_size: s.hidden_size,
        num_attention_heads: s.num_attention_heads,
        num_key_value_heads: s.num_key_value_heads,
        intermediate_size: s.intermediate_size,
        vocab_size: s.vocab_size,
        head_dim: s.head_dim,
        tie_word_embeddings: s.tie_word_embeddings,
        quantization: s.quantization.map(|q| CrdQuantization {
            bits: q.bits,
            group_size: q.group_size,
        }),
        dtype: match s.dtype {
            WeightDtype::BFloat16 => CrdDtype::BFloat16,
            WeightDtype::Float16 => CrdDtype::Float16,
            WeightDtype::Float32 => CrdDtype::Float32,
        },
    }
}

/// The deployment's model shape: `spec.architecture`, else the catalog.
pub fn resolve_shape(d: &LlamaDeployment) -> Result<ModelShape, Blocker> {
    let from_spec = d.spec.architecture.as_ref().map(shape_from_architecture);
    resolve_model(&d.spec.model, from_spec.as_ref()).map_err(Blocker::Plan)
}

/// A `metav1.LabelSelector` in the planner's form. Operators other than the
/// four Kubernetes defines are refused rather than guessed at.
pub fn selector(sel: Option<&metav1::LabelSelector>) -> Result<LabelSelector, Blocker> {
    let Some(sel) = sel else {
        return Ok(LabelSelector::default());
    };
    let mut out = LabelSelector {
        match_labels: sel.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for req in sel.match_expressions.iter().flatten() {
        let operator = match req.operator.as_str() {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => {
                return Err(Blocker::InvalidSelector(format!(
                    "spec.placement.nodeSelector: unknown operator {other:?} for key {:?}; \
                     use In, NotIn, Exists or DoesNotExist",
                    req.key
                )));
            }
        };
        out.match_expressions.push(SelectorRequirement {
            key: req.key.clone(),
            operator,
            values: req.values.clone().unwrap_or_default(),
        });
    }
    Ok(out)
}

/// `spec.serving.port`, defaulted, as a port number (0 when out of range,
/// which the schema already prevents).
pub fn serving_port(d: &LlamaDeployment) -> u16 {
    let port = d
        .spec
        .serving
        .as_ref()
        .map_or_else(default_serving_port, |s| s.port);
    u16::try_from(port).unwrap_or(0)
}

/// The batch limits the deployment's shards get
/// ([`LlamaDeploymentSpec::batch_limits`](tandem_crds::LlamaDeploymentSpec::batch_limits)),
/// checked. The schema bounds each field on its own (an API server with an
/// older CRD may not, so the bounds are checked again); what it cannot check
/// is that the batch's token budget holds one request of the longest
/// context. Each refusal says what would work.
pub fn batch_limits(d: &LlamaDeployment) -> Result<BatchLimits, Blocker> {
    let limits = d.spec.batch_limits();
    let invalid = |m: String| Err(Blocker::InvalidServing(m));
    if !(1..=256).contains(&limits.max_sequences) {
        return invalid(format!(
            "spec.serving.maxBatchSequences is {}; use 1 to 256 (the default is {})",
            limits.max_sequences,
            BatchLimits::DEFAULT_MAX_SEQUENCES
        ));
    }
    if limits.prefill_chunk_tokens < 16 {
        return invalid(format!(
            "spec.serving.prefillChunkTokens is {}; use at least 16 (the default is {})",
            limits.prefill_chunk_tokens,
            BatchLimits::DEFAULT_PREFILL_CHUNK_TOKENS
        ));
    }
    if limits.prefix_cache_bytes < 0 {
        return invalid(format!(
            "spec.serving.prefixCacheBytes is {}; use 0 (no prefix cache) or more bytes \
             (the default is {})",
            limits.prefix_cache_bytes,
            BatchLimits::DEFAULT_PREFIX_CACHE_BYTES
        ));
    }
    let context = d.spec.max_context_tokens;
    if limits.max_tokens < context {
        return invalid(format!(
            "spec.serving.maxBatchTokens ({}) is less than spec.maxContextTokens ({context}), \
             so a request of the longest context could never be admitted; set maxBatchTokens \
             to at least {context} (or leave it out: the default is {} or maxContextTokens, \
             whichever is larger), or lower maxContextTokens to at most {}",
            limits.max_tokens,
            BatchLimits::DEFAULT_MAX_TOKENS,
            limits.max_tokens
        ));
    }
    Ok(limits)
}

/// What each rank keeps for serving under `limits` with requests of up to
/// `max_context_tokens`: a KV cache for the batch's token budget (never less
/// than one longest request) and the prefix cache.
pub fn serving_budget(limits: &BatchLimits, max_context_tokens: u32) -> ServingBudget {
    ServingBudget::batched(
        u64::from(max_context_tokens),
        u64::from(limits.max_tokens),
        u64::try_from(limits.prefix_cache_bytes).unwrap_or(0),
    )
}

/// What the deployment asks the planner for.
pub fn deployment_request(d: &LlamaDeployment) -> Result<DeploymentRequest, Blocker> {
    let limits = batch_limits(d)?;
    let node_selector = d
        .spec
        .placement
        .as_ref()
        .and_then(|p| p.node_selector.as_ref());
    Ok(DeploymentRequest {
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        world_size: u32::try_from(d.spec.sharding.world_size).unwrap_or(0),
        strategy: match d.spec.sharding.strategy {
            CrdStrategy::Tensor => ShardingStrategy::Tensor,
            CrdStrategy::Pipeline => ShardingStrategy::Pipeline,
        },
        selector: selector(node_selector)?,
        budget: serving_budget(&limits, d.spec.max_context_tokens),
        serving_port: serving_port(d),
    })
}

/// The port of an `ip:port` or `[ipv6]:port` endpoint.
pub fn endpoint_port(endpoint: &str) -> Option<u16> {
    endpoint.rsplit_once(':')?.1.parse().ok()
}

/// The host of an `ip:port` or `[ipv6]:port` endpoint, brackets kept.
pub fn endpoint_host(endpoint: &str) -> Option<&str> {
    Some(endpoint.rsplit_once(':')?.0).filter(|h| !h.is_empty())
}

/// Memory a shard holds on its node, computed from its own spec (its resolved
/// architecture, world size, context and batch limits), so no other object is
/// needed. A shard without batch limits runs with its agent's, which the
/// operator cannot see; it is counted at the defaults the agent's flags have.
pub fn shard_memory_bytes(shard: &LlamaShard) -> u64 {
    let shape = shape_from_architecture(&shard.spec.architecture);
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

/// A deployment's shards of one epoch as the planner's current placement.
pub fn current_ranks(shards: &[&LlamaShard]) -> Vec<CurrentRank> {
    shards
        .iter()
        .filter_map(|shard| {
            let s = &shard.spec;
            let ring = s
                .peers
                .iter()
                .find(|p| p.rank == s.rank)
                .and_then(|p| endpoint_port(&p.address))?;
            Some(CurrentRank {
                rank: u32::try_from(s.rank).ok()?,
                node: s.node_name.clone(),
                ring_port: ring,
                control_port: if s.rank == 0 {
                    endpoint_port(&s.control_address)
                } else {
                    None
                },
            })
        })
        .collect()
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
fn backend_needs(backend: Backend) -> (&'static str, &'static str) {
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

/// The blocker for a failed plan that was made without the nodes in
/// `mismatched` (see [`backend_mismatches`]). When too few of the nodes that
/// match the selector are left because of the backend, that is the reason
/// (`BackendUnavailable`), naming the nodes and why; any other failure is the
/// planner's.
pub fn backend_blocker(
    backend: Backend,
    error: PlanError,
    request: &DeploymentRequest,
    nodes: &[NodeInfo],
    mismatched: &BTreeMap<String, String>,
) -> Blocker {
    if !matches!(error, PlanError::NoMatchingNodes { .. }) {
        return Blocker::Plan(error);
    }
    let matching: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| request.selector.matches(&n.labels))
        .map(|n| n.name.as_str())
        .collect();
    let why: Vec<&str> = matching
        .iter()
        .filter_map(|n| mismatched.get(*n).map(String::as_str))
        .collect();
    let qualify = matching.len() - why.len();
    if why.is_empty() || qualify >= request.world_size as usize {
        return Blocker::Plan(error);
    }
    const SHOWN: usize = 5;
    let mut listed = why[..why.len().min(SHOWN)].join(", ");
    if why.len() > SHOWN {
        listed.push_str(&format!(", and {} more", why.len() - SHOWN));
    }
    let of = if request.selector.is_empty() {
        format!("{} registered nodes", matching.len())
    } else {
        format!(
            "{} nodes matching selector {}",
            matching.len(),
            request.selector
        )
    };
    let (needs, instead) = backend_needs(backend);
    let backend = match backend {
        Backend::Ring => "Ring",
        Backend::Jaccl => "Jaccl",
        Backend::Nccl => "Nccl",
    };
    let w = request.world_size;
    Blocker::BackendUnavailable(format!(
        "backend {backend} needs {needs}; {qualify} of {of} qualify ({listed}), but {w} rank{} \
         {} requested; {instead}",
        if w == 1 { "" } else { "s" },
        if w == 1 { "was" } else { "were" },
    ))
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
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, MicroTime};
    use kube::api::ObjectMeta;
    use tandem_crds::{
        LlamaDeploymentSpec, LlamaNodeSpec, LlamaNodeStatus, LlamaShardSpec, NodeCapacity, Peer,
        Placement, SecretKeyRef, Sharding,
    };
    use tandem_planner::lookup_model;

    pub const MODEL_1B: &str = "mlx-community/Llama-3.2-1B-Instruct-4bit";
    pub const GIB: i64 = 1 << 30;

    pub fn ts(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("timestamp")
    }

    pub fn deployment(name: &str, model: &str, world: i32) -> LlamaDeployment {
        let mut d = LlamaDeployment::new(
            name,
            LlamaDeploymentSpec {
                model: model.to_owned(),
                revision: None,
                sharding: Sharding {
                    strategy: CrdStrategy::Tensor,
                    world_size: world,
                },
                placement: None,
                backend: Default::default(),
                max_context_tokens: 8192,
                serving: None,
                architecture: None,
                tls: None,
            },
        );
        d.metadata.namespace = Some("ns".into());
        d.metadata.uid = Some(format!("uid-{name}"));
        d.metadata.generation = Some(1);
        d
    }

    pub fn node(name: &str, address: &str, memory_gib: i64) -> LlamaNode {
        let mut n = LlamaNode::new(
            name,
            LlamaNodeSpec {
                address: address.to_owned(),
                unschedulable: false,
            },
        );
        n.status = Some(LlamaNodeStatus {
            capacity: Some(NodeCapacity {
                memory_bytes: memory_gib * GIB,
                wired_limit_bytes: None,
                cpu_cores: 8,
                gpu_cores: None,
                gpus: None,
            }),
            os: Some("linux".into()),
            backend: Some("cpu".into()),
            ..Default::default()
        });
        n
    }

    /// A Linux node whose agent runs MLX's CUDA backend with `gpus` GPUs.
    pub fn cuda_node(name: &str, address: &str, memory_gib: i64, gpus: i32) -> LlamaNode {
        let mut n = node(name, address, memory_gib);
        if let Some(s) = n.status.as_mut() {
            s.backend = Some("cuda".into());
            if let Some(c) = s.capacity.as_mut() {
                c.gpus = Some(gpus);
            }
        }
        n
    }

    pub fn lease(name: &str, renewed: Timestamp, seconds: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("tandem-system".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.into()),
                lease_duration_seconds: Some(seconds),
                renew_time: Some(MicroTime(renewed)),
                ..Default::default()
            }),
        }
    }

    pub fn shard(deployment: &str, node: &str, ring: &str, rank: i32, world: i32) -> LlamaShard {
        let shape = lookup_model(MODEL_1B).expect("1b").shape;
        let mut peers: Vec<Peer> = (0..world)
            .map(|r| Peer {
                rank: r,
                node: format!("peer-{r}"),
                address: format!("10.0.0.{r}:47000"),
            })
            .collect();
        if let Some(p) = peers.get_mut(usize::try_from(rank).expect("rank")) {
            p.node = node.to_owned();
            p.address = ring.to_owned();
        }
        let mut s = LlamaShard::new(
            &format!("{deployment}-e1-r{rank}"),
            LlamaShardSpec {
                deployment: deployment.to_owned(),
                epoch: 1,
                rank,
                world_size: world,
                node_name: node.to_owned(),
                model: MODEL_1B.to_owned(),
                revision: None,
                architecture: architecture_from_shape(&shape),
                backend: Default::default(),
                peers,
                control_address: "10.0.0.1:47001".into(),
                serving_port: (rank == 0).then_some(8080),
                group_token_secret_ref: SecretKeyRef {
                    name: format!("{deployment}-group-token"),
                    key: Some("token".into()),
                },
                api_key_secret_ref: None,
                tls_secret_ref: Some(tandem_crds::SecretRef {
                    name: format!("{deployment}-tls"),
                }),
                max_context_tokens: 8192,
                batching: Some(BatchLimits::default()),
            },
        );
        s.metadata.namespace = Some("ns".into());
        s
    }

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
    fn architecture_round_trips_through_the_planner_shape() {
        for entry in tandem_planner::CATALOG {
            let a = architecture_from_shape(&entry.shape);
            assert_eq!(
                shape_from_architecture(&a),
                entry.shape,
                "{}",
                entry.model_id
            );
        }
    }

    #[test]
    fn shape_comes_from_the_spec_or_the_catalog() {
        let d = deployment("a", MODEL_1B, 2);
        assert_eq!(
            resolve_shape(&d),
            Ok(lookup_model(MODEL_1B).expect("1b").shape)
        );
        let mut unknown = deployment("b", "me/tiny", 2);
        let err = resolve_shape(&unknown).expect_err("unknown");
        assert_eq!(err.reason(), "UnknownModel");
        assert!(err.is_spec_error());
        let tiny = Architecture {
            num_hidden_layers: 2,
            hidden_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            vocab_size: 256,
            head_dim: None,
            tie_word_embeddings: true,
            quantization: None,
            dtype: CrdDtype::Float32,
        };
        unknown.spec.architecture = Some(tiny.clone());
        assert_eq!(resolve_shape(&unknown), Ok(shape_from_architecture(&tiny)));
    }

    #[test]
    fn selectors_convert_and_unknown_operators_are_refused() {
        let sel = metav1::LabelSelector {
            match_labels: Some([("tandem.dev/chip".to_owned(), "m3".to_owned())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "In".into(),
                values: Some(vec!["a".into()]),
            }]),
        };
        let s = selector(Some(&sel)).expect("valid");
        assert_eq!(s.to_string(), "tandem.dev/chip=m3,zone in (a)");
        let mut bad = sel.clone();
        if let Some(exprs) = bad.match_expressions.as_mut() {
            exprs[0].operator = "Near".into();
        }
        let err = selector(Some(&bad)).expect_err("bad operator");
        assert_eq!(err.reason(), "InvalidSelector");
        assert!(err.message().contains("Near"), "{}", err.message());
        assert!(selector(None).expect("none").is_empty());
    }

    #[test]
    fn request_carries_the_spec() {
        let mut d = deployment("a", MODEL_1B, 4);
        d.spec.placement = Some(Placement {
            node_selector: Some(metav1::LabelSelector {
                match_labels: Some([("k".to_owned(), "v".to_owned())].into()),
                match_expressions: None,
            }),
        });
        let r = deployment_request(&d).expect("request");
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("ns", "a"));
        assert_eq!(r.world_size, 4);
        assert_eq!(r.serving_port, 8080);
        assert_eq!(
            r.budget,
            ServingBudget {
                kv_tokens: 32768,
                cache_bytes: 512 << 20
            }
        );
        assert_eq!(r.selector.to_string(), "k=v");
        d.spec.sharding.world_size = -1;
        assert_eq!(deployment_request(&d).expect("request").world_size, 0);
    }

    #[test]
    fn batch_limits_default_to_the_context_and_refuse_nonsense() {
        let mut d = deployment("a", MODEL_1B, 2);
        assert_eq!(batch_limits(&d), Ok(BatchLimits::default()));
        // A long context raises the default token budget with it.
        d.spec.max_context_tokens = 65536;
        assert_eq!(batch_limits(&d).map(|l| l.max_tokens), Ok(65536));
        assert_eq!(
            deployment_request(&d).map(|r| r.budget.kv_tokens),
            Ok(65536)
        );

        // A budget set below the context cannot admit the longest request.
        d.spec.serving = Some(tandem_crds::Serving {
            max_batch_tokens: Some(16384),
            ..Default::default()
        });
        let err = batch_limits(&d).expect_err("16384 < 65536");
        assert_eq!(err.reason(), "InvalidServing");
        assert!(err.is_spec_error());
        assert_eq!(
            err.message(),
            "spec.serving.maxBatchTokens (16384) is less than spec.maxContextTokens (65536), \
             so a request of the longest context could never be admitted; set maxBatchTokens \
             to at least 65536 (or leave it out: the default is 32768 or maxContextTokens, \
             whichever is larger), or lower maxContextTokens to at most 16384"
        );
        assert_eq!(deployment_request(&d).map(|_| ()), Err(err));
        d.spec.max_context_tokens = 16384;
        assert_eq!(batch_limits(&d).map(|l| l.max_tokens), Ok(16384));

        // What the schema refuses, in case the installed CRD is older.
        let bad = |serving: tandem_crds::Serving| {
            let mut d = deployment("b", MODEL_1B, 2);
            d.spec.serving = Some(serving);
            batch_limits(&d).expect_err("refused").message()
        };
        let m = bad(tandem_crds::Serving {
            max_batch_sequences: Some(0),
            ..Default::default()
        });
        assert!(m.contains("maxBatchSequences is 0; use 1 to 256"), "{m}");
        let m = bad(tandem_crds::Serving {
            prefill_chunk_tokens: Some(8),
            ..Default::default()
        });
        assert!(
            m.contains("prefillChunkTokens is 8; use at least 16"),
            "{m}"
        );
        let m = bad(tandem_crds::Serving {
            prefix_cache_bytes: Some(-1),
            ..Default::default()
        });
        assert!(m.contains("prefixCacheBytes is -1"), "{m}");
    }

    #[test]
    fn endpoints_and_port_ranges_parse() {
        assert_eq!(endpoint_port("10.0.0.1:47000"), Some(47000));
        assert_eq!(endpoint_port("[fd00::1]:47000"), Some(47000));
        assert_eq!(endpoint_host("[fd00::1]:47000"), Some("[fd00::1]"));
        assert_eq!(endpoint_host("10.0.0.1:1"), Some("10.0.0.1"));
        assert_eq!(endpoint_port("nonsense"), None);
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

    #[test]
    fn too_few_nodes_for_the_backend_is_its_own_reason() {
        let nodes: Vec<LlamaNode> = (1..=4)
            .map(|i| node(&format!("demo-{i}"), &format!("10.0.0.{i}"), 64))
            .collect();
        let infos: Vec<NodeInfo> = nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name_any(),
                address: n.spec.address.clone(),
                labels: BTreeMap::new(),
                ready: true,
                unschedulable: false,
                capacity_bytes: 64 << 30,
                allocated_bytes: 0,
                port_range: PortRange {
                    first: 47000,
                    last: 47999,
                },
                used_ports: BTreeSet::new(),
            })
            .collect();
        let mismatched = backend_mismatches(Backend::Nccl, &nodes, &BTreeMap::new());
        let mut d = deployment("a", MODEL_1B, 2);
        d.spec.backend = Backend::Nccl;
        let request = deployment_request(&d).expect("request");
        let no_nodes = || PlanError::NoMatchingNodes {
            world_size: 2,
            eligible_nodes: 0,
            message: "no LlamaNodes are registered".into(),
        };
        let b = backend_blocker(Backend::Nccl, no_nodes(), &request, &infos, &mismatched);
        assert_eq!(b.reason(), "BackendUnavailable");
        assert!(!b.is_spec_error(), "CUDA nodes may still come");
        assert_eq!(
            b.message(),
            "backend Nccl needs nodes running the agent's CUDA backend with a free GPU (one \
             rank per GPU); 0 of 4 registered nodes qualify (demo-1 runs cpu, demo-2 runs \
             cpu, demo-3 runs cpu, demo-4 runs cpu), but 2 ranks were requested; run the \
             agent with --backend cuda (and --gpus N) on more nodes, free GPUs held by other \
             Nccl deployments, lower spec.sharding.worldSize, or use backend Ring"
        );

        // Enough qualifying nodes: the planner's own reason stands.
        let b = backend_blocker(
            Backend::Nccl,
            no_nodes(),
            &request,
            &infos,
            &BTreeMap::new(),
        );
        assert_eq!(b, Blocker::Plan(no_nodes()));
        let few: BTreeMap<String, String> =
            [("demo-1".to_owned(), "demo-1 runs cpu".to_owned())].into();
        let b = backend_blocker(Backend::Nccl, no_nodes(), &request, &infos, &few);
        assert_eq!(b.reason(), "NoMatchingNodes");
        // Memory is the planner's business.
        let memory = PlanError::InsufficientMemory {
            world_size: 2,
            bytes_per_rank: 1,
            message: "short".into(),
        };
        let b = backend_blocker(Backend::Nccl, memory, &request, &infos, &mismatched);
        assert_eq!(b.reason(), "InsufficientMemory");

        // Only nodes matching the selector count.
        d.spec.placement = Some(Placement {
            node_selector: Some(metav1::LabelSelector {
                match_labels: Some([("pool".to_owned(), "gpu".to_owned())].into()),
                match_expressions: None,
            }),
        });
        let request = deployment_request(&d).expect("request");
        let mut infos = infos;
        infos[3].labels.insert("pool".into(), "gpu".into());
        let b = backend_blocker(Backend::Nccl, no_nodes(), &request, &infos, &mismatched);
        assert!(
            b.message()
                .contains("0 of 1 nodes matching selector pool=gpu qualify (demo-4 runs cpu)"),
            "{}",
            b.message()
        );
    }
}
