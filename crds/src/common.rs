//! Types and names shared by more than one kind: well-known labels, the
//! condition list schema, the model architecture and secret references.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Label on a LlamaShard naming the LlamaDeployment that owns it.
pub const LABEL_DEPLOYMENT: &str = "tandem.dev/deployment";
/// Label on a LlamaShard naming the LlamaNode that runs it.
pub const LABEL_NODE: &str = "tandem.dev/node";
/// Label on a LlamaShard holding the epoch it belongs to.
pub const LABEL_EPOCH: &str = "tandem.dev/epoch";
/// Well-known LlamaNode label: the chip family, such as `apple-m3-ultra`.
pub const LABEL_CHIP: &str = "tandem.dev/chip";
/// Well-known LlamaNode label: the MLX backend, `metal`, `cpu` or `cuda`.
pub const LABEL_BACKEND: &str = "tandem.dev/backend";
/// Well-known LlamaNode label: the node's memory in whole GiB.
pub const LABEL_MEMORY_GIB: &str = "tandem.dev/memory-gib";
/// Well-known LlamaNode label: the operating system, `macos` or `linux`.
pub const LABEL_OS: &str = "tandem.dev/os";

/// Annotation on a LlamaNode with the TCP ports its agent offers to ranks,
/// as `FIRST-LAST` (for example `29000-29999`). The agent writes it; the
/// operator allocates ring and control ports from it.
pub const ANNOTATION_PORT_RANGE: &str = "tandem.dev/port-range";

/// First port of the range an agent offers when it is given none, and the
/// operator assumes for a node without the annotation. The range lies below
/// the ports Linux (32768 and up) and macOS (49152 and up) hand out to
/// outgoing connections, which could otherwise hold a port placed for a
/// rank.
pub const DEFAULT_PORT_FIRST: u16 = 29000;
/// Last port, included, of that default range.
pub const DEFAULT_PORT_LAST: u16 = 29999;

/// Key of a TLS Secret holding the PEM certificate chain rank 0 serves.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of a TLS Secret holding the PEM private key of that certificate.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Key of a TLS Secret holding the PEM CA certificate that issued it; ranks
/// 1..N verify rank 0's control service against it, and clients may too.
pub const TLS_CA_KEY: &str = "ca.crt";

/// Model revision loaded when a LlamaDeployment names none, and the
/// default of `tandem-agent download --revision`.
pub const DEFAULT_REVISION: &str = "main";
/// Key of the API key in the Secret `spec.serving.apiKeySecretRef` names,
/// when the reference names none.
pub const DEFAULT_API_KEY_KEY: &str = "api-key";

/// Default namespace for node Leases.
pub const DEFAULT_LEASE_NAMESPACE: &str = "tandem-system";

/// Schema for a list of `metav1.Condition` merged by `type`, so that
/// server-side apply from several managers updates conditions one by one.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// A list of conditions, kept sorted by type by whoever writes it.
pub type Conditions = Vec<Condition>;

/// A reference to one key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data. Each field that uses this type says
    /// which key is assumed when this is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// A reference to a whole Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The shape of a Llama 3.x model, as found in its `config.json`. Needed for
/// models outside the built-in catalog; the operator resolves it for every
/// shard so that agents and the planner agree on the same numbers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Architecture {
    /// Number of transformer layers (`num_hidden_layers`).
    #[schemars(range(min = 1))]
    pub num_hidden_layers: u32,
    /// Width of the residual stream (`hidden_size`).
    #[schemars(range(min = 1))]
    pub hidden_size: u32,
    /// Number of query heads (`num_attention_heads`). Must be divisible by
    /// the world size.
    #[schemars(range(min = 1))]
    pub num_attention_heads: u32,
    /// Number of key/value heads for grouped-query attention
    /// (`num_key_value_heads`). Must be divisible by the world size.
    #[schemars(range(min = 1))]
    pub num_key_value_heads: u32,
    /// Width of the MLP (`intermediate_size`). Must be divisible by the world size.
    #[schemars(range(min = 1))]
    pub intermediate_size: u32,
    /// Vocabulary size (`vocab_size`).
    #[schemars(range(min = 1))]
    pub vocab_size: u32,
    /// Per-head width (`head_dim`); defaults to hiddenSize / numAttentionHeads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub head_dim: Option<u32>,
    /// Whether lm_head shares the embedding matrix (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Weight quantization of the MLX checkpoint; absent for bf16/fp16 weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// Element type of the unquantized tensors (norms, and every weight when
    /// `quantization` is absent).
    #[serde(default)]
    pub dtype: WeightDtype,
}

/// MLX affine quantization of a checkpoint (`quantization` in `config.json`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quantization {
    /// Bits per weight.
    #[schemars(range(min = 2, max = 8))]
    pub bits: u32,
    /// Number of weights that share one scale and bias. Each rank's slice of a
    /// row-parallel layer must be a whole number of groups.
    #[schemars(range(min = 32, max = 128))]
    pub group_size: u32,
}

impl Architecture {
    /// The architecture of the planner's shape `s`: what the operator writes
    /// into every shard, so that agents and the planner agree on the same
    /// numbers.
    pub fn from_shape(s: &tandem_planner::ModelShape) -> Architecture {
        use tandem_planner::WeightDtype as Planner;
        Architecture {
            num_hidden_layers: s.num_hidden_layers,
            hidden_size: s.hidden_size,
            num_attention_heads: s.num_attention_heads,
            num_key_value_heads: s.num_key_value_heads,
            intermediate_size: s.intermediate_size,
            vocab_size: s.vocab_size,
            head_dim: s.head_dim,
            tie_word_embeddings: s.tie_word_embeddings,
            quantization: s.quantization.map(|q| Quantization {
                bits: q.bits,
                group_size: q.group_size,
            }),
            dtype: match s.dtype {
                Planner::BFloat16 => WeightDtype::BFloat16,
                Planner::Float16 => WeightDtype::Float16,
                Planner::Float32 => WeightDtype::Float32,
            },
        }
    }

