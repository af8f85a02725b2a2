//! A real `tandem-agent run` against the real API server, with the chart's
//! agent identity: it registers its LlamaNode with hardware, labels and
//! the port range, keeps a Lease, and on SIGTERM marks the node not Ready.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tandem_tests::{
    SYSTEM_NAMESPACE, admin, agent,
    agent::{Agent, AgentOptions, WAIT, agent_binary, model_dir, node, node_ready},
    cluster, eventually,
    process::scratch,
    unique_name,
};

#[tokio::test]
async fn the_agent_registers_its_node_and_keeps_a_lease() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let name = unique_name("agent-reg");
    let config = scratch(&format!("config-{name}")).join("agent.yaml");
    // The YAML file and flags combine: the file sets a label and the port
    // range, a flag adds another label.
    std::fs::write(
        &config,
        "labels:\n  rack: r7\nportRange: 41000-41099\nleaseDurationSeconds: 15\n",
    )?;
    let mut agent = Agent::start(
        cluster,
        &name,
        AgentOptions {
            labels: vec!["team=ml".into()],
            model_dirs: vec![model_dir()],
            args: vec!["--config".into(), config.display().to_string()],
            ..AgentOptions::default()
        },
    );

    let node = eventually("the LlamaNode to be Ready", WAIT, || async {
        Ok(node(&admin, &name)
            .await?
            .filter(|n| node_ready(n).as_deref() == Some("True")))
    })
    .await?;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("tandem.dev/backend").map(String::as_str),
        Some("cpu")
    );
    assert_eq!(
        labels.get("tandem.dev/os").map(String::as_str),
        Some("linux")
    );
    assert_eq!(labels.get("rack").map(String::as_str), Some("r7"));
    assert_eq!(labels.get("team").map(String::as_str), Some("ml"));
    let chip = labels.get("tandem.dev/chip").cloned().unwrap_or_default();
    assert!(
        !chip.is_empty()
            && chip
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "{chip}"
    );
    let gib: u64 = labels
        .get("tandem.dev/memory-gib")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(gib >= 1, "memory label {gib}");
    assert_eq!(
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("tandem.dev/port-range"))
            .map(String::as_str),
        Some("41000-41099")
    );
    assert_eq!(node.spec.address, "127.0.0.1");
    let status = node.status.clone().unwrap_or_default();
    let capacity = status.capacity.clone().unwrap_or_default();
    assert!(capacity.memory_bytes > 1 << 30, "{capacity:?}");
    assert!(capacity.cpu_cores >= 1);
    assert_eq!(status.backend.as_deref(), Some("cpu"));
    assert_eq!(status.os.as_deref(), Some("linux"));
    assert_eq!(status.chip.as_deref(), Some(chip.as_str()));
    assert_eq!(status.mlx_version.as_deref(), Some("0.32.2"));
    assert!(status.agent_version.is_some());

    // The Lease: named after the node, held by it, renewed every ~5 s.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
    let first = eventually("the node Lease", WAIT, || async {
        Ok(leases.get_opt(&name).await?)
    })
    .await?;
    let spec = first.spec.clone().unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some(name.as_str()));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    let renewed = spec.renew_time.clone().expect("renewTime");
    eventually(
        "the Lease to be renewed",
        Duration::from_secs(20),
        || async {
            let l = leases.get(&name).await?;
            Ok(l.spec
                .and_then(|s| s.renew_time)
                .filter(|t| t.0 > renewed.0))
        },
    )
    .await?;
    let (code, _) = {
        let r = agent.get("/healthz")?;
        (r.status, r.body)
    };
    assert_eq!(code, 200);
    let metrics = agent.get("/metrics")?.body;
    assert!(metrics.contains("tandem_agent_workers"), "{metrics}");

    // A clean shutdown marks the node not ready.
    let exit = agent.terminate(Duration::from_secs(30))?;
    assert!(exit.success(), "agent exit: {exit}\n{}", agent.log_text());
    let stopped = agent::node(&admin, &name).await?.expect("node");
    let ready = stopped
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .cloned()
        .expect("Ready condition");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "AgentStopped");
    Ok(())
}

#[test]
fn every_setting_is_in_the_help() {
    let out = std::process::Command::new(agent_binary())
        .args(["run", "--help"])
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--kubeconfig",
        "--node-name",
        "--advertise-address",
        "--label",
        "--model-dir",
        "--download-dir",
        "--offline",
        "--port-range",
        "--backend",
        "--lease-namespace",
        "--lease-duration-seconds",
        "--metrics-address",
        "TANDEM_NODE_NAME",
        "HF_ENDPOINT",
    ] {
        assert!(help.contains(flag), "`run --help` lacks {flag}:\n{help}");
    }
}

#[test]
fn a_backend_the_machine_lacks_is_refused_at_start_up() {
    let out = std::process::Command::new(agent_binary())
        .args([
            "run",
            "--node-name",
            "x",
            "--backend",
            "metal",
            "--kubeconfig",
            "/nonexistent",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metal") && err.contains("cpu"), "{err}");
}
