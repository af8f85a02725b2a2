//! The shards this node runs: a watch on the LlamaShards labelled
//! `tandem.dev/node=<this node>` (all namespaces), and one runner task per
//! shard that owns its rank worker.
//!
//! A runner: checks the spec, finds the model (or downloads it, reporting
//! `Downloading` with byte progress), reads the group token (and rank 0's
//! API key), writes the ring hostfile from the peer list, starts the worker
//! and turns its events into the shard's status. When the worker fails the
//! status says why (`reason`, `message`); crashes and lost peers are
//! retried with a capped backoff, a missing or corrupt model waits for the
//! spec to change.
//!
//! A shard with `spec.backend: Nccl` needs MLX's CUDA backend and one of the
//! node's GPUs (`--gpus`): the runner takes the lowest free one from
//! [`GpuSlots`] for each attempt, hands it to the worker as
//! `CUDA_VISIBLE_DEVICES`, and gives it back when the attempt ends. A node
//! without CUDA, without GPUs or with all of them taken fails the shard with
//! `InvalidShard`, saying what would work.
//!
//! The release contract with the operator (docs/design.md): a shard this
//! node runs is listed in `LlamaNode.status.shards` until its worker has
//! stopped. When a shard is deleted, or a newer epoch of its deployment
//! arrives on this node (a stale epoch), or the agent shuts down, the
//! runner marks the entry `Terminating`, stops the worker (SIGTERM, then
//! SIGKILL), sets the shard's status to `Terminating` where the object
//! still exists, and removes the entry. The new epoch's worker starts only
//! after the old one is gone, so ports are free.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tandem_crds::{
    API_KEY_DIGEST_KEY, Backend, LABEL_NODE, LlamaShard, NodeShard, Progress, SecretKeyRef,
    SecretRef, ShardPhase, TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY, label_value,
};
use tokio::sync::{mpsc, watch};

use super::config::AgentConfig;
use super::firewall;
use super::hardware::ComputeBackend;
use super::metrics::AgentMetrics;
use super::models::{self, Download};
use super::node::NodeShards;
use super::supervisor::{self, Worker};
use crate::backoff::Backoff;
use crate::tls::TlsMaterial;
use crate::worker::protocol::{Event, FailureReason, Launch};

/// How long a worker gets to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A worker that stayed Ready this long resets the restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What every runner shares.
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// Agent configuration.
    pub config: Arc<AgentConfig>,
    /// The `tandem-agent` executable, started as `tandem-agent worker`.
    pub program: PathBuf,
    /// The node status's shard list.
    pub node_shards: NodeShards,
    /// Agent metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The MLX compute backend this agent runs.
    pub backend: ComputeBackend,
    /// The GPUs `Nccl` ranks take, one each.
    pub gpus: GpuSlots,
}

/// The node's GPUs for `Nccl` ranks, by CUDA device index `0..count`; a
/// running worker holds one through a [`GpuSlot`].
#[derive(Debug, Clone, Default)]
pub struct GpuSlots {
    /// Whether each GPU is held.
    held: Arc<Mutex<Vec<bool>>>,
}

impl GpuSlots {
    /// `count` free GPUs.
    pub fn new(count: u32) -> GpuSlots {
        GpuSlots {
            held: Arc::new(Mutex::new(vec![false; count as usize])),
        }
    }

    /// How many GPUs the node offers.
    pub fn count(&self) -> u32 {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        u32::try_from(held.len()).unwrap_or(u32::MAX)
    }

    /// The lowest free GPU, held until the slot drops; `None` when every
    /// GPU is held.
    pub fn acquire(&self) -> Option<GpuSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let index = held.iter().position(|h| !h)?;
        held[index] = true;
        Some(GpuSlot {
            held: self.held.clone(),
            index: u32::try_from(index).unwrap_or(u32::MAX),
        })
    }
}

/// One GPU held by a worker; dropping it gives the GPU back.
#[derive(Debug)]
pub struct GpuSlot {
    held: Arc<Mutex<Vec<bool>>>,
    index: u32,
}

impl GpuSlot {
    /// The CUDA device index (`CUDA_VISIBLE_DEVICES`).
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for GpuSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.get_mut(self.index as usize) {
            *h = false;
        }
    }
}

/// Whether this node can run a rank with `backend`: `Nccl` needs MLX's
/// CUDA backend and at least one GPU. The message says what would work.
fn check_backend(backend: Backend, compute: ComputeBackend, gpus: u32) -> Result<(), String> {
    if backend != Backend::Nccl {
        return Ok(());
    }
    if compute != ComputeBackend::Cuda {
        return Err(format!(
            "spec.backend is Nccl but this node runs MLX's {} backend; use Ring, or run the \
             agent with MLX's CUDA build (--backend cuda)",
            compute.as_str()
        ));
    }
    if gpus == 0 {
        return Err(
            "spec.backend is Nccl but this node offers no GPUs (--gpus 0); use Ring, or run \
             the agent with --gpus N (one Nccl rank per GPU)"
                .into(),
        );
    }
    Ok(())
}

/// A GPU for an `Nccl` rank, or why there is none.
fn take_gpu(gpus: &GpuSlots) -> Result<GpuSlot, String> {
    gpus.acquire().ok_or_else(|| {
        let n = gpus.count();
        let (offers, all) = if n == 1 {
            ("1 GPU".to_owned(), "it is".to_owned())
        } else {
            (format!("{n} GPUs"), format!("all {n} are"))
        };
        format!(
            "spec.backend is Nccl and this node offers {offers} (one Nccl rank each), but \
             {all} taken by other ranks; place the rank on another node, run the agent with \
             more --gpus, or use Ring"
        )
    })
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.config.node_name)
            .field("program", &self.program)
            .finish()
    }
}

