//! The Llama 3.x forward pass on MLX, for one tensor-parallel rank.
//!
//! The math is mlx-lm's Llama, op for op and dtype for dtype (so the logits
//! agree to the last bits at world size 1): embeddings (dequantized on lookup
//! when quantized), pre-norm blocks with `fast::rms_norm`, RoPE through
//! `fast::rope` (Llama 3 frequency scaling precomputed as mlx-lm's
//! `Llama3RoPE` does), grouped-query attention through
//! `fast::scaled_dot_product_attention` over a KV cache (causal mask when
//! several positions are processed at once), a SwiGLU MLP, and `lm_head`
//! (the embedding as a linear layer when tied).
//!
//! With `N` ranks each holds `heads/N` query heads, `kv_heads/N` KV heads and
//! `intermediate/N` MLP columns; the partial outputs of `o_proj` and
//! `down_proj` are summed over the group (`all_sum`), after which every rank
//! holds the same residual stream.

use std::path::Path;
use std::time::Instant;

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::{Array, Dtype, ops};

use super::config::{ModelConfig, RopeScaling};
use super::error::{EngineError, Result};
use super::weights::{Checkpoint, Embedding, Linear, Shard, ShardLoader, Split};
use crate::mlx::distributed::Group;

/// KV cache growth step, in positions (as mlx-lm's `KVCache`).
const CACHE_STEP: i32 = 256;

/// The float type activations (the residual stream, attention, KV cache,
/// logits) are computed in. Weights stay as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    /// float32 for quantized models on the CPU, where MLX's quantized kernels
    /// are several times faster (and more accurate) with float32 inputs than
    /// with bf16 ones; the stored dtype everywhere else.
    #[default]
    Auto,
    /// The checkpoint's own dtype, exactly as mlx-lm computes.
    Model,
    /// float32 throughout, as mlx-lm computes after `model.set_dtype(float32)`.
    Float32,
}

impl std::str::FromStr for ComputeDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(ComputeDtype::Auto),
            "model" => Ok(ComputeDtype::Model),
            "float32" | "f32" | "fp32" => Ok(ComputeDtype::Float32),
            _ => Err(EngineError::Argument(format!(
                "compute dtype must be auto, model or float32, not `{s}`"
            ))),
        }
    }
}

/// How a model is run, beyond what its files say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineOptions {
    /// Activation dtype.
    pub compute: ComputeDtype,
}

/// What loading this rank's weights cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadStats {
    /// Bytes read from the checkpoint files (headers included).
    pub bytes_read: u64,
    /// Bytes of all tensors in the checkpoint, for comparison.
    pub checkpoint_bytes: u64,
    /// Wall time of the load, in seconds.
    pub seconds: f64,
}

/// RoPE as applied to queries and keys.
#[derive(Debug)]
struct Rope {
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    freqs: Option<Array>,
}

impl Rope {
    fn new(config: &ModelConfig) -> mlx_rs::error::Result<Rope> {
        let dims = config.head_dim as i32;
        let mut rope = Rope {
            dims,
            traditional: config.rope_traditional,
            base: Some(config.rope_theta),
            scale: 1.0,
            freqs: None,
        };
        match config.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => rope.scale = 1.0 / factor,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_context,
            }) => {
                rope.base = None;
                rope.freqs = Some(llama3_freqs(
                    dims,
                    config.rope_theta,
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    old_context,
                )?);
            }
        }
        Ok(rope)
    }

    fn apply(&self, x: &Array, offset: i32) -> mlx_rs::error::Result<Array> {
        fast::rope(
            x,
            self.dims,
            self.traditional,
            self.base,
            self.scale,
            offset,
            self.freqs.as_ref(),
        )
    }
}

