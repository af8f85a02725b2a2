//! The node daemon (`tandem-agent run`).
//!
//! - [`config`]: flags, environment and the YAML file.
//! - [`hardware`]: what the machine has, and its placement labels.
//! - [`node`]: the LlamaNode (registration, status, Ready) and its Lease.
//! - [`shards`]: the shard watcher and one runner per shard.
//! - [`supervisor`]: rank-worker child processes and their restarts.
//! - [`models`]: finding models locally, downloading them from the hub.
//! - [`metrics`]: the agent's metrics and health endpoints.
//! - [`join`]: `tandem-agent join`, a node's own identity (run by an admin).
//! - [`local`]: `tandem-agent serve`, the same workers as a local group
//!   without Kubernetes.
//!
//! On SIGTERM or SIGINT the agent stops every worker, releases every shard
//! (their status says `Terminating`), empties the node's shard list and
//! marks the node not Ready before it exits.

pub mod config;
pub mod firewall;
pub mod hardware;
pub mod join;
pub mod local;
pub mod metrics;
pub mod models;
pub mod node;
pub mod shards;
pub mod state_dir;
pub mod supervisor;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tokio::sync::watch;

use self::config::{AgentConfig, ConfigError, Environment, RunArgs};
use self::hardware::{Hardware, HardwareError};
use self::metrics::{AgentMetrics, Health};
use self::node::{NodeShards, Registration};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The machine cannot run as configured.
    #[error(transparent)]
    Hardware(#[from] HardwareError),
    /// No usable Kubernetes client configuration.
    #[error("Kubernetes client configuration: {0}")]
    Kubeconfig(String),
    /// The state directory is unsafe or cannot be created.
    #[error(transparent)]
    StateDir(#[from] state_dir::StateDirError),
    /// A local resource (health port, this executable) is unusable.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

async fn client(config: &AgentConfig) -> Result<kube::Client, AgentError> {
    tandem_crds::api_client(config.kubeconfig.as_deref())
        .await
        .map_err(AgentError::Kubeconfig)
}

/// Resolves the configuration from flags, environment and file.
pub fn configure(args: &RunArgs) -> Result<AgentConfig, AgentError> {
    let file = config::load_file(args.config.as_deref())?;
    Ok(config::resolve(args, file, &Environment::detect())?)
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let config = Arc::new(configure(&args)?);
    let hardware = Hardware::detect(config.backend, config.gpus)?;
    tracing::info!(
        node = %config.node_name,
        address = %config.advertise_address,
        chip = %hardware.chip,
        backend = hardware.backend.as_str(),
        memory_gib = hardware.memory_bytes >> 30,
        mlx = hardware.mlx_version.as_deref().unwrap_or("unknown"),
        "starting the agent"
    );
    state_dir::prepare(&config.state_dir)?;
    let program = std::env::current_exe().map_err(|source| AgentError::Io {
        what: "finding this executable".into(),
        source,
    })?;
    let client = client(&config).await?;
    let metrics = Arc::new(AgentMetrics::new());
    let (shutdown_tx, shutdown) = watch::channel(false);

    let health_listener = metrics::bind(config.metrics_address)
        .await
        .map_err(|source| AgentError::Io {
            what: format!("listening on {}", config.metrics_address),
            source,
        })?;
    let last_renewed = Arc::new(Mutex::new(None));
    let health = Health {
        last_renewed: last_renewed.clone(),
        stale_after: config.lease_duration,
        metrics: metrics.clone(),
    };
    let mut stop_health = shutdown.clone();
    let health_task = tokio::spawn(metrics::serve(health_listener, health, async move {
        until_true(&mut stop_health).await;
    }));

    // Register, retrying: the API server may not be up yet.
    let registration = Registration::new(client.clone(), config.clone(), hardware);
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut terminated = std::pin::pin!(tandem_crds::termination());
    loop {
        match registration.register().await {
            Ok(()) => break,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "registering the LlamaNode failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut terminated => return Ok(()),
                }
            }
        }
    }
    tracing::info!(node = %config.node_name, "registered");

    let lease_task = tokio::spawn(node::renew_lease(
        Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
        config.node_name.clone(),
        config.node_name.clone(),
        config.lease_duration,
        config.lease_renew_interval(),
        last_renewed,
        shutdown.clone(),
    ));

    let node_shards = NodeShards::default();
    let status_task = tokio::spawn(keep_status(
        registration.clone(),
        node_shards.clone(),
        shutdown.clone(),
    ));
    let ctx = Arc::new(shards::Context {
        client,
        config: config.clone(),
        program,
        node_shards: node_shards.clone(),
        metrics,
        backend: registration.hardware().backend,
        gpus: shards::GpuSlots::new(registration.hardware().gpus),
    });
    let shard_task = tokio::spawn(shards::run(ctx, shutdown.clone()));

    terminated.await;
    if let Err(e) = registration
        .write_status(
            false,
            "AgentStopping",
            "the agent is stopping its workers",
            &node_shards.list(),
        )
        .await
    {
        tracing::warn!(error = %e, "marking the node not ready failed");
    }
    let _ = shutdown_tx.send(true);
    // Workers stop and shards are released first, then the node goes not-Ready.
    let _ = shard_task.await;
    let _ = status_task.await;
    if let Err(e) = registration
        .write_status(
            false,
            "AgentStopped",
            "the agent shut down",
            &node_shards.list(),
        )
        .await
    {
        tracing::warn!(error = %e, "marking the node not ready failed");
    }
    let _ = lease_task.await;
    let _ = health_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves once the watched flag is true (the guard `wait_for` hands out
/// must not live across an await of a spawned task).
pub(crate) async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Writes the node status when the shard list changes (batched over a
/// moment) and every 30 s, until shutdown.
async fn keep_status(
    registration: Registration,
    node_shards: NodeShards,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = node_shards.subscribe();
    loop {
        let shards = node_shards.list();
        let message = format!("the agent is running {} shards", shards.len());
        if let Err(e) = registration
            .write_status(true, "AgentReady", &message, &shards)
            .await
        {
            tracing::warn!(error = %e, "writing the node status failed");
        }
        tokio::select! {
            _ = until_true(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                changes.borrow_and_update();
            }
        }
    }
}