struct Runner {
    namespace: String,
    deployment: String,
    epoch: i64,
    generation: Option<i64>,
    updates: watch::Sender<Arc<LlamaShard>>,
    stop: watch::Sender<Option<String>>,
    finished: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Watches this node's shards and runs them until `shutdown` turns true;
/// then stops every worker and releases every shard.
pub async fn run(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let api: Api<LlamaShard> = Api::all(ctx.client.clone());
    // The operator shortens long node names into a valid label value.
    let selector = format!("{LABEL_NODE}={}", label_value(&ctx.config.node_name));
    let mut events = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut runners: BTreeMap<String, Runner> = BTreeMap::new();
    let mut listed: Option<BTreeSet<String>> = None;
    loop {
        let event = tokio::select! {
            _ = super::until_true(&mut shutdown) => break,
            event = events.next() => event,
        };
        match event {
            Some(Ok(watcher::Event::Apply(shard))) => upsert(&ctx, &mut runners, shard),
            Some(Ok(watcher::Event::InitApply(shard))) => {
                if let Some(seen) = listed.as_mut() {
                    seen.insert(shard.uid().unwrap_or_default());
                }
                upsert(&ctx, &mut runners, shard);
            }
            Some(Ok(watcher::Event::Init)) => listed = Some(BTreeSet::new()),
            Some(Ok(watcher::Event::InitDone)) => {
                // Shards deleted while the watch was down.
                if let Some(seen) = listed.take() {
                    for (uid, runner) in &runners {
                        if !seen.contains(uid) {
                            runner
                                .stop
                                .send_replace(Some("the shard was deleted".into()));
                        }
                    }
                }
            }
            Some(Ok(watcher::Event::Delete(shard))) => {
                if let Some(runner) = runners.get(&shard.uid().unwrap_or_default()) {
                    runner
                        .stop
                        .send_replace(Some("the shard was deleted".into()));
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "watching shards failed; retrying"),
            None => break,
        }
        runners.retain(|_, r| !r.task.is_finished());
    }
    for runner in runners.values() {
        runner
            .stop
            .send_replace(Some("the agent is stopping".into()));
    }
    for (_, runner) in runners {
        let _ = runner.task.await;
    }
}

fn upsert(ctx: &Arc<Context>, runners: &mut BTreeMap<String, Runner>, shard: LlamaShard) {
    let uid = shard.uid().unwrap_or_default();
    if let Some(runner) = runners.get(&uid) {
        if shard.meta().deletion_timestamp.is_some() {
            runner
                .stop
                .send_replace(Some("the shard is being deleted".into()));
        } else if runner.generation != shard.meta().generation {
            runner.updates.send_replace(Arc::new(shard));
        }
        if let Some(r) = runners.get_mut(&uid) {
            r.generation = r.updates.borrow().meta().generation;
        }
        return;
    }
    if shard.meta().deletion_timestamp.is_some() {
        return;
    }
    let namespace = shard.namespace().unwrap_or_default();
    let deployment = shard.spec.deployment.clone();
    let epoch = shard.spec.epoch;
    let newer = runners
        .values()
        .filter(|r| r.namespace == namespace && r.deployment == deployment && r.epoch > epoch)
        .map(|r| r.epoch)
        .max();
    if let Some(newer) = newer {
        // A stale epoch arriving late: say so, run nothing.
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let writer = StatusWriter::new(&ctx.client, &shard);
            let state = ShardState {
                phase: ShardPhase::Terminating,
                message: Some(format!(
                    "superseded by epoch {newer} on this node; not started"
                )),
                ..ShardState::default()
            };
            writer.set(&state);
            writer.close(FINAL_WRITE_WAIT).await;
        });
        return;
    }
    let mut wait_for = Vec::new();
    for r in runners.values() {
        if r.namespace == namespace && r.deployment == deployment && r.epoch < epoch {
            r.stop
                .send_replace(Some(format!("superseded by epoch {epoch}")));
            wait_for.push(r.finished.clone());
        }
    }
    let shard = Arc::new(shard);
    let (updates, updates_rx) = watch::channel(shard.clone());
    let (stop, stop_rx) = watch::channel(None);
    let (finished_tx, finished) = watch::channel(false);
    let task = tokio::spawn(run_shard(
        ctx.clone(),
        shard.clone(),
        updates_rx,
        stop_rx,
        wait_for,
        finished_tx,
    ));
    runners.insert(
        uid,
        Runner {
            namespace,
            deployment,
            epoch,
            generation: shard.meta().generation,
            updates,
            stop,
            finished,
            task,
        },
    );
}

/// The status the runner keeps and writes whole.
#[derive(Debug, Clone, PartialEq)]
struct ShardState {
    phase: ShardPhase,
    progress: Option<Progress>,
    load_seconds: Option<f64>,
    reason: Option<String>,
    message: Option<String>,
    memory_bytes: u64,
}

impl Default for ShardState {
    fn default() -> Self {
        ShardState {
            phase: ShardPhase::Pending,
            progress: None,
            load_seconds: None,
            reason: None,
            message: None,
            memory_bytes: 0,
        }
    }
}

/// First pause after a failed status write; it doubles up to [`WRITE_BACKOFF_MAX`].
const WRITE_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between status write attempts: how long after the API
/// server returns the newest status is written at the latest.
const WRITE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one status write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a runner that ends waits for its last status to be written
/// (the writer keeps trying after that, in the background).
const FINAL_WRITE_WAIT: Duration = Duration::from_secs(5);

