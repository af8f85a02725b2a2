//! The user story of an API server restart while a group serves: requests
//! keep being answered throughout, nothing is re-placed, and afterwards the
//! operator and the agents act on changes again. A test process of its own,
//! because stopping the shared API server would disturb any test beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tandem_crds::*;
use tandem_tests::{
    SYSTEM_NAMESPACE, cluster, eventually,
    http::openai_chat,
    story::{CAPITAL, Story, WAIT, ask},
};

#[tokio::test]
async fn the_group_keeps_serving_through_an_api_server_restart() {
    // Production-length Leases (the agents' default): an API server outage
    // shorter than a Lease must not cost a node.
    let s = Story::with_lease("restart", 3, 15).await;
    s.apply(&s.deployment("smol", 3));
    let st = s.serving("smol", 3, 0).await;
    ask(&st, CAPITAL).await;
    let shards_before: Vec<String> = s
        .shards("smol")
        .await
        .iter()
        .map(|x| x.uid().unwrap_or_default())
        .collect();

    // Chat without pause while the API server is stopped and started.
    let endpoint = st.endpoint.clone().expect("endpoint");
    let ca = st.ca_bundle.clone().expect("status.caBundle");
    let stop = Arc::new(AtomicBool::new(false));
    let chatter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                let (answer, _) = openai_chat(&endpoint, Some(&ca), CAPITAL.0)?;
                anyhow::ensure!(answer.contains(CAPITAL.1), "a wrong answer: {answer:?}");
                answered += 1;
            }
            anyhow::Ok(answered)
        })
    };
    let restart = tokio::task::spawn_blocking(|| cluster().restart_apiserver())
        .await
        .expect("join");
    restart.unwrap_or_else(|e| panic!("restarting the API server: {e:#}"));
    stop.store(true, Ordering::Relaxed);
    let answered = chatter
        .join()
        .expect("chat thread")
        .unwrap_or_else(|e| panic!("a request failed while the API server restarted: {e:#}"));
    assert!(answered > 0, "no request completed during the restart");

    // The agents renew their Leases against the new API server.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.admin.clone(), SYSTEM_NAMESPACE);
    let names: Vec<String> = s.agents.iter().flatten().map(|a| a.name.clone()).collect();
    let leases = &leases;
    let renewed_before = {
        let mut times = Vec::new();
        for n in &names {
            let lease = leases.get(n).await.expect("lease");
            times.push(lease.spec.and_then(|l| l.renew_time).map(|t| t.0));
        }
        times
    };
    for (n, before) in names.iter().zip(renewed_before) {
        eventually(&format!("{n} renews its Lease"), WAIT, || async move {
            let lease = leases.get(n).await?;
            let now = lease.spec.and_then(|l| l.renew_time).map(|t| t.0);
            Ok((now > before).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // Nothing was re-placed: the same epoch and shard objects, still Serving.
    let still = s
        .status("smol", "Serving", |x| {
            x.phase == Some(DeploymentPhase::Serving)
        })
        .await;
    assert_eq!(still.epoch, st.epoch, "re-placed: {:?}", still.conditions);
    let shards_after: Vec<String> = s
        .shards("smol")
        .await
        .iter()
        .map(|x| x.uid().unwrap_or_default())
        .collect();
    assert_eq!(shards_after, shards_before);

    // All reconnected: the operator places a scale-down and the agents
    // form the new group.
    s.scale("smol", 1);
    let one = s.serving("smol", 1, st.epoch).await;
    ask(&one, CAPITAL).await;
    let api: Api<LlamaShard> = Api::namespaced(s.admin.clone(), s.ns());
    eventually("the old epoch's shards gone", WAIT, || async {
        let list = api.list(&ListParams::default()).await?.items;
        Ok(list.iter().all(|x| x.spec.epoch == one.epoch).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}
