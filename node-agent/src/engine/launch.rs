//! Running N ranks of one command on this machine over the MLX ring backend,
//! as `mlx.launch` does: pick N loopback ports, write the hostfile, and start
//! the command N times with `MLX_HOSTFILE` and `MLX_RANK` set.
//!
//! Each rank's stdout is collected; its stderr is passed through, each line
//! prefixed with the rank. When a rank fails, the others are killed (they
//! would wait forever in their next `all_sum`) and the failure is reported
//! with that rank's last stderr lines.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::error::{EngineError, Result};

/// What one rank printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankOutput {
    /// The rank.
    pub rank: usize,
    /// Everything it wrote to stdout.
    pub stdout: String,
}

/// Loopback ports that were free a moment ago (bound to port 0 and released
/// together, so no two are the same).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(EngineError::io("127.0.0.1:0"))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(EngineError::io("127.0.0.1:0"))
        })
        .collect()
}

/// Writes an MLX ring hostfile (one `["127.0.0.1:port"]` per rank) into `dir`.
pub fn write_hostfile(dir: &Path, ports: &[u16]) -> Result<PathBuf> {
    let hosts: Vec<Vec<String>> = ports
        .iter()
        .map(|p| vec![format!("127.0.0.1:{p}")])
        .collect();
    let path = dir.join("hostfile.json");
    let text = serde_json::to_string(&hosts).map_err(|source| EngineError::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, text).map_err(EngineError::io(&path))?;
    Ok(path)
}

struct Running {
    rank: usize,
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<()>,
    stderr_tail: Arc<Mutex<Vec<String>>>,
}

/// Runs `program args` as ranks `0..world` of a loopback ring group and
/// returns their stdout, in rank order, once all have succeeded.
pub fn run_local_group(program: &Path, args: &[OsString], world: usize) -> Result<Vec<RankOutput>> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "tandem-launch-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    // A fresh private directory: creating it fails if the name exists, so
    // nothing planted in the shared temp directory is used.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(EngineError::io(&dir))?;
    let result = run_in(&dir, program, args, world);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, program: &Path, args: &[OsString], world: usize) -> Result<Vec<RankOutput>> {
    let hostfile = write_hostfile(dir, &free_ports(world)?)?;
    let mut running = Vec::with_capacity(world);
    for rank in 0..world {
        match start_rank(program, args, &hostfile, rank) {
            Ok(r) => running.push(r),
            Err(e) => {
                kill_all(&mut running);
                return Err(e);
            }
        }
    }
    // Wait for all; the first failure takes the group down.
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; world];
    let failed = loop {
        let mut failed = None;
        for (i, r) in running.iter_mut().enumerate() {
            if statuses[i].is_some() {
                continue;
            }
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    statuses[i] = Some(status);
                    if !status.success() && failed.is_none() {
                        failed = Some((r.rank, status.to_string()));
                    }
                }
                Ok(None) => {}
                Err(e) => failed = Some((r.rank, format!("could not be waited for: {e}"))),
            }
        }
        if failed.is_some() || statuses.iter().all(Option::is_some) {
            break failed;
        }
        thread::sleep(Duration::from_millis(20));
    };
    if let Some((rank, status)) = failed {
        kill_all(&mut running);
        let tail = running
            .iter()
            .find(|r| r.rank == rank)
            .map(|r| {
                r.stderr_tail
                    .lock()
                    .map(|t| t.join("\n"))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        for r in running {
            let _ = r.stdout.join();
            let _ = r.stderr.join();
        }
        return Err(EngineError::Argument(format!(
            "rank {rank} of {world} failed ({status}); the other ranks were stopped. \
             Its last messages:\n{tail}"
        )));
    }
    let mut outputs = Vec::with_capacity(world);
    for r in running {
        let stdout = r.stdout.join().unwrap_or_default();
        let _ = r.stderr.join();
        outputs.push(RankOutput {
            rank: r.rank,
            stdout,
        });
    }
    Ok(outputs)
}

fn start_rank(program: &Path, args: &[OsString], hostfile: &Path, rank: usize) -> Result<Running> {
    let mut child = Command::new(program)
        .args(args)
        .env("MLX_HOSTFILE", hostfile)
        .env("MLX_RANK", rank.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(EngineError::io(program))?;
    let mut out = child.stdout.take();
    let stdout = thread::spawn(move || {
        let mut text = String::new();
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_string(&mut text);
        }
        text
    });
    let err = child.stderr.take();
    let stderr_tail = Arc::new(Mutex::new(Vec::new()));
    let tail = stderr_tail.clone();
    let stderr = thread::spawn(move || {
        let Some(err) = err else { return };
        for line in BufReader::new(err).lines().map_while(std::io::Result::ok) {
            let _ = writeln!(std::io::stderr(), "[rank {rank}] {line}");
            if let Ok(mut t) = tail.lock() {
                t.push(line);
                if t.len() > 40 {
                    t.remove(0);
                }
            }
        }
    });
    Ok(Running {
        rank,
        child,
        stdout,
        stderr,
        stderr_tail,
    })
}

fn kill_all(running: &mut [Running]) {
    for r in running.iter_mut() {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}