/// How one status write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Written {
    /// The API server took it.
    Done,
    /// The shard is gone: nothing to write to.
    Gone,
    /// The API server refused it for good (invalid); the next status may do.
    Refused(String),
    /// It may work later: no API server, a timeout, a server error.
    Retry(String),
}

fn written(result: Result<LlamaShard, kube::Error>) -> Written {
    match result {
        Ok(_) => Written::Done,
        Err(kube::Error::Api(e)) if e.code == 404 => Written::Gone,
        Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => {
            Written::Refused(e.to_string())
        }
        Err(e) => Written::Retry(e.to_string()),
    }
}

/// Which shard a writer writes, for its logs.
#[derive(Debug, Clone)]
struct ShardRef {
    namespace: String,
    name: String,
    rank: i32,
}

/// Writes one shard's status (merge patch, absent fields cleared) from a
/// task of its own, so that the worker's event relay never waits for the
/// API server. Only the newest status matters: [`set`](StatusWriter::set)
/// replaces whatever has not been written yet, and a failed write is
/// retried with a capped backoff (with the newest status by then) until it
/// lands, so a transition made during an API server outage is written once
/// the server is back.
struct StatusWriter {
    latest: watch::Sender<Option<serde_json::Value>>,
    generation: Option<i64>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusWriter {
    fn new(client: &kube::Client, shard: &LlamaShard) -> StatusWriter {
        let api: Api<LlamaShard> =
            Api::namespaced(client.clone(), &shard.namespace().unwrap_or_default());
        let target = ShardRef {
            namespace: shard.namespace().unwrap_or_default(),
            name: shard.name_any(),
            rank: shard.spec.rank,
        };
        let (latest, pending) = watch::channel(None);
        let name = target.name.clone();
        let write = move |body: serde_json::Value| {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let params = PatchParams::default();
                let patch = Patch::Merge(&body);
                let request = api.patch_status(&name, &params, &patch);
                match tokio::time::timeout(WRITE_TIMEOUT, request).await {
                    Ok(result) => written(result),
                    Err(_) => Written::Retry(format!("no answer within {WRITE_TIMEOUT:?}")),
                }
            }
        };
        let task = tokio::spawn(flush(
            pending,
            target,
            write,
            Backoff::new(WRITE_BACKOFF, WRITE_BACKOFF_MAX),
        ));
        StatusWriter {
            latest,
            generation: shard.meta().generation,
            task,
        }
    }

    /// The spec changed: later statuses observe its generation.
    fn retarget(&mut self, shard: &LlamaShard) {
        self.generation = shard.meta().generation;
    }

    /// Makes `state` the status to write; returns at once.
    fn set(&self, state: &ShardState) {
        let body = json!({
            "status": {
                "phase": state.phase,
                "progress": state.progress,
                "loadSeconds": state.load_seconds,
                "reason": state.reason,
                "message": state.message,
                "observedGeneration": self.generation,
            }
        });
        self.latest.send_replace(Some(body));
    }

    /// No more statuses: waits up to `within` for the last one to be
    /// written; after that it is still tried in the background.
    async fn close(self, within: Duration) {
        let StatusWriter { latest, task, .. } = self;
        drop(latest);
        let _ = tokio::time::timeout(within, task).await;
    }
}

