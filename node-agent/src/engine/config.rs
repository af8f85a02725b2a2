//! A Llama 3.x checkpoint's `config.json` (and `generation_config.json`):
//! the shape, RoPE, norm epsilon, tied embeddings, MLX quantization and the
//! end-of-sequence token ids.
//!
//! Defaults follow mlx-lm's `ModelArgs` for Llama (for example
//! `tie_word_embeddings` defaults to true and `num_key_value_heads` to the
//! number of attention heads), so a directory that mlx-lm accepts means the
//! same model here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tandem_planner::{ModelShape, Quantization, WeightDtype};

use super::error::{EngineError, Result};

/// MLX affine quantization parameters of a linear layer or embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    /// Weights sharing one scale and bias, along a row.
    pub group_size: usize,
    /// Bits per weight.
    pub bits: usize,
}

/// How RoPE frequencies are scaled (`rope_scaling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Llama 3's frequency-dependent scaling (`rope_type: llama3`).
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f32,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f32,
    },
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear {
        /// The divisor.
        factor: f32,
    },
}

/// Everything the engine needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Interleaved (GPT-J style) RoPE instead of the split halves Llama uses.
    pub rope_traditional: bool,
    /// RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// `lm_head` is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The checkpoint-wide quantization (`quantization` block), if any.
    pub quantization: Option<QuantConfig>,
    /// Per-module quantization overrides from the `quantization` block:
    /// module path → parameters, or `None` for "not quantized".
    pub quantization_overrides: BTreeMap<String, Option<QuantConfig>>,
    /// Ids that end generation (config.json and generation_config.json).
    pub eos_token_ids: Vec<u32>,
    /// The beginning-of-sequence id, if given.
    pub bos_token_id: Option<u32>,
    /// Where the config came from, for messages.
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    intermediate_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_traditional: bool,
    rope_scaling: Option<BTreeMap<String, Value>>,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    quantization: Option<BTreeMap<String, Value>>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    eos_token_id: Option<Value>,
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(EngineError::io(path))?;
    serde_json::from_slice(&bytes).map_err(|source| EngineError::Json {
        path: path.to_owned(),
        source,
    })
}

impl ModelConfig {
    /// Reads `config.json` (and `generation_config.json` when present) from a
    /// model directory.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(EngineError::io(&path))?;
        let mut config = Self::parse(&path, &bytes)?;
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let bytes = std::fs::read(&generation).map_err(EngineError::io(&generation))?;
            config.add_generation_config(&generation, &bytes)?;
        }
        Ok(config)
    }

    /// Parses the bytes of a `config.json` (`path` is for messages).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|source| EngineError::Json {
            path: path.to_owned(),
            source,
        })?;
        Self::from_raw(raw, path)
    }

    /// Adds the end-of-sequence ids of a `generation_config.json`'s bytes.
    pub fn add_generation_config(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let raw: RawGenerationConfig =
            serde_json::from_slice(bytes).map_err(|source| EngineError::Json {
                path: path.to_owned(),
                source,
            })?;
        for id in token_ids(raw.eos_token_id.as_ref(), path, "eos_token_id")? {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<ModelConfig> {
        let bad = |message: String| EngineError::Config {
            path: path.to_owned(),
            message,
        };
        if let Some(kind) = &raw.model_type
            && kind != "llama"
        {
            return Err(EngineError::Unsupported {
                what: format!("model_type `{kind}` in {} (only `llama`)", path.display()),
            });
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(EngineError::Unsupported {
                what: format!("attention or MLP biases in {}", path.display()),
            });
        }
        let need = |value: Option<usize>, name: &str| -> Result<usize> {
            match value {
                Some(v) if v > 0 => Ok(v),
                Some(_) => Err(bad(format!("`{name}` must be positive"))),
                None => Err(bad(format!("`{name}` is missing"))),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = need(
            raw.num_key_value_heads.or(raw.num_attention_heads),
            "num_key_value_heads",
        )?;
        let head_dim = match raw.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None => hidden_size / num_attention_heads,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} must be positive and even"
            )));
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let (quantization, quantization_overrides) = match &raw.quantization {
            None => (None, BTreeMap::new()),
            Some(block) => parse_quantization(block).map_err(bad)?,
        };
        Ok(ModelConfig {
            hidden_size,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw
                .rms_norm_eps
                .ok_or_else(|| bad("`rms_norm_eps` is missing".into()))?
                as f32,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0) as f32,
            rope_traditional: raw.rope_traditional,
            rope_scaling: parse_rope_scaling(raw.rope_scaling.as_ref()).map_err(bad)?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            quantization,
            quantization_overrides,
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), path, "eos_token_id")?,
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), path, "bos_token_id")?
                .first()
                .copied(),
            path: path.to_owned(),
        })
    }

    /// The quantization of the module at `path` (e.g.
    /// `model.layers.0.self_attn.q_proj`): its override, else the default.
    pub fn quantization_of(&self, module: &str) -> Option<QuantConfig> {
        match self.quantization_overrides.get(module) {
            Some(over) => *over,
            None => self.quantization,
        }
    }

    /// The planner's view of this model, for the sharding rules.
    pub fn shape(&self) -> ModelShape {
        let narrow = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        ModelShape {
            num_hidden_layers: narrow(self.num_hidden_layers),
            hidden_size: narrow(self.hidden_size),
            num_attention_heads: narrow(self.num_attention_heads),
            num_key_value_heads: narrow(self.num_key_value_heads),
            intermediate_size: narrow(self.intermediate_size),
            vocab_size: narrow(self.vocab_size),
            head_dim: Some(narrow(self.head_dim)),
            tie_word_embeddings: self.tie_word_embeddings,
            quantization: self.quantization.map(|q| Quantization {
                bits: narrow(q.bits),
                group_size: narrow(q.group_size),
            }),
            dtype: WeightDtype::BFloat16,
        }
    }
}

