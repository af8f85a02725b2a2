//! A checkpoint's tensors, and the slices of them one rank loads.
//!
//! The mlx-community layout: `model.safetensors`, or several
//! `model-0000N-of-0000M.safetensors` listed by `model.safetensors.index.json`.
//! A quantized linear layer `P` is `P.weight` (uint32, `bits` values packed per
//! 32-bit word along each row), `P.scales` and `P.biases` (one per group of
//! `group_size` weights of a row, in the model's float dtype).
//!
//! Tensor parallelism (the rule of mlx-lm's `shard_linear`):
//! - [`Split::Rows`] (q/k/v/gate/up projections): rank `r` of `N` reads rows
//!   `r·out/N ..` of the weight, scales and biases — one contiguous read each.
//! - [`Split::Columns`] (o/down projections): it reads columns `r·in/N ..`,
//!   one read per row. For a quantized weight that is packed words
//!   `r·in/N·bits/32 ..` and scales/biases groups `r·in/N/group_size ..`, so the
//!   slice must start and end on group boundaries.
//! - [`Split::Full`]: embeddings, norms and `lm_head`, read whole.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype};

use super::config::{ModelConfig, QuantConfig};
use super::error::{EngineError, Result};
use super::safetensors::{SafetensorsFile, TensorDtype, TensorInfo};

/// This process's place in the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0 .. world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Shard {
    /// The whole model in one process.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };
}

/// Which part of a tensor a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The whole tensor.
    Full,
    /// Its share of the output rows.
    Rows,
    /// Its share of the input columns.
    Columns,
}

/// All tensors of a checkpoint directory, by name, with the file each is in.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<SafetensorsFile>,
    by_name: BTreeMap<String, usize>,
    searched: String,
    bytes_read: Arc<AtomicU64>,
}

