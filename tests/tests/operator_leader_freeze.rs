//! Two operators whose leader is frozen (SIGSTOP) for longer than its
//! leader Lease: the other takes over and writes, and the old one, once it
//! wakes (SIGCONT), writes nothing, although its watches hand it a backlog
//! of changes to act on. A suite of its own, because it holds a process
//! frozen for a while.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tandem_crds::*;
use tandem_tests::{
    eventually,
    operator::{Setup, WAIT, all_shards, deployment, events, lease_holder},
};

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Every Event `instance` reported in `ns`, as (name, resourceVersion): a
/// new Event or an update of one (a series) both show.
async fn reported_by(client: &Client, ns: &str, instance: &str) -> Vec<(String, String)> {
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), ns);
    let mut v: Vec<(String, String)> = api
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reporting_instance.as_deref() == Some(instance))
        .map(|e| (e.name_any(), e.resource_version().unwrap_or_default()))
        .collect();
    v.sort();
    v
}

/// The resourceVersions of the deployment and of every shard.
async fn versions(s: &Setup) -> Vec<(String, String)> {
    let d = s.deployments().get("llama").await.expect("deployment");
    let mut v = vec![(d.name_any(), d.resource_version().unwrap_or_default())];
    for sh in all_shards(&s.admin, s.ns()).await.expect("shards") {
        v.push((sh.name_any(), sh.resource_version().unwrap_or_default()));
    }
    v.sort();
    v
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_writes_nothing_when_it_wakes() {
    let s = Setup::new("freeze").await;
    let lease = format!("op-{}", s.ns());
    let (mut a, _b) = s.leader_and_standby("freeze-a", "freeze-b").await;
    let (admin, lease_ref) = (&s.admin, &lease);

    // Node Leases that outlast the test: only the operator is frozen.
    s.nodes(2, 64, 600).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    s.shards(1, 2).await;
    s.status("llama", "Loading", |st| {
        st.phase == Some(DeploymentPhase::Loading)
    })
    .await;
    assert_eq!(a.metric("tandem_operator_leader").expect("a"), 1.0);

    // Freeze the leader. The Lease lasts 6 s (FAST): B takes over after it.
    signal(a.pid(), "-STOP");
    let frozen = Instant::now();
    eventually(
        "operator b to take the Lease over",
        Duration::from_secs(30),
        || async move {
            Ok(
                (lease_holder(admin, lease_ref).await?.as_deref() == Some("freeze-b"))
                    .then_some(()),
            )
        },
    )
    .await
    .expect("b leads");
    assert!(
        frozen.elapsed() >= Duration::from_secs(5),
        "b waited for the Lease"
    );

    // B writes: the ranks load and B reports Serving, with its own Events.
    let st = s.serve("llama", 1, 2).await;
    assert_eq!(st.restart_count, 0);
    let ns = s.ns();
    eventually("b to report Serving", WAIT, || async move {
        let ev = events(admin, ns, "llama").await?;
        Ok(ev
            .iter()
            .any(|(r, _, i)| r == "Serving" && i == "freeze-b")
            .then_some(()))
    })
    .await
    .expect("b's Serving Event");

    // A's watches have queued every one of those changes. Let B settle,
    // then wake A.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_events = reported_by(&s.admin, s.ns(), "freeze-a").await;
    let objects = versions(&s).await;
    assert!(
        frozen.elapsed() > Duration::from_secs(6),
        "frozen past the Lease"
    );
    signal(a.pid(), "-CONT");

    // A steps down and stands by ...
    let a_ref = &a;
    eventually(
        "operator a to step down",
        Duration::from_secs(30),
        || async move {
            Ok(a_ref
                .metric("tandem_operator_leader")
                .ok()
                .filter(|v| *v == 0.0))
        },
    )
    .await
    .expect("a steps down");
    // ... and, given time to act on its backlog, has written nothing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(a.running(), "a survived: {}", a.log_tail());
    assert_eq!(
        reported_by(&s.admin, s.ns(), "freeze-a").await,
        a_events,
        "a published Events after it woke: {}",
        a.log_tail()
    );
    assert_eq!(
        versions(&s).await,
        objects,
        "the deployment or a shard changed after a woke: {}",
        a.log_tail()
    );
    assert_eq!(
        lease_holder(admin, lease_ref)
            .await
            .expect("lease")
            .as_deref(),
        Some("freeze-b")
    );
    assert!(
        a.log_tail().contains("lost leadership; standing by"),
        "{}",
        a.log_tail()
    );

    // B keeps leading and acting.
    s.deployments()
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sharding": {"worldSize": 1}}})),
        )
        .await
        .expect("scale");
    assert_eq!(s.only_epoch(2).await.len(), 1);
    let scaling: Vec<String> = events(&s.admin, s.ns(), "llama")
        .await
        .expect("events")
        .into_iter()
        .filter(|(r, _, _)| r == "Scaling")
        .map(|(_, _, i)| i)
        .collect();
    assert!(
        !scaling.is_empty() && scaling.iter().all(|i| i == "freeze-b"),
        "{scaling:?}"
    );
    assert_eq!(reported_by(&s.admin, s.ns(), "freeze-a").await, a_events);
}