/// Llama 3's scaled RoPE frequencies (the periods `fast::rope` takes), in
/// float32 with MLX ops in the same order as mlx-lm, so both round alike:
/// low frequencies (long wavelengths) are slowed by `factor`, high ones kept,
/// and the band between interpolated smoothly.
fn llama3_freqs(
    dims: i32,
    base: f32,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    old_context: f32,
) -> mlx_rs::error::Result<Array> {
    let low_freq_wavelen = old_context / low_freq_factor;
    let high_freq_wavelen = old_context / high_freq_factor;
    let exponents = ops::arange::<_, f32>(0, dims, 2)?.divide(Array::from_f32(dims as f32))?;
    let freqs = ops::power(Array::from_f32(base), &exponents)?;
    let wavelens = freqs.multiply(Array::from_f32(2.0 * std::f32::consts::PI))?;
    let scaled = freqs.multiply(Array::from_f32(factor))?;
    let freqs = ops::select(
        &wavelens.gt(Array::from_f32(low_freq_wavelen))?,
        &scaled,
        &freqs,
    )?;
    let is_medium = wavelens
        .gt(Array::from_f32(high_freq_wavelen))?
        .logical_and(&wavelens.lt(Array::from_f32(low_freq_wavelen))?)?;
    let smooth = Array::from_f32(old_context)
        .divide(&wavelens)?
        .subtract(Array::from_f32(low_freq_factor))?
        .divide(Array::from_f32(high_freq_factor - low_freq_factor))?;
    let denominator = Array::from_f32(1.0)
        .subtract(&smooth)?
        .divide(Array::from_f32(factor))?
        .add(&smooth)?;
    let smooth_freqs = freqs.divide(&denominator)?;
    let out = ops::select(&is_medium, &smooth_freqs, &freqs)?;
    out.eval()?;
    Ok(out)
}

