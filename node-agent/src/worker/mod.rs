//! A rank worker: the child process (`tandem-agent worker`) that runs one
//! LlamaShard, supervised by the agent.
//!
//! - [`protocol`]: the launch message (stdin) and events (stdout).
//!
//! The sequence, reported as shard phases:
//! 1. `Loading`: every rank meets at rank 0's connect barrier (rank 0
//!    serves the control service) and all form the MLX group together
//!    (ring: `MLX_HOSTFILE`/`MLX_RANK`, set by the agent); then each rank
//!    reads its slice of the weights. The engine takes its rank and size
//!    from the group, so the group forms first; the messages tell the two
//!    steps apart.
//! 2. `Loaded`, then `Connecting`: waiting at the ready barrier, until every
//!    rank has loaded.
//! 3. Rank 0 runs warm-up requests through every rank, then serves HTTP.
//!    `Ready`.
//! 4. Batched steps until the group breaks (a rank's step stream closes,
//!    rank 0's stream ends), the engine fails, SIGTERM, or stdin closes (the
//!    agent went away). Every exit but SIGTERM is preceded by a `Failed`
//!    event.
//!
//! The engine runs on its own thread, which owns the group, the model and
//! the batch: on rank 0 it runs the decode loop
//! ([`scheduler::run_leader`]), handing each step's plan to the other ranks
//! through the control service before running it; on the others it applies
//! those plans in order ([`schedule::follow`]). The async side talks to it
//! through channels.

pub mod protocol;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_crds::{Backend as ShardBackend, Progress, ShardPhase};
use tokio::sync::mpsc;

use self::protocol::{Event, FailureReason, Launch, warmup_prompt_tokens};
use crate::control::{self, ControlClient, Coordinator, GroupIdentity, Stage};
use crate::engine::EngineError;
use crate::engine::batch::{Alone, BatchEngine, PlanSink, StepPlan};
use crate::engine::model::Llama;
use crate::engine::schedule::{self, BatchLimits, Request};
use crate::engine::text::{TextCodec, TokenizerCodec};
use crate::mlx::distributed::{Backend, Group};
use crate::serve::metrics::ServeMetrics;
use crate::serve::scheduler::{self, Scheduler, Step};
use crate::serve::watchdog::{StallPolicy, StepWatch};
use crate::serve::{self as http, AppState, ServeConfig};

/// Why the rank stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Failure {
    /// The classified reason.
    pub reason: FailureReason,
    /// Detail.
    pub message: String,
}

impl Failure {
    fn new(reason: FailureReason, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
}

/// Sorts an engine error into a shard failure reason.
pub fn classify(e: &EngineError) -> FailureReason {
    match e {
        EngineError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            FailureReason::ModelNotFound
        }
        EngineError::Io { .. }
        | EngineError::Json { .. }
        | EngineError::Config { .. }
        | EngineError::Unsupported { .. }
        | EngineError::CorruptHeader { .. }
        | EngineError::Truncated { .. }
        | EngineError::Index { .. }
        | EngineError::MissingTensor { .. }
        | EngineError::Shape { .. }
        | EngineError::Dtype { .. }
        | EngineError::SplitsQuantGroup { .. }
        | EngineError::Tokenizer { .. }
        | EngineError::Template { .. }
        | EngineError::Argument(_) => FailureReason::CorruptModel,
        EngineError::Sharding { .. } => FailureReason::InvalidShard,
        EngineError::Distributed(_) | EngineError::OutOfStep(_) => FailureReason::PeerUnreachable,
        EngineError::Mlx { source, .. } => {
            let text = source.to_string().to_ascii_lowercase();
            if text.contains("memory") || text.contains("alloc") {
                FailureReason::OutOfMemory
            } else {
                FailureReason::WorkerCrashed
            }
        }
    }
}

/// Ends the process. `exit` runs atexit handlers and C++ static
/// destructors, and MLX's can block on a thread that is still inside the
/// engine (seen as workers that never exit); a watchdog makes sure the
/// process dies within two seconds anyway.
fn exit_now(code: i32) -> ! {
    let _ = std::io::stdout().lock().flush();
    let _ = std::thread::Builder::new()
        .name("exit-watchdog".into())
        .spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        });
    std::process::exit(code)
}

