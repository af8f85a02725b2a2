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

    /// RoPE of `x` (`[B, heads, L, head_dim]`) with each of the `B` rows
    /// starting at its own position (`offsets`, `[B]` int32).
    fn apply_at(&self, x: &Array, offsets: &Array) -> mlx_rs::error::Result<Array> {
        fast::rope_dynamic(
            x,
            self.dims,
            self.traditional,
            self.base,
            self.scale,
            offsets,
            self.freqs.as_ref(),
        )
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

/// The keys and values of a batch of sequences, one row per sequence: per
/// layer one buffer `[rows, kv_heads, capacity + 1, head_dim]` for keys and
/// one for values.
///
/// One buffer for the whole batch is what lets a decode step run attention
/// for every sequence in one call (one query per row, each against its own
/// row, masked past its own length) instead of one call per sequence; on a
/// GPU that per-sequence launch overhead, not bandwidth, is what limits a
/// batch. The last column is scratch: rows that are not decoding in a step
/// write their (discarded) key there.
///
/// The capacity grows in steps of [`CACHE_STEP`] positions and depends only
/// on the positions held, never on how many tokens a request may still
/// generate: on a GPU, MLX builds and caches kernels (and cuDNN attention
/// graphs) per shape, so a buffer sized by `max_tokens` would make every new
/// `max_tokens` pay that again. Whole steps also keep a sequence's decode
/// attention the same computation alone and in a batch (see
/// [`Llama::forward_segments`]). The buffer is rectangular: it holds rows ×
/// the longest row's capacity, which is what the scheduler's token limit
/// bounds.
#[derive(Debug)]
pub struct KvCache {
    /// `(keys, values)` per layer; empty while nothing is allocated.
    layers: Vec<(Array, Array)>,
    /// Positions held by each row; `None` for a free row.
    rows: Vec<Option<i32>>,
    /// Rows the buffers have.
    allocated: i32,
    /// Positions per row, the scratch column not counted.
    capacity: i32,
    depth: usize,
    kv_heads: i32,
    head_dim: i32,
    dtype: Dtype,
}

impl KvCache {
    fn new(depth: usize, kv_heads: i32, head_dim: i32, dtype: Dtype) -> KvCache {
        KvCache {
            layers: Vec::new(),
            rows: Vec::new(),
            allocated: 0,
            capacity: 0,
            depth,
            kv_heads,
            head_dim,
            dtype,
        }
    }

    /// Takes a free row for a new sequence (holding no positions yet).
    pub fn claim(&mut self) -> usize {
        match self.rows.iter().position(Option::is_none) {
            Some(row) => {
                self.rows[row] = Some(0);
                row
            }
            None => {
                self.rows.push(Some(0));
                self.rows.len() - 1
            }
        }
    }

    /// Frees `row`. The buffers keep their size until [`KvCache::settle`].
    pub fn release(&mut self, row: usize) {
        if let Some(slot) = self.rows.get_mut(row) {
            *slot = None;
        }
    }

    /// After rows were freed, moves the highest rows into the free ones and
    /// shrinks the buffers to the rows in use and the capacity they need, so
    /// what the cache holds stays rows in use × the longest row (the bound
    /// the scheduler keeps to). Returns the moves, `(from, to)`, for the
    /// caller to follow; with no row in use the buffers are dropped.
    pub fn settle(&mut self) -> mlx_rs::error::Result<Vec<(usize, usize)>> {
        let mut moves = Vec::new();
        loop {
            while self.rows.last() == Some(&None) {
                self.rows.pop();
            }
            let Some(hole) = self.rows.iter().position(Option::is_none) else {
                break;
            };
            let from = self.rows.len() - 1;
            let (f, t) = (from as i32, hole as i32);
            for (k, v) in &mut self.layers {
                let moved = k.try_index(f..f + 1)?;
                k.try_index_mut(t..t + 1, &moved)?;
                let moved = v.try_index(f..f + 1)?;
                v.try_index_mut(t..t + 1, &moved)?;
            }
            self.rows[hole] = self.rows[from].take();
            moves.push((from, hole));
        }
        if self.rows.is_empty() {
            self.layers.clear();
            self.allocated = 0;
            self.capacity = 0;
            return Ok(moves);
        }
        let held = self.rows.iter().flatten().copied().max().unwrap_or(0);
        let wanted = (held.max(1) + CACHE_STEP - 1) / CACHE_STEP * CACHE_STEP;
        let rows = self.rows.len() as i32;
        if !self.layers.is_empty() && (wanted < self.capacity || rows < self.allocated) {
            // A view now; the next write copies it into a buffer of its own
            // and the larger one is freed.
            for (k, v) in &mut self.layers {
                *k = k.try_index((..rows, .., ..wanted + 1, ..))?;
                *v = v.try_index((..rows, .., ..wanted + 1, ..))?;
            }
            self.allocated = rows;
            self.capacity = wanted;
        }
        Ok(moves)
    }

    /// Positions `row` holds (`None` for a free row).
    pub fn offset(&self, row: usize) -> Option<i32> {
        self.rows.get(row).copied().flatten()
    }

    /// Positions each row has room for.
    pub fn capacity(&self) -> i32 {
        self.capacity
    }

    /// Rows the buffers hold (in use or not).
    pub fn allocated_rows(&self) -> i32 {
        self.allocated
    }

    /// Makes room for every claimed row and for `positions` positions per
    /// row, growing the buffers (rows by what is claimed, positions in whole
    /// steps) and keeping what they hold.
    fn reserve(&mut self, positions: i32) -> mlx_rs::error::Result<()> {
        let rows = self.rows.len() as i32;
        let wanted = (positions.max(1) + CACHE_STEP - 1) / CACHE_STEP * CACHE_STEP;
        let capacity = self.capacity.max(wanted);
        if !self.layers.is_empty() && rows <= self.allocated && capacity == self.capacity {
            return Ok(());
        }
        let (kv, dim) = (self.kv_heads, self.head_dim);
        let fresh = |r: i32, c: i32| ops::zeros_dtype(&[r, kv, c, dim], self.dtype);
        let rows = rows.max(self.allocated);
        let mut layers = Vec::with_capacity(self.depth);
        for index in 0..self.depth {
            let grown = match self.layers.get(index) {
                None => (fresh(rows, capacity + 1)?, fresh(rows, capacity + 1)?),
                Some((k, v)) => {
                    let grow = |old: &Array| -> mlx_rs::error::Result<Array> {
                        // The held positions, then the new ones and a fresh
                        // scratch column; then any new rows.
                        let held = old.try_index((.., .., ..self.capacity, ..))?;
                        let wide = ops::concatenate(
                            &[held, fresh(self.allocated, capacity + 1 - self.capacity)?],
                            2,
                        )?;
                        if rows > self.allocated {
                            ops::concatenate(
                                &[wide, fresh(rows - self.allocated, capacity + 1)?],
                                0,
                            )
                        } else {
                            Ok(wide)
                        }
                    };
                    (grow(k)?, grow(v)?)
                }
            };
            layers.push(grown);
        }
        self.layers = layers;
        self.allocated = rows;
        self.capacity = capacity;
        Ok(())
    }

    /// The cache's arrays, for evaluation.
    pub fn arrays(&self) -> Vec<&Array> {
        self.layers.iter().flat_map(|(k, v)| [k, v]).collect()
    }

    /// Copies of the first `len` positions of `row`, per layer `(keys,
    /// values)` as `[1, kv_heads, len, head_dim]`, for keeping after the
    /// sequence ends (they do not hold on to the batch's buffers); `None`
    /// when the row holds fewer.
    pub fn prefix(
        &self,
        row: usize,
        len: i32,
    ) -> mlx_rs::error::Result<Option<Vec<(Array, Array)>>> {
        match self.offset(row) {
            Some(held) if len > 0 && len <= held => {}
            _ => return Ok(None),
        }
        let index = Array::from_slice(&[row as i32], &[1]);
        let copy = |buffer: &Array| -> mlx_rs::error::Result<Array> {
            // A gather writes a new array; a slice would be a view that keeps
            // the whole batch buffer alive (and stops in-place updates).
            buffer.try_index((.., .., ..len, ..))?.take_axis(&index, 0)
        };
        self.layers
            .iter()
            .map(|(k, v)| Ok((copy(k)?, copy(v)?)))
            .collect::<mlx_rs::error::Result<Vec<_>>>()
            .map(Some)
    }

    /// Starts `row` (claimed, empty) with the first `len` positions of
    /// `layers` (per layer `(keys, values)`, `[1, kv_heads, >= len,
    /// head_dim]`).
    pub fn start_from(
        &mut self,
        row: usize,
        layers: &[(Array, Array)],
        len: i32,
    ) -> mlx_rs::error::Result<()> {
        if self.offset(row) != Some(0) || layers.len() != self.depth {
            return Err(mlx_rs::error::Exception::custom(format!(
                "row {row} cannot start from a prefix of {} layers",
                layers.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        self.reserve(len)?;
        let r = row as i32;
        for ((k_buf, v_buf), (k, v)) in self.layers.iter_mut().zip(layers) {
            k_buf.try_index_mut((r..r + 1, .., ..len, ..), k.try_index((.., .., ..len, ..))?)?;
            v_buf.try_index_mut((r..r + 1, .., ..len, ..), v.try_index((.., .., ..len, ..))?)?;
        }
        self.rows[row] = Some(len);
        Ok(())
    }
}

/// One sequence's new positions in a batched step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The sequence's row in the [`KvCache`].
    pub row: usize,
    /// How many positions (at least 1).
    pub len: i32,
}

/// The one-position segments of a step, attended together over every row.
struct DecodeLayout {
    /// Rows of the cache.
    rows: i32,
    /// Per row, the flat position of its query (0 for rows not decoding).
    source: Array,
    /// Per row, where its key goes: its length, or the scratch column for
    /// rows not decoding (also its RoPE offset).
    write: Array,
    /// `write` broadcast to `[rows, kv_heads, 1, head_dim]`.
    write_index: Array,
    /// `[rows, 1, 1, capacity]`: which positions each row attends to.
    mask: Array,
}

/// A longer segment (a prompt chunk), attended on its own.
struct PrefillSegment {
    row: i32,
    /// Where its positions start in the step's flat order.
    flat: i32,
    len: i32,
    /// Positions its row held before the step.
    start: i32,
}

/// How a step's positions map onto the cache, shared by every layer.
struct StepLayout {
    decode: Option<DecodeLayout>,
    prefill: Vec<PrefillSegment>,
    /// The cache's capacity for the step.
    capacity: i32,
    /// Where each flat position's attention output is in the joined parts
    /// (decode rows first, then each prompt chunk); `None` when they are
    /// already in flat order.
    order: Option<Array>,
}

impl StepLayout {
    /// Checks `segments` against `cache`, makes room for them, and lays the
    /// step out.
    fn new(
        cache: &mut KvCache,
        segments: &[Segment],
        kv_heads: i32,
        head_dim: i32,
    ) -> Result<StepLayout> {
        let mlx = EngineError::mlx;
        let mut seen = vec![false; cache.rows.len()];
        let mut needed = 0;
        for s in segments {
            let held = match cache.offset(s.row) {
                Some(held) if !seen[s.row] && s.len >= 1 => held,
                _ => {
                    return Err(EngineError::Argument(format!(
                        "a batched step needs distinct claimed rows and no empty segment \
                         (row {}, {} positions)",
                        s.row, s.len
                    )));
                }
            };
            seen[s.row] = true;
            needed = needed.max(held + s.len);
        }
        if segments.is_empty() {
            return Err(EngineError::Argument(
                "a batched step with no segment".into(),
            ));
        }
        cache.reserve(needed).map_err(mlx("growing the KV cache"))?;
        let capacity = cache.capacity;
        let rows = cache.allocated;

        let mut source = vec![0i32; rows as usize];
        let mut write = vec![capacity; rows as usize];
        let decoding = segments.iter().any(|s| s.len == 1);
        let mut prefill = Vec::new();
        // Where each flat position's output lands in the joined parts: a
        // decode at its row, prompt chunks after all the rows, in flat order.
        let mut flat_order = Vec::new();
        let mut joined = if decoding { rows } else { 0 };
        let mut flat = 0;
        for s in segments {
            let start = cache.offset(s.row).unwrap_or(0);
            if s.len == 1 {
                source[s.row] = flat;
                write[s.row] = start;
                flat_order.push(s.row as i32);
            } else {
                prefill.push(PrefillSegment {
                    row: s.row as i32,
                    flat,
                    len: s.len,
                    start,
                });
                flat_order.extend(joined..joined + s.len);
                joined += s.len;
            }
            flat += s.len;
        }
        let identity = flat_order.iter().enumerate().all(|(i, &j)| i as i32 == j)
            && joined as usize == flat_order.len();
        let order = (!identity).then(|| Array::from_slice(&flat_order, &[flat]));

        let decode = if decoding {
            let write = Array::from_slice(&write, &[rows]);
            let positions = ops::arange::<_, i32>(0, capacity, None).map_err(mlx("decode mask"))?;
            let mask = write
                .reshape(&[rows, 1])
                .and_then(|w| positions.le(&w))
                .and_then(|m| m.reshape(&[rows, 1, 1, capacity]))
                .map_err(mlx("decode mask"))?;
            let write_index = write
                .reshape(&[rows, 1, 1, 1])
                .and_then(|w| ops::broadcast_to(&w, &[rows, kv_heads, 1, head_dim]))
                .map_err(mlx("decode mask"))?;
            Some(DecodeLayout {
                rows,
                source: Array::from_slice(&source, &[rows]),
                write,
                write_index,
                mask,
            })
        } else {
            None
        };
        Ok(StepLayout {
            decode,
            prefill,
            capacity,
            order,
        })
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

    /// An empty KV cache for a batch, with this rank's KV heads.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.blocks.len(),
            self.kv_heads,
            self.config.head_dim as i32,
            self.compute,
        )
    }

    /// Sums a partial result over the group (identity on one rank).
    fn all_sum(&self, x: Array) -> Result<Array> {
        match &self.group {
            Some(group) => Ok(group.all_sum(&x)?),
            None => Ok(x),
        }
    }

    /// Runs the blocks over `ids` (`[1, L]` int32) for the sequence in
    /// `row` of `cache`, at its position, returning the final hidden states
    /// `[1, L, hidden]` before the final norm. Lazy: nothing is computed
    /// until the result is evaluated.
    pub fn forward_hidden(&self, ids: &Array, cache: &mut KvCache, row: usize) -> Result<Array> {
        let len = ids.shape().last().copied().unwrap_or(0);
        self.forward_segments(ids, cache, &[Segment { row, len }])
    }

    /// One step over several sequences at once. `ids` (`[1, N]` int32) holds
    /// the new positions of every sequence back to back: the first
    /// `segments[0].len` belong to the sequence in row `segments[0].row` of
    /// `cache`, and so on. Every projection, the MLP and the collectives run
    /// once over all `N` positions (one read of the weights for the whole
    /// batch). Attention runs once for all the one-position segments (decode
    /// steps), over the whole buffer with each row masked past its own
    /// length, and once per longer segment (a prompt chunk), against that
    /// sequence's row, causally, exactly as it would alone. Returns the
    /// hidden states `[1, N, hidden]` before the final norm. Lazy.
    ///
    /// A sequence's decode attention is the same computation alone and in a
    /// batch: the masked length is the buffer's capacity, a whole number of
    /// [`CACHE_STEP`]s either way, and the masked positions add exact zeros.
    pub fn forward_segments(
        &self,
        ids: &Array,
        cache: &mut KvCache,
        segments: &[Segment],
    ) -> Result<Array> {
        let mlx = EngineError::mlx;
        let layout = StepLayout::new(cache, segments, self.kv_heads, self.config.head_dim as i32)?;
        if cache.layers.len() != self.blocks.len() {
            return Err(EngineError::Argument(format!(
                "a KV cache of {} layers for a model of {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let mut x = self
            .embed
            .lookup(ids, self.compute)
            .map_err(mlx("embedding lookup"))?;
        for (i, (block, layer)) in self.blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
            x = self.block(block, &x, layer, &layout).map_err(|e| match e {
                EngineError::Mlx { context, source } => EngineError::Mlx {
                    context: format!("layer {i}: {context}"),
                    source,
                },
                other => other,
            })?;
        }
        for segment in segments {
            let held = cache.offset(segment.row).unwrap_or(0);
            cache.rows[segment.row] = Some(held + segment.len);
        }
        Ok(x)
    }

    /// Attention of the step's new positions (`q`, `k`, `v` as `[1, N,
    /// width]`) against the batch's cache, written into `layer`: `[1, N,
    /// heads * head_dim]`.
    fn attend(
        &self,
        q: &Array,
        k: &Array,
        v: &Array,
        layer: &mut (Array, Array),
        layout: &StepLayout,
    ) -> Result<Array> {
        let mlx = EngineError::mlx;
        let (keys, values) = layer;
        // Every write first, then every read, so each buffer is updated in
        // place (nothing else refers to it while it is written).
        let decode = match &layout.decode {
            None => None,
            Some(d) => {
                let rows = |x: &Array, n: i32| -> mlx_rs::error::Result<Array> {
                    x.take_axis(&d.source, 1)?
                        .reshape(&[d.rows, 1, n, -1])?
                        .transpose_axes(&[0, 2, 1, 3])
                };
                let q = rows(q, self.heads).map_err(mlx("decode queries"))?;
                let k = rows(k, self.kv_heads).map_err(mlx("decode keys"))?;
                let v = rows(v, self.kv_heads).map_err(mlx("decode values"))?;
                let q = self.rope.apply_at(&q, &d.write).map_err(mlx("rope"))?;
                let k = self.rope.apply_at(&k, &d.write).map_err(mlx("rope"))?;
                *keys = keys
                    .put_along_axis(&d.write_index, &k, 2)
                    .map_err(mlx("KV cache update"))?;
                *values = values
                    .put_along_axis(&d.write_index, &v, 2)
                    .map_err(mlx("KV cache update"))?;
                Some(q)
            }
        };
        let mut prefill = Vec::with_capacity(layout.prefill.len());
        for s in &layout.prefill {
            let part = |x: &Array, n: i32| -> mlx_rs::error::Result<Array> {
                x.try_index((.., s.flat..s.flat + s.len, ..))?
                    .reshape(&[1, s.len, n, -1])?
                    .transpose_axes(&[0, 2, 1, 3])
            };
            let q = part(q, self.heads).map_err(mlx("q_proj"))?;
            let k = part(k, self.kv_heads).map_err(mlx("k_proj"))?;
            let v = part(v, self.kv_heads).map_err(mlx("v_proj"))?;
            let q = self.rope.apply(&q, s.start).map_err(mlx("rope"))?;
            let k = self.rope.apply(&k, s.start).map_err(mlx("rope"))?;
            let at = (s.row..s.row + 1, .., s.start..s.start + s.len, ..);
            keys.try_index_mut(at.clone(), &k)
                .and_then(|_| values.try_index_mut(at, &v))
                .map_err(mlx("KV cache update"))?;
            prefill.push((s, q));
        }

        let mut parts = Vec::with_capacity(prefill.len() + 1);
        if let (Some(d), Some(q)) = (&layout.decode, decode) {
            let view = |x: &Array| x.try_index((.., .., ..layout.capacity, ..));
            let out = view(keys)
                .and_then(|k| {
                    let v = view(values)?;
                    fast::scaled_dot_product_attention(
                        &q,
                        &k,
                        &v,
                        self.attention_scale,
                        ScaledDotProductAttentionMask::Array(&d.mask),
                        None,
                    )
                })
                .and_then(|o| o.transpose_axes(&[0, 2, 1, 3]))
                .and_then(|o| o.reshape(&[1, d.rows, -1]))
                .map_err(mlx("decode attention"))?;
            parts.push(out);
        }
        for (s, q) in prefill {
            let view = |x: &Array| x.try_index((s.row..s.row + 1, .., ..s.start + s.len, ..));
            let mask = (s.len > 1).then_some(ScaledDotProductAttentionMask::Causal);
            let out = view(keys)
                .and_then(|k| {
                    let v = view(values)?;
                    fast::scaled_dot_product_attention(&q, &k, &v, self.attention_scale, mask, None)
                })
                .and_then(|o| o.transpose_axes(&[0, 2, 1, 3]))
                .and_then(|o| o.reshape(&[1, s.len, -1]))
                .map_err(mlx("attention"))?;
            parts.push(out);
        }
        let joined = if parts.len() == 1 {
            parts.remove(0)
        } else {
            ops::concatenate(&parts, 1).map_err(mlx("joining the batch"))?
        };
        match &layout.order {
            None => Ok(joined),
            Some(order) => joined
                .take_axis(order, 1)
                .map_err(mlx("ordering the batch")),
        }
    }

    fn block(
        &self,
        block: &Block,
        x: &Array,
        layer: &mut (Array, Array),
        layout: &StepLayout,
    ) -> Result<Array> {
        let mlx = EngineError::mlx;
        let eps = self.config.rms_norm_eps;

        // Attention.
        let normed = fast::rms_norm(x, Some(&block.input_norm), eps).map_err(mlx("input norm"))?;
        let q = block.q_proj.forward(&normed).map_err(mlx("q_proj"))?;
        let k = block.k_proj.forward(&normed).map_err(mlx("k_proj"))?;
        let v = block.v_proj.forward(&normed).map_err(mlx("v_proj"))?;
        let attn = self.attend(&q, &k, &v, layer, layout)?;
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
    pub fn forward_last(&self, ids: &Array, cache: &mut KvCache, row: usize) -> Result<Array> {
        let hidden = self.forward_hidden(ids, cache, row)?;
        let len = hidden.shape()[1];
        let last = hidden
            .try_index((.., len - 1, ..))
            .map_err(EngineError::mlx("selecting the last position"))?;
        self.logits(&last)
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

    fn held(cache: &KvCache, row: usize) -> Vec<f32> {
        let len = cache.offset(row).expect("claimed");
        let layers = cache.prefix(row, len).expect("prefix").expect("held");
        let (keys, _) = &layers[0];
        keys.eval().expect("eval");
        keys.try_as_slice::<f32>().expect("floats").to_vec()
    }

    fn cache() -> KvCache {
        KvCache::new(1, 1, 1, Dtype::Float32)
    }

    #[test]
    fn the_cache_grows_in_whole_steps_and_keeps_every_row() {
        let mut cache = cache();
        let first = cache.claim();
        cache
            .start_from(first, &[(positions(0, 200), positions(0, 200))], 128)
            .expect("from a prefix");
        assert_eq!((cache.offset(first), cache.capacity()), (Some(128), 256));
        // A second row, and room for a long chunk: both grow the buffers,
        // and the first row keeps what it held.
        let second = cache.claim();
        cache
            .start_from(second, &[(positions(1000, 300), positions(1000, 300))], 300)
            .expect("a longer prefix");
        assert_eq!(cache.capacity(), 512);
        assert_eq!(cache.allocated_rows(), 2);
        assert_eq!(
            held(&cache, first),
            (0..128).map(|p| p as f32).collect::<Vec<_>>()
        );
        assert_eq!(
            held(&cache, second),
            (1000..1300).map(|p| p as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn freed_rows_are_filled_from_the_top_and_an_empty_cache_holds_nothing() {
        let mut cache = cache();
        let rows: Vec<usize> = (0..3).map(|_| cache.claim()).collect();
        assert_eq!(rows, vec![0, 1, 2]);
        for (row, len) in [(0, 10), (1, 20), (2, 300)] {
            let start = 1000 * row as i32;
            cache
                .start_from(row, &[(positions(start, len), positions(start, len))], len)
                .expect("a prefix");
        }
        assert_eq!((cache.allocated_rows(), cache.capacity()), (3, 512));
        // Row 2 (the long one) leaves: the buffers shrink to what is held.
        cache.release(2);
        assert_eq!(cache.settle().expect("settle"), vec![]);
        assert_eq!((cache.allocated_rows(), cache.capacity()), (2, 256));
        assert_eq!(
            held(&cache, 1),
            (1000..1020).map(|p| p as f32).collect::<Vec<_>>()
        );
        // Row 0 leaves: row 1 moves down into it.
        cache.release(0);
        assert_eq!(cache.settle().expect("settle"), vec![(1, 0)]);
        assert_eq!(cache.allocated_rows(), 1);
        assert_eq!(
            held(&cache, 0),
            (1000..1020).map(|p| p as f32).collect::<Vec<_>>()
        );
        assert_eq!(cache.claim(), 1, "a new sequence takes the next row");
        cache.release(1);
        cache.release(0);
        cache.settle().expect("settle");
        assert_eq!(cache.allocated_rows(), 0);
        assert!(cache.arrays().is_empty());
        assert!(cache.prefix(0, 1).expect("prefix").is_none());
    }

    #[test]
    fn rope_with_a_position_per_row_equals_rope_row_by_row() {
        let rope = Rope {
            dims: 8,
            traditional: false,
            base: Some(10_000.0),
            scale: 1.0,
            freqs: None,
        };
        let values: Vec<f32> = (0..16).map(|v| v as f32 * 0.25 - 1.0).collect();
        let x = Array::from_slice(&values, &[2, 1, 1, 8]);
        let offsets = Array::from_slice(&[3i32, 700], &[2]);
        let together = rope.apply_at(&x, &offsets).expect("rope");
        for (row, offset) in [(0, 3), (1, 700)] {
            let alone = rope
                .apply(&x.try_index(row..row + 1).expect("row"), offset)
                .expect("rope");
            let got = together.try_index(row..row + 1).expect("row");
            got.eval().expect("eval");
            alone.eval().expect("eval");
            assert_eq!(
                got.try_as_slice::<f32>().expect("floats"),
                alone.try_as_slice::<f32>().expect("floats"),
                "row {row}"
            );
        }
    }
}
