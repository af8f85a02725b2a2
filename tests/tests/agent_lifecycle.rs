//! The shard lifecycle with real agents, real rank workers and the real
//! engine on a tiny generated model: a shard goes Ready and serves, is
//! released when deleted, is downloaded from a (local) hub when missing,
//! fails with a reason when the model is missing or malformed while the
//! agent carries on, and gives way to a newer epoch.

use std::time::Duration;

use serde_json::json;
use tandem_crds::ShardPhase;
use tandem_tests::{
    TestNamespace, admin,
    agent::{
        Agent, AgentOptions, Group, MODEL, WAIT, delete_shard, model_dir, node, node_ready,
        node_shard_names, shard_status, wait_phase,
    },
    cluster, eventually,
    http::{post, request},
    hub::{COMMIT, Hub},
    process::{alive, scratch},
    unique_name,
};

#[tokio::test]
async fn a_shard_loads_serves_and_is_released_when_deleted() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-life").await?;
    let node_name = unique_name("agent-life");
    let agent = Agent::start(cluster, &node_name, AgentOptions::tiny_model());
    let group = Group::new("solo", 1, std::slice::from_ref(&node_name));
    group.create(&admin, ns.name(), "token-solo").await?;
    let status = wait_phase(
        &admin,
        ns.name(),
        &group.shard_name(0),
        ShardPhase::Ready,
        WAIT,
    )
    .await?;
    assert!(status.load_seconds.is_some_and(|s| s > 0.0), "{status:?}");
    let progress = status.progress.clone().expect("progress");
    assert!(
        progress.bytes_done > 0 && progress.bytes_total == Some(progress.bytes_done),
        "{progress:?}"
    );
    assert_eq!(status.observed_generation, Some(1));

    let registered = eventually("the node to list the Ready shard", WAIT, || async {
        let n = node(&admin, &node_name).await?.expect("node");
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.shards.first())
            .is_some_and(|e| e.phase == Some(ShardPhase::Ready));
        Ok(ready.then_some(n))
    })
    .await?;
    let entry = registered
        .status
        .as_ref()
        .and_then(|s| s.shards.first())
        .cloned()
        .expect("node lists the shard");
    assert_eq!(entry.name, group.shard_name(0));
    assert_eq!(entry.phase, Some(ShardPhase::Ready));
    assert!(entry.memory_bytes > 0);
    assert!(
        registered
            .status
            .as_ref()
            .is_some_and(|s| s.allocated_bytes > 0)
    );

    let models = request(group.serving_port, "GET", "/v1/models", &[], None)?;
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()?["data"][0]["id"], MODEL);
    let done = post(
        group.serving_port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    )?;
    assert_eq!(done.status, 200, "{}", done.body);
    let body = done.json()?;
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=8).contains(&n)),
        "{body}"
    );
    let health = request(group.serving_port, "GET", "/healthz", &[], None)?;
    assert_eq!(health.status, 200);

    let workers = agent.workers();
    assert_eq!(workers.len(), 1, "one worker per shard");
    delete_shard(&admin, ns.name(), &group.shard_name(0)).await?;
    eventually("the node to release the shard", WAIT, || async {
        let n = node(&admin, &node_name).await?.expect("node");
        Ok(node_shard_names(&n).is_empty().then_some(()))
    })
    .await?;
    assert!(
        workers.iter().all(|pid| !alive(*pid)),
        "the worker is gone once released"
    );
    assert!(
        request(group.serving_port, "GET", "/healthz", &[], None).is_err(),
        "the serving port is closed"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_model_is_downloaded_from_the_hub_with_progress() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-dl").await?;
    let node_name = unique_name("agent-dl");
    // The hub answers slowly enough for the Downloading phase to be seen.
    let hub = Hub::start(
        &[(MODEL, model_dir().join(MODEL))],
        Duration::from_millis(400),
    )
    .await;
    let downloads = scratch(&format!("downloads-{node_name}"));
    let _agent = Agent::start(
        cluster,
        &node_name,
        AgentOptions {
            model_dirs: vec![downloads.clone()],
            env: vec![("HF_ENDPOINT".into(), hub.endpoint.clone())],
            ..AgentOptions::default()
        },
    );
    let group = Group::new("fetched", 1, std::slice::from_ref(&node_name));
    group.create(&admin, ns.name(), "token-dl").await?;
    let name = group.shard_name(0);
    // Record the phases (and download progress) the shard passes through.
    let seen = std::sync::Mutex::new(Vec::new());
    let status = eventually("the downloaded shard to be Ready", WAIT, || async {
        let s = shard_status(&admin, ns.name(), &name).await?;
        if let (Some(s), Ok(mut seen)) = (&s, seen.lock()) {
            seen.push((s.phase, s.progress.clone()));
        }
        Ok(s.filter(|s| s.phase == Some(ShardPhase::Ready)))
    })
    .await?;
    let seen = seen.into_inner().unwrap_or_default();
    assert!(status.load_seconds.is_some());
    let downloading: Vec<_> = seen
        .iter()
        .filter(|(p, _)| *p == Some(ShardPhase::Downloading))
        .collect();
    assert!(
        !downloading.is_empty(),
        "Downloading was reported: {seen:?}"
    );
    let total: i64 = std::fs::read_dir(model_dir().join(MODEL))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len() as i64)
        .sum();
    assert!(
        downloading
            .iter()
            .any(|(_, p)| p.as_ref().is_some_and(|p| p.bytes_total == Some(total))),
        "download progress names the total ({total} bytes): {seen:?}"
    );
    let paths = hub.paths();
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with(&format!("/api/models/{MODEL}/revision/main"))),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p == &format!("/{MODEL}/resolve/{COMMIT}/config.json")),
        "{paths:?}"
    );
    let snapshot = downloads
        .join(format!("models--{}", MODEL.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT);
    assert!(snapshot.join("config.json").is_file());
    assert!(snapshot.join("model.safetensors").is_file());
    let reference = std::fs::read_to_string(
        downloads
            .join(format!("models--{}", MODEL.replace('/', "--")))
            .join("refs/main"),
    )?;
    assert_eq!(reference.trim(), COMMIT);
    let done = post(
        group.serving_port,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    )?;
    assert_eq!(done.status, 200, "{}", done.body);
    Ok(())
}

