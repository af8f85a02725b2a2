//! Least privilege, enforced by the real API server: each node's agent runs
//! as its own ServiceAccount (`tandem-agent join`), confined to its own
//! LlamaNode and Lease and, through the Roles the running operator keeps,
//! to the shards placed on it and their deployment's token and TLS Secrets;
//! an operator installed for one namespace reads no other namespace's
//! Secrets; and a Secret the operator did not create is never touched.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tandem_crds::*;
use tandem_tests::{
    Identity, SYSTEM_NAMESPACE, TestNamespace, client_from, cluster, eventually,
    operator::{Agents, Setup, WAIT, all_shards, condition, deployment, has},
    repo_root, unique_name,
};

/// Asserts that `result` is the API server's 403 for `user`, and that its
/// message contains `phrase`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, user: &str, phrase: &str) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "expected Forbidden: {s:?}");
            let who = format!("User \"system:serviceaccount:{SYSTEM_NAMESPACE}:{user}\"");
            assert!(s.message.contains(&who), "{:?} lacks {who}", s.message);
            assert!(
                s.message.contains(phrase),
                "{:?} lacks {phrase:?}",
                s.message
            );
        }
        other => panic!("expected a 403 refusal ({phrase}), got {other:?}"),
    }
}

fn secret(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some([(key.to_owned(), ByteString(value.as_bytes().to_vec()))].into()),
        ..Secret::default()
    }
}

/// A one-rank deployment pinned to the node labelled `tandem.test/pin=<pin>`.
fn pinned(name: &str, pin: &str, agents: &Agents) -> LlamaDeployment {
    let mut d = deployment(name, 1, agents);
    if let Some(selector) = d
        .spec
        .placement
        .as_mut()
        .and_then(|p| p.node_selector.as_mut())
    {
        selector
            .match_labels
            .get_or_insert_default()
            .insert("tandem.test/pin".into(), pin.into());
    }
    d
}

