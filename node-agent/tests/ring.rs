//! The MLX `ring` backend across real processes: the test starts the
//! `tandem-agent ring-selftest` binary once per rank on loopback, each rank
//! joins the group and all-sums known arrays, and the test checks the sums.
//! Every run is bounded, so a group that never forms fails instead of hanging.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Generous on a loaded 2-core machine; a healthy group forms in well under a second.
const GROUP_DEADLINE: Duration = Duration::from_secs(120);

/// One group at a time: ports are picked by binding and releasing them, and two
/// groups forming at once could be handed each other's just-released ports.
static ONE_GROUP_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn two_ranks_sum_over_the_ring() {
    check_world(2);
}

#[test]
fn four_ranks_sum_over_the_ring() {
    check_world(4);
}

/// A rank listens for its peers on its own hostfile address (the node's
/// advertised address, in a real group) and on no other interface: the ring
/// has no authentication, so it must not be reachable from every network
/// the machine is on (docs/agent.md, "The ring network").
#[test]
fn a_rank_listens_on_its_own_ring_address_only() {
    let _turn = ONE_GROUP_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = scratch_dir(0);
    let hostfile = dir.join("hostfile.json");
    let ports = free_ports(2);
    // Rank 1 never comes, so rank 0 keeps listening while the test looks.
    let hosts = vec![
        vec![format!("127.0.0.1:{}", ports[0])],
        vec![format!("127.0.0.2:{}", ports[1])],
    ];
    std::fs::write(&hostfile, serde_json::to_vec(&hosts).expect("json")).expect("hostfile");
    let mut rank = Rank::start(0, &hostfile);
    let deadline = Instant::now() + Duration::from_secs(30);
    let listening = loop {
        let found = listeners(ports[0]);
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let _ = rank.child.kill();
    let _ = rank.child.wait();
    assert_eq!(
        listening,
        vec!["127.0.0.1".to_owned()],
        "rank 0's ring listeners"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The local addresses with a listening TCP socket on `port`, from
/// `/proc/net/tcp` and `/proc/net/tcp6` (`0.0.0.0` or `::` for every
/// interface).
fn listeners(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((ip, p)) = local.split_once(':') else {
                continue;
            };
            if *state != "0A" || u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            found.push(if v6 {
                if ip.chars().all(|c| c == '0') {
                    "::".into()
                } else {
                    ip.to_owned()
                }
            } else {
                let n = u32::from_str_radix(ip, 16).unwrap_or(0);
                std::net::Ipv4Addr::from(n.to_le_bytes()).to_string()
            });
        }
    }
    found
}

fn check_world(world: usize) {
    let _turn = ONE_GROUP_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = scratch_dir(world);
    let hostfile = dir.join("hostfile.json");
    let hosts: Vec<Vec<String>> = free_ports(world)
        .into_iter()
        .map(|port| vec![format!("127.0.0.1:{port}")])
        .collect();
    std::fs::write(
        &hostfile,
        serde_json::to_vec(&hosts).expect("hostfile json"),
    )
    .expect("write hostfile");

    let ranks: Vec<Rank> = (0..world)
        .map(|rank| Rank::start(rank, &hostfile))
        .collect();
    let outcomes = wait_all(ranks, GROUP_DEADLINE);

    // Element i of `[rank, rank + 1, 2 * rank]` summed over ranks 0..world.
    let w = world as f64;
    let rank_total = w * (w - 1.0) / 2.0;
    let expected_ranked = [rank_total, rank_total + w, 2.0 * rank_total];

    for (rank, outcome) in outcomes.iter().enumerate() {
        assert!(
            outcome.success,
            "rank {rank} failed (world {world}):\nstdout: {}\nstderr: {}",
            outcome.stdout, outcome.stderr
        );
        let line = outcome.stdout.lines().last().unwrap_or_default();
        let report: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("rank {rank} printed no JSON ({e}): {}", outcome.stdout));
        assert_eq!(report["rank"], rank, "{report}");
        assert_eq!(report["size"], world, "{report}");
        assert_eq!(floats(&report["sum_of_ones"]), vec![w; 4], "{report}");
        assert_eq!(
            floats(&report["sum_of_ranked"]),
            expected_ranked,
            "{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn floats(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Ports that were free a moment ago: bind to port 0 and let the listeners go
/// just before the ranks start (all at once, so no two ranks share a port).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn scratch_dir(world: usize) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-ring-test-{}-{world}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

struct Rank {
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Rank {
    fn start(rank: usize, hostfile: &Path) -> Rank {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-agent"))
            .arg("ring-selftest")
            .env("MLX_HOSTFILE", hostfile)
            .env("MLX_RANK", rank.to_string())
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tandem-agent");
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        Rank {
            child,
            stdout,
            stderr,
        }
    }
}

/// Reads a pipe to the end on its own thread, so a chatty child never blocks.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Waits for every rank; past the deadline, kills the rest and fails the test.
fn wait_all(mut ranks: Vec<Rank>, deadline: Duration) -> Vec<Outcome> {
    let start = Instant::now();
    let mut statuses = vec![None; ranks.len()];
    while statuses.iter().any(Option::is_none) {
        for (rank, status) in ranks.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = rank.child.try_wait().expect("try_wait");
            }
        }
        if start.elapsed() > deadline {
            for (rank, status) in ranks.iter_mut().zip(&statuses) {
                if status.is_none() {
                    let _ = rank.child.kill();
                    let _ = rank.child.wait();
                }
            }
            let report: Vec<String> = ranks
                .into_iter()
                .zip(&statuses)
                .enumerate()
                .map(|(i, (rank, status))| {
                    let stderr = rank.stderr.join().unwrap_or_default();
                    format!("rank {i}: {status:?}\n{stderr}")
                })
                .collect();
            panic!(
                "the group did not finish within {deadline:?}:\n{}",
                report.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    ranks
        .into_iter()
        .zip(statuses)
        .map(|(rank, status)| Outcome {
            success: status.is_some_and(|s| s.success()),
            stdout: rank.stdout.join().unwrap_or_default(),
            stderr: rank.stderr.join().unwrap_or_default(),
        })
        .collect()
}
