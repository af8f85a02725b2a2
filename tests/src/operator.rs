//! The operator as a real child process, and test code playing the agents
//! for the operator suites (LlamaNodes with status, renewed Leases,
//! shard statuses), each node with its own identity (`tandem-agent join`)
//! and so only the rights the operator grants it.
//!
//! The operator binary is `$TANDEM_OPERATOR_BIN` when set; otherwise it is
//! built with `cargo build -p tandem-operator` into the same target directory
//! and profile as the running test executable, and taken from there. Every
//! operator a test starts watches only the test's namespace and elects its
//! leader on a Lease named after the namespace, so parallel tests never share
//! an operator; each test's LlamaNodes carry a label unique to the test, and
//! its deployments select on it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tandem_crds::*;

use crate::http::{Response, metric_value, read_response, send};
use crate::process::{LoggedChild, free_port, workspace_binary};
use crate::{
    Cluster, Identity, SYSTEM_NAMESPACE, TestNamespace, admin, cluster, eventually, repo_root,
};

/// A bundled model whose ranks need about 0.5 GiB each at 2 ranks.
pub const MODEL: &str = "mlx-community/Llama-3.2-1B-Instruct-4bit";
/// How long a test waits for the operator to react.
pub const WAIT: Duration = Duration::from_secs(60);

/// The tandem-operator binary; see [`workspace_binary`].
pub fn operator_binary() -> PathBuf {
    workspace_binary("tandem-operator")
}

/// A `tandem-operator` child process with the chart's operator identity.
#[derive(Debug)]
pub struct Operator {
    process: LoggedChild,
    /// Port of its /metrics, /healthz and /readyz.
    pub http_port: u16,
    /// Its identity (Lease holder, Event reporting instance).
    pub identity: String,
    /// Its log file.
    pub log: PathBuf,
}

/// Flags that make the operator quick enough for tests.
pub const FAST: &[&str] = &[
    "--restart-backoff",
    "1s",
    "--restart-backoff-max",
    "2s",
    "--restart-budget",
    "3",
    "--release-timeout",
    "30s",
    "--liveness-tick",
    "300ms",
    "--leader-lease-duration",
    "6s",
    "--leader-retry-interval",
    "1s",
    // Renew deadline plus drain must stay below the lease.
    "--leader-renew-deadline",
    "3s",
    "--drain-timeout",
    "2s",
];

impl Operator {
    /// Starts an operator watching `namespace`, electing its leader on the
    /// Lease `op-<namespace>`, with [`FAST`] timings and `extra` flags.
    pub fn start(cluster: &Cluster, namespace: &str, identity: &str, extra: &[&str]) -> Operator {
        let bin = operator_binary();
        let http_port = free_port();
        let log = repo_root()
            .join("target/operator-test-logs")
            .join(format!("{namespace}-{identity}.log"));
        let mut cmd = Command::new(&bin);
        cmd.arg("--kubeconfig")
            .arg(cluster.kubeconfig(Identity::Operator))
            .args(["--namespace", namespace])
            .args(["--leader-election-name", &format!("op-{namespace}")])
            .args(["--identity", identity])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args([
                "--log-format",
                "json",
                "--log",
                "info,tandem_operator=debug",
            ])
            .args(FAST)
            .args(extra);
        Operator {
            process: LoggedChild::spawn(&mut cmd, &log),
            http_port,
            identity: identity.to_owned(),
            log,
        }
    }

    /// GET `path` on the operator's HTTP port (reads time out after 5 s).
    pub fn get(&self, path: &str) -> anyhow::Result<Response> {
        let stream = send(self.http_port, "GET", path, &[], None)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        read_response(stream)
    }

