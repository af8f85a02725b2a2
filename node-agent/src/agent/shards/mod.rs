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

mod attempt;
mod download;
mod gpu;
mod secrets;
mod status;
mod validate;

use attempt::*;
use download::*;
pub use gpu::GpuSlots;
use gpu::*;
use secrets::*;
use status::*;
use validate::*;

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
