//! Benchmark (not a test) of the agent path: for world sizes 1, 2 and 4 of
//! a Llama-3.2-1B-shaped 4-bit model (random weights from `tandem-agent
//! make-model`), or with `--model real` for world sizes 1 and 3 of the real
//! test model (SmolLM2-135M-Instruct 4-bit, `dev/real-model.sh`), with one
//! real agent per rank on loopback against the local API server:
//!
//! - shard creation → Ready, split into connect (connect barrier + MLX ring:
//!   the `Loading` phase less `loadSeconds`), load (`loadSeconds`) and
//!   ready barrier + warm-up (`Loaded` → `Ready`); bytes read per rank;
//! - time to first token and decode tokens/s through rank 0's HTTP API
//!   (streamed, fixed prompt ids, `ignore_eos`), next to the same figures
//!   from the engine alone (`tandem-agent generate --world-size N --json`),
//!   measured in the same run.
//!
//! Run: `cargo run --release -p tandem-tests --example agent_bench -- [--worlds 1,2,4]
//! [--max-tokens 64] [--prompt-tokens 128] [--runs 3] [--model random|real]`. It prints a markdown
//! table (docs/benchmarks.md, agent section).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::{ResourceExt, runtime::WatchStreamExt};
use tandem_crds::{LlamaShard, ShardPhase};
use tandem_tests::{
    TestNamespace, admin,
    agent::{
        Agent, AgentOptions, Group, REAL_MODEL, WAIT, agent_binary, node, real_model_dir,
        shard_status,
    },
    cluster,
    http::send,
    repo_root, unique_name,
};

struct Options {
    worlds: Vec<usize>,
    max_tokens: usize,
    prompt_tokens: usize,
    runs: usize,
    model: BenchModel,
}

/// The model under test: its directory root, catalog-style ID and vocabulary.
struct BenchModel {
    root: PathBuf,
    id: String,
    vocab: u32,
    about: &'static str,
}

const RANDOM_ID: &str = "tandem-bench/llama-3.2-1b-4bit";

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        worlds: Vec::new(),
        max_tokens: 64,
        prompt_tokens: 128,
        runs: 3,
        model: BenchModel {
            root: PathBuf::new(),
            id: String::new(),
            vocab: 0,
            about: "",
        },
    };
    let mut real = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).context("a flag without a value")?;
        match args[i].as_str() {
            "--worlds" => o.worlds = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--max-tokens" => o.max_tokens = value.parse()?,
            "--prompt-tokens" => o.prompt_tokens = value.parse()?,
            "--runs" => o.runs = value.parse()?,
            "--model" => {
                real = match value.as_str() {
                    "real" => true,
                    "random" => false,
                    other => anyhow::bail!("--model is random or real, not {other}"),
                }
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
        i += 2;
    }
    if real {
        o.model = BenchModel {
            root: real_model_dir(),
            id: REAL_MODEL.into(),
            vocab: 49_152,
            about: "SmolLM2-135M-Instruct, 4-bit group 32 (real weights)",
        };
        if o.worlds.is_empty() {
            o.worlds = vec![1, 3];
        }
    } else {
        o.model = BenchModel {
            root: bench_model()?,
            id: RANDOM_ID.into(),
            vocab: 128_256,
            about: "Llama-3.2-1B shape, 4-bit (random weights)",
        };
        if o.worlds.is_empty() {
            o.worlds = vec![1, 2, 4];
        }
    }
    Ok(o)
}

/// The 1B-shaped 4-bit model, written once and cached under target/.
fn bench_model() -> anyhow::Result<PathBuf> {
    let root = repo_root().join("target/agent-bench/models");
    let dir = root.join(RANDOM_ID);
    if !dir.join("config.json").is_file() {
        std::fs::create_dir_all(&dir)?;
        let out = std::process::Command::new(agent_binary())
            .args([
                "make-model",
                "--preset",
                "llama-3.2-1b",
                "--quant",
                "4",
                "--seed",
                "1",
                "--out",
            ])
            .arg(&dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "make-model: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(root)
}

fn show(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.decimals$}")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One streamed completion through rank 0: (TTFT s, decode tokens/s).
fn http_run(
    port: u16,
    model: &str,
    prompt: &[u32],
    max_tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let started = Instant::now();
    let stream = send(port, "POST", "/v1/completions", &[], Some(&body))?;
    // A long prefill may keep the first byte away past a test's timeout.
    stream.set_read_timeout(None)?;
    let reader = BufReader::new(stream);
    let (mut first, mut last, mut tokens) = (None, None, 0u64);
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        anyhow::ensure!(v.get("error").is_none(), "error: {v}");
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = started.elapsed().as_secs_f64();
            first.get_or_insert(now);
            last = Some(now);
        }
    }
    let (first, last) = (first.context("no text")?, last.context("no text")?);
    let rate = if last > first {
        (tokens.saturating_sub(1)) as f64 / (last - first)
    } else {
        f64::NAN
    };
    Ok((first, rate))
}

