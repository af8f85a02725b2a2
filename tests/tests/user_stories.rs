//! What a user does with Tandem, end to end: the real operator and real
//! agents (each its own node, both with the chart's identities) against the
//! real API server, real MLX rank workers on real sockets, and the real
//! `openai` client. Nothing here plays a component.
//!
//! The API server restart story is in `user_story_restart.rs`: it stops the
//! shared API server, so it runs in a test process of its own.

use std::collections::BTreeSet;

use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use tandem_crds::*;
use tandem_tests::{
    eventually,
    http::{endpoint_address, openai_chat, tls_connect},
    operator,
    story::{CAPITAL, LEASE_SECONDS, Story, WAIT, ask, nodes_of, reason},
};

/// apply at world size 1 → Serving → ask → `kubectl scale` 1 → 3 → 1,
/// asking at every size (the real model must answer correctly) → delete →
/// every shard gone and every agent unloaded.
#[tokio::test]
async fn apply_ask_scale_and_delete() {
    let s = Story::new("life", 4).await;
    s.apply(&s.deployment("smol", 1));

    let st = s.serving("smol", 1, 0).await;
    assert_eq!(reason(&st, "Ready"), "Serving", "{:?}", st.conditions);
    assert_eq!(st.valid_world_sizes, vec![1, 3], "{st:?}");
    // The openai client over TLS, trusting the CA of status.caBundle.
    ask(&st, CAPITAL).await;
    tls_is_required(&s, &st).await;
    let first = nodes_of(&st);
    let running = s.running_on(&first[0]).await;
    assert!(
        running.contains(&format!("smol-e{}-r0", st.epoch)),
        "{} runs {running:?}",
        first[0]
    );

    s.scale("smol", 3);
    let three = s.serving("smol", 3, st.epoch).await;
    let nodes = nodes_of(&three);
    assert_eq!(
        nodes.iter().collect::<BTreeSet<_>>().len(),
        3,
        "one rank per node: {nodes:?}"
    );
    // Stable placement: rank 0 stays where it was.
    assert_eq!(nodes[0], first[0], "{:?}", three.ranks);
    s.event("smol", "Scaling").await;
    // Each node's agent reports running its shard.
    for (rank, node) in nodes.iter().enumerate() {
        let running = s.running_on(node).await;
        assert!(
            running.contains(&format!("smol-e{}-r{rank}", three.epoch)),
            "{node} runs {running:?}"
        );
    }
    ask(&three, CAPITAL).await;

    s.scale("smol", 1);
    let one = s.serving("smol", 1, three.epoch).await;
    ask(&one, CAPITAL).await;
    // Only the new epoch's shard is left.
    let left = eventually("only the epoch of world size 1", WAIT, || async {
        let shards = s.shards("smol").await;
        Ok((shards.len() == 1 && shards[0].spec.epoch == one.epoch).then_some(shards))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(left[0].spec.world_size, 1);

    s.deployments()
        .delete("smol", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the deployment and its shards gone", WAIT, || async {
        let gone = s.deployments().get_opt("smol").await?.is_none();
        Ok((gone && s.shards("smol").await.is_empty()).then_some(()))
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

/// TLS is on by default and nothing else is served: a plain-HTTP client
/// gets no HTTP answer from rank 0, a client that does not trust the CA is
/// refused by its own verification, and the certificate is the operator's
/// `<deployment>-tls`, whose CA is the one published in `status.caBundle`.
async fn tls_is_required(s: &Story, st: &LlamaDeploymentStatus) {
    let endpoint = st.endpoint.clone().expect("endpoint");
    let (address, _) = endpoint_address(&endpoint);
    let plain = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(40)))?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::new();
        // The server ends the connection: a TLS alert at most, then EOF.
        let _ = stream.read_to_end(&mut answer);
        Ok(answer)
    })
    .await
    .expect("join")
    .expect("plain connection");
    assert!(
        !plain.starts_with(b"HTTP/"),
        "rank 0 answered plain HTTP: {}",
        String::from_utf8_lossy(&plain)
    );
    let ep = endpoint.clone();
    let untrusting = tokio::task::spawn_blocking(move || openai_chat(&ep, None, CAPITAL.0))
        .await
        .expect("join");
    let refusal = format!(
        "{:#}",
        untrusting.expect_err("the system roots do not know the CA")
    );
    assert!(refusal.contains("CERTIFICATE_VERIFY_FAILED"), "{refusal}");
    let ca = s.secret_text("smol-tls", TLS_CA_KEY).await;
    assert_eq!(Some(&ca), st.ca_bundle.as_ref());
}

