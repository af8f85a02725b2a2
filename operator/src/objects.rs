//! The objects the operator writes, built as plain values: one LlamaShard per
//! rank of an epoch, and the per-deployment group-token and TLS Secrets. Names, labels
//! and owner references are decided here and nowhere else.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use tandem_crds::{
    LABEL_DEPLOYMENT, LABEL_EPOCH, LABEL_NODE, LlamaDeployment, LlamaShard, LlamaShardSpec, Peer,
    SecretKeyRef, SecretRef,
};
use tandem_planner::{ModelShape, Plan};

use crate::convert::serving_port;

/// Field manager of every server-side apply the operator makes.
pub const MANAGER: &str = "tandem-operator";
/// Finalizer the operator keeps on a LlamaDeployment until its shards are released.
pub const FINALIZER: &str = "tandem.dev/cleanup";
/// Annotation on the group-token Secret: the epoch its token belongs to.
pub const ANNOTATION_TOKEN_EPOCH: &str = "tandem.dev/epoch";
/// Label on the group-token Secret, so the operator can watch only its own Secrets.
pub const LABEL_GROUP_TOKEN: &str = "tandem.dev/group-token";
/// Annotation on an issued TLS Secret: the addresses its certificate names,
/// comma-separated, so a moved placement is seen from metadata alone.
pub const ANNOTATION_TLS_ADDRESSES: &str = "tandem.dev/tls-addresses";
/// Annotation on an issued TLS Secret: the day (`YYYY-MM-DD`, UTC) from
/// which its certificate is to be issued again, ahead of its expiry.
pub const ANNOTATION_TLS_RENEW_AFTER: &str = "tandem.dev/tls-renew-after";

pub use tandem_crds::{
    DEFAULT_REVISION, GROUP_TOKEN_KEY, MAX_NAME, fit_name, group_token_secret_name, label_value,
    tls_secret_name,
};

/// Name of rank `rank`'s shard in epoch `epoch`: `<deployment>-e<epoch>-r<rank>`.
pub fn shard_name(deployment: &str, epoch: i64, rank: u32) -> String {
    fit_name(deployment, &format!("-e{epoch}-r{rank}"), MAX_NAME)
}

/// The TLS Secret rank 0 serves with: the user's own (`spec.tls.secretName`)
/// or the one the operator issues; `None` when TLS is off.
pub fn tls_secret_ref(d: &LlamaDeployment) -> Option<SecretRef> {
    if !d.spec.tls_enabled() {
        return None;
    }
    let name = match d.spec.tls_user_secret() {
        Some(own) => own.to_owned(),
        None => tls_secret_name(&d.name_any()),
    };
    Some(SecretRef { name })
}

/// The controller owner reference children carry: garbage collection removes
/// them with the deployment, and foreground deletion waits for them.
/// `None` when the deployment has no uid (it was never stored).
pub fn owner_reference(d: &LlamaDeployment) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: LlamaDeployment::api_version(&()).into_owned(),
        kind: LlamaDeployment::kind(&()).into_owned(),
        name: d.name_any(),
        uid: d.uid()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Labels of a shard: its deployment, node and epoch.
pub fn shard_labels(deployment: &str, node: &str, epoch: i64) -> BTreeMap<String, String> {
    [
        (LABEL_DEPLOYMENT.to_owned(), label_value(deployment)),
        (LABEL_NODE.to_owned(), label_value(node)),
        (LABEL_EPOCH.to_owned(), epoch.to_string()),
    ]
    .into()
}