    /// The value of an unlabelled metric, or of `name{labels}`.
    pub fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let body = self.get("/metrics")?.body;
        metric_value(&body, series).context(format!("no series {series}"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM and waits (up to 10 s) for the process to exit; returns
    /// its status code.
    pub fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        Ok(self.process.terminate(Duration::from_secs(10))?.code())
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    /// The last 40 lines of the log (for failure messages).
    pub fn log_tail(&self) -> String {
        self.process.log_tail(40)
    }
}

/// Test code acting as the agents of a few nodes.
#[derive(Clone)]
pub struct Agents {
    cluster: &'static Cluster,
    /// The admin's client, for looking things up (never for an agent's writes).
    admin: Client,
    /// Each registered node's own client.
    clients: Arc<std::sync::Mutex<BTreeMap<String, Client>>>,
    /// Label every node of this test carries, as `key=value`.
    pub label: (String, String),
    renewing: Arc<std::sync::Mutex<BTreeMap<String, Arc<AtomicBool>>>>,
    /// How often Leases are renewed.
    pub renew_every: Duration,
}

// A kube::Client has no Debug; the label says whose agents these are.
impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents")
            .field("label", &self.label)
            .field("renew_every", &self.renew_every)
            .finish_non_exhaustive()
    }
}

/// The spec of a node the agents register.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Name (cluster-wide unique).
    pub name: String,
    /// IP address.
    pub address: String,
    /// Memory in GiB.
    pub memory_gib: i64,
    /// Lease duration in seconds.
    pub lease_seconds: i32,
}

/// The status a test agent's node reports: a Linux CPU node of
/// `memory_gib` GiB and 8 cores whose agent is running (Ready).
pub fn ready_cpu_node(memory_gib: i64) -> LlamaNodeStatus {
    LlamaNodeStatus {
        capacity: Some(NodeCapacity {
            memory_bytes: memory_gib << 30,
            wired_limit_bytes: None,
            cpu_cores: 8,
            gpu_cores: None,
            gpus: None,
        }),
        os: Some("linux".into()),
        backend: Some("cpu".into()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "AgentRunning".into(),
            message: "test agent".into(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::now()),
        }],
        ..Default::default()
    }
}

impl Agents {
    /// Agents for a test; its nodes get the label `tandem.test/<test>=<run>`.
    pub async fn new(cluster: &'static Cluster, test: &str, run: &str) -> Agents {
        Agents {
            cluster,
            admin: admin(cluster).await,
            clients: Arc::default(),
            label: (format!("tandem.test/{test}"), run.to_owned()),
            renewing: Arc::default(),
            renew_every: Duration::from_secs(1),
        }
    }

    /// A selector matching this test's nodes.
    pub fn selector(&self) -> Placement {
        Placement {
            node_selector: Some(LabelSelector {
                match_labels: Some([self.label.clone()].into()),
                match_expressions: None,
            }),
        }
    }

