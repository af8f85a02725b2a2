//! The operator against the real API server, as a real process with the
//! chart's operator identity, and test code acting as the agents: placement
//! with peers and a group token, simulated loading to Serving, scaling,
//! Lease expiry and recovery, failed ranks with backoff and a budget, bad
//! specs, cordoned nodes, the deletion finalizer and leader election.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tandem_crds::*;
use tandem_tests::{
    Identity, eventually,
    operator::{
        MODEL, NodeSpec, Setup, WAIT, all_shards, condition, deployment, events, has, lease_holder,
        shards_of_epoch, token,
    },
};

#[tokio::test]
async fn apply_places_shards_with_peers_then_serves() {
    let s = Setup::new("apply").await;
    let op = s.operator("a");
    let nodes = s.nodes(2, 64, 30).await;
    let created = s.create(&deployment("llama", 2, &s.agents)).await;
    let uid = created.uid().expect("uid");

    let shards = s.shards(1, 2).await;
    let peers = &shards[0].spec.peers;
    assert_eq!(peers.len(), 2);
    for (rank, shard) in shards.iter().enumerate() {
        let rank = rank as i32;
        assert_eq!(shard.name_any(), format!("llama-e1-r{rank}"));
        assert_eq!(
            &shard.spec.peers, peers,
            "every rank has the same peer list"
        );
        assert_eq!(shard.spec.world_size, 2);
        assert_eq!(shard.spec.model, MODEL);
        let node = &shard.spec.node_name;
        assert!(nodes.contains(node), "{node} is one of the test's nodes");
        let peer = &peers[rank as usize];
        assert_eq!((peer.rank, &peer.node), (rank, node));
        let (ip, port) = peer.address.rsplit_once(':').expect("ip:port");
        assert!(ip.starts_with("10.1.0."), "{ip}");
        let port: u16 = port.parse().expect("port");
        assert!((29000..=29999).contains(&port), "{port}");
        assert_eq!(
            shard.labels().get(LABEL_DEPLOYMENT).map(String::as_str),
            Some("llama")
        );
        assert_eq!(shard.labels().get(LABEL_NODE), Some(node));
        assert_eq!(
            shard.labels().get(LABEL_EPOCH).map(String::as_str),
            Some("1")
        );
        let owner = &shard.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("LlamaDeployment", uid.as_str())
        );
        assert_eq!(
            (owner.controller, owner.block_owner_deletion),
            (Some(true), Some(true))
        );
        assert_eq!(shard.spec.group_token_secret_ref.name, "llama-group-token");
        assert_eq!(shard.spec.serving_port, (rank == 0).then_some(8080));
    }
    let control_ip = shards[0]
        .spec
        .control_address
        .rsplit_once(':')
        .expect("ip:port")
        .0;
    assert_eq!(
        control_ip,
        peers[0].address.rsplit_once(':').expect("ip:port").0
    );

    let secret: Secret = Api::namespaced(s.admin.clone(), s.ns())
        .get("llama-group-token")
        .await
        .expect("group-token Secret");
    assert_eq!(secret.owner_references()[0].uid, uid);
    assert_eq!(
        token(&s.admin, s.ns(), "llama").await.expect("token").len(),
        64
    );
    let d = s.deployments().get("llama").await.expect("deployment");
    assert!(d.finalizers().contains(&"tandem.dev/cleanup".to_owned()));

    let st = s
        .status("llama", "Loading with Placed", |st| {
            st.phase == Some(DeploymentPhase::Loading) && has(st, "Placed", "True", "Placed")
        })
        .await;
    assert_eq!(st.ready.as_deref(), Some("0/2"));
    assert_eq!(st.valid_world_sizes, vec![1, 2, 4, 8]);
    assert!(st.memory_per_rank_bytes.is_some_and(|m| m > 500_000_000));

    let st = s.serve("llama", 1, 2).await;
    assert_eq!(st.ready.as_deref(), Some("2/2"));
    let rank0_ip = peers[0].address.rsplit_once(':').expect("ip:port").0;
    assert_eq!(st.endpoint, Some(format!("https://{rank0_ip}:8080")));
    // TLS is on by default: the operator issued `llama-tls` from its CA for
    // the placed nodes' addresses, every rank points at it, and the CA is
    // published in the status.
    let ca = st.ca_bundle.clone().expect("status.caBundle");
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    for shard in &shards {
        assert_eq!(
            shard.spec.tls_secret_ref.as_ref().map(|r| r.name.as_str()),
            Some("llama-tls")
        );
    }
    let tls = tls_secret(&s, "llama").await;
    assert_eq!(tls.owner_references()[0].uid, uid);
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(tls_text(&tls, "ca.crt"), ca);
    assert!(tls_text(&tls, "tls.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(tls_text(&tls, "tls.key").contains("PRIVATE KEY"));
    assert_eq!(tls_addresses(&tls), node_ips(&shards[0]));
    let renew_after = tls.annotations().get("tandem.dev/tls-renew-after").cloned();
    assert!(
        renew_after
            .as_ref()
            .is_some_and(|d| d.len() == 10 && d.as_str() > "2026-"),
        "{renew_after:?}"
    );
    assert_eq!(st.observed_generation, Some(1));
    for t in ["Placed", "ShardsLoaded", "GroupFormed", "Ready"] {
        let c = condition(&st, t).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(c.status, "True", "{t}: {c:?}");
        assert_eq!(c.observed_generation, Some(1), "{t}");
    }
    assert_eq!(st.ranks.len(), 2);
    assert!(st.ranks.iter().all(|r| r.phase == Some(ShardPhase::Ready)));
    s.event("llama", "Placed").await;
    s.event("llama", "Serving").await;

    let out = s
        .cluster
        .kubectl(Identity::Admin, &["get", "llama", "llama", "-n", s.ns()])
        .expect("kubectl");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("2/2") && table.contains("Serving"),
        "{table}"
    );

    assert_eq!(op.get("/healthz").expect("healthz").status, 200);
    assert_eq!(op.get("/readyz").expect("readyz").status, 200);
    assert_eq!(op.metric("tandem_operator_leader").expect("leader"), 1.0);
    assert!(
        op.metric("tandem_operator_reconciles_total")
            .expect("reconciles")
            >= 1.0
    );
    assert_eq!(
        op.metric("tandem_operator_deployments{phase=\"Serving\"}")
            .expect("phase gauge"),
        1.0
    );
}

