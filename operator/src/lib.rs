//! Tandem's operator: it turns `LlamaDeployment`s into `LlamaShard`s placed
//! on `LlamaNode`s, keeps the group's epoch, and reports progress in the
//! deployment's status, conditions and Events.
//!
//! The reconcile pipeline is `observe (I/O) → decide (pure) → apply (I/O) →
//! status (one write)`. Everything between the two ends is a plain function of
//! values and a `now` argument, so it is tested with fixtures:
//! - [`convert`]: a deployment's spec and shards to the planner's inputs.
//! - [`observe`]: nodes, their Leases and other deployments' shards as the
//!   planner sees them.
//! - [`objects`]: the LlamaShards and the group-token Secret the operator writes.
//! - [`conditions`]: `metav1.Condition` bookkeeping (`lastTransitionTime`).
//! - [`restart`]: restart backoff and budget.
//! - [`decide`]: the reconcile decision and the status it leads to.
//!
//! The I/O side:
//! - [`controller`]: the kube-runtime `Controller`, its watches and `reconcile`.
//! - [`ledger`]: what this process wrote recently, so that a lagging watch
//!   cache never makes it place a group twice.
//! - [`liveness`]: node Lease expiry as a stream of reconcile triggers.
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease.
//! - [`metrics`], [`http`]: Prometheus metrics, `/healthz` and `/readyz`.
//! - [`cli`], [`telemetry`]: flags and environment, tracing setup.
//! - [`tls`]: the operator's CA and the serving certificates it issues.
//! - [`error`]: the error type of each layer, with a bounded `category()`.

pub mod cli;
pub mod conditions;
pub mod controller;
pub mod convert;
pub mod decide;
pub mod error;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod http;
pub mod leader;
pub mod ledger;
pub mod liveness;
pub mod metrics;
pub mod objects;
pub mod observe;
pub mod restart;
pub mod telemetry;
pub mod time;
pub mod tls;

use std::sync::Arc;

use anyhow::Context as _;
use kube::Client;
use tokio::sync::watch;

use crate::cli::Cli;
use crate::controller::RunConfig;
use crate::http::Health;
use crate::leader::{Elector, Fence, TermEnd};
use crate::metrics::Metrics;

/// A client from `--kubeconfig`, else the in-cluster config or the default kubeconfig.
pub async fn client(cli: &Cli) -> anyhow::Result<Client> {
    tandem_crds::api_client(cli.kubeconfig.as_deref())
        .await
        .map_err(anyhow::Error::msg)
}

/// Waits for a stopping controller task, at most `drain` (`--drain-timeout`);
/// then abandons it: a reconcile is idempotent, so the next leader redoes
/// whatever one left half done.
async fn finish(mut term: tokio::task::JoinHandle<()>, drain: std::time::Duration) {
    match tokio::time::timeout(drain, &mut term).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the controller task failed"),
        Err(_) => {
            tracing::warn!(
                timeout = ?drain,
                "in-flight reconciles did not finish; abandoning them"
            );
            term.abort();
        }
    }
}

/// The operator's CA (`--ca-secret-namespace`/`--ca-secret-name`), created
/// on first start. A failure (the API server away, no rights yet) is
/// retried every few seconds; `None` when `stop` turns true first.
async fn load_ca(
    client: &Client,
    cli: &Cli,
    mut stop: watch::Receiver<bool>,
) -> Option<tls::CertificateAuthority> {
    let (namespace, name) = (&cli.ca_secret_namespace, &cli.ca_secret_name);
    loop {
        let today = k8s_openapi::jiff::Timestamp::now()
            .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
            .date();
        match tls::CertificateAuthority::load_or_create(client, namespace, name, today).await {
            Ok(ca) => return Some(ca),
            Err(e) => tracing::warn!(error = %e, "loading the CA failed; retrying in 5s"),
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// The whole operator: HTTP endpoints, then (with leader election) a loop of
/// campaigning and leading terms, until SIGTERM or SIGINT. On shutdown the
/// controller finishes its in-flight reconciles and the leader Lease is released.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let election = cli.election();
    if cli.leader_elect {
        election.validate()?;
    }
    let client = client(&cli).await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (stop_tx, stop) = watch::channel(false);

    let listener = http::bind(cli.http_addr)
        .await
        .with_context(|| format!("binding {}", cli.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    let http_task = tokio::spawn(http::serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&health),
        stop.clone(),
    ));
    let signal_task = tokio::spawn(async move {
        tandem_crds::termination().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let ca = match load_ca(&client, &cli, stop.clone()).await {
        Some(ca) => Arc::new(ca),
        None => {
            signal_task.abort();
            http_task.abort();
            return Ok(());
        }
    };
    let run_config = RunConfig {
        ca,
        namespace: cli.namespace.clone(),
        lease_namespace: cli.lease_namespace.clone(),
        port_range: cli.port_range,
        settings: cli.settings(),
        liveness_tick: cli.liveness_tick,
        concurrency: cli.concurrency,
        identity: cli.identity(),
    };
    tracing::info!(identity = %run_config.identity, leader_elect = cli.leader_elect, "starting");

    if cli.leader_elect {
        let elector = Elector::new(client.clone(), election);
        let mut stop_rx = stop.clone();
        health.set_ready(true);
        loop {
            if !elector.acquire(&mut stop_rx).await {
                break;
            }
            tracing::info!(lease = %elector.config().name, "leading");
            metrics.set_leader(true);
            let (term_tx, term_rx) = watch::channel(false);
            let term = tokio::spawn(controller::run(
                client.clone(),
                run_config.clone(),
                Arc::clone(&metrics),
                elector.fence(),
                term_rx,
            ));
            let end = elector.hold(&mut stop_rx).await;
            let _ = term_tx.send(true);
            finish(term, cli.drain_timeout).await;
            // Whatever is left of the controller (an abandoned task still
            // unwinding, an Event in flight) writes nothing more.
            elector.stop_writing();
            metrics.set_leader(false);
            if end == TermEnd::Shutdown {
                match elector.release().await {
                    Ok(()) => tracing::info!("released the leader Lease"),
                    Err(e) => tracing::warn!(error = %e, "releasing the leader Lease failed"),
                }
                break;
            }
            tracing::warn!("lost leadership; standing by");
        }
    } else {
        metrics.set_leader(true);
        health.set_ready(true);
        let term = tokio::spawn(controller::run(
            client,
            run_config,
            Arc::clone(&metrics),
            Fence::open(),
            stop.clone(),
        ));
        // Wait for the stop signal first: `finish` bounds only the drain.
        let mut stop_rx = stop.clone();
        let _ = stop_rx.wait_for(|s| *s).await;
        finish(term, cli.drain_timeout).await;
    }
    signal_task.abort();
    http_task.abort();
    tracing::info!("stopped");
    Ok(())
}