    /// Registers a node: the LlamaNode with its status (capacity, Ready), and
    /// a Lease renewed every second until [`Agents::stop_renewing`].
    pub async fn register(&self, node: &NodeSpec) -> anyhow::Result<()> {
        // `join` creates the LlamaNode and the Lease; the node's own client
        // then fills them in, as an agent does.
        let client = self.cluster.node_client(&node.name, &node.address).await?;
        self.clients
            .lock()
            .expect("clients map")
            .insert(node.name.clone(), client.clone());
        let nodes: Api<LlamaNode> = Api::all(client.clone());
        let labels: BTreeMap<String, String> = [
            self.label.clone(),
            (LABEL_BACKEND.to_owned(), "cpu".to_owned()),
            (LABEL_MEMORY_GIB.to_owned(), node.memory_gib.to_string()),
        ]
        .into();
        nodes
            .patch(
                &node.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": labels } })),
            )
            .await?;
        let status = ready_cpu_node(node.memory_gib);
        nodes
            .patch_status(
                &node.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        let leases: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
        let spec = LeaseSpec {
            holder_identity: Some(node.name.clone()),
            lease_duration_seconds: Some(node.lease_seconds),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        };
        leases
            .patch(
                &node.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
        let flag = Arc::new(AtomicBool::new(true));
        self.renewing
            .lock()
            .expect("renewing map")
            .insert(node.name.clone(), Arc::clone(&flag));
        let name = node.name.clone();
        let every = self.renew_every;
        tokio::spawn(async move {
            while flag.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                if !flag.load(Ordering::Relaxed) {
                    break;
                }
                let patch = json!({ "spec": { "renewTime": MicroTime(Timestamp::now()) } });
                // Renewals fail while the API server restarts; the next one retries.
                let _ = leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
        });
        Ok(())
    }

    /// Registers `count` nodes `<prefix>-<i>` with addresses 10.<octet>.0.<i>.
    pub async fn register_many(
        &self,
        prefix: &str,
        octet: u8,
        count: u8,
        memory_gib: i64,
        lease_seconds: i32,
    ) -> Vec<String> {
        let mut names = Vec::new();
        for i in 1..=count {
            let spec = NodeSpec {
                name: format!("{prefix}-{i}"),
                address: format!("10.{octet}.0.{i}"),
                memory_gib,
                lease_seconds,
            };
            self.register(&spec)
                .await
                .unwrap_or_else(|e| panic!("registering {}: {e:#}", spec.name));
            names.push(spec.name);
        }
        names
    }

    /// Stops renewing a node's Lease, as a crashed agent would.
    pub fn stop_renewing(&self, node: &str) {
        if let Some(flag) = self.renewing.lock().expect("renewing map").get(node) {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Reports `phase` for a shard.
    pub async fn set_phase(&self, ns: &str, shard: &str, phase: ShardPhase) -> anyhow::Result<()> {
        self.set_status(ns, shard, json!({ "phase": phase })).await
    }

    /// Merges `status` into a shard's status.
    pub async fn set_status(
        &self,
        ns: &str,
        shard: &str,
        status: serde_json::Value,
    ) -> anyhow::Result<()> {
        let node = Api::<LlamaShard>::namespaced(self.admin.clone(), ns)
            .get(shard)
            .await
            .with_context(|| format!("reading shard {ns}/{shard}"))?
            .spec
            .node_name;
        let api: Api<LlamaShard> = Api::namespaced(self.client(&node)?, ns);
        // As the agent's status writer does, a refusal is retried for a
        // while: the API server's RBAC cache may lag the operator's Role.
        let started = std::time::Instant::now();
        loop {
            let result = api
                .patch_status(
                    shard,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": status })),
                )
                .await;
            match result {
                Err(kube::Error::Api(e))
                    if e.code == 403 && started.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => {
                    other.with_context(|| {
                        format!("setting the status of shard {ns}/{shard} as node {node}")
                    })?;
                    return Ok(());
                }
            }
        }
    }

    /// The client of a registered node.
    pub fn client(&self, node: &str) -> anyhow::Result<Client> {
        self.clients
            .lock()
            .expect("clients map")
            .get(node)
            .cloned()
            .with_context(|| format!("node {node} was not registered"))
    }

    /// Walks every shard of `epoch` through a start, in the agents' order
    /// (docs/design.md): Downloading (with progress), Connecting, Loading,
    /// Loaded and Ready.
    pub async fn load_all(&self, ns: &str, epoch: i64) -> anyhow::Result<()> {
        let shards = shards_of_epoch(&self.admin, ns, epoch).await?;
        for s in &shards {
            let name = s.name_any();
            self.set_status(
                ns,
                &name,
                json!({"phase": "Downloading", "progress": {"bytesDone": 10, "bytesTotal": 100}}),
            )
            .await?;
        }
        for phase in [
            ShardPhase::Connecting,
            ShardPhase::Loading,
            ShardPhase::Loaded,
            ShardPhase::Ready,
        ] {
            for s in &shards {
                self.set_phase(ns, &s.name_any(), phase).await?;
            }
        }
        Ok(())
    }

    /// Sets `status.shards` of a node (the shards its agent runs).
    pub async fn report_running(&self, node: &str, shards: &[NodeShard]) -> anyhow::Result<()> {
        let nodes: Api<LlamaNode> = Api::all(self.client(node)?);
        nodes
            .patch_status(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "shards": shards } })),
            )
            .await?;
        Ok(())
    }

    /// Stops renewing, and deletes this test's nodes, their Leases and
    /// identities with kubectl as the admin (agents may not delete; Drop cannot await).
    pub fn remove_nodes(&self, cluster: &Cluster) {
        let names: Vec<String> = {
            let map = self.renewing.lock().unwrap_or_else(|e| e.into_inner());
            for flag in map.values() {
                flag.store(false, Ordering::Relaxed);
            }
            map.keys().cloned().collect()
        };
        let selector = format!("{}={}", self.label.0, self.label.1);
        let _ = cluster.kubectl(
            Identity::Admin,
            &["delete", "lnode", "-l", &selector, "--wait=false"],
        );
        for name in &names {
            cluster.forget_node(name);
        }
    }
}

