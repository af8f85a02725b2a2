//! Command line and environment: every flag has an environment variable, so
//! the chart can configure the operator either way. `--help` lists them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tandem_crds::DEFAULT_LEASE_NAMESPACE;
use tandem_planner::PortRange;

use crate::decide::Settings;
use crate::leader::ElectionConfig;
use crate::restart::RestartPolicy;
use crate::time::parse_duration;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The ports a node without the `tandem.dev/port-range` annotation offers.
const DEFAULT_PORTS: PortRange = PortRange {
    first: tandem_crds::DEFAULT_PORT_FIRST,
    last: tandem_crds::DEFAULT_PORT_LAST,
};

/// Places LlamaDeployments onto LlamaNodes as LlamaShards, keeps their
/// epochs, and reports their progress.
#[derive(Debug, Clone, Parser)]
#[command(name = "tandem-operator", version, about, long_about = None)]
pub struct Cli {
    /// Kubeconfig to use; without it, the in-cluster config or ~/.kube/config.
    #[arg(long, env = "TANDEM_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch LlamaDeployments and LlamaShards in this namespace only; all
    /// namespaces when unset.
    #[arg(long, env = "TANDEM_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the node Leases agents renew.
    #[arg(long, env = "TANDEM_LEASE_NAMESPACE", default_value = DEFAULT_LEASE_NAMESPACE)]
    pub lease_namespace: String,
    /// Elect a leader among replicas with a Lease (turn off only for a single replica).
    #[arg(long, env = "TANDEM_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "TANDEM_LEADER_ELECTION_NAMESPACE", default_value = DEFAULT_LEASE_NAMESPACE)]
    pub leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "TANDEM_LEADER_ELECTION_NAME",
        default_value = "tandem-operator"
    )]
    pub leader_election_name: String,
    /// How long the leader Lease lasts without renewal.
    #[arg(long, env = "TANDEM_LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_lease_duration: Duration,
    /// How often the leader renews and followers retry.
    #[arg(long, env = "TANDEM_LEADER_RETRY_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub leader_retry_interval: Duration,
    /// How long a leader keeps leading without a successful renewal; with
    /// --drain-timeout it must stay below --leader-lease-duration.
    #[arg(long, env = "TANDEM_LEADER_RENEW_DEADLINE", default_value = "7s", value_parser = parse_duration)]
    pub leader_renew_deadline: Duration,
    /// How long a stopping controller (shutdown, or lost leadership) may
    /// finish its in-flight reconciles before they are abandoned.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// This replica's identity (Lease holder, Event reporting instance);
    /// defaults to the host name and process id.
    #[arg(long, env = "TANDEM_OPERATOR_IDENTITY")]
    pub identity: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "TANDEM_HTTP_ADDR", default_value = "0.0.0.0:9090")]
    pub http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax.
    #[arg(long, env = "TANDEM_LOG", default_value = "info")]
    pub log: String,
    /// Ports for ranks on nodes that do not announce their own range with the
    /// `tandem.dev/port-range` annotation.
    #[arg(long, env = "TANDEM_PORT_RANGE", default_value_t = DEFAULT_PORTS)]
    pub port_range: PortRange,
    /// Failure-driven restarts a deployment gets before it is Failed.
    #[arg(long, env = "TANDEM_RESTART_BUDGET", default_value_t = 5)]
    pub restart_budget: u32,
    /// Wait before the second restart of a group; doubles for each later one.
    #[arg(long, env = "TANDEM_RESTART_BACKOFF", default_value = "10s", value_parser = parse_duration)]
    pub restart_backoff: Duration,
    /// Longest wait between restarts.
    #[arg(long, env = "TANDEM_RESTART_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub restart_backoff_max: Duration,
    /// Serving this long without a failure resets the restart count.
    #[arg(long, env = "TANDEM_RESTART_RESET_AFTER", default_value = "10m", value_parser = parse_duration)]
    pub restart_reset_after: Duration,
    /// A group that is not serving yet and makes no progress (no rank
    /// changes phase, no download advances) for this long is restarted
    /// (reason LoadTimeout or FormationTimeout), within the restart budget.
    #[arg(long, env = "TANDEM_LOAD_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub load_timeout: Duration,
    /// How long deletion waits for agents to release their shards.
    #[arg(long, env = "TANDEM_RELEASE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub release_timeout: Duration,
    /// Re-check every deployment this often even when nothing changes.
    #[arg(long, env = "TANDEM_RESYNC_PERIOD", default_value = "5m", value_parser = parse_duration)]
    pub resync_period: Duration,
    /// How often node Leases are checked for expiry.
    #[arg(long, env = "TANDEM_LIVENESS_TICK", default_value = "1s", value_parser = parse_duration)]
    pub liveness_tick: Duration,
    /// Deployments reconciled at once.
    #[arg(long, env = "TANDEM_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Namespace of the Secret that keeps the operator's CA, which issues
    /// every deployment's serving certificate.
    #[arg(long, env = "TANDEM_CA_SECRET_NAMESPACE", default_value = DEFAULT_LEASE_NAMESPACE)]
    pub ca_secret_namespace: String,
    /// Name of that Secret; created (with a new CA) when missing.
    #[arg(long, env = "TANDEM_CA_SECRET_NAME", default_value = "tandem-ca")]
    pub ca_secret_name: String,
}

impl Cli {
    /// This replica's identity.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "tandem-operator".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The decision policy.
    pub fn settings(&self) -> Settings {
        Settings {
            restart: RestartPolicy {
                budget: self.restart_budget,
                backoff_base: self.restart_backoff,
                backoff_max: self.restart_backoff_max,
                reset_after: self.restart_reset_after,
            },
            release_timeout: self.release_timeout,
            resync: self.resync_period,
            load_timeout: self.load_timeout,
        }
    }

    /// The leader-election settings.
    pub fn election(&self) -> ElectionConfig {
        ElectionConfig {
            namespace: self.leader_election_namespace.clone(),
            name: self.leader_election_name.clone(),
            identity: self.identity(),
            lease_duration: self.leader_lease_duration,
            retry_interval: self.leader_retry_interval,
            renew_deadline: self.leader_renew_deadline,
            drain_timeout: self.drain_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse_with_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "tandem-operator",
            "--port-range",
            "41000-41010",
            "--restart-backoff",
            "500ms",
            "--leader-elect",
            "false",
            "--log-format",
            "json",
        ])
        .expect("parse");
        assert_eq!(cli.port_range.first, 41000);
        assert_eq!(cli.restart_backoff, Duration::from_millis(500));
        assert!(!cli.leader_elect);
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.lease_namespace, "tandem-system");
        assert_eq!(cli.settings().restart.budget, 5);
        assert_eq!(cli.election().lease_duration, Duration::from_secs(15));
        assert_eq!(
            cli.election().validate(),
            Ok(()),
            "the defaults are consistent"
        );
        assert!(Cli::try_parse_from(["tandem-operator", "--port-range", "9-1"]).is_err());
    }
}
