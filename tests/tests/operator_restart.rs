//! The operator across a kube-apiserver restart: it reconnects its watches
//! (and, when renewing its leader Lease failed for too long, leads again),
//! places nothing twice, and keeps working afterwards. A suite of its own,
//! because stopping the API server would disturb any test running beside it.

use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tandem_crds::*;
use tandem_tests::{
    eventually,
    operator::{Setup, WAIT, all_shards, deployment, token},
};

#[tokio::test]
async fn after_an_api_server_restart_the_operator_reconnects_and_duplicates_nothing() {
    let s = Setup::new("restart").await;
    let mut op = s.operator("a");
    s.nodes(2, 64, 60).await;
    s.create(&deployment("llama", 2, &s.agents)).await;
    let before = s.shards(1, 2).await;
    s.serve("llama", 1, 2).await;
    let token_before = token(&s.admin, s.ns(), "llama").await.expect("token");

    s.cluster
        .restart_apiserver()
        .expect("restarting kube-apiserver");

    // The operator is back once it reconciles again: a new label is no spec
    // change, so that reconcile only confirms what is there.
    let seen = op.metric("tandem_operator_reconciles_total").unwrap_or(0.0);
    s.deployments()
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"poke": "1"}}})),
        )
        .await
        .expect("poke");
    let op_ref = &op;
    eventually("the operator to reconcile again", WAIT, || async move {
        Ok(op_ref
            .metric("tandem_operator_reconciles_total")
            .ok()
            .filter(|n| *n > seen))
    })
    .await
    .expect("reconciles resume");
    assert!(op.running(), "the operator survived: {}", op.log_tail());

    // Nothing was placed again: the same two shard objects, the same epoch,
    // the same token, no restart.
    let after = all_shards(&s.admin, s.ns()).await.expect("shards");
    let uids = |v: &[LlamaShard]| v.iter().map(|s| s.uid()).collect::<Vec<_>>();
    assert_eq!(uids(&after), uids(&before), "the same shard objects");
    let st = s
        .status("llama", "Serving", |st| {
            st.phase == Some(DeploymentPhase::Serving)
        })
        .await;
    assert_eq!((st.epoch, st.restart_count), (1, 0));
    assert_eq!(
        token(&s.admin, s.ns(), "llama").await.expect("token"),
        token_before
    );

    // And it still acts on changes.
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
    s.serve("llama", 2, 1).await;
}
