//! Who may touch what: the per-node identities agents run as, and the RBAC
//! objects that confine each one to its own node.
//!
//! Both sides build these objects from here: `tandem-agent join` creates a
//! node's identity and its fixed rights (its own LlamaNode and Lease), and the
//! operator keeps, per deployment and node, a Role naming exactly the shards
//! placed on that node and the deployment's group-token and TLS Secrets. RBAC
//! cannot restrict `create` by name, so the join flow creates the LlamaNode
//! and the Lease itself and agents only ever update them.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::{GROUP, LABEL_DEPLOYMENT, LABEL_NODE, MAX_NAME, fit_name, label_value};

/// Label on every RBAC object and ServiceAccount made for a node's identity,
/// with the value `true`, so they can be listed and watched apart from others.
pub const LABEL_NODE_ACCESS: &str = "tandem.dev/node-access";
/// Prefix of a node's ServiceAccount, in the release namespace.
pub const NODE_SERVICE_ACCOUNT_PREFIX: &str = "tandem-node-";
/// The chart's ClusterRole holding what every agent may do whatever its
/// node: watch LlamaShards (it selects its own by label). The chart names it
/// `<release>-agent`; this is its name for the release `tandem`.
pub const AGENT_CLUSTER_ROLE: &str = "tandem-agent";
/// Key under which a group-token Secret holds the token.
pub const GROUP_TOKEN_KEY: &str = "token";
/// Key under which a group-token Secret holds [`api_key_digest`] of the
/// deployment's API key, when it has one. Agents never read the API-key
/// Secret itself: rank 0 checks the key clients present against this digest.
pub const API_KEY_DIGEST_KEY: &str = "api-key-sha256";

/// The lower-case hex SHA-256 of an API key, as stored under
/// [`API_KEY_DIGEST_KEY`].
pub fn api_key_digest(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Name of a deployment's group-token Secret: `<deployment>-group-token`.
pub fn group_token_secret_name(deployment: &str) -> String {
    fit_name(deployment, "-group-token", MAX_NAME)
}

/// Name of a deployment's serving-certificate Secret: `<deployment>-tls`.
pub fn tls_secret_name(deployment: &str) -> String {
    fit_name(deployment, "-tls", MAX_NAME)
}

/// The ServiceAccount a node's agent runs as: `tandem-node-<node>`.
pub fn node_service_account(node: &str) -> String {
    fit_name(
        &format!("{NODE_SERVICE_ACCOUNT_PREFIX}{node}"),
        "",
        MAX_NAME,
    )
}

/// Name of the RBAC objects of a node's fixed rights (its LlamaNode and
/// Lease): `tandem-node:<node>`. The colon keeps them apart from any
/// object a user names.
pub fn node_role_name(node: &str) -> String {
    fit_name(&format!("tandem-node:{node}"), "", MAX_NAME)
}

/// Name of the Role and RoleBinding granting a node what it needs for one
/// deployment's shards: `tandem-node:<node>:<deployment>`.
pub fn node_access_name(node: &str, deployment: &str) -> String {
    fit_name(&format!("tandem-node:{node}:{deployment}"), "", MAX_NAME)
}

fn labels(node: &str, deployment: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_NODE_ACCESS.to_owned(), "true".to_owned()),
        (LABEL_NODE.to_owned(), label_value(node)),
    ]);
    if let Some(d) = deployment {
        labels.insert(LABEL_DEPLOYMENT.to_owned(), label_value(d));
    }
    labels
}

fn rule(group: &str, resources: &[&str], verbs: &[&str], names: Vec<String>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        resource_names: Some(names),
        non_resource_urls: None,
    }
}

fn node_subject(node: &str, identity_namespace: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: node_service_account(node),
        namespace: Some(identity_namespace.to_owned()),
        api_group: None,
    }
}