/// A rank's agent killed (kill -9) → the group fails fast and re-forms →
/// its Lease expires → the rank moves to the spare node → Serving again,
/// answering correctly; the killed node's return does not disturb the group.
#[tokio::test]
async fn an_agent_killed_and_recovery() {
    let mut s = Story::new("kill", 4).await;
    s.apply(&s.deployment("smol", 3));
    let st = s.serving("smol", 3, 0).await;
    ask(&st, CAPITAL).await;

    let lost = nodes_of(&st)[1].clone();
    let index = s.agent_on(&lost).expect("the agent of rank 1");
    s.kill_agent(index);

    let degraded = s
        .status("smol", "not Serving after the node was lost", |x| {
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
    s.event("smol", "Degraded").await;

    let healed = s.serving("smol", 3, st.epoch).await;
    let now = nodes_of(&healed);
    assert!(!now.contains(&lost), "{lost} is gone, yet placed: {now:?}");
    assert_eq!(now[0], nodes_of(&st)[0], "rank 0 stays put");
    ask(&healed, CAPITAL).await;

    // The node comes back: it registers again, and the serving group is
    // left as it is.
    s.restart_agent(index);
    s.wait_nodes_ready().await;
    let after = s
        .status("smol", "still Serving after the node returned", |x| {
            x.phase == Some(DeploymentPhase::Serving)
        })
        .await;
    assert_eq!(after.epoch, healed.epoch);
    ask(&after, CAPITAL).await;
}

/// Bad specs become a condition with a reason and a message saying what
/// works, and an Event; nothing is placed; fixing the spec serves.
#[tokio::test]
async fn an_invalid_spec_becomes_a_condition_and_an_event() {
    let s = Story::new("bad", 2).await;

    // 9 heads / 3 KV heads: 2 ranks cannot split them.
    s.apply(&s.deployment("two", 2));
    // A model that is in no catalog, with no architecture given.
    let mut unknown = s.deployment("unknown", 1);
    unknown.spec.model = "someone/Unheard-Of-Llama".into();
    unknown.spec.architecture = None;
    s.apply(&unknown);
    // More ranks than nodes.
    s.apply(&s.deployment("crowd", 3));

    for (name, reason_, hint) in [
        ("two", "InvalidSharding", "valid world sizes: 1, 3"),
        ("unknown", "UnknownModel", "spec.architecture"),
        ("crowd", "NoMatchingNodes", "scale to 1"),
    ] {
        let st = s
            .status(name, reason_, |x| {
                operator::has(x, "Placed", "False", reason_)
            })
            .await;
        let placed = operator::condition(&st, "Placed").expect("Placed");
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
            "two",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sharding": {"worldSize": 1}}})),
        )
        .await
        .expect("patch");
    let st = s.serving("two", 1, 0).await;
    assert!(
        operator::has(&st, "Placed", "True", "Placed"),
        "{:?}",
        st.conditions
    );
    ask(&st, CAPITAL).await;
}

/// Two deployments on the same three nodes: both serve, each node's agent
/// runs one shard of each, and deleting one leaves the other serving.
#[tokio::test]
async fn two_deployments_share_nodes() {
    let s = Story::new("share", 3).await;
    s.apply(&s.deployment("left", 3));
    s.apply(&s.deployment("right", 3));
    let left = s.serving("left", 3, 0).await;
    let right = s.serving("right", 3, 0).await;
    assert_ne!(left.endpoint, right.endpoint);
    for agent in s.agents.iter().flatten() {
        let running = s.running_on(&agent.name).await;
        assert_eq!(running.len(), 2, "{}: {running:?}", agent.name);
        assert_eq!(agent.workers().len(), 2, "{}", agent.name);
    }
    tokio::join!(ask(&left, CAPITAL), ask(&right, CAPITAL));

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
    ask(&still, CAPITAL).await;
}

/// A rank that stops answering (its worker frozen with SIGSTOP, as a hung
/// process or a stalled GPU would look) in the middle of a streamed answer:
/// the client gets an error naming the stall within rank 0's watchdog
/// bound instead of waiting forever, the deployment goes Degraded saying
/// why, the operator re-forms the group, and it answers again.
#[tokio::test]
async fn a_frozen_rank_fails_requests_fast_and_the_group_reforms() {
    const STALL_SECONDS: u64 = 5;
    let s = Story::with_agent_args(
        "frozen",
        3,
        LEASE_SECONDS,
        &["--stall-timeout-seconds", &STALL_SECONDS.to_string()],
    )
    .await;
    s.apply(&s.deployment("smol", 3));
    let st = s.serving("smol", 3, 0).await;
    ask(&st, CAPITAL).await;
    let node = st.ranks[1].node.clone();
    let agent = s
        .agent_on(&node)
        .and_then(|i| s.agents[i].as_ref())
        .expect("rank 1's agent");
    let frozen = agent.workers();
    assert_eq!(frozen.len(), 1, "one worker on {node}");

    // A long streamed answer; freeze rank 1 once it flows.
    let endpoint = st.endpoint.clone().expect("endpoint");
    let ca = st.ca_bundle.clone().expect("status.caBundle");
    // The stories' context is 512 tokens: the prompt and 400 more.
    let body = json!({"model": "smol", "max_tokens": 400, "ignore_eos": true, "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story."}]})
    .to_string();
    let mut stream =
        tls_connect(&endpoint, &ca, std::time::Duration::from_secs(60)).expect("connect");
    use std::io::{BufRead, Write};
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut lines = std::io::BufReader::new(stream);
    let mut line = String::new();
    let mut pieces = 0;
    while pieces < 3 {
        line.clear();
        let read = lines.read_line(&mut line).expect("read");
        assert!(read > 0, "the stream ended after {pieces} pieces");
        assert!(!line.contains("\"error\""), "{line}");
        pieces += usize::from(line.starts_with("data: {"));
    }
    let status = std::process::Command::new("kill")
        .args(["-STOP", &frozen[0].to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let stopped = std::time::Instant::now();
    let mut error = None;
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(value) = line
                    .trim()
                    .strip_prefix("data: ")
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                    .filter(|v| v.get("error").is_some())
                {
                    error = Some(value);
                    break;
                }
            }
        }
    }
    let waited = stopped.elapsed();
    let error = error.expect("an error event ends the stream");
    println!("frozen rank: the stream's error after {waited:?}: {error}");
    // Two detectors race, both right: rank 0's watchdog ("the group
    // stalled") and the control link's HTTP/2 keep-alive, which notices
    // the frozen rank's silence within 15 s ("rank 1 left the group").
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("stalled") || message.contains("rank 1 left the group"),
        "{error}"
    );
    assert!(
        waited < std::time::Duration::from_secs(STALL_SECONDS + 15),
        "the error came {waited:?} after the freeze"
    );

    // Rank 0's health check no longer says ok: a 503 with the reason while
    // the failed worker winds down, then no answer until the group is back.
    let health =
        tls_connect(&endpoint, &ca, std::time::Duration::from_secs(5)).and_then(|mut h| {
            h.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            std::io::Read::read_to_string(&mut h, &mut answer)?;
            Ok(answer)
        });
    if let Ok(answer) = &health {
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // The deployment says why, then the operator re-forms the group (the
    // agent ends the frozen worker) and it answers again.
    let degraded = s
        .status("smol", "Degraded after the stall", |x| {
            x.phase == Some(DeploymentPhase::Degraded)
        })
        .await;
    let ready = degraded
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    // The watchdog's verdict, or the operator's account of the lost link,
    // which names the frozen rank.
    assert!(
        ready.contains("GroupStalled") || ready.contains("rank 1"),
        "{ready}"
    );
    let again = s.serving("smol", 3, st.epoch).await;
    ask(&again, CAPITAL).await;
    println!(
        "frozen rank: error after {waited:?}, serving again (epoch {}) {:?} after the freeze",
        again.epoch,
        stopped.elapsed()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{}", frozen[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", frozen[0]))
                .is_ok_and(|stat| stat.contains(") Z ")),
        "the frozen worker was ended"
    );
}