/// Writes one event line to stdout, where the agent reads it.
fn emit(event: &Event) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", event.to_line());
    let _ = out.flush();
}

/// What the engine thread reports.
#[derive(Debug)]
enum EngineReport {
    Joined(Result<(), EngineError>),
    Loaded(Result<LoadInfo, EngineError>),
    Stopped(Result<(), EngineError>),
}

#[derive(Debug, Clone, Copy)]
struct LoadInfo {
    seconds: f64,
    bytes_read: u64,
    vocab_size: usize,
    kv_bytes_per_token: u64,
}

/// What the engine thread does once loaded.
enum Role {
    /// Rank 0: run the batch over `requests`, telling `sink` every step.
    Lead {
        requests: std::sync::mpsc::Receiver<Request>,
        scheduler: Scheduler,
        sink: Box<dyn PlanSink + Send>,
        limits: BatchLimits,
        progress: StepWatch,
    },
    /// Ranks 1..N: apply rank 0's plans.
    Follow {
        plans: std::sync::mpsc::Receiver<StepPlan>,
    },
}

/// Starts the thread that owns the group, the model and the batch. It joins
/// the MLX group when `go` fires (groups larger than one), loads, then
/// takes its role and runs until that ends.
fn spawn_engine_thread(
    dir: PathBuf,
    backend: Backend,
    world: usize,
    go: std::sync::mpsc::Receiver<()>,
    role: std::sync::mpsc::Receiver<Role>,
    reports: mpsc::UnboundedSender<EngineReport>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let group = if world > 1 {
                if go.recv().is_err() {
                    return;
                }
                match Group::join(backend) {
                    Ok(g) => {
                        let _ = reports.send(EngineReport::Joined(Ok(())));
                        Some(g)
                    }
                    Err(e) => {
                        let _ = reports.send(EngineReport::Joined(Err(e.into())));
                        return;
                    }
                }
            } else {
                None
            };
            let started = Instant::now();
            let model = match Llama::load(&dir, group) {
                Ok(m) => m,
                Err(e) => {
                    let _ = reports.send(EngineReport::Loaded(Err(e)));
                    return;
                }
            };
            let _ = reports.send(EngineReport::Loaded(Ok(LoadInfo {
                seconds: started.elapsed().as_secs_f64(),
                bytes_read: model.load_stats().bytes_read,
                vocab_size: model.config().vocab_size,
                kv_bytes_per_token: model.kv_bytes_per_token(),
            })));
            let mut engine = BatchEngine::new(&model);
            let result = match role.recv() {
                Ok(Role::Lead {
                    requests,
                    scheduler,
                    sink,
                    limits,
                    progress,
                }) => scheduler::run_leader(
                    &mut engine,
                    limits,
                    sink.as_ref(),
                    requests,
                    &scheduler,
                    &progress,
                ),
                Ok(Role::Follow { plans }) => schedule::follow(&mut engine, &plans),
                Err(_) => Ok(()),
            };
            let _ = reports.send(EngineReport::Stopped(result));
        })
        .map(|_| ())
}

/// The engine's batch limits from the launch's.
fn batch_limits(b: &tandem_crds::BatchLimits) -> BatchLimits {
    let usize_of = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    BatchLimits {
        max_sequences: usize_of(b.max_sequences),
        max_tokens: usize_of(b.max_tokens),
        prefill_chunk_tokens: usize_of(b.prefill_chunk_tokens),
        prefix_cache_bytes: u64::try_from(b.prefix_cache_bytes).unwrap_or(0),
    }
}

/// Bytes of the checkpoint's tensor files in `dir`.
fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.len())
        .sum()
}

