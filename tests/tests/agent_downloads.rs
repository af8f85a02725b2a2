//! Downloads as shards see them, with real agents, a real API server and
//! the local hub: two shards of one model on one node share one transfer,
//! an agent killed mid-download resumes after its restart, corrupted bytes
//! fail the shard `CorruptModel`, and a download directory too small fails
//! it `InsufficientDisk`, naming the directory and the sizes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_crds::ShardPhase;
use tandem_tests::{
    TestNamespace, admin,
    agent::{Agent, AgentOptions, Group, MODEL, WAIT, model_dir, shard_status, wait_phase},
    cluster, eventually,
    hub::{Fault, Hub},
    process::{Tmpfs, scratch},
    unique_name,
};

const WEIGHTS: &str = "model.safetensors";

async fn hub() -> Hub {
    Hub::start(&[(MODEL, model_dir().join(MODEL))], Duration::ZERO).await
}

fn downloading_agent(
    cluster: &tandem_tests::Cluster,
    node_name: &str,
    hub: &Hub,
    dest: &Path,
) -> Agent {
    Agent::start(
        cluster,
        node_name,
        AgentOptions {
            model_dirs: vec![dest.to_path_buf()],
            env: vec![("HF_ENDPOINT".into(), hub.endpoint.clone())],
            ..AgentOptions::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_of_one_model_on_one_node_share_one_download() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "dl-shared").await?;
    let node_name = unique_name("dl-shared");
    let hub = hub().await;
    // Slow enough that the second shard arrives while the first downloads.
    hub.throttle(8 * 1024, Duration::from_millis(30));
    let dest = scratch(&format!("downloads-{node_name}"));
    let _agent = downloading_agent(cluster, &node_name, &hub, &dest);
    let first = Group::new("first", 1, std::slice::from_ref(&node_name));
    let second = Group::new("second", 1, std::slice::from_ref(&node_name));
    first.create(&admin, ns.name(), "token-a").await?;
    second.create(&admin, ns.name(), "token-b").await?;
    first.wait_ready(&admin, ns.name()).await?;
    second.wait_ready(&admin, ns.name()).await?;
    assert_eq!(
        hub.fetches(WEIGHTS),
        vec![None],
        "one transfer for both shards"
    );
    assert_eq!(hub.fetches("config.json"), vec![None]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_resumes_after_its_restart() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "dl-killed").await?;
    let node_name = unique_name("dl-killed");
    let hub = hub().await;
    hub.throttle(4 * 1024, Duration::from_millis(30));
    let dest = scratch(&format!("downloads-{node_name}"));
    let agent = downloading_agent(cluster, &node_name, &hub, &dest);
    let group = Group::new("killed", 1, std::slice::from_ref(&node_name));
    group.create(&admin, ns.name(), "token-k").await?;
    let name = group.shard_name(0);
    let seen = eventually("some bytes downloaded", WAIT, || async {
        let s = shard_status(&admin, ns.name(), &name).await?;
        Ok(s.filter(|s| {
            s.phase == Some(ShardPhase::Downloading)
                && s.progress
                    .as_ref()
                    .is_some_and(|p| p.bytes_done >= 32 * 1024)
        }))
    })
    .await?;
    Command::new("kill")
        .args(["-KILL", &agent.pid().to_string()])
        .status()?;
    drop(agent);
    let snapshot = dest
        .join(format!("models--{}", MODEL.replace('/', "--")))
        .join("snapshots");
    assert!(
        !snapshot.exists(),
        "nothing is visible before it is complete ({seen:?})"
    );

    hub.throttle(64 * 1024, Duration::from_millis(1));
    let _agent = downloading_agent(cluster, &node_name, &hub, &dest);
    wait_phase(&admin, ns.name(), &name, ShardPhase::Ready, WAIT).await?;
    let fetches = hub.fetches(WEIGHTS);
    assert!(
        fetches.len() == 2 && fetches[1].is_some_and(|start| start > 0),
        "the restarted agent resumed by range: {fetches:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_weights_fail_the_shard_corrupt_model() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "dl-corrupt").await?;
    let node_name = unique_name("dl-corrupt");
    let hub = hub().await;
    hub.fault(WEIGHTS, Fault::Corrupt, usize::MAX);
    let dest = scratch(&format!("downloads-{node_name}"));
    let _agent = downloading_agent(cluster, &node_name, &hub, &dest);
    let group = Group::new("corrupt", 1, std::slice::from_ref(&node_name));
    group.create(&admin, ns.name(), "token-c").await?;
    let failed = wait_phase(
        &admin,
        ns.name(),
        &group.shard_name(0),
        ShardPhase::Failed,
        WAIT,
    )
    .await?;
    assert_eq!(failed.reason.as_deref(), Some("CorruptModel"), "{failed:?}");
    let message = failed.message.unwrap_or_default();
    assert!(
        message.contains(WEIGHTS) && message.contains("sha256"),
        "{message}"
    );
    assert_eq!(hub.fetches(WEIGHTS).len(), 2, "fetched twice, then refused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_directory_too_small_fails_the_shard_insufficient_disk() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "dl-disk").await?;
    let node_name = unique_name("dl-disk");
    let hub = hub().await;
    let dest = scratch(&format!("downloads-{node_name}")).join("mnt");
    let _disk = Tmpfs::mount(&dest, "64k");
    let _agent = downloading_agent(cluster, &node_name, &hub, &dest);
    let group = Group::new("disk", 1, std::slice::from_ref(&node_name));
    group.create(&admin, ns.name(), "token-d").await?;
    let failed = wait_phase(
        &admin,
        ns.name(),
        &group.shard_name(0),
        ShardPhase::Failed,
        WAIT,
    )
    .await?;
    assert_eq!(
        failed.reason.as_deref(),
        Some("InsufficientDisk"),
        "{failed:?}"
    );
    let message = failed.message.unwrap_or_default();
    assert!(
        message.contains(MODEL)
            && message.contains(&dest.display().to_string())
            && message.contains("is free there"),
        "{message}"
    );
    assert!(hub.fetches(WEIGHTS).is_empty(), "{:?}", hub.paths());
    Ok(())
}
