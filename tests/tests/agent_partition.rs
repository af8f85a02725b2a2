//! A partition of the ring link alone between two ranks, while the control
//! link stays up: the fault a stopped rank shows (the SIGSTOP test in
//! `node-agent/tests/serve_guards.rs`), made in the network instead.
//!
//! `tandem-agent serve` runs every rank over loopback, so it cannot cut one
//! link and keep the other. Here each rank runs in its own `tandem-agent
//! run`, against the real API server, with LlamaShards the test writes the
//! way the operator does (as in `agent_groups.rs`), so the test chooses the
//! addresses: rank 1's agent (and so its rank worker) runs in a network
//! namespace of its own, joined to the test's namespace, where rank 0's agent
//! runs, by two veth pairs:
//!
//! ```text
//!   test's namespace (rank 0, API server)     namespace tandem-np-PID-X (rank 1)
//!   nPIDXc0 10.213.K.1/24   <── control ──>   nPIDXc1 10.213.K.2/24
//!   nPIDXr0 10.213.K+1.1/24 <──── ring ────>  nPIDXr1 10.213.K+1.2/24
//! ```
//!
//! (PID: the test process; X: the case; K: the first free pair of subnets.)
//! The shards name rank 0's control service at `10.213.K.1` and the ring
//! peers at `10.213.K+1.1` and `.2`; MLX's ring binds each rank's own
//! address from the hostfile, so every ring byte crosses the ring pair
//! (the test checks its counters) and every control byte the other.
//! Cutting the link is `ip link set nPIDXr1 down` inside the namespace:
//! rank 1's side loses its route, rank 0's side loses its carrier, and
//! packets on an established connection vanish without a reset, as when a
//! cable is pulled. Nothing closes, so only the timeouts can notice. Healing
//! is `ip link set nPIDXr1 up`.
//!
//! Rank 1's agent must still reach the API server, which listens on the test
//! namespace's 127.0.0.1 only. A small bridge listens on the same port on
//! the namespace's own loopback and relays each connection through a Unix
//! socket (Unix sockets are not bound to a network namespace) to the real
//! API server, so the agent's kubeconfig (and the server's certificate,
//! issued for 127.0.0.1) is used unchanged. That path is the agent's link to
//! Kubernetes, not the group's, and the test never cuts it.
//!
//! Nothing leaves the machine: the addresses live only on these veth pairs,
//! and a blackhole route for each subnet (at a low priority) in the test's
//! namespace catches anything sent there if a pair's route ever goes. A
//! guard deletes the namespace, the pairs and the routes when the test ends,
//! passed or failed; what a run killed outright leaves behind, the next run
//! deletes (namespaces named after a process that is gone, and blackholes
//! whose subnet no interface holds).
//!
//! The cases:
//! - cut mid-stream: the client gets an error naming the stall within the
//!   watchdog bound, rank 0's `/healthz` says 503 with the reason (or its
//!   port is already closed), rank 0's shard fails `GroupStalled` and rank
//!   1's `PeerUnreachable`; while the link is down the restarted group fails
//!   to form within the barrier timeout (no hang), and once healed the agents'
//!   restarts re-form it and it answers again;
//! - cut before the group forms: both ranks fail `PeerUnreachable` (the MLX
//!   ring group did not form) within the barrier timeout, and once healed the
//!   group forms and serves.
//!
//! Needs root (`ip netns`, veth) and python3 (the bridge's namespace side).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tandem_crds::ShardPhase;
use tandem_tests::{
    Cluster, Identity, TestNamespace, admin,
    agent::{Agent, AgentOptions, Group, MODEL, WAIT, shard_status},
    cluster, eventually,
    http::{post, request, send},
    process::scratch,
    unique_name,
};

