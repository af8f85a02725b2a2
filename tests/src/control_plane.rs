//! The local control plane every suite talks to, and who a test is on it.
//!
//! [`cluster`] starts the local control plane (`dev/cluster.sh up`: etcd,
//! kube-apiserver and kube-controller-manager built from source) once per
//! test process, or reuses the one already running, then installs the CRDs
//! and the Helm chart (`helm upgrade --install`), whose ServiceAccount and
//! RBAC are the operator's identity in every suite; agents join as nodes of
//! their own ([`Cluster::join_node`], `tandem-agent join`). [`TestNamespace`]
//! gives each test a namespace of its own that is deleted when the test ends,
//! passed or failed; namespaces left behind by a killed test process are
//! swept the next time a run starts.
//!
//! The control plane lives in `$TANDEM_CLUSTER_DIR` (default
//! `target/tandem-cluster`) and outlives a single `cargo test`: the README's
//! test command stops it at the end (`dev/cluster.sh down`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::Context;

use crate::process::{check_output, run_checked, workspace_binary};
use crate::repo_root;

/// Label put on every namespace a test creates, holding the test process id.
pub const TEST_PID_LABEL: &str = "tandem.dev/test-pid";
/// Namespace the chart installs into, and where node Leases live.
pub const SYSTEM_NAMESPACE: &str = "tandem-system";

/// The identities the control plane issues credentials for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// `system:masters`: the test itself, playing the cluster admin.
    Admin,
    /// The chart's `tandem-operator` ServiceAccount, bound by the chart's RBAC.
    Operator,
}

impl Identity {
    fn kubeconfig_file(self) -> &'static str {
        match self {
            Identity::Admin => "admin.kubeconfig",
            Identity::Operator => "operator.kubeconfig",
        }
    }
}

/// A running local control plane with the CRDs and RBAC installed.
#[derive(Debug)]
pub struct Cluster {
    state_dir: PathBuf,
    bin_dir: PathBuf,
    helm: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The shared control plane, started (or reused) on first use.
///
/// Panics with the failing step and its log when the control plane cannot be
/// brought up: no test can run without it.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| match Cluster::start() {
        Ok(c) => c,
        Err(e) => panic!("local control plane unavailable: {e:#}"),
    })
}

static NODE_CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The state directory of the control plane with a node:
/// `$TANDEM_NODE_CLUSTER_DIR`, else `<repo>/target/tandem-node-cluster`.
pub fn node_cluster_dir() -> PathBuf {
    std::env::var_os("TANDEM_NODE_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tandem-node-cluster"))
}

/// A control plane of its own with a real node (`dev/cluster.sh up
/// --with-node`: kube-scheduler, containerd, a kubelet, the operator image
/// imported), started (or reused) on first use, with the CRDs installed and
/// no release: the suites that run the chart's pods install it themselves.
///
/// It is apart from [`cluster`]'s, whose release must never get pods: the
/// other suites run their own operators off-cluster. `dev/test.sh` stops it
/// at the end (`TANDEM_CLUSTER_DIR=target/tandem-node-cluster dev/cluster.sh down`).
pub fn node_cluster() -> &'static Cluster {
    NODE_CLUSTER.get_or_init(|| match Cluster::start_with_node() {
        Ok(c) => c,
        Err(e) => panic!("local control plane with a node unavailable: {e:#}"),
    })
}

impl Cluster {
    fn start_with_node() -> anyhow::Result<Cluster> {
        let state_dir = node_cluster_dir();
        cluster_sh(&state_dir, &["up", "--with-node"])?;
        // A reused node may hold an older build of the image.
        cluster_sh(&state_dir, &["load-image"])?;
        let bin_dir = PathBuf::from(cluster_sh(&state_dir, &["bin-dir"])?);
        let helm = helm_binary()?;
        let cluster = Cluster {
            state_dir,
            bin_dir,
            helm,
        };
        cluster.install_crds()?;
        cluster.sweep_stale_namespaces()?;
        Ok(cluster)
    }

