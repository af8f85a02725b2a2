//! `tandem-agent join NODE`: gives one machine its own identity in the
//! cluster, run once per Mac by an admin (with an admin kubeconfig).
//!
//! It creates the node's ServiceAccount (`tandem-node-<node>`) and a token
//! Secret for it, the node's fixed rights (its own LlamaNode and Lease, and
//! the chart's `tandem-agent` ClusterRole; see [`tandem_crds::node_identity`]),
//! the LlamaNode and the Lease themselves (RBAC cannot limit `create` to a
//! name, so the agent never gets `create`), then waits for the token and
//! writes a kubeconfig for the agent. Rights to shards and Secrets come later,
//! from the operator, for the deployments placed on the node. Running it again
//! brings the rights up to date and writes a fresh kubeconfig with the same
//! token.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_crds::{
    AGENT_CLUSTER_ROLE, DEFAULT_LEASE_NAMESPACE, LABEL_NODE, LABEL_NODE_ACCESS, LlamaNode,
    LlamaNodeSpec, label_value, node_identity, node_service_account,
};

/// Field manager of what `join` applies.
const MANAGER: &str = "tandem-join";
/// The operator's leader-election Lease as the chart names it, in the same
/// namespace as node Leases.
const LEADER_ELECTION_LEASE: &str = "tandem-operator";

/// Arguments of `tandem-agent join`.
#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// Name of the node (the LlamaNode the agent will run as; `--node-name`
    /// of `tandem-agent run`).
    pub node: String,
    /// The address other machines reach this node on (`--advertise-address`
    /// of `tandem-agent run`, which keeps it current).
    #[arg(long)]
    pub address: IpAddr,
    /// An admin's kubeconfig (default: `$KUBECONFIG`, then `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the release: the node's ServiceAccount and Lease go there.
    #[arg(long, default_value = DEFAULT_LEASE_NAMESPACE)]
    pub namespace: String,
    /// Where to write the agent's kubeconfig (mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// API server URL written into the agent's kubeconfig (default: the one
    /// the admin kubeconfig uses).
    #[arg(long)]
    pub server: Option<String>,
    /// The chart's agent ClusterRole (`<release>-agent`), bound to the node.
    #[arg(long, default_value = AGENT_CLUSTER_ROLE)]
    pub agent_cluster_role: String,
    /// How long to wait for the token controller to issue the token.
    #[arg(long, default_value_t = 60)]
    pub timeout_seconds: u64,
}

async fn apply<K>(api: &Api<K>, object: &K) -> anyhow::Result<()>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("applying {} {name}", K::kind(&K::DynamicType::default())))?;
    Ok(())
}

/// Creates `object` unless one of its name exists (which is left as it is).
async fn create_absent<K>(api: &Api<K>, object: &K) -> anyhow::Result<bool>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = object.name_any();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating {kind} {name}")),
    }
}

/// Runs `tandem-agent join`.
pub async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let config = tandem_crds::api_config(args.kubeconfig.as_deref())
        .await
        .map_err(anyhow::Error::msg)?;
    let server = args.server.clone().unwrap_or_else(|| {
        config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned()
    });
    let client = kube::Client::try_from(config)?;
    let node = &args.node;
    let ns = &args.namespace;
    let account = node_service_account(node);
    let labels = std::collections::BTreeMap::from([
        (LABEL_NODE_ACCESS.to_owned(), "true".to_owned()),
        (LABEL_NODE.to_owned(), label_value(node)),
    ]);

    // A Lease of that name held by someone else (the operator's leader
    // election Lease, say) must not become this node's to renew, nor may a
    // node take the leader-election Lease's default name before the
    // operator has made it.
    if node == LEADER_ELECTION_LEASE {
        bail!(
            "{node} is the name of the operator's leader-election Lease; join this machine under \
             another node name"
        );
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    if let Some(lease) = leases.get_opt(node).await? {
        let holder = lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        if !holder.is_empty() && holder != *node {
            bail!(
                "Lease {ns}/{node} exists and is held by {holder:?}, not by a node of that name; \
                 join this machine under another node name"
            );
        }
    }
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), ns),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some(account.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        },
    )
    .await?;
    let secret_name = format!("{account}-token");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    apply(
        &secrets,
        &Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                annotations: Some(
                    [(
                        "kubernetes.io/service-account.name".to_owned(),
                        account.clone(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/service-account-token".into()),
            ..Secret::default()
        },
    )
    .await?;

    let identity = node_identity(node, ns, ns, &args.agent_cluster_role);
    apply(
        &Api::<ClusterRole>::all(client.clone()),
        &identity.cluster_role,
    )
    .await?;
    apply(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        &identity.cluster_role_binding,
    )
    .await?;
    apply(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        &identity.agent_binding,
    )
    .await?;
    apply(
        &Api::<Role>::namespaced(client.clone(), ns),
        &identity.lease_role,
    )
    .await?;
    apply(
        &Api::<RoleBinding>::namespaced(client.clone(), ns),
        &identity.lease_role_binding,
    )
    .await?;

    let created_node = create_absent(
        &Api::<LlamaNode>::all(client.clone()),
        &LlamaNode::new(
            node,
            LlamaNodeSpec {
                address: args.address.to_string(),
                unschedulable: false,
            },
        ),
    )
    .await?;
    create_absent(
        &leases,
        &Lease {
            metadata: ObjectMeta {
                name: Some(node.clone()),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.clone()),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
        },
    )
    .await?;

    let (token, ca) = wait_for_token(
        &secrets,
        &secret_name,
        Duration::from_secs(args.timeout_seconds),
    )
    .await?;
    write_kubeconfig(&args.out, &server, &account, &token, &ca)?;
    eprintln!(
        "node {node} joined as ServiceAccount {ns}/{account}{}; its kubeconfig is {}",
        if created_node {
            " (LlamaNode created)"
        } else {
            ""
        },
        args.out.display()
    );
    Ok(())
}

/// Waits until the token controller has filled in the token Secret; returns
/// the token and the cluster's CA certificate.
async fn wait_for_token(
    api: &Api<Secret>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<(String, ByteString)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(secret) = api.get_opt(name).await? {
            let data = secret.data.unwrap_or_default();
            if let (Some(token), Some(ca)) = (data.get("token"), data.get("ca.crt")) {
                let token = String::from_utf8(token.0.clone())
                    .context("the ServiceAccount token is not UTF-8")?;
                return Ok((token, ca.clone()));
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "Secret {name} got no token and ca.crt within {}s: is the ServiceAccount token \
                 controller running (kube-controller-manager with --root-ca-file)?",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes a kubeconfig with the node's token, readable by its owner only.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    account: &str,
    token: &str,
    ca: &ByteString,
) -> anyhow::Result<()> {
    // ByteString serializes as base64, which is what the field wants.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tandem", "cluster": {
            "server": server,
            "certificate-authority-data": ca,
        }}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "tandem", "context": {"cluster": "tandem", "user": account}}],
        "current-context": "tandem",
    });
    let text = serde_yaml::to_string(&config)?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
