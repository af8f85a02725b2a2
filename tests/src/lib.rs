//! Tandem's test harness: what the end-to-end suites in `tests/tests/` and
//! the agent benchmark in `tests/examples/` share, one module a subject.
//!
//! - [`control_plane`]: the local API server (started once per process), the
//!   identities on it, a namespace per test. Its everyday items are
//!   re-exported here.
//! - [`process`]: the workspace's binaries, child processes that log to a
//!   file, free ports, scratch directories, tmpfs mounts, `/proc`.
//! - [`http`]: the clients a test reaches a server with (plain HTTP over TCP,
//!   TLS with a deployment's CA, the `openai` Python client).
//! - [`agent`]: real `tandem-agent run` processes, the tiny and the real test
//!   model, and shards written the way the operator writes them (the agent
//!   suites play the operator).
//! - [`hub`]: a local stand-in for the Hugging Face hub, with injected faults.
//! - [`operator`]: the real operator as a child process, and test code playing
//!   the agents (the operator suites play the agents).
//! - [`story`]: the user stories' world: the real operator and real agents
//!   serving the real model, and what a user does to them.

pub mod agent;
pub mod control_plane;
pub mod http;
pub mod hub;
pub mod operator;
pub mod process;
pub mod story;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;

pub use control_plane::{
    Cluster, Identity, SYSTEM_NAMESPACE, TEST_PID_LABEL, TestNamespace, admin, client_from,
    cluster, node_cluster, node_cluster_dir, unique_name,
};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with
/// `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
