//! The Helm chart: lint, a `helm template` snapshot, the values schema, and
//! the release the harness installs into the real API server, and the join
//! flow that gives each node (a Mac) an identity of its own.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use std::process::Command;
use tandem_crds::LlamaNode;
use tandem_tests::{Identity, SYSTEM_NAMESPACE, cluster, repo_root, unique_name};

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
        "kind: RoleBinding",
    ] {
        assert!(rendered.contains(kind), "chart renders {kind}");
    }
    assert!(
        !rendered.contains("kubernetes.io/service-account-token"),
        "the chart makes no shared agent token"
    );

    // Installed for one namespace, the operator's Secret rights are a Role
    // there; its ClusterRole only reads LlamaNodes.
    let namespaced = cluster()
        .helm_template(&["--set", "operator.watchNamespace=team-a"])
        .unwrap();
    let docs: Vec<&str> = namespaced.split("\n---\n").collect();
    let cluster_role = docs
        .iter()
        .find(|d| d.contains("kind: ClusterRole\n") && d.contains("name: tandem-operator\n"))
        .expect("the operator's ClusterRole");
    assert!(
        !cluster_role.contains("secrets") && cluster_role.contains("llamanodes"),
        "{cluster_role}"
    );
    let role = docs
        .iter()
        .find(|d| d.contains("kind: Role\n") && d.contains("name: tandem-operator-watch\n"))
        .expect("the operator's Role in the watched namespace");
    assert!(
        role.contains("namespace: team-a") && role.contains("secrets"),
        "{role}"
    );
    assert!(
        rendered.contains("TANDEM_LEADER_ELECT"),
        "operator runs with leader election"
    );

    // The API server's address is the cluster's Service unless set.
    assert!(!rendered.contains("KUBERNETES_SERVICE_HOST"));
    let local = cluster()
        .helm_template(&[
            "--set",
            "operator.apiServer.host=10.244.7.1",
            "--set",
            "operator.apiServer.port=6443",
        ])
        .unwrap();
    assert!(
        local.contains("- name: KUBERNETES_SERVICE_HOST\n              value: \"10.244.7.1\"")
            && local.contains("- name: KUBERNETES_SERVICE_PORT\n              value: \"6443\""),
        "{local}"
    );
}

#[test]
fn the_values_schema_rejects_bad_values() {
    let cases = [
        ("operator.replicas=-1", "operator.replicas"),
        ("operator.logFormat=xml", "operator.logFormat"),
        ("metrics.port=0", "metrics.port"),
        ("operator.portRange=lots", "operator.portRange"),
        ("operator.apiServer.port=0", "operator.apiServer.port"),
        ("operator.restartBackoff=soon", "operator.restartBackoff"),
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
async fn a_joined_node_gets_a_kubeconfig_of_its_own_and_only_its_own_rights() {
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

    // What a Mac owner runs with an admin kubeconfig.
    let name = unique_name("mac-join");
    let path = c.join_node(&name, "192.0.2.7").unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the kubeconfig is private");
    // Joining again is harmless and keeps the same identity.
    c.join_node(&name, "192.0.2.7").unwrap();

    let can_i = |verb: &str, resource: &str, ns: Option<&str>| {
        let mut cmd = Command::new(c.bin_dir().join("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(&path)
            .args(["auth", "can-i", verb, resource]);
        match ns {
            Some(ns) => cmd.args(["-n", ns]),
            None => cmd.arg("--all-namespaces"),
        };
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let own = format!("llamanodes.tandem.dev/{name}");
    let own_lease = format!("leases.coordination.k8s.io/{name}");
    assert_eq!(can_i("patch", &own, None), "yes");
    assert_eq!(
        can_i("patch", "llamanodes.tandem.dev/someone-else", None),
        "no"
    );
    assert_eq!(can_i("create", "llamanodes.tandem.dev", None), "no");
    assert_eq!(can_i("delete", &own, None), "no");
    assert_eq!(can_i("update", &own_lease, Some(SYSTEM_NAMESPACE)), "yes");
    assert_eq!(
        can_i(
            "update",
            "leases.coordination.k8s.io/tandem-operator",
            Some(SYSTEM_NAMESPACE)
        ),
        "no"
    );
    assert_eq!(
        can_i(
            "create",
            "leases.coordination.k8s.io",
            Some(SYSTEM_NAMESPACE)
        ),
        "no"
    );
    assert_eq!(can_i("watch", "llamashards.tandem.dev", None), "yes");
    assert_eq!(can_i("create", "llamadeployments.tandem.dev", None), "no");
    assert_eq!(can_i("get", "secrets", None), "no");

    // The join made the LlamaNode; the agent's registration (server-side
    // apply of its own node) works with this kubeconfig.
    let agent = tandem_tests::client_from(&path).await.unwrap();
    let body = serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "LlamaNode",
        "metadata": {"name": name, "labels": {"tandem.dev/os": "macos"}},
        "spec": {"address": "192.0.2.8"},
    });
    let node = Api::<LlamaNode>::all(agent)
        .patch(
            &name,
            &PatchParams::apply("tandem-agent").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    assert_eq!(node.spec.address, "192.0.2.8");
    let admin = c.client(Identity::Admin).await.unwrap();
    let account = tandem_crds::node_service_account(&name);
    let secret: Secret = Api::namespaced(admin, SYSTEM_NAMESPACE)
        .get(&format!("{account}-token"))
        .await
        .unwrap();
    assert_eq!(
        secret.metadata.annotations.unwrap_or_default()["kubernetes.io/service-account.name"],
        account
    );
    c.forget_node(&name);
}

#[tokio::test]
async fn joining_under_the_name_of_someone_elses_lease_is_refused() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    let c = cluster();
    let name = unique_name("leader-like");
    let leases: Api<Lease> =
        Api::namespaced(c.client(Identity::Admin).await.unwrap(), SYSTEM_NAMESPACE);
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("tandem-operator-7d9f".into()),
            ..Default::default()
        }),
    };
    leases
        .create(&kube::api::PostParams::default(), &lease)
        .await
        .unwrap();
    let err = c
        .join_node(&name, "127.0.0.1")
        .expect_err("a node may not take over a Lease another holds");
    let message = format!("{err:#}");
    assert!(
        message.contains(&format!(
            "Lease {SYSTEM_NAMESPACE}/{name} exists and is held by \"tandem-operator-7d9f\""
        )),
        "{message}"
    );
    let account = tandem_crds::node_service_account(&name);
    let out = c
        .kubectl(
            Identity::Admin,
            &["get", "serviceaccount", &account, "-n", SYSTEM_NAMESPACE],
        )
        .unwrap();
    assert!(!out.status.success(), "no identity was made");
    c.delete_leases(&[name]);

    // Nor the operator's leader-election Lease, made or not yet made.
    let err = c
        .join_node("tandem-operator", "127.0.0.1")
        .expect_err("no node may be named after the leader-election Lease");
    assert!(
        format!("{err:#}").contains(
            "tandem-operator is the name of the operator's leader-election Lease; join this \
             machine under another node name"
        ),
        "{err:#}"
    );
}
