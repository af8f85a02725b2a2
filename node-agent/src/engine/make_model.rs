//! Random-weight Llama checkpoints in the mlx-community layout, for tests,
//! demos and benchmarks (nothing can be downloaded here).
//!
//! A model directory gets `config.json`, `generation_config.json`, the weights
//! (`model.safetensors`, or `model-0000K-of-0000N.safetensors` plus
//! `model.safetensors.index.json`), `tokenizer.json` (a byte-level BPE with
//! Llama 3's pre-tokenizer and special tokens, its merges generated so the
//! vocabulary has exactly the asked size), `tokenizer_config.json` with a
//! Llama-3-style chat template, and `special_tokens_map.json`. mlx-lm loads
//! such a directory unchanged.
//!
//! Weights are drawn with MLX's own RNG and quantized with MLX's own
//! `quantize` (affine, bf16 scales and biases), as `mlx_lm.convert` would.
//! Scales keep activations of order one through any depth: linear weights
//! have standard deviation `1/√fan_in`; the embedding and `lm_head` have
//! `4/√hidden`, so logits spread over a few units and greedy choices are not
//! near-ties; norm weights are `1 + 0.1·N(0,1)`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use mlx_rs::{Array, Dtype, ops, random};
use serde_json::{Value, json};

use super::error::{EngineError, Result};
use super::safetensors::{SafetensorsWriter, TensorDtype, TensorSpec};

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// MLX affine quantization with this many bits, group size 64, bf16
    /// scales and biases.
    Quantized(usize),
    /// Plain bfloat16.
    BFloat16,
    /// Plain float16.
    Float16,
    /// Plain float32 (exact tensor-parallel comparisons).
    Float32,
}

impl WeightFormat {
    /// Parses `4`, `8`, `bf16` or `fp16`.
    pub fn parse(text: &str) -> Result<WeightFormat> {
        match text.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(WeightFormat::BFloat16),
            "fp16" | "f16" | "float16" => Ok(WeightFormat::Float16),
            "f32" | "fp32" | "float32" => Ok(WeightFormat::Float32),
            other => match other.parse::<usize>() {
                Ok(bits @ (2 | 3 | 4 | 5 | 6 | 8)) => Ok(WeightFormat::Quantized(bits)),
                _ => Err(EngineError::Argument(format!(
                    "--quant must be 2, 3, 4, 5, 6, 8, bf16, fp16 or f32, not `{text}`"
                ))),
            },
        }
    }

    fn float_dtype(self) -> TensorDtype {
        match self {
            WeightFormat::Float16 => TensorDtype::F16,
            WeightFormat::Float32 => TensorDtype::F32,
            _ => TensorDtype::BF16,
        }
    }
}

/// Group size of the quantized checkpoints (mlx-community's choice).
pub const GROUP_SIZE: usize = 64;

/// The shape and storage of a model to write.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `lm_head` shares the embedding.
    pub tied: bool,
    /// Storage format.
    pub format: WeightFormat,
    /// Llama 3 RoPE scaling factor (32 for Llama 3.2, 8 for 3.1).
    pub rope_factor: f32,
}

/// A bundled model's shape, by short name (`llama-3.2-1b`) or catalog ID
/// (`mlx-community/Llama-3.2-1B-Instruct-4bit`, which also gives the format).
pub fn preset(name: &str) -> Result<ModelSpec> {
    let short: &[(&str, &str)] = &[
        ("llama-3.2-1b", "mlx-community/Llama-3.2-1B-Instruct-4bit"),
        ("llama-3.2-3b", "mlx-community/Llama-3.2-3B-Instruct-4bit"),
        (
            "llama-3.1-8b",
            "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        ),
        (
            "llama-3.1-70b",
            "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit",
        ),
        ("llama-3.3-70b", "mlx-community/Llama-3.3-70B-Instruct-4bit"),
    ];
    let id = short
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case(name))
        .map(|(_, id)| *id)
        .unwrap_or(name);
    let entry = tandem_planner::lookup_model(id).ok_or_else(|| {
        let mut known: Vec<&str> = short.iter().map(|(s, _)| *s).collect();
        known.extend(tandem_planner::CATALOG.iter().map(|e| e.model_id));
        EngineError::Argument(format!(
            "unknown preset `{name}`; known: {}",
            known.join(", ")
        ))
    })?;
    let s = entry.shape;
    let format = match s.quantization {
        Some(q) => WeightFormat::Quantized(q.bits as usize),
        None if s.dtype == tandem_planner::WeightDtype::Float16 => WeightFormat::Float16,
        None => WeightFormat::BFloat16,
    };
    Ok(ModelSpec {
        layers: s.num_hidden_layers as usize,
        hidden: s.hidden_size as usize,
        heads: s.num_attention_heads as usize,
        kv_heads: s.num_key_value_heads as usize,
        head_dim: s.head_dim() as usize,
        intermediate: s.intermediate_size as usize,
        vocab: s.vocab_size as usize,
        tied: s.tie_word_embeddings,
        format,
        rope_factor: if entry.model_id.contains("3.2-") {
            32.0
        } else {
            8.0
        },
    })
}