#[tokio::test]
async fn missing_and_malformed_models_fail_with_reasons_while_the_agent_carries_on()
-> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-bad").await?;
    let node_name = unique_name("agent-bad");
    // A model directory with the good model and a broken copy whose
    // weights file is cut short.
    let dirs = scratch(&format!("bad-models-{node_name}"));
    let good = model_dir().join(MODEL);
    let broken = dirs.join("tandem-test/broken");
    std::fs::create_dir_all(&broken)?;
    for entry in std::fs::read_dir(&good)? {
        let entry = entry?;
        std::fs::copy(entry.path(), broken.join(entry.file_name()))?;
    }
    let weights = broken.join("model.safetensors");
    let len = std::fs::metadata(&weights)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)?
        .set_len(len / 2)?;

    let mut agent = Agent::start(
        cluster,
        &node_name,
        AgentOptions {
            model_dirs: vec![dirs.clone(), model_dir()],
            offline: true,
            ..AgentOptions::default()
        },
    );
    let mut malformed = Group::new("malformed", 1, std::slice::from_ref(&node_name));
    malformed.model = "tandem-test/broken".into();
    malformed.create(&admin, ns.name(), "t1").await?;
    let mut absent = Group::new("absent", 1, std::slice::from_ref(&node_name));
    absent.model = "tandem-test/absent".into();
    absent.create(&admin, ns.name(), "t2").await?;

    let failed = wait_phase(
        &admin,
        ns.name(),
        &malformed.shard_name(0),
        ShardPhase::Failed,
        WAIT,
    )
    .await?;
    assert_eq!(failed.reason.as_deref(), Some("CorruptModel"), "{failed:?}");
    let message = failed.message.unwrap_or_default();
    assert!(message.contains("model.safetensors"), "{message}");
    let missing = wait_phase(
        &admin,
        ns.name(),
        &absent.shard_name(0),
        ShardPhase::Failed,
        WAIT,
    )
    .await?;
    assert_eq!(
        missing.reason.as_deref(),
        Some("ModelNotFound"),
        "{missing:?}"
    );
    assert!(
        missing
            .message
            .unwrap_or_default()
            .contains("tandem-test/absent")
    );

    // The agent is still up, and still runs good shards.
    assert!(agent.running(), "{}", agent.log_text());
    let good_group = Group::new("good", 1, std::slice::from_ref(&node_name));
    good_group.create(&admin, ns.name(), "t3").await?;
    good_group.wait_ready(&admin, ns.name()).await?;
    let n = node(&admin, &node_name).await?.expect("node");
    assert_eq!(node_ready(&n).as_deref(), Some("True"));
    // A corrupt model is not retried in a loop: it stays Failed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = shard_status(&admin, ns.name(), &malformed.shard_name(0))
        .await?
        .expect("status");
    assert_eq!(still.phase, Some(ShardPhase::Failed));
    Ok(())
}

#[tokio::test]
async fn a_newer_epoch_replaces_the_stale_one() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-epoch").await?;
    let node_name = unique_name("agent-epoch");
    let agent = Agent::start(cluster, &node_name, AgentOptions::tiny_model());
    let first = Group::new("llama", 1, std::slice::from_ref(&node_name));
    first.create(&admin, ns.name(), "epoch-1").await?;
    first.wait_ready(&admin, ns.name()).await?;
    let old_workers = agent.workers();

    // The same deployment's next epoch: a new token in the same Secret, the
    // only one the node's Role names, as the operator does it.
    let second = Group::new("llama", 2, std::slice::from_ref(&node_name));
    second.create(&admin, ns.name(), "epoch-2").await?;
    second.wait_ready(&admin, ns.name()).await?;
    let old = shard_status(&admin, ns.name(), &first.shard_name(0))
        .await?
        .expect("old status");
    assert_eq!(old.phase, Some(ShardPhase::Terminating), "{old:?}");
    assert!(old.message.unwrap_or_default().contains("epoch 2"));
    assert!(
        old_workers.iter().all(|pid| !alive(*pid)),
        "the stale worker stopped"
    );
    assert_eq!(agent.workers().len(), 1);
    eventually("the node to list only the new epoch", WAIT, || async {
        let n = node(&admin, &node_name).await?.expect("node");
        Ok((node_shard_names(&n) == vec![second.shard_name(0)]).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn workers_do_not_outlive_a_killed_agent() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-orphan").await?;
    let node_name = unique_name("agent-orphan");
    let mut agent = Agent::start(cluster, &node_name, AgentOptions::tiny_model());
    let group = Group::new("orphan", 1, std::slice::from_ref(&node_name));
    group.create(&admin, ns.name(), "token-orphan").await?;
    group.wait_ready(&admin, ns.name()).await?;
    let workers = agent.workers();
    assert_eq!(workers.len(), 1);
    std::process::Command::new("kill")
        .args(["-KILL", &agent.pid().to_string()])
        .status()?;
    // The worker sees its stdin close and exits, freeing its ports.
    eventually(
        "the orphaned worker to exit",
        Duration::from_secs(20),
        || async { Ok(workers.iter().all(|pid| !alive(*pid)).then_some(())) },
    )
    .await?;
    assert!(!agent.running());
    Ok(())
}