/// The watchdog's floor: rank 0 declares a stall once no step finished for
/// `max(this, 10 × the longest step)`; the tiny model's steps are far
/// shorter, so this is the bound.
const STALL_SECONDS: u64 = 3;
/// How long a rank waits for the MLX ring group to form.
const BARRIER_SECONDS: u64 = 5;
/// Slack for the failure to travel (worker exit, agent, status write, our
/// polling) on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(10);

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The two links between the test's namespace and rank 1's; see the module
/// doc. Dropping it deletes everything it made.
struct Lab {
    netns: String,
    /// The test side's interface names (control, ring).
    local: [String; 2],
    /// Rank 1's side of the ring pair.
    ring_far: String,
    /// The control and ring subnets' third octets.
    subnets: [u8; 2],
}

/// Output of `ip ARGS`, empty on failure.
fn ip_text(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs `ip ARGS`, ignoring failure: for removing what may be gone already.
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The blackholes' priority, low enough that a connected route wins.
const BLACKHOLE_METRIC: &str = "4242";

/// Removes what test processes that are gone left behind (killed outright,
/// their guards never ran): their namespaces (which takes the veth pairs
/// with them), then any of our blackholes whose subnet no interface here
/// holds any more.
fn sweep_stale() {
    for line in ip_text(&["netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("tandem-np-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            ip_quiet(&["netns", "del", name]);
        }
    }
    let addresses = ip_text(&["-4", "-o", "addr", "show"]);
    for line in ip_text(&["route", "show", "type", "blackhole"]).lines() {
        let mut words = line.split_whitespace().skip(1);
        let (Some(subnet), Some("metric"), Some(BLACKHOLE_METRIC)) =
            (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(prefix) = subnet
            .strip_prefix("10.213.")
            .and_then(|s| s.strip_suffix(".0/24"))
        else {
            continue;
        };
        if !addresses.contains(&format!("10.213.{prefix}.")) {
            ip_quiet(&[
                "route",
                "del",
                "blackhole",
                subnet,
                "metric",
                BLACKHOLE_METRIC,
            ]);
        }
    }
}

/// Held while a lab picks its subnets and takes them, so the cases of this
/// process never pick the same ones.
static PICKING: Mutex<()> = Mutex::new(());

impl Lab {
    /// Makes namespace `tandem-np-PID-TAG` and its two pairs, on the first
    /// two free subnets 10.213.K.0/24 (control) and 10.213.K+1.0/24 (ring)
    /// from a place that depends on the process id (so two test processes
    /// rarely even look at the same ones).
    fn new(tag: char) -> anyhow::Result<Lab> {
        let _picking = PICKING.lock().unwrap_or_else(|e| e.into_inner());
        sweep_stale();
        let pid = std::process::id();
        let taken = ip_text(&["-4", "-o", "addr", "show"]) + &ip_text(&["route", "show"]);
        let free = |k: u32| !taken.contains(&format!("10.213.{k}."));
        let start = pid % 126;
        let base = (0..126)
            .map(|i| 1 + 2 * ((start + i) % 126))
            .find(|&k| free(k) && free(k + 1))
            .context("no free pair of subnets under 10.213.0.0/16")?;
        let base = u8::try_from(base)?;
        // Interface names hold at most 15 bytes: `n` + pid (7 digits at
        // most) + tag + `c0`.
        let lab = Lab {
            netns: format!("tandem-np-{pid}-{tag}"),
            local: [format!("n{pid}{tag}c0"), format!("n{pid}{tag}r0")],
            ring_far: format!("n{pid}{tag}r1"),
            subnets: [base, base + 1],
        };
        // The guard exists from here on: a failure below removes what was
        // made.
        ip(&["netns", "add", &lab.netns])?;
        ip(&["-n", &lab.netns, "link", "set", "lo", "up"])?;
        for (local, subnet) in lab.local.iter().zip(lab.subnets) {
            let far = format!("{}1", local.trim_end_matches('0'));
            ip(&[
                "link", "add", local, "type", "veth", "peer", "name", &far, "netns", &lab.netns,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("10.213.{subnet}.1/24"),
                "dev",
                local,
            ])?;
            ip(&[
                "route",
                "add",
                "blackhole",
                &format!("10.213.{subnet}.0/24"),
                "metric",
                BLACKHOLE_METRIC,
            ])?;
            ip(&["link", "set", local, "up"])?;
            ip(&[
                "-n",
                &lab.netns,
                "addr",
                "add",
                &format!("10.213.{subnet}.2/24"),
                "dev",
                &far,
            ])?;
            ip(&["-n", &lab.netns, "link", "set", &far, "up"])?;
        }
        Ok(lab)
    }

    /// Rank 0's control address (test side of the control pair).
    fn control_host(&self) -> String {
        format!("10.213.{}.1", self.subnets[0])
    }

    /// The ring addresses of rank 0 (test side) and rank 1 (namespace side).
    fn ring_hosts(&self) -> Vec<String> {
        vec![
            format!("10.213.{}.1", self.subnets[1]),
            format!("10.213.{}.2", self.subnets[1]),
        ]
    }

    /// Rank 1's address on the control pair.
    fn far_control_host(&self) -> String {
        format!("10.213.{}.2", self.subnets[0])
    }

    /// Cuts the ring link.
    fn cut(&self) -> anyhow::Result<()> {
        ip(&["-n", &self.netns, "link", "set", &self.ring_far, "down"])
    }

    /// Restores the ring link.
    fn heal(&self) -> anyhow::Result<()> {
        ip(&["-n", &self.netns, "link", "set", &self.ring_far, "up"])
    }

    /// Bytes the test side sent into the control pair (`0`) or the ring
    /// pair (`1`).
    fn tx_bytes(&self, pair: usize) -> u64 {
        std::fs::read_to_string(format!(
            "/sys/class/net/{}/statistics/tx_bytes",
            self.local[pair]
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }

    /// Deletes the pairs first (so their routes go while the blackholes still
    /// catch anything sent there), then the namespace and the blackholes.
    /// Errors are ignored: any of it may be gone already.
    fn remove(&self) {
        for local in &self.local {
            ip_quiet(&["link", "del", local]);
        }
        ip_quiet(&["netns", "del", &self.netns]);
        for subnet in self.subnets {
            ip_quiet(&[
                "route",
                "del",
                "blackhole",
                &format!("10.213.{subnet}.0/24"),
                "metric",
                BLACKHOLE_METRIC,
            ]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The namespace side of the API-server bridge: listen on loopback at the
/// API server's port, relay every connection to a Unix socket.
const BRIDGE: &str = r#"
import socket, sys, threading
port, path = int(sys.argv[1]), sys.argv[2]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(64)
print("listening", flush=True)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
while True:
    conn, _ = server.accept()
    up = socket.socket(socket.AF_UNIX)
    up.connect(path)
    threading.Thread(target=pump, args=(conn, up), daemon=True).start()
    threading.Thread(target=pump, args=(up, conn), daemon=True).start()
"#;

/// Makes the API server reachable at its usual address from inside `lab`'s
/// namespace; see the module doc.
struct ApiBridge {
    child: Child,
    socket: PathBuf,
}

impl ApiBridge {
    fn new(cluster: &Cluster, lab: &Lab) -> anyhow::Result<ApiBridge> {
        let kubeconfig = std::fs::read_to_string(cluster.kubeconfig(Identity::Admin))?;
        let port: u16 = kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://127.0.0.1:"))
            .and_then(|p| p.trim().parse().ok())
            .context("no https://127.0.0.1:PORT server in the admin kubeconfig")?;
        let socket = scratch(&format!("api-bridge-{}", lab.netns)).join("api.sock");
        let listener = UnixListener::bind(&socket)?;
        // The test's side: each connection from the namespace becomes one to
        // the API server. The thread lives as long as the test process.
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let (Ok(mut conn_read), Ok(mut up_write)) =
                    (conn.try_clone(), upstream.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut conn_read, &mut up_write);
                    let _ = up_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut up_read, mut conn_write) = (upstream, conn);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_read, &mut conn_write);
                    let _ = conn_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.netns, "python3", "-c", BRIDGE])
            .arg(port.to_string())
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the bridge's namespace side")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "listening" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the API bridge did not start: {line:?}");
        }
        Ok(ApiBridge { child, socket })
    }
}

impl Drop for ApiBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One shard status as the test saw it, and when.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    rank: usize,
    phase: Option<ShardPhase>,
    reason: Option<String>,
    message: Option<String>,
}

/// Every change of the group's shard statuses, polled every 100 ms: a
/// Failed status lasts only as long as the agent's restart backoff.
#[derive(Clone, Default)]
struct History(Arc<Mutex<Vec<Seen>>>);

impl History {
    fn watch(&self, admin: kube::Client, namespace: String, group: &Group) {
        let history = self.clone();
        let names: Vec<String> = (0..group.nodes.len())
            .map(|r| group.shard_name(r))
            .collect();
        tokio::spawn(async move {
            let mut last: Vec<Option<(Option<ShardPhase>, Option<String>)>> =
                vec![None; names.len()];
            loop {
                for (rank, name) in names.iter().enumerate() {
                    if let Ok(Some(s)) = shard_status(&admin, &namespace, name).await {
                        let key = (s.phase, s.message.clone());
                        if last[rank].as_ref() != Some(&key) {
                            last[rank] = Some(key);
                            history.lock().push(Seen {
                                at: Instant::now(),
                                rank,
                                phase: s.phase,
                                reason: s.reason,
                                message: s.message,
                            });
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first status of `rank` seen after `since` that is Failed with
    /// `reason`, waiting up to `timeout` for it.
    async fn failed(
        &self,
        rank: usize,
        reason: &str,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Seen> {
        eventually(
            &format!(
                "rank {rank} to fail with {reason} (seen: {:#?})",
                self.dump()
            ),
            timeout,
            || async {
                Ok(self
                    .lock()
                    .iter()
                    .find(|s| {
                        s.rank == rank
                            && s.at >= since
                            && s.phase == Some(ShardPhase::Failed)
                            && s.reason.as_deref() == Some(reason)
                    })
                    .cloned())
            },
        )
        .await
    }

    fn dump(&self) -> Vec<String> {
        let history = self.lock();
        let start = history.first().map(|s| s.at);
        history
            .iter()
            .map(|s| {
                format!(
                    "+{:.1}s rank {} {:?} {:?}: {}",
                    start.map_or(0.0, |t| s.at.duration_since(t).as_secs_f64()),
                    s.rank,
                    s.phase,
                    s.reason,
                    s.message.as_deref().unwrap_or_default()
                )
            })
            .collect()
    }
}

/// Rank 0 in this namespace, rank 1 in `lab`'s, both with short watchdog
/// and formation bounds.
fn agents(cluster: &Cluster, lab: &Lab, prefix: &str) -> [Agent; 2] {
    let options = AgentOptions {
        barrier_timeout_seconds: Some(BARRIER_SECONDS),
        args: vec!["--stall-timeout-seconds".into(), STALL_SECONDS.to_string()],
        ..AgentOptions::tiny_model()
    };
    let rank0 = Agent::start(
        cluster,
        &unique_name(&format!("{prefix}-r0")),
        options.clone(),
    );
    let rank1 = Agent::start(
        cluster,
        &unique_name(&format!("{prefix}-r1")),
        AgentOptions {
            netns: Some(lab.netns.clone()),
            advertise_address: Some(lab.far_control_host()),
            ..options
        },
    );
    [rank0, rank1]
}

/// A group of two over `agents`, with the ring on `lab`'s ring pair and
/// rank 0's control service on its control pair.
fn group(lab: &Lab, deployment: &str, agents: &[Agent; 2]) -> Group {
    let nodes: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let mut group = Group::new(deployment, 1, &nodes);
    group.ring_hosts = lab.ring_hosts();
    group.control_host = lab.control_host();
    group.max_context_tokens = 8192;
    group
}

/// Waits until rank 0 answers a short chat completion.
async fn answers(group: &Group) -> anyhow::Result<()> {
    let port = group.serving_port;
    eventually("the group to answer", WAIT, || async move {
        let r = post(
            port,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "again"}], "max_tokens": 4}),
        );
        Ok(r.ok().filter(|r| r.status == 200))
    })
    .await?;
    Ok(())
}

/// A streamed completion to 127.0.0.1:`port`, read line by line (a hang
/// fails the test: [`send`]'s reads time out).
fn stream(port: u16) -> anyhow::Result<BufReader<TcpStream>> {
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 4000,
        "ignore_eos": true, "stream": true})
    .to_string();
    Ok(BufReader::new(send(
        port,
        "POST",
        "/v1/completions",
        &[],
        Some(&body),
    )?))
}

/// Reads until the stream's `error` event; `None` if it ended without one.
fn error_event(lines: &mut BufReader<TcpStream>) -> Option<Value> {
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                if let Some(data) = line.trim().strip_prefix("data: ")
                    && let Ok(value) = serde_json::from_str::<Value>(data)
                    && value.get("error").is_some()
                {
                    return Some(value);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_link_cut_mid_stream_fails_the_stream_within_the_watchdog_bound_and_the_group_serves_again()
-> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let lab = Lab::new('a')?;
    let _bridge = ApiBridge::new(cluster, &lab)?;
    let ns = TestNamespace::new(cluster, "agent-np-stream").await?;
    let agents = agents(cluster, &lab, "agent-np-stream");
    let group = group(&lab, "np-stream", &agents);
    group.create(&admin, ns.name(), "token-np-stream").await?;
    let history = History::default();
    history.watch(admin.clone(), ns.name().to_owned(), &group);
    group.wait_ready(&admin, ns.name()).await?;

    // A long stream; once tokens flow (over the ring pair: its counters
    // move), cut the ring link.
    let ring_before = lab.tx_bytes(1);
    let port = group.serving_port;
    let mut lines = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut lines = stream(port)?;
        let (mut tokens, mut line) = (0, String::new());
        while tokens < 5 {
            line.clear();
            anyhow::ensure!(lines.read_line(&mut line)? > 0, "the stream ended early");
            if line.starts_with("data: {") {
                tokens += 1;
            }
        }
        Ok(lines)
    })
    .await??;
    let ring_sent = lab.tx_bytes(1).saturating_sub(ring_before);
    assert!(
        ring_sent > 0,
        "the tokens' all_sums crossed the ring pair ({ring_sent} bytes)"
    );
    lab.cut()?;
    let cut = Instant::now();
    let control_at_cut = lab.tx_bytes(0);
    // Rank 0's /healthz, watched from the cut on: the first answer that is
    // not a 200 (or the port closing) is what a health check would see.
    let health = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(STALL_SECONDS) + SLACK;
        loop {
            match request(port, "GET", "/healthz", &[], None) {
                Ok(r) if r.status == 200 && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return (cut.elapsed(), other),
            }
        }
    });

    // The client gets an error naming the stall, within the bound.
    let error = tokio::task::spawn_blocking(move || error_event(&mut lines)).await?;
    let waited = cut.elapsed();
    let error = error.with_context(|| {
        format!(
            "the stream ended without an error event; shard statuses: {:#?}",
            history.dump()
        )
    })?;
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stalled"), "{error}");
    assert!(
        waited < Duration::from_secs(STALL_SECONDS) + SLACK,
        "the error came {waited:?} after the cut"
    );
    eprintln!("error event {waited:?} after the cut: {error}");

    // Rank 0's /healthz turned unhealthy with the reason, or its port closed
    // as the stalled worker ended.
    match health.await? {
        (after, Ok(health)) => {
            assert_eq!(health.status, 503, "{}", health.body);
            assert!(health.body.contains("stalled"), "{}", health.body);
            eprintln!(
                "/healthz {} {after:?} after the cut: {}",
                health.status, health.body
            );
        }
        (after, Err(e)) => {
            assert!(
                after < Duration::from_secs(STALL_SECONDS) + SLACK,
                "/healthz kept answering 200 for {after:?} after the cut"
            );
            eprintln!("/healthz: the port closed {after:?} after the cut ({e})");
        }
    }

    // The shards say what failed: rank 0 saw the stall, rank 1 lost rank 0.
    let stalled = history.failed(0, "GroupStalled", cut, WAIT).await?;
    let lost = history.failed(1, "PeerUnreachable", cut, WAIT).await?;
    eprintln!(
        "rank 0 Failed {:?} after the cut: {:?}",
        stalled.at - cut,
        stalled.message
    );
    eprintln!(
        "rank 1 Failed {:?} after the cut: {:?}",
        lost.at - cut,
        lost.message
    );

    // With the link still down, the restarted ranks meet on the control link
    // but the ring group cannot form: a bounded failure, not a hang.
    let retried = eventually("a restart to fail forming the ring group", WAIT, || async {
        Ok(history
            .lock()
            .iter()
            .find(|s| {
                s.at > stalled.at
                    && s.phase == Some(ShardPhase::Failed)
                    && s.reason.as_deref() == Some("PeerUnreachable")
                    && s.message
                        .as_deref()
                        .is_some_and(|m| m.contains("MLX ring group did not form"))
            })
            .cloned())
    })
    .await?;
    // The restarts met at rank 0's control service: that link carried
    // traffic while the ring was cut.
    assert!(
        lab.tx_bytes(0) > control_at_cut,
        "the control pair carried nothing during the cut"
    );
    eprintln!(
        "rank {} failed forming again {:?} after the cut: {:?}",
        retried.rank,
        retried.at - cut,
        retried.message
    );

    // Healed, the agents' restarts re-form the group, and it answers.
    lab.heal()?;
    let healed = Instant::now();
    group.wait_ready(&admin, ns.name()).await?;
    answers(&group).await?;
    eprintln!("serving again {:?} after the heal", healed.elapsed());
    for agent in &agents {
        assert_eq!(agent.workers().len(), 1, "one worker on {}", agent.name);
    }
    eprintln!("shard statuses:\n{}", history.dump().join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_link_cut_before_the_group_forms_fails_within_the_barrier_timeout_and_it_forms_once_healed()
-> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let lab = Lab::new('b')?;
    let _bridge = ApiBridge::new(cluster, &lab)?;
    let ns = TestNamespace::new(cluster, "agent-np-form").await?;
    let agents = agents(cluster, &lab, "agent-np-form");
    let group = group(&lab, "np-form", &agents);
    lab.cut()?;
    let created = Instant::now();
    group.create(&admin, ns.name(), "token-np-form").await?;
    let history = History::default();
    history.watch(admin.clone(), ns.name().to_owned(), &group);

    // Both ranks meet on the control link, then give up on the ring within
    // the barrier timeout (plus the agent's start of the worker).
    for rank in 0..2 {
        let failed = history
            .failed(rank, "PeerUnreachable", created, WAIT)
            .await?;
        let message = failed.message.clone().unwrap_or_default();
        assert!(message.contains("MLX ring group"), "{message}");
        let after = failed.at - created;
        assert!(
            after < Duration::from_secs(BARRIER_SECONDS) + SLACK,
            "rank {rank} failed {after:?} after the shards were written"
        );
        eprintln!("rank {rank} Failed {after:?} after the shards were written: {message}");
    }
    assert!(
        !history
            .lock()
            .iter()
            .any(|s| s.phase == Some(ShardPhase::Ready)),
        "no rank was Ready without its ring: {:#?}",
        history.dump()
    );

    // Healed, the next attempt forms the group, and it serves.
    lab.heal()?;
    let healed = Instant::now();
    group.wait_ready(&admin, ns.name()).await?;
    answers(&group).await?;
    eprintln!("serving {:?} after the heal", healed.elapsed());
    eprintln!("shard statuses:\n{}", history.dump().join("\n"));
    Ok(())
}