/// Memory the OS can still give (`MemAvailable` on Linux); `None` where
/// unknown.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// Refuses to serve limits this rank's memory cannot hold, once its slice
/// is loaded: the batch's KV cache for every position the limits allow
/// (`maxBatchTokens`, never fewer than `maxContextTokens`) plus the prefix
/// cache, against what the OS can still give (`available`; `None` skips
/// the check). The planner sized the placement from the node's memory;
/// this catches memory other processes took since. Without it, the request
/// that first filled the cache would fail mid-step: on a group of several
/// ranks that breaks the group, and MLX's CPU backend does not even raise
/// on a failed allocation (the process is killed). With it, no request
/// within the limits can run this rank out of memory for its KV, and the
/// shard fails at load with `OutOfMemory` and what would fit. Activations
/// are not counted (bounded by `prefillChunkTokens`); on a GPU the KV
/// lives in device memory, which this does not measure.
fn check_serving_memory(
    limits: BatchLimits,
    max_context_tokens: usize,
    kv_bytes_per_token: u64,
    available: Option<u64>,
) -> Result<(), Failure> {
    let Some(available) = available else {
        return Ok(());
    };
    let positions = limits.max_tokens.max(max_context_tokens) as u64;
    let kv = positions.saturating_mul(kv_bytes_per_token);
    let needed = kv.saturating_add(limits.prefix_cache_bytes);
    if needed <= available {
        return Ok(());
    }
    let mib = |b: u64| b >> 20;
    let fit = available.saturating_sub(limits.prefix_cache_bytes) / kv_bytes_per_token.max(1);
    Err(Failure::new(
        FailureReason::OutOfMemory,
        format!(
            "serving within the deployment's limits needs about {} MiB beyond this rank's weights \
             (the KV cache for {positions} positions at {kv_bytes_per_token} bytes each, {} MiB, \
             and a {} MiB prefix cache) but only {} MiB of memory is available; lower \
             spec.serving.maxBatchTokens or `--max-batch-tokens` (about {fit} positions fit beside \
             the prefix cache, and it may not go below the context length) or the prefix cache \
             (spec.serving.prefixCacheBytes), or run the rank on a node with more free memory",
            mib(needed),
            mib(kv),
            mib(limits.prefix_cache_bytes),
            mib(available),
        ),
    ))
}

/// The port of an `ip:port` address.
fn port_of(address: &str) -> Result<u16, Failure> {
    address
        .parse::<SocketAddr>()
        .map(|a| a.port())
        .map_err(|_| {
            Failure::new(
                FailureReason::InvalidShard,
                format!("`{address}` is not an ip:port address"),
            )
        })
}

/// Runs the worker: reads the launch from stdin, runs the rank, and exits
/// the process when the rank ends.
pub async fn main() -> ! {
    // Plain blocking reads: this runs before anything else, and the
    // watcher below needs a thread of its own anyway.
    let mut line = String::new();
    let read = std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line);
    let launch: Launch = match read {
        Ok(n) if n > 0 => match serde_json::from_str(&line) {
            Ok(l) => l,
            Err(e) => {
                emit(&Event::Failed {
                    reason: FailureReason::InvalidShard,
                    message: format!("unreadable launch message: {e}"),
                });
                exit_now(2);
            }
        },
        _ => {
            emit(&Event::Failed {
                reason: FailureReason::InvalidShard,
                message: "no launch message on stdin".into(),
            });
            exit_now(2);
        }
    };
    // The agent keeps stdin open for our whole life; end-of-file means it
    // is gone, and a rank nobody supervises must not linger holding ports.
    let watcher = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            let mut buf = [0u8; 256];
            loop {
                match std::io::Read::read(&mut std::io::stdin().lock(), &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            tracing::warn!("stdin closed: the agent went away; exiting");
            exit_now(3);
        });
    if let Err(e) = watcher {
        emit(&Event::Failed {
            reason: FailureReason::WorkerCrashed,
            message: format!("starting the stdin watcher: {e}"),
        });
        exit_now(2);
    }
    let terminate = tandem_crds::termination();
    let result = tokio::select! {
        r = run(launch) => r,
        _ = terminate => {
            emit(&Event::phase(ShardPhase::Terminating, "stopping on request"));
            exit_now(0);
        }
    };
    match result {
        Ok(()) => exit_now(0),
        Err(failure) => {
            tracing::error!(reason = %failure.reason, message = %failure.message, "rank failed");
            emit(&Event::Failed {
                reason: failure.reason,
                message: failure.message,
            });
            // Give in-flight responses a moment to carry their errors out.
            tokio::time::sleep(Duration::from_millis(300)).await;
            exit_now(1);
        }
    }
}