/// The writer's task: writes the newest pending status until it lands (or
/// the shard is gone), then waits for the next; ends once the writer is
/// dropped and its last status is written.
async fn flush<W, F>(
    mut pending: watch::Receiver<Option<serde_json::Value>>,
    shard: ShardRef,
    mut write: W,
    mut backoff: Backoff,
) where
    W: FnMut(serde_json::Value) -> F,
    F: std::future::Future<Output = Written>,
{
    // `changed` reports a value set just before the writer was dropped
    // before it reports the channel closed.
    while pending.changed().await.is_ok() {
        backoff.reset();
        let mut failures = 0u32;
        loop {
            let Some(body) = pending.borrow_and_update().clone() else {
                break;
            };
            match write(body).await {
                Written::Done => {
                    if failures > 0 {
                        tracing::info!(namespace = %shard.namespace, shard = %shard.name, rank = shard.rank, failures, "wrote the shard status after failed attempts");
                    }
                    break;
                }
                Written::Gone => break,
                Written::Refused(error) => {
                    tracing::warn!(namespace = %shard.namespace, shard = %shard.name, rank = shard.rank, %error, "the API server refused the shard status");
                    break;
                }
                Written::Retry(error) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff.next_delay();
                    if failures == 1 {
                        tracing::warn!(namespace = %shard.namespace, shard = %shard.name, rank = shard.rank, %error, retry_in = ?delay, "writing the shard status failed; retrying with the newest status until it lands");
                    } else {
                        tracing::debug!(namespace = %shard.namespace, shard = %shard.name, rank = shard.rank, %error, failures, retry_in = ?delay, "writing the shard status failed again");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Everything about one shard a runner tracks between writes.
struct Tracked {
    ctx: Arc<Context>,
    shard: Arc<LlamaShard>,
    writer: StatusWriter,
    state: ShardState,
}

impl Tracked {
    fn new(ctx: Arc<Context>, shard: Arc<LlamaShard>) -> Tracked {
        let writer = StatusWriter::new(&ctx.client, &shard);
        Tracked {
            ctx,
            shard,
            writer,
            state: ShardState::default(),
        }
    }

    fn retarget(&mut self, shard: Arc<LlamaShard>) {
        self.writer.retarget(&shard);
        self.shard = shard;
    }

    fn node_entry(&self) -> NodeShard {
        NodeShard {
            namespace: self.shard.namespace().unwrap_or_default(),
            name: self.shard.name_any(),
            rank: self.shard.spec.rank,
            epoch: self.shard.spec.epoch,
            phase: Some(self.state.phase),
            memory_bytes: i64::try_from(self.state.memory_bytes).unwrap_or(i64::MAX),
        }
    }

    /// Records a new state, in the node's list and as the shard status to
    /// write (in the background: this never waits for the API server).
    async fn set(&mut self, state: ShardState) {
        self.state = state;
        self.ctx.node_shards.set(self.node_entry());
        self.writer.set(&self.state);
    }

    async fn phase(&mut self, phase: ShardPhase, message: impl Into<String>) {
        let state = ShardState {
            phase,
            message: Some(message.into()),
            memory_bytes: self.state.memory_bytes,
            load_seconds: self.state.load_seconds,
            ..ShardState::default()
        };
        self.set(state).await;
    }

    async fn failed(&mut self, reason: FailureReason, message: String) {
        self.ctx.metrics.shard_failed(reason);
        let state = ShardState {
            phase: ShardPhase::Failed,
            reason: Some(reason.as_str().into()),
            message: Some(message),
            ..ShardState::default()
        };
        self.set(state).await;
    }
}

/// How one attempt to run the shard ended.
enum Attempt {
    /// Asked to stop (deleted, superseded, agent stopping).
    Stopped(String),
    /// The spec changed; start over with it.
    Changed(Arc<LlamaShard>),
    /// It failed.
    Failed {
        reason: FailureReason,
        message: String,
        retry: bool,
        /// How long the worker was Ready, if it got there.
        ready_for: Option<Duration>,
    },
}

impl Attempt {
    fn fail(reason: FailureReason, message: impl Into<String>) -> Attempt {
        Attempt::Failed {
            reason,
            message: message.into(),
            retry: reason.retryable(),
            ready_for: None,
        }
    }
}

/// Waits for a stop request or a spec change.
async fn interrupted(
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Attempt {
    loop {
        tokio::select! {
            changed = stop.changed() => {
                let reason = stop.borrow_and_update().clone();
                match (changed, reason) {
                    (_, Some(reason)) => return Attempt::Stopped(reason),
                    (Err(_), None) => return Attempt::Stopped("the agent is stopping".into()),
                    (Ok(()), None) => {}
                }
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    return Attempt::Stopped("the agent is stopping".into());
                }
                return Attempt::Changed(updates.borrow_and_update().clone());
            }
        }
    }
}

async fn run_shard(
    ctx: Arc<Context>,
    shard: Arc<LlamaShard>,
    mut updates: watch::Receiver<Arc<LlamaShard>>,
    mut stop: watch::Receiver<Option<String>>,
    wait_for: Vec<watch::Receiver<bool>>,
    finished: watch::Sender<bool>,
) {
    let mut tracked = Tracked::new(ctx.clone(), shard);
    let name = tracked.shard.name_any();
    tracing::info!(shard = %name, epoch = tracked.shard.spec.epoch, rank = tracked.shard.spec.rank, "running shard");
    let mut backoff = Backoff::new(Duration::from_secs(1), ctx.config.max_restart_backoff);

    // An older epoch of the same deployment holds the ports until it stops.
    if !wait_for.is_empty() {
        tracked
            .phase(
                ShardPhase::Pending,
                "waiting for the previous epoch's worker to stop",
            )
            .await;
        for mut w in wait_for {
            super::until_true(&mut w).await;
        }
    }

    let released = loop {
        match attempt(&mut tracked, &mut stop, &mut updates).await {
            Attempt::Stopped(reason) => break reason,
            Attempt::Changed(shard) => {
                tracked.retarget(shard);
                backoff.reset();
            }
            Attempt::Failed {
                reason,
                message,
                retry,
                ready_for,
            } => {
                if ready_for.is_some_and(|d| d >= HEALTHY_RUN) {
                    backoff.reset();
                }
                tracing::warn!(shard = %name, %reason, %message, "shard failed");
                if retry {
                    let delay = backoff.next_delay();
                    ctx.metrics.worker_restarted(reason);
                    tracked
                        .failed(
                            reason,
                            format!(
                                "{message}; restarting in {}s (restart {})",
                                delay.as_secs_f64().ceil(),
                                backoff.restarts
                            ),
                        )
                        .await;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        a = interrupted(&mut stop, &mut updates) => match a {
                            Attempt::Stopped(reason) => break reason,
                            Attempt::Changed(shard) => {
                                tracked.retarget(shard);
                                backoff.reset();
                            }
                            Attempt::Failed { .. } => {}
                        },
                    }
                } else {
                    tracked.failed(reason, message).await;
                    match interrupted(&mut stop, &mut updates).await {
                        Attempt::Stopped(reason) => break reason,
                        Attempt::Changed(shard) => {
                            tracked.retarget(shard);
                            backoff.reset();
                        }
                        Attempt::Failed { .. } => {}
                    }
                }
            }
        }
    };
    tracked
        .phase(ShardPhase::Terminating, format!("released: {released}"))
        .await;
    let Tracked { shard, writer, .. } = tracked;
    writer.close(FINAL_WRITE_WAIT).await;
    ctx.node_shards
        .remove(&shard.namespace().unwrap_or_default(), &name);
    tracing::info!(shard = %name, rank = shard.spec.rank, reason = %released, "shard released");
    let _ = finished.send(true);
}

/// Checks what the runner needs from the spec; the message says what is wrong.
fn validate(config: &AgentConfig, shard: &LlamaShard) -> Result<Vec<String>, String> {
    let spec = &shard.spec;
    if spec.node_name != config.node_name {
        return Err(format!(
            "spec.nodeName is {} but this agent is {}",
            spec.node_name, config.node_name
        ));
    }
    let world = usize::try_from(spec.world_size).unwrap_or(0);
    if world == 0 || spec.rank < 0 || spec.rank >= spec.world_size {
        return Err(format!(
            "rank {} is outside a group of {}",
            spec.rank, spec.world_size
        ));
    }
    let mut peers = spec.peers.clone();
    peers.sort_by_key(|p| p.rank);
    let ranks: Vec<i32> = peers.iter().map(|p| p.rank).collect();
    let expected: Vec<i32> = (0..spec.world_size).collect();
    if ranks != expected {
        return Err(format!(
            "spec.peers must list ranks 0..{} once each, not {ranks:?}",
            spec.world_size - 1
        ));
    }
    for p in &peers {
        if p.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "peer {} address `{}` is not ip:port",
                p.rank, p.address
            ));
        }
    }
    if spec.rank == 0 && spec.serving_port.is_none() {
        return Err("rank 0 has no spec.servingPort".into());
    }
    // Both are joined into paths under the model directories.
    if let Some(problem) = models::path_problem("spec.model", &spec.model, true).or_else(|| {
        spec.revision
            .as_deref()
            .and_then(|r| models::path_problem("spec.revision", r, false))
    }) {
        return Err(problem);
    }
    if world > 1
        && spec
            .control_address
            .parse::<std::net::SocketAddr>()
            .is_err()
    {
        return Err(format!(
            "spec.controlAddress `{}` is not ip:port",
            spec.control_address
        ));
    }
    if let Some(b) = &spec.batching
        && b.max_tokens < spec.max_context_tokens
    {
        return Err(format!(
            "spec.batching.maxTokens ({}) is less than spec.maxContextTokens ({}), so a \
             request of the longest context could never run",
            b.max_tokens, spec.max_context_tokens
        ));
    }
    Ok(peers.into_iter().map(|p| p.address).collect())
}

/// What reading a Secret gave.
enum SecretRead {
    /// The key's value.
    Value(String),
    /// Not there (yet), or the API server could not be asked: try again.
    Wait(String),
    /// There, but unusable.
    Invalid(String),
}

/// Reads one key of a Secret in the shard's namespace.
async fn read_secret(
    client: &kube::Client,
    namespace: &str,
    reference: &SecretKeyRef,
    default_key: &str,
) -> SecretRead {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let key = reference.key.as_deref().unwrap_or(default_key);
    let secret = match api.get_opt(&reference.name).await {
        Ok(Some(s)) => s,
        Ok(None) => return SecretRead::Wait(format!("waiting for Secret {}", reference.name)),
        Err(e) => {
            return SecretRead::Wait(format!(
                "reading Secret {} failed ({e}); retrying",
                reference.name
            ));
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes().to_vec())
        });
    let Some(value) = value else {
        return SecretRead::Invalid(format!("Secret {} has no key `{key}`", reference.name));
    };
    match String::from_utf8(value) {
        Ok(text) if !text.trim().is_empty() => SecretRead::Value(text.trim().to_owned()),
        Ok(_) => SecretRead::Invalid(format!("Secret {} key `{key}` is empty", reference.name)),
        Err(_) => SecretRead::Invalid(format!(
            "Secret {} key `{key}` is not UTF-8",
            reference.name
        )),
    }
}

