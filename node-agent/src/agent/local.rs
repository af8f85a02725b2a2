//! `tandem-agent serve`: one model served from this machine by a group of
//! rank workers, without Kubernetes.
//!
//! It starts the same `tandem-agent worker` processes the agent starts for
//! LlamaShards, with launch messages of its own instead of ones built from
//! the API server: every rank on loopback, rank 0's control service and
//! OpenAI-compatible API on this machine. It is what `mlx_lm.server` is to
//! mlx-lm: the quickest way to talk to a model, and the way the serving path
//! is measured on a single GPU machine (docs/mlx.md).
//!
//! A rank that fails or exits takes the group down and the command exits
//! non-zero, naming the rank and why; Ctrl-C or SIGTERM stops every rank.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tandem_crds::{
    Architecture, Backend, BatchLimits, LlamaShardSpec, Peer, SecretKeyRef, ShardPhase,
};
use tokio::sync::mpsc;

use super::supervisor::{self, Worker};
use crate::engine::config::ModelConfig;
use crate::engine::launch::free_ports;
use crate::tls::TlsMaterial;
use crate::worker::protocol::{Event, Launch};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory (config.json, safetensors, tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// Ranks of the tensor-parallel group, all on this machine.
    #[arg(long, default_value_t = 1)]
    pub world_size: i32,
    /// Port of the OpenAI-compatible API; rank 0 listens on every address.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Collective backend: Ring (TCP on loopback) or Nccl (CUDA builds; rank
    /// r uses GPU r, so world size at most the number of GPUs).
    #[arg(long, default_value = "Ring", value_parser = parse_backend)]
    pub backend: Backend,
    /// File holding the key HTTP clients must present as `Authorization:
    /// Bearer KEY`; without it the API is open.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Directory for the ranks' hostfile and MLX's kernel cache, which makes
    /// later starts skip the GPU kernel compilation [default:
    /// ~/.cache/tandem/serve].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Requests rank 0 queues before answering 429.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Longest context a request may use, in tokens.
    #[arg(long, default_value_t = 4096)]
    pub max_context_tokens: u32,
    /// Prompt lengths rank 0 runs through the group before it serves, so
    /// that the first requests find their kernels compiled (comma-separated;
    /// `0` alone turns the warm-up off) [default: 1,16,128,512 on a GPU, 1
    /// on the CPU].
    #[arg(long, value_delimiter = ',', value_name = "TOKENS")]
    pub warmup_prompt_tokens: Option<Vec<usize>>,
    /// Model name the API reports [default: the directory's name].
    #[arg(long)]
    pub name: Option<String>,
    /// PEM certificate chain rank 0 serves HTTPS (and the local ranks'
    /// control stream) with. It must name 127.0.0.1, where the other ranks
    /// reach rank 0, besides the names clients use. Needs --tls-key and
    /// --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with = "plain_http")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate that issued --tls-cert; the other ranks verify
    /// rank 0 against it.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve the API (and the control stream) in plain text, without TLS:
    /// anyone on the network path reads prompts and answers. Either this or
    /// --tls-cert is required.
    #[arg(long)]
    pub plain_http: bool,
    /// How rank 0 batches requests (the same flags as `run`'s).
    #[command(flatten)]
    pub batching: super::config::BatchFlags,
    /// What one client can take, and the progress watchdog (the same flags
    /// as `run`'s).
    #[command(flatten)]
    pub guards: super::config::GuardFlags,
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    match s.to_ascii_lowercase().as_str() {
        "ring" => Ok(Backend::Ring),
        "jaccl" => Ok(Backend::Jaccl),
        "nccl" => Ok(Backend::Nccl),
        _ => Err(format!("`{s}` is not a backend (Ring, Jaccl or Nccl)")),
    }
}

/// `~/.cache/tandem/serve` (`$XDG_CACHE_HOME/tandem/serve`): never a
/// guessable directory in the shared temp directory.
fn default_state_dir() -> anyhow::Result<PathBuf> {
    let home = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let cache = home("XDG_CACHE_HOME")
        .or_else(|| home("HOME").map(|h| h.join(".cache")))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no state directory: give --state-dir, or set $XDG_CACHE_HOME or $HOME for the \
                 default"
            )
        })?;
    Ok(cache.join("tandem").join("serve"))
}

