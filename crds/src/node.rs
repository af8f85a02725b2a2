//! `LlamaNode`: one machine in the fleet, registered by its agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::conditions_schema;
use crate::shard::ShardPhase;

/// How the node may be used, written by its agent (address) and by admins
/// (cordon). Labels are the placement vocabulary: agents set
/// `tandem.dev/chip`, `tandem.dev/backend`, `tandem.dev/memory-gib` and
/// `tandem.dev/os`, and admins add more with `kubectl label lnode`. Liveness
/// is a Lease of the same name in `tandem-system`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "LlamaNode",
    shortname = "lnode",
    category = "tandem",
    status = "LlamaNodeStatus",
    derive = "PartialEq",
    doc = "A machine that can run ranks, created and kept alive by its agent.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Chip", type_ = "string", json_path = ".status.chip"),
    printcolumn(name = "Backend", type_ = "string", json_path = ".status.backend"),
    printcolumn(
        name = "Memory",
        type_ = "integer",
        json_path = ".status.capacity.memoryBytes"
    ),
    printcolumn(
        name = "GPUs",
        type_ = "integer",
        json_path = ".status.capacity.gpus",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Unschedulable",
        type_ = "boolean",
        json_path = ".spec.unschedulable",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LlamaNodeSpec {
    /// IP address peers use to reach this node's ranks.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[0-9A-Fa-f.:]+$"))]
    pub address: String,
    /// Cordon: when true the node receives no new ranks. Ranks already
    /// running stay until their deployment is re-placed.
    #[serde(default)]
    pub unschedulable: bool,
}

/// Observed state of a LlamaNode, written by its agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlamaNodeStatus {
    /// What the machine has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeCapacity>,
    /// Bytes of memory taken by the ranks this node runs.
    #[serde(default)]
    pub allocated_bytes: i64,
    /// Chip, such as `apple-m3-ultra` or the CPU model on Linux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip: Option<String>,
    /// Operating system, `macos` or `linux`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// MLX backend the agent runs: `metal`, `cpu` or `cuda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Version of libmlx the agent loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlx_version: Option<String>,
    /// Version of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Ready: the agent is running and heartbeating.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Shards this node runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<NodeShard>,
}

/// Resources of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    /// Physical memory in bytes.
    #[schemars(range(min = 0))]
    pub memory_bytes: i64,
    /// On macOS, the most GPU-wired memory the kernel allows
    /// (`iogpu.wired_limit_mb`); ranks must fit under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub wired_limit_bytes: Option<i64>,
    /// CPU cores.
    #[schemars(range(min = 0))]
    pub cpu_cores: i32,
    /// GPU cores, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpu_cores: Option<i32>,
    /// NVIDIA GPUs this node offers to `Nccl` ranks, one rank each; absent on
    /// nodes without CUDA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpus: Option<i32>,
}

/// A shard as its node reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeShard {
    /// Namespace of the LlamaShard.
    pub namespace: String,
    /// Name of the LlamaShard.
    pub name: String,
    /// Rank the shard holds.
    pub rank: i32,
    /// Epoch of the shard.
    pub epoch: i64,
    /// Phase of the shard on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ShardPhase>,
    /// Bytes of memory the shard takes.
    #[serde(default)]
    pub memory_bytes: i64,
}