/// Reads a Secret, waiting (as `Pending`) while it is missing.
async fn wait_secret(
    tracked: &mut Tracked,
    reference: &SecretKeyRef,
    default_key: &str,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Result<String, Attempt> {
    let client = tracked.ctx.client.clone();
    let namespace = tracked.shard.namespace().unwrap_or_default();
    loop {
        match read_secret(&client, &namespace, reference, default_key).await {
            SecretRead::Value(v) => return Ok(v),
            SecretRead::Invalid(message) => {
                return Err(Attempt::fail(FailureReason::InvalidShard, message));
            }
            SecretRead::Wait(message) => {
                if tracked.state.message.as_deref() != Some(&message) {
                    tracked.phase(ShardPhase::Pending, message).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    a = interrupted(stop, updates) => return Err(a),
                }
            }
        }
    }
}

/// Reads the shard's TLS Secret (`tls.crt`, `tls.key`, `ca.crt`), waiting
/// (as `Pending`) while it is missing; material that does not parse, or a
/// key that is not the certificate's, fails the shard as `InvalidShard`.
async fn wait_tls(
    tracked: &mut Tracked,
    reference: &SecretRef,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Result<TlsMaterial, Attempt> {
    let mut pem = Vec::with_capacity(3);
    for key in [TLS_CERT_KEY, TLS_KEY_KEY, TLS_CA_KEY] {
        let field = SecretKeyRef {
            name: reference.name.clone(),
            key: Some(key.to_owned()),
        };
        pem.push(wait_secret(tracked, &field, key, stop, updates).await?);
    }
    let [cert, key, ca]: [String; 3] = pem.try_into().map_err(|_| {
        Attempt::fail(
            FailureReason::InvalidShard,
            "reading the TLS Secret".to_owned(),
        )
    })?;
    TlsMaterial::new(cert, key, ca).map_err(|e| {
        Attempt::fail(
            FailureReason::InvalidShard,
            format!("TLS Secret {}: {e}", reference.name),
        )
    })
}

/// One attempt: from the spec to a running worker, until it ends.
async fn attempt(
    tracked: &mut Tracked,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Attempt {
    let ctx = tracked.ctx.clone();
    let shard = tracked.shard.clone();
    let spec = &shard.spec;
    let namespace = shard.namespace().unwrap_or_default();
    let name = shard.name_any();

    let addresses = match validate(&ctx.config, &shard)
        .and_then(|a| check_backend(spec.backend, ctx.backend, ctx.gpus.count()).map(|()| a))
    {
        Ok(a) => a,
        Err(message) => return Attempt::fail(FailureReason::InvalidShard, message),
    };

    // The model.
    let revision = spec.revision.clone().unwrap_or_else(|| "main".into());
    let model_dir = match models::find_local(&ctx.config.model_dirs, &spec.model, &revision) {
        Some(dir) => dir,
        None if ctx.config.offline => {
            let dirs: Vec<String> = ctx
                .config
                .model_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            let e = models::DownloadError::Offline {
                model: spec.model.clone(),
                revision,
                dirs: dirs.join(", "),
            };
            return Attempt::fail(FailureReason::ModelNotFound, e.to_string());
        }
        None => {
            tracked
                .phase(
                    ShardPhase::Downloading,
                    format!(
                        "downloading {}@{revision} from {}",
                        spec.model,
                        models::endpoint()
                    ),
                )
                .await;
            match download(tracked, &revision, stop, updates).await {
                Ok(dir) => dir,
                Err(a) => return a,
            }
        }
    };

    // The secrets.
    let token = match wait_secret(
        tracked,
        &spec.group_token_secret_ref,
        tandem_crds::GROUP_TOKEN_KEY,
        stop,
        updates,
    )
    .await
    {
        Ok(t) => t,
        Err(a) => return a,
    };
    // Rank 0 of a deployment with an API key checks clients against the
    // key's digest, which the operator keeps beside the group token; the
    // API-key Secret itself is not readable by agents.
    let api_key = match (&spec.api_key_secret_ref, spec.rank) {
        (Some(_), 0) => {
            let digest = SecretKeyRef {
                name: spec.group_token_secret_ref.name.clone(),
                key: Some(API_KEY_DIGEST_KEY.to_owned()),
            };
            match wait_secret(tracked, &digest, API_KEY_DIGEST_KEY, stop, updates).await {
                Ok(k) => Some(k),
                Err(a) => return a,
            }
        }
        _ => None,
    };
    let tls = match &spec.tls_secret_ref {
        Some(reference) => match wait_tls(tracked, reference, stop, updates).await {
            Ok(material) => Some(material),
            Err(a) => return a,
        },
        None => None,
    };

    // The hostfile and the worker.
    let dir = ctx.config.state_dir.join(format!("{namespace}--{name}"));
    let hostfile = match supervisor::write_hostfile(&dir.join("hostfile.json"), &addresses) {
        Ok(p) => p,
        Err(e) => {
            return Attempt::fail(
                FailureReason::WorkerCrashed,
                format!("writing the hostfile in {}: {e}", dir.display()),
            );
        }
    };
    let launch = Launch {
        namespace: namespace.clone(),
        shard_name: name.clone(),
        spec: spec.clone(),
        model_dir: model_dir.clone(),
        group_token: token,
        tls,
        api_key_sha256: api_key,
        max_queue: ctx.config.max_queue,
        barrier_timeout_ms: u64::try_from(ctx.config.barrier_timeout.as_millis())
            .unwrap_or(u64::MAX),
        hostfile,
        warmup_prompt_tokens: ctx.config.warmup_prompt_tokens.clone(),
        batching: ctx.config.batching_for(spec),
        api_limits: ctx.config.api_limits,
        stall_timeout_ms: ctx
            .config
            .stall_timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    };
    // Held until this attempt ends, so the worker has the GPU to itself.
    let gpu = if spec.backend == Backend::Nccl {
        match take_gpu(&ctx.gpus) {
            Ok(slot) => Some(slot),
            Err(message) => return Attempt::fail(FailureReason::InvalidShard, message),
        }
    } else {
        None
    };
    let env = supervisor::worker_env(
        &launch,
        &supervisor::kernel_cache_dir(&ctx.config.state_dir),
        gpu.as_ref().map(GpuSlot::index),
    );
    let (mut worker, events) =
        match supervisor::start(&ctx.program, &launch, env, name.clone()).await {
            Ok(w) => w,
            Err(e) => {
                return Attempt::fail(
                    FailureReason::WorkerCrashed,
                    format!("starting {} worker: {e}", ctx.program.display()),
                );
            }
        };
    ctx.metrics.worker_started();
    // What `tandem-agent firewall-rules` opens this rank's ring port to,
    // for as long as its worker runs.
    let ring_peers = (spec.backend == Backend::Ring).then(|| {
        firewall::write(
            &dir,
            &firewall::RingPeers {
                shard: format!("{namespace}/{name}"),
                epoch: spec.epoch,
                rank: spec.rank,
                addresses: addresses.clone(),
            },
        )
    });
    if let Some(Err(e)) = &ring_peers {
        tracing::warn!(shard = %name, error = %e, "cannot write the ring's firewall facts");
    }
    tracked
        .phase(
            ShardPhase::Pending,
            format!(
                "started worker pid {}{} for {}",
                worker.pid().unwrap_or(0),
                gpu.as_ref()
                    .map(|g| format!(" on GPU {}", g.index()))
                    .unwrap_or_default(),
                model_dir.display()
            ),
        )
        .await;
    let result = supervise(tracked, &mut worker, events, stop, updates).await;
    ctx.metrics.worker_stopped();
    drop(gpu);
    if let Some(Ok(path)) = ring_peers {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Relays a worker's events into the status until it ends or is stopped.
async fn supervise(
    tracked: &mut Tracked,
    worker: &mut Worker,
    mut events: mpsc::UnboundedReceiver<Event>,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Attempt {
    let mut failure: Option<(FailureReason, String)> = None;
    let mut ready_since: Option<Instant> = None;
    let exit = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => apply(tracked, event, &mut failure, &mut ready_since).await,
                // stdout closed: the process is ending.
                None => break worker.wait().await,
            },
            exit = worker.wait() => break exit,
            a = interrupted(stop, updates) => {
                tracked.state.phase = ShardPhase::Terminating;
                tracked.ctx.node_shards.set(tracked.node_entry());
                let exit = worker.stop(STOP_GRACE).await;
                tracing::info!(shard = %tracked.shard.name_any(), %exit, "worker stopped");
                return a;
            }
        }
    };
    // The last events (a Failed line) may still be in the pipe.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), events.recv()).await
    {
        apply(tracked, event, &mut failure, &mut ready_since).await;
    }
    let ready_for = ready_since.map(|t| t.elapsed());
    match failure {
        Some((reason, message)) => Attempt::Failed {
            reason,
            retry: reason.retryable(),
            message,
            ready_for,
        },
        None => Attempt::Failed {
            reason: FailureReason::WorkerCrashed,
            message: format!("the rank worker {exit}"),
            retry: true,
            ready_for,
        },
    }
}

async fn apply(
    tracked: &mut Tracked,
    event: Event,
    failure: &mut Option<(FailureReason, String)>,
    ready_since: &mut Option<Instant>,
) {
    match event {
        Event::Phase {
            phase,
            progress,
            load_seconds,
            message,
            memory_bytes,
        } => {
            if phase == ShardPhase::Ready {
                *ready_since = Some(Instant::now());
            }
            let state = ShardState {
                phase,
                progress: progress.or_else(|| tracked.state.progress.clone()),
                load_seconds: load_seconds.or(tracked.state.load_seconds),
                reason: None,
                message,
                memory_bytes: memory_bytes.unwrap_or(tracked.state.memory_bytes),
            };
            tracked.set(state).await;
        }
        Event::Failed { reason, message } => *failure = Some((reason, message)),
    }
}

/// Downloads the shard's model, writing byte progress about once a second.
/// Shards of the same model on this node share one transfer. Network
/// failures are retried inside the download (the message says so; the
/// phase stays `Downloading`); a disk too small fails the shard with
/// `InsufficientDisk` until that much space is free, then tries again.
async fn download(
    tracked: &mut Tracked,
    revision: &str,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Result<PathBuf, Attempt> {
    let ctx = tracked.ctx.clone();
    let model = tracked.shard.spec.model.clone();
    let dest = ctx.config.download_dir.clone();
    let downloading = format!("downloading {model}@{revision} from {}", models::endpoint());
    loop {
        let mut transfer = Download::start(&model, revision, &dest);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = (u64::MAX, 0, None);
        let result = loop {
            tokio::select! {
                done = transfer.finish() => break done,
                _ = tick.tick() => {
                    let (done, total) = transfer.progress();
                    let note = transfer.note();
                    if (done, total, note.as_ref()) != (last.0, last.1, last.2.as_ref()) {
                        let mut state = tracked.state.clone();
                        state.phase = ShardPhase::Downloading;
                        state.reason = None;
                        state.message = Some(note.clone().unwrap_or_else(|| downloading.clone()));
                        state.progress = Some(Progress {
                            bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
                            bytes_total: (total > 0).then(|| i64::try_from(total).unwrap_or(i64::MAX)),
                        });
                        last = (done, total, note);
                        tracked.set(state).await;
                    }
                }
                a = interrupted(stop, updates) => return Err(a),
            }
        };
        let e = match result {
            Ok(dir) => {
                let (done, total) = transfer.progress();
                let mut state = tracked.state.clone();
                state.progress = Some(Progress {
                    bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
                    bytes_total: Some(i64::try_from(total.max(done)).unwrap_or(i64::MAX)),
                });
                state.message = Some(format!("downloaded {model} to {}", dir.display()));
                tracked.set(state).await;
                return Ok(dir);
            }
            Err(e) => e,
        };
        let reason = match &e {
            models::DownloadError::Corrupt { .. } => FailureReason::CorruptModel,
            models::DownloadError::InsufficientDisk { .. } => FailureReason::InsufficientDisk,
            _ => FailureReason::ModelNotFound,
        };
        let models::DownloadError::InsufficientDisk { needed, dir, .. } = &e else {
            return Err(Attempt::Failed {
                reason,
                retry: e.is_transient(),
                message: e.to_string(),
                ready_for: None,
            });
        };
        // Waiting cures nothing until space is freed; look every few seconds.
        tracked
            .failed(
                reason,
                format!("{e}; the download starts again once that much is free"),
            )
            .await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                a = interrupted(stop, updates) => return Err(a),
            }
            if models::free_bytes(dir).is_ok_and(|free| free >= *needed) {
                break;
            }
        }
        tracked
            .phase(ShardPhase::Downloading, downloading.clone())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in API server: answers each write with the next scripted
    /// result (then `Done`), and records what was written.
    #[derive(Clone, Default)]
    struct FakeServer {
        script: Arc<Mutex<std::collections::VecDeque<Written>>>,
        seen: Arc<Mutex<Vec<(serde_json::Value, Written)>>>,
    }

    impl FakeServer {
        fn scripted(results: Vec<Written>) -> FakeServer {
            FakeServer {
                script: Arc::new(Mutex::new(results.into())),
                ..FakeServer::default()
            }
        }

        fn writer(&self) -> (StatusWriter, FakeServer) {
            let (latest, pending) = watch::channel(None);
            let server = self.clone();
            let write = move |body: serde_json::Value| {
                let server = server.clone();
                async move {
                    let result = server
                        .script
                        .lock()
                        .expect("script")
                        .pop_front()
                        .unwrap_or(Written::Done);
                    server
                        .seen
                        .lock()
                        .expect("seen")
                        .push((body, result.clone()));
                    result
                }
            };
            let shard = ShardRef {
                namespace: "ns".into(),
                name: "llama-e1-r1".into(),
                rank: 1,
            };
            let task = tokio::spawn(flush(
                pending,
                shard,
                write,
                Backoff::new(Duration::from_millis(20), Duration::from_millis(40)),
            ));
            let writer = StatusWriter {
                latest,
                generation: Some(3),
                task,
            };
            (writer, self.clone())
        }

        fn phases(&self) -> Vec<(String, Written)> {
            self.seen
                .lock()
                .expect("seen")
                .iter()
                .map(|(body, r)| {
                    (
                        body["status"]["phase"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        r.clone(),
                    )
                })
                .collect()
        }
    }

    fn state(phase: ShardPhase) -> ShardState {
        ShardState {
            phase,
            ..ShardState::default()
        }
    }

    #[tokio::test]
    async fn a_status_set_during_an_outage_is_written_when_the_server_returns() {
        let down = || Written::Retry("connection refused".into());
        let server = FakeServer::scripted(vec![down(), down(), down()]);
        let (writer, server) = server.writer();
        // The relay goes on while nothing can be written: Loaded, then Ready.
        writer.set(&state(ShardPhase::Loaded));
        tokio::time::sleep(Duration::from_millis(30)).await;
        writer.set(&state(ShardPhase::Ready));
        writer.close(Duration::from_secs(5)).await;
        let phases = server.phases();
        let last = phases.last().expect("a write");
        assert_eq!(last, &("Ready".to_owned(), Written::Done), "{phases:?}");
        assert_eq!(
            phases.len(),
            4,
            "three refused attempts, then one that landed: {phases:?}"
        );
        assert_eq!(phases[0].0, "Loaded");
        // Once Ready was set, Loaded was never tried again.
        let first_ready = phases
            .iter()
            .position(|(p, _)| p == "Ready")
            .expect("ready");
        assert!(
            phases[first_ready..].iter().all(|(p, _)| p == "Ready"),
            "{phases:?}"
        );
        let seen = server.seen.lock().expect("seen");
        assert_eq!(seen[3].0["status"]["observedGeneration"], 3);
    }

    #[tokio::test]
    async fn only_the_newest_status_is_written_and_a_gone_shard_ends_the_retries() {
        let server = FakeServer::scripted(vec![Written::Gone]);
        let (writer, server) = server.writer();
        // Three transitions before the writer's task runs: one write.
        writer.set(&state(ShardPhase::Connecting));
        writer.set(&state(ShardPhase::Loading));
        writer.set(&state(ShardPhase::Loaded));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.phases(), [("Loaded".to_owned(), Written::Gone)]);
        // A refused status is not retried; the next one is written.
        server
            .script
            .lock()
            .expect("script")
            .push_back(Written::Refused("invalid".into()));
        writer.set(&state(ShardPhase::Ready));
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.set(&state(ShardPhase::Terminating));
        writer.close(Duration::from_secs(5)).await;
        assert_eq!(
            server.phases(),
            [
                ("Loaded".to_owned(), Written::Gone),
                ("Ready".to_owned(), Written::Refused("invalid".into())),
                ("Terminating".to_owned(), Written::Done),
            ]
        );
    }

    #[test]
    fn gpus_go_lowest_first_and_come_back_when_the_slot_drops() {
        let gpus = GpuSlots::new(2);
        assert_eq!(gpus.count(), 2);
        let a = gpus.acquire().expect("gpu 0");
        let b = gpus.acquire().expect("gpu 1");
        assert_eq!((a.index(), b.index()), (0, 1));
        assert!(gpus.acquire().is_none(), "both held");
        drop(a);
        let c = gpus.clone().acquire().expect("gpu 0 again");
        assert_eq!(c.index(), 0, "clones share the slots");
        drop(b);
        drop(c);
        assert_eq!(gpus.acquire().map(|g| g.index()), Some(0));
        assert!(GpuSlots::new(0).acquire().is_none());
        assert!(GpuSlots::default().acquire().is_none());
    }

    #[test]
    fn taken_gpus_are_explained() {
        let one = GpuSlots::new(1);
        let _held = take_gpu(&one).expect("free");
        let err = take_gpu(&one).expect_err("taken");
        assert!(
            err.contains("offers 1 GPU (one Nccl rank each), but it is taken"),
            "{err}"
        );
        let four = GpuSlots::new(4);
        let _held: Vec<GpuSlot> = (0..4).map(|_| take_gpu(&four).expect("free")).collect();
        let err = take_gpu(&four).expect_err("taken");
        assert!(err.contains("offers 4 GPUs"), "{err}");
        assert!(err.contains("all 4 are taken"), "{err}");
    }

    #[test]
    fn nccl_needs_cuda_and_gpus_and_says_what_would_work() {
        for backend in [Backend::Ring, Backend::Jaccl] {
            assert!(check_backend(backend, ComputeBackend::Cpu, 0).is_ok());
        }
        assert!(check_backend(Backend::Nccl, ComputeBackend::Cuda, 1).is_ok());
        assert_eq!(
            check_backend(Backend::Nccl, ComputeBackend::Cpu, 0),
            Err(
                "spec.backend is Nccl but this node runs MLX's cpu backend; use Ring, or run \
                 the agent with MLX's CUDA build (--backend cuda)"
                    .into()
            )
        );
        let err = check_backend(Backend::Nccl, ComputeBackend::Metal, 0).expect_err("metal");
        assert!(err.contains("MLX's metal backend"), "{err}");
        let err = check_backend(Backend::Nccl, ComputeBackend::Cuda, 0).expect_err("no gpus");
        assert!(err.contains("offers no GPUs (--gpus 0)"), "{err}");
        assert!(err.contains("--gpus N"), "{err}");
    }
}
