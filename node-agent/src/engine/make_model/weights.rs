//! The weights and the files around them: shards of safetensors drawn with
//! MLX's RNG (quantized as `mlx_lm.convert` would), the index, config and
//! tokenizer files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mlx_rs::{Array, Dtype, ops, random};
use serde_json::{Value, json};

use super::tokenizer::{SpecialTokens, tokenizer_config, tokenizer_json};
use super::{GROUP_SIZE, ModelSpec, WeightFormat};
use crate::engine::error::{EngineError, Result};
use crate::engine::safetensors::{SafetensorsWriter, TensorDtype, TensorSpec};

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
