//! `LlamaDeployment`: a model served by a tensor-parallel group of nodes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Architecture, Backend, BatchLimits, SecretKeyRef, conditions_schema};
use crate::shard::ShardPhase;

/// What the user asks for: a model and how to shard it. The operator places
/// one rank per matching LlamaNode, writes one LlamaShard per rank, and
/// reports progress in the status. Scale it by editing
/// `spec.sharding.worldSize` or with `kubectl scale llama NAME --replicas=N`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "LlamaDeployment",
    namespaced,
    shortname = "llama",
    category = "tandem",
    status = "LlamaDeploymentStatus",
    derive = "PartialEq",
    doc = "A Llama model served across several nodes as one tensor-parallel group.",
    scale(
        spec_replicas_path = ".spec.sharding.worldSize",
        status_replicas_path = ".status.readyRanks"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(
        name = "World",
        type_ = "integer",
        json_path = ".spec.sharding.worldSize"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LlamaDeploymentSpec {
    /// Model ID in the Hugging Face `org/name` form, for example
    /// `mlx-community/Llama-3.3-70B-Instruct-4bit`. Models in the built-in
    /// catalog need nothing else; any other model also needs `architecture`.
    #[schemars(
        length(min = 1, max = 200),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
    )]
    pub model: String,
    /// Model revision: a branch, tag or commit of the model repository.
    /// Defaults to `main`. Parts between slashes start with a letter or a
    /// digit, so no part is `.` or `..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 100),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
    )]
    pub revision: Option<String>,
    /// How the model is split into ranks.
    pub sharding: Sharding,
    /// Which LlamaNodes may run ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Transport for the group's collective operations. `Ring` (TCP) works
    /// everywhere; `Jaccl` (Thunderbolt RDMA) needs Macs wired together;
    /// `Nccl` (NVIDIA NCCL) needs Linux nodes whose agent runs MLX's CUDA
    /// backend, and takes one of a node's GPUs per rank
    /// (`LlamaNode.status.capacity.gpus`).
    #[serde(default)]
    pub backend: Backend,
    /// Longest context a request may use (prompt plus generated tokens), in
    /// tokens. The batch's token budget (`serving.maxBatchTokens`) must hold
    /// at least one such request.
    #[serde(default = "default_max_context_tokens")]
    #[schemars(range(min = 128, max = 131072))]
    pub max_context_tokens: u32,
    /// The OpenAI-compatible HTTP API served by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<Serving>,
    /// Model shape, for models outside the built-in catalog. When set for a
    /// catalog model, it overrides the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
    /// TLS for rank 0's API and for the group's control stream. On when
    /// left out: the operator issues a certificate from its own CA and
    /// publishes that CA in `status.caBundle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// TLS for rank 0's OpenAI-compatible API and the ranks' control stream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// `false` serves the API and the control stream in plain text (HTTP and
    /// gRPC without TLS): anyone on the network path reads prompts, answers
    /// and the group token. Defaults to `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// A Secret of your own in the deployment's namespace with `tls.crt`
    /// (PEM chain), `tls.key` (PEM key) and `ca.crt` (the PEM CA that issued
    /// `tls.crt`; the other ranks verify rank 0 against it). The certificate
    /// must name the address of every node a rank may be placed on, as IP
    /// subject alternative names. When left out, the operator issues the
    /// certificate into `<deployment>-tls` from its own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
}

impl LlamaDeploymentSpec {
    /// Whether rank 0 serves TLS: unless `spec.tls.enabled` is `false`.
    pub fn tls_enabled(&self) -> bool {
        self.tls.as_ref().and_then(|t| t.enabled).unwrap_or(true)
    }

    /// The user's own TLS Secret, when TLS is on and one is named.
    pub fn tls_user_secret(&self) -> Option<&str> {
        if !self.tls_enabled() {
            return None;
        }
        self.tls.as_ref().and_then(|t| t.secret_name.as_deref())
    }
}

/// Default for `spec.maxContextTokens`.
pub fn default_max_context_tokens() -> u32 {
    8192
}

