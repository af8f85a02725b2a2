//! Rank-worker processes, supervised the way a kubelet supervises
//! containers: start one with its launch message, relay its events and
//! logs, stop it (SIGTERM, then SIGKILL after a grace period), say how it
//! ended, and pace restarts with a capped exponential backoff.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::state_dir;
use crate::worker::protocol::{Event, Launch};

/// A running rank worker.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    /// Held open: the worker exits when it closes (our death included).
    _stdin: ChildStdin,
    pid: Option<u32>,
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl Exit {
    fn of(status: ExitStatus) -> Exit {
        #[cfg(unix)]
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        #[cfg(not(unix))]
        let signal = None;
        Exit {
            code: status.code(),
            signal,
        }
    }

    /// Whether it exited with status 0.
    pub fn success(self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with status {code}"),
            (None, Some(signal)) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "was killed by signal {signal} ({name})")
            }
            (None, None) => f.write_str("ended for an unknown reason"),
        }
    }
}

/// Where MLX keeps the GPU kernels it compiles, under a state directory.
/// MLX's CUDA backend reads `MLX_PTX_CACHE_DIR`; kept there, the kernels a
/// worker compiled survive its restarts (the first CUDA run compiled for
/// about 40 s).
pub fn kernel_cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("mlx-kernel-cache")
}

/// The environment a rank worker needs for its group's MLX backend.
///
/// - `ring` (and `jaccl`, which reads its devices from the same files):
///   `MLX_HOSTFILE` and `MLX_RANK`.
/// - `nccl`: `MLX_RANK`, `MLX_WORLD_SIZE`, and rank 0's ring address as the
///   NCCL rendezvous (`NCCL_HOST_IP`, `NCCL_PORT`); `CUDA_VISIBLE_DEVICES`
///   is the one GPU this rank owns, when the caller assigned one.
///
/// `MLX_PTX_CACHE_DIR` is `kernel_cache` unless the agent's own environment
/// already names one.
///
/// `MLX_ENABLE_CACHE_THRASHING_CHECK` is `0` unless the agent's environment
/// sets it. MLX's CUDA backend keeps LRU caches of CUDA graphs, cuDNN
/// attention plans and convolutions, and by default throws once a cache has
/// missed twice its capacity over the process's life (a lifetime count,
/// never reset). A server's batches come in ever new shapes (rows, prompt
/// lengths, cache lengths), so it crosses that count in time however well
/// the cache works: measured on the H200, 16 clients against 8 sequences
/// took it past 800 graph misses in under a minute, and the exception failed
/// the group. Without the check a miss only builds the graph again. Other
/// backends do not read the variable.
pub fn worker_env(
    launch: &Launch,
    kernel_cache: &Path,
    gpu: Option<u32>,
) -> Vec<(&'static str, std::ffi::OsString)> {
    let spec = &launch.spec;
    let mut env = vec![
        ("MLX_HOSTFILE", launch.hostfile.clone().into_os_string()),
        ("MLX_RANK", spec.rank.to_string().into()),
    ];
    if spec.backend == tandem_crds::Backend::Nccl {
        env.push(("MLX_WORLD_SIZE", spec.world_size.to_string().into()));
        if let Some((ip, port)) = spec
            .peers
            .iter()
            .find(|p| p.rank == 0)
            .and_then(|p| p.address.rsplit_once(':'))
        {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            env.push(("NCCL_HOST_IP", ip.into()));
            env.push(("NCCL_PORT", port.into()));
        }
        if let Some(gpu) = gpu {
            env.push(("CUDA_VISIBLE_DEVICES", gpu.to_string().into()));
        }
    }
    if std::env::var_os("MLX_PTX_CACHE_DIR").is_none() {
        env.push(("MLX_PTX_CACHE_DIR", kernel_cache.as_os_str().to_owned()));
    }
    if std::env::var_os("MLX_ENABLE_CACHE_THRASHING_CHECK").is_none() {
        env.push(("MLX_ENABLE_CACHE_THRASHING_CHECK", "0".into()));
    }
    env
}

