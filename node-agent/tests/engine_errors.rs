//! Every malformed input the loader can meet gives an error that names the
//! tensor and the file, never a panic: each test corrupts a copy of a
//! generated model in one way and loads it.

mod engine_support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use engine_support::*;
use tandem_agent::engine::EngineError;
use tandem_agent::engine::config::ModelConfig;
use tandem_agent::engine::make_model::WeightFormat;
use tandem_agent::engine::model::Llama;
use tandem_agent::engine::tokenizer::{ChatMessage, TextTokenizer};
use tandem_agent::engine::weights::{Checkpoint, Shard, ShardLoader, Split};

/// MLX work in this process, one test at a time.
static MLX: Mutex<()> = Mutex::new(());

/// A fresh copy of a generated model (`shards` weight files) to corrupt.
fn copy_of(name: &str, shards: usize) -> PathBuf {
    let source = model(
        &format!("errors-src-{shards}"),
        &tied_spec(WeightFormat::Quantized(4)),
        shards,
    );
    let dir = scratch(name);
    for entry in std::fs::read_dir(&source).expect("model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    dir
}

fn load_error(dir: &Path) -> EngineError {
    let _turn = MLX.lock().unwrap_or_else(|p| p.into_inner());
    match Llama::load(dir, None) {
        Ok(_) => panic!("{} loaded despite the damage", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites the JSON header of a safetensors file in place with `edit`,
/// which must keep its length (so the data offsets stay valid).
fn edit_header(file: &Path, edit: impl FnOnce(&str) -> String) {
    let mut bytes = std::fs::read(file).expect("read");
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = String::from_utf8(bytes[8..8 + len].to_vec()).expect("utf-8 header");
    let edited = edit(&header);
    assert_eq!(
        edited.len(),
        header.len(),
        "the edit must keep the header's length"
    );
    bytes[8..8 + len].copy_from_slice(edited.as_bytes());
    std::fs::write(file, bytes).expect("write");
}

/// Replaces the first `from` after `tensor`'s entry in the header.
fn in_entry(header: &str, tensor: &str, from: &str, to: &str) -> String {
    let at = header
        .find(&format!("\"{tensor}\""))
        .expect("tensor in header");
    let pos = at + header[at..].find(from).expect("field in entry");
    format!("{}{to}{}", &header[..pos], &header[pos + from.len()..])
}

fn assert_names(err: &EngineError, parts: &[&str]) {
    let text = err.to_string();
    for part in parts {
        assert!(text.contains(part), "`{text}` does not mention `{part}`");
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = copy_of("missing", 1);
    edit_header(&dir.join("model.safetensors"), |h| {
        h.replace("\"model.norm.weight\"", "\"model.norm.weighX\"")
    });
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::MissingTensor { .. }), "{err}");
    assert_names(&err, &["model.norm.weight", "model.safetensors"]);
}

#[test]
fn a_shape_that_disagrees_with_config_is_named() {
    let dir = copy_of("shape", 1);
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"intermediate_size\": 512", "\"intermediate_size\": 640"),
    )
    .expect("write config");
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::Shape { .. }), "{err}");
    assert_names(
        &err,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "model.safetensors",
            "[640, 32]",
            "[512, 32]",
        ],
    );
}

#[test]
fn a_wrong_dtype_is_named() {
    let dir = copy_of("dtype-norm", 1);
    let norm = "model.layers.1.input_layernorm.weight";
    edit_header(&dir.join("model.safetensors"), |h| {
        in_entry(h, norm, "\"BF16\"", "\"U16\" ")
    });
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::Dtype { .. }), "{err}");
    assert_names(&err, &[norm, "model.safetensors", "U16"]);

    let dir = copy_of("dtype-packed", 1);
    let packed = "model.layers.2.self_attn.q_proj.weight";
    edit_header(&dir.join("model.safetensors"), |h| {
        in_entry(h, packed, "\"U32\"", "\"I32\"")
    });
    let err = load_error(&dir);
    assert_names(&err, &[packed, "I32", "U32"]);
}

#[test]
fn a_corrupt_header_is_reported_for_its_file() {
    let dir = copy_of("corrupt-json", 1);
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[8] = b'#';
    std::fs::write(&file, &bytes).expect("write");
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::CorruptHeader { .. }), "{err}");
    assert_names(&err, &["model.safetensors", "not JSON"]);

    // A header length past the end of the file.
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&file, &bytes).expect("write");
    let err = load_error(&dir);
    assert_names(&err, &["model.safetensors", "header length"]);

    // Offsets that do not match dtype × shape.
    let dir = copy_of("corrupt-offsets", 1);
    edit_header(&dir.join("model.safetensors"), |h| {
        in_entry(h, "model.norm.weight", "\"shape\":[256]", "\"shape\":[255]")
    });
    let err = load_error(&dir);
    assert_names(&err, &["model.safetensors", "model.norm.weight", "needs"]);
}