impl LlamaDeploymentSpec {
    /// The batch limits the operator writes on every shard: those of
    /// `spec.serving` ([`serving_batch_limits`]), except that an unset
    /// `maxBatchTokens` is never below `maxContextTokens`, so that the
    /// default budget always admits one request of the longest context.
    pub fn batch_limits(&self) -> BatchLimits {
        let mut limits = serving_batch_limits(self.serving.as_ref());
        let set = self
            .serving
            .as_ref()
            .is_some_and(|s| s.max_batch_tokens.is_some());
        if !set {
            limits.max_tokens = limits.max_tokens.max(self.max_context_tokens);
        }
        limits
    }
}

/// How a model is split across ranks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sharding {
    /// Parallelism strategy. `Tensor` splits every layer across all ranks;
    /// `Pipeline` is reserved for a later version and is refused.
    #[serde(default)]
    pub strategy: ShardingStrategy,
    /// Number of ranks, one per node. The model's attention heads, KV heads
    /// and MLP width must divide by it; `status.validWorldSizes` lists the
    /// values that work. This is what `kubectl scale` changes.
    #[schemars(range(min = 1, max = 256))]
    pub world_size: i32,
}

/// Parallelism strategy of a deployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ShardingStrategy {
    /// Tensor parallelism: every rank holds a slice of every layer.
    #[default]
    Tensor,
    /// Pipeline parallelism: reserved, not implemented.
    Pipeline,
}

/// Where ranks may be placed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Label selector over LlamaNodes. Only matching nodes receive ranks;
    /// an empty or absent selector matches every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// The HTTP API served by rank 0, and how rank 0 batches its requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Serving {
    /// TCP port of the OpenAI-compatible API on rank 0's node. Defaults to 8080.
    #[serde(default = "default_serving_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Secret holding a bearer API key that clients must send. When absent
    /// the API is open. The key defaults to `api-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Most requests rank 0 decodes together in one step (continuous
    /// batching); more wait in its queue. Defaults to 16. A decode step
    /// reads the weights once for the whole batch, so more sequences cost
    /// little per step; the KV they hold is bounded by `maxBatchTokens`,
    /// not by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_batch_sequences: Option<u32>,
    /// Most KV cache positions the batch reserves. A request reserves its
    /// prompt tokens plus the `max_tokens` it asks for; the batch's cache
    /// gives every running request a row as long as the longest, so the
    /// batch reserves its requests times the longest reservation among them,
    /// and a request waits while admitting it would pass this limit. Each
    /// rank's memory estimate counts a KV cache of this many tokens. Must be
    /// at least `maxContextTokens`. Defaults to 32768, or to
    /// `maxContextTokens` when that is larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch_tokens: Option<u32>,
    /// Most prompt tokens prefilled in one step. Longer prompts are
    /// prefilled in chunks of this size between decode steps, so a long
    /// prompt does not stall the requests already running. Defaults to 2048.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16))]
    pub prefill_chunk_tokens: Option<u32>,
    /// Bytes of KV cache each rank keeps after requests end, so that later
    /// requests sharing a prompt prefix (a system prompt, a conversation so
    /// far) skip its prefill. Counted in each rank's memory estimate. 0
    /// turns the prefix cache off. Defaults to 536870912 (512 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub prefix_cache_bytes: Option<i64>,
    /// Most tokens one request may generate. A request that names no
    /// `max_tokens` gets this many (or the context left after its prompt,
    /// when that is less); one that asks for more is refused with a 400
    /// naming this field. Bounds how long one request can hold a place in
    /// the batch. Defaults to 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_completion_tokens: Option<u32>,
}

/// Default for `spec.serving.port`.
pub fn default_serving_port() -> i32 {
    8080
}

/// Port 8080, no API key and the default batch limits.
impl Default for Serving {
    fn default() -> Self {
        Serving {
            port: default_serving_port(),
            api_key_secret_ref: None,
            max_batch_sequences: None,
            max_batch_tokens: None,
            prefill_chunk_tokens: None,
            prefix_cache_bytes: None,
            max_completion_tokens: None,
        }
    }
}

impl Serving {
    /// The batch limits this block asks for, each unset one at its default
    /// ([`BatchLimits::default`]). A deployment's limits also depend on its
    /// `maxContextTokens`; see [`LlamaDeploymentSpec::batch_limits`].
    pub fn batch_limits(&self) -> BatchLimits {
        let d = BatchLimits::default();
        BatchLimits {
            max_sequences: self.max_batch_sequences.unwrap_or(d.max_sequences),
            max_tokens: self.max_batch_tokens.unwrap_or(d.max_tokens),
            prefill_chunk_tokens: self.prefill_chunk_tokens.unwrap_or(d.prefill_chunk_tokens),
            prefix_cache_bytes: self.prefix_cache_bytes.unwrap_or(d.prefix_cache_bytes),
            max_completion_tokens: self
                .max_completion_tokens
                .unwrap_or(d.max_completion_tokens),
        }
    }
}