/// Variables of the agent's environment a worker inherits, by exact name.
/// Everything else (`HF_TOKEN`, `KUBECONFIG`, cloud credentials, the
/// agent's own `TANDEM_*` settings) stays with the agent: a worker gets its
/// secrets (group token, API key) on stdin and needs no others.
pub const INHERITED_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "TZ",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    // Where a GPU wheel's libraries are found (docs/mlx.md).
    "LD_LIBRARY_PATH",
    "DYLD_LIBRARY_PATH",
    "DYLD_FALLBACK_LIBRARY_PATH",
    // The tokenizers crate's thread pool.
    "TOKENIZERS_PARALLELISM",
    "RAYON_NUM_THREADS",
];

/// Prefixes of inherited variables: the locale, and the settings of MLX and
/// of the CUDA and NCCL libraries under its CUDA backend.
pub const INHERITED_PREFIXES: &[&str] = &["LC_", "MLX_", "CUDA_", "NCCL_"];

/// Whether a worker inherits the agent's variable `name`.
pub fn inherits(name: &str) -> bool {
    INHERITED_VARS.contains(&name) || INHERITED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The part of `vars` (the agent's environment) a worker inherits; the
/// worker's own settings ([`worker_env`]) are added on top.
pub fn inherited_env(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    vars.into_iter()
        .filter(|(name, _)| name.to_str().is_some_and(inherits))
        .collect()
}

/// Starts `program worker` for `launch`, in an environment of only
/// [`inherited_env`] and [`worker_env`]. Returns the worker and the events
/// it reports.
pub async fn start(
    program: &Path,
    launch: &Launch,
    env: Vec<(&'static str, std::ffi::OsString)>,
    log_name: String,
) -> std::io::Result<(Worker, mpsc::UnboundedReceiver<Event>)> {
    let mut child = Command::new(program)
        .arg("worker")
        .env_clear()
        .envs(inherited_env(std::env::vars_os()))
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id();
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
    let line = serde_json::to_string(launch).map_err(std::io::Error::other)?;
    stdin.write_all(line.as_bytes()).await?;
    stdin.write_all(b"\n").await?;
    stdin.flush().await?;

    let (tx, events) = mpsc::unbounded_channel();
    let name = log_name.clone();
    tokio::spawn(async move {
        let mut lines = LossyLines::new(stdout);
        while let Some(line) = lines.next().await {
            match Event::parse(&line) {
                Some(event) => {
                    let _ = tx.send(event);
                }
                None => tracing::info!(worker = %name, "{line}"),
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = LossyLines::new(stderr);
        while let Some(line) = lines.next().await {
            tracing::info!(worker = %log_name, "{line}");
        }
    });
    Ok((
        Worker {
            child,
            _stdin: stdin,
            pid,
        },
        events,
    ))
}

/// Lines of a worker's output, read to the end whatever bytes they hold:
/// bytes that are not UTF-8 (a library's binary diagnostics, a torn
/// multi-byte character) become U+FFFD instead of ending the reader, which
/// would leave the worker blocked on a full pipe.
struct LossyLines<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: tokio::io::AsyncRead + Unpin> LossyLines<R> {
    fn new(reader: R) -> Self {
        LossyLines {
            reader: BufReader::new(reader),
            buf: Vec::new(),
        }
    }

    /// The next line without its line ending; `None` at the end (or on a
    /// read error, after which nothing more can be read).
    async fn next(&mut self) -> Option<String> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf).await {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                    self.buf.pop();
                }
                Some(String::from_utf8_lossy(&self.buf).into_owned())
            }
        }
    }
}

impl Worker {
    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How the process ended, if it has; never blocks.
    pub fn try_exit(&mut self) -> Option<Exit> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(Exit::of(status)),
            Ok(None) => None,
            Err(_) => Some(Exit {
                code: None,
                signal: None,
            }),
        }
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> Exit {
        match self.child.wait().await {
            Ok(status) => Exit::of(status),
            Err(_) => Exit {
                code: None,
                signal: None,
            },
        }
    }

    /// Asks the worker to stop (SIGTERM) and kills it after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => Exit::of(status),
            _ => {
                let _ = self.child.kill().await;
                self.wait().await
            }
        }
    }
}