/// One transformer block's weights (this rank's slices).
#[derive(Debug)]
struct Block {
    input_norm: Array,
    post_attention_norm: Array,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Block {
    fn arrays(&self) -> Vec<&Array> {
        let mut all = vec![&self.input_norm, &self.post_attention_norm];
        for linear in [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ] {
            all.extend(linear.arrays());
        }
        all
    }
}

/// The keys and values of one layer for the positions seen so far, in a
/// buffer that grows in steps of [`CACHE_STEP`] positions so a decode step
/// writes in place.
///
/// The buffer's length depends only on the positions held, never on how many
/// tokens a request may still generate: on a GPU, MLX builds and caches
/// kernels (and cuDNN attention graphs) per shape and stride, so a buffer
/// sized by `max_tokens` would make every new `max_tokens` pay that again.
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    /// Positions cached so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `keys`/`values` (`[B, kv_heads, L, head_dim]`) and returns all
    /// cached positions.
    fn update(&mut self, keys: &Array, values: &Array) -> mlx_rs::error::Result<(Array, Array)> {
        let shape = keys.shape().to_vec();
        let (b, heads, len, dim) = (shape[0], shape[1], shape[2], shape[3]);
        let prev = self.offset;
        let capacity = self.keys.as_ref().map(|k| k.shape()[2]).unwrap_or(0);
        if self.keys.is_none() || prev + len > capacity {
            // The new buffer holds the positions so far and the new ones,
            // rounded up to a whole step (the unused tail of the old buffer
            // is dropped, so count from `prev`, not from the old capacity).
            let wanted = (prev + len + CACHE_STEP - 1) / CACHE_STEP * CACHE_STEP;
            let grow = [b, heads, wanted - prev, dim];
            let new_k = ops::zeros_dtype(&grow, keys.dtype())?;
            let new_v = ops::zeros_dtype(&grow, values.dtype())?;
            match (self.keys.take(), self.values.take()) {
                (Some(k), Some(v)) => {
                    let k = k.try_index((.., .., ..prev, ..))?;
                    let v = v.try_index((.., .., ..prev, ..))?;
                    self.keys = Some(ops::concatenate(&[k, new_k], 2)?);
                    self.values = Some(ops::concatenate(&[v, new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
        }
        self.offset = prev + len;
        let end = self.offset;
        let (Some(k_buf), Some(v_buf)) = (self.keys.as_mut(), self.values.as_mut()) else {
            return Err(mlx_rs::error::Exception::custom("KV cache buffer missing"));
        };
        k_buf.try_index_mut((.., .., prev..end, ..), keys)?;
        v_buf.try_index_mut((.., .., prev..end, ..), values)?;
        Ok((
            k_buf.try_index((.., .., ..end, ..))?,
            v_buf.try_index((.., .., ..end, ..))?,
        ))
    }

    /// The cache's arrays, for evaluation.
    pub fn arrays(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }

    /// The first `len` positions, as `(keys, values)` (`[B, kv_heads, len,
    /// head_dim]`), for keeping after the sequence ends; `None` when the
    /// cache holds fewer. Lazy views of the buffer, which they keep alive.
    pub fn prefix(&self, len: i32) -> mlx_rs::error::Result<Option<(Array, Array)>> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if len > 0 && len <= self.offset => Ok(Some((
                k.try_index((.., .., ..len, ..))?,
                v.try_index((.., .., ..len, ..))?,
            ))),
            _ => Ok(None),
        }
    }

    /// A cache that starts with the first `len` positions of `keys` and
    /// `values` (copied into a buffer of its own).
    pub fn from_prefix(keys: &Array, values: &Array, len: i32) -> mlx_rs::error::Result<KvCache> {
        let mut cache = KvCache::default();
        if len > 0 {
            let k = keys.try_index((.., .., ..len, ..))?;
            let v = values.try_index((.., .., ..len, ..))?;
            cache.update(&k, &v)?;
        }
        Ok(cache)
    }

    /// Positions the buffer has room for (what it holds in memory).
    pub fn capacity(&self) -> i32 {
        self.keys.as_ref().map_or(0, |k| k.shape()[2])
    }
}

/// A Llama model: this rank's slices of the weights and its group.
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    shard: Shard,
    group: Option<Group>,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Array,
    lm_head: Option<Linear>,
    rope: Rope,
    heads: i32,
    kv_heads: i32,
    attention_scale: f32,
    compute: Dtype,
    load_stats: LoadStats,
}

impl Llama {
    /// Loads this rank's slices of the model in `dir`, computing in the
    /// [`ComputeDtype::Auto`] dtype. `group` is the tensor-parallel group
    /// (`None`, or a group of size 1, for one process).
    pub fn load(dir: &Path, group: Option<Group>) -> Result<Llama> {
        Self::load_with(dir, group, EngineOptions::default())
    }

    /// [`Llama::load`] with explicit [`EngineOptions`].
    pub fn load_with(dir: &Path, group: Option<Group>, options: EngineOptions) -> Result<Llama> {
        let compute = options.compute;
        let started = Instant::now();
        let shard = match &group {
            Some(g) => Shard {
                rank: g.rank(),
                world: g.size(),
            },
            None => Shard::SINGLE,
        };
        let config = ModelConfig::load(dir)?;
        check_world_size(&config, shard.world)?;
        let checkpoint = Checkpoint::open(dir)?;
        let loader = ShardLoader {
            checkpoint: &checkpoint,
            config: &config,
            shard,
        };
        let h = config.hidden_size;
        let q_width = config.num_attention_heads * config.head_dim;
        let kv_width = config.num_key_value_heads * config.head_dim;
        let inter = config.intermediate_size;

        let embed = loader.embedding("model.embed_tokens", config.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let block = Block {
                input_norm: loader.vector(&format!("{p}.input_layernorm.weight"), h)?,
                post_attention_norm: loader
                    .vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                q_proj: loader.linear(&format!("{p}.self_attn.q_proj"), q_width, h, Split::Rows)?,
                k_proj: loader.linear(
                    &format!("{p}.self_attn.k_proj"),
                    kv_width,
                    h,
                    Split::Rows,
                )?,
                v_proj: loader.linear(
                    &format!("{p}.self_attn.v_proj"),
                    kv_width,
                    h,
                    Split::Rows,
                )?,
                o_proj: loader.linear(
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    q_width,
                    Split::Columns,
                )?,
                gate_proj: loader.linear(&format!("{p}.mlp.gate_proj"), inter, h, Split::Rows)?,
                up_proj: loader.linear(&format!("{p}.mlp.up_proj"), inter, h, Split::Rows)?,
                down_proj: loader.linear(
                    &format!("{p}.mlp.down_proj"),
                    h,
                    inter,
                    Split::Columns,
                )?,
            };
            // Materialize layer by layer so the read buffers are freed as we go.
            mlx_rs::transforms::eval(block.arrays())
                .map_err(EngineError::mlx(format!("loading layer {i}")))?;
            blocks.push(block);
        }
        let norm = loader.vector("model.norm.weight", h)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(loader.linear("lm_head", config.vocab_size, h, Split::Full)?)
        };
        let mut tail: Vec<&Array> = embed.arrays();
        tail.push(&norm);
        if let Some(head) = &lm_head {
            tail.extend(head.arrays());
        }
        mlx_rs::transforms::eval(tail).map_err(EngineError::mlx("loading embeddings"))?;
        let on_cpu = matches!(
            mlx_rs::Device::default().get_type(),
            Ok(mlx_rs::DeviceType::Cpu) | Err(_)
        );
        let stored = norm.dtype();
        let quantized = embed.is_quantized()
            || blocks
                .first()
                .is_some_and(|b| matches!(b.q_proj, Linear::Quantized { .. }));
        let compute = match compute {
            ComputeDtype::Model => stored,
            ComputeDtype::Float32 => Dtype::Float32,
            ComputeDtype::Auto if on_cpu && quantized => Dtype::Float32,
            ComputeDtype::Auto => stored,
        };
        let mut norm = norm;
        if compute != stored {
            // Norm weights in the compute dtype, as mlx-lm's `set_dtype` has them.
            let mut cast = || -> mlx_rs::error::Result<()> {
                norm = norm.as_dtype(compute)?;
                for block in &mut blocks {
                    block.input_norm = block.input_norm.as_dtype(compute)?;
                    block.post_attention_norm = block.post_attention_norm.as_dtype(compute)?;
                }
                let mut all: Vec<&Array> = vec![&norm];
                for block in &blocks {
                    all.push(&block.input_norm);
                    all.push(&block.post_attention_norm);
                }
                mlx_rs::transforms::eval(all)
            };
            cast().map_err(EngineError::mlx("casting norm weights"))?;
        }
        let rope = Rope::new(&config).map_err(EngineError::mlx("computing RoPE frequencies"))?;
        let world = shard.world as i32;
        let head_dim = config.head_dim as i32;
        let load_stats = LoadStats {
            bytes_read: checkpoint.bytes_read(),
            checkpoint_bytes: checkpoint.total_tensor_bytes(),
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(Llama {
            heads: config.num_attention_heads as i32 / world,
            kv_heads: config.num_key_value_heads as i32 / world,
            attention_scale: (head_dim as f32).powf(-0.5),
            compute,
            config,
            shard,
            group: group.filter(|g| g.size() > 1),
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            load_stats,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// This rank's place in the group.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// What loading cost.
    pub fn load_stats(&self) -> LoadStats {
        self.load_stats
    }

    /// An empty KV cache per layer.
    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.blocks.len()).map(|_| KvCache::default()).collect()
    }

    /// Sums a partial result over the group (identity on one rank).
    fn all_sum(&self, x: Array) -> Result<Array> {
        match &self.group {
            Some(group) => Ok(group.all_sum(&x)?),
            None => Ok(x),
        }
    }

    /// Runs the blocks over `ids` (`[1, L]` int32) at the cache's position,
    /// returning the final hidden states `[1, L, hidden]` before the final
    /// norm. Lazy: nothing is computed until the result is evaluated.
    pub fn forward_hidden(&self, ids: &Array, cache: &mut [KvCache]) -> Result<Array> {
        let len = ids.shape().last().copied().unwrap_or(0);
        self.forward_segments(ids, &mut [cache], &[len])
    }

    /// One step over several sequences at once. `ids` (`[1, N]` int32) holds
    /// the new positions of every sequence back to back: the first `lens[0]`
    /// belong to the sequence of `caches[0]`, and so on. Every projection,
    /// the MLP and the collectives run once over all `N` positions (one read
    /// of the weights for the whole batch); attention runs per sequence,
    /// against that sequence's own cache and position, exactly as it would
    /// alone. Returns the hidden states `[1, N, hidden]` before the final
    /// norm. Lazy.
    pub fn forward_segments(
        &self,
        ids: &Array,
        caches: &mut [&mut [KvCache]],
        lens: &[i32],
    ) -> Result<Array> {
        let mlx = EngineError::mlx;
        if caches.len() != lens.len() || lens.iter().any(|l| *l < 1) {
            return Err(EngineError::Argument(format!(
                "a batched step needs one cache per segment and no empty segment ({} caches, lengths {lens:?})",
                caches.len()
            )));
        }
        let mut x = self
            .embed
            .lookup(ids, self.compute)
            .map_err(mlx("embedding lookup"))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut layer: Vec<&mut KvCache> = Vec::with_capacity(caches.len());
            for cache in caches.iter_mut() {
                let Some(c) = cache.get_mut(i) else {
                    return Err(EngineError::Argument(format!(
                        "a KV cache has no layer {i}"
                    )));
                };
                layer.push(c);
            }
            x = self
                .block(block, &x, &mut layer, lens)
                .map_err(|e| match e {
                    EngineError::Mlx { context, source } => EngineError::Mlx {
                        context: format!("layer {i}: {context}"),
                        source,
                    },
                    other => other,
                })?;
        }
        Ok(x)
    }

    /// Attention of one sequence's `l` new positions (`q`, `k`, `v` as
    /// `[1, l, width]`) against its cache: `[1, l, heads * head_dim]`.
    fn attend(
        &self,
        q: &Array,
        k: &Array,
        v: &Array,
        cache: &mut KvCache,
        l: i32,
    ) -> Result<Array> {
        let mlx = EngineError::mlx;
        let heads = |x: &Array, n: i32| -> mlx_rs::error::Result<Array> {
            x.reshape(&[1, l, n, -1])?.transpose_axes(&[0, 2, 1, 3])
        };
        let q = heads(q, self.heads).map_err(mlx("q_proj"))?;
        let k = heads(k, self.kv_heads).map_err(mlx("k_proj"))?;
        let v = heads(v, self.kv_heads).map_err(mlx("v_proj"))?;
        let offset = cache.offset();
        let q = self.rope.apply(&q, offset).map_err(mlx("rope"))?;
        let k = self.rope.apply(&k, offset).map_err(mlx("rope"))?;
        let (keys, values) = cache.update(&k, &v).map_err(mlx("KV cache update"))?;
        let mask = (l > 1).then_some(ScaledDotProductAttentionMask::Causal);
        fast::scaled_dot_product_attention(&q, &keys, &values, self.attention_scale, mask, None)
            .and_then(|o| o.transpose_axes(&[0, 2, 1, 3]))
            .and_then(|o| o.reshape(&[1, l, -1]))
            .map_err(mlx("attention"))
    }

    fn block(
        &self,
        block: &Block,
        x: &Array,
        caches: &mut [&mut KvCache],
        lens: &[i32],
    ) -> Result<Array> {
        let mlx = EngineError::mlx;
        let eps = self.config.rms_norm_eps;

        // Attention.
        let normed = fast::rms_norm(x, Some(&block.input_norm), eps).map_err(mlx("input norm"))?;
        let q = block.q_proj.forward(&normed).map_err(mlx("q_proj"))?;
        let k = block.k_proj.forward(&normed).map_err(mlx("k_proj"))?;
        let v = block.v_proj.forward(&normed).map_err(mlx("v_proj"))?;
        let attn = match (caches, lens) {
            ([cache], [l]) => self.attend(&q, &k, &v, cache, *l)?,
            (caches, lens) => {
                let mut parts = Vec::with_capacity(lens.len());
                let mut start = 0;
                for (cache, &l) in caches.iter_mut().zip(lens) {
                    let end = start + l;
                    let part = |x: &Array| {
                        x.try_index((.., start..end, ..))
                            .map_err(mlx("splitting the batch"))
                    };
                    parts.push(self.attend(&part(&q)?, &part(&k)?, &part(&v)?, cache, l)?);
                    start = end;
                }
                ops::concatenate(&parts, 1).map_err(mlx("joining the batch"))?
            }
        };
        let o = block.o_proj.forward(&attn).map_err(mlx("o_proj"))?;
        let o = self.all_sum(o)?;
        let h = x.add(&o).map_err(mlx("attention residual"))?;

        // MLP.
        let normed = fast::rms_norm(&h, Some(&block.post_attention_norm), eps)
            .map_err(mlx("post-attention norm"))?;
        let gate = block.gate_proj.forward(&normed).map_err(mlx("gate_proj"))?;
        let up = block.up_proj.forward(&normed).map_err(mlx("up_proj"))?;
        let act = gate
            .multiply(ops::sigmoid(&gate).map_err(mlx("silu"))?)
            .and_then(|silu| silu.multiply(&up))
            .map_err(mlx("swiglu"))?;
        let down = block.down_proj.forward(&act).map_err(mlx("down_proj"))?;
        let down = self.all_sum(down)?;
        h.add(&down).map_err(mlx("MLP residual"))
    }

    /// Final norm and output projection of hidden states `[.., hidden]`,
    /// giving logits `[.., vocab]` in the model's dtype.
    pub fn logits(&self, hidden: &Array) -> Result<Array> {
        let mlx = EngineError::mlx;
        let normed = fast::rms_norm(hidden, Some(&self.norm), self.config.rms_norm_eps)
            .map_err(mlx("final norm"))?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed.table);
        match &self.group {
            Some(group) => self.vocab_parallel(head, &normed, group),
            None => head.forward(&normed).map_err(mlx("lm_head")),
        }
    }

    /// The output projection with its work split over the group: every rank
    /// holds the whole matrix (it is replicated), computes the logits of its
    /// share of the vocabulary, places them in an otherwise zero vector, and
    /// the `all_sum` assembles the rest. Each logit is the same product as on
    /// one rank and `x + 0` is exact, so the result is bit for bit the
    /// unsplit one, at a fraction of the (largest single) matrix product.
    fn vocab_parallel(&self, head: &Linear, normed: &Array, group: &Group) -> Result<Array> {
        let vocab = head.out_features();
        let world = self.shard.world as i32;
        let per_rank = (vocab + world - 1) / world;
        let start = (self.shard.rank as i32 * per_rank).min(vocab);
        let end = (start + per_rank).min(vocab);
        let part = || -> mlx_rs::error::Result<Array> {
            if start >= end {
                // More ranks than rows: this rank adds nothing.
                let mut shape = normed.shape().to_vec();
                let last = shape.len() - 1;
                shape[last] = vocab;
                return ops::zeros_dtype(&shape, self.compute);
            }
            let mine = head.forward_rows(normed, start, end)?;
            let mut shape = mine.shape().to_vec();
            let last = shape.len() - 1;
            let mut pieces = Vec::with_capacity(3);
            if start > 0 {
                shape[last] = start;
                pieces.push(ops::zeros_dtype(&shape, mine.dtype())?);
            }
            let after = vocab - end;
            pieces.push(mine);
            if after > 0 {
                shape[last] = after;
                pieces.push(ops::zeros_dtype(&shape, pieces[0].dtype())?);
            }
            ops::concatenate(&pieces, -1)
        };
        let padded = part().map_err(EngineError::mlx("lm_head"))?;
        Ok(group.all_sum(&padded)?)
    }

    /// Logits of the last position after running `ids` (`[1, L]`) through the
    /// model: `[1, vocab]`. Lazy.
    pub fn forward_last(&self, ids: &Array, cache: &mut [KvCache]) -> Result<Array> {
        let hidden = self.forward_hidden(ids, cache)?;
        let len = hidden.shape()[1];
        let last = hidden
            .try_index((.., len - 1, ..))
            .map_err(EngineError::mlx("selecting the last position"))?;
        self.logits(&last)
    }

    /// Logits of every position of `ids` (`[1, L]`): `[1, L, vocab]`. Lazy.
    pub fn forward_all(&self, ids: &Array, cache: &mut [KvCache]) -> Result<Array> {
        let hidden = self.forward_hidden(ids, cache)?;
        self.logits(&hidden)
    }

    /// The dtype activations and logits are computed in.
    pub fn compute_dtype(&self) -> Dtype {
        self.compute
    }

    /// Bytes of KV cache one position takes on this rank (keys and values
    /// of every layer, this rank's KV heads, in the compute dtype).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let item: u64 = match self.compute {
            Dtype::Float32 | Dtype::Int32 | Dtype::Uint32 => 4,
            Dtype::Float64 | Dtype::Int64 | Dtype::Uint64 | Dtype::Complex64 => 8,
            Dtype::Bool | Dtype::Int8 | Dtype::Uint8 => 1,
            _ => 2,
        };
        self.blocks.len() as u64 * 2 * self.kv_heads as u64 * self.config.head_dim as u64 * item
    }
}