    /// The state directory (kubeconfigs, logs, `ports.env`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A value of the state directory's `ports.env` (`APISERVER_PORT`, …).
    pub fn port(&self, name: &str) -> anyhow::Result<u16> {
        let text = std::fs::read_to_string(self.state_dir.join("ports.env"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("no {name} in ports.env"))?
            .trim()
            .parse()
            .with_context(|| format!("{name} in ports.env"))
    }

    fn start() -> anyhow::Result<Cluster> {
        let state_dir = std::env::var_os("TANDEM_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/tandem-cluster"));
        cluster_sh(&state_dir, &["up"])?;
        let bin_dir = PathBuf::from(cluster_sh(&state_dir, &["bin-dir"])?);
        let helm = helm_binary()?;
        let cluster = Cluster {
            state_dir,
            bin_dir,
            helm,
        };
        cluster.install_crds()?;
        cluster.install_chart()?;
        cluster.sweep_stale_namespaces()?;
        Ok(cluster)
    }

    /// Applies the generated CRDs with server-side apply and waits until
    /// the API server serves them.
    fn install_crds(&self) -> anyhow::Result<()> {
        let dir = repo_root().join("crds");
        self.kubectl_checked(
            Identity::Admin,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=tandem-tests",
                "-f",
                &dir.to_string_lossy(),
            ],
        )?;
        self.kubectl_checked(
            Identity::Admin,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/llamadeployments.tandem.dev",
                "crd/llamashards.tandem.dev",
                "crd/llamanodes.tandem.dev",
            ],
        )?;
        Ok(())
    }

    /// Installs (or upgrades) the chart as release `tandem` in the system
    /// namespace, so the operator and agent identities have exactly the
    /// chart's rights. A file lock keeps concurrent test processes from
    /// racing on the release.
    fn install_chart(&self) -> anyhow::Result<()> {
        let chart = repo_root().join("charts/tandem");
        let lock = self.state_dir.join(".helm.lock");
        let mut cmd = Command::new("flock");
        cmd.arg(&lock)
            .arg(&self.helm)
            .args(["upgrade", "--install", "tandem"])
            .arg(&chart)
            .args(["--namespace", SYSTEM_NAMESPACE, "--kubeconfig"])
            .arg(self.kubeconfig(Identity::Admin));
        run_checked(&mut cmd, "helm upgrade --install tandem charts/tandem")?;
        Ok(())
    }

    /// Renders the chart into the system namespace with extra `helm template` arguments.
    pub fn helm_template(&self, extra: &[&str]) -> anyhow::Result<String> {
        let chart = repo_root().join("charts/tandem");
        let mut cmd = Command::new(&self.helm);
        cmd.args(["template", "tandem"])
            .arg(&chart)
            .args(["--namespace", SYSTEM_NAMESPACE])
            .args(extra);
        let out = run_checked(&mut cmd, "helm template")?;
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Deletes test namespaces whose creating process no longer exists.
    fn sweep_stale_namespaces(&self) -> anyhow::Result<()> {
        let out = self.kubectl_checked(
            Identity::Admin,
            &[
                "get",
                "namespaces",
                "-l",
                TEST_PID_LABEL,
                "-o",
                &format!(
                    "jsonpath={{range .items[*]}}{{.metadata.name}} {{.metadata.labels.{}}}{{\"\\n\"}}{{end}}",
                    TEST_PID_LABEL.replace('.', "\\.")
                ),
            ],
        )?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(pid)) = (parts.next(), parts.next()) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = self.kubectl(
                    Identity::Admin,
                    &["delete", "namespace", name, "--wait=false"],
                );
            }
        }
        Ok(())
    }

    /// Path of the kubeconfig for an identity.
    pub fn kubeconfig(&self, identity: Identity) -> PathBuf {
        self.state_dir.join(identity.kubeconfig_file())
    }

    /// Gives `node` its own identity the way a user joins a Mac:
    /// `tandem-agent join NODE --address ADDRESS` as the admin. Returns the
    /// path of the agent kubeconfig it wrote (one per node, reused by a
    /// second join of the same node).
    pub fn join_node(&self, node: &str, address: &str) -> anyhow::Result<PathBuf> {
        let dir = self.state_dir.join("nodes");
        std::fs::create_dir_all(&dir)?;
        let out = dir.join(format!("{node}.kubeconfig"));
        let mut cmd = Command::new(workspace_binary("tandem-agent"));
        cmd.args([
            "join",
            node,
            "--address",
            address,
            "--namespace",
            SYSTEM_NAMESPACE,
        ])
        .arg("--kubeconfig")
        .arg(self.kubeconfig(Identity::Admin))
        .arg("--out")
        .arg(&out);
        run_checked(&mut cmd, &format!("tandem-agent join {node}"))?;
        Ok(out)
    }

    /// A client acting as `node`'s agent, joined first (see [`Cluster::join_node`]).
    pub async fn node_client(&self, node: &str, address: &str) -> anyhow::Result<kube::Client> {
        let path = self.join_node(node, address)?;
        client_from(&path).await
    }

    /// Removes what [`Cluster::join_node`] made for `node` (its identity,
    /// its rights, its LlamaNode and Lease), as the admin; for clean-up, so
    /// errors are ignored.
    pub fn forget_node(&self, node: &str) {
        let account = tandem_crds::node_service_account(node);
        let role = tandem_crds::node_role_name(node);
        let agent_binding = tandem_crds::node_identity(
            node,
            SYSTEM_NAMESPACE,
            SYSTEM_NAMESPACE,
            tandem_crds::AGENT_CLUSTER_ROLE,
        )
        .agent_binding
        .metadata
        .name
        .unwrap_or_default();
        let token = format!("{account}-token");
        let token_arg = format!("secret/{token}");
        let account_arg = format!("serviceaccount/{account}");
        let role_arg = format!("role/{role}");
        let binding_arg = format!("rolebinding/{role}");
        let lease_arg = format!("lease/{node}");
        let _ = self.kubectl(
            Identity::Admin,
            &[
                "delete",
                "-n",
                SYSTEM_NAMESPACE,
                "--ignore-not-found",
                "--wait=false",
                &account_arg,
                &token_arg,
                &role_arg,
                &binding_arg,
                &lease_arg,
            ],
        );
        let cluster_role_arg = format!("clusterrole/{role}");
        let cluster_binding_arg = format!("clusterrolebinding/{role}");
        let agent_binding_arg = format!("clusterrolebinding/{agent_binding}");
        let node_arg = format!("llamanode/{node}");
        let _ = self.kubectl(
            Identity::Admin,
            &[
                "delete",
                "--ignore-not-found",
                "--wait=false",
                &cluster_role_arg,
                &cluster_binding_arg,
                &agent_binding_arg,
                &node_arg,
            ],
        );
    }

    /// Directory with the kube-apiserver, kube-controller-manager and kubectl binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The helm binary.
    pub fn helm(&self) -> &Path {
        &self.helm
    }

    /// A client acting as `identity`.
    pub async fn client(&self, identity: Identity) -> anyhow::Result<kube::Client> {
        client_from(&self.kubeconfig(identity)).await
    }

    /// A `kubectl` command acting as `identity`, not yet run.
    pub fn kubectl_command(&self, identity: Identity) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig(identity));
        cmd
    }

    /// Runs `kubectl` as `identity` and returns its output, whatever the exit status.
    pub fn kubectl(&self, identity: Identity, args: &[&str]) -> std::io::Result<Output> {
        self.kubectl_command(identity).args(args).output()
    }

    /// Runs `kubectl` as `identity` with `input` on stdin, whatever the exit status.
    pub fn kubectl_stdin(
        &self,
        identity: Identity,
        args: &[&str],
        input: &str,
    ) -> std::io::Result<Output> {
        let mut child = self
            .kubectl_command(identity)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    }

    /// Runs `kubectl` as `identity` and fails unless it exits 0.
    pub fn kubectl_checked(&self, identity: Identity, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.kubectl(identity, args)?;
        check_output(out, &format!("kubectl {}", args.join(" ")))
    }

    /// Runs `kubectl` as `identity` with `input` on stdin and fails unless it exits 0.
    pub fn kubectl_stdin_checked(
        &self,
        identity: Identity,
        args: &[&str],
        input: &str,
    ) -> anyhow::Result<Output> {
        let out = self.kubectl_stdin(identity, args, input)?;
        check_output(out, &format!("kubectl {}", args.join(" ")))
    }

    /// Deletes Leases in [`SYSTEM_NAMESPACE`] by name, as the admin, without
    /// waiting; for clean-up code, so errors are ignored.
    pub fn delete_leases(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let mut args = vec![
            "delete",
            "lease",
            "-n",
            SYSTEM_NAMESPACE,
            "--ignore-not-found",
            "--wait=false",
        ];
        args.extend(names.iter().map(String::as_str));
        let _ = self.kubectl(Identity::Admin, &args);
    }

    /// Removes the finalizers of every LlamaDeployment in `namespace`, as
    /// the admin: for clean-up after a test whose operator is gone, so
    /// errors are ignored.
    pub fn clear_deployment_finalizers(&self, namespace: &str) {
        let Ok(out) = self.kubectl(
            Identity::Admin,
            &["get", "llamadeployments", "-n", namespace, "-o", "name"],
        ) else {
            return;
        };
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = self.kubectl(
                Identity::Admin,
                &[
                    "patch",
                    name,
                    "-n",
                    namespace,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
            );
        }
    }

    /// `dev/cluster.sh VERB apiserver` on this cluster's state directory.
    fn apiserver(&self, verb: &str) -> anyhow::Result<()> {
        cluster_sh(&self.state_dir, &[verb, "apiserver"])?;
        Ok(())
    }

    /// Stops and starts kube-apiserver, keeping etcd's data, and waits until it is ready.
    pub fn restart_apiserver(&self) -> anyhow::Result<()> {
        self.apiserver("restart")
    }

    /// Stops kube-apiserver (`dev/cluster.sh stop apiserver`) until
    /// [`start_apiserver`](Cluster::start_apiserver); a test that calls it
    /// must be a test process of its own and start it again.
    pub fn stop_apiserver(&self) -> anyhow::Result<()> {
        self.apiserver("stop")
    }

    /// Starts a stopped kube-apiserver and waits until it answers.
    pub fn start_apiserver(&self) -> anyhow::Result<()> {
        self.apiserver("start")
    }
}

