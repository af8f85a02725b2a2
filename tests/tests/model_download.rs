//! Model downloads under faults, with real `tandem-agent download`
//! processes against the local hub over real sockets: a cut or stalled
//! connection is resumed by range, a killed download resumes and never
//! leaves a snapshot that lookups take, corrupted bytes of the right size are
//! refused, two processes share one transfer, and a disk that is too small
//! is refused before anything is fetched. No API server is needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tandem_tests::{
    agent::{MODEL, agent_binary, model_dir},
    hub::{COMMIT, Fault, Hub},
    process::{Tmpfs, scratch},
};

const WEIGHTS: &str = "model.safetensors";

fn repo_dir(dest: &Path) -> PathBuf {
    dest.join(format!("models--{}", MODEL.replace('/', "--")))
}

fn snapshot(dest: &Path) -> PathBuf {
    repo_dir(dest).join("snapshots").join(COMMIT)
}

fn staging(dest: &Path) -> PathBuf {
    dest.join(".staging")
        .join(format!("models--{}", MODEL.replace('/', "--")))
        .join(COMMIT)
}

fn download_command(hub: &Hub, dest: &Path, extra_env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.args(["download", MODEL, "--download-dir"])
        .arg(dest)
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `tandem-agent download` to its end.
fn download(hub: &Hub, dest: &Path, extra_env: &[(&str, &str)]) -> Output {
    download_command(hub, dest, extra_env)
        .output()
        .expect("running tandem-agent download")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the download succeeded and the snapshot equals the served model.
fn assert_complete(out: &Output, dest: &Path) {
    assert!(out.status.success(), "{}", text(out));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(PathBuf::from(&printed), snapshot(dest), "{}", text(out));
    let source = model_dir().join(MODEL);
    for entry in std::fs::read_dir(&source).expect("model").flatten() {
        let name = entry.file_name();
        let got = std::fs::read(snapshot(dest).join(&name)).expect("downloaded file");
        assert!(
            got == std::fs::read(entry.path()).expect("source file"),
            "{name:?} differs from the served bytes"
        );
    }
    assert!(snapshot(dest).join(".tandem-complete.json").is_file());
    let reference = std::fs::read_to_string(repo_dir(dest).join("refs/main")).expect("refs/main");
    assert_eq!(reference.trim(), COMMIT);
    assert!(!staging(dest).exists(), "the staging directory was moved");
}

async fn hub() -> Hub {
    Hub::start(&[(MODEL, model_dir().join(MODEL))], Duration::ZERO).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_is_verified_staged_and_published_in_one_rename() {
    let hub = hub().await;
    let dest = scratch("dl-plain");
    let out = download(&hub, &dest, &[]);
    assert_complete(&out, &dest);
    assert_eq!(hub.fetches(WEIGHTS), vec![None], "one whole GET");
    assert_eq!(hub.fetches("config.json"), vec![None]);
    let info = hub.paths();
    assert!(
        info.iter()
            .any(|p| p == &format!("/api/models/{MODEL}/revision/main?blobs=true")),
        "{info:?}"
    );
    // A second run finds it complete and fetches nothing.
    let again = download(&hub, &dest, &[]);
    assert_complete(&again, &dest);
    assert_eq!(hub.fetches(WEIGHTS).len(), 1, "{:?}", hub.paths());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_resumed_by_range() {
    let hub = hub().await;
    hub.fault(WEIGHTS, Fault::Cut(10_000), 1);
    let dest = scratch("dl-cut");
    let out = download(&hub, &dest, &[]);
    assert_complete(&out, &dest);
    assert_eq!(
        hub.fetches(WEIGHTS),
        vec![None, Some(10_000)],
        "the second GET resumes where the cut left off"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("retrying in 1s"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_times_out_and_is_resumed_by_range() {
    let hub = hub().await;
    hub.fault(WEIGHTS, Fault::Stall(20_000), 1);
    let dest = scratch("dl-stall");
    let out = download(
        &hub,
        &dest,
        &[("TANDEM_DOWNLOAD_READ_TIMEOUT_SECONDS", "1")],
    );
    assert_complete(&out, &dest);
    assert_eq!(hub.fetches(WEIGHTS), vec![None, Some(20_000)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_download_resumes_and_no_partial_snapshot_is_ever_taken() {
    let hub = hub().await;
    let dest = scratch("dl-killed");
    // What an older agent, downloading in place, left when it was killed:
    // the ref and a snapshot with config.json but no weights.
    std::fs::create_dir_all(snapshot(&dest)).expect("snapshot");
    std::fs::copy(
        model_dir().join(MODEL).join("config.json"),
        snapshot(&dest).join("config.json"),
    )
    .expect("config");
    std::fs::create_dir_all(repo_dir(&dest).join("refs")).expect("refs");
    std::fs::write(repo_dir(&dest).join("refs/main"), COMMIT).expect("ref");

    hub.throttle(8 * 1024, Duration::from_millis(50));
    let mut child = download_command(&hub, &dest, &[])
        .spawn()
        .expect("tandem-agent download");
    let part = staging(&dest).join(format!("{WEIGHTS}.incomplete"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < 32 * 1024 {
        assert!(
            Instant::now() < deadline,
            "no bytes arrived in {}",
            part.display()
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the download ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let kept = std::fs::metadata(&part).expect("partial file kept").len();
    // The old partial snapshot is still all there is; it has no weights.
    assert!(!snapshot(&dest).join(WEIGHTS).exists());
    assert!(!snapshot(&dest).join(".tandem-complete.json").exists());

    hub.throttle(64 * 1024, Duration::from_millis(1));
    let out = download(&hub, &dest, &[]);
    assert_complete(&out, &dest);
    let fetches = hub.fetches(WEIGHTS);
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    assert!(
        fetches[1].is_some_and(|start| start as u64 >= kept.min(32 * 1024)),
        "the restarted download resumed by range from the kept {kept} bytes: {fetches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_of_the_right_size_are_fetched_again_then_refused() {
    // Corrupt once: the second fetch is good.
    let hub = hub().await;
    hub.fault(WEIGHTS, Fault::Corrupt, 1);
    let dest = scratch("dl-corrupt-once");
    let out = download(&hub, &dest, &[]);
    assert_complete(&out, &dest);
    assert_eq!(
        hub.fetches(WEIGHTS),
        vec![None, None],
        "fetched again from the start"
    );

    // Corrupt every time: refused with a reason that names the file.
    let hub = hub_always_corrupt().await;
    let dest = scratch("dl-corrupt-always");
    let out = download(&hub, &dest, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(MODEL)
            && err.contains(WEIGHTS)
            && err.contains("corrupt")
            && err.contains("sha256")
            && err.contains("downloaded twice"),
        "{err}"
    );
    assert_eq!(hub.fetches(WEIGHTS).len(), 2);
    assert!(!snapshot(&dest).exists(), "nothing became visible");
    assert!(!repo_dir(&dest).join("refs/main").exists());
}

async fn hub_always_corrupt() -> Hub {
    let hub = hub().await;
    hub.fault(WEIGHTS, Fault::Corrupt, usize::MAX);
    hub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_downloading_one_model_share_one_transfer() {
    let hub = hub().await;
    hub.throttle(8 * 1024, Duration::from_millis(20));
    let dest = scratch("dl-two");
    let first = download_command(&hub, &dest, &[])
        .spawn()
        .expect("first download");
    let second = download_command(&hub, &dest, &[])
        .spawn()
        .expect("second download");
    let (first, second) = tokio::task::spawn_blocking(move || {
        (
            first.wait_with_output().expect("first"),
            second.wait_with_output().expect("second"),
        )
    })
    .await
    .expect("join");
    assert_complete(&first, &dest);
    assert_complete(&second, &dest);
    assert_eq!(hub.fetches(WEIGHTS), vec![None], "one transfer for both");
    assert_eq!(hub.fetches("config.json"), vec![None]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&first.stderr),
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(logs.contains("waiting for another process"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_too_small_is_refused_before_anything_is_fetched() {
    let hub = hub().await;
    let dest = scratch("dl-small-disk").join("mnt");
    let _disk = Tmpfs::mount(&dest, "64k");
    let out = download(&hub, &dest, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(MODEL)
            && err.contains("more in")
            && err.contains(&dest.display().to_string())
            && err.contains("is free there"),
        "{err}"
    );
    assert!(hub.fetches(WEIGHTS).is_empty(), "{:?}", hub.paths());
    assert!(!snapshot(&dest).exists());
}