impl Checkpoint {
    /// Opens a model directory's safetensors: through
    /// `model.safetensors.index.json` when present, else every
    /// `model*.safetensors` file (as mlx-lm does).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let bytes_read = Arc::new(AtomicU64::new(0));
        let index_path = dir.join("model.safetensors.index.json");
        let (paths, weight_map) = if index_path.is_file() {
            let bytes = std::fs::read(&index_path).map_err(EngineError::io(&index_path))?;
            bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let weight_map = parse_index(&index_path, &bytes)?;
            let bad = |message: String| EngineError::Index {
                file: index_path.clone(),
                message,
            };
            let mut files: Vec<String> = weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            for f in &files {
                if !dir.join(f).is_file() {
                    return Err(bad(format!(
                        "lists `{f}`, which is not in {}",
                        dir.display()
                    )));
                }
            }
            (files, Some((index_path.clone(), weight_map)))
        } else {
            let mut files = Vec::new();
            let entries = std::fs::read_dir(dir).map_err(EngineError::io(dir))?;
            for entry in entries {
                let entry = entry.map_err(EngineError::io(dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("model") && name.ends_with(".safetensors") {
                    files.push(name);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(EngineError::Index {
                    file: dir.to_owned(),
                    message: "no model*.safetensors files and no model.safetensors.index.json"
                        .into(),
                });
            }
            (files, None)
        };

        let mut opened = Vec::new();
        let mut by_name = BTreeMap::new();
        for (i, name) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(&dir.join(name), bytes_read.clone())?;
            for tensor in file.tensors().keys() {
                if let Some(previous) = by_name.insert(tensor.clone(), i) {
                    return Err(EngineError::CorruptHeader {
                        file: file.path().to_owned(),
                        message: format!("tensor `{tensor}` is also in {}", paths[previous]),
                    });
                }
            }
            opened.push(file);
        }
        let searched = match &weight_map {
            Some((index_path, map)) => {
                for (tensor, file) in map {
                    let in_file = by_name
                        .get(tensor)
                        .map(|i| paths[*i] == *file)
                        .unwrap_or(false);
                    if !in_file {
                        return Err(EngineError::Index {
                            file: index_path.clone(),
                            message: format!(
                                "maps `{tensor}` to `{file}`, whose header does not have it"
                            ),
                        });
                    }
                }
                format!("{} and {}", index_path.display(), paths.join(", "))
            }
            None => paths
                .iter()
                .map(|p| dir.join(p).display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        Ok(Checkpoint {
            files: opened,
            by_name,
            searched,
            bytes_read,
        })
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Bytes read from disk so far (headers and tensor slices).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Total size of every tensor in the checkpoint.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.tensors().values())
            .map(|t| t.len)
            .sum()
    }

    fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let missing = || EngineError::MissingTensor {
            tensor: name.to_owned(),
            where_: self.searched.clone(),
        };
        let file = self
            .by_name
            .get(name)
            .and_then(|i| self.files.get(*i))
            .ok_or_else(missing)?;
        let info = file.tensors().get(name).ok_or_else(missing)?;
        Ok((file, info))
    }

    /// Reads this rank's part (`split`) of tensor `name`, checking its
    /// unsharded `shape` and its dtype. For a column split, `group` is the
    /// number of columns a quantization group spans, which a rank's slice
    /// must hold whole.
    fn read(
        &self,
        name: &str,
        shape: &[u64],
        dtype_ok: DtypeRule,
        split: Split,
        shard: Shard,
        group: Option<u64>,
    ) -> Result<Array> {
        let (file, info) = self.locate(name)?;
        let path = file.path().to_owned();
        if info.shape != shape {
            return Err(EngineError::Shape {
                tensor: name.to_owned(),
                file: path,
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        dtype_ok.check(name, &path, info.dtype)?;
        let n = shard.world as u64;
        let r = shard.rank as u64;
        let split_dim = match split {
            Split::Full => None,
            Split::Rows => Some(shape[0]),
            Split::Columns => Some(shape[1]),
        };
        if let Some(dim) = split_dim
            && !dim.is_multiple_of(n)
        {
            return Err(EngineError::Sharding {
                world_size: shard.world,
                message: format!(
                    "tensor `{name}` in {} has {dim} {} to split, not a multiple of {n}",
                    path.display(),
                    if split == Split::Rows {
                        "rows"
                    } else {
                        "columns"
                    }
                ),
            });
        }
        let (bytes, out_shape) = match split {
            Split::Full => (file.read_rows(name, info, 0, shape[0])?, shape.to_vec()),
            Split::Rows => {
                let rows = shape[0] / n;
                let bytes = file.read_rows(name, info, r * rows, rows)?;
                let mut s = shape.to_vec();
                s[0] = rows;
                (bytes, s)
            }
            Split::Columns => {
                let cols = shape[1] / n;
                if let Some(units_per_group) = group
                    && !cols.is_multiple_of(units_per_group)
                {
                    return Err(EngineError::SplitsQuantGroup {
                        tensor: name.to_owned(),
                        file: path,
                        message: format!(
                            "rank {r} of {n} would hold {cols} of its {} columns, which splits a \
                             quantization group of {units_per_group} columns",
                            shape[1]
                        ),
                    });
                }
                let bytes = file.read_columns(name, info, r * cols, cols)?;
                (bytes, vec![shape[0], cols])
            }
        };
        to_array(&bytes, info.dtype, &out_shape).map_err(|source| EngineError::Mlx {
            context: format!("building tensor `{name}` from {}", path.display()),
            source,
        })
    }
}

/// The `weight_map` of a `model.safetensors.index.json` (`path` is for
/// messages): tensor name → file name, each file a plain name in the model
/// directory (no `/`, not empty, `.` or `..`).
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let index: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| EngineError::Json {
            path: path.to_owned(),
            source,
        })?;
    let bad = |message: String| EngineError::Index {
        file: path.to_owned(),
        message,
    };
    let map = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut weight_map = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains('/') && !matches!(*f, "" | "." | ".."))
            .ok_or_else(|| bad(format!("`{tensor}` maps to no plain file name")))?;
        weight_map.insert(tensor.clone(), file.to_owned());
    }
    Ok(weight_map)
}

/// Which element types a tensor may have.
#[derive(Debug, Clone, Copy)]
enum DtypeRule {
    /// Any float type (bf16, f16, f32).
    Float,
    /// Packed quantized weights.
    U32,
}

impl DtypeRule {
    fn check(self, tensor: &str, file: &Path, found: TensorDtype) -> Result<()> {
        let ok = match self {
            DtypeRule::Float => found.is_float(),
            DtypeRule::U32 => found == TensorDtype::U32,
        };
        if ok {
            return Ok(());
        }
        Err(EngineError::Dtype {
            tensor: tensor.to_owned(),
            file: file.to_owned(),
            expected: match self {
                DtypeRule::Float => "BF16, F16 or F32".into(),
                DtypeRule::U32 => "U32 (packed quantized weights)".into(),
            },
            found: found.to_string(),
        })
    }
}

