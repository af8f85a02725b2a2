//! The user stories' world: the real operator (chart identity, watching the
//! story's namespace) and real `tandem-agent run` processes (chart identity,
//! each its own node, labelled for the story), serving the real test model
//! (SmolLM2-135M-Instruct, 4-bit; valid world sizes 1 and 3); and what a
//! user does to them: apply, `kubectl scale`, delete, ask questions through
//! the `openai` client and check the answers.

use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tandem_crds::*;

use crate::agent::{self, Agent, AgentOptions};
use crate::http::openai_chat;
use crate::operator::{self, Operator, condition};
use crate::process::free_port;
use crate::{Identity, TestNamespace, admin, cluster, eventually};

/// How long a story waits for the system to converge (loading, group
/// formation, re-placement after a lost Lease) on a small, shared machine.
pub const WAIT: Duration = Duration::from_secs(180);
/// Lease duration of the stories' agents: short, so a killed one is
/// noticed quickly.
pub const LEASE_SECONDS: u32 = 6;

/// One story: its namespace, an operator for it, and its agents.
pub struct Story {
    /// The story's label key, `tandem.test/story`; the value is the namespace.
    pub label: (String, String),
    /// Agents by index; `None` once killed.
    pub agents: Vec<Option<Agent>>,
    /// The operator.
    pub operator: Operator,
    /// Admin client.
    pub admin: Client,
    /// The agents' Lease duration in seconds.
    pub lease_seconds: u32,
    /// More flags for every agent.
    pub agent_args: Vec<String>,
    /// The namespace (deleted last).
    pub ns: TestNamespace,
}

// A kube::Client has no Debug.
impl std::fmt::Debug for Story {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Story")
            .field("ns", &self.ns)
            .field("agents", &self.agents)
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

/// Ports below Linux's ephemeral range, 20 per agent, distinct for every
/// agent of this test process (and, by the process id, likely distinct
/// from a parallel run's).
fn port_range() -> String {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    let base = 20_000 + (std::process::id() % 40) as u16 * 300 + slot * 20;
    format!("{base}-{}", base + 19)
}

impl Story {
    /// A namespace `story-<name>-xxxxxx`, its operator, and `agents` agents
    /// with [`LEASE_SECONDS`] Leases.
    pub async fn new(name: &str, agents: usize) -> Story {
        Story::with_lease(name, agents, LEASE_SECONDS).await
    }

    /// As [`Story::new`], with Leases of `lease_seconds`.
    pub async fn with_lease(name: &str, agents: usize, lease_seconds: u32) -> Story {
        Story::with_agent_args(name, agents, lease_seconds, &[]).await
    }

    /// As [`Story::with_lease`], every agent started with `agent_args` too.
    pub async fn with_agent_args(
        name: &str,
        agents: usize,
        lease_seconds: u32,
        agent_args: &[&str],
    ) -> Story {
        let cluster = cluster();
        let ns = TestNamespace::new(cluster, &format!("story-{name}"))
            .await
            .expect("story namespace");
        let admin = admin(cluster).await;
        let operator = Operator::start(cluster, ns.name(), "story", &[]);
        let mut story = Story {
            label: ("tandem.test/story".to_owned(), ns.name().to_owned()),
            agents: Vec::new(),
            operator,
            admin,
            lease_seconds,
            agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
            ns,
        };
        for _ in 0..agents {
            story.start_agent();
        }
        story.wait_nodes_ready().await;
        story
    }

    /// The namespace.
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    fn agent_name(&self, index: usize) -> String {
        format!("{}-a{index}", self.ns())
    }

    /// Starts agent `index` (a new one at the end when `index` is past the
    /// end), with its own node name, port range and the story's label.
    pub fn start_agent(&mut self) -> usize {
        let index = self.agents.len();
        self.agents.push(None);
        self.restart_agent(index);
        index
    }

    /// (Re)starts agent `index` under its old node name.
    pub fn restart_agent(&mut self, index: usize) {
        let mut args = vec![
            "--port-range".into(),
            port_range(),
            "--lease-duration-seconds".into(),
            self.lease_seconds.to_string(),
        ];
        args.extend(self.agent_args.iter().cloned());
        let agent = Agent::start(
            cluster(),
            &self.agent_name(index),
            AgentOptions {
                labels: vec![format!("{}={}", self.label.0, self.label.1)],
                args,
                ..AgentOptions::real_model()
            },
        );
        self.agents[index] = Some(agent);
    }