    /// The planner's shape of this architecture.
    pub fn shape(&self) -> tandem_planner::ModelShape {
        use tandem_planner::WeightDtype as Planner;
        tandem_planner::ModelShape {
            num_hidden_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            head_dim: self.head_dim,
            tie_word_embeddings: self.tie_word_embeddings,
            quantization: self.quantization.map(|q| tandem_planner::Quantization {
                bits: q.bits,
                group_size: q.group_size,
            }),
            dtype: match self.dtype {
                WeightDtype::BFloat16 => Planner::BFloat16,
                WeightDtype::Float16 => Planner::Float16,
                WeightDtype::Float32 => Planner::Float32,
            },
        }
    }
}

/// Element type of unquantized weights.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WeightDtype {
    /// bfloat16, two bytes per element.
    #[default]
    #[serde(rename = "bfloat16")]
    BFloat16,
    /// IEEE half precision, two bytes per element.
    #[serde(rename = "float16")]
    Float16,
    /// IEEE single precision, four bytes per element.
    #[serde(rename = "float32")]
    Float32,
}

/// How ranks of a group talk to each other for `all_sum`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Backend {
    /// MLX's ring backend over TCP; works on every platform.
    #[default]
    Ring,
    /// MLX's JACCL backend over Thunderbolt RDMA; macOS only.
    Jaccl,
    /// MLX's NCCL backend; Linux nodes whose agent runs MLX's CUDA backend,
    /// one rank per GPU.
    Nccl,
}

/// How rank 0 batches requests: the limits of its continuous batching, its
/// chunked prefill and its prefix KV cache. The operator resolves them from
/// `spec.serving` of the LlamaDeployment and writes them on every shard; the
/// planner sizes each rank's memory from them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchLimits {
    /// Most sequences decoded together in one step. Requests beyond it wait
    /// in rank 0's queue.
    #[schemars(range(min = 1, max = 256))]
    pub max_sequences: u32,
    /// Most tokens in flight over the batch: the sum, over the running
    /// requests, of prompt tokens plus the `max_tokens` each asks for (the
    /// KV cache it reserves). A request is admitted only when its
    /// reservation fits. The KV cache of each rank is sized from this.
    #[schemars(range(min = 1))]
    pub max_tokens: u32,
    /// Most prompt tokens prefilled in one step; longer prompts are
    /// prefilled in chunks of this size, between decode steps of the
    /// running requests.
    #[schemars(range(min = 16))]
    pub prefill_chunk_tokens: u32,
    /// Bytes of KV cache each rank keeps after requests end, so that later
    /// requests sharing a prompt prefix skip its prefill. 0 turns the prefix
    /// cache off.
    #[schemars(range(min = 0))]
    pub prefix_cache_bytes: i64,
    /// Most tokens one request may generate: what a request that names no
    /// `max_tokens` gets (or the context left after its prompt, when that is
    /// less), and the most it may name; a request asking for more is
    /// refused with a 400.
    #[serde(default = "default_max_completion_tokens")]
    #[schemars(range(min = 1))]
    pub max_completion_tokens: u32,
}

/// Default of `maxCompletionTokens`, also for shards written before the
/// field existed.
pub fn default_max_completion_tokens() -> u32 {
    BatchLimits::DEFAULT_MAX_COMPLETION_TOKENS
}

impl BatchLimits {
    /// Default of `maxSequences` (`spec.serving.maxBatchSequences`).
    pub const DEFAULT_MAX_SEQUENCES: u32 = 16;
    /// Default of `maxTokens` (`spec.serving.maxBatchTokens`).
    pub const DEFAULT_MAX_TOKENS: u32 = 32768;
    /// Default of `prefillChunkTokens` (`spec.serving.prefillChunkTokens`).
    pub const DEFAULT_PREFILL_CHUNK_TOKENS: u32 = 2048;
    /// Default of `prefixCacheBytes` (`spec.serving.prefixCacheBytes`): 512 MiB.
    pub const DEFAULT_PREFIX_CACHE_BYTES: i64 = 512 << 20;
    /// Default of `maxCompletionTokens` (`spec.serving.maxCompletionTokens`).
    pub const DEFAULT_MAX_COMPLETION_TOKENS: u32 = 4096;
}

/// Limits that suit a Mac serving a few users: eight sequences, 32768
/// tokens in flight, 2048-token prefill chunks and a 512 MiB prefix cache.
impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_sequences: Self::DEFAULT_MAX_SEQUENCES,
            max_tokens: Self::DEFAULT_MAX_TOKENS,
            prefill_chunk_tokens: Self::DEFAULT_PREFILL_CHUNK_TOKENS,
            prefix_cache_bytes: Self::DEFAULT_PREFIX_CACHE_BYTES,
            max_completion_tokens: Self::DEFAULT_MAX_COMPLETION_TOKENS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_round_trips_through_the_planner_shape() {
        for entry in tandem_planner::CATALOG {
            let a = Architecture::from_shape(&entry.shape);
            assert_eq!(a.shape(), entry.shape, "{}", entry.model_id);
        }
        let tiny = Architecture::from_shape(&tandem_planner::TINY_TEST_MODEL);
        assert_eq!(tiny.shape(), tandem_planner::TINY_TEST_MODEL);
    }
}
