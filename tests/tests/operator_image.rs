//! The chart's operator as real pods: `helm install` on a control plane with
//! a real node (`dev/cluster.sh up --with-node`: kube-scheduler, containerd
//! with runc, a kubelet) runs the image `dev/image.sh` builds, exactly as a
//! user's cluster would. One test walks a release's life, because every step
//! acts on the same release: install, leader election, placement, failover,
//! upgrade, uninstall.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tandem_crds::*;
use tandem_tests::{
    Cluster, Identity, SYSTEM_NAMESPACE, TestNamespace, eventually, node_cluster, repo_root,
    unique_name,
};

const RELEASE: &str = "tandem";
const SELECTOR: &str = "app.kubernetes.io/instance=tandem,app.kubernetes.io/component=operator";
/// The chart's default leader Lease duration (`--leader-lease-duration`).
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Pod start, from scheduling to Ready, on a loaded two-core machine.
const POD_WAIT: Duration = Duration::from_secs(120);

fn helm(c: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let values = c.state_dir().join("node/chart-values.yaml");
    let mut cmd = Command::new(c.helm());
    cmd.args(args)
        .args(["--namespace", SYSTEM_NAMESPACE, "--kubeconfig"])
        .arg(c.kubeconfig(Identity::Admin));
    if matches!(args.first(), Some(&"install") | Some(&"upgrade")) {
        cmd.arg(repo_root().join("charts/tandem"))
            .arg("-f")
            .arg(values);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The operator pods once exactly `n` of them exist, all Ready, and `check` accepts them.
async fn ready_pods(
    pods: &Api<Pod>,
    n: usize,
    what: &str,
    check: impl Fn(&[Pod]) -> bool,
) -> anyhow::Result<Vec<Pod>> {
    let check = &check;
    eventually(what, POD_WAIT, || async move {
        let list = pods
            .list(&ListParams::default().labels(SELECTOR))
            .await?
            .items;
        let all_ready = list.len() == n && list.iter().all(ready);
        Ok((all_ready && check(&list)).then_some(list))
    })
    .await
}

fn names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name_any()).collect()
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("tandem-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// What the kernel says about a pod's operator process: the host process
/// whose cgroup is the pod's and whose command is the operator.
fn process_of(pod: &Pod) -> anyhow::Result<(u32, String, String)> {
    let uid = pod.uid().unwrap_or_default();
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"/usr/local/bin/tandem-operator") {
            continue;
        }
        let cgroup = std::fs::read_to_string(path.join("cgroup")).unwrap_or_default();
        if !cgroup.contains(&format!("pod{uid}")) {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status"))?;
        let mountinfo = std::fs::read_to_string(path.join("mountinfo"))?;
        let root = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap_or_default()
            .to_owned();
        let pid = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .unwrap_or_default();
        return Ok((pid, status, root));
    }
    anyhow::bail!("no operator process in pod {}", pod.name_any())
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
}

/// Everything of the release left in the cluster, as `kind/name` lines.
async fn leftovers(client: &Client) -> anyhow::Result<Vec<String>> {
    let by_release = ListParams::default().labels("app.kubernetes.io/instance=tandem");
    let mut left = Vec::new();
    macro_rules! namespaced {
        ($kind:ty, $label:expr, $params:expr) => {
            for o in Api::<$kind>::namespaced(client.clone(), SYSTEM_NAMESPACE)
                .list($params)
                .await?
                .items
            {
                left.push(format!("{}/{}", $label, o.name_any()));
            }
        };
    }
    macro_rules! cluster_wide {
        ($kind:ty, $label:expr) => {
            for o in Api::<$kind>::all(client.clone())
                .list(&by_release)
                .await?
                .items
            {
                left.push(format!("{}/{}", $label, o.name_any()));
            }
        };
    }
    namespaced!(Deployment, "deployment", &by_release);
    namespaced!(ReplicaSet, "replicaset", &by_release);
    namespaced!(Pod, "pod", &by_release);
    namespaced!(Service, "service", &by_release);
    namespaced!(ServiceAccount, "serviceaccount", &by_release);
    namespaced!(Role, "role", &by_release);
    namespaced!(RoleBinding, "rolebinding", &by_release);
    cluster_wide!(ClusterRole, "clusterrole");
    cluster_wide!(ClusterRoleBinding, "clusterrolebinding");
    Ok(left)
}

#[tokio::test]
async fn helm_install_runs_the_operator_image_as_pods_that_elect_place_fail_over_and_go_away() {
    let c = node_cluster();
    let admin = c.client(Identity::Admin).await.expect("admin client");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
    // A release left by an interrupted run goes first, with its pods.
    let _ = helm(c, &["uninstall", RELEASE, "--wait"]);
    eventually("no operator pods left", POD_WAIT, || async {
        let list = pods.list(&ListParams::default().labels(SELECTOR)).await?;
        Ok(list.items.is_empty().then_some(()))
    })
    .await
    .expect("an earlier release's pods gone");
    let _ = leases
        .delete("tandem-operator", &DeleteParams::default())
        .await;

    // Install: two pods of the image, Ready through /readyz.
    let t = Instant::now();
    helm(c, &["install", RELEASE]).expect("helm install");
    let first = ready_pods(&pods, 2, "two operator pods Ready", |_| true)
        .await
        .expect("pods");
    eprintln!("install to two pods Ready: {:?}", t.elapsed());
    for pod in &first {
        let spec = pod.spec.as_ref().expect("spec");
        let container = &spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("ghcr.io/tandem-dev/tandem-operator:0.1.0"),
            "the chart's default image"
        );
        let probe = container.readiness_probe.as_ref().expect("readiness probe");
        assert_eq!(
            probe.http_get.as_ref().and_then(|h| h.path.as_deref()),
            Some("/readyz")
        );
        // The chart's securityContext, as the kernel sees it.
        let (pid, status, root) = process_of(pod).expect("the operator process");
        let uids: Vec<&str> = status_field(&status, "Uid:").split_whitespace().collect();
        assert_eq!(uids, ["65532"; 4], "pid {pid} runs as the chart's user");
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "pid {pid}");
        assert_eq!(
            status_field(&status, "CapEff:"),
            "0000000000000000",
            "pid {pid}"
        );
        assert!(
            root.split(' ')
                .nth(5)
                .is_some_and(|o| o.split(',').any(|f| f == "ro")),
            "pid {pid}'s root filesystem is read-only: {root}"
        );
    }

    // Exactly one holds the Lease; the Lease names a pod.
    let leader = eventually("a leader among the pods", POD_WAIT, || async {
        Ok(holder(&leases).await.filter(|h| names(&first).contains(h)))
    })
    .await
    .expect("leader");
    let mut leading = 0;
    for pod in &first {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("pod IP");
        let metrics = http_get(&ip, 9090, "/metrics").expect("metrics from the pod");
        if metrics.lines().any(|l| l == "tandem_operator_leader 1") {
            leading += 1;
            assert_eq!(
                pod.name_any(),
                leader,
                "the Lease holder is the pod that leads"
            );
        }
    }
    assert_eq!(leading, 1, "exactly one pod leads");

    // A LlamaDeployment is placed by the in-cluster operator.
    let ns = TestNamespace::new(c, "image").await.expect("namespace");
    let label = ("tandem.test/image".to_owned(), unique_name("run"));
    let renewing = Arc::new(AtomicBool::new(true));
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let name = format!("{}-n{i}", ns.name());
        add_node(&admin, &name, &format!("10.3.0.{i}"), &label, &renewing)
            .await
            .expect("a node");
        nodes.push(name);
    }
    let deployments: Api<LlamaDeployment> = Api::namespaced(admin.clone(), ns.name());
    let t = Instant::now();
    deployments
        .create(&PostParams::default(), &llama("llama", &label))
        .await
        .expect("creating the deployment");
    eventually("the deployment's two shards", POD_WAIT, || async {
        Ok((shards(&admin, ns.name()).await? == 2).then_some(()))
    })
    .await
    .expect("placed");
    eprintln!("apply to shards placed: {:?}", t.elapsed());

    // The leader's pod is deleted. It hands the Lease back as it stops, and
    // another pod leads within the lease duration: the standby, or the
    // replacement the Deployment starts at once, whichever asks first (the
    // standby asks every retry interval, the replacement as it starts). The
    // Deployment brings the count back to two.
    let t = Instant::now();
    pods.delete(&leader, &DeleteParams::default())
        .await
        .expect("deleting the leader's pod");
    let survivor = names(&first)
        .into_iter()
        .find(|n| *n != leader)
        .expect("the other pod");
    let next = eventually("another pod leads", LEASE_DURATION, || async {
        Ok(holder(&leases).await.filter(|h| *h != leader))
    })
    .await
    .expect("failover within the lease duration");
    let which = if next == survivor {
        "the standby"
    } else {
        "the replacement"
    };
    eprintln!(
        "leader pod deleted to {which} holding the Lease: {:?}",
        t.elapsed()
    );
    let replaced = ready_pods(&pods, 2, "a replacement pod Ready", |p| {
        !names(p).contains(&leader) && names(p).contains(&survivor)
    })
    .await
    .expect("replacement");
    assert!(names(&replaced).contains(&next), "{next} still leads");
    eprintln!(
        "leader pod deleted to two pods Ready again: {:?}",
        t.elapsed()
    );

    // An upgrade with a changed value rolls the pods.
    let t = Instant::now();
    helm(c, &["upgrade", RELEASE, "--set", "operator.logLevel=debug"]).expect("helm upgrade");
    let rolled = ready_pods(&pods, 2, "two new pods Ready after the upgrade", |p| {
        names(p).is_disjoint(&names(&replaced))
    })
    .await
    .expect("rolled");
    for pod in &rolled {
        let env = pod.spec.as_ref().expect("spec").containers[0]
            .env
            .clone()
            .unwrap_or_default();
        assert!(
            env.iter()
                .any(|e| e.name == "TANDEM_LOG" && e.value.as_deref() == Some("debug")),
            "{} runs with the new value",
            pod.name_any()
        );
    }
    eprintln!("upgrade to two new pods Ready: {:?}", t.elapsed());

    // The placed deployment is still the leader's business after all this.
    assert_eq!(shards(&admin, ns.name()).await.expect("shards"), 2);
    deployments
        .delete("llama", &DeleteParams::default())
        .await
        .expect("deleting the deployment");
    eventually("the deployment gone", POD_WAIT, || async {
        Ok(deployments.get_opt("llama").await?.is_none().then_some(()))
    })
    .await
    .expect("the operator's finalizer released");
    renewing.store(false, Ordering::Relaxed);
    for name in &nodes {
        let _ = Api::<LlamaNode>::all(admin.clone())
            .delete(name, &DeleteParams::default())
            .await;
        let _ = leases.delete(name, &DeleteParams::default()).await;
    }

    // Uninstall leaves no operator objects behind.
    helm(c, &["uninstall", RELEASE, "--wait"]).expect("helm uninstall");
    let left = eventually("nothing of the release left", POD_WAIT, || async {
        let left = leftovers(&admin).await?;
        Ok(left.is_empty().then_some(()))
    })
    .await;
    if let Err(e) = left {
        panic!("{e:#}; left: {:?}", leftovers(&admin).await);
    }
    // The leader-election Lease is the operator's, not the release's, and
    // stays (docs/operator.md): the release's RBAC goes in the same breath
    // as its pods, so the last leader may not get to hand it back; it
    // expires within its duration.
}

