//! Model shapes, the tensor-parallel sharding rules and the memory a rank needs.
//!
//! Tensor parallelism here is the scheme of mlx-lm's `shard` and exo's
//! `LlamaShardingStrategy`: `q/k/v/gate/up_proj` are split by output rows,
//! `o_proj` and `down_proj` by input columns (followed by `all_sum`), and the
//! embeddings, norms and `lm_head` are replicated on every rank.
//!
//! Weight sizes follow MLX's affine quantization storage: `bits / 8` bytes per
//! weight, plus one scale and one bias (in the model's dtype) per group of
//! `group_size` weights along a row. With this formula the bundled
//! checkpoints come out within 2–5 % below the storage sizes in the catalog
//! (those are rounded figures; see the catalog tests).

use thiserror::Error;

/// Largest world size the sharding rules are evaluated for when listing the
/// valid ones, for example in an `InvalidSharding` message.
pub const MAX_WORLD_SIZE: u32 = 64;

/// Element type of unquantized tensors: norms, quantization scales and biases,
/// the KV cache, and every weight when the checkpoint is not quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum WeightDtype {
    /// bfloat16, two bytes per element.
    #[default]
    BFloat16,
    /// IEEE half precision, two bytes per element.
    Float16,
    /// IEEE single precision, four bytes per element.
    Float32,
}

impl WeightDtype {
    /// Bytes per element.
    pub const fn bytes(self) -> u64 {
        match self {
            WeightDtype::BFloat16 | WeightDtype::Float16 => 2,
            WeightDtype::Float32 => 4,
        }
    }
}

/// MLX affine quantization of a checkpoint (`quantization` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Quantization {
    /// Bits per weight (2 to 8).
    pub bits: u32,
    /// Number of consecutive weights of a row that share one scale and bias.
    pub group_size: u32,
}

/// The shape of a Llama 3.x model: the `config.json` fields that decide how it
/// shards and how much memory it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelShape {
    /// Number of transformer layers (`num_hidden_layers`).
    pub num_hidden_layers: u32,
    /// Width of the residual stream (`hidden_size`).
    pub hidden_size: u32,
    /// Number of query heads (`num_attention_heads`).
    pub num_attention_heads: u32,
    /// Number of key/value heads (`num_key_value_heads`).
    pub num_key_value_heads: u32,
    /// Width of the MLP (`intermediate_size`).
    pub intermediate_size: u32,
    /// Vocabulary size (`vocab_size`).
    pub vocab_size: u32,
    /// Per-head width (`head_dim`); `None` means `hidden_size / num_attention_heads`.
    pub head_dim: Option<u32>,
    /// Whether `lm_head` shares the embedding matrix (`tie_word_embeddings`).
    pub tie_word_embeddings: bool,
    /// Quantization of the linear layers and embeddings; `None` for bf16/fp16/f32 weights.
    pub quantization: Option<Quantization>,
    /// Element type of unquantized tensors.
    pub dtype: WeightDtype,
}

/// A model shape that cannot be built or cannot be split as asked. The message
/// says which number is at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

/// What a group keeps in memory for serving, besides the weights: the KV
/// cache of the requests it runs at once, and the KV it keeps for reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServingBudget {
    /// Token positions of KV the running requests may hold together, over
    /// the whole batch: one request of the longest context for a server that
    /// runs one request at a time, the batch's token budget for one that
    /// batches (see [`ServingBudget::batched`]).
    pub kv_tokens: u64,
    /// Bytes of KV each rank keeps after requests end, for reuse by later
    /// requests with the same prompt prefix (the prefix cache); 0 when off.
    pub cache_bytes: u64,
}

impl ServingBudget {
    /// The budget of a server that batches: a KV cache for `batch_tokens`
    /// positions, never fewer than one request of `max_context_tokens` needs,
    /// plus `prefix_cache_bytes` kept per rank.
    pub fn batched(max_context_tokens: u64, batch_tokens: u64, prefix_cache_bytes: u64) -> Self {
        ServingBudget {
            kv_tokens: batch_tokens.max(max_context_tokens),
            cache_bytes: prefix_cache_bytes,
        }
    }
}