/// The batch limits of an optional `spec.serving`: [`Serving::batch_limits`],
/// or every default when the block is absent.
pub fn serving_batch_limits(serving: Option<&Serving>) -> BatchLimits {
    serving.map_or_else(BatchLimits::default, Serving::batch_limits)
}

/// Observed state of a LlamaDeployment, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlamaDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary of where the deployment is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DeploymentPhase>,
    /// Group incarnation. It increases on every re-placement: a new world
    /// size, a lost node or a failed rank.
    #[serde(default)]
    pub epoch: i64,
    /// World size of the current epoch.
    #[serde(default)]
    pub world_size: i32,
    /// Ranks of the current epoch whose shard is Ready.
    #[serde(default)]
    pub ready_ranks: i32,
    /// Ready ranks over world size, such as `2/4`, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// One entry per rank of the current epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<RankStatus>,
    /// URL of the OpenAI-compatible API on rank 0, once the group serves:
    /// `https://` unless `spec.tls.enabled` is `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// PEM of the CA that issued rank 0's certificate, when the operator
    /// issued it (no `spec.tls.secretName`): give it to clients to verify
    /// `endpoint`, for example `openai.OpenAI(http_client=httpx.Client(verify=PATH))`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// World sizes this model can be split into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_world_sizes: Vec<i32>,
    /// Estimated memory each rank needs: its weight slice, the replicated
    /// tensors, a KV cache for the batch's token budget
    /// (`serving.maxBatchTokens`, at least `maxContextTokens`) and the prefix
    /// cache (`serving.prefixCacheBytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_per_rank_bytes: Option<i64>,
    /// Placed, ShardsLoaded, GroupFormed and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Re-placements caused by failures (a failed rank, a lost node, a
    /// vanished shard) counted against the operator's restart budget. It
    /// goes back to 0 when the group has served without a failure for a
    /// while, or when the spec changes. When it reaches the budget the
    /// deployment is Failed.
    #[serde(default)]
    pub restart_count: i32,
    /// The most recent failure-driven re-placement; restart backoff counts
    /// from its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<RestartRecord>,
    /// When the current epoch's group last made progress while it was not
    /// yet serving: it was placed, a rank changed phase, or a rank's
    /// download advanced. A group that makes no progress for the
    /// operator's `--load-timeout` is restarted (reason `LoadTimeout` or
    /// `FormationTimeout`). Absent once the group serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
}

/// One failure-driven re-placement of a deployment's group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartRecord {
    /// The epoch the re-placement started.
    pub epoch: i64,
    /// When the re-placement happened.
    pub time: Time,
    /// CamelCase reason of the failure, such as `RankFailed`, `NodeLost` or
    /// `ShardMissing`.
    pub reason: String,
    /// What failed, in words.
    pub message: String,
}

/// Where a LlamaDeployment is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeploymentPhase {
    /// Accepted, not yet looked at.
    Pending,
    /// Choosing nodes, or waiting for nodes that fit.
    Placing,
    /// Shards are placed and agents are loading weights.
    Loading,
    /// Every rank is loaded; the group is connecting.
    Forming,
    /// The group is formed and rank 0 serves requests.
    Serving,
    /// A rank failed or a node was lost; the group is being re-formed.
    Degraded,
    /// The deployment cannot run; see the conditions for why.
    Failed,
    /// The deployment is being deleted; the operator waits for the agents to
    /// release its shards (see the Ready condition for what it waits for).
    Terminating,
}

/// One rank of the current epoch, as seen by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RankStatus {
    /// Rank number, from 0.
    pub rank: i32,
    /// LlamaNode running the rank.
    pub node: String,
    /// LlamaShard of the rank.
    pub shard: String,
    /// Phase the agent reports for the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ShardPhase>,
    /// `ip:port` the rank listens on for its group peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Bytes of the model the rank's agent has downloaded so far, while it
    /// downloads (the shard's `status.progress.bytesDone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<i64>,
}