#[tokio::test]
async fn an_agent_may_touch_only_its_own_node_and_the_shards_placed_on_it() {
    let s = Setup::new("ident").await;
    let _op = s.operator("a");
    let nodes = s.nodes(2, 64, 30).await;
    let (a, b) = (nodes[0].clone(), nodes[1].clone());
    let admin_nodes: Api<LlamaNode> = Api::all(s.admin.clone());
    for (node, pin) in [(&a, "a"), (&b, "b")] {
        admin_nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"tandem.test/pin": pin}}})),
            )
            .await
            .expect("pinning label");
    }
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), s.ns());
    secrets
        .create(&PostParams::default(), &secret("api-key", "api-key", "k"))
        .await
        .expect("API-key Secret");
    let mut on_a = pinned("on-a", "a", &s.agents);
    on_a.spec.serving = Some(Serving {
        api_key_secret_ref: Some(SecretKeyRef {
            name: "api-key".into(),
            key: None,
        }),
        ..serde_json::from_value(json!({})).expect("default serving")
    });
    s.create(&on_a).await;
    s.create(&pinned("on-b", "b", &s.agents)).await;
    let shards = s.shards(1, 2).await;
    let shard_of = |node: &str| {
        shards
            .iter()
            .find(|sh| sh.spec.node_name == node)
            .map(|sh| sh.name_any())
            .unwrap_or_else(|| panic!("a shard on {node}: {shards:?}"))
    };
    let (shard_a, shard_b) = (shard_of(&a), shard_of(&b));
    assert!(shard_a.starts_with("on-a-") && shard_b.starts_with("on-b-"));

    let user_a = node_service_account(&a);
    let agent_a = s.agents.client(&a).expect("A's client");
    let agent_b = s.agents.client(&b).expect("B's client");

    // What A may do for itself (the status write waits out RBAC's cache).
    s.agents
        .set_phase(s.ns(), &shard_a, ShardPhase::Loading)
        .await
        .expect("A writes its own shard's status");
    let a_secrets: Api<Secret> = Api::namespaced(agent_a.clone(), s.ns());
    let token = a_secrets
        .get("on-a-group-token")
        .await
        .expect("A reads the token of a deployment placed on it");
    let data = token.data.unwrap_or_default();
    assert!(data.contains_key("token"));
    // Rank 0 checks API keys against their digest, never the key itself.
    assert_eq!(
        data.get(API_KEY_DIGEST_KEY).map(|v| v.0.clone()),
        Some(api_key_digest("k").into_bytes())
    );
    match a_secrets.get("on-a-tls").await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        other => panic!("A may read on-a's TLS Secret (absent or not): {other:?}"),
    }
    let a_nodes: Api<LlamaNode> = Api::all(agent_a.clone());
    let label = json!({"metadata": {"labels": {"rack": "desk"}}});
    a_nodes
        .patch(&a, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("A labels its own node");
    let a_leases: Api<Lease> = Api::namespaced(agent_a.clone(), SYSTEM_NAMESPACE);
    let holder = json!({"spec": {"holderIdentity": a}});
    a_leases
        .patch(&a, &PatchParams::default(), &Patch::Merge(&holder))
        .await
        .expect("A renews its own Lease");

    // And what it may not, each refused by the API server.
    let address = json!({"spec": {"address": "10.66.6.6"}});
    assert_refused(
        a_nodes
            .patch(&b, &PatchParams::default(), &Patch::Merge(&address))
            .await,
        &user_a,
        "cannot patch resource \"llamanodes\" in API group \"tandem.dev\" at the cluster scope",
    );
    assert_refused(
        a_nodes
            .create(
                &PostParams::default(),
                &LlamaNode::new(
                    &unique_name("sneaky"),
                    LlamaNodeSpec {
                        address: "10.66.6.6".into(),
                        unschedulable: false,
                    },
                ),
            )
            .await,
        &user_a,
        "cannot create resource \"llamanodes\"",
    );
    assert_refused(
        a_leases
            .patch(&b, &PatchParams::default(), &Patch::Merge(&holder))
            .await,
        &user_a,
        "cannot patch resource \"leases\" in API group \"coordination.k8s.io\"",
    );
    assert_refused(
        a_leases
            .patch(
                &format!("op-{}", s.ns()),
                &PatchParams::default(),
                &Patch::Merge(&holder),
            )
            .await,
        &user_a,
        "cannot patch resource \"leases\"",
    );
    let a_shards: Api<LlamaShard> = Api::namespaced(agent_a.clone(), s.ns());
    assert_refused(
        a_shards
            .patch_status(
                &shard_b,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Failed"}})),
            )
            .await,
        &user_a,
        "cannot patch resource \"llamashards/status\" in API group \"tandem.dev\"",
    );
    assert_refused(
        a_secrets.get("on-b-group-token").await,
        &user_a,
        &format!(
            "cannot get resource \"secrets\" in API group \"\" in the namespace \"{}\"",
            s.ns()
        ),
    );
    assert_refused(
        a_secrets.get("api-key").await,
        &user_a,
        "cannot get resource \"secrets\"",
    );
    assert_refused(
        a_secrets.list(&Default::default()).await,
        &user_a,
        "cannot list resource \"secrets\"",
    );

    // B, in turn, reads its own deployment's token but not A's.
    let b_secrets: Api<Secret> = Api::namespaced(agent_b, s.ns());
    eventually("B to read on-b's token", WAIT, || async {
        Ok(b_secrets.get("on-b-group-token").await.ok())
    })
    .await
    .expect("B reads on-b's token");
    assert_refused(
        b_secrets.get("on-a-group-token").await,
        &node_service_account(&b),
        "cannot get resource \"secrets\"",
    );

    // The right lasts only while a shard is placed: once on-a is gone, A
    // can read its token no more.
    s.deployments()
        .delete("on-a", &DeleteParams::default())
        .await
        .expect("deleting on-a");
    let refused = eventually("A to lose on-a's token", WAIT, || async {
        match a_secrets.get("on-a-group-token").await {
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(Some(e.message)),
            _ => Ok(None),
        }
    })
    .await
    .expect("A loses access");
    assert!(
        refused.contains("cannot get resource \"secrets\""),
        "{refused}"
    );
}

#[tokio::test]
async fn a_secret_the_operator_did_not_create_is_left_untouched() {
    let s = Setup::new("foreign").await;
    let _op = s.operator("a");
    s.nodes(1, 64, 30).await;
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), s.ns());
    let mine = secrets
        .create(
            &PostParams::default(),
            &secret("llama-group-token", "token", "the user's own"),
        )
        .await
        .expect("a user's Secret");
    s.create(&deployment("llama", 1, &s.agents)).await;

    let st = s
        .status("llama", "Placed=False/SecretConflict", |st| {
            has(st, "Placed", "False", "SecretConflict")
        })
        .await;
    let placed = condition(&st, "Placed").expect("Placed");
    assert!(
        placed.message.starts_with(&format!(
            "Secret {}/llama-group-token already exists and was not created by this deployment",
            s.ns()
        )),
        "{}",
        placed.message
    );
    assert!(placed.message.contains("delete or rename that Secret"));
    assert!(has(&st, "Ready", "False", "SecretConflict"), "{st:?}");
    assert_eq!(st.phase, Some(DeploymentPhase::Failed));
    let note = s.event("llama", "SecretConflict").await;
    assert!(note.contains("llama-group-token"), "{note}");

    // A few more passes (it looks again every 10 s) leave it as it was.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = secrets.get("llama-group-token").await.expect("still there");
    assert_eq!(after.resource_version(), mine.resource_version());
    assert!(after.owner_references().is_empty());
    assert!(after.labels().is_empty());
    assert_eq!(
        after.data.unwrap_or_default()["token"].0,
        b"the user's own".to_vec()
    );
    assert!(
        all_shards(&s.admin, s.ns())
            .await
            .expect("shards")
            .is_empty(),
        "no rank starts without its own token"
    );

    // Once the user moves it away, the operator makes its own and places.
    secrets
        .delete("llama-group-token", &DeleteParams::default())
        .await
        .expect("deleting the user's Secret");
    s.status("llama", "Placed", |st| has(st, "Placed", "True", "Placed"))
        .await;
    let ours = secrets
        .get("llama-group-token")
        .await
        .expect("the operator's");
    assert_eq!(ours.owner_references().len(), 1);
}