/// A fresh group token: only these processes know it.
fn group_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)
        .context("reading /dev/urandom for the group token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The group's batch limits: the flags, with an unset `--max-batch-tokens`
/// raised to `--max-context-tokens`, as the operator resolves a deployment's.
fn batch_limits(args: &ServeArgs) -> anyhow::Result<BatchLimits> {
    let mut limits = args.batching.limits().map_err(anyhow::Error::msg)?;
    let context = args.max_context_tokens;
    match args.batching.max_batch_tokens {
        None => limits.max_tokens = limits.max_tokens.max(context),
        Some(tokens) if tokens < context => bail!(
            "--max-batch-tokens {tokens} is less than --max-context-tokens {context}, so a \
             request of the longest context could never run; raise --max-batch-tokens to at \
             least {context}, or leave it out"
        ),
        Some(_) => {}
    }
    Ok(limits)
}

/// The TLS material of `--tls-cert`, `--tls-key` and `--tls-ca`; `None`
/// with `--plain-http`, and an error when neither was chosen.
fn tls_material(args: &ServeArgs) -> anyhow::Result<Option<TlsMaterial>> {
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) else {
        if args.plain_http {
            return Ok(None);
        }
        bail!(
            "serve needs --tls-cert, --tls-key and --tls-ca to serve HTTPS, or --plain-http to \
             serve plain HTTP"
        );
    };
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let material = TlsMaterial::new(read(cert)?, read(key)?, read(ca)?)
        .with_context(|| format!("the TLS files {} and {}", cert.display(), key.display()))?;
    Ok(Some(material))
}

/// The launch message of every rank.
fn launches(args: &ServeArgs, state_dir: &Path) -> anyhow::Result<Vec<Launch>> {
    let world = args.world_size;
    if !(1..=256).contains(&world) {
        bail!("--world-size must be between 1 and 256, not {world}");
    }
    let config = ModelConfig::load(&args.model)
        .with_context(|| format!("reading the model in {}", args.model.display()))?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let api_key = match &args.api_key_file {
        Some(path) => {
            let key = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API key from {}", path.display()))?;
            let key = key.trim().to_owned();
            if key.is_empty() {
                bail!("{} is empty; it must hold the API key", path.display());
            }
            Some(tandem_crds::api_key_digest(&key))
        }
        None => None,
    };
    let tls = tls_material(args)?;
    let ports = free_ports(world as usize + 1)?;
    let control = format!("127.0.0.1:{}", ports[world as usize]);
    let addresses: Vec<String> = ports[..world as usize]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let hostfile = supervisor::write_hostfile(&state_dir.join("hostfile.json"), &addresses)
        .with_context(|| format!("writing the hostfile in {}", state_dir.display()))?;
    let token = group_token()?;
    let peers: Vec<Peer> = addresses
        .iter()
        .enumerate()
        .map(|(r, a)| Peer {
            rank: r as i32,
            node: "local".into(),
            address: a.clone(),
        })
        .collect();
    let batching = batch_limits(args)?;
    let api_limits = args.guards.api_limits().map_err(anyhow::Error::msg)?;
    let warmup: Option<Vec<usize>> = args
        .warmup_prompt_tokens
        .as_ref()
        .map(|lengths| lengths.iter().copied().filter(|&n| n > 0).collect());
    Ok((0..world)
        .map(|rank| Launch {
            namespace: "local".into(),
            shard_name: format!("{name}-rank-{rank}"),
            spec: LlamaShardSpec {
                deployment: name.clone(),
                epoch: 1,
                rank,
                world_size: world,
                node_name: "local".into(),
                model: name.clone(),
                revision: None,
                architecture: Architecture::from_shape(&config.shape()),
                backend: args.backend,
                peers: peers.clone(),
                control_address: control.clone(),
                serving_port: (rank == 0).then_some(i32::from(args.port)),
                group_token_secret_ref: SecretKeyRef {
                    name: "local".into(),
                    key: None,
                },
                api_key_secret_ref: None,
                tls_secret_ref: None,
                max_context_tokens: args.max_context_tokens,
                batching: Some(batching),
            },
            model_dir: args.model.clone(),
            group_token: token.clone(),
            tls: tls.clone(),
            api_key_sha256: if rank == 0 { api_key.clone() } else { None },
            max_queue: args.max_queue,
            barrier_timeout_ms: 120_000,
            hostfile: hostfile.clone(),
            warmup_prompt_tokens: warmup.clone(),
            batching,
            api_limits,
            stall_timeout_ms: args
                .guards
                .stall_timeout()
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        })
        .collect())
}

async fn stop_all(workers: &mut [Worker]) {
    let stops = workers.iter_mut().map(|w| w.stop(Duration::from_secs(5)));
    futures::future::join_all(stops).await;
}