    /// Waits until every running agent's LlamaNode is Ready.
    pub async fn wait_nodes_ready(&self) {
        let names: Vec<String> = self
            .agents
            .iter()
            .flatten()
            .map(|a| a.name.clone())
            .collect();
        let admin = &self.admin;
        for name in &names {
            eventually(&format!("node {name} Ready"), WAIT, || async move {
                Ok(agent::node(admin, name)
                    .await?
                    .filter(|n| agent::node_ready(n).as_deref() == Some("True")))
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    /// The agent running node `node`.
    pub fn agent_on(&self, node: &str) -> Option<usize> {
        self.agents
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.name == node))
    }

    /// kill -9 of agent `index`, as if its machine lost power; its rank
    /// workers go with it.
    pub fn kill_agent(&mut self, index: usize) {
        let agent = self.agents[index].take().expect("a running agent");
        let workers = agent.workers();
        Command::new("kill")
            .args(["-KILL", &agent.pid().to_string()])
            .status()
            .expect("kill");
        for w in workers {
            let _ = Command::new("kill")
                .args(["-KILL", &w.to_string()])
                .status();
        }
        drop(agent);
    }

    /// The real model's deployment (a catalog model: no architecture):
    /// `world` ranks on the story's nodes, serving on a free port.
    pub fn deployment(&self, name: &str, world: i32) -> LlamaDeployment {
        let mut d = LlamaDeployment::new(
            name,
            LlamaDeploymentSpec {
                model: agent::REAL_MODEL.into(),
                revision: None,
                sharding: Sharding {
                    strategy: ShardingStrategy::Tensor,
                    world_size: world,
                },
                placement: Some(Placement {
                    node_selector: Some(
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                            match_labels: Some([self.label.clone()].into()),
                            match_expressions: None,
                        },
                    ),
                }),
                backend: Backend::Ring,
                max_context_tokens: 512,
                serving: Some(Serving {
                    port: i32::from(free_port()),
                    ..Serving::default()
                }),
                architecture: None,
                // TLS on, as by default: the stories reach rank 0 over
                // HTTPS with the CA in status.caBundle.
                tls: None,
            },
        );
        d.metadata.namespace = Some(self.ns().to_owned());
        d
    }

    /// The story's deployments, as the admin.
    pub fn deployments(&self) -> Api<LlamaDeployment> {
        Api::namespaced(self.admin.clone(), self.ns())
    }

    /// `kubectl apply -f -` of `d` as the admin, as a user would.
    pub fn apply(&self, d: &LlamaDeployment) {
        let yaml = serde_yaml::to_string(d).expect("yaml");
        cluster()
            .kubectl_stdin_checked(Identity::Admin, &["apply", "-f", "-"], &yaml)
            .unwrap_or_else(|e| panic!("kubectl apply: {e:#}"));
    }

    /// `kubectl scale llama NAME --replicas=N`.
    pub fn scale(&self, name: &str, replicas: i32) {
        cluster()
            .kubectl_checked(
                Identity::Admin,
                &[
                    "scale",
                    "-n",
                    self.ns(),
                    "llama",
                    name,
                    &format!("--replicas={replicas}"),
                ],
            )
            .unwrap_or_else(|e| panic!("kubectl scale: {e:#}"));
    }

    /// The deployment's status once `check` accepts it; on a timeout, the
    /// failure shows the last status and the operator's log.
    pub async fn status(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&LlamaDeploymentStatus) -> bool,
    ) -> LlamaDeploymentStatus {
        let result = operator::wait_status(&self.admin, self.ns(), name, what, WAIT, check).await;
        match result {
            Ok(s) => s,
            Err(e) => {
                let last = self
                    .deployments()
                    .get(name)
                    .await
                    .ok()
                    .and_then(|d| d.status);
                panic!(
                    "{e:#}\nlast status: {last:#?}\noperator log:\n{}",
                    self.operator.log_tail()
                )
            }
        }
    }

    /// Waits until `name` serves `world` ranks in an epoch after `after`.
    pub async fn serving(&self, name: &str, world: i32, after: i64) -> LlamaDeploymentStatus {
        self.status(
            name,
            &format!("Serving {world}/{world} after epoch {after}"),
            |s| {
                s.phase == Some(DeploymentPhase::Serving)
                    && s.epoch > after
                    && s.ready_ranks == world
                    && s.world_size == world
                    && s.endpoint.is_some()
            },
        )
        .await
    }

