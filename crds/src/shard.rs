//! `LlamaShard`: one rank of one epoch of a LlamaDeployment.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Architecture, Backend, BatchLimits, SecretKeyRef, SecretRef};

/// The rank to run, written by the operator. The agent on `nodeName` runs it
/// and reports in the status.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "LlamaShard",
    namespaced,
    shortname = "lshard",
    category = "tandem",
    status = "LlamaShardStatus",
    derive = "PartialEq",
    doc = "One rank of one epoch of a LlamaDeployment, run by the agent on spec.nodeName.",
    printcolumn(name = "Deployment", type_ = "string", json_path = ".spec.deployment"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".spec.epoch"),
    printcolumn(name = "Rank", type_ = "integer", json_path = ".spec.rank"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LlamaShardSpec {
    /// Name of the owning LlamaDeployment.
    #[schemars(length(min = 1, max = 253))]
    pub deployment: String,
    /// Epoch of the group this shard belongs to. Agents tear down workers of
    /// older epochs.
    #[schemars(range(min = 1))]
    pub epoch: i64,
    /// This shard's rank, from 0 to worldSize - 1.
    #[schemars(range(min = 0))]
    pub rank: i32,
    /// Number of ranks in the group.
    #[schemars(range(min = 1, max = 256))]
    pub world_size: i32,
    /// LlamaNode that runs this rank.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Model ID, as in the deployment.
    #[schemars(length(min = 1, max = 200))]
    pub model: String,
    /// Model revision to load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Model shape resolved by the operator, from the catalog or the spec.
    pub architecture: Architecture,
    /// Transport for the group's collective operations.
    #[serde(default)]
    pub backend: Backend,
    /// Every rank of the group, in rank order, with its ring address.
    pub peers: Vec<Peer>,
    /// `ip:port` of rank 0's gRPC control service, where ranks meet.
    #[schemars(length(min = 1))]
    pub control_address: String,
    /// Port of the OpenAI-compatible API; set on rank 0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub serving_port: Option<i32>,
    /// Secret holding the group token every rank presents to rank 0. The key
    /// defaults to `token`.
    pub group_token_secret_ref: SecretKeyRef,
    /// Secret with rank 0's certificate (`tls.crt`, `tls.key`) and the CA
    /// that issued it (`ca.crt`). Rank 0 serves its API and its control
    /// service over TLS with it, and the other ranks verify rank 0 against
    /// `ca.crt`. Absent only when the deployment turned TLS off
    /// (`spec.tls.enabled: false`): then both are plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,
    /// Secret holding the serving API key (rank 0 only). The key defaults to `api-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Longest context a request may use, in tokens.
    #[serde(default = "crate::deployment::default_max_context_tokens")]
    #[schemars(range(min = 128, max = 131072))]
    pub max_context_tokens: u32,
    /// How rank 0 batches requests, resolved by the operator from the
    /// deployment's `spec.serving` (every default filled in); `maxTokens`
    /// must be at least `maxContextTokens`. When absent, the agent's own
    /// defaults apply (its `--max-batch-sequences`, `--max-batch-tokens`,
    /// `--prefill-chunk-tokens` and `--prefix-cache-bytes` flags, the token
    /// budget raised to `maxContextTokens`). Every rank carries it: each
    /// keeps its slice of the batch's KV cache and of the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchLimits>,
}

/// One member of a group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// The peer's rank.
    #[schemars(range(min = 0))]
    pub rank: i32,
    /// LlamaNode that runs the peer.
    pub node: String,
    /// `ip:port` where the peer's ring backend listens. IP addresses only.
    #[schemars(regex(pattern = r"^[0-9A-Fa-f.:\[\]]+:[0-9]{1,5}$"))]
    pub address: String,
}

/// Observed state of a LlamaShard, written by the agent running it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlamaShardStatus {
    /// Lifecycle phase of the rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ShardPhase>,
    /// Bytes downloaded or loaded so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Seconds the rank took to load its weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_seconds: Option<f64>,
    /// CamelCase reason for the current phase, such as `ModelNotFound`,
    /// `CorruptModel`, `OutOfMemory`, `PeerUnreachable` or `WorkerCrashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail for the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Byte progress of a download or load.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes done so far.
    #[schemars(range(min = 0))]
    pub bytes_done: i64,
    /// Bytes in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bytes_total: Option<i64>,
}

/// Lifecycle phase of a rank.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ShardPhase {
    /// Seen by nobody yet.
    Pending,
    /// The agent is fetching model files.
    Downloading,
    /// The rank worker is reading its slice of the weights.
    Loading,
    /// Weights are in memory; waiting for the group.
    Loaded,
    /// Meeting the other ranks at rank 0's barrier.
    Connecting,
    /// The group is formed and this rank takes part in requests.
    Ready,
    /// The rank cannot run; see reason and message.
    Failed,
    /// The rank is being unloaded.
    Terminating,
}