/// Builds an MLX array from little-endian bytes. The bytes are handed over
/// as a 2-D `u8` array (rows × row bytes, so no dimension overflows `i32` for
/// any real checkpoint) and reinterpreted in place.
fn to_array(bytes: &[u8], dtype: TensorDtype, shape: &[u64]) -> mlx_rs::error::Result<Array> {
    let dims: Vec<i32> = shape
        .iter()
        .map(|d| i32::try_from(*d).unwrap_or(i32::MAX))
        .collect();
    let rows = dims.first().copied().unwrap_or(1).max(1);
    let row_bytes = i32::try_from(bytes.len() / rows as usize).unwrap_or(i32::MAX);
    let raw = Array::from_slice(bytes, &[rows, row_bytes]);
    let typed = if dtype == TensorDtype::U8 {
        raw
    } else {
        raw.view_dtype(dtype.mlx())?
    };
    typed.reshape(&dims)
}

/// A linear layer `y = x Wᵀ`, dense or MLX-quantized.
#[derive(Debug)]
pub enum Linear {
    /// A float weight `[out, in]`.
    Dense {
        /// The weight.
        weight: Array,
    },
    /// An affine-quantized weight.
    Quantized {
        /// Packed weights `[out, in·bits/32]`.
        weight: Array,
        /// One scale per group `[out, in/group_size]`.
        scales: Array,
        /// One bias per group `[out, in/group_size]`.
        biases: Array,
        /// Weights per group.
        group_size: i32,
        /// Bits per weight.
        bits: i32,
    },
}

impl Linear {
    /// `x Wᵀ`.
    pub fn forward(&self, x: &Array) -> mlx_rs::error::Result<Array> {
        match self {
            Linear::Dense { weight } => x.matmul(weight.t()),
            Linear::Quantized {
                weight,
                scales,
                biases,
                group_size,
                bits,
            } => mlx_rs::ops::quantized_matmul(x, weight, scales, biases, true, *group_size, *bits),
        }
    }

    /// Outputs `start .. end` of `x Wᵀ`: the same products over a row range
    /// of the weight (a view; nothing is copied).
    pub fn forward_rows(&self, x: &Array, start: i32, end: i32) -> mlx_rs::error::Result<Array> {
        let rows = |a: &Array| a.try_index(start..end);
        match self {
            Linear::Dense { weight } => x.matmul(rows(weight)?.t()),
            Linear::Quantized {
                weight,
                scales,
                biases,
                group_size,
                bits,
            } => mlx_rs::ops::quantized_matmul(
                x,
                rows(weight)?,
                rows(scales)?,
                &rows(biases)?,
                true,
                *group_size,
                *bits,
            ),
        }
    }

    /// Number of outputs (rows of the weight).
    pub fn out_features(&self) -> i32 {
        match self {
            Linear::Dense { weight } | Linear::Quantized { weight, .. } => weight.shape()[0],
        }
    }

    /// The arrays, for evaluation.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Dense { weight } => vec![weight],
            Linear::Quantized {
                weight,
                scales,
                biases,
                ..
            } => vec![weight, scales, biases],
        }
    }

    /// The float dtype of the layer's output.
    pub fn dtype(&self) -> Dtype {
        match self {
            Linear::Dense { weight } => weight.dtype(),
            Linear::Quantized { scales, .. } => scales.dtype(),
        }
    }
}

/// The token embedding `[vocab, hidden]`, dense or quantized; as a matrix it
/// is also the output projection of tied models (mlx-lm's `as_linear`).
#[derive(Debug)]
pub struct Embedding {
    /// The table, stored like a linear layer's weight.
    pub table: Linear,
}

impl Embedding {
    /// The rows of `ids` (any shape), as float vectors of `dtype`. A
    /// quantized table is dequantized with its scales and biases in `dtype`,
    /// so the rows are exactly what a table stored in `dtype` would give.
    pub fn lookup(&self, ids: &Array, dtype: Dtype) -> mlx_rs::error::Result<Array> {
        let as_wanted = |a: Array| {
            if a.dtype() == dtype {
                Ok(a)
            } else {
                a.as_dtype(dtype)
            }
        };
        match &self.table {
            Linear::Dense { weight } => as_wanted(weight.take_axis(ids, 0)?),
            Linear::Quantized {
                weight,
                scales,
                biases,
                group_size,
                bits,
            } => mlx_rs::ops::dequantize(
                weight.take_axis(ids, 0)?,
                as_wanted(scales.take_axis(ids, 0)?)?,
                &as_wanted(biases.take_axis(ids, 0)?)?,
                *group_size,
                *bits,
            ),
        }
    }

