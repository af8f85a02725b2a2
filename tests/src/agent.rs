//! Real `tandem-agent run` processes, each with an identity of its own
//! (`tandem-agent join`), the test models they serve (the tiny one
//! `tandem-agent make-model` writes, the real one `dev/real-model.sh`
//! converts), and what the agent suites write in the operator's place:
//! LlamaShards and group-token Secrets, as the operator writes them, and
//! the waits on what the agents report back.
//!
//! The agent binary is `$TANDEM_AGENT_BIN` when set; otherwise it is built
//! into the running test executable's target directory and profile
//! ([`workspace_binary`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use tandem_crds::*;

use crate::http::{Response, request};
use crate::process::{
    LoggedChild, children_running, free_port, free_ports, scratch, workspace_binary,
};
use crate::{Cluster, SYSTEM_NAMESPACE, eventually, repo_root};

/// How long a test waits for an agent to react.
pub const WAIT: Duration = Duration::from_secs(90);
/// Model ID the tests' shards name.
pub const MODEL: &str = "tandem-test/tiny-llama";

/// The tandem-agent binary; see [`tandem_tests::workspace_binary`].
pub fn agent_binary() -> PathBuf {
    workspace_binary("tandem-agent")
}

/// The tiny model's shape ([`tandem_planner::TINY_TEST_MODEL`], the one
/// `tandem-agent make-model` writes) as a shard's architecture.
pub fn tiny_architecture() -> Architecture {
    Architecture::from_shape(&tandem_planner::TINY_TEST_MODEL)
}

/// Writes the tiny model into `dir` with `tandem-agent make-model`.
pub fn make_model(dir: &Path) {
    let out = Command::new(agent_binary())
        .arg("make-model")
        .arg("--out")
        .arg(dir)
        .args(["--seed", "7"])
        .output()
        .expect("running tandem-agent make-model");
    assert!(
        out.status.success(),
        "make-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A model directory holding [`MODEL`] in the plain `ORG/NAME` layout,
/// written once per test process.
pub fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch(&format!("models-{}", std::process::id()));
        make_model(&root.join(MODEL));
        root
    })
    .clone()
}

/// The real test model the user stories serve: SmolLM2-135M-Instruct, 4-bit
/// (group size 32), a catalog entry; it splits over 1 or 3 ranks.
pub const REAL_MODEL: &str = tandem_planner::catalog::SMOLLM2_135M_4BIT;

/// The model directory `dev/real-model.sh` converts the real model into
/// (`tandem-dev/SmolLM2-135M-Instruct-*`, cached across runs).
pub fn real_model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("dev/real-model.sh"))
            .arg("dir")
            .stderr(Stdio::inherit())
            .output()
            .expect("running dev/real-model.sh");
        assert!(out.status.success(), "dev/real-model.sh dir failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// `--label` values.
    pub labels: Vec<String>,
    /// `--model-dir` values.
    pub model_dirs: Vec<PathBuf>,
    /// `--download-dir`.
    pub download_dir: Option<PathBuf>,
    /// `--offline`.
    pub offline: bool,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// More flags.
    pub args: Vec<String>,
    /// `--advertise-address` [default: 127.0.0.1].
    pub advertise_address: Option<String>,
    /// `--barrier-timeout-seconds` [default: 60].
    pub barrier_timeout_seconds: Option<u64>,
    /// A network namespace (`ip netns`) to run the agent, and so its rank
    /// workers, in; `None` runs it in the test's own.
    pub netns: Option<String>,
}

impl AgentOptions {
    /// Serving the tiny test model from [`model_dir`], with downloads off.
    pub fn tiny_model() -> AgentOptions {
        AgentOptions {
            model_dirs: vec![model_dir()],
            offline: true,
            ..AgentOptions::default()
        }
    }

    /// Serving the real test model from [`real_model_dir`], downloads off.
    pub fn real_model() -> AgentOptions {
        AgentOptions {
            model_dirs: vec![real_model_dir()],
            offline: true,
            ..AgentOptions::default()
        }
    }
}

