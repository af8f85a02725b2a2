//! Running a shard: the loop over attempts with its restart backoff, one
//! attempt from the spec to a running worker, and the relay of the
//! worker's events into the shard's status.

use super::*;

/// How one attempt to run the shard ended.
pub(super) enum Attempt {
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
    pub(super) fn fail(reason: FailureReason, message: impl Into<String>) -> Attempt {
        Attempt::Failed {
            reason,
            message: message.into(),
            retry: reason.retryable(),
            ready_for: None,
        }
    }
}

/// Waits for a stop request or a spec change.
pub(super) async fn interrupted(
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

pub(super) async fn run_shard(
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
            super::super::until_true(&mut w).await;
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

/// One attempt: from the spec to a running worker, until it ends.
pub(super) async fn attempt(
    tracked: &mut Tracked,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Attempt {
    let ctx = tracked.ctx.clone();
    let shard = tracked.shard.clone();
    let spec = &shard.spec;
    let namespace = shard.namespace().unwrap_or_default();
    let name = shard.name_any();

    let addresses = match validate(&ctx.config.node_name, &shard)
        .and_then(|a| check_backend(spec.backend, ctx.backend, ctx.gpus.count()).map(|()| a))
    {
        Ok(a) => a,
        Err(message) => return Attempt::fail(FailureReason::InvalidShard, message),
    };

    // The model.
    let revision = spec
        .revision
        .clone()
        .unwrap_or_else(|| tandem_crds::DEFAULT_REVISION.into());
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
pub(super) async fn supervise(
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

pub(super) async fn apply(
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