/// The deployment's issued TLS Secret.
async fn tls_secret(s: &Setup, deployment: &str) -> Secret {
    Api::namespaced(s.admin.clone(), s.ns())
        .get(&format!("{deployment}-tls"))
        .await
        .expect("the TLS Secret")
}

fn tls_text(secret: &Secret, key: &str) -> String {
    let bytes = secret.data.as_ref().and_then(|d| d.get(key)).expect(key);
    String::from_utf8(bytes.0.clone()).expect("UTF-8")
}

fn tls_addresses(secret: &Secret) -> String {
    secret
        .annotations()
        .get("tandem.dev/tls-addresses")
        .cloned()
        .unwrap_or_default()
}

/// The placed nodes' addresses, sorted, as the certificate must name them.
fn node_ips(shard: &LlamaShard) -> String {
    let mut ips: Vec<std::net::IpAddr> = shard
        .spec
        .peers
        .iter()
        .filter_map(|p| p.address.rsplit_once(':')?.0.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn tls_off_or_a_users_own_secret_is_what_the_shards_get() {
    let s = Setup::new("tls").await;
    let _op = s.operator("a");
    s.nodes(2, 64, 30).await;
    let mut plain = deployment("plain", 1, &s.agents);
    plain.spec.tls = Some(Tls {
        enabled: Some(false),
        secret_name: None,
    });
    let mut own = deployment("own", 1, &s.agents);
    own.spec.tls = Some(Tls {
        enabled: None,
        secret_name: Some("my-cert".into()),
    });
    s.create(&plain).await;
    s.create(&own).await;
    let shards = eventually("one shard of each deployment", WAIT, || async {
        let all = shards_of_epoch(&s.admin, s.ns(), 1).await?;
        Ok((all.len() == 2).then_some(all))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    for shard in &shards {
        let want = (shard.spec.deployment == "own").then_some("my-cert");
        assert_eq!(
            shard.spec.tls_secret_ref.as_ref().map(|r| r.name.as_str()),
            want,
            "{}",
            shard.spec.deployment
        );
    }
    // The node of the deployment with its own Secret may read that Secret.
    let own_shard = shards
        .iter()
        .find(|sh| sh.spec.deployment == "own")
        .expect("own's shard");
    let role: k8s_openapi::api::rbac::v1::Role = Api::namespaced(s.admin.clone(), s.ns())
        .get(&node_access_name(&own_shard.spec.node_name, "own"))
        .await
        .expect("the node's Role for own");
    let readable: Vec<String> = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            r.resources
                .as_ref()
                .is_some_and(|x| x.contains(&"secrets".to_owned()))
        })
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect();
    assert_eq!(
        readable,
        vec!["own-group-token".to_owned(), "my-cert".to_owned()]
    );
    for name in ["plain", "own"] {
        let st = s
            .status(name, "Loading", |st| {
                st.phase == Some(DeploymentPhase::Loading)
            })
            .await;
        assert_eq!(st.ca_bundle, None, "{name}: no CA of the operator's");
    }
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), s.ns());
    for name in ["plain-tls", "own-tls"] {
        assert!(
            secrets.get_opt(name).await.expect("get").is_none(),
            "{name} was issued"
        );
    }
}