/// A plain HTTP/1.0 GET, for the pods' own endpoints.
fn http_get(host: &str, port: u16, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((host, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// Registers a node as its agent would, but as the admin (no agent binary
/// is needed here): the LlamaNode with capacity and Ready, and its Lease,
/// renewed every second while `renewing` holds.
async fn add_node(
    admin: &Client,
    name: &str,
    address: &str,
    label: &(String, String),
    renewing: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let nodes: Api<LlamaNode> = Api::all(admin.clone());
    let mut node = LlamaNode::new(
        name,
        LlamaNodeSpec {
            address: address.to_owned(),
            unschedulable: false,
        },
    );
    node.metadata.labels = Some(
        [
            label.clone(),
            (LABEL_BACKEND.to_owned(), "cpu".to_owned()),
            (LABEL_MEMORY_GIB.to_owned(), "64".to_owned()),
        ]
        .into(),
    );
    nodes.create(&PostParams::default(), &node).await?;
    let status = tandem_tests::operator::ready_cpu_node(64);
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_owned()),
            lease_duration_seconds: Some(30),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await?;
    let (name, renewing) = (name.to_owned(), Arc::clone(renewing));
    tokio::spawn(async move {
        while renewing.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let patch = json!({ "spec": { "renewTime": MicroTime(Timestamp::now()) } });
            let _ = leases
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
    });
    Ok(())
}

/// A two-rank deployment of a bundled model on the nodes with `label`.
fn llama(name: &str, label: &(String, String)) -> LlamaDeployment {
    LlamaDeployment::new(
        name,
        LlamaDeploymentSpec {
            model: "mlx-community/Llama-3.2-1B-Instruct-4bit".into(),
            revision: None,
            sharding: Sharding {
                strategy: ShardingStrategy::Tensor,
                world_size: 2,
            },
            placement: Some(Placement {
                node_selector: Some(LabelSelector {
                    match_labels: Some([label.clone()].into()),
                    match_expressions: None,
                }),
            }),
            backend: Backend::Ring,
            max_context_tokens: 8192,
            serving: None,
            architecture: None,
            tls: None,
        },
    )
}

/// How many shards of the first epoch exist in `ns`.
async fn shards(client: &Client, ns: &str) -> anyhow::Result<usize> {
    let api: Api<LlamaShard> = Api::namespaced(client.clone(), ns);
    let params = ListParams::default().labels(&format!("{LABEL_EPOCH}=1"));
    Ok(api.list(&params).await?.items.len())
}