#[tokio::test]
async fn an_operator_installed_for_one_namespace_reads_no_other_namespaces_secrets() {
    let c = cluster();
    let home = TestNamespace::new(c, "opns-home").await.expect("namespace");
    let other = TestNamespace::new(c, "opns-other")
        .await
        .expect("namespace");
    let admin = c.client(Identity::Admin).await.expect("admin");
    for ns in [home.name(), other.name()] {
        Api::<Secret>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &secret("present", "k", "v"))
            .await
            .expect("a Secret");
    }
    let release = unique_name("tns");
    let out = Command::new(c.helm())
        .args(["install", &release])
        .arg(repo_root().join("charts/tandem"))
        .args(["--namespace", home.name(), "--skip-crds"])
        .args(["--set", &format!("operator.watchNamespace={}", home.name())])
        .arg("--kubeconfig")
        .arg(c.kubeconfig(Identity::Admin))
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uninstall = || {
        let _ = Command::new(c.helm())
            .args(["uninstall", &release, "--namespace", home.name()])
            .arg("--kubeconfig")
            .arg(c.kubeconfig(Identity::Admin))
            .output();
    };

    // The release's operator ServiceAccount, with a token of its own.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), home.name());
    let mut token_secret = secret("operator-token", "unused", "");
    token_secret.data = None;
    token_secret.type_ = Some("kubernetes.io/service-account-token".into());
    token_secret.metadata.annotations = Some(
        [(
            "kubernetes.io/service-account.name".to_owned(),
            "tandem-operator".to_owned(),
        )]
        .into(),
    );
    secrets
        .create(&PostParams::default(), &token_secret)
        .await
        .expect("token Secret");
    let token = eventually("the operator's token", WAIT, || async {
        let s = secrets.get("operator-token").await?;
        Ok(s.data
            .and_then(|d| d.get("token").map(|t| t.0.clone()))
            .and_then(|t| String::from_utf8(t).ok()))
    })
    .await
    .expect("token");
    let admin_config = std::fs::read_to_string(c.kubeconfig(Identity::Admin)).expect("kubeconfig");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&admin_config).expect("yaml");
    config["users"][0]["user"] = serde_yaml::to_value(json!({ "token": token })).expect("value");
    let path = std::env::temp_dir().join(format!("{release}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
    let operator = client_from(&path).await.expect("operator client");
    let _ = std::fs::remove_file(&path);

    let user = format!("system:serviceaccount:{}:tandem-operator", home.name());
    let own: Api<Secret> = Api::namespaced(operator.clone(), home.name());
    let foreign: Api<Secret> = Api::namespaced(operator.clone(), other.name());
    let result = own.get("present").await.map(|_| ());
    let foreign_get = foreign.get("present").await;
    let cluster_list = Api::<Secret>::all(operator.clone())
        .list(&Default::default())
        .await;
    let nodes = Api::<LlamaNode>::all(operator)
        .list(&Default::default())
        .await;
    uninstall();

    result.expect("the operator reads Secrets in the namespace it watches");
    nodes.expect("the operator lists LlamaNodes (cluster-scoped)");
    for (what, result, phrase) in [
        (
            "get in another namespace",
            foreign_get.map(|_| ()),
            format!(
                "cannot get resource \"secrets\" in API group \"\" in the namespace \"{}\"",
                other.name()
            ),
        ),
        (
            "list in every namespace",
            cluster_list.map(|_| ()),
            "cannot list resource \"secrets\" in API group \"\" at the cluster scope".to_owned(),
        ),
    ] {
        match result {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403, "{what}: {s:?}");
                assert!(
                    s.message.contains(&format!("User \"{user}\"")),
                    "{what}: {}",
                    s.message
                );
                assert!(
                    s.message.contains(&phrase),
                    "{what}: {} lacks {phrase}",
                    s.message
                );
            }
            other => panic!("{what}: expected 403, got {other:?}"),
        }
    }
}