#[tokio::test]
async fn scaling_2_to_4_to_1_starts_new_epochs_and_keeps_nodes() {
    let s = Setup::new("scale").await;
    let _op = s.operator("a");
    s.nodes(4, 64, 30).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    let first = s.shards(1, 2).await;
    s.serve("llama", 1, 2).await;
    let token1 = token(&s.admin, s.ns(), "llama").await.expect("token");

    s.deployments()
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sharding": {"worldSize": 4}}})),
        )
        .await
        .expect("scaling to 4");
    let second = s.only_epoch(2).await;
    assert_eq!(second.len(), 4);
    for rank in 0..2 {
        assert_eq!(
            second[rank].spec.node_name, first[rank].spec.node_name,
            "rank {rank} stays put"
        );
    }
    assert!(
        second
            .iter()
            .all(|sh| sh.spec.peers.len() == 4 && sh.spec.world_size == 4)
    );
    let st = s
        .status("llama", "epoch 2 of 4 ranks", |st| {
            st.epoch == 2 && st.world_size == 4
        })
        .await;
    assert_eq!(st.ready.as_deref(), Some("0/4"));
    let note = s.event("llama", "Scaling").await;
    assert!(note.contains("2 → 4"), "{note}");
    let token2 = token(&s.admin, s.ns(), "llama").await.expect("token");
    assert_ne!(token1, token2, "a new epoch rotates the group token");
    // The serving certificate is issued again for the four nodes.
    let want = node_ips(&second[0]);
    assert_eq!(want.split(',').count(), 4, "{want}");
    eventually("the certificate names the four nodes", WAIT, || async {
        let tls = tls_secret(&s, "llama").await;
        Ok((tls_addresses(&tls) == want).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    s.serve("llama", 2, 4).await;

    let out = s
        .cluster
        .kubectl(
            Identity::Admin,
            &["scale", "llama/llama", "--replicas=1", "-n", s.ns()],
        )
        .expect("kubectl scale");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = s.only_epoch(3).await;
    assert_eq!(third.len(), 1);
    assert_eq!(
        third[0].spec.node_name, first[0].spec.node_name,
        "rank 0 stays put"
    );
    assert_eq!(third[0].spec.peers.len(), 1);
    let st = s.serve("llama", 3, 1).await;
    assert_eq!(st.ready.as_deref(), Some("1/1"));
    assert_eq!(st.restart_count, 0, "scaling is not a restart");
}

#[tokio::test]
async fn lease_expiry_moves_ranks_away_and_capacity_coming_back_heals() {
    let s = Setup::new("lease").await;
    let _op = s.operator("a");
    let nodes = s.nodes(3, 64, 3).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    let first = s.shards(1, 2).await;
    s.serve("llama", 1, 2).await;
    let used: Vec<String> = first.iter().map(|sh| sh.spec.node_name.clone()).collect();
    let spare = nodes
        .iter()
        .find(|n| !used.contains(n))
        .expect("a spare node")
        .clone();

    // Rank 1's agent dies: its Lease expires and the rank moves to the spare node.
    s.agents.stop_renewing(&used[1]);
    let second = s.only_epoch(2).await;
    assert_eq!(second[0].spec.node_name, used[0], "rank 0 stays");
    assert_eq!(
        second[1].spec.node_name, spare,
        "rank 1 moves off the lost node"
    );
    let st = s
        .status("llama", "restart recorded", |st| st.restart_count == 1)
        .await;
    let record = st.last_restart.expect("lastRestart");
    assert_eq!((record.epoch, record.reason.as_str()), (2, "NodeLost"));
    let note = s.event("llama", "Restarting").await;
    assert!(note.contains(&used[1]), "{note}");
    s.event("llama", "Degraded").await;
    s.serve("llama", 2, 2).await;

    // The spare dies too: no capacity, so the deployment waits, Degraded.
    s.agents.stop_renewing(&spare);
    let st = s
        .status("llama", "Degraded for want of nodes", |st| {
            st.phase == Some(DeploymentPhase::Degraded)
                && has(st, "Placed", "False", "NoMatchingNodes")
        })
        .await;
    assert!(
        has(&st, "Ready", "False", "NodeLost"),
        "{:?}",
        st.conditions
    );
    s.event("llama", "NoMatchingNodes").await;
    assert_eq!(st.epoch, 2);

    // A new node comes: the group is re-placed on its own.
    s.agents
        .register(&NodeSpec {
            name: format!("{}-new", s.ns()),
            address: "10.1.0.9".into(),
            memory_gib: 64,
            lease_seconds: 30,
        })
        .await
        .expect("new node");
    let third = s.only_epoch(3).await;
    assert_eq!(third[0].spec.node_name, used[0]);
    assert_eq!(third[1].spec.node_name, format!("{}-new", s.ns()));
    s.serve("llama", 3, 2).await;
}

#[tokio::test]
async fn failed_ranks_restart_with_backoff_until_the_budget_is_spent() {
    let s = Setup::new("fail").await;
    let _op = s.operator("a");
    s.nodes(2, 64, 30).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    s.shards(1, 2).await;
    s.serve("llama", 1, 2).await;
    let fail = |epoch: i64| {
        let (agents, ns) = (&s.agents, s.ns());
        async move {
            agents
                .set_status(ns, &format!("llama-e{epoch}-r1"), json!({"phase": "Failed", "reason": "OutOfMemory", "message": "cannot allocate 1 GiB"}))
                .await
                .expect("failing rank 1");
        }
    };
    // Budget 3, backoff 1 s then 2 s (the FAST flags).
    for epoch in 1..=3 {
        fail(epoch).await;
        let st = s
            .status("llama", &format!("restart {epoch}"), |st| {
                st.epoch == epoch + 1
            })
            .await;
        assert_eq!(st.restart_count, epoch as i32);
        assert_eq!(
            st.last_restart.as_ref().map(|r| r.reason.as_str()),
            Some("RankFailed")
        );
    }
    let note = s.event("llama", "Restarting").await;
    assert!(
        note.contains("OutOfMemory: cannot allocate 1 GiB"),
        "{note}"
    );
    fail(4).await;
    let st = s
        .status("llama", "Failed", |st| {
            st.phase == Some(DeploymentPhase::Failed)
        })
        .await;
    let ready = condition(&st, "Ready").expect("Ready");
    assert_eq!(ready.reason, "RestartBudgetExhausted");
    assert!(ready.message.contains("OutOfMemory"), "{}", ready.message);
    assert_eq!(st.epoch, 4, "no further epoch");
    let note = s.event("llama", "Failed").await;
    assert!(note.contains("gave up after 3 restarts"), "{note}");
}

#[tokio::test]
async fn bad_specs_give_conditions_and_events_and_no_shards() {
    let s = Setup::new("bad").await;
    let _op = s.operator("a");
    s.nodes(2, 64, 30).await;
    let mut cases: Vec<(LlamaDeployment, &str, &str)> = Vec::new();
    cases.push((
        deployment("world-3", 3, &s.agents),
        "InvalidSharding",
        "valid world sizes: 1, 2, 4, 8",
    ));
    let mut unknown = deployment("unknown", 2, &s.agents);
    unknown.spec.model = "someone/Unknown-Llama".into();
    cases.push((unknown, "UnknownModel", "spec.architecture"));
    let mut nomatch = deployment("nomatch", 2, &s.agents);
    nomatch.spec.placement = Some(Placement {
        node_selector: Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([(s.agents.label.0.clone(), "nobody".to_owned())].into()),
                match_expressions: None,
            },
        ),
    });
    cases.push((nomatch, "NoMatchingNodes", "no LlamaNodes match selector"));
    let mut huge = deployment("huge", 1, &s.agents);
    huge.spec.model = "mlx-community/llama-3.3-70b-instruct-fp16".into();
    cases.push((huge, "InsufficientMemory", "add nodes"));
    let mut pipeline = deployment("pipeline", 2, &s.agents);
    pipeline.spec.sharding.strategy = ShardingStrategy::Pipeline;
    cases.push((pipeline, "InvalidSharding", "Pipeline is reserved"));

    for (d, _, _) in &cases {
        s.create(d).await;
    }
    for (d, reason, hint) in &cases {
        let name = d.name_any();
        let st = s
            .status(&name, reason, |st| has(st, "Placed", "False", reason))
            .await;
        let placed = condition(&st, "Placed").expect("Placed");
        assert!(
            placed.message.contains(hint),
            "{name}: {:?} lacks {hint:?}",
            placed.message
        );
        assert!(
            has(&st, "Ready", "False", reason),
            "{name}: {:?}",
            st.conditions
        );
        let phase = st.phase.expect("phase");
        assert!(
            matches!(phase, DeploymentPhase::Failed | DeploymentPhase::Placing),
            "{name}: {phase:?}"
        );
        let note = s.event(&name, reason).await;
        assert_eq!(&note, &placed.message);
    }
    // Nothing was placed for any of them, and no token minted.
    assert!(
        all_shards(&s.admin, s.ns())
            .await
            .expect("shards")
            .is_empty()
    );
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), s.ns());
    let tokens = secrets
        .list(&kube::api::ListParams::default().labels("tandem.dev/group-token"))
        .await
        .expect("secrets");
    assert!(tokens.items.is_empty());
}