impl ModelSpec {
    /// Checks that the shape can exist and be stored in its format.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Argument(m));
        for (name, v) in [
            ("layers", self.layers),
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("kv-heads", self.kv_heads),
            ("head-dim", self.head_dim),
            ("intermediate", self.intermediate),
        ] {
            if v == 0 {
                return bad(format!("--{name} must be positive"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "--heads ({}) must be a multiple of --kv-heads ({})",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim));
        }
        let min_vocab = 256 + special_count(self.vocab);
        if self.vocab < min_vocab {
            return bad(format!(
                "--vocab must be at least {min_vocab} (256 byte tokens and the special tokens)"
            ));
        }
        if let WeightFormat::Quantized(bits) = self.format {
            for (name, width) in [
                ("hidden", self.hidden),
                ("intermediate", self.intermediate),
                ("heads × head dim", self.heads * self.head_dim),
            ] {
                if !width.is_multiple_of(GROUP_SIZE) {
                    return bad(format!(
                        "{name} ({width}) must be a multiple of the quantization group size \
                         {GROUP_SIZE}"
                    ));
                }
            }
            let _ = bits;
        }
        Ok(())
    }

    fn config_json(&self) -> Value {
        let specials = SpecialTokens::new(self.vocab);
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": self.rope_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3"
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": specials.begin_of_text,
            "eos_token_id": [specials.end_of_text, specials.eom, specials.eot],
            "torch_dtype": match self.format {
                WeightFormat::Float16 => "float16",
                WeightFormat::Float32 => "float32",
                _ => "bfloat16",
            },
        });
        if let (WeightFormat::Quantized(bits), Value::Object(map)) = (self.format, &mut config) {
            let q = json!({"group_size": GROUP_SIZE, "bits": bits});
            map.insert("quantization".into(), q.clone());
            map.insert("quantization_config".into(), q);
        }
        config
    }
}

/// One module to generate.
#[derive(Debug, Clone)]
enum Module {
    /// A `[out, in]` matrix (linear layer, embedding or lm_head), quantized
    /// when the format says so.
    Matrix {
        prefix: String,
        out: usize,
        inp: usize,
        std: f32,
    },
    /// A norm weight vector.
    Norm { name: String, len: usize },
}

fn modules(spec: &ModelSpec) -> Vec<Module> {
    let h = spec.hidden;
    let q = spec.heads * spec.head_dim;
    let kv = spec.kv_heads * spec.head_dim;
    let i = spec.intermediate;
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
    let vocab_std = 4.0 / (h as f32).sqrt();
    let matrix = |prefix: String, out: usize, inp: usize, std: f32| Module::Matrix {
        prefix,
        out,
        inp,
        std,
    };
    let mut all = vec![matrix(
        "model.embed_tokens".into(),
        spec.vocab,
        h,
        vocab_std,
    )];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        all.push(Module::Norm {
            name: format!("{p}.input_layernorm.weight"),
            len: h,
        });
        all.push(matrix(format!("{p}.self_attn.q_proj"), q, h, fan_in(h)));
        all.push(matrix(format!("{p}.self_attn.k_proj"), kv, h, fan_in(h)));
        all.push(matrix(format!("{p}.self_attn.v_proj"), kv, h, fan_in(h)));
        all.push(matrix(format!("{p}.self_attn.o_proj"), h, q, fan_in(q)));
        all.push(Module::Norm {
            name: format!("{p}.post_attention_layernorm.weight"),
            len: h,
        });
        all.push(matrix(format!("{p}.mlp.gate_proj"), i, h, fan_in(h)));
        all.push(matrix(format!("{p}.mlp.up_proj"), i, h, fan_in(h)));
        all.push(matrix(format!("{p}.mlp.down_proj"), h, i, fan_in(i)));
    }
    all.push(Module::Norm {
        name: "model.norm.weight".into(),
        len: h,
    });
    if !spec.tied {
        all.push(matrix("lm_head".into(), spec.vocab, h, vocab_std));
    }
    all
}