/// A deployment of [`MODEL`] with `world` ranks on this test's nodes.
pub fn deployment(name: &str, world: i32, agents: &Agents) -> LlamaDeployment {
    LlamaDeployment::new(
        name,
        LlamaDeploymentSpec {
            model: MODEL.into(),
            revision: None,
            sharding: Sharding {
                strategy: ShardingStrategy::Tensor,
                world_size: world,
            },
            placement: Some(agents.selector()),
            backend: Backend::Ring,
            max_context_tokens: 8192,
            serving: None,
            architecture: None,
            tls: None,
        },
    )
}

/// The shards of `epoch` in `ns`, by rank.
pub async fn shards_of_epoch(
    client: &Client,
    ns: &str,
    epoch: i64,
) -> anyhow::Result<Vec<LlamaShard>> {
    let api: Api<LlamaShard> = Api::namespaced(client.clone(), ns);
    let mut list: Vec<LlamaShard> = api
        .list(&kube::api::ListParams::default().labels(&format!("{LABEL_EPOCH}={epoch}")))
        .await?
        .items;
    list.sort_by_key(|s| s.spec.rank);
    Ok(list)
}

/// Every shard in `ns`.
pub async fn all_shards(client: &Client, ns: &str) -> anyhow::Result<Vec<LlamaShard>> {
    let api: Api<LlamaShard> = Api::namespaced(client.clone(), ns);
    let mut list = api.list(&Default::default()).await?.items;
    list.sort_by_key(|s| (s.spec.epoch, s.spec.rank));
    Ok(list)
}

/// The deployment's status once `check` accepts it, waiting up to `timeout`.
pub async fn wait_status(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&LlamaDeploymentStatus) -> bool,
) -> anyhow::Result<LlamaDeploymentStatus> {
    let api: Api<LlamaDeployment> = Api::namespaced(client.clone(), ns);
    let check = &check;
    let api = &api;
    eventually(&format!("{ns}/{name}: {what}"), timeout, || async move {
        let d = api.get(name).await?;
        Ok(d.status.filter(|s| check(s)))
    })
    .await
}

/// A condition of a status.
pub fn condition<'a>(s: &'a LlamaDeploymentStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition has this status and reason.
pub fn has(s: &LlamaDeploymentStatus, type_: &str, status: &str, reason: &str) -> bool {
    condition(s, type_).is_some_and(|c| c.status == status && c.reason == reason)
}

/// Events about `name` in `ns`, as (reason, note, reporting instance).
pub async fn events(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.reporting_instance.unwrap_or_default(),
            )
        })
        .collect())
}

/// Waits for an Event with `reason` about `name`; returns its note.
pub async fn wait_event(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> anyhow::Result<String> {
    eventually(
        &format!("an Event {reason} about {ns}/{name}"),
        WAIT,
        || async {
            Ok(events(client, ns, name)
                .await?
                .into_iter()
                .find(|(r, _, _)| r == reason)
                .map(|(_, note, _)| note))
        },
    )
    .await
}

/// The token in a deployment's group-token Secret.
pub async fn token(client: &Client, ns: &str, deployment: &str) -> anyhow::Result<Vec<u8>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get(&format!("{deployment}-group-token")).await?;
    s.data
        .and_then(|d| d.get("token").map(|t| t.0.clone()))
        .context("no token key")
}

