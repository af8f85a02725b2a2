//! What a user does with Tandem, end to end: the real operator and real
//! agents (each its own node, both with the chart's identities) against the
//! real API server, real MLX rank workers on real sockets, and the real
//! `openai` client. Nothing here plays a component.
//!
//! The API server restart story is in `user_story_restart.rs`: it stops the
//! shared API server, so it runs in a test process of its own.

mod agent_support;
mod operator_support;
mod story_support;

use std::collections::BTreeSet;

use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use story_support::*;
use tandem_crds::*;
use tandem_tests::eventually;

/// apply → Serving → chat → `kubectl scale` 2 → 4 → 1, chatting at every
/// size → delete → every shard gone and every agent unloaded.
#[tokio::test]
async fn apply_chat_scale_and_delete() {
    let s = Story::new("life", 4).await;
    let d = s.deployment("tiny", 2);
    s.apply(&d);

    let st = s.serving("tiny", 2, 0).await;
    assert_eq!(reason(&st, "Ready"), "Serving", "{:?}", st.conditions);
    let nodes = nodes_of(&st);
    assert_eq!(
        nodes.iter().collect::<BTreeSet<_>>().len(),
        2,
        "one rank per node: {nodes:?}"
    );
    let (_, tokens) = chat(&st, "Hello from two ranks?").await;
    assert!(tokens > 0);
    // Each of the two nodes' agents reports running its shard.
    for (rank, node) in nodes.iter().enumerate() {
        let running = s.running_on(node).await;
        assert!(
            running.contains(&format!("tiny-e{}-r{rank}", st.epoch)),
            "{node} runs {running:?}"
        );
    }

    s.scale("tiny", 4);
    let four = s.serving("tiny", 4, st.epoch).await;
    // Stable placement: the first two ranks stay where they were.
    assert_eq!(&nodes_of(&four)[..2], &nodes[..], "{:?}", four.ranks);
    s.event("tiny", "Scaling").await;
    chat(&four, "And from four?").await;

    s.scale("tiny", 1);
    let one = s.serving("tiny", 1, four.epoch).await;
    chat(&one, "Just one now?").await;
    // Only the new epoch's shard is left.
    let left = eventually("only the epoch of world size 1", WAIT, || async {
        let shards = s.shards("tiny").await;
        Ok((shards.len() == 1 && shards[0].spec.epoch == one.epoch).then_some(shards))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(left[0].spec.world_size, 1);

    s.deployments()
        .delete("tiny", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the deployment and its shards gone", WAIT, || async {
        let gone = s.deployments().get_opt("tiny").await?.is_none();
        Ok((gone && s.shards("tiny").await.is_empty()).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    for agent in s.agents.iter().flatten() {
        let name = agent.name.clone();
        eventually(&format!("{name} unloaded"), WAIT, || async {
            let running = s.running_on(&name).await;
            Ok((running.is_empty() && agent.workers().is_empty()).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// A rank's agent killed (kill -9) → its Lease expires → Degraded → the
/// rank moves to the spare node → Serving again, and the killed node's
/// return does not disturb the group.
#[tokio::test]
async fn an_agent_killed_and_recovery() {
    let mut s = Story::new("kill", 3).await;
    s.apply(&s.deployment("tiny", 2));
    let st = s.serving("tiny", 2, 0).await;
    chat(&st, "Before the fall?").await;

    let lost = nodes_of(&st)[1].clone();
    let index = s.agent_on(&lost).expect("the agent of rank 1");
    s.kill_agent(index);

    let degraded = s
        .status("tiny", "not Serving after the node was lost", |x| {
            x.phase != Some(DeploymentPhase::Serving)
        })
        .await;
    assert!(
        matches!(
            degraded.phase,
            Some(DeploymentPhase::Degraded | DeploymentPhase::Placing | DeploymentPhase::Loading)
        ),
        "{:?}",
        degraded.phase
    );
    s.event("tiny", "Degraded").await;

    let healed = s.serving("tiny", 2, st.epoch).await;
    let now = nodes_of(&healed);
    assert!(!now.contains(&lost), "{lost} is gone, yet placed: {now:?}");
    assert_eq!(now[0], nodes_of(&st)[0], "rank 0 stays put");
    chat(&healed, "After the fall?").await;

    // The node comes back: it registers again, and the serving group is
    // left as it is.
    s.restart_agent(index);
    s.wait_nodes_ready().await;
    let after = s
        .status("tiny", "still Serving after the node returned", |x| {
            x.phase == Some(DeploymentPhase::Serving)
        })
        .await;
    assert_eq!(after.epoch, healed.epoch);
    chat(&after, "Still there?").await;
}

/// Bad specs become a condition with a reason and a message saying what
/// works, and an Event; nothing is placed; fixing the spec serves.
#[tokio::test]
async fn an_invalid_spec_becomes_a_condition_and_an_event() {
    let s = Story::new("bad", 2).await;

    // 8 heads / 4 KV heads: 3 ranks cannot split them.
    s.apply(&s.deployment("three", 3));
    // A model that is in no catalog, with no architecture given.
    let mut unknown = s.deployment("unknown", 1);
    unknown.spec.model = "someone/Unheard-Of-Llama".into();
    unknown.spec.architecture = None;
    s.apply(&unknown);
    // More ranks than nodes.
    s.apply(&s.deployment("crowd", 4));

    for (name, reason_, hint) in [
        ("three", "InvalidSharding", "valid world sizes: 1, 2, 4"),
        ("unknown", "UnknownModel", "spec.architecture"),
        ("crowd", "NoMatchingNodes", "scale to 2"),
    ] {
        let st = s
            .status(name, reason_, |x| {
                operator_support::has(x, "Placed", "False", reason_)
            })
            .await;
        let placed = operator_support::condition(&st, "Placed").expect("Placed");
        assert!(
            placed.message.contains(hint),
            "{name}: {:?} lacks {hint:?}",
            placed.message
        );
        assert_eq!(reason(&st, "Ready"), reason_, "{name}: {:?}", st.conditions);
        let note = s.event(name, reason_).await;
        assert_eq!(note, placed.message);
        assert!(s.shards(name).await.is_empty(), "{name} has shards");
    }

    // The user reads the message and fixes the spec.
    s.deployments()
        .patch(
            "three",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sharding": {"worldSize": 2}}})),
        )
        .await
        .expect("patch");
    let st = s.serving("three", 2, 0).await;
    assert!(
        operator_support::has(&st, "Placed", "True", "Placed"),
        "{:?}",
        st.conditions
    );
    chat(&st, "Fixed?").await;
}

/// Two deployments on the same two nodes: both serve, each node's agent
/// runs one shard of each, and deleting one leaves the other serving.
#[tokio::test]
async fn two_deployments_share_nodes() {
    let s = Story::new("share", 2).await;
    s.apply(&s.deployment("left", 2));
    s.apply(&s.deployment("right", 2));
    let left = s.serving("left", 2, 0).await;
    let right = s.serving("right", 2, 0).await;
    assert_ne!(left.endpoint, right.endpoint);
    for agent in s.agents.iter().flatten() {
        let running = s.running_on(&agent.name).await;
        assert_eq!(running.len(), 2, "{}: {running:?}", agent.name);
        assert_eq!(agent.workers().len(), 2, "{}", agent.name);
    }
    let (a, b) = tokio::join!(chat(&left, "Left?"), chat(&right, "Right?"));
    assert!(a.1 > 0 && b.1 > 0);

    s.deployments()
        .delete("left", &DeleteParams::default())
        .await
        .expect("delete");
    for agent in s.agents.iter().flatten() {
        let name = agent.name.clone();
        eventually(&format!("{name} runs only right"), WAIT, || async {
            let running = s.running_on(&name).await;
            Ok((running.len() == 1 && running[0].starts_with("right-")).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let still = s
        .status("right", "Serving", |x| {
            x.phase == Some(DeploymentPhase::Serving)
        })
        .await;
    assert_eq!(still.epoch, right.epoch);
    chat(&still, "Still right?").await;
}