    /// The deployment's shards (every epoch).
    pub async fn shards(&self, deployment: &str) -> Vec<LlamaShard> {
        Api::<LlamaShard>::namespaced(self.admin.clone(), self.ns())
            .list(&ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={deployment}")))
            .await
            .expect("listing shards")
            .items
    }

    /// One key of a Secret in the story's namespace, as text.
    pub async fn secret_text(&self, name: &str, key: &str) -> String {
        let secret =
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(self.admin.clone(), self.ns())
                .get(name)
                .await
                .unwrap_or_else(|e| panic!("Secret {name}: {e}"));
        let bytes = secret
            .data
            .and_then(|d| d.get(key).cloned())
            .unwrap_or_else(|| panic!("Secret {name} has no {key}"));
        String::from_utf8(bytes.0).expect("UTF-8")
    }

    /// Names of the shards a node's agent reports running.
    pub async fn running_on(&self, node: &str) -> Vec<String> {
        agent::node(&self.admin, node)
            .await
            .expect("node")
            .map(|n| agent::node_shard_names(&n))
            .unwrap_or_default()
    }

    /// Waits for an Event with `reason` about `name`; returns its note.
    pub async fn event(&self, name: &str, reason: &str) -> String {
        operator::wait_event(&self.admin, self.ns(), name, reason)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates the deployment with the admin client (for specs kubectl
    /// would accept as well).
    pub async fn create(&self, d: &LlamaDeployment) {
        self.deployments()
            .create(&PostParams::default(), d)
            .await
            .expect("creating the deployment");
    }
}

impl Drop for Story {
    fn drop(&mut self) {
        // The operator first: running on, it would put back the finalizers
        // removed below. Then the agents (they release their shards and stop
        // renewing), then what they leave in the cluster scope and the
        // system namespace.
        let _ = self.operator.terminate();
        let names: Vec<String> = (0..self.agents.len()).map(|i| self.agent_name(i)).collect();
        self.agents.clear();
        let c = cluster();
        let ns = self.ns().to_owned();
        c.clear_deployment_finalizers(&ns);
        let mut args = vec!["delete", "lnode", "--ignore-not-found", "--wait=false"];
        args.extend(names.iter().map(String::as_str));
        let _ = c.kubectl(Identity::Admin, &args);
        let mut leases = names;
        leases.push(format!("op-{ns}"));
        c.delete_leases(&leases);
    }
}

/// The deployment's endpoint, checked to answer a chat through the openai
/// client with the CA of `status.caBundle`; retried briefly, since Serving
/// is reported as rank 0 starts listening.
pub async fn chat(status: &LlamaDeploymentStatus, question: &str) -> (String, u64) {
    let endpoint = status.endpoint.clone().expect("an endpoint");
    assert!(
        endpoint.starts_with("https://"),
        "TLS is on by default: {endpoint}"
    );
    let ca = status.ca_bundle.clone().expect("the CA in status.caBundle");
    let q = question.to_owned();
    eventually(
        &format!("a chat reply from {endpoint}"),
        Duration::from_secs(60),
        || {
            let (endpoint, q, ca) = (endpoint.clone(), q.clone(), ca.clone());
            async move {
                tokio::task::spawn_blocking(move || openai_chat(&endpoint, Some(&ca), &q))
                    .await?
                    .map(Some)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A question with a checkable answer, and the word the answer must hold.
pub const CAPITAL: (&str, &str) = ("What is the capital of France?", "Paris");

/// Asks `question` through [`chat`] and checks that the answer holds
/// `expected`; returns the answer.
pub async fn ask(status: &LlamaDeploymentStatus, (question, expected): (&str, &str)) -> String {
    let (answer, _) = chat(status, question).await;
    assert!(
        answer.contains(expected),
        "asked {question:?} at world size {}, expected {expected:?} in the answer {answer:?}",
        status.ranks.len()
    );
    answer
}

/// The reason of a condition, or "".
pub fn reason(s: &LlamaDeploymentStatus, type_: &str) -> String {
    condition(s, type_)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// The nodes of the status's ranks, by rank.
pub fn nodes_of(s: &LlamaDeploymentStatus) -> Vec<String> {
    let mut ranks = s.ranks.clone();
    ranks.sort_by_key(|r| r.rank);
    ranks.into_iter().map(|r| r.node).collect()
}

/// `{"model": ..}` chat body for the plain HTTP client.
pub fn chat_body(model: &str) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}