/// Who holds a Lease in the system namespace.
pub async fn lease_holder(client: &Client, name: &str) -> anyhow::Result<Option<String>> {
    let api: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// One test's world: a namespace, the admin client and the agents. Dropping
/// it (after the test's operators, which are declared later and so dropped
/// first) clears what the test leaves behind, passed or failed: deployment
/// finalizers no operator will remove any more, the nodes and their Leases,
/// and the operators' leader Lease.
pub struct Setup {
    /// The control plane.
    pub cluster: &'static Cluster,
    /// The test's namespace.
    pub ns: TestNamespace,
    /// Admin client.
    pub admin: Client,
    /// The test's agents.
    pub agents: Agents,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("ns", &self.ns)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl Setup {
    /// A fresh namespace `op-<test>-xxxxxx` and agents labelling nodes with it.
    pub async fn new(test: &str) -> Setup {
        let cluster = cluster();
        let ns = TestNamespace::new(cluster, &format!("op-{test}"))
            .await
            .expect("test namespace");
        let admin = admin(cluster).await;
        let agents = Agents::new(cluster, test, ns.name()).await;
        Setup {
            cluster,
            ns,
            admin,
            agents,
        }
    }

    /// The namespace name.
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// Starts an operator for this namespace.
    pub fn operator(&self, identity: &str) -> Operator {
        Operator::start(self.cluster, self.ns(), identity, &[])
    }

    /// Starts operator `leader` and waits until it holds the leader Lease,
    /// then operator `standby` and waits until it is ready: a leader and a
    /// standby, in that order.
    pub async fn leader_and_standby(&self, leader: &str, standby: &str) -> (Operator, Operator) {
        let lease = format!("op-{}", self.ns());
        let (admin, lease) = (&self.admin, &lease);
        let a = self.operator(leader);
        eventually("operator a to lead", WAIT, || async move {
            Ok((lease_holder(admin, lease).await?.as_deref() == Some(leader)).then_some(()))
        })
        .await
        .expect("a leads");
        let b = self.operator(standby);
        eventually("operator b to be up", WAIT, || async {
            Ok(b.get("/readyz").ok().filter(|r| r.status == 200))
        })
        .await
        .expect("b ready");
        (a, b)
    }

    /// Registers `count` nodes `<ns>-n-<i>`.
    pub async fn nodes(&self, count: u8, memory_gib: i64, lease_seconds: i32) -> Vec<String> {
        self.agents
            .register_many(
                &format!("{}-n", self.ns()),
                1,
                count,
                memory_gib,
                lease_seconds,
            )
            .await
    }

    /// The namespace's deployments, as the admin.
    pub fn deployments(&self) -> Api<LlamaDeployment> {
        Api::namespaced(self.admin.clone(), self.ns())
    }

    /// Creates a deployment.
    pub async fn create(&self, d: &LlamaDeployment) -> LlamaDeployment {
        self.deployments()
            .create(&PostParams::default(), d)
            .await
            .expect("creating the deployment")
    }

    /// Waits for a status `check` accepts.
    pub async fn status(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&LlamaDeploymentStatus) -> bool,
    ) -> LlamaDeploymentStatus {
        wait_status(&self.admin, self.ns(), name, what, WAIT, check)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits for `count` shards of `epoch`.
    pub async fn shards(&self, epoch: i64, count: usize) -> Vec<LlamaShard> {
        let (client, ns) = (&self.admin, self.ns());
        eventually(
            &format!("{count} shards of epoch {epoch}"),
            WAIT,
            || async move {
                let s = shards_of_epoch(client, ns, epoch).await?;
                Ok((s.len() == count).then_some(s))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until the namespace holds shards of `epoch` only.
    pub async fn only_epoch(&self, epoch: i64) -> Vec<LlamaShard> {
        let (client, ns) = (&self.admin, self.ns());
        eventually(
            &format!("only shards of epoch {epoch}"),
            WAIT,
            || async move {
                let all = all_shards(client, ns).await?;
                Ok((!all.is_empty() && all.iter().all(|s| s.spec.epoch == epoch)).then_some(all))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits for an Event; returns its note.
    pub async fn event(&self, name: &str, reason: &str) -> String {
        wait_event(&self.admin, self.ns(), name, reason)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Plays the agents loading every rank of `epoch`, and waits for Serving.
    pub async fn serve(&self, name: &str, epoch: i64, world: i32) -> LlamaDeploymentStatus {
        self.agents
            .load_all(self.ns(), epoch)
            .await
            .expect("loading");
        self.status(
            name,
            &format!("Serving {world}/{world} in epoch {epoch}"),
            |s| {
                s.phase == Some(DeploymentPhase::Serving)
                    && s.epoch == epoch
                    && s.ready_ranks == world
            },
        )
        .await
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let ns = self.ns.name().to_owned();
        self.cluster.clear_deployment_finalizers(&ns);
        self.agents.remove_nodes(self.cluster);
        self.cluster.delete_leases(&[format!("op-{ns}")]);
    }
}