/// Writes the MLX ring hostfile: a JSON list, by rank, of `["ip:port"]`.
/// Its directory (inside the state directory) is created private if
/// missing and refused if unsafe, and the file is replaced, never written
/// through a link ([`state_dir::write_file`]).
pub fn write_hostfile(path: &Path, addresses: &[String]) -> std::io::Result<PathBuf> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        state_dir::prepare(parent)?;
    }
    let hosts: Vec<Vec<&str>> = addresses.iter().map(|a| vec![a.as_str()]).collect();
    let text = serde_json::to_string(&hosts).map_err(std::io::Error::other)?;
    state_dir::write_file(path, text.as_bytes())?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(backend: tandem_crds::Backend) -> Launch {
        let peer = |rank: i32| tandem_crds::Peer {
            rank,
            node: format!("n{rank}"),
            address: format!("10.0.0.{}:7000", rank + 1),
        };
        Launch {
            namespace: "ns".into(),
            shard_name: "d-rank-1".into(),
            spec: tandem_crds::LlamaShardSpec {
                deployment: "d".into(),
                epoch: 1,
                rank: 1,
                world_size: 2,
                node_name: "n".into(),
                model: "m".into(),
                revision: None,
                architecture: tandem_crds::Architecture {
                    num_hidden_layers: 1,
                    hidden_size: 64,
                    num_attention_heads: 2,
                    num_key_value_heads: 2,
                    intermediate_size: 128,
                    vocab_size: 256,
                    head_dim: None,
                    tie_word_embeddings: true,
                    quantization: None,
                    dtype: Default::default(),
                },
                backend,
                peers: vec![peer(0), peer(1)],
                control_address: "10.0.0.1:7001".into(),
                serving_port: None,
                group_token_secret_ref: tandem_crds::SecretKeyRef {
                    name: "t".into(),
                    key: None,
                },
                api_key_secret_ref: None,
                tls_secret_ref: None,
                max_context_tokens: 4096,
                batching: None,
            },
            model_dir: "/models/m".into(),
            group_token: "token".into(),
            tls: None,
            api_key_sha256: None,
            max_queue: 8,
            barrier_timeout_ms: 1000,
            hostfile: "/state/hostfile.json".into(),
            warmup_prompt_tokens: None,
            batching: tandem_crds::BatchLimits::default(),
            api_limits: Default::default(),
            stall_timeout_ms: None,
        }
    }

    #[tokio::test]
    async fn output_lines_survive_bytes_that_are_not_utf8() {
        let bytes: &[u8] = b"first\n\xff\xfe broken \xe2\x82\r\nlast line without an end";
        let mut lines = LossyLines::new(bytes);
        assert_eq!(lines.next().await.as_deref(), Some("first"));
        assert_eq!(
            lines.next().await.as_deref(),
            Some("\u{fffd}\u{fffd} broken \u{fffd}")
        );
        assert_eq!(
            lines.next().await.as_deref(),
            Some("last line without an end")
        );
        assert_eq!(lines.next().await, None);
    }

    #[test]
    fn workers_get_their_group_settings_and_mlx_defaults() {
        let get = |env: &[(&'static str, std::ffi::OsString)], key: &str| {
            env.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        let ring = worker_env(&launch(tandem_crds::Backend::Ring), Path::new("/kc"), None);
        assert_eq!(get(&ring, "MLX_RANK").as_deref(), Some("1"));
        assert_eq!(
            get(&ring, "MLX_HOSTFILE").as_deref(),
            Some("/state/hostfile.json")
        );
        assert_eq!(get(&ring, "NCCL_HOST_IP"), None);
        // The agent's own environment wins for these two (tests do not set them).
        if std::env::var_os("MLX_PTX_CACHE_DIR").is_none() {
            assert_eq!(get(&ring, "MLX_PTX_CACHE_DIR").as_deref(), Some("/kc"));
        }
        if std::env::var_os("MLX_ENABLE_CACHE_THRASHING_CHECK").is_none() {
            assert_eq!(
                get(&ring, "MLX_ENABLE_CACHE_THRASHING_CHECK").as_deref(),
                Some("0")
            );
        }
        let nccl = worker_env(
            &launch(tandem_crds::Backend::Nccl),
            Path::new("/kc"),
            Some(3),
        );
        assert_eq!(get(&nccl, "MLX_WORLD_SIZE").as_deref(), Some("2"));
        assert_eq!(get(&nccl, "NCCL_HOST_IP").as_deref(), Some("10.0.0.1"));
        assert_eq!(get(&nccl, "NCCL_PORT").as_deref(), Some("7000"));
        assert_eq!(get(&nccl, "CUDA_VISIBLE_DEVICES").as_deref(), Some("3"));
    }

    #[test]
    fn workers_inherit_only_the_allowlisted_environment() {
        let agent: Vec<(std::ffi::OsString, std::ffi::OsString)> = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/me"),
            ("LC_ALL", "C.UTF-8"),
            ("RUST_LOG", "info"),
            ("MLX_METAL_FAST_SYNCH", "1"),
            ("NCCL_SOCKET_IFNAME", "eth0"),
            ("CUDA_HOME", "/usr/local/cuda"),
            ("LD_LIBRARY_PATH", "/opt/mlx/lib"),
            ("HF_TOKEN", "hf_secret"),
            ("KUBECONFIG", "/home/me/.kube/config"),
            ("TANDEM_KUBECONFIG", "/etc/tandem/kubeconfig"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("SSH_AUTH_SOCK", "/tmp/agent.sock"),
            ("HTTPS_PROXY", "http://proxy"),
            ("XMLX_RANK", "lookalike"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let inherited: Vec<String> = inherited_env(agent)
            .into_iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            inherited,
            [
                "PATH",
                "HOME",
                "LC_ALL",
                "RUST_LOG",
                "MLX_METAL_FAST_SYNCH",
                "NCCL_SOCKET_IFNAME",
                "CUDA_HOME",
                "LD_LIBRARY_PATH"
            ]
        );
        // Everything the agent sets for a worker itself is inheritable too.
        let nccl = worker_env(
            &launch(tandem_crds::Backend::Nccl),
            Path::new("/kc"),
            Some(0),
        );
        for (name, _) in nccl {
            assert!(inherits(name), "{name}");
        }
    }

    #[tokio::test]
    async fn a_started_worker_gets_a_cleared_environment() {
        use std::os::unix::fs::PermissionsExt;
        // A stand-in worker program: it records its environment, reads the
        // launch line and exits.
        let dir = std::env::temp_dir().join(format!("tandem-worker-env-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let program = dir.join("worker.sh");
        let record = dir.join("env.txt");
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\nenv > '{}'\nhead -n 1 > /dev/null\n",
                record.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let launch = launch(tandem_crds::Backend::Ring);
        let env = worker_env(&launch, Path::new("/kc"), None);
        let (mut worker, _events) = start(&program, &launch, env, "env".into())
            .await
            .expect("start");
        let exit = worker.wait().await;
        assert!(exit.success(), "{exit}");
        let seen = std::fs::read_to_string(&record).expect("the recorded environment");
        let names: Vec<&str> = seen
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k)
            .collect();
        assert!(names.contains(&"MLX_RANK"), "{names:?}");
        assert!(names.contains(&"MLX_HOSTFILE"), "{names:?}");
        // The shell adds PWD (and some add SHLVL or `_`) itself.
        let from_shell = ["PWD", "SHLVL", "_", "OLDPWD"];
        for name in &names {
            assert!(
                inherits(name) || from_shell.contains(name),
                "{name} reached the worker"
            );
        }
        // Cargo runs this test with CARGO_* variables set; none gets through.
        assert!(!names.iter().any(|n| n.starts_with("CARGO")), "{names:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn exits_are_described() {
        let killed = Exit {
            code: None,
            signal: Some(9),
        };
        assert_eq!(killed.to_string(), "was killed by signal 9 (SIGKILL)");
        let failed = Exit {
            code: Some(1),
            signal: None,
        };
        assert_eq!(failed.to_string(), "exited with status 1");
        assert!(!failed.success());
    }

    #[test]
    fn hostfiles_list_one_address_per_rank() {
        let dir = std::env::temp_dir().join(format!("tandem-hostfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("ns--shard").join("hostfile.json");
        write_hostfile(&path, &["127.0.0.1:1".into(), "127.0.0.1:2".into()]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, r#"[["127.0.0.1:1"],["127.0.0.1:2"]]"#);
        let _ = std::fs::remove_dir_all(dir);
    }
}
