//! Prometheus metrics. Every label has a fixed set of values (an error
//! category, a phase, an epoch cause), never an object name.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tandem_crds::DeploymentPhase;

/// Every phase, for zero-valued gauges before the first deployment.
const PHASES: [DeploymentPhase; 8] = [
    DeploymentPhase::Pending,
    DeploymentPhase::Placing,
    DeploymentPhase::Loading,
    DeploymentPhase::Forming,
    DeploymentPhase::Serving,
    DeploymentPhase::Degraded,
    DeploymentPhase::Failed,
    DeploymentPhase::Terminating,
];

fn phase_label(p: DeploymentPhase) -> &'static str {
    match p {
        DeploymentPhase::Pending => "Pending",
        DeploymentPhase::Placing => "Placing",
        DeploymentPhase::Loading => "Loading",
        DeploymentPhase::Forming => "Forming",
        DeploymentPhase::Serving => "Serving",
        DeploymentPhase::Degraded => "Degraded",
        DeploymentPhase::Failed => "Failed",
        DeploymentPhase::Terminating => "Terminating",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabel {
    category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

/// The operator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<CategoryLabel, Counter>,
    duration: Histogram,
    phases: Family<PhaseLabel, Gauge>,
    epochs: Family<CauseLabel, Counter>,
    leader: Gauge,
    phase_of: Mutex<HashMap<String, DeploymentPhase>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `tandem_operator_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tandem_operator");
        let reconciles = Counter::default();
        let errors = Family::<CategoryLabel, Counter>::default();
        // 0.5 ms to about 64 s in steps of 1.5, fine enough to read p50/p99 from.
        let duration = Histogram::new(exponential_buckets(0.0005, 1.5, 30));
        let phases = Family::<PhaseLabel, Gauge>::default();
        let epochs = Family::<CauseLabel, Counter>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile takes",
            duration.clone(),
        );
        registry.register(
            "deployments",
            "LlamaDeployments by phase, as last reconciled",
            phases.clone(),
        );
        registry.register("epochs", "New epochs started, by cause", epochs.clone());
        registry.register(
            "leader",
            "1 while this process holds the leader Lease",
            leader.clone(),
        );
        for category in crate::error::CATEGORIES {
            errors.get_or_create(&CategoryLabel { category }).inc_by(0);
        }
        for p in PHASES {
            phases
                .get_or_create(&PhaseLabel {
                    phase: phase_label(p),
                })
                .set(0);
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            phases,
            epochs,
            leader,
            phase_of: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a reconcile.
    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    /// Records how long a reconcile took.
    pub fn reconcile_finished(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, category: &'static str) {
        self.errors.get_or_create(&CategoryLabel { category }).inc();
    }

    /// Counts a new epoch.
    pub fn epoch_started(&self, cause: &'static str) {
        self.epochs.get_or_create(&CauseLabel { cause }).inc();
    }

    /// Sets whether this process leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records a deployment's phase (`None` once it is gone).
    pub fn set_phase(&self, uid: &str, phase: Option<DeploymentPhase>) {
        let mut map = self.phase_of.lock().unwrap_or_else(|e| e.into_inner());
        let old = match phase {
            Some(p) => map.insert(uid.to_owned(), p),
            None => map.remove(uid),
        };
        if old == phase {
            return;
        }
        if let Some(old) = old {
            self.phases
                .get_or_create(&PhaseLabel {
                    phase: phase_label(old),
                })
                .dec();
        }
        if let Some(new) = phase {
            self.phases
                .get_or_create(&PhaseLabel {
                    phase: phase_label(new),
                })
                .inc();
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bounded_series() {
        let m = Metrics::new();
        m.reconcile_started();
        m.reconcile_finished(Duration::from_millis(3));
        m.reconcile_failed("conflict");
        m.epoch_started("scale");
        m.set_leader(true);
        m.set_phase("u1", Some(DeploymentPhase::Loading));
        m.set_phase("u2", Some(DeploymentPhase::Loading));
        m.set_phase("u1", Some(DeploymentPhase::Serving));
        m.set_phase("u2", None);
        let text = m.render();
        for line in [
            "tandem_operator_reconciles_total 1",
            "tandem_operator_reconcile_errors_total{category=\"conflict\"} 1",
            "tandem_operator_reconcile_errors_total{category=\"forbidden\"} 0",
            "tandem_operator_epochs_total{cause=\"scale\"} 1",
            "tandem_operator_leader 1",
            "tandem_operator_deployments{phase=\"Serving\"} 1",
            "tandem_operator_deployments{phase=\"Loading\"} 0",
            "tandem_operator_deployments{phase=\"Failed\"} 0",
            "tandem_operator_reconcile_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