/// What one rank of a tensor-parallel group holds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryEstimate {
    /// This rank's slice of the attention and MLP weights of every layer.
    pub sharded_weight_bytes: u64,
    /// Tensors every rank holds whole: embeddings, `lm_head` when untied, norms.
    pub replicated_weight_bytes: u64,
    /// Keys and values of this rank's KV heads for
    /// [`ServingBudget::kv_tokens`] positions: the running batch's cache.
    pub kv_cache_bytes: u64,
    /// The prefix cache ([`ServingBudget::cache_bytes`]), which each rank
    /// holds for its own KV heads.
    pub prefix_cache_bytes: u64,
}

impl MemoryEstimate {
    /// Bytes the rank needs in total.
    pub fn total(&self) -> u64 {
        self.sharded_weight_bytes
            .saturating_add(self.replicated_weight_bytes)
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.prefix_cache_bytes)
    }
}

/// Narrows an intermediate result to `u64`, saturating: nonsense architectures
/// from a user's spec must give a huge number, not a panic.
fn saturate(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

impl ModelShape {
    /// Per-head width: `head_dim`, or `hidden_size / num_attention_heads`
    /// (0 when there are no heads).
    pub fn head_dim(&self) -> u32 {
        self.head_dim
            .or_else(|| self.hidden_size.checked_div(self.num_attention_heads))
            .unwrap_or(0)
    }

    /// Width of all query heads together: the output of `q_proj` and the input
    /// of `o_proj`.
    fn attention_width(&self) -> u128 {
        u128::from(self.num_attention_heads) * u128::from(self.head_dim())
    }

    /// Width of all key (or value) heads together: the output of `k_proj`.
    fn kv_width(&self) -> u128 {
        u128::from(self.num_key_value_heads) * u128::from(self.head_dim())
    }

    /// Checks that the shape describes a model that can exist: every size is
    /// positive, query heads are a multiple of KV heads, and a quantized
    /// model's rows are whole groups.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let positive = [
            ("num_hidden_layers", self.num_hidden_layers),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim()),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ShapeError(format!("{name} must be positive")));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ShapeError(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if let Some(q) = self.quantization {
            if !(2..=8).contains(&q.bits) {
                return Err(ShapeError(format!(
                    "quantization bits must be 2 to 8, not {}",
                    q.bits
                )));
            }
            if q.group_size == 0 {
                return Err(ShapeError(
                    "quantization group_size must be positive".into(),
                ));
            }
            // Every quantized row (an input dimension) must be whole groups.
            let inputs = [
                ("hidden_size", u128::from(self.hidden_size)),
                ("intermediate_size", u128::from(self.intermediate_size)),
                ("num_attention_heads * head_dim", self.attention_width()),
            ];
            for (name, width) in inputs {
                if !width.is_multiple_of(u128::from(q.group_size)) {
                    return Err(ShapeError(format!(
                        "{name} ({width}) is not a multiple of the quantization group size ({})",
                        q.group_size
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bytes of one `out × in` weight matrix as stored: quantized with a scale
    /// and a bias per group, or plain in `dtype`.
    fn matrix_bytes(&self, out: u128, inp: u128) -> u128 {
        let elem = u128::from(self.dtype.bytes());
        let weights = out.saturating_mul(inp);
        match self.quantization {
            Some(q) if q.group_size > 0 => {
                let packed = weights.saturating_mul(u128::from(q.bits)).div_ceil(8);
                let groups = out.saturating_mul(inp.div_ceil(u128::from(q.group_size)));
                packed.saturating_add(groups.saturating_mul(2 * elem))
            }
            _ => weights.saturating_mul(elem),
        }
    }

    /// Bytes of the attention and MLP weights of one layer, all ranks together.
    fn layer_linear_bytes(&self) -> u128 {
        let hidden = u128::from(self.hidden_size);
        let inter = u128::from(self.intermediate_size);
        let attn = self.attention_width();
        let kv = self.kv_width();
        let q = self.matrix_bytes(attn, hidden);
        let k_and_v = self.matrix_bytes(kv, hidden).saturating_mul(2);
        let o = self.matrix_bytes(hidden, attn);
        let gate_and_up = self.matrix_bytes(inter, hidden).saturating_mul(2);
        let down = self.matrix_bytes(hidden, inter);
        q.saturating_add(k_and_v)
            .saturating_add(o)
            .saturating_add(gate_and_up)
            .saturating_add(down)
    }

    /// Bytes of the weights that tensor parallelism splits (attention q/k/v/o
    /// and MLP gate/up/down of every layer), all ranks together.
    pub fn sharded_weight_bytes(&self) -> u64 {
        saturate(
            self.layer_linear_bytes()
                .saturating_mul(u128::from(self.num_hidden_layers)),
        )
    }

    /// Bytes of the weights every rank holds whole: the embedding matrix
    /// (quantized like the linear layers), `lm_head` when untied, and the two
    /// norms per layer plus the final norm (in `dtype`).
    pub fn replicated_weight_bytes(&self) -> u64 {
        let hidden = u128::from(self.hidden_size);
        let embedding = self.matrix_bytes(u128::from(self.vocab_size), hidden);
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        let norms = (2 * u128::from(self.num_hidden_layers) + 1)
            .saturating_mul(hidden)
            .saturating_mul(u128::from(self.dtype.bytes()));
        saturate(embedding.saturating_add(lm_head).saturating_add(norms))
    }

    /// Bytes of the whole checkpoint's weights.
    pub fn total_weight_bytes(&self) -> u64 {
        self.sharded_weight_bytes()
            .saturating_add(self.replicated_weight_bytes())
    }

    /// Bytes of one rank's KV cache: keys and values, for every layer, for
    /// this rank's `num_key_value_heads / world_size` heads, for
    /// `context_tokens` positions, in `dtype`.
    pub fn kv_cache_bytes(&self, world_size: u32, context_tokens: u64) -> u64 {
        let heads = u128::from(self.num_key_value_heads.div_ceil(world_size.max(1)));
        let x = 2u128
            .saturating_mul(u128::from(self.num_hidden_layers))
            .saturating_mul(heads)
            .saturating_mul(u128::from(self.head_dim()))
            .saturating_mul(u128::from(context_tokens))
            .saturating_mul(u128::from(self.dtype.bytes()));
        saturate(x)
    }
}

/// Checks whether `world_size` ranks can split `shape` evenly.
///
/// Valid iff the query heads, KV heads and MLP width divide by it (so the
/// row-split `q/k/v/gate/up_proj` outputs divide too) and, when quantized,
/// each rank's input slice of the column-split `o_proj` (`heads * head_dim /
/// N`) and `down_proj` (`intermediate / N`) is a whole number of groups.
pub fn check_world_size(shape: &ModelShape, world_size: u32) -> Result<(), ShapeError> {
    shape.validate()?;
    if world_size == 0 {
        return Err(ShapeError("world size must be at least 1".into()));
    }
    let n = world_size;
    let divisible = [
        ("attention heads", shape.num_attention_heads),
        ("KV heads", shape.num_key_value_heads),
        ("MLP width (intermediate_size)", shape.intermediate_size),
    ];
    for (what, count) in divisible {
        if !count.is_multiple_of(n) {
            return Err(ShapeError(format!("{count} {what} do not divide by {n}")));
        }
    }
    if let Some(q) = shape.quantization {
        let group = u128::from(q.group_size);
        let slices = [
            ("o_proj", shape.attention_width()),
            ("down_proj", u128::from(shape.intermediate_size)),
        ];
        for (layer, width) in slices {
            let slice = width / u128::from(n);
            if !slice.is_multiple_of(group) {
                return Err(ShapeError(format!(
                    "each rank's {layer} input slice ({width} / {n} = {slice}) is not a whole \
                     number of quantization groups of {}",
                    q.group_size
                )));
            }
        }
    }
    Ok(())
}

/// Every world size from 1 to `max` that can split `shape` evenly (see
/// [`check_world_size`]), ascending. Empty when the shape itself is invalid.
pub fn valid_world_sizes(shape: &ModelShape, max: u32) -> Vec<u32> {
    (1..=max)
        .filter(|&n| check_world_size(shape, n).is_ok())
        .collect()
}

/// Memory one rank of a `world_size` tensor-parallel group needs to serve
/// within `budget`: its slice of the sharded weights, the replicated weights,
/// its part of the KV cache for `budget.kv_tokens` positions and the
/// `budget.cache_bytes` of its prefix cache. Activations and MLX's scratch
/// buffers are not counted. A `world_size` of 0 counts as 1.
pub fn memory_per_rank(
    shape: &ModelShape,
    world_size: u32,
    budget: ServingBudget,
) -> MemoryEstimate {
    let n = u64::from(world_size.max(1));
    MemoryEstimate {
        sharded_weight_bytes: shape.sharded_weight_bytes().div_ceil(n),
        replicated_weight_bytes: shape.replicated_weight_bytes(),
        kv_cache_bytes: shape.kv_cache_bytes(world_size, budget.kv_tokens),
        prefix_cache_bytes: budget.cache_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{CATALOG, lookup_model};

    fn shape(id: &str) -> ModelShape {
        lookup_model(id).expect("bundled model").shape
    }

    /// One request of `tokens` at a time, no prefix cache.
    fn single_context(tokens: u64) -> ServingBudget {
        ServingBudget {
            kv_tokens: tokens,
            cache_bytes: 0,
        }
    }

    #[test]
    fn llama_3_2_3b_splits_into_1_2_4_8() {
        // 24 heads, 8 KV heads, 8192 MLP width: gcd is 8, and with head_dim 128
        // each o_proj slice (3072 / 8 = 384) is 6 groups of 64.
        let s = shape("mlx-community/Llama-3.2-3B-Instruct-4bit");
        assert_eq!(s.num_attention_heads, 24);
        assert_eq!(valid_world_sizes(&s, 64), vec![1, 2, 4, 8]);
    }

    #[test]
    fn every_bundled_llama_splits_into_1_2_4_8() {
        for entry in CATALOG
            .iter()
            .filter(|e| e.model_id.starts_with("mlx-community/"))
        {
            assert_eq!(
                valid_world_sizes(&entry.shape, 64),
                vec![1, 2, 4, 8],
                "{}",
                entry.model_id
            );
        }
    }

    #[test]
    fn smollm2_splits_into_1_and_3_only() {
        // 9 heads and 3 KV heads: only 1 and 3 divide both; the quantized
        // slices (o_proj 576 / 3 = 192, down_proj 1536 / 3 = 512) are whole
        // groups of 32 and 64.
        for id in [
            crate::catalog::SMOLLM2_135M_4BIT,
            crate::catalog::SMOLLM2_135M_8BIT,
            crate::catalog::SMOLLM2_135M_BF16,
        ] {
            assert_eq!(valid_world_sizes(&shape(id), 64), vec![1, 3], "{id}");
        }
        let two = check_world_size(&shape(crate::catalog::SMOLLM2_135M_4BIT), 2).unwrap_err();
        assert!(
            two.0.contains("9 attention heads do not divide by 2"),
            "{two}"
        );
    }

    #[test]
    fn invalid_world_size_says_which_number_does_not_divide() {
        let s = shape("mlx-community/Llama-3.2-3B-Instruct-4bit");
        let err = check_world_size(&s, 3).expect_err("3 does not divide 8 KV heads");
        assert_eq!(err.0, "8 KV heads do not divide by 3");
        let err = check_world_size(&s, 16).expect_err("16 does not divide 24 heads");
        assert_eq!(err.0, "24 attention heads do not divide by 16");
        assert!(check_world_size(&s, 0).is_err());
    }

    #[test]
    fn quantization_groups_limit_the_world_size() {
        // 32 heads of width 32: o_proj input is 1024. Unquantized, 32 ranks
        // work; with groups of 64, a 32-way slice (32 columns) is half a group.
        let mut s = ModelShape {
            num_hidden_layers: 2,
            hidden_size: 1024,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            intermediate_size: 4096,
            vocab_size: 1000,
            head_dim: None,
            tie_word_embeddings: true,
            quantization: None,
            dtype: WeightDtype::BFloat16,
        };
        assert_eq!(valid_world_sizes(&s, 64), vec![1, 2, 4, 8, 16, 32]);
        s.quantization = Some(Quantization {
            bits: 4,
            group_size: 64,
        });
        assert_eq!(valid_world_sizes(&s, 64), vec![1, 2, 4, 8, 16]);
        let err = check_world_size(&s, 32).expect_err("half a group");
        assert!(err.0.contains("o_proj"), "{err}");
    }

    #[test]
    fn nonsense_shapes_give_errors_not_panics() {
        let zero = ModelShape {
            num_hidden_layers: 0,
            hidden_size: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            intermediate_size: 0,
            vocab_size: 0,
            head_dim: None,
            tie_word_embeddings: false,
            quantization: Some(Quantization {
                bits: 4,
                group_size: 0,
            }),
            dtype: WeightDtype::Float32,
        };
        assert!(zero.validate().is_err());
        assert!(valid_world_sizes(&zero, 8).is_empty());
        assert_eq!(
            memory_per_rank(&zero, 0, ServingBudget::batched(0, 0, 0)).total(),
            0
        );
        let huge = ModelShape {
            num_hidden_layers: u32::MAX,
            hidden_size: u32::MAX,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            intermediate_size: u32::MAX,
            vocab_size: u32::MAX,
            head_dim: Some(u32::MAX),
            tie_word_embeddings: false,
            quantization: None,
            dtype: WeightDtype::Float32,
        };
        let most = ServingBudget::batched(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(memory_per_rank(&huge, 1, most).total(), u64::MAX);
    }

    #[test]
    fn llama_70b_4bit_on_4_ranks_with_8k_context() {
        // Worked by hand:
        // - one layer's q/k/v/o/gate/up/down hold 855,638,016 weights; at 4 bits
        //   plus a bf16 scale and bias per 64 weights that is 0.5625 bytes each,
        //   481,296,384 bytes; 80 layers / 4 ranks = 9,625,927,680 bytes;
        // - embeddings and the untied lm_head (128256 × 8192, also 4-bit) are
        //   591,003,648 bytes each, the 161 norms 2,637,824: 1,184,645,120 replicated;
        // - KV cache: 2 × 80 layers × 2 KV heads × 128 × 8192 tokens × 2 bytes
        //   = 671,088,640.
        // Total 11,481,661,440 bytes: 11.5 GB, 10.7 GiB per rank.
        let s = shape("mlx-community/Llama-3.3-70B-Instruct-4bit");
        let m = memory_per_rank(&s, 4, single_context(8192));
        assert_eq!(m.sharded_weight_bytes, 9_625_927_680);
        assert_eq!(m.replicated_weight_bytes, 1_184_645_120);
        assert_eq!(m.kv_cache_bytes, 671_088_640);
        assert_eq!(m.prefix_cache_bytes, 0);
        assert_eq!(m.total(), 11_481_661_440);
        assert!((11.3e9..11.7e9).contains(&(m.total() as f64)));
    }

    #[test]
    fn a_batch_counts_its_token_budget_and_the_prefix_cache() {
        // The 70B on 4 ranks with a 32768-token batch and a 512 MiB prefix
        // cache: four times the 8k KV cache above, plus the cache.
        let s = shape("mlx-community/Llama-3.3-70B-Instruct-4bit");
        let m = memory_per_rank(&s, 4, ServingBudget::batched(8192, 32768, 512 << 20));
        assert_eq!(m.kv_cache_bytes, 4 * 671_088_640);
        assert_eq!(m.prefix_cache_bytes, 536_870_912);
        assert_eq!(
            m.total(),
            9_625_927_680 + 1_184_645_120 + 4 * 671_088_640 + 536_870_912
        );
        // A budget below one longest request still holds that request.
        assert_eq!(ServingBudget::batched(8192, 1024, 0), single_context(8192));
    }

    #[test]
    fn memory_per_rank_shrinks_as_ranks_grow() {
        for entry in CATALOG {
            let sizes = valid_world_sizes(&entry.shape, 64);
            let totals: Vec<u64> = sizes
                .iter()
                .map(|&n| memory_per_rank(&entry.shape, n, single_context(8192)).total())
                .collect();
            assert!(totals.windows(2).all(|w| w[1] < w[0]), "{}", entry.model_id);
        }
    }

    #[test]
    fn fp16_dtype_and_no_quantization_counts_two_bytes_per_weight() {
        let s = shape("mlx-community/llama-3.3-70b-instruct-fp16");
        assert_eq!(s.quantization, None);
        assert_eq!(s.dtype, WeightDtype::Float16);
        // 70.55 billion parameters at two bytes each.
        assert_eq!(s.total_weight_bytes(), 141_107_412_992);
    }
}