/// A `tandem-agent run` child process.
#[derive(Debug)]
pub struct Agent {
    process: LoggedChild,
    /// Its node name.
    pub name: String,
    /// Port of its /healthz and /metrics.
    pub metrics_port: u16,
    /// Its log file.
    pub log: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
}

impl Agent {
    /// Starts an agent named `name` with an identity of its own
    /// (`tandem-agent join`, see [`Cluster::join_node`]).
    pub fn start(cluster: &Cluster, name: &str, options: AgentOptions) -> Agent {
        let bin = agent_binary();
        let metrics_port = free_port();
        let log = repo_root()
            .join("target/agent-test-logs")
            .join(format!("{name}.log"));
        let state_dir = scratch(&format!("state-{name}"));
        // The agent refuses a state directory others may write (a umask of
        // 002 would make one).
        std::fs::set_permissions(
            &state_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("a private state directory");
        // `ip netns exec` enters the namespace and execs the agent, so the
        // child's pid is the agent's.
        let mut cmd = match &options.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        let advertise = options.advertise_address.as_deref().unwrap_or("127.0.0.1");
        let kubeconfig = cluster
            .join_node(name, advertise)
            .unwrap_or_else(|e| panic!("joining node {name}: {e:#}"));
        let barrier = options.barrier_timeout_seconds.unwrap_or(60).to_string();
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", name])
            .args(["--advertise-address", advertise])
            .args(["--metrics-address", &format!("127.0.0.1:{metrics_port}")])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--barrier-timeout-seconds", &barrier])
            .args(["--max-restart-backoff-seconds", "2"])
            .env("RUST_LOG", "info");
        for label in &options.labels {
            cmd.args(["--label", label]);
        }
        for dir in &options.model_dirs {
            cmd.arg("--model-dir").arg(dir);
        }
        if let Some(dir) = &options.download_dir {
            cmd.arg("--download-dir").arg(dir);
        }
        if options.offline {
            cmd.arg("--offline");
        }
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        cmd.args(&options.args);
        Agent {
            process: LoggedChild::spawn(&mut cmd, &log),
            name: name.to_owned(),
            metrics_port,
            log,
            state_dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM and waits for the exit (up to `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.process.terminate(timeout)
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// GET on the agent's health port.
    pub fn get(&self, path: &str) -> anyhow::Result<Response> {
        request(self.metrics_port, "GET", path, &[], None)
    }

    /// The agent's rank workers (child processes running `worker`).
    pub fn workers(&self) -> Vec<u32> {
        children_running(self.process.pid(), "worker")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Politely first, so it releases its shards; if it is still there,
        // its process is killed as it drops.
        if self.running() {
            let _ = self.terminate(Duration::from_secs(20));
        }
    }
}

/// A group's layout: nodes and ports per rank.
#[derive(Debug, Clone)]
pub struct Group {
    /// Deployment name.
    pub deployment: String,
    /// Epoch.
    pub epoch: i64,
    /// Node of each rank.
    pub nodes: Vec<String>,
    /// Ring port of each rank.
    pub ring_ports: Vec<u16>,
    /// Ring IP address of each rank [default: 127.0.0.1].
    pub ring_hosts: Vec<String>,
    /// Rank 0's control port.
    pub control_port: u16,
    /// The IP address of rank 0's control service [default: 127.0.0.1].
    pub control_host: String,
    /// Rank 0's HTTP port.
    pub serving_port: u16,
    /// Model ID.
    pub model: String,
    /// Group-token Secret name.
    pub token_secret: String,
    /// API key Secret, if any.
    pub api_key_secret: Option<String>,
    /// The API key in it, whose digest goes into the group-token Secret as
    /// the operator puts it there.
    pub api_key: Option<String>,
    /// Context limit.
    pub max_context_tokens: u32,
    /// Batch limits written on every shard; `None` leaves them to the
    /// agents' flags, as for a shard an older operator wrote.
    pub batching: Option<BatchLimits>,
}

impl Group {
    /// A group over `nodes` with fresh ports.
    pub fn new(deployment: &str, epoch: i64, nodes: &[String]) -> Group {
        let ports = free_ports(nodes.len() + 2);
        Group {
            deployment: deployment.to_owned(),
            epoch,
            nodes: nodes.to_vec(),
            ring_ports: ports[..nodes.len()].to_vec(),
            ring_hosts: vec!["127.0.0.1".to_owned(); nodes.len()],
            control_port: ports[nodes.len()],
            control_host: "127.0.0.1".to_owned(),
            serving_port: ports[nodes.len() + 1],
            model: MODEL.to_owned(),
            token_secret: format!("{deployment}-group-token"),
            api_key_secret: None,
            api_key: None,
            max_context_tokens: 512,
            batching: None,
        }
    }

    /// The name the operator gives rank `rank`'s shard.
    pub fn shard_name(&self, rank: usize) -> String {
        format!("{}-e{}-r{rank}", self.deployment, self.epoch)
    }

    /// Rank `rank`'s LlamaShard, as the operator writes it.
    pub fn shard(&self, namespace: &str, rank: usize) -> LlamaShard {
        let world = self.nodes.len();
        let peers = (0..world)
            .map(|r| Peer {
                rank: r as i32,
                node: self.nodes[r].clone(),
                address: format!("{}:{}", self.ring_hosts[r], self.ring_ports[r]),
            })
            .collect();
        let mut shard = LlamaShard::new(
            &self.shard_name(rank),
            LlamaShardSpec {
                deployment: self.deployment.clone(),
                epoch: self.epoch,
                rank: rank as i32,
                world_size: world as i32,
                node_name: self.nodes[rank].clone(),
                model: self.model.clone(),
                revision: None,
                architecture: tiny_architecture(),
                backend: Backend::Ring,
                peers,
                control_address: format!("{}:{}", self.control_host, self.control_port),
                serving_port: (rank == 0).then_some(i32::from(self.serving_port)),
                group_token_secret_ref: SecretKeyRef {
                    name: self.token_secret.clone(),
                    key: Some("token".into()),
                },
                api_key_secret_ref: if rank == 0 {
                    self.api_key_secret.as_ref().map(|name| SecretKeyRef {
                        name: name.clone(),
                        key: None,
                    })
                } else {
                    None
                },
                // The agent suites drive rank 0 with plain HTTP clients; the
                // TLS path is the user stories' (the operator issues it).
                tls_secret_ref: None,
                max_context_tokens: self.max_context_tokens,
                batching: self.batching,
            },
        );
        shard.metadata.namespace = Some(namespace.to_owned());
        shard.metadata.labels = Some(BTreeMap::from([
            (LABEL_DEPLOYMENT.to_owned(), self.deployment.clone()),
            (LABEL_NODE.to_owned(), label_value(&self.nodes[rank])),
            (LABEL_EPOCH.to_owned(), self.epoch.to_string()),
        ]));
        shard
    }

    /// Writes the token Secret (a new epoch of the same deployment gets a
    /// new token in the same Secret), each node's rights to its shards and
    /// the Secret, and every shard, as the operator would.
    pub async fn create(&self, admin: &Client, namespace: &str, token: &str) -> anyhow::Result<()> {
        let mut data =
            BTreeMap::from([("token".to_owned(), ByteString(token.as_bytes().to_vec()))]);
        if let Some(key) = &self.api_key {
            data.insert(
                API_KEY_DIGEST_KEY.to_owned(),
                ByteString(api_key_digest(key).into_bytes()),
            );
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.token_secret.clone()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        };
        Api::<Secret>::namespaced(admin.clone(), namespace)
            .patch(
                &self.token_secret,
                &PatchParams::apply("tandem-tests").force(),
                &Patch::Apply(&secret),
            )
            .await
            .with_context(|| format!("applying Secret {}", self.token_secret))?;
        self.grant(admin, namespace).await?;
        let api: Api<LlamaShard> = Api::namespaced(admin.clone(), namespace);
        for rank in 0..self.nodes.len() {
            api.create(&PostParams::default(), &self.shard(namespace, rank))
                .await
                .with_context(|| format!("creating shard {}", self.shard_name(rank)))?;
        }
        Ok(())
    }

    /// Gives each node the per-node Role the operator keeps: its shards'
    /// status and the deployment's Secrets ([`tandem_crds::NodeAccess`]).
    /// Unlike the operator, which deletes an older epoch's shards as it
    /// writes a new one, tests keep several epochs alive at once, so the
    /// shards already granted stay granted.
    pub async fn grant(&self, admin: &Client, namespace: &str) -> anyhow::Result<()> {
        let names: Vec<String> = (0..self.nodes.len()).map(|r| self.shard_name(r)).collect();
        let mut accesses = node_accesses(
            namespace,
            &self.deployment,
            names
                .iter()
                .map(String::as_str)
                .zip(self.nodes.iter().map(String::as_str)),
        );
        let roles: Api<Role> = Api::namespaced(admin.clone(), namespace);
        let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), namespace);
        let params = PatchParams::apply("tandem-tests").force();
        for access in &mut accesses {
            let existing = roles
                .get_opt(&node_access_name(&access.node, &access.deployment))
                .await?;
            let granted = existing
                .and_then(|r| r.rules)
                .and_then(|rules| rules.into_iter().next())
                .and_then(|rule| rule.resource_names)
                .unwrap_or_default();
            access.shards.extend(granted);
            access.shards.sort();
            access.shards.dedup();
            let role = access.role(None);
            let name = role.name_any();
            roles
                .patch(&name, &params, &Patch::Apply(&role))
                .await
                .with_context(|| format!("applying Role {name}"))?;
            bindings
                .patch(
                    &name,
                    &params,
                    &Patch::Apply(&access.role_binding(SYSTEM_NAMESPACE, None)),
                )
                .await
                .with_context(|| format!("applying RoleBinding {name}"))?;
        }
        Ok(())
    }

    /// Waits until every shard is Ready.
    pub async fn wait_ready(&self, admin: &Client, namespace: &str) -> anyhow::Result<()> {
        for rank in 0..self.nodes.len() {
            wait_phase(
                admin,
                namespace,
                &self.shard_name(rank),
                ShardPhase::Ready,
                WAIT,
            )
            .await?;
        }
        Ok(())
    }
}

/// Creates a Secret with one key.
pub async fn create_secret(
    admin: &Client,
    namespace: &str,
    name: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating Secret {name}"))?;
    Ok(())
}

/// The shard's status, if it has one.
pub async fn shard_status(
    admin: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<LlamaShardStatus>> {
    let api: Api<LlamaShard> = Api::namespaced(admin.clone(), namespace);
    Ok(api.get_opt(name).await?.and_then(|s| s.status))
}

/// Waits until the shard's phase is `phase`; fails early on an unexpected
/// `Failed` (with its reason) unless `Failed` is what is awaited.
pub async fn wait_phase(
    admin: &Client,
    namespace: &str,
    name: &str,
    phase: ShardPhase,
    timeout: Duration,
) -> anyhow::Result<LlamaShardStatus> {
    eventually(
        &format!("shard {name} to be {phase:?}"),
        timeout,
        || async {
            let status = shard_status(admin, namespace, name).await?;
            match status {
                Some(s) if s.phase == Some(phase) => Ok(Some(s)),
                Some(s) if s.phase == Some(ShardPhase::Failed) && phase != ShardPhase::Failed => {
                    // Transient failures are retried by the agent; report the
                    // latest reason if the wait times out.
                    anyhow::bail!("shard is Failed: {:?}: {:?}", s.reason, s.message)
                }
                _ => Ok(None),
            }
        },
    )
    .await
}

/// The LlamaNode, if registered.
pub async fn node(admin: &Client, name: &str) -> anyhow::Result<Option<LlamaNode>> {
    Ok(Api::<LlamaNode>::all(admin.clone()).get_opt(name).await?)
}

/// The Ready condition of a LlamaNode.
pub fn node_ready(node: &LlamaNode) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// The names of the shards a LlamaNode reports.
pub fn node_shard_names(node: &LlamaNode) -> Vec<String> {
    node.status
        .as_ref()
        .map(|s| s.shards.iter().map(|e| e.name.clone()).collect())
        .unwrap_or_default()
}

/// Deletes a shard.
pub async fn delete_shard(admin: &Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    Api::<LlamaShard>::namespaced(admin.clone(), namespace)
        .delete(name, &Default::default())
        .await?;
    Ok(())
}
