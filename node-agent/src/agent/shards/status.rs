//! The status a runner keeps for its shard and writes whole, in the
//! background and retried, so a runner never waits for the API server.

use super::*;

/// The status the runner keeps and writes whole.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ShardState {
    pub(super) phase: ShardPhase,
    pub(super) progress: Option<Progress>,
    pub(super) load_seconds: Option<f64>,
    pub(super) reason: Option<String>,
    pub(super) message: Option<String>,
    pub(super) memory_bytes: u64,
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
pub(super) const WRITE_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between status write attempts: how long after the API
/// server returns the newest status is written at the latest.
pub(super) const WRITE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one status write may take before it counts as failed.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a runner that ends waits for its last status to be written
/// (the writer keeps trying after that, in the background).
pub(super) const FINAL_WRITE_WAIT: Duration = Duration::from_secs(5);

/// How one status write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Written {
    /// The API server took it.
    Done,
    /// The shard is gone: nothing to write to.
    Gone,
    /// The API server refused it for good (invalid); the next status may do.
    Refused(String),
    /// It may work later: no API server, a timeout, a server error.
    Retry(String),
}

pub(super) fn written(result: Result<LlamaShard, kube::Error>) -> Written {
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
pub(super) struct ShardRef {
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
pub(super) struct StatusWriter {
    latest: watch::Sender<Option<serde_json::Value>>,
    generation: Option<i64>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusWriter {
    pub(super) fn new(client: &kube::Client, shard: &LlamaShard) -> StatusWriter {
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
    pub(super) fn retarget(&mut self, shard: &LlamaShard) {
        self.generation = shard.meta().generation;
    }

    /// Makes `state` the status to write; returns at once.
    pub(super) fn set(&self, state: &ShardState) {
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
    pub(super) async fn close(self, within: Duration) {
        let StatusWriter { latest, task, .. } = self;
        drop(latest);
        let _ = tokio::time::timeout(within, task).await;
    }
}

/// The writer's task: writes the newest pending status until it lands (or
/// the shard is gone), then waits for the next; ends once the writer is
/// dropped and its last status is written.
pub(super) async fn flush<W, F>(
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
pub(super) struct Tracked {
    pub(super) ctx: Arc<Context>,
    pub(super) shard: Arc<LlamaShard>,
    pub(super) writer: StatusWriter,
    pub(super) state: ShardState,
}

impl Tracked {
    pub(super) fn new(ctx: Arc<Context>, shard: Arc<LlamaShard>) -> Tracked {
        let writer = StatusWriter::new(&ctx.client, &shard);
        Tracked {
            ctx,
            shard,
            writer,
            state: ShardState::default(),
        }
    }

    pub(super) fn retarget(&mut self, shard: Arc<LlamaShard>) {
        self.writer.retarget(&shard);
        self.shard = shard;
    }

    pub(super) fn node_entry(&self) -> NodeShard {
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
    pub(super) async fn set(&mut self, state: ShardState) {
        self.state = state;
        self.ctx.node_shards.set(self.node_entry());
        self.writer.set(&self.state);
    }

    pub(super) async fn phase(&mut self, phase: ShardPhase, message: impl Into<String>) {
        let state = ShardState {
            phase,
            message: Some(message.into()),
            memory_bytes: self.state.memory_bytes,
            load_seconds: self.state.load_seconds,
            ..ShardState::default()
        };
        self.set(state).await;
    }

    pub(super) async fn failed(&mut self, reason: FailureReason, message: String) {
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

    pub(super) fn state(phase: ShardPhase) -> ShardState {
        ShardState {
            phase,
            ..ShardState::default()
        }
    }

    #[tokio::test]
    pub(super) async fn a_status_set_during_an_outage_is_written_when_the_server_returns() {
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
    pub(super) async fn only_the_newest_status_is_written_and_a_gone_shard_ends_the_retries() {
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
}
