//! The user story of an API server outage while a group comes up: the API
//! server is stopped for a minute while rank 0 loads, warms up and turns
//! Ready, and the deployment reaches Serving once the server is back,
//! because the agent keeps the newest shard status and writes it when it
//! can. A test process of its own, because stopping the shared API server
//! would disturb any test running beside it.

use std::time::{Duration, Instant};

use tandem_crds::*;
use tandem_tests::{
    cluster, eventually,
    http::openai_chat,
    story::{CAPITAL, Story, WAIT, ask},
};

/// How long the API server stays away.
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_shard_that_turns_ready_while_the_api_server_is_away_serves_after_it_returns() {
    // Production-length Leases: the outage, not a lost node, is the subject.
    let s = Story::with_lease("outage", 1, 15).await;
    s.apply(&s.deployment("smol", 1));

    // Rank 0's worker has started (it has its token) and is not Ready yet.
    let s_ref = &s;
    let (shard, phase) = eventually("rank 0's worker to start", WAIT, || async move {
        let shards = s_ref.shards("smol").await;
        Ok(shards.into_iter().find_map(|sh| {
            let st = sh.status.as_ref()?;
            let started = matches!(
                st.phase,
                Some(ShardPhase::Connecting | ShardPhase::Loading | ShardPhase::Loaded)
            ) || (st.phase == Some(ShardPhase::Pending)
                && st
                    .message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("started worker")));
            let phase = st.phase;
            started.then_some((sh, phase))
        }))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let host = shard.spec.peers[0]
        .address
        .rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .expect("rank 0's address");
    let endpoint = format!(
        "https://{host}:{}",
        shard.spec.serving_port.expect("rank 0's serving port")
    );
    // The CA a client trusts, while the API server can still be asked.
    let tls_secret = shard
        .spec
        .tls_secret_ref
        .as_ref()
        .expect("TLS is on by default")
        .name
        .clone();
    let ca = s.secret_text(&tls_secret, TLS_CA_KEY).await;

    tokio::task::spawn_blocking(|| cluster().stop_apiserver())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("stopping the API server: {e:#}"));
    let stopped = Instant::now();

    // While it is away rank 0 turns Ready: it answers.
    let ep = endpoint.clone();
    let answered = tokio::task::spawn_blocking(move || {
        while stopped.elapsed() < OUTAGE - Duration::from_secs(5) {
            if let Ok((answer, _)) = openai_chat(&ep, Some(&ca), CAPITAL.0) {
                return Some(answer);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        None
    })
    .await
    .expect("join");
    let ready_after = stopped.elapsed();
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    let start = tokio::task::spawn_blocking(|| cluster().start_apiserver())
        .await
        .expect("join");
    start.unwrap_or_else(|e| panic!("starting the API server: {e:#}"));
    let answer = answered.unwrap_or_else(|| {
        panic!("rank 0 (last seen {phase:?}) did not serve during the outage at {endpoint}")
    });
    assert!(answer.contains(CAPITAL.1), "{answer:?}");
    eprintln!("rank 0 served {ready_after:?} into a {OUTAGE:?} outage");

    // After it returns the deployment reaches Serving, in the same epoch:
    // the Ready status was written late, not lost.
    let st = s.serving("smol", 1, 0).await;
    assert_eq!((st.epoch, st.restart_count), (1, 0), "{:?}", st.conditions);
    assert_eq!(st.last_progress_time, None);
    ask(&st, CAPITAL).await;
    let log = s.agents[0].as_ref().expect("the agent").log_text();
    assert!(
        log.contains("writing the shard status failed; retrying"),
        "the agent never had to retry a status write:\n{log}"
    );
}