/// Checks that `world` ranks can split the model, with the planner's rules
/// (and its messages listing what would work).
pub fn check_world_size(config: &ModelConfig, world: usize) -> Result<()> {
    let shape = config.shape();
    let narrowed = u32::try_from(world).unwrap_or(u32::MAX);
    tandem_planner::check_world_size(&shape, narrowed).map_err(|e| {
        let valid = tandem_planner::valid_world_sizes(&shape, tandem_planner::MAX_WORLD_SIZE);
        let valid: Vec<String> = valid.iter().map(u32::to_string).collect();
        EngineError::Sharding {
            world_size: world,
            message: format!("{e}; valid world sizes: {}", valid.join(", ")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positions(start: i32, len: i32) -> Array {
        // [1, 1, len, 1]: each position holds its own index.
        let values: Vec<f32> = (start..start + len).map(|p| p as f32).collect();
        Array::from_slice(&values, &[1, 1, len, 1])
    }

    fn held(cache: &KvCache) -> Vec<f32> {
        let (keys, _) = cache.prefix(cache.offset()).expect("prefix").expect("held");
        keys.eval().expect("eval");
        keys.try_as_slice::<f32>().expect("floats").to_vec()
    }

    #[test]
    fn the_cache_grows_in_whole_steps_from_a_partly_filled_buffer() {
        // A reused prefix of 128 positions (a buffer of 256), then a prompt
        // chunk of 384 that runs past the buffer's end.
        let mut cache = KvCache::from_prefix(&positions(0, 200), &positions(0, 200), 128)
            .expect("from a prefix");
        assert_eq!((cache.offset(), cache.capacity()), (128, 256));
        cache
            .update(&positions(128, 384), &positions(128, 384))
            .expect("a long chunk");
        assert_eq!((cache.offset(), cache.capacity()), (512, 512));
        cache
            .update(&positions(512, 1), &positions(512, 1))
            .expect("one more");
        assert_eq!((cache.offset(), cache.capacity()), (513, 768));
        let want: Vec<f32> = (0..513).map(|p| p as f32).collect();
        assert_eq!(held(&cache), want);
    }
}