/// Runs `dev/cluster.sh ARGS` on the control plane in `state_dir`; its
/// standard output, trimmed.
fn cluster_sh(state_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = run_checked(
        Command::new("bash")
            .arg(repo_root().join("dev/cluster.sh"))
            .args(args)
            .env("TANDEM_CLUSTER_DIR", state_dir),
        &format!("dev/cluster.sh {}", args.join(" ")),
    )?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The helm binary `dev/helm.sh` installs (or finds cached).
fn helm_binary() -> anyhow::Result<PathBuf> {
    let out = run_checked(
        Command::new("bash").arg(repo_root().join("dev/helm.sh")),
        "dev/helm.sh",
    )?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A client from the kubeconfig at `path`.
pub async fn client_from(path: &Path) -> anyhow::Result<kube::Client> {
    tandem_crds::api_client(Some(path))
        .await
        .map_err(anyhow::Error::msg)
}

/// A namespace of a test's own, deleted (without waiting) when dropped, so
/// it goes away after a failed test too.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    cluster: &'static Cluster,
}

impl TestNamespace {
    /// Creates `PREFIX-xxxxxx` with a random suffix.
    pub async fn new(cluster: &'static Cluster, prefix: &str) -> anyhow::Result<TestNamespace> {
        use k8s_openapi::api::core::v1::Namespace;
        use kube::api::{Api, ObjectMeta, PostParams};
        let name = unique_name(prefix);
        let client = cluster.client(Identity::Admin).await?;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_PID_LABEL.to_string(), std::process::id().to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace { name, cluster })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl(
            Identity::Admin,
            &["delete", "namespace", &self.name, "--wait=false"],
        );
    }
}

/// `prefix-` plus six random lowercase letters and digits, cut to a valid
/// DNS label.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..6)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    let mut prefix: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    prefix.truncate(50);
    format!("{}-{suffix}", prefix.trim_matches('-'))
}

/// The admin's client: the test itself, playing the cluster admin.
pub async fn admin(cluster: &Cluster) -> kube::Client {
    cluster.client(Identity::Admin).await.expect("admin client")
}