    /// Whether the table is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.table, Linear::Quantized { .. })
    }

    /// The arrays, for evaluation.
    pub fn arrays(&self) -> Vec<&Array> {
        self.table.arrays()
    }
}

/// Reads the parts of a checkpoint this rank needs, checking each against the
/// config.
#[derive(Debug)]
pub struct ShardLoader<'a> {
    /// The checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// The model's config.
    pub config: &'a ModelConfig,
    /// Which slice to read.
    pub shard: Shard,
}

impl ShardLoader<'_> {
    /// A quantized module's parameters, or `None` when it is stored dense.
    /// Scales without a quantization block (or with the module switched off)
    /// are an error, as they would be for mlx-lm.
    fn quantization(&self, module: &str) -> Result<Option<QuantConfig>> {
        let scales = format!("{module}.scales");
        if !self.checkpoint.has(&scales) {
            return Ok(None);
        }
        match self.config.quantization_of(module) {
            Some(q) => Ok(Some(q)),
            None => Err(EngineError::Config {
                path: self.config.path.clone(),
                message: format!(
                    "the checkpoint has `{scales}` but the `quantization` block does not \
                     quantize `{module}`"
                ),
            }),
        }
    }

    fn quant_units(&self, module: &str, q: QuantConfig, inp: u64) -> Result<(u64, u64)> {
        let bits = q.bits as u64;
        let group = q.group_size as u64;
        let packed_bits = inp * bits;
        if !inp.is_multiple_of(group) || !packed_bits.is_multiple_of(32) {
            return Err(EngineError::Config {
                path: self.config.path.clone(),
                message: format!(
                    "`{module}` has {inp} inputs, which are not whole groups of {group} \
                     {bits}-bit weights packed into 32-bit words"
                ),
            });
        }
        // A group of weights as a count of packed words; must be whole words
        // for a column slice on group boundaries to start on a word.
        let group_bits = group * bits;
        let words_per_group = if group_bits.is_multiple_of(32) {
            group_bits / 32
        } else {
            0
        };
        Ok((packed_bits / 32, words_per_group))
    }

    /// Loads the linear layer `module` (`[out, in]` unsharded) split as asked.
    pub fn linear(&self, module: &str, out: usize, inp: usize, split: Split) -> Result<Linear> {
        let (out, inp) = (out as u64, inp as u64);
        let weight_name = format!("{module}.weight");
        match self.quantization(module)? {
            None => Ok(Linear::Dense {
                weight: self.checkpoint.read(
                    &weight_name,
                    &[out, inp],
                    DtypeRule::Float,
                    split,
                    self.shard,
                    None,
                )?,
            }),
            Some(q) => {
                let (words, words_per_group) = self.quant_units(module, q, inp)?;
                let groups = inp / q.group_size as u64;
                if split == Split::Columns && words_per_group == 0 {
                    return Err(EngineError::SplitsQuantGroup {
                        tensor: weight_name,
                        file: self.config.path.clone(),
                        message: format!(
                            "a group of {} {}-bit weights is not a whole number of 32-bit \
                             words, so columns cannot be split",
                            q.group_size, q.bits
                        ),
                    });
                }
                let weight = self.checkpoint.read(
                    &weight_name,
                    &[out, words],
                    DtypeRule::U32,
                    split,
                    self.shard,
                    Some(words_per_group.max(1)),
                )?;
                let scales = self.checkpoint.read(
                    &format!("{module}.scales"),
                    &[out, groups],
                    DtypeRule::Float,
                    split,
                    self.shard,
                    Some(1),
                )?;
                let biases = self.checkpoint.read(
                    &format!("{module}.biases"),
                    &[out, groups],
                    DtypeRule::Float,
                    split,
                    self.shard,
                    Some(1),
                )?;
                Ok(Linear::Quantized {
                    weight,
                    scales,
                    biases,
                    group_size: q.group_size as i32,
                    bits: q.bits as i32,
                })
            }
        }
    }

    /// Loads the token embedding, whole.
    pub fn embedding(&self, module: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding {
            table: self.linear(module, vocab, hidden, Split::Full)?,
        })
    }

    /// Loads a norm's weight vector, whole.
    pub fn vector(&self, name: &str, len: usize) -> Result<Array> {
        self.checkpoint.read(
            name,
            &[len as u64],
            DtypeRule::Float,
            Split::Full,
            self.shard,
            None,
        )
    }
}