/// One LlamaShard per rank of `plan`, for `epoch`. Every shard carries the
/// full peer list and the resolved batch limits
/// ([`LlamaDeploymentSpec::batch_limits`](tandem_crds::LlamaDeploymentSpec::batch_limits));
/// rank 0 also carries the serving port and the API key reference.
pub fn build_shards(
    d: &LlamaDeployment,
    owner: &OwnerReference,
    plan: &Plan,
    shape: &ModelShape,
    epoch: i64,
) -> Vec<LlamaShard> {
    let name = d.name_any();
    let peers: Vec<Peer> = plan
        .ranks
        .iter()
        .map(|p| Peer {
            rank: i32::try_from(p.rank).unwrap_or(i32::MAX),
            node: p.node.clone(),
            address: p.ring_endpoint(),
        })
        .collect();
    let control_address = plan
        .ranks
        .iter()
        .find_map(|p| p.control_endpoint())
        .unwrap_or_default();
    let architecture = tandem_crds::Architecture::from_shape(shape);
    let api_key = d
        .spec
        .serving
        .as_ref()
        .and_then(|s| s.api_key_secret_ref.clone());
    let token = SecretKeyRef {
        name: group_token_secret_name(&name),
        key: Some(GROUP_TOKEN_KEY.to_owned()),
    };
    let world_size = i32::try_from(plan.world_size).unwrap_or(i32::MAX);
    let batching = Some(d.spec.batch_limits());
    let tls = tls_secret_ref(d);
    plan.ranks
        .iter()
        .map(|p| {
            let rank0 = p.rank == 0;
            LlamaShard {
                metadata: ObjectMeta {
                    name: Some(shard_name(&name, epoch, p.rank)),
                    namespace: d.namespace(),
                    labels: Some(shard_labels(&name, &p.node, epoch)),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                spec: LlamaShardSpec {
                    deployment: name.clone(),
                    epoch,
                    rank: i32::try_from(p.rank).unwrap_or(i32::MAX),
                    world_size,
                    node_name: p.node.clone(),
                    model: d.spec.model.clone(),
                    revision: Some(
                        d.spec
                            .revision
                            .clone()
                            .unwrap_or_else(|| DEFAULT_REVISION.to_owned()),
                    ),
                    architecture: architecture.clone(),
                    backend: d.spec.backend,
                    peers: peers.clone(),
                    control_address: control_address.clone(),
                    serving_port: rank0.then(|| i32::from(serving_port(d))),
                    group_token_secret_ref: token.clone(),
                    api_key_secret_ref: if rank0 { api_key.clone() } else { None },
                    tls_secret_ref: tls.clone(),
                    max_context_tokens: d.spec.max_context_tokens,
                    batching,
                },
                status: None,
            }
        })
        .collect()
}

/// The group-token Secret for `epoch`, holding `token`, and the digest of
/// the deployment's API key when it has one (rank 0 checks keys against it;
/// agents never read the API-key Secret). A new epoch gets a new token, so
/// that ranks of an older group cannot join the new one.
pub fn build_secret(
    d: &LlamaDeployment,
    owner: &OwnerReference,
    epoch: i64,
    token: &str,
    api_key_digest: Option<&str>,
) -> Secret {
    let name = d.name_any();
    let mut data = BTreeMap::from([(
        GROUP_TOKEN_KEY.to_owned(),
        ByteString(token.as_bytes().to_vec()),
    )]);
    if let Some(digest) = api_key_digest {
        data.insert(
            tandem_crds::API_KEY_DIGEST_KEY.to_owned(),
            ByteString(digest.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(group_token_secret_name(&name)),
            namespace: d.namespace(),
            labels: Some(
                [
                    (LABEL_DEPLOYMENT.to_owned(), label_value(&name)),
                    (LABEL_GROUP_TOKEN.to_owned(), "true".to_owned()),
                ]
                .into(),
            ),
            annotations: Some([(ANNOTATION_TOKEN_EPOCH.to_owned(), epoch.to_string())].into()),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

/// The deployment's issued TLS Secret: the serving certificate naming
/// `addresses` (see [`crate::tls`]), labelled and owned like the
/// group-token Secret, so the same metadata watch sees it.
pub fn build_tls_secret(
    d: &LlamaDeployment,
    owner: &OwnerReference,
    addresses: &str,
    renew_after: &str,
    data: BTreeMap<String, ByteString>,
) -> Secret {
    let name = d.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(tls_secret_name(&name)),
            namespace: d.namespace(),
            labels: Some(
                [
                    (LABEL_DEPLOYMENT.to_owned(), label_value(&name)),
                    (LABEL_GROUP_TOKEN.to_owned(), "true".to_owned()),
                ]
                .into(),
            ),
            annotations: Some(
                [
                    (ANNOTATION_TLS_ADDRESSES.to_owned(), addresses.to_owned()),
                    (
                        ANNOTATION_TLS_RENEW_AFTER.to_owned(),
                        renew_after.to_owned(),
                    ),
                ]
                .into(),
            ),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

/// The addresses an issued TLS Secret's certificate names and the day it
/// is due again, from its annotations (works on metadata alone).
pub fn tls_annotations<K: Resource>(secret: &K) -> (Option<&str>, Option<&str>) {
    let annotations = secret.meta().annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    (
        get(ANNOTATION_TLS_ADDRESSES),
        get(ANNOTATION_TLS_RENEW_AFTER),
    )
}

/// The epoch a group-token Secret's token belongs to, from its annotation
/// (works on the full Secret and on its metadata alone).
pub fn secret_epoch<K: Resource>(secret: &K) -> Option<i64> {
    secret
        .meta()
        .annotations
        .as_ref()?
        .get(ANNOTATION_TOKEN_EPOCH)?
        .parse()
        .ok()
}

/// A fresh group token: 32 random bytes as hex.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{MODEL_1B, deployment};
    use tandem_crds::{BatchLimits, Serving};
    use tandem_planner::{RankPlacement, lookup_model};

    fn plan(world: u32) -> Plan {
        Plan {
            world_size: world,
            memory_per_rank_bytes: 1,
            ranks: (0..world)
                .map(|r| RankPlacement {
                    rank: r,
                    node: format!("node-{r}"),
                    address: format!("10.0.0.{}", r + 1),
                    ring_port: 47000,
                    control_port: (r == 0).then_some(47001),
                })
                .collect(),
        }
    }

    #[test]
    fn names_fit_and_stay_valid() {
        assert_eq!(shard_name("llama", 3, 1), "llama-e3-r1");
        assert_eq!(group_token_secret_name("llama"), "llama-group-token");
        let long = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        let name = shard_name(&long, 12, 7);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.ends_with("-e12-r7"));
        assert_eq!(name, shard_name(&long, 12, 7), "deterministic");
        assert_ne!(
            shard_name(&long, 12, 7),
            shard_name(&format!("{long}x"), 12, 7)
        );
    }

    #[test]
    fn shards_carry_peers_labels_owner_and_rank0_extras() {
        let mut d = deployment("llama", MODEL_1B, 2);
        d.spec.serving = Some(Serving {
            port: 9000,
            api_key_secret_ref: Some(SecretKeyRef {
                name: "keys".into(),
                key: None,
            }),
            max_batch_sequences: Some(4),
            prefix_cache_bytes: Some(0),
            ..Serving::default()
        });
        let owner = owner_reference(&d).expect("uid");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
        assert_eq!(owner.kind, "LlamaDeployment");
        assert_eq!(owner.api_version, "tandem.dev/v1alpha1");
        let shape = lookup_model(MODEL_1B).expect("1b").shape;
        let shards = build_shards(&d, &owner, &plan(2), &shape, 4);
        assert_eq!(shards.len(), 2);
        let (r0, r1) = (&shards[0], &shards[1]);
        assert_eq!(r0.name_any(), "llama-e4-r0");
        assert_eq!(r0.namespace().as_deref(), Some("ns"));
        assert_eq!(r0.labels()[LABEL_DEPLOYMENT], "llama");
        assert_eq!(r0.labels()[LABEL_NODE], "node-0");
        assert_eq!(r1.labels()[LABEL_EPOCH], "4");
        assert_eq!(r0.owner_references(), std::slice::from_ref(&owner));
        for s in &shards {
            assert_eq!(s.spec.peers.len(), 2);
            assert_eq!(s.spec.peers[1].address, "10.0.0.2:47000");
            assert_eq!(s.spec.control_address, "10.0.0.1:47001");
            assert_eq!(s.spec.world_size, 2);
            assert_eq!(s.spec.epoch, 4);
            assert_eq!(s.spec.revision.as_deref(), Some("main"));
            assert_eq!(s.spec.group_token_secret_ref.name, "llama-group-token");
            assert_eq!(
                s.spec.architecture,
                tandem_crds::Architecture::from_shape(&shape)
            );
            assert_eq!(
                s.spec.batching,
                Some(BatchLimits {
                    max_sequences: 4,
                    max_tokens: 32768,
                    prefill_chunk_tokens: 2048,
                    prefix_cache_bytes: 0,
                    max_completion_tokens: 4096,
                }),
                "every rank carries the resolved limits"
            );
        }
        assert_eq!(r0.spec.serving_port, Some(9000));
        assert_eq!(r1.spec.serving_port, None);
        assert_eq!(
            r0.spec.api_key_secret_ref.as_ref().map(|r| r.name.as_str()),
            Some("keys")
        );
        assert_eq!(r1.spec.api_key_secret_ref, None);
    }

    #[test]
    fn secret_holds_the_token_and_its_epoch() {
        let d = deployment("llama", MODEL_1B, 2);
        let owner = owner_reference(&d).expect("uid");
        let s = build_secret(&d, &owner, 7, "abc", None);
        assert_eq!(s.name_any(), "llama-group-token");
        assert_eq!(secret_epoch(&s), Some(7));
        assert_eq!(
            s.data.as_ref().map(|m| m[GROUP_TOKEN_KEY].0.clone()),
            Some(b"abc".to_vec())
        );
        assert_eq!(s.labels()[LABEL_GROUP_TOKEN], "true");
        assert!(
            !s.data
                .as_ref()
                .is_some_and(|m| m.contains_key(tandem_crds::API_KEY_DIGEST_KEY))
        );
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn secret_holds_the_api_keys_digest_never_the_key() {
        let d = deployment("llama", MODEL_1B, 2);
        let owner = owner_reference(&d).expect("uid");
        let digest = tandem_crds::api_key_digest("sk-secret");
        let s = build_secret(&d, &owner, 7, "abc", Some(&digest));
        let data = s.data.unwrap_or_default();
        assert_eq!(data[tandem_crds::API_KEY_DIGEST_KEY].0, digest.as_bytes());
        assert!(data.values().all(|v| v.0 != b"sk-secret"));
    }
}