fn parse_quant_params(block: &BTreeMap<String, Value>) -> Result<QuantConfig, String> {
    let field = |name: &str| -> Result<usize, String> {
        block
            .get(name)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .filter(|v| *v > 0)
            .ok_or_else(|| format!("quantization `{name}` must be a positive integer"))
    };
    if let Some(mode) = block.get("mode").and_then(Value::as_str)
        && mode != "affine"
    {
        return Err(format!(
            "quantization mode `{mode}` is not supported (only affine)"
        ));
    }
    let q = QuantConfig {
        group_size: field("group_size")?,
        bits: field("bits")?,
    };
    if !(1..=8).contains(&q.bits) {
        return Err(format!("quantization bits {} must be 1 to 8", q.bits));
    }
    Ok(q)
}

type QuantBlock = (Option<QuantConfig>, BTreeMap<String, Option<QuantConfig>>);

fn parse_quantization(block: &BTreeMap<String, Value>) -> Result<QuantBlock, String> {
    let default = parse_quant_params(block)?;
    let mut overrides = BTreeMap::new();
    for (key, value) in block {
        match value {
            Value::Object(map) => {
                let params: BTreeMap<String, Value> =
                    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let q = parse_quant_params(&params).map_err(|m| format!("`{key}`: {m}"))?;
                overrides.insert(key.clone(), Some(q));
            }
            Value::Bool(false) => {
                overrides.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    Ok((Some(default), overrides))
}

fn parse_rope_scaling(
    raw: Option<&BTreeMap<String, Value>>,
) -> Result<Option<RopeScaling>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let kind = raw
        .get("type")
        .or_else(|| raw.get("rope_type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |name: &str, default: Option<f64>| -> Result<f32, String> {
        match raw.get(name) {
            Some(v) => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| format!("rope_scaling `{name}` must be a number")),
            None => default
                .map(|v| v as f32)
                .ok_or_else(|| format!("rope_scaling `{name}` is missing")),
        }
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: number("factor", None)?,
        })),
        "llama3" => {
            let scaling = RopeScaling::Llama3 {
                factor: number("factor", None)?,
                low_freq_factor: number("low_freq_factor", Some(1.0))?,
                high_freq_factor: number("high_freq_factor", Some(4.0))?,
                original_max_position_embeddings: number(
                    "original_max_position_embeddings",
                    Some(8192.0),
                )?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = scaling
                && low_freq_factor == high_freq_factor
            {
                return Err("rope_scaling low_freq_factor equals high_freq_factor".into());
            }
            Ok(Some(scaling))
        }
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}

/// Reads a token id field that may be an integer, a list of integers, or null.
fn token_ids(value: Option<&Value>, path: &Path, name: &str) -> Result<Vec<u32>> {
    let bad = || EngineError::Config {
        path: path.to_owned(),
        message: format!("`{name}` must be a token id or a list of token ids"),
    };
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(bad)
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(json).expect("json");
        ModelConfig::from_raw(raw, Path::new("config.json"))
    }

    const LLAMA_3_2_1B: &str = r#"{
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": true, "eos_token_id": [128001, 128008, 128009],
        "bos_token_id": 128000,
        "quantization": {"group_size": 64, "bits": 4,
                         "model.embed_tokens": {"group_size": 32, "bits": 8},
                         "lm_head": false}
    }"#;

    #[test]
    fn reads_a_real_llama_3_2_config() {
        let c = parse(LLAMA_3_2_1B).expect("config");
        assert_eq!(
            (c.hidden_size, c.head_dim, c.num_key_value_heads),
            (2048, 64, 8)
        );
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.bos_token_id, Some(128000));
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        let q4 = QuantConfig {
            group_size: 64,
            bits: 4,
        };
        assert_eq!(c.quantization, Some(q4));
        assert_eq!(c.quantization_of("model.layers.0.mlp.up_proj"), Some(q4));
        assert_eq!(
            c.quantization_of("model.embed_tokens"),
            Some(QuantConfig {
                group_size: 32,
                bits: 8
            })
        );
        assert_eq!(c.quantization_of("lm_head"), None);
    }

    #[test]
    fn eos_may_be_a_single_id_and_defaults_follow_mlx_lm() {
        let c = parse(
            r#"{"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
                "num_attention_heads": 4, "vocab_size": 300, "rms_norm_eps": 1e-5,
                "eos_token_id": 7}"#,
        )
        .expect("config");
        assert_eq!(c.eos_token_ids, vec![7]);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 10_000.0);
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let missing = parse(r#"{"hidden_size": 64}"#).expect_err("missing fields");
        assert!(
            missing.to_string().contains("num_attention_heads"),
            "{missing}"
        );
        let yarn = parse(
            r#"{"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
                "num_attention_heads": 4, "vocab_size": 300, "rms_norm_eps": 1e-5,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .expect_err("yarn");
        assert!(yarn.to_string().contains("yarn"), "{yarn}");
        let gqa = parse(
            r#"{"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 300,
                "rms_norm_eps": 1e-5}"#,
        )
        .expect_err("gqa");
        assert!(gqa.to_string().contains("multiple"), "{gqa}");
    }
}