/// The tensors a module is stored as, in write order.
fn tensor_specs(module: &Module, format: WeightFormat) -> Vec<TensorSpec> {
    let float = format.float_dtype();
    let spec = |name: String, dtype, shape: Vec<usize>| TensorSpec {
        name,
        dtype,
        shape: shape.into_iter().map(|d| d as u64).collect(),
    };
    match module {
        Module::Norm { name, len } => vec![spec(name.clone(), float, vec![*len])],
        Module::Matrix {
            prefix, out, inp, ..
        } => match format {
            WeightFormat::Quantized(bits) => vec![
                spec(
                    format!("{prefix}.weight"),
                    TensorDtype::U32,
                    vec![*out, inp * bits / 32],
                ),
                spec(
                    format!("{prefix}.scales"),
                    float,
                    vec![*out, inp / GROUP_SIZE],
                ),
                spec(
                    format!("{prefix}.biases"),
                    float,
                    vec![*out, inp / GROUP_SIZE],
                ),
            ],
            _ => vec![spec(format!("{prefix}.weight"), float, vec![*out, *inp])],
        },
    }
}

/// What `write_model` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct MakeReport {
    /// The model directory.
    pub dir: PathBuf,
    /// Weight files written.
    pub files: Vec<String>,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
}

/// Writes a random model of `spec` into `out` (created if needed), its
/// weights split over `shards` files, drawn from `seed`.
pub fn write_model(spec: &ModelSpec, out: &Path, shards: usize, seed: u64) -> Result<MakeReport> {
    spec.validate()?;
    if shards == 0 {
        return Err(EngineError::Argument("--shards must be at least 1".into()));
    }
    std::fs::create_dir_all(out).map_err(EngineError::io(out))?;
    let all = modules(spec);
    let specs: Vec<Vec<TensorSpec>> = all.iter().map(|m| tensor_specs(m, spec.format)).collect();
    let total: u64 = specs.iter().flatten().map(TensorSpec::len).sum();

    // Whole modules per file, cut where the running size passes k/N of the total.
    let mut file_of_module = Vec::with_capacity(all.len());
    let mut running = 0u64;
    for tensors in &specs {
        let file = ((running as u128 * shards as u128) / total.max(1) as u128) as usize;
        file_of_module.push(file.min(shards - 1));
        running += tensors.iter().map(TensorSpec::len).sum::<u64>();
    }
    let name_of = |k: usize| {
        if shards == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        }
    };
    let metadata: BTreeMap<String, String> = [("format".to_owned(), "mlx".to_owned())].into();
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    for k in 0..shards {
        let members: Vec<usize> = (0..all.len()).filter(|m| file_of_module[*m] == k).collect();
        let file_specs: Vec<TensorSpec> = members
            .iter()
            .flat_map(|m| specs[*m].iter().cloned())
            .collect();
        let name = name_of(k);
        for t in &file_specs {
            weight_map.insert(t.name.clone(), Value::String(name.clone()));
        }
        let path = out.join(&name);
        let mut writer = SafetensorsWriter::create(&path, file_specs, &metadata)?;
        for m in members {
            write_module(&mut writer, &all[m], m, spec.format, seed)?;
        }
        writer.finish()?;
        files.push(name);
    }
    if shards > 1 {
        let index = json!({
            "metadata": {"total_size": total},
            "weight_map": Value::Object(weight_map),
        });
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    write_json(&out.join("config.json"), &spec.config_json())?;
    let specials = SpecialTokens::new(spec.vocab);
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": specials.begin_of_text,
            "eos_token_id": [specials.end_of_text, specials.eom, specials.eot],
            "do_sample": true,
            "temperature": 0.6,
            "top_p": 0.9,
        }),
    )?;
    write_json(&out.join("tokenizer.json"), &tokenizer_json(spec.vocab))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &tokenizer_config(spec.vocab),
    )?;
    write_json(
        &out.join("special_tokens_map.json"),
        &json!({
            "bos_token": {"content": "<|begin_of_text|>", "lstrip": false, "normalized": false,
                          "rstrip": false, "single_word": false},
            "eos_token": {"content": "<|eot_id|>", "lstrip": false, "normalized": false,
                          "rstrip": false, "single_word": false},
        }),
    )?;
    Ok(MakeReport {
        dir: out.to_owned(),
        files,
        tensor_bytes: total,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| EngineError::Json {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(EngineError::io(path))
}

/// Rows generated at once, bounding memory for large vocabularies.
const ROWS_PER_CHUNK: usize = 8192;

fn write_module(
    writer: &mut SafetensorsWriter,
    module: &Module,
    index: usize,
    format: WeightFormat,
    seed: u64,
) -> Result<()> {
    let mlx = |what: String| EngineError::mlx(what);
    let float = format.float_dtype().mlx();
    // One key per module: the checkpoint does not depend on file splitting.
    let key = random::key(seed.wrapping_mul(1_000_003).wrapping_add(index as u64))
        .map_err(mlx("seeding".into()))?;
    match module {
        Module::Norm { name, len } => {
            let w = random::normal::<f32>(&[*len as i32][..], 1.0, 0.1, &key)
                .and_then(|w| w.as_dtype(float))
                .map_err(mlx(format!("drawing {name}")))?;
            writer.write(name, &bytes_of(&w).map_err(mlx(format!("storing {name}")))?)
        }
        Module::Matrix {
            prefix,
            out,
            inp,
            std,
        } => {
            let mut scales = Vec::new();
            let mut biases = Vec::new();
            let weight_name = format!("{prefix}.weight");
            let mut chunk_key = key;
            let mut row = 0;
            while row < *out {
                let rows = ROWS_PER_CHUNK.min(out - row);
                let (next, draw) =
                    random::split(&chunk_key, 2).map_err(mlx("splitting keys".into()))?;
                chunk_key = next;
                let w = random::normal::<f32>(&[rows as i32, *inp as i32][..], 0.0, *std, &draw)
                    .and_then(|w| w.as_dtype(float))
                    .map_err(mlx(format!("drawing {weight_name}")))?;
                match format {
                    WeightFormat::Quantized(bits) => {
                        let (q, s, b) = ops::quantize(&w, GROUP_SIZE as i32, bits as i32)
                            .map_err(mlx(format!("quantizing {weight_name}")))?;
                        writer.write_part(
                            &weight_name,
                            &bytes_of(&q).map_err(mlx("storing".into()))?,
                        )?;
                        scales.extend(bytes_of(&s).map_err(mlx("storing".into()))?);
                        biases.extend(bytes_of(&b).map_err(mlx("storing".into()))?);
                    }
                    _ => writer
                        .write_part(&weight_name, &bytes_of(&w).map_err(mlx("storing".into()))?)?,
                }
                row += rows;
            }
            writer.end_part(&weight_name)?;
            if let WeightFormat::Quantized(_) = format {
                writer.write(&format!("{prefix}.scales"), &scales)?;
                writer.write(&format!("{prefix}.biases"), &biases)?;
            }
            Ok(())
        }
    }
}

/// The raw little-endian bytes of an array.
fn bytes_of(a: &Array) -> mlx_rs::error::Result<Vec<u8>> {
    let flat = a.reshape(&[-1])?;
    let raw = if a.dtype() == Dtype::Uint8 {
        flat
    } else {
        flat.view_dtype(Dtype::Uint8)?
    };
    raw.eval()?;
    raw.try_as_slice::<u8>()
        .map(<[u8]>::to_vec)
        .map_err(|e| mlx_rs::error::Exception::custom(format!("reading array bytes: {e}")))
}

/// Ids of Llama 3's special tokens, at the top of the vocabulary as in the
/// real tokenizer (128000 onwards for a vocabulary of 128256).
#[derive(Debug, Clone, Copy)]
struct SpecialTokens {
    first: u32,
    count: u32,
    begin_of_text: u32,
    end_of_text: u32,
    start_header: u32,
    end_header: u32,
    eom: u32,
    eot: u32,
}

/// How many special tokens a vocabulary of this size gets: Llama 3's 256, or
/// 16 for toy vocabularies.
fn special_count(vocab: usize) -> usize {
    if vocab >= 4096 { 256 } else { 16 }
}

impl SpecialTokens {
    fn new(vocab: usize) -> SpecialTokens {
        let count = special_count(vocab) as u32;
        let first = (vocab as u32).saturating_sub(count);
        SpecialTokens {
            first,
            count,
            begin_of_text: first,
            end_of_text: first + 1,
            start_header: first + 6,
            end_header: first + 7,
            eom: first + 8,
            eot: first + 9,
        }
    }

    /// The name of special token `i` (0-based from `first`), Llama 3's.
    fn name(i: u32) -> String {
        match i {
            0 => "<|begin_of_text|>".into(),
            1 => "<|end_of_text|>".into(),
            2 => "<|reserved_special_token_0|>".into(),
            3 => "<|reserved_special_token_1|>".into(),
            4 => "<|finetune_right_pad_id|>".into(),
            5 => "<|reserved_special_token_2|>".into(),
            6 => "<|start_header_id|>".into(),
            7 => "<|end_header_id|>".into(),
            8 => "<|eom_id|>".into(),
            9 => "<|eot_id|>".into(),
            10 => "<|python_tag|>".into(),
            n => format!("<|reserved_special_token_{}|>", n - 8),
        }
    }
}

/// GPT-2's byte-to-character table of byte-level BPE: printable bytes stand
/// for themselves, the others for code points from 256 upwards.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// Llama 3's pre-tokenizer split: contractions, letter runs with one leading
/// non-letter, up to three digits, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `n` BPE merges over the byte alphabet: pairs of existing tokens in order
/// of the sum of their ranks, letters and the space marker first, so common
/// English fragments get tokens. A token never gains a space inside.
fn generate_merges(n: usize, chars: &[char]) -> (Vec<String>, Vec<(String, String)>) {
    let priority = " etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'-!?:;\"()\n";
    let mut tokens: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for b in priority.bytes().chain(0u8..=255) {
        let t = chars[b as usize].to_string();
        if seen.insert(t.clone()) {
            tokens.push(t);
        }
    }
    let base = tokens.len();
    let space = chars[b' ' as usize];
    let newline = chars[b'\n' as usize];
    let mut merges = Vec::with_capacity(n);
    let mut sum = 0usize;
    while merges.len() < n {
        // Only the first `limit` tokens (the useful base characters and
        // everything built from them) take part; raw bytes never pair.
        let limit = tokens.len();
        for i in 0..=sum {
            let j = sum - i;
            if merges.len() >= n {
                break;
            }
            if i >= limit || j >= limit || (i < base && i >= 80) || (j < base && j >= 80) {
                continue;
            }
            let (a, b) = (&tokens[i], &tokens[j]);
            if b.starts_with(space) || a.contains(newline) || b.contains(newline) {
                continue;
            }
            let joined = format!("{a}{b}");
            if joined.chars().count() > 16 || seen.contains(&joined) {
                continue;
            }
            seen.insert(joined.clone());
            merges.push((a.clone(), b.clone()));
            tokens.push(joined);
        }
        sum += 1;
        if sum > 4 * (n + base) {
            break;
        }
    }
    (tokens, merges)
}

/// `tokenizer.json` for a vocabulary of exactly `vocab` ids.
fn tokenizer_json(vocab: usize) -> Value {
    let chars = byte_chars();
    let specials = SpecialTokens::new(vocab);
    let n_merges = vocab - 256 - specials.count as usize;
    let (tokens, merges) = generate_merges(n_merges, &chars);
    // Ids: the 256 byte characters in byte order, then merges in order.
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut ordered: Vec<(String, u32)> = Vec::with_capacity(vocab);
    for c in &chars {
        let id = ordered.len() as u32;
        ids.insert(c.to_string(), id);
        ordered.push((c.to_string(), id));
    }
    for (a, b) in &merges {
        let t = format!("{a}{b}");
        let id = ordered.len() as u32;
        ids.insert(t.clone(), id);
        ordered.push((t, id));
    }
    let _ = tokens;
    let mut vocab_map = serde_json::Map::new();
    for (t, id) in ordered {
        vocab_map.insert(t, json!(id));
    }
    let added: Vec<Value> = (0..specials.count)
        .map(|i| {
            json!({
                "id": specials.first + i,
                "content": SpecialTokens::name(i),
                "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true
            })
        })
        .collect();
    let bos = SpecialTokens::name(0);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}
            ]
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                 "use_regex": true},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": bos, "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {bos.clone(): {"id": bos, "ids": [specials.begin_of_text],
                                                  "tokens": [bos]}}}
            ]
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": true,
            "vocab": Value::Object(vocab_map),
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        }
    })
}

