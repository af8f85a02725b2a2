//! Shared by the agent suites: real `tandem-agent run` processes, each with
//! an identity of its own (`tandem-agent join`), the tiny test models `tandem-agent make-model`
//! writes, LlamaShards and group-token Secrets written the way the operator
//! writes them, a plain HTTP client, and a local Hugging Face hub.
//!
//! The agent binary is `$TANDEM_AGENT_BIN` when set; otherwise it is built
//! into the running test executable's target directory and profile
//! ([`workspace_binary`]).

#![allow(dead_code)]

pub mod hub;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use tandem_crds::*;
use tandem_tests::{Cluster, Identity, eventually, repo_root, workspace_binary};

/// How long a test waits for an agent to react.
pub const WAIT: Duration = Duration::from_secs(90);
/// Model ID the tests' shards name.
pub const MODEL: &str = "tandem-test/tiny-llama";

/// The tandem-agent binary; see [`tandem_tests::workspace_binary`].
pub fn agent_binary() -> PathBuf {
    workspace_binary("tandem-agent")
}

/// The Python of the venv `dev/py-client.sh` keeps, with the `openai`
/// client installed.
pub fn openai_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(repo_root().join("dev/py-client.sh"))
                .arg("python")
                .output()
                .expect("running dev/py-client.sh");
            assert!(
                out.status.success(),
                "dev/py-client.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// A free TCP port on loopback (free when asked; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `n` distinct free ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// A scratch directory under `target/agent-test-data`, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo_root().join("target/agent-test-data").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// The tiny model's shape: 4 layers, hidden 256, 8 heads, 4 KV heads, MLP
/// 512, vocabulary 512, 4-bit; it splits over 1, 2 and 4 ranks.
pub fn tiny_architecture() -> Architecture {
    Architecture {
        num_hidden_layers: 4,
        hidden_size: 256,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        intermediate_size: 512,
        vocab_size: 512,
        head_dim: None,
        tie_word_embeddings: true,
        quantization: Some(Quantization {
            bits: 4,
            group_size: 64,
        }),
        dtype: WeightDtype::BFloat16,
    }
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
    child: Child,
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
        let logs = repo_root().join("target/agent-test-logs");
        std::fs::create_dir_all(&logs).expect("log directory");
        let log = logs.join(format!("{name}.log"));
        let state_dir = scratch(&format!("state-{name}"));
        // The agent refuses a state directory others may write (a umask of
        // 002 would make one).
        std::fs::set_permissions(
            &state_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("a private state directory");
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
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
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
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
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Agent {
            child,
            name: name.to_owned(),
            metrics_port,
            log,
            state_dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit (up to `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                bail!("the agent did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the agent's health port.
    pub fn get(&self, path: &str) -> anyhow::Result<Response> {
        request(self.metrics_port, "GET", path, &[], None)
    }

    /// The agent's rank workers (child processes running `worker`).
    pub fn workers(&self) -> Vec<u32> {
        children_running(self.child.id(), "worker")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.terminate(Duration::from_secs(20));
        }
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Child processes of `parent` whose command line contains `arg`.
pub fn children_running(parent: u32, arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
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
                    &Patch::Apply(&access.role_binding(tandem_tests::SYSTEM_NAMESPACE, None)),
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

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

/// One HTTP/1.0 request to 127.0.0.1:`port` (the server closes the
/// connection after the response, so streamed bodies end at EOF).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes())?;
    }
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context(format!("no status line: {status_line:?}"))?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// POSTs JSON to rank 0's API.
pub fn post(port: u16, path: &str, body: &serde_json::Value) -> anyhow::Result<Response> {
    request(port, "POST", path, &[], Some(&body.to_string()))
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_owned())
        .collect()
}

/// The admin client.
pub async fn admin(cluster: &Cluster) -> Client {
    cluster.client(Identity::Admin).await.expect("admin client")
}

/// The name of `shard`.
pub fn name_of(shard: &LlamaShard) -> String {
    shard.name_any()
}