/// Runs the rank until it stops; `Err` says why.
async fn run(launch: Launch) -> Result<(), Failure> {
    let spec = &launch.spec;
    let rank = spec.rank;
    // The agent validated the spec before it built the launch
    // (agent::shards::validate), and `serve` builds its launches itself:
    // the rank lies in a group of at least one.
    let world = usize::try_from(spec.world_size).unwrap_or(1).max(1);
    let backend = match spec.backend {
        ShardBackend::Ring => Backend::Ring,
        ShardBackend::Jaccl => Backend::Jaccl,
        ShardBackend::Nccl => Backend::Nccl,
    };
    let identity = GroupIdentity {
        deployment: spec.deployment.clone(),
        epoch: spec.epoch,
        world_size: spec.world_size,
        model: spec.model.clone(),
        revision: spec
            .revision
            .clone()
            .unwrap_or_else(|| tandem_crds::DEFAULT_REVISION.into()),
    };
    let barrier_timeout = Duration::from_millis(launch.barrier_timeout_ms.max(1));

    // Refuse early what cannot fit, rather than being killed mid-load.
    let total = checkpoint_bytes(&launch.model_dir);
    let slice_estimate = total / world as u64;
    if let Some(available) = available_memory()
        && slice_estimate > available
    {
        return Err(Failure::new(
            FailureReason::OutOfMemory,
            format!(
                "this rank's slice needs about {} MiB but only {} MiB of memory is available",
                slice_estimate >> 20,
                available >> 20
            ),
        ));
    }

    let metrics = (rank == 0).then(|| Arc::new(ServeMetrics::new()));
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let (role_tx, role_rx) = std::sync::mpsc::channel::<Role>();
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    spawn_engine_thread(
        launch.model_dir.clone(),
        backend,
        world,
        go_rx,
        role_rx,
        report_tx,
    )
    .map_err(|e| {
        Failure::new(
            FailureReason::WorkerCrashed,
            format!("starting the engine thread: {e}"),
        )
    })?;

    // Connect.
    let coordinator = if rank == 0 && world > 1 {
        let port = port_of(&spec.control_address)?;
        let listener = control::bind(port).await.map_err(|e| {
            Failure::new(
                FailureReason::PeerUnreachable,
                format!("cannot listen on control port {port}: {e}"),
            )
        })?;
        let coordinator = Coordinator::new(identity.clone(), barrier_timeout);
        let (formed_tx, formed_rx) = tokio::sync::oneshot::channel::<()>();
        let c = coordinator.clone();
        let token = launch.group_token.clone();
        let tls = launch.tls.clone();
        tokio::spawn(async move {
            let formed = async move {
                let _ = formed_rx.await;
            };
            let served = control::serve(
                listener,
                c.clone(),
                token,
                tls.as_ref(),
                formed,
                std::future::pending(),
            );
            if let Err(e) = served.await {
                c.mark_broken(format!("the control service stopped: {e}"));
            }
        });
        Some((coordinator, formed_tx))
    } else {
        None
    };
    let client = if rank > 0 {
        Some(
            ControlClient::new(
                &spec.control_address,
                identity.clone(),
                rank,
                &launch.group_token,
                launch.tls.as_ref(),
                barrier_timeout,
            )
            .map_err(|e| Failure::new(FailureReason::InvalidShard, e.to_string()))?,
        )
    } else {
        None
    };
    let peer_failure =
        |e: &dyn std::fmt::Display| Failure::new(FailureReason::PeerUnreachable, e.to_string());

    let connect_started = Instant::now();
    if world > 1 {
        emit(&Event::phase(
            ShardPhase::Loading,
            format!(
                "forming the MLX {backend} group with the other ranks (rank 0's control service at {})",
                spec.control_address
            ),
        ));
        match (&coordinator, &client) {
            (Some((c, _)), _) => {
                c.arrive(0, Stage::Connect)
                    .await
                    .map_err(|e| peer_failure(&e))?;
            }
            (_, Some(client)) => {
                client
                    .join(Stage::Connect)
                    .await
                    .map_err(|e| peer_failure(&e))?;
            }
            _ => {}
        }
        let _ = go_tx.send(());
        // MLX's group formation blocks until every peer has connected, with
        // no timeout of its own; a peer whose ring port cannot be reached
        // would hold this rank forever. Past the bound the process exits
        // (exit_now), which ends the stuck engine thread with it.
        match tokio::time::timeout(barrier_timeout, reports.recv()).await {
            Ok(Some(EngineReport::Joined(Ok(())))) => {}
            Ok(Some(EngineReport::Joined(Err(e)))) => {
                return Err(Failure::new(
                    FailureReason::PeerUnreachable,
                    format!("forming the MLX {backend} group failed: {e}"),
                ));
            }
            Ok(other) => return Err(engine_gone(other)),
            Err(_) => {
                return Err(Failure::new(
                    FailureReason::PeerUnreachable,
                    format!(
                        "the MLX {backend} group did not form within {:.0}s: a peer's {backend} port did not answer (ring links down or filtered?); peers: {}",
                        barrier_timeout.as_secs_f64(),
                        spec.peers
                            .iter()
                            .map(|p| format!("rank {} at {}", p.rank, p.address))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
    }

    // Load.
    emit(&Event::Phase {
        phase: ShardPhase::Loading,
        progress: Some(Progress {
            bytes_done: 0,
            bytes_total: Some(i64::try_from(slice_estimate).unwrap_or(i64::MAX)),
        }),
        load_seconds: None,
        message: Some(format!(
            "loading rank {rank} of {world} from {}{}",
            launch.model_dir.display(),
            if world > 1 {
                format!(
                    " (group formed in {:.2}s)",
                    connect_started.elapsed().as_secs_f64()
                )
            } else {
                String::new()
            }
        )),
        memory_bytes: None,
    });
    let loaded = match reports.recv().await {
        Some(EngineReport::Loaded(Ok(info))) => info,
        Some(EngineReport::Loaded(Err(e))) => {
            return Err(Failure::new(classify(&e), e.to_string()));
        }
        other => return Err(engine_gone(other)),
    };
    let codec: Option<Arc<dyn TextCodec>> = if rank == 0 {
        let dir = launch.model_dir.clone();
        let codec = tokio::task::spawn_blocking(move || TokenizerCodec::load(&dir))
            .await
            .map_err(|e| Failure::new(FailureReason::WorkerCrashed, e.to_string()))?
            .map_err(|e| Failure::new(classify(&e), e.to_string()))?;
        Some(Arc::new(codec))
    } else {
        None
    };
    let on_gpu = matches!(
        mlx_rs::Device::default().get_type(),
        Ok(mlx_rs::DeviceType::Gpu)
    );
    if !on_gpu {
        check_serving_memory(
            batch_limits(&launch.batching),
            spec.max_context_tokens as usize,
            loaded.kv_bytes_per_token,
            available_memory(),
        )?;
    }
    let bytes_read = i64::try_from(loaded.bytes_read).unwrap_or(i64::MAX);
    emit(&Event::Phase {
        phase: ShardPhase::Loaded,
        progress: Some(Progress {
            bytes_done: bytes_read,
            bytes_total: Some(bytes_read),
        }),
        load_seconds: Some(loaded.seconds),
        message: Some(format!(
            "read {} MiB in {:.2}s",
            loaded.bytes_read >> 20,
            loaded.seconds
        )),
        memory_bytes: Some(loaded.bytes_read),
    });

    if rank > 0 {
        let Some(client) = client else {
            return Err(Failure::new(
                FailureReason::WorkerCrashed,
                "no control client",
            ));
        };
        return follow(client, role_tx, reports, &peer_failure).await;
    }
    let (Some(metrics), Some(codec)) = (metrics, codec) else {
        return Err(Failure::new(
            FailureReason::WorkerCrashed,
            "rank 0 without metrics or codec",
        ));
    };
    lead(
        launch,
        coordinator,
        role_tx,
        reports,
        metrics,
        codec,
        loaded,
    )
    .await
}

/// The watchdog's policy: the launch's floor, or the default.
/// The watchdog's floor while the warm-up compiles kernels (minutes on a
/// fresh GPU).
const WARMUP_STALL_FLOOR: Duration = Duration::from_secs(600);

/// The watchdog's floor once serving: the launch's, or 30 s on the CPU and
/// 120 s on a GPU, where a request of a new shape or kind (log-
/// probabilities) can still compile kernels for half a minute (seen on an
/// H200).
fn stall_floor(launch: &Launch, on_gpu: bool) -> Duration {
    let default = if on_gpu {
        Duration::from_secs(120)
    } else {
        StallPolicy::default().floor
    };
    launch
        .stall_timeout_ms
        .map_or(default, |ms| Duration::from_millis(ms.max(1)))
}

fn engine_gone(report: Option<EngineReport>) -> Failure {
    match report {
        Some(EngineReport::Stopped(Err(e))) => Failure::new(classify(&e), e.to_string()),
        other => Failure::new(
            FailureReason::WorkerCrashed,
            format!("the engine thread ended unexpectedly ({other:?})"),
        ),
    }
}

/// Ranks 1..N: hold the step stream and hand every step to the engine
/// thread, until the stream ends.
async fn follow(
    client: ControlClient,
    role: std::sync::mpsc::Sender<Role>,
    mut reports: mpsc::UnboundedReceiver<EngineReport>,
    peer_failure: &dyn Fn(&dyn std::fmt::Display) -> Failure,
) -> Result<(), Failure> {
    emit(&Event::phase(
        ShardPhase::Connecting,
        "loaded; waiting for every rank at the ready barrier",
    ));
    let mut stream = client.steps().await.map_err(|e| peer_failure(&e))?;
    client
        .join(Stage::Ready)
        .await
        .map_err(|e| peer_failure(&e))?;
    let (plans, plan_rx) = std::sync::mpsc::channel();
    if role.send(Role::Follow { plans: plan_rx }).is_err() {
        return Err(engine_gone(reports.recv().await));
    }
    emit(&Event::phase(
        ShardPhase::Ready,
        "in the group; following rank 0",
    ));
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(step)) => {
                    if plans.send(control::plan_from_proto(step)).is_err() {
                        return Err(engine_gone(reports.recv().await));
                    }
                }
                Ok(None) => {
                    return Err(peer_failure(&"rank 0 closed the step stream (the group broke or rank 0 stopped)"));
                }
                Err(status) => {
                    return Err(peer_failure(&format!("lost rank 0's step stream: {}", status.message())));
                }
            },
            report = reports.recv() => return Err(engine_gone(report)),
        }
    }
}

/// Rank 0: open the group, warm it up, serve HTTP until the group breaks.
async fn lead(
    launch: Launch,
    coordinator: Option<(Arc<Coordinator>, tokio::sync::oneshot::Sender<()>)>,
    role: std::sync::mpsc::Sender<Role>,
    mut reports: mpsc::UnboundedReceiver<EngineReport>,
    metrics: Arc<ServeMetrics>,
    codec: Arc<dyn TextCodec>,
    loaded: LoadInfo,
) -> Result<(), Failure> {
    let spec = &launch.spec;
    let serving_port = spec
        .serving_port
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| Failure::new(FailureReason::InvalidShard, "rank 0 has no servingPort"))?;
    let limits = batch_limits(&launch.batching);
    let (scheduler, requests) = Scheduler::new(launch.max_queue, metrics.clone());
    let (sink, coordinator): (Box<dyn PlanSink + Send>, _) = match coordinator {
        Some((c, formed)) => {
            emit(&Event::phase(
                ShardPhase::Connecting,
                "loaded; waiting for every rank at the ready barrier",
            ));
            c.arrive(0, Stage::Ready)
                .await
                .map_err(|e| Failure::new(FailureReason::PeerUnreachable, e.to_string()))?;
            tokio::spawn(c.clone().watch_streams());
            for r in 0..spec.world_size {
                metrics.set_rank_ready(r, true);
            }
            let _ = formed.send(());
            scheduler.watch(c.clone());
            (Box::new(c.clone()), Some(c))
        }
        None => {
            metrics.set_rank_ready(0, true);
            scheduler.watch(scheduler::Alone);
            (Box::new(Alone), None)
        }
    };
    let progress = StepWatch::new(StallPolicy {
        floor: WARMUP_STALL_FLOOR,
        ..StallPolicy::default()
    })
    .with_activity(crate::serve::watchdog::kernel_cache_activity());
    let watch = progress.clone();
    let lead_role = Role::Lead {
        requests,
        scheduler: scheduler.clone(),
        sink,
        limits,
        progress: progress.clone(),
    };
    if role.send(lead_role).is_err() {
        return Err(engine_gone(reports.recv().await));
    }
    // The watchdog runs from the first warm-up step on. Once it fires, the
    // stall is the reason for everything that fails after it.
    let stall: Arc<std::sync::OnceLock<String>> = Arc::default();
    {
        let (stall, scheduler, coordinator) =
            (stall.clone(), scheduler.clone(), coordinator.clone());
        tokio::spawn(async move {
            let reason = format!("the group stalled: {}", progress.stalled().await);
            tracing::error!(%reason, "progress watchdog");
            let _ = stall.set(reason.clone());
            scheduler.break_with(&reason);
            if let Some(c) = coordinator {
                c.mark_broken(reason);
            }
        });
    }
    let stalled_or = |fallback: Failure| match stall.get() {
        Some(reason) => Failure::new(FailureReason::GroupStalled, reason.clone()),
        None => fallback,
    };

    // Warm-up: short requests through every rank, one per configured prompt
    // length, so the first client requests find the kernels of their shapes
    // compiled (MLX's GPU backends compile per shape on first use; with
    // MLX_PTX_CACHE_DIR kept, a restart reads them back instead) and pay no
    // other first-use costs.
    let warm_started = Instant::now();
    let vocab = u32::try_from(loaded.vocab_size.max(1)).unwrap_or(u32::MAX);
    let longest = (spec.max_context_tokens as usize).saturating_sub(2).max(1);
    let on_gpu = matches!(
        mlx_rs::Device::default().get_type(),
        Ok(mlx_rs::DeviceType::Gpu)
    );
    let mut lengths: Vec<usize> = launch
        .warmup_prompt_tokens
        .clone()
        .unwrap_or_else(|| warmup_prompt_tokens(on_gpu))
        .iter()
        .map(|&n| n.clamp(1, longest))
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    // Ordinary ids spread over the vocabulary, different for each request
    // (no prefix-cache hits among them); only the shape matters. Request ids
    // far above any client request's.
    let warm = |i: usize, length: usize| {
        let prompt = (0..length as u32)
            .map(|t| (7 + 31 * t + 101 * i as u32) % vocab)
            .collect();
        Request::new(u64::MAX - i as u64, prompt, 2)
    };
    // One length at a time (each prompt's own prefill shapes), then, when
    // there are several, all of them at once: a step that mixes prompt
    // chunks with decodes, and decode attention over several rows.
    let mut rounds: Vec<Vec<(usize, usize)>> = lengths
        .iter()
        .copied()
        .enumerate()
        .map(|l| vec![l])
        .collect();
    if lengths.len() > 1 {
        let n = lengths.len();
        rounds.push(
            lengths
                .iter()
                .enumerate()
                .map(|(i, &l)| (n + i, l))
                .collect(),
        );
    }
    for round in rounds {
        let mut tickets = Vec::with_capacity(round.len());
        for &(i, length) in &round {
            let ticket = scheduler
                .submit(warm(i, length))
                .map_err(|e| stalled_or(Failure::new(FailureReason::PeerUnreachable, e.message)))?;
            tickets.push((length, ticket));
        }
        for (length, mut ticket) in tickets {
            loop {
                match ticket.steps.recv().await {
                    Some(Step::Token { .. } | Step::Admitted { .. }) => {}
                    Some(Step::Finished(_)) => break,
                    Some(Step::Failed(e)) => {
                        return Err(stalled_or(Failure::new(
                            FailureReason::PeerUnreachable,
                            format!("warm-up ({length}-token prompt) failed: {}", e.message),
                        )));
                    }
                    None => return Err(engine_gone(reports.recv().await)),
                }
            }
        }
    }
    let warm_seconds = warm_started.elapsed().as_secs_f64();
    watch.settle(stall_floor(&launch, on_gpu));
    tracing::info!(
        max_sequences = limits.max_sequences,
        max_tokens = limits.max_tokens,
        prefill_chunk_tokens = limits.prefill_chunk_tokens,
        prefix_cache_bytes = limits.prefix_cache_bytes,
        kv_bytes_per_token = loaded.kv_bytes_per_token,
        "batching"
    );

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], serving_port)))
        .await
        .map_err(|e| {
            Failure::new(
                FailureReason::PeerUnreachable,
                format!("cannot listen on serving port {serving_port}: {e}"),
            )
        })?;
    let config = ServeConfig {
        model: spec.model.clone(),
        aliases: vec![spec.deployment.clone()],
        max_context_tokens: spec.max_context_tokens as usize,
        vocab_size: loaded.vocab_size,
        api_key_sha256: launch.api_key_sha256.clone(),
        max_completion_tokens: usize::try_from(launch.batching.max_completion_tokens).ok(),
        limits: launch.api_limits,
    };
    let tls = match &launch.tls {
        Some(material) => Some(material.http_server_config().map_err(|e| {
            Failure::new(FailureReason::InvalidShard, format!("TLS for the API: {e}"))
        })?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = AppState::new(config, codec, scheduler.clone(), metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        http::router(state),
        launch.api_limits,
        tls,
        async move {
            let _ = stop_rx.await;
        },
    ));
    emit(&Event::phase(
        ShardPhase::Ready,
        format!(
            "serving {scheme} on port {serving_port} (warm-up {warm_seconds:.2}s over prompts of {lengths:?} tokens, world size {}, batches of up to {} sequences)",
            spec.world_size, limits.max_sequences
        ),
    ));

    let broken = async {
        match &coordinator {
            Some(c) => c.wait_broken().await,
            None => std::future::pending().await,
        }
    };
    let stalled_alone = async {
        // A group of one has no coordinator to break: wait for the
        // watchdog's verdict directly.
        loop {
            if stall.get().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let result = tokio::select! {
        reason = broken => {
            metrics.set_rank_ready(0, false);
            Err(stalled_or(Failure::new(FailureReason::PeerUnreachable, reason)))
        }
        () = stalled_alone, if coordinator.is_none() => {
            metrics.set_rank_ready(0, false);
            Err(stalled_or(Failure::new(FailureReason::GroupStalled, "the engine stalled")))
        }
        report = reports.recv() => Err(engine_gone(report)),
        served = server => Err(Failure::new(
            FailureReason::WorkerCrashed,
            format!("the HTTP server stopped: {served:?}"),
        )),
    };
    let _ = stop_tx.send(());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_limits_the_memory_cannot_hold_fail_the_load_with_what_fits() {
        let limits = BatchLimits {
            max_tokens: 32_768,
            prefix_cache_bytes: 512 << 20,
            ..BatchLimits::default()
        };
        // 32 768 positions of 24 KiB: 768 MiB, plus the 512 MiB cache.
        let kv = 24 << 10;
        assert!(check_serving_memory(limits, 8192, kv, Some(2 << 30)).is_ok());
        assert!(check_serving_memory(limits, 8192, kv, None).is_ok());
        let err = check_serving_memory(limits, 8192, kv, Some(1 << 30)).expect_err("short");
        assert_eq!(err.reason, FailureReason::OutOfMemory);
        assert!(
            err.message.contains("needs about 1280 MiB")
                && err
                    .message
                    .contains("32768 positions at 24576 bytes each, 768 MiB")
                && err.message.contains("only 1024 MiB")
                && err.message.contains("about 21845 positions fit"),
            "{}",
            err.message
        );
        // The context counts when it exceeds the batch budget.
        let small = BatchLimits {
            max_tokens: 1024,
            prefix_cache_bytes: 0,
            ..limits
        };
        let err = check_serving_memory(small, 65_536, kv, Some(1 << 30)).expect_err("context");
        assert!(err.message.contains("65536 positions"), "{}", err.message);
    }
}