/// The engine alone: (TTFT s, decode tokens/s).
fn engine_run(
    model: &Path,
    prompt: &[u32],
    max_tokens: usize,
    world: usize,
) -> anyhow::Result<(f64, f64)> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = std::process::Command::new(agent_binary())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args([
            "--prompt-ids",
            &ids.join(","),
            "--max-tokens",
            &max_tokens.to_string(),
        ])
        .args(["--ignore-eos", "--json", "--world-size", &world.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())?;
    let t = &report["timings"];
    Ok((
        t["time_to_first_token_seconds"]
            .as_f64()
            .unwrap_or(f64::NAN),
        t["decode_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
    ))
}

struct Row {
    world: usize,
    total: f64,
    connect: f64,
    load: f64,
    warm: f64,
    bytes_per_rank: Vec<i64>,
    http: (f64, f64),
    engine: (f64, f64),
}

async fn bench_world(world: usize, o: &Options) -> anyhow::Result<Row> {
    let models = o.model.root.as_path();
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, &format!("bench-w{world}")).await?;
    let agents: Vec<Agent> = (0..world)
        .map(|r| {
            Agent::start(
                cluster,
                &unique_name(&format!("bench-w{world}-r{r}")),
                AgentOptions {
                    model_dirs: vec![models.to_path_buf()],
                    offline: true,
                    ..AgentOptions::default()
                },
            )
        })
        .collect();
    let nodes: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    // Let every agent register before the clock starts.
    for n in &nodes {
        tandem_tests::eventually("registration", WAIT, || async { node(&admin, n).await }).await?;
    }
    let mut group = Group::new(&format!("bench{world}"), 1, &nodes);
    group.model = o.model.id.clone();
    group.max_context_tokens = 2048;

    // First time each shard was seen in each phase.
    let seen: Arc<Mutex<BTreeMap<(String, String), Instant>>> = Arc::default();
    let api: Api<LlamaShard> = Api::namespaced(admin.clone(), ns.name());
    let record = seen.clone();
    let watch = tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(shard)) = events.next().await {
            if let Some(phase) = shard.status.as_ref().and_then(|s| s.phase)
                && let Ok(mut m) = record.lock()
            {
                m.entry((shard.name_any(), format!("{phase:?}")))
                    .or_insert_with(Instant::now);
            }
        }
    });
    let t0 = Instant::now();
    group.create(&admin, ns.name(), "bench-token").await?;
    group.wait_ready(&admin, ns.name()).await?;
    let total = t0.elapsed().as_secs_f64();
    watch.abort();
    let seen = seen.lock().map(|m| m.clone()).unwrap_or_default();
    let at = |rank: usize, phase: ShardPhase| {
        seen.get(&(group.shard_name(rank), format!("{phase:?}")))
            .copied()
    };
    let (mut connect, mut load, mut warm, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rank in 0..world {
        let status = shard_status(&admin, ns.name(), &group.shard_name(rank))
            .await?
            .context("status")?;
        let load_seconds = status.load_seconds.unwrap_or(f64::NAN);
        load.push(load_seconds);
        bytes.push(status.progress.map(|p| p.bytes_done).unwrap_or(0));
        // `Loading` covers forming the group, then reading the slice.
        if world > 1
            && let (Some(start), Some(loaded)) =
                (at(rank, ShardPhase::Loading), at(rank, ShardPhase::Loaded))
        {
            connect.push(loaded.duration_since(start).as_secs_f64() - load_seconds);
        }
        if let (Some(l), Some(r)) = (at(rank, ShardPhase::Loaded), at(rank, ShardPhase::Ready)) {
            warm.push(r.duration_since(l).as_secs_f64());
        }
    }
    let prompt: Vec<u32> = (0..o.prompt_tokens)
        .map(|i| 1000 + (i as u32 * 37) % (o.model.vocab - 2000))
        .collect();
    let mut http = (Vec::new(), Vec::new());
    let mut engine = (Vec::new(), Vec::new());
    let model_dir = models.join(&o.model.id);
    for _ in 0..o.runs {
        let (t, r) = http_run(group.serving_port, &o.model.id, &prompt, o.max_tokens)?;
        http.0.push(t);
        http.1.push(r);
    }
    // The engine alone, while the group sits idle (same machine, same run).
    for _ in 0..o.runs {
        let (t, r) = engine_run(&model_dir, &prompt, o.max_tokens, world)?;
        engine.0.push(t);
        engine.1.push(r);
    }
    drop(agents);
    Ok(Row {
        world,
        total,
        connect: median(connect),
        load: median(load),
        warm: median(warm),
        bytes_per_rank: bytes,
        http: (median(http.0), median(http.1)),
        engine: (median(engine.0), median(engine.1)),
    })
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for &world in &o.worlds {
        eprintln!("world size {world}...");
        rows.push(runtime.block_on(bench_world(world, &o))?);
    }
    println!(
        "{}, prompt {} tokens, {} generated, median of {} runs\n",
        o.model.about, o.prompt_tokens, o.max_tokens, o.runs
    );
    println!(
        "| world | create→Ready s | connect s | load s | ready+warm-up s | MiB read per rank | TTFT s HTTP / engine | decode tok/s HTTP / engine |"
    );
    println!("|---:|---:|---:|---:|---:|---|---:|---:|");
    for r in rows {
        let mib: Vec<String> = r
            .bytes_per_rank
            .iter()
            .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            r.world,
            show(r.total, 2),
            show(r.connect, 2),
            show(r.load, 2),
            show(r.warm, 2),
            mib.join(", "),
            show(r.http.0, 3),
            show(r.engine.0, 3),
            show(r.http.1, 1),
            show(r.engine.1, 1)
        );
    }
    Ok(())
}