/// A Llama-3-style chat template: a system header with the date, then each
/// turn between header tokens and ended by `<|eot_id|>`.
pub const CHAT_TEMPLATE: &str = r#"{{- bos_token }}
{%- if date_string is not defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "01 Jan 2025" %}
    {%- endif %}
{%- endif %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] | trim %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
    {%- set turns = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_text }}
{{- "<|eot_id|>" }}
{%- for message in turns %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("Unsupported role '" + message['role'] + "': expected user or assistant after the system message") }}
    {%- endif %}
    {{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\n\n" + message['content'] | trim + "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
{%- endif %}
"#;

fn tokenizer_config(vocab: usize) -> Value {
    let specials = SpecialTokens::new(vocab);
    let mut decoder = serde_json::Map::new();
    for i in 0..specials.count {
        decoder.insert(
            (specials.first + i).to_string(),
            json!({"content": SpecialTokens::name(i), "lstrip": false, "normalized": false,
                   "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let _ = (specials.start_header, specials.end_header);
    json!({
        "added_tokens_decoder": Value::Object(decoder),
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": true,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_has_exactly_the_asked_size() {
        for vocab in [300, 512, 1000, 5000] {
            let json = tokenizer_json(vocab);
            let text = serde_json::to_string(&json).expect("json");
            let tok = tokenizers::Tokenizer::from_bytes(text.as_bytes()).expect("tokenizer");
            assert_eq!(tok.get_vocab_size(true), vocab, "vocab {vocab}");
            let ids = tok
                .encode("Hello world, the tests", true)
                .expect("encode")
                .get_ids()
                .to_vec();
            assert_eq!(ids[0], SpecialTokens::new(vocab).begin_of_text);
            let back = tok.decode(&ids, true).expect("decode");
            assert_eq!(back, "Hello world, the tests");
        }
    }

    #[test]
    fn presets_come_from_the_catalog() {
        let one_b = preset("llama-3.2-1b").expect("1b");
        assert_eq!(
            (one_b.layers, one_b.hidden, one_b.heads, one_b.kv_heads),
            (16, 2048, 32, 8)
        );
        assert_eq!(
            (one_b.intermediate, one_b.vocab, one_b.tied),
            (8192, 128256, true)
        );
        assert_eq!(one_b.format, WeightFormat::Quantized(4));
        assert_eq!(one_b.rope_factor, 32.0);
        let eight = preset("mlx-community/Meta-Llama-3.1-8B-Instruct-bf16").expect("8b");
        assert_eq!(
            (eight.format, eight.tied, eight.rope_factor),
            (WeightFormat::BFloat16, false, 8.0)
        );
        assert!(preset("gpt-2").is_err());
    }

    #[test]
    fn specials_sit_where_llama_3_puts_them() {
        let s = SpecialTokens::new(128_256);
        assert_eq!(
            (s.begin_of_text, s.end_of_text, s.eot, s.start_header),
            (128_000, 128_001, 128_009, 128_006)
        );
        assert_eq!(SpecialTokens::name(255), "<|reserved_special_token_247|>");
    }
}