/// The fixed rights of a node's identity, created by `tandem-agent join`.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Update (never create) its own LlamaNode and its status.
    pub cluster_role: ClusterRole,
    /// Binds [`NodeIdentity::cluster_role`] to the node's ServiceAccount.
    pub cluster_role_binding: ClusterRoleBinding,
    /// Binds the chart's agent ClusterRole (see [`AGENT_CLUSTER_ROLE`]) to
    /// the node's ServiceAccount.
    pub agent_binding: ClusterRoleBinding,
    /// Update (never create) its own Lease, in the Lease namespace.
    pub lease_role: Role,
    /// Binds [`NodeIdentity::lease_role`] to the node's ServiceAccount.
    pub lease_role_binding: RoleBinding,
}

/// The fixed rights of `node`, whose ServiceAccount lives in
/// `identity_namespace` and whose Lease lives in `lease_namespace`, with the
/// chart's agent ClusterRole `agent_cluster_role`.
pub fn node_identity(
    node: &str,
    identity_namespace: &str,
    lease_namespace: &str,
    agent_cluster_role: &str,
) -> NodeIdentity {
    let name = node_role_name(node);
    let meta = |namespace: Option<&str>| ObjectMeta {
        name: Some(name.clone()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(node, None)),
        ..ObjectMeta::default()
    };
    let subject = node_subject(node, identity_namespace);
    let cluster_role = ClusterRole {
        metadata: meta(None),
        rules: Some(vec![
            rule(
                GROUP,
                &["llamanodes"],
                &["get", "patch", "update"],
                vec![node.to_owned()],
            ),
            rule(
                GROUP,
                &["llamanodes/status"],
                &["get", "patch", "update"],
                vec![node.to_owned()],
            ),
        ]),
        aggregation_rule: None,
    };
    let cluster_role_binding = ClusterRoleBinding {
        metadata: meta(None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: name.clone(),
        },
        subjects: Some(vec![subject.clone()]),
    };
    let agent_binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(fit_name(&name, ":agent", MAX_NAME)),
            ..meta(None)
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: agent_cluster_role.into(),
        },
        subjects: Some(vec![subject.clone()]),
    };
    let lease_role = Role {
        metadata: meta(Some(lease_namespace)),
        rules: Some(vec![rule(
            "coordination.k8s.io",
            &["leases"],
            &["get", "patch", "update"],
            vec![node.to_owned()],
        )]),
    };
    let lease_role_binding = RoleBinding {
        metadata: meta(Some(lease_namespace)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![subject]),
    };
    NodeIdentity {
        cluster_role,
        cluster_role_binding,
        agent_binding,
        lease_role,
        lease_role_binding,
    }
}

/// What a node may do for one deployment whose shards are placed on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccess {
    /// Namespace of the deployment.
    pub namespace: String,
    /// The deployment.
    pub deployment: String,
    /// The node.
    pub node: String,
    /// The deployment's shards placed on the node, sorted.
    pub shards: Vec<String>,
    /// The TLS Secret the deployment names itself (`spec.tls.secretName`);
    /// `None` for the operator's `<deployment>-tls`.
    pub tls_secret: Option<String>,
}

impl NodeAccess {
    /// The Role: status of exactly these shards, and the deployment's
    /// group-token and TLS Secrets (whether or not they exist yet; the TLS
    /// Secret is the user's own when the deployment names one). Never the
    /// API-key Secret.
    pub fn role(&self, owner: Option<&OwnerReference>) -> Role {
        Role {
            metadata: self.meta(owner),
            rules: Some(vec![
                rule(
                    GROUP,
                    &["llamashards/status"],
                    &["patch"],
                    self.shards.clone(),
                ),
                rule(
                    "",
                    &["secrets"],
                    &["get"],
                    vec![
                        group_token_secret_name(&self.deployment),
                        self.tls_secret
                            .clone()
                            .unwrap_or_else(|| tls_secret_name(&self.deployment)),
                    ],
                ),
            ]),
        }
    }

