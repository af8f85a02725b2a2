//! The agent's own metrics (workers, restarts, failures, Lease renewals)
//! and its `/healthz`, `/readyz` and `/metrics` endpoints. Labels are
//! failure reasons, a fixed set.

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::worker::protocol::FailureReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Agent metrics and their registry.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    workers: Gauge<i64, AtomicI64>,
    starts: Counter,
    restarts: Family<ReasonLabel, Counter>,
    failures: Family<ReasonLabel, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric under `tandem_agent_`.
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("tandem_agent");
        let workers = Gauge::<i64, AtomicI64>::default();
        let starts = Counter::default();
        let restarts = Family::<ReasonLabel, Counter>::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        registry.register("workers", "Rank worker processes running", workers.clone());
        registry.register(
            "worker_starts",
            "Rank worker processes started",
            starts.clone(),
        );
        registry.register(
            "worker_restarts",
            "Rank workers restarted after a failure, by reason",
            restarts.clone(),
        );
        registry.register(
            "shard_failures",
            "Shard failures, by reason",
            failures.clone(),
        );
        AgentMetrics {
            registry,
            workers,
            starts,
            restarts,
            failures,
        }
    }

    /// A worker started.
    pub fn worker_started(&self) {
        self.starts.inc();
        self.workers.inc();
    }

    /// A worker ended.
    pub fn worker_stopped(&self) {
        self.workers.dec();
    }

    /// A worker is restarted after failing for `reason`.
    pub fn worker_restarted(&self, reason: FailureReason) {
        self.restarts
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A shard failed for `reason`.
    pub fn shard_failed(&self, reason: FailureReason) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What the health endpoints report on.
#[derive(Debug, Clone)]
pub struct Health {
    /// When the Lease was last renewed.
    pub last_renewed: Arc<Mutex<Option<Instant>>>,
    /// A renewal older than this makes /healthz fail.
    pub stale_after: Duration,
    /// Metrics to render.
    pub metrics: Arc<AgentMetrics>,
}

async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    let last = *health
        .last_renewed
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match last {
        Some(t) if t.elapsed() <= health.stale_after => (StatusCode::OK, "ok\n".to_owned()),
        Some(t) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the node Lease was last renewed {:.0}s ago\n",
                t.elapsed().as_secs_f64()
            ),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node Lease was never renewed\n".to_owned(),
        ),
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.render(),
    )
}

/// Binds the health address; returns the listener (and so the port).
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
