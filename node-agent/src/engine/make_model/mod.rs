//! Random-weight Llama checkpoints in the mlx-community layout, for tests,
//! demos and benchmarks (nothing can be downloaded here): the shape
//! ([`ModelSpec`], the bundled presets and [`ModelSpec::tiny`]) here, the
//! weights in `weights`, the synthetic tokenizer in `tokenizer`.
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

use serde_json::{Value, json};

use super::error::{EngineError, Result};
use super::safetensors::TensorDtype;

mod tokenizer;
mod weights;

pub use tokenizer::CHAT_TEMPLATE;
use tokenizer::{SpecialTokens, special_count};
pub use weights::{MakeReport, write_model};

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
    let rope_factor = if entry.model_id.contains("3.2-") {
        32.0
    } else {
        8.0
    };
    Ok(ModelSpec::of_shape(&entry.shape, rope_factor))
}

impl ModelSpec {
    /// The tiny model of the tests, the demo's default and `make-model`'s:
    /// [`tandem_planner::TINY_TEST_MODEL`] (the tests take its shape from
    /// there too), with Llama 3.2's RoPE scaling.
    pub fn tiny() -> ModelSpec {
        ModelSpec::of_shape(&tandem_planner::TINY_TEST_MODEL, 32.0)
    }

    /// The spec of a planner shape, with this RoPE scaling factor.
    fn of_shape(s: &tandem_planner::ModelShape, rope_factor: f32) -> ModelSpec {
        let format = match s.quantization {
            Some(q) => WeightFormat::Quantized(q.bits as usize),
            None if s.dtype == tandem_planner::WeightDtype::Float16 => WeightFormat::Float16,
            None => WeightFormat::BFloat16,
        };
        ModelSpec {
            layers: s.num_hidden_layers as usize,
            hidden: s.hidden_size as usize,
            heads: s.num_attention_heads as usize,
            kv_heads: s.num_key_value_heads as usize,
            head_dim: s.head_dim() as usize,
            intermediate: s.intermediate_size as usize,
            vocab: s.vocab_size as usize,
            tied: s.tie_word_embeddings,
            format,
            rope_factor,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