    /// The RoleBinding of [`NodeAccess::role`] to the node's ServiceAccount
    /// in `identity_namespace`.
    pub fn role_binding(
        &self,
        identity_namespace: &str,
        owner: Option<&OwnerReference>,
    ) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(owner),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: node_access_name(&self.node, &self.deployment),
            },
            subjects: Some(vec![node_subject(&self.node, identity_namespace)]),
        }
    }

    fn meta(&self, owner: Option<&OwnerReference>) -> ObjectMeta {
        ObjectMeta {
            name: Some(node_access_name(&self.node, &self.deployment)),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.node, Some(&self.deployment))),
            owner_references: owner.map(|o| vec![o.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// One [`NodeAccess`] per node that holds shards of `deployment`, from
/// `(shard name, node)` pairs.
pub fn node_accesses<'a>(
    namespace: &str,
    deployment: &str,
    shards: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<NodeAccess> {
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (shard, node) in shards {
        by_node.entry(node).or_default().push(shard.to_owned());
    }
    by_node
        .into_iter()
        .map(|(node, mut shards)| {
            shards.sort();
            shards.dedup();
            NodeAccess {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                node: node.to_owned(),
                shards,
                tls_secret: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_digests_are_sha256_in_hex() {
        assert_eq!(
            api_key_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_stay_valid_and_apart() {
        assert_eq!(node_service_account("mac-1"), "tandem-node-mac-1");
        assert_eq!(
            node_access_name("mac-1", "llama"),
            "tandem-node:mac-1:llama"
        );
        // "a-b" on "c" and "a" on "b-c" must not share a Role.
        assert_ne!(node_access_name("c", "a-b"), node_access_name("b-c", "a"));
        let long = "n".repeat(260);
        assert_eq!(node_service_account(&long).len(), MAX_NAME);
        assert_eq!(node_access_name(&long, "d").len(), MAX_NAME);
        assert_eq!(group_token_secret_name("llama"), "llama-group-token");
        assert_eq!(tls_secret_name("llama"), "llama-tls");
    }

    #[test]
    fn a_node_gets_its_shards_and_the_deployments_secrets_only() {
        let accesses = node_accesses(
            "ns",
            "llama",
            [
                ("llama-e2-r1", "b"),
                ("llama-e2-r0", "a"),
                ("llama-e2-r2", "b"),
            ],
        );
        assert_eq!(accesses.len(), 2);
        assert_eq!(accesses[1].node, "b");
        assert_eq!(accesses[1].shards, ["llama-e2-r1", "llama-e2-r2"]);
        let role = accesses[0].role(None);
        let rules = role.rules.unwrap_or_default();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["llama-e2-r0".to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["patch"]);
        assert_eq!(
            rules[1].resource_names.as_deref(),
            Some(&["llama-group-token".to_owned(), "llama-tls".to_owned()][..])
        );
        assert_eq!(rules[1].verbs, ["get"]);
        let binding = accesses[0].role_binding("tandem-system", None);
        let subject = &binding.subjects.unwrap_or_default()[0];
        assert_eq!(subject.name, "tandem-node-a");
        assert_eq!(subject.namespace.as_deref(), Some("tandem-system"));
    }

    #[test]
    fn the_fixed_rights_name_only_the_node_itself() {
        let id = node_identity(
            "mac-1",
            "tandem-system",
            "tandem-system",
            AGENT_CLUSTER_ROLE,
        );
        for rule in id.cluster_role.rules.iter().flatten() {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["mac-1".to_owned()][..])
            );
            assert!(!rule.verbs.iter().any(|v| v == "create" || v == "delete"));
        }
        let lease = &id.lease_role.rules.unwrap_or_default()[0];
        assert_eq!(
            lease.resource_names.as_deref(),
            Some(&["mac-1".to_owned()][..])
        );
        assert_eq!(id.agent_binding.role_ref.name, AGENT_CLUSTER_ROLE);
    }
}
