//! Shared by the engine tests: tiny generated models, the `tandem-agent`
//! binary, and mlx-lm (the reference) in the Python venv that `dev/venv.sh`
//! sets up on first use.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;
use tandem_agent::engine::make_model::{ModelSpec, WeightFormat, write_model};

pub mod serve;

/// The binary under test.
pub fn agent() -> &'static str {
    env!("CARGO_BIN_EXE_tandem-agent")
}

/// The repository root (where `dev/` is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .to_owned()
}

/// The venv's python, created by `dev/venv.sh` on first use (cached after).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("dev/venv.sh"))
            .arg("python")
            .stderr(Stdio::inherit())
            .output()
            .expect("run dev/venv.sh");
        assert!(out.status.success(), "dev/venv.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// The peer script.
pub fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peer/mlx_lm_peer.py")
}

/// Where the tests write: cargo's scratch directory for integration tests
/// (under `target/`), so each run replaces the last one's files.
fn test_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("engine-tests")
}

/// A fresh, empty scratch directory for `name` (names are unique across the
/// engine's test files).
pub fn scratch(name: &str) -> PathBuf {
    let dir = test_root().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Shape A: the tiny model ([`ModelSpec::tiny`]: tied embeddings, GQA 8/4
/// heads of 32, four layers) in `format`. Splits over 1, 2 and 4 ranks.
pub fn tied_spec(format: WeightFormat) -> ModelSpec {
    ModelSpec {
        format,
        ..ModelSpec::tiny()
    }
}

/// Shape B: untied `lm_head`, 8/4 heads of 64 (so `heads × head_dim` is
/// twice the hidden size, as `head_dim` in config.json allows), a wider MLP,
/// a larger vocabulary, three layers, Llama 3.1's RoPE factor.
pub fn untied_spec(format: WeightFormat) -> ModelSpec {
    ModelSpec {
        layers: 3,
        hidden: 256,
        heads: 8,
        kv_heads: 4,
        head_dim: 64,
        intermediate: 1024,
        vocab: 1000,
        tied: false,
        format,
        rope_factor: 8.0,
    }
}

/// Writes a model once per test process and returns its directory.
pub fn model(name: &str, spec: &ModelSpec, shards: usize) -> PathBuf {
    static MADE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let dir = test_root().join(format!("model-{name}"));
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if !made.iter().any(|n| n == name) {
        let _ = std::fs::remove_dir_all(&dir);
        write_model(spec, &dir, shards, 7).expect("make model");
        made.push(name.to_owned());
    }
    dir
}

/// Runs `tandem-agent generate --json` with `args`, returning its JSON.
pub fn generate(model: &Path, args: &[&str]) -> Value {
    let out = generate_raw(model, args);
    assert!(
        out.status.success(),
        "generate {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Runs `tandem-agent generate --json` with `args` and returns the output.
pub fn generate_raw(model: &Path, args: &[&str]) -> Output {
    Command::new(agent())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--json")
        .args(args)
        .output()
        .expect("run tandem-agent")
}

/// The last-position prefill logits for `ids`, from our engine.
pub fn our_logits(model: &Path, ids: &[u32], extra: &[&str]) -> Vec<f32> {
    let dir = scratch(&format!("logits-{}", fastrand_name()));
    let file = dir.join("logits.json");
    let ids_arg = ids_text(ids);
    let mut args = vec![
        "--prompt-ids",
        &ids_arg,
        "--max-tokens",
        "1",
        "--dump-logits",
        file.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    generate(model, &args);
    let dumped: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("logits file")).expect("json");
    let _ = std::fs::remove_dir_all(&dir);
    floats(&dumped["logits"])
}

fn fastrand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

/// `1,2,3`.
pub fn ids_text(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// A JSON list of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
        .collect()
}

/// A JSON list of ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or(u64::MAX) as u32)
        .collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Standard deviation.
pub fn std_dev(a: &[f32]) -> f32 {
    let n = a.len() as f32;
    let mean = a.iter().sum::<f32>() / n;
    (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt()
}

/// Runs the peer's `batch` command on `requests` in one Python process.
pub fn mlx_lm_batch(requests: &Value) -> Vec<Value> {
    let dir = scratch(&format!("batch-{}", fastrand_name()));
    let file = dir.join("requests.json");
    std::fs::write(&file, requests.to_string()).expect("write requests");
    let out = Command::new(python())
        .arg(peer_script())
        .arg("batch")
        .arg("--requests")
        .arg(&file)
        .output()
        .expect("run the mlx-lm peer");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "mlx-lm peer failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let list: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("peer said ({e}): {text}"));
    list.as_array().cloned().unwrap_or_default()
}

/// Runs the peer's `args` as `world` ranks of an MLX ring group on loopback
/// (what `mlx.launch` does) and returns rank 0's JSON.
pub fn mlx_lm_group(world: usize, args: &[&str]) -> Value {
    let dir = scratch(&format!("group-{}", fastrand_name()));
    let ports = tandem_agent::engine::launch::free_ports(world).expect("ports");
    let hostfile = tandem_agent::engine::launch::write_hostfile(&dir, &ports).expect("hostfile");
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(python())
                .arg(peer_script())
                .args(args)
                .env("MLX_HOSTFILE", &hostfile)
                .env("MLX_RANK", rank.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a peer rank")
        })
        .collect();
    let outputs = wait_all(children, std::time::Duration::from_secs(300));
    let _ = std::fs::remove_dir_all(&dir);
    for (rank, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "peer rank {rank} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&outputs[0].stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("peer rank 0 said ({e}): {text}"))
}

/// Waits for every child, killing all of them if one fails or the deadline
/// passes (a rank whose peer died would wait forever in `all_sum`).
fn wait_all(mut children: Vec<std::process::Child>, deadline: std::time::Duration) -> Vec<Output> {
    let started = std::time::Instant::now();
    loop {
        let mut done = 0;
        let mut failed = false;
        for c in &mut children {
            if let Ok(Some(status)) = c.try_wait() {
                done += 1;
                failed |= !status.success();
            }
        }
        if done == children.len() || failed || started.elapsed() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for c in &mut children {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
    }
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("peer rank"))
        .collect()
}

/// Runs `dev/real-model.sh COMMAND` (which fetches and converts on first use,
/// cached after) and returns the path it prints.
fn real_model_script(command: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("dev/real-model.sh"))
        .arg(command)
        .stderr(Stdio::inherit())
        .output()
        .expect("run dev/real-model.sh");
    assert!(out.status.success(), "dev/real-model.sh {command} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The directory of one conversion of the real test model:
/// `tandem-dev/SmolLM2-135M-Instruct-{bf16,8bit,4bit}` (the catalog's IDs).
pub fn real_model(model_id: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| real_model_script("dir")).join(model_id)
}

/// The directory holding the real Llama 3 tokenizer.json and
/// tokenizer_config.json.
pub fn llama3_tokenizer() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| real_model_script("llama3-tokenizer"))
        .clone()
}
