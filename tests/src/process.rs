//! What a test takes from the local machine: the workspace's binaries, child
//! processes that log to a file, free ports, scratch directories and tmpfs
//! mounts, and a look at `/proc` for a process's children.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::repo_root;

/// A child process whose stdout and stderr go to a log file; killed when
/// dropped if it still runs.
#[derive(Debug)]
pub struct LoggedChild {
    child: Child,
    log: PathBuf,
}

impl LoggedChild {
    /// Starts `cmd` with stdin from `/dev/null` and stdout and stderr into
    /// `log` (created afresh, with its directory). Panics when it cannot
    /// start: no test can go on without its process.
    pub fn spawn(cmd: &mut Command, log: &Path) -> LoggedChild {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).expect("log directory");
        }
        let file = std::fs::File::create(log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", cmd.get_program().to_string_lossy()));
        LoggedChild {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit (up to `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("process {pid} did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free TCP port on loopback (free when asked; good enough for a test).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports on loopback.
pub fn free_ports(n: usize) -> Vec<u16> {
    // Held together until all are known, so none is handed out twice.
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// A scratch directory under `target/agent-test-data`, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo_root().join("target/agent-test-data").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A tmpfs mounted at a directory, unmounted when dropped.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, as `64k`) at `dir`,
    /// creating it first; panics unless it mounts (it needs root).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mounting a tmpfs at {} needs root",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Child processes of `parent` whose command line contains `arg`.
pub fn children_running(parent: u32, arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Runs `cmd` and fails unless it exits 0, with `what` and its output.
pub(crate) fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {what}"))?;
    check_output(out, what)
}

/// `out`, or an error with `what` and the output unless it exited 0.
pub(crate) fn check_output(out: Output, what: &str) -> anyhow::Result<Output> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The path of the workspace binary `bin` (of the package of the same name),
/// built for the suites.
///
/// `$<ENV>` wins when set (for example `TANDEM_AGENT_BIN` for
/// `tandem-agent`: the name upper-cased, `-` as `_`, plus `_BIN`); otherwise
/// the binary is built with `cargo build -p <bin>` into the target directory
/// and profile of the running test executable, once per process, and taken
/// from there.
pub fn workspace_binary(bin: &str) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;

    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    // Held across the build: two suites asking at once build one at a time.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let var = format!("{}_BIN", bin.to_ascii_uppercase().replace('-', "_"));
    let path = match std::env::var_os(&var) {
        Some(path) => PathBuf::from(path),
        None => build_binary(bin).unwrap_or_else(|e| panic!("{e:#}")),
    };
    built.insert(bin.to_owned(), path.clone());
    path
}

fn build_binary(bin: &str) -> anyhow::Result<PathBuf> {
    // <target>/<profile>/deps/<test executable>
    let exe = std::env::current_exe().context("test executable path")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable not under <target>/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    // Drop what cargo set for this test process: build scripts that watch
    // such variables would otherwise rebuild on every switch between this
    // build and the outer `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&key.as_ref());
        if per_package {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.current_dir(repo_root())
        .args(["build", "-p", bin, "--bin", bin])
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cmd.arg("--release");
    }
    run_checked(&mut cmd, &format!("cargo build -p {bin}"))?;
    Ok(profile_dir.join(bin))
}