/// Runs `serve` until a signal or a rank's failure.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let state_dir = match args.state_dir.clone() {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    super::state_dir::prepare(&state_dir)?;
    let launches = launches(&args, &state_dir)?;
    let program = std::env::current_exe().context("finding the tandem-agent executable")?;
    let kernel_cache = supervisor::kernel_cache_dir(&state_dir);
    let (tx, mut events) = mpsc::unbounded_channel::<(i32, Event)>();
    let mut workers = Vec::with_capacity(launches.len());
    for launch in &launches {
        let rank = launch.spec.rank;
        let gpu = (launch.spec.backend == Backend::Nccl).then_some(rank as u32);
        let env = supervisor::worker_env(launch, &kernel_cache, gpu);
        let started = supervisor::start(&program, launch, env, format!("rank {rank}")).await;
        let (worker, mut rank_events) = match started {
            Ok(w) => w,
            Err(e) => {
                stop_all(&mut workers).await;
                bail!("starting rank {rank}: {e}");
            }
        };
        workers.push(worker);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(event) = rank_events.recv().await {
                let _ = tx.send((rank, event));
            }
        });
    }
    drop(tx);
    let world = launches.len();
    tracing::info!(
        model = %args.model.display(),
        world,
        backend = ?args.backend,
        kernel_cache = %kernel_cache.display(),
        "started {world} rank worker(s)"
    );
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut exited: Vec<Option<String>> = vec![None; world];
    let outcome = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some((rank, Event::Phase { phase, message, .. })) => {
                    let message = message.unwrap_or_default();
                    tracing::info!(rank, ?phase, "{message}");
                    if rank == 0 && phase == ShardPhase::Ready {
                        let scheme = if launches[0].tls.is_some() { "https" } else { "http" };
                        println!(
                            "serving {} at {scheme}://127.0.0.1:{}/v1 (world size {world}, {:?}); Ctrl-C stops it",
                            launches[0].spec.model, args.port, args.backend
                        );
                    }
                }
                Some((rank, Event::Failed { reason, message })) => {
                    break Err(format!("rank {rank} failed ({reason}): {message}"));
                }
                None => break Err("every rank's event stream ended".to_owned()),
            },
            _ = poll.tick() => {
                if let Some(rank) = note_exits(&mut workers, &mut exited) {
                    break Err(format!("rank {rank} {}", exited[rank].as_deref().unwrap_or("exited")));
                }
            }
            _ = tandem_crds::termination() => break Ok(()),
        }
    };
    if let Err(first) = outcome {
        // One rank's end soon ends the others (a lost peer is fatal to a
        // group): give them a moment, so the error says what happened to each.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        note_exits(&mut workers, &mut exited);
        stop_all(&mut workers).await;
        let others: Vec<String> = exited
            .iter()
            .enumerate()
            .filter_map(|(r, e)| e.as_ref().map(|e| format!("rank {r} {e}")))
            .filter(|line| !first.starts_with(line.as_str()))
            .collect();
        if others.is_empty() {
            bail!("the local group stopped: {first}");
        }
        bail!("the local group stopped: {first}; {}", others.join("; "));
    }
    stop_all(&mut workers).await;
    Ok(())
}

/// Records how each worker that has ended ended; returns the first rank
/// newly found ended.
fn note_exits(workers: &mut [Worker], exited: &mut [Option<String>]) -> Option<usize> {
    let mut first = None;
    for (rank, worker) in workers.iter_mut().enumerate() {
        if exited[rank].is_none()
            && let Some(exit) = worker.try_exit()
        {
            exited[rank] = Some(exit.to_string());
            first.get_or_insert(rank);
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_limits_follow_the_context_unless_set() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |extra: &[&str]| {
            let argv = ["x", "--model", "m", "--plain-http"]
                .iter()
                .chain(extra)
                .copied();
            Cli::try_parse_from(argv).expect("flags").serve
        };
        assert_eq!(batch_limits(&parse(&[])).ok(), Some(BatchLimits::default()));
        let long = parse(&["--max-context-tokens", "65536"]);
        assert_eq!(batch_limits(&long).ok().map(|l| l.max_tokens), Some(65536));
        let short = parse(&["--max-context-tokens", "8192", "--max-batch-tokens", "4096"]);
        let err = batch_limits(&short).expect_err("below the context");
        assert!(err.to_string().contains("--max-batch-tokens 4096"), "{err}");
        let bad = parse(&["--max-batch-sequences", "0"]);
        assert!(batch_limits(&bad).is_err());
    }

    #[test]
    fn plain_http_is_only_served_when_asked_for() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let neither = Cli::try_parse_from(["x", "--model", "m"]).expect("flags");
        let err = tls_material(&neither.serve).expect_err("neither TLS nor --plain-http");
        assert!(err.to_string().contains("--plain-http"), "{err}");
        let plain = Cli::try_parse_from(["x", "--model", "m", "--plain-http"]).expect("flags");
        assert!(tls_material(&plain.serve).expect("plain").is_none());
        let half = Cli::try_parse_from(["x", "--model", "m", "--tls-cert", "c.pem"]);
        assert!(half.is_err(), "--tls-cert needs --tls-key and --tls-ca");
        let both = [
            "x",
            "--model",
            "m",
            "--plain-http",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
        ];
        assert!(Cli::try_parse_from(both.iter().chain(&["--tls-ca", "a"])).is_err());
    }

    #[test]
    fn backends_parse_in_either_case() {
        assert_eq!(parse_backend("nccl"), Ok(Backend::Nccl));
        assert_eq!(parse_backend("Ring"), Ok(Backend::Ring));
        assert!(
            parse_backend("tcp")
                .unwrap_err()
                .contains("Ring, Jaccl or Nccl")
        );
    }
}