#[tokio::test]
async fn cordoned_nodes_get_no_new_ranks() {
    let s = Setup::new("cordon").await;
    let _op = s.operator("a");
    let nodes = s.nodes(3, 64, 30).await;
    let cordoned = &nodes[0];
    Api::<LlamaNode>::all(s.admin.clone())
        .patch(
            cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("cordon");
    s.create(&deployment("llama", 2, &s.agents)).await;
    let shards = s.shards(1, 2).await;
    assert!(
        shards.iter().all(|sh| &sh.spec.node_name != cordoned),
        "no rank on {cordoned}"
    );
}

#[tokio::test]
async fn deletion_waits_until_agents_release_their_shards() {
    let s = Setup::new("delete").await;
    let _op = s.operator("a");
    s.nodes(2, 64, 30).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    let shards = s.shards(1, 2).await;
    s.serve("llama", 1, 2).await;
    // The agents report running their ranks.
    for sh in &shards {
        let entry = NodeShard {
            namespace: s.ns().to_owned(),
            name: sh.name_any(),
            rank: sh.spec.rank,
            epoch: sh.spec.epoch,
            phase: Some(ShardPhase::Ready),
            memory_bytes: 1 << 29,
        };
        s.agents
            .report_running(&sh.spec.node_name, &[entry])
            .await
            .expect("report");
    }
    s.deployments()
        .delete("llama", &DeleteParams::default())
        .await
        .expect("delete");
    // Shards go at once; the deployment stays while nodes still run them.
    let (client, ns) = (&s.admin, s.ns());
    eventually("shards deleted", WAIT, || async move {
        Ok(all_shards(client, ns).await?.is_empty().then_some(()))
    })
    .await
    .expect("shards deleted");
    let st = s
        .status("llama", "Terminating, waiting for both", |st| {
            st.phase == Some(DeploymentPhase::Terminating)
                && condition(st, "Ready").is_some_and(|c| {
                    c.reason == "Terminating" && c.message.contains("release 2 shards")
                })
        })
        .await;
    let message = &condition(&st, "Ready").expect("Ready").message;
    assert!(
        message.contains("llama-e1-r0") && message.contains("llama-e1-r1"),
        "{message}"
    );

    // Rank 0's agent unloads; rank 1's is still at it.
    s.agents
        .report_running(&shards[0].spec.node_name, &[])
        .await
        .expect("report");
    let st = s
        .status("llama", "waiting for one", |st| {
            condition(st, "Ready").is_some_and(|c| c.message.contains("release 1 shards"))
        })
        .await;
    assert!(
        condition(&st, "Ready")
            .expect("Ready")
            .message
            .contains("llama-e1-r1")
    );
    assert!(
        s.deployments()
            .get_opt("llama")
            .await
            .expect("get")
            .is_some()
    );

    s.agents
        .report_running(&shards[1].spec.node_name, &[])
        .await
        .expect("report");
    let api = s.deployments();
    let api = &api;
    eventually("the deployment to be gone", WAIT, || async move {
        Ok(api.get_opt("llama").await?.is_none().then_some(()))
    })
    .await
    .expect("deployment gone");
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), s.ns());
    let secrets = &secrets;
    eventually(
        "the group-token Secret to be collected",
        WAIT,
        || async move {
            Ok(secrets
                .get_opt("llama-group-token")
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await
    .expect("secret gone");
}

#[tokio::test]
async fn with_two_operators_only_the_leader_writes() {
    let s = Setup::new("leader").await;
    let lease = format!("op-{}", s.ns());
    let (mut a, b) = s.leader_and_standby("leader-a", "leader-b").await;
    let admin = &s.admin;
    let lease_ref = &lease;

    s.nodes(2, 64, 30).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    s.shards(1, 2).await;
    s.status("llama", "Loading", |st| {
        st.phase == Some(DeploymentPhase::Loading)
    })
    .await;
    assert!(a.metric("tandem_operator_reconciles_total").expect("a") >= 1.0);
    assert_eq!(a.metric("tandem_operator_leader").expect("a"), 1.0);
    assert_eq!(
        b.metric("tandem_operator_reconciles_total").expect("b"),
        0.0,
        "b must not reconcile"
    );
    assert_eq!(b.metric("tandem_operator_leader").expect("b"), 0.0);
    let reporters: Vec<String> = events(&s.admin, s.ns(), "llama")
        .await
        .expect("events")
        .into_iter()
        .map(|(_, _, instance)| instance)
        .collect();
    assert!(
        !reporters.is_empty() && reporters.iter().all(|i| i == "leader-a"),
        "{reporters:?}"
    );
    assert_eq!(all_shards(&s.admin, s.ns()).await.expect("shards").len(), 2);

    // A stops cleanly and hands the Lease over; B takes over and acts.
    assert_eq!(
        a.terminate().expect("terminate a"),
        Some(0),
        "{}",
        a.log_tail()
    );
    assert!(
        a.log_tail().contains("released the leader Lease"),
        "{}",
        a.log_tail()
    );
    eventually(
        "operator b to lead",
        Duration::from_secs(15),
        || async move {
            Ok(
                (lease_holder(admin, lease_ref).await?.as_deref() == Some("leader-b"))
                    .then_some(()),
            )
        },
    )
    .await
    .expect("b leads");
    s.deployments()
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sharding": {"worldSize": 1}}})),
        )
        .await
        .expect("scale");
    let shards = s.only_epoch(2).await;
    assert_eq!(shards.len(), 1);
    assert!(b.metric("tandem_operator_reconciles_total").expect("b") >= 1.0);
    assert_eq!(b.metric("tandem_operator_leader").expect("b"), 1.0);
    let scaling: Vec<(String, String, String)> = events(&s.admin, s.ns(), "llama")
        .await
        .expect("events")
        .into_iter()
        .filter(|(r, _, _)| r == "Scaling")
        .collect();
    assert!(
        scaling.iter().all(|(_, _, i)| i == "leader-b"),
        "{scaling:?}"
    );
}