#[test]
fn a_truncated_file_names_the_first_tensor_past_its_end() {
    let dir = copy_of("truncated", 2);
    let file = dir.join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&file).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_len(len - 100).expect("truncate");
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::Truncated { .. }), "{err}");
    assert_names(
        &err,
        &["model-00002-of-00002.safetensors", "truncated", "tensor `"],
    );
}

#[test]
fn a_broken_index_is_reported() {
    let dir = copy_of("index-missing-file", 2);
    std::fs::remove_file(dir.join("model-00001-of-00002.safetensors")).expect("rm");
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::Index { .. }), "{err}");
    assert_names(
        &err,
        &[
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
        ],
    );

    let dir = copy_of("index-wrong-file", 2);
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index");
    let wrong = index.replacen(
        "\"model.embed_tokens.biases\": \"model-00001-of-00002.safetensors\"",
        "\"model.embed_tokens.biases\": \"model-00002-of-00002.safetensors\"",
        1,
    );
    assert_ne!(
        wrong, index,
        "the index lists the embedding in the first file"
    );
    std::fs::write(dir.join("model.safetensors.index.json"), wrong).expect("write");
    let err = load_error(&dir);
    assert_names(
        &err,
        &[
            "model.embed_tokens.biases",
            "model-00002-of-00002.safetensors",
        ],
    );

    let dir = scratch("no-weights");
    std::fs::copy(
        copy_of("no-weights-src", 1).join("config.json"),
        dir.join("config.json"),
    )
    .expect("copy");
    let err = load_error(&dir);
    assert_names(&err, &["no model*.safetensors"]);
}

#[test]
fn a_slice_that_splits_a_quantization_group_is_refused() {
    // 8 KV heads, so eight ranks divide the heads; o_proj's 256 input columns
    // would give each rank 32, half a group of 64.
    let mut spec = tied_spec(WeightFormat::Quantized(4));
    spec.kv_heads = 8;
    let dir = model("errors-groups", &spec, 1);
    let _turn = MLX.lock().unwrap_or_else(|p| p.into_inner());
    let config = ModelConfig::load(&dir).expect("config");
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint");
    let loader = ShardLoader {
        checkpoint: &checkpoint,
        config: &config,
        shard: Shard { rank: 3, world: 8 },
    };
    let err = loader
        .linear("model.layers.0.self_attn.o_proj", 256, 256, Split::Columns)
        .expect_err("o_proj split into half groups");
    assert!(matches!(err, EngineError::SplitsQuantGroup { .. }), "{err}");
    assert_names(
        &err,
        &[
            "model.layers.0.self_attn.o_proj.weight",
            "model.safetensors",
            "quantization group",
        ],
    );
    // Rows split fine at the same world size.
    assert!(
        loader
            .linear("model.layers.0.self_attn.q_proj", 256, 256, Split::Rows)
            .is_ok()
    );
    // The whole-model check says which world sizes would work.
    let err = tandem_agent::engine::model::check_world_size(&config, 8).expect_err("8 ranks");
    assert_names(&err, &["valid world sizes: 1, 2, 4"]);
}

#[test]
fn bad_configs_are_reported() {
    let dir = copy_of("config-missing", 1);
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"hidden_size\"", "\"hidden_sizes\""),
    )
    .expect("write");
    let err = load_error(&dir);
    assert_names(&err, &["config.json", "hidden_size", "missing"]);

    let dir = copy_of("config-rope", 1);
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"llama3\"", "\"yarn\""),
    )
    .expect("write");
    let err = load_error(&dir);
    assert_names(&err, &["config.json", "yarn"]);

    let dir = copy_of("config-json", 1);
    std::fs::write(dir.join("config.json"), &config[..config.len() / 2]).expect("write");
    let err = load_error(&dir);
    assert!(matches!(err, EngineError::Json { .. }), "{err}");
}

#[test]
fn tokenizer_and_template_failures_are_errors() {
    let dir = copy_of("tokenizer", 1);
    let tokenizer = TextTokenizer::load(&dir).expect("tokenizer");
    let messages = [
        ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        },
        ChatMessage {
            role: "tool".into(),
            content: "{}".into(),
        },
    ];
    let err = tokenizer
        .render_chat(&messages, true, &serde_json::Map::new())
        .expect_err("the template rejects the role");
    assert_names(&err, &["Unsupported role 'tool'"]);

    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").expect("write");
    let err = TextTokenizer::load(&dir).expect_err("broken tokenizer.json");
    assert!(matches!(err, EngineError::Tokenizer { .. }), "{err}");
    assert_names(&err, &["tokenizer.json"]);
}
