//! The Helm chart: lint, a `helm template` snapshot, the values schema, and
//! the release the harness installs into the real API server, including the
//! long-lived token that agents on Macs use from outside the cluster.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use tandem_crds::{LlamaNode, LlamaNodeSpec};
use tandem_tests::{Identity, SYSTEM_NAMESPACE, cluster, eventually, repo_root, unique_name};

const SNAPSHOT: &str = "tests/snapshots/chart-default.yaml";

fn helm() -> std::path::PathBuf {
    cluster().helm().to_path_buf()
}

#[test]
fn helm_lint_is_clean() {
    let out = Command::new(helm())
        .arg("lint")
        .arg(repo_root().join("charts/tandem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helm lint failed:\n{text}");
    assert!(
        !text.contains("[WARNING]") && !text.contains("[ERROR]"),
        "helm lint complains:\n{text}"
    );
}

#[test]
fn helm_template_matches_the_snapshot() {
    // Regenerate with TANDEM_UPDATE_SNAPSHOTS=1 after a deliberate change.
    let rendered = cluster().helm_template(&[]).unwrap();
    let path = repo_root().join(SNAPSHOT);
    if std::env::var_os("TANDEM_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        rendered == want,
        "`helm template` output differs from {SNAPSHOT}; review the change and rerun with \
         TANDEM_UPDATE_SNAPSHOTS=1 to accept it"
    );
    for kind in [
        "kind: Deployment",
        "kind: ClusterRole",
        "kind: Role",
        "kind: ServiceAccount",
        "kind: Service",
        "type: kubernetes.io/service-account-token",
    ] {
        assert!(rendered.contains(kind), "chart renders {kind}");
    }
    assert!(
        rendered.contains("TANDEM_LEADER_ELECT"),
        "operator runs with leader election"
    );
}

#[test]
fn the_values_schema_rejects_bad_values() {
    let cases = [
        ("operator.replicas=-1", "operator.replicas"),
        ("operator.logFormat=xml", "operator.logFormat"),
        ("metrics.port=0", "metrics.port"),
        ("operator.portRange=lots", "operator.portRange"),
        ("operatr.replicas=1", "operatr"),
    ];
    for (set, field) in cases {
        let err = cluster().helm_template(&["--set", set]).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("values don't meet the specifications") && message.contains(field),
            "--set {set}: {message}"
        );
    }
    let monitor = cluster()
        .helm_template(&["--set", "metrics.serviceMonitor.enabled=true"])
        .unwrap();
    assert!(monitor.contains("kind: ServiceMonitor"));
}

#[tokio::test]
async fn the_installed_release_gives_agents_a_working_off_cluster_token() {
    let c = cluster();
    let out = Command::new(c.helm())
        .args([
            "status",
            "tandem",
            "--namespace",
            SYSTEM_NAMESPACE,
            "--kubeconfig",
        ])
        .arg(c.kubeconfig(Identity::Admin))
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("STATUS: deployed"), "helm status: {status}");

    let admin = c.client(Identity::Admin).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
    let token = eventually(
        "the agent token to be issued",
        Duration::from_secs(60),
        || async {
            let s = secrets.get("tandem-agent-token").await?;
            Ok(s.data.and_then(|d| d.get("token").map(|t| t.0.clone())))
        },
    )
    .await
    .unwrap();
    let token = String::from_utf8(token).unwrap();

    // A kubeconfig like the one a Mac owner builds from the token.
    let admin_config = std::fs::read_to_string(c.kubeconfig(Identity::Admin)).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&admin_config).unwrap();
    config["users"][0]["name"] = "tandem-agent".into();
    config["users"][0]["user"] = serde_yaml::from_str(&format!("token: {token}")).unwrap();
    config["contexts"][0]["context"]["user"] = "tandem-agent".into();
    let dir = std::env::temp_dir().join(unique_name("agent-kubeconfig"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();

    let can_i = |verb: &str, resource: &str| {
        let out = Command::new(c.bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&path)
            .args(["auth", "can-i", verb, resource, "--all-namespaces"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(can_i("create", "llamanodes.tandem.dev"), "yes");
    assert_eq!(can_i("watch", "llamashards.tandem.dev"), "yes");
    assert_eq!(can_i("create", "llamadeployments.tandem.dev"), "no");
    assert_eq!(can_i("list", "secrets"), "no");

    // And a real registration with it.
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let agent = kube::Client::try_from(config).unwrap();
    let name = unique_name("mac-token");
    Api::<LlamaNode>::all(agent)
        .create(
            &PostParams::default(),
            &LlamaNode::new(
                &name,
                LlamaNodeSpec {
                    address: "127.0.0.1".into(),
                    unschedulable: false,
                },
            ),
        )
        .await
        .unwrap();
    Api::<LlamaNode>::all(admin)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
