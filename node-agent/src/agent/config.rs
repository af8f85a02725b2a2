//! The agent's configuration: command-line flags, each with an environment
//! variable, over an optional YAML file, over built-in defaults.
//!
//! [`RunArgs`] is what clap parses; [`FileConfig`] is the YAML file;
//! [`AgentConfig`] is the merged result the daemon runs with. Merging is a
//! pure function of the three, so precedence is tested without a process.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use tandem_crds::{BatchLimits, DEFAULT_PORT_FIRST, DEFAULT_PORT_LAST, LlamaShardSpec};
use tandem_planner::PortRange;

pub use super::hardware::BackendChoice;
use crate::serve::ApiLimits;

/// Flags of `tandem-agent run`. Every flag can also come from its
/// environment variable or from the `--config` file; flags win over the
/// environment, which wins over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// YAML configuration file (keys are the flag names in camelCase, such
    /// as `nodeName`, `modelDirs`, `labels: {key: value}`).
    #[arg(long, env = "TANDEM_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kubeconfig to use; without it the in-cluster config, then
    /// $KUBECONFIG or ~/.kube/config, are tried.
    #[arg(long, env = "TANDEM_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Name of this node's LlamaNode and Lease [default: the host name].
    #[arg(long, env = "TANDEM_NODE_NAME")]
    pub node_name: Option<String>,
    /// IP address peers use to reach this node's ranks [default: the
    /// address of the interface that routes outwards, else 127.0.0.1].
    #[arg(long, env = "TANDEM_ADVERTISE_ADDRESS", value_name = "IP")]
    pub advertise_address: Option<IpAddr>,
    /// Extra LlamaNode label, `key=value`; repeat the flag or separate with
    /// commas.
    #[arg(
        long = "label",
        env = "TANDEM_LABELS",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub labels: Vec<LabelArg>,
    /// Directory holding models, in the Hugging Face cache layout
    /// (`models--ORG--NAME/snapshots/REV`) or plain (`ORG/NAME`, `NAME`);
    /// repeat the flag, or separate with `:` in the environment
    /// [default: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(
        long = "model-dir",
        env = "TANDEM_MODEL_DIRS",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub model_dirs: Vec<PathBuf>,
    /// Where missing models are downloaded to, in the Hugging Face cache
    /// layout [default: the first --model-dir].
    #[arg(long, env = "TANDEM_DOWNLOAD_DIR", value_name = "DIR")]
    pub download_dir: Option<PathBuf>,
    /// Never download: a model that is not in a model directory fails the
    /// shard with ModelNotFound. Downloads use $HF_ENDPOINT and $HF_TOKEN.
    #[arg(long, env = "TANDEM_OFFLINE")]
    pub offline: bool,
    /// TCP ports this node offers to ranks, `FIRST-LAST`; published as the
    /// LlamaNode's `tandem.dev/port-range` annotation [default: 29000-29999, below the ports
    /// Linux and macOS hand out to outgoing connections].
    #[arg(long, env = "TANDEM_PORT_RANGE", value_name = "FIRST-LAST")]
    pub port_range: Option<PortRange>,
    /// MLX compute backend: auto, cpu, metal or cuda. A backend this machine
    /// cannot run is an error at start-up [default: auto].
    #[arg(long, env = "TANDEM_BACKEND")]
    pub backend: Option<BackendChoice>,
    /// NVIDIA GPUs this node offers to `Nccl` ranks, one rank per GPU (the
    /// ranks get CUDA devices 0..N); published as the LlamaNode's
    /// `status.capacity.gpus`. More than 0 needs MLX's CUDA backend
    /// [default: 1 with the CUDA backend, else 0].
    #[arg(long, env = "TANDEM_GPUS", value_name = "N")]
    pub gpus: Option<u32>,
    /// Namespace of the node Lease [default: tandem-system].
    #[arg(long, env = "TANDEM_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Lease duration in seconds; the Lease is renewed every third of it
    /// [default: 15].
    #[arg(long, env = "TANDEM_LEASE_DURATION_SECONDS", value_name = "SECONDS")]
    pub lease_duration_seconds: Option<u32>,
    /// Address of the agent's /healthz and /metrics [default: 0.0.0.0:9464].
    #[arg(long, env = "TANDEM_METRICS_ADDRESS", value_name = "IP:PORT")]
    pub metrics_address: Option<SocketAddr>,
    /// Private directory for rank workers' files (hostfiles, the MLX kernel
    /// cache), created 0700; refused if it is a link, another user's, or
    /// writable by others [default: `$XDG_STATE_HOME/tandem/agent-<node>`,
    /// else `~/.local/state/tandem/agent-<node>`].
    #[arg(long, env = "TANDEM_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Requests rank 0 queues before answering 429 [default: 16].
    #[arg(long, env = "TANDEM_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Seconds ranks wait at rank 0's barrier, and retry reaching it,
    /// before failing with PeerUnreachable [default: 120].
    #[arg(long, env = "TANDEM_BARRIER_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub barrier_timeout_seconds: Option<u64>,
    /// Prompt lengths rank 0 runs through its group before it reports Ready,
    /// so first requests find their GPU kernels compiled (comma-separated;
    /// `0` alone turns the warm-up off) [default: 1,16,128,512 on a GPU, 1
    /// on the CPU].
    #[arg(
        long,
        env = "TANDEM_WARMUP_PROMPT_TOKENS",
        value_delimiter = ',',
        value_name = "TOKENS"
    )]
    pub warmup_prompt_tokens: Option<Vec<usize>>,
    /// Longest pause between restarts of a failing rank worker, in seconds;
    /// the pause starts at 1 s and doubles [default: 30].
    #[arg(
        long,
        env = "TANDEM_MAX_RESTART_BACKOFF_SECONDS",
        value_name = "SECONDS"
    )]
    pub max_restart_backoff_seconds: Option<u64>,
    /// Rank 0's batching defaults, for shards whose spec carries no
    /// `batching`.
    #[command(flatten)]
    pub batching: BatchFlags,
    /// What one client can take from rank 0's API, and the progress
    /// watchdog.
    #[command(flatten)]
    pub guards: GuardFlags,
}

/// What one client can take from rank 0's API, and how long rank 0 waits
/// for a step before it declares the group stalled; flags of `run` and
/// `serve`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct GuardFlags {
    /// Most open connections to rank 0's API; more are answered 503 and
    /// closed [default: 512].
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers (also between
    /// requests on a kept-alive connection), and again its body; slower
    /// clients get 408 or are disconnected [default: 30].
    #[arg(long, env = "TANDEM_READ_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub read_timeout_seconds: Option<u64>,
    /// Prompts rank 0 encodes (chat template, tokenizer) at once; a request
    /// waits up to the read timeout for a slot, then gets 429 [default: 4].
    #[arg(long, env = "TANDEM_MAX_TOKENIZING", value_name = "N")]
    pub max_tokenizing: Option<usize>,
    /// Seconds rank 0 waits, with work outstanding, for a step to finish
    /// before it declares the group stalled, fails its requests and the
    /// shard (GroupStalled); the bound grows to four times the longest step
    /// seen when that is longer; the warm-up has ten minutes [default: 30
    /// on the CPU, 120 on a GPU].
    #[arg(long, env = "TANDEM_STALL_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub stall_timeout_seconds: Option<u64>,
}

impl GuardFlags {
    /// These flags over `under` (the config file's values).
    pub fn or(&self, under: &GuardFlags) -> GuardFlags {
        GuardFlags {
            max_connections: self.max_connections.or(under.max_connections),
            read_timeout_seconds: self.read_timeout_seconds.or(under.read_timeout_seconds),
            max_tokenizing: self.max_tokenizing.or(under.max_tokenizing),
            stall_timeout_seconds: self.stall_timeout_seconds.or(under.stall_timeout_seconds),
        }
    }

    /// The API limits, defaults where a flag is absent; the error names the
    /// flag at fault.
    pub fn api_limits(&self) -> Result<ApiLimits, String> {
        let d = ApiLimits::default();
        let limits = ApiLimits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            read_timeout_ms: self
                .read_timeout_seconds
                .map_or(d.read_timeout_ms, |s| s.saturating_mul(1000)),
            max_tokenizing: self.max_tokenizing.unwrap_or(d.max_tokenizing),
        };
        if limits.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if limits.read_timeout_ms == 0 {
            return Err("--read-timeout-seconds must be at least 1".into());
        }
        if limits.max_tokenizing == 0 {
            return Err("--max-tokenizing must be at least 1".into());
        }
        Ok(limits)
    }

    /// The watchdog's floor, if set (at least a second).
    pub fn stall_timeout(&self) -> Option<Duration> {
        self.stall_timeout_seconds
            .map(|s| Duration::from_secs(s.max(1)))
    }
}

/// How rank 0 batches requests, as flags: for `run`, the limits of shards
/// whose spec carries no `batching` (the operator writes it on every
/// shard); for `serve`, the limits of its group.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct BatchFlags {
    /// Most requests rank 0 decodes together in one step, 1 to 256; more
    /// wait in its queue [default: 16].
    #[arg(long, env = "TANDEM_MAX_BATCH_SEQUENCES", value_name = "N")]
    pub max_batch_sequences: Option<u32>,
    /// Most KV positions the batch reserves: its requests times the longest
    /// reservation among them (prompt plus `max_tokens`; every request gets
    /// a cache row as long as the longest); never below the longest context
    /// [default: 32768, or the context when larger].
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS", value_name = "TOKENS")]
    pub max_batch_tokens: Option<u32>,
    /// Most prompt tokens prefilled in one step, at least 16; longer prompts
    /// are prefilled in chunks between decode steps [default: 2048].
    #[arg(long, env = "TANDEM_PREFILL_CHUNK_TOKENS", value_name = "TOKENS")]
    pub prefill_chunk_tokens: Option<u32>,
    /// Bytes of KV each rank keeps after requests end, for reuse by later
    /// requests sharing a prompt prefix; 0 turns the prefix cache off
    /// [default: 536870912, 512 MiB].
    #[arg(long, env = "TANDEM_PREFIX_CACHE_BYTES", value_name = "BYTES")]
    pub prefix_cache_bytes: Option<i64>,
    /// Most tokens one request may generate: the default `max_tokens`, and
    /// the most a request may ask for [default: 4096].
    #[arg(long, env = "TANDEM_MAX_COMPLETION_TOKENS", value_name = "TOKENS")]
    pub max_completion_tokens: Option<u32>,
}

impl BatchFlags {
    /// These flags over `under` (the config file's values): each flag that
    /// is set wins.
    pub fn or(&self, under: &BatchFlags) -> BatchFlags {
        BatchFlags {
            max_batch_sequences: self.max_batch_sequences.or(under.max_batch_sequences),
            max_batch_tokens: self.max_batch_tokens.or(under.max_batch_tokens),
            prefill_chunk_tokens: self.prefill_chunk_tokens.or(under.prefill_chunk_tokens),
            prefix_cache_bytes: self.prefix_cache_bytes.or(under.prefix_cache_bytes),
            max_completion_tokens: self.max_completion_tokens.or(under.max_completion_tokens),
        }
    }

    /// The limits, with [`BatchLimits::default`] where a flag is absent,
    /// checked against the bounds of the LlamaShard schema; the error names
    /// the flag at fault.
    pub fn limits(&self) -> Result<BatchLimits, String> {
        let d = BatchLimits::default();
        let limits = BatchLimits {
            max_sequences: self.max_batch_sequences.unwrap_or(d.max_sequences),
            max_tokens: self.max_batch_tokens.unwrap_or(d.max_tokens),
            prefill_chunk_tokens: self.prefill_chunk_tokens.unwrap_or(d.prefill_chunk_tokens),
            prefix_cache_bytes: self.prefix_cache_bytes.unwrap_or(d.prefix_cache_bytes),
            max_completion_tokens: self
                .max_completion_tokens
                .unwrap_or(d.max_completion_tokens),
        };
        if !(1..=256).contains(&limits.max_sequences) {
            return Err(format!(
                "--max-batch-sequences must be 1 to 256, not {}",
                limits.max_sequences
            ));
        }
        if limits.max_tokens == 0 {
            return Err("--max-batch-tokens must be at least 1".into());
        }
        if limits.prefill_chunk_tokens < 16 {
            return Err(format!(
                "--prefill-chunk-tokens must be at least 16, not {}",
                limits.prefill_chunk_tokens
            ));
        }
        if limits.prefix_cache_bytes < 0 {
            return Err(format!(
                "--prefix-cache-bytes must be 0 or more, not {}",
                limits.prefix_cache_bytes
            ));
        }
        if limits.max_completion_tokens == 0 {
            return Err("--max-completion-tokens must be at least 1".into());
        }
        Ok(limits)
    }
}

/// `--label key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelArg {
    /// Label key.
    pub key: String,
    /// Label value.
    pub value: String,
}

impl FromStr for LabelArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("`{s}` has an empty key"));
        }
        Ok(LabelArg {
            key: key.to_owned(),
            value: value.trim().to_owned(),
        })
    }
}

/// `portRange` of the configuration file, parsed as `--port-range` is.
fn port_range_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PortRange>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// The YAML configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    /// See `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// See `--node-name`.
    pub node_name: Option<String>,
    /// See `--advertise-address`.
    pub advertise_address: Option<IpAddr>,
    /// See `--label`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// See `--model-dir`.
    #[serde(default)]
    pub model_dirs: Vec<PathBuf>,
    /// See `--download-dir`.
    pub download_dir: Option<PathBuf>,
    /// See `--offline`.
    pub offline: Option<bool>,
    /// See `--port-range`.
    #[serde(default, deserialize_with = "port_range_text")]
    pub port_range: Option<PortRange>,
    /// See `--backend`.
    pub backend: Option<BackendChoice>,
    /// See `--gpus`.
    pub gpus: Option<u32>,
    /// See `--lease-namespace`.
    pub lease_namespace: Option<String>,
    /// See `--lease-duration-seconds`.
    pub lease_duration_seconds: Option<u32>,
    /// See `--metrics-address`.
    pub metrics_address: Option<SocketAddr>,
    /// See `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// See `--max-queue`.
    pub max_queue: Option<usize>,
    /// See `--barrier-timeout-seconds`.
    pub barrier_timeout_seconds: Option<u64>,
    /// See `--warmup-prompt-tokens`.
    pub warmup_prompt_tokens: Option<Vec<usize>>,
    /// See `--max-restart-backoff-seconds`.
    pub max_restart_backoff_seconds: Option<u64>,
    /// See `--max-batch-sequences`.
    pub max_batch_sequences: Option<u32>,
    /// See `--max-batch-tokens`.
    pub max_batch_tokens: Option<u32>,
    /// See `--prefill-chunk-tokens`.
    pub prefill_chunk_tokens: Option<u32>,
    /// See `--prefix-cache-bytes`.
    pub prefix_cache_bytes: Option<i64>,
    /// See `--max-completion-tokens`.
    pub max_completion_tokens: Option<u32>,
    /// See `--max-connections`.
    pub max_connections: Option<usize>,
    /// See `--read-timeout-seconds`.
    pub read_timeout_seconds: Option<u64>,
    /// See `--max-tokenizing`.
    pub max_tokenizing: Option<usize>,
    /// See `--stall-timeout-seconds`.
    pub stall_timeout_seconds: Option<u64>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading the config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for [`FileConfig`].
    #[error("config file {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// What the machine tells the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Environment {
    /// The host name.
    pub hostname: Option<String>,
    /// The outward-facing IP address.
    pub outward_address: Option<IpAddr>,
    /// `$HF_HUB_CACHE`.
    pub hf_hub_cache: Option<PathBuf>,
    /// `$HF_HOME`.
    pub hf_home: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$XDG_STATE_HOME`.
    pub state_home: Option<PathBuf>,
    /// The system temp directory.
    pub temp_dir: PathBuf,
}

impl Environment {
    /// Reads the environment of this process.
    pub fn detect() -> Environment {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Environment {
            hostname: super::hardware::hostname(),
            outward_address: super::hardware::outward_address(),
            hf_hub_cache: var("HF_HUB_CACHE"),
            hf_home: var("HF_HOME"),
            home: var("HOME"),
            state_home: var("XDG_STATE_HOME"),
            temp_dir: std::env::temp_dir(),
        }
    }
}

/// The configuration the agent runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Kubeconfig file, or `None` for the inferred config.
    pub kubeconfig: Option<PathBuf>,
    /// LlamaNode and Lease name.
    pub node_name: String,
    /// Address peers dial.
    pub advertise_address: IpAddr,
    /// Labels from the configuration (well-known ones are added on top).
    pub labels: BTreeMap<String, String>,
    /// Directories searched for models, in order.
    pub model_dirs: Vec<PathBuf>,
    /// Where downloads go.
    pub download_dir: PathBuf,
    /// No downloads.
    pub offline: bool,
    /// Ports offered to ranks.
    pub port_range: PortRange,
    /// Compute backend asked for.
    pub backend: BackendChoice,
    /// GPUs offered to `Nccl` ranks, as asked for; the default depends on
    /// the backend detected (see [`Hardware::detect`](super::hardware::Hardware::detect)).
    pub gpus: Option<u32>,
    /// Namespace of the node Lease.
    pub lease_namespace: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// Address of /healthz and /metrics.
    pub metrics_address: SocketAddr,
    /// Directory for worker files.
    pub state_dir: PathBuf,
    /// Rank 0's request queue.
    pub max_queue: usize,
    /// Barrier wait.
    pub barrier_timeout: Duration,
    /// Prompt lengths of rank 0's warm-up; empty for none, `None` for the
    /// worker's choice (a GPU warms more shapes than the CPU).
    pub warmup_prompt_tokens: Option<Vec<usize>>,
    /// Cap of the restart backoff.
    pub max_restart_backoff: Duration,
    /// Batch limits for shards whose spec carries none (see
    /// [`AgentConfig::batching_for`]).
    pub batching: BatchLimits,
    /// What one client can take from rank 0's API.
    pub api_limits: ApiLimits,
    /// Floor of rank 0's progress watchdog; `None` for the worker's default.
    pub stall_timeout: Option<Duration>,
}

impl AgentConfig {
    /// The batch limits a shard's worker runs with: the spec's, which the
    /// operator resolves for every shard, else this agent's, with the token
    /// budget raised to the shard's `maxContextTokens` so that a request of
    /// the longest context can be admitted.
    pub fn batching_for(&self, spec: &LlamaShardSpec) -> BatchLimits {
        spec.batching.unwrap_or_else(|| {
            let mut limits = self.batching;
            limits.max_tokens = limits.max_tokens.max(spec.max_context_tokens);
            limits
        })
    }

    /// How often the Lease is renewed: a third of its duration, so two
    /// renewals may fail before it expires.
    pub fn lease_renew_interval(&self) -> Duration {
        (self.lease_duration / 3).max(Duration::from_secs(1))
    }
}

/// Reads the YAML file named by `--config`, if any.
pub fn load_file(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Merges flags over the file over defaults.
pub fn resolve(
    args: &RunArgs,
    file: FileConfig,
    env: &Environment,
) -> Result<AgentConfig, ConfigError> {
    let node_name = args
        .node_name
        .clone()
        .or(file.node_name)
        .or_else(|| env.hostname.as_deref().map(node_name_from_hostname))
        .ok_or_else(|| {
            ConfigError::Invalid("no --node-name and no host name to default to".into())
        })?;
    validate_node_name(&node_name)?;

    let mut labels = file.labels;
    for LabelArg { key, value } in &args.labels {
        labels.insert(key.clone(), value.clone());
    }
    for (key, value) in &labels {
        validate_label(key, value)?;
    }

    let model_dirs = if !args.model_dirs.is_empty() {
        args.model_dirs.clone()
    } else if !file.model_dirs.is_empty() {
        file.model_dirs
    } else {
        vec![default_hf_cache(env)]
    };
    let download_dir = args
        .download_dir
        .clone()
        .or(file.download_dir)
        .or_else(|| model_dirs.first().cloned())
        .unwrap_or_else(|| default_hf_cache(env));

    let lease_duration_seconds = args
        .lease_duration_seconds
        .or(file.lease_duration_seconds)
        .unwrap_or(15);
    if lease_duration_seconds < 3 {
        return Err(ConfigError::Invalid(format!(
            "lease duration must be at least 3 seconds, not {lease_duration_seconds}"
        )));
    }
    let max_queue = args.max_queue.or(file.max_queue).unwrap_or(16);
    if max_queue == 0 {
        return Err(ConfigError::Invalid(
            "--max-queue must be at least 1".into(),
        ));
    }
    let state_dir = match args.state_dir.clone().or(file.state_dir) {
        Some(dir) => dir,
        None => super::state_dir::default_dir(
            env.state_home.as_deref(),
            env.home.as_deref(),
            &format!("agent-{node_name}"),
        )
        .ok_or_else(|| {
            ConfigError::Invalid(super::state_dir::StateDirError::NoDefault.to_string())
        })?,
    };
    let from_file = BatchFlags {
        max_batch_sequences: file.max_batch_sequences,
        max_batch_tokens: file.max_batch_tokens,
        prefill_chunk_tokens: file.prefill_chunk_tokens,
        prefix_cache_bytes: file.prefix_cache_bytes,
        max_completion_tokens: file.max_completion_tokens,
    };
    let batching = args
        .batching
        .or(&from_file)
        .limits()
        .map_err(ConfigError::Invalid)?;
    let guards = args.guards.or(&GuardFlags {
        max_connections: file.max_connections,
        read_timeout_seconds: file.read_timeout_seconds,
        max_tokenizing: file.max_tokenizing,
        stall_timeout_seconds: file.stall_timeout_seconds,
    });
    let api_limits = guards.api_limits().map_err(ConfigError::Invalid)?;
    let backend = args.backend.or(file.backend).unwrap_or(BackendChoice::Auto);
    let gpus = args.gpus.or(file.gpus);
    if let Some(n) = gpus.filter(|&n| n > 0) {
        let named = match backend {
            BackendChoice::Cpu => Some("cpu"),
            BackendChoice::Metal => Some("metal"),
            BackendChoice::Auto | BackendChoice::Cuda => None,
        };
        if let Some(named) = named {
            return Err(ConfigError::Invalid(format!(
                "--gpus {n} needs MLX's CUDA backend, but --backend is {named}; use \
                 --backend cuda (or auto on a CUDA build of MLX), or --gpus 0"
            )));
        }
    }

    Ok(AgentConfig {
        kubeconfig: args.kubeconfig.clone().or(file.kubeconfig),
        advertise_address: args
            .advertise_address
            .or(file.advertise_address)
            .or(env.outward_address)
            .unwrap_or(IpAddr::from([127, 0, 0, 1])),
        labels,
        model_dirs,
        download_dir,
        offline: args.offline || file.offline.unwrap_or(false),
        port_range: args.port_range.or(file.port_range).unwrap_or(PortRange {
            first: DEFAULT_PORT_FIRST,
            last: DEFAULT_PORT_LAST,
        }),
        backend,
        gpus,
        lease_namespace: args
            .lease_namespace
            .clone()
            .or(file.lease_namespace)
            .unwrap_or_else(|| tandem_crds::DEFAULT_LEASE_NAMESPACE.to_owned()),
        lease_duration: Duration::from_secs(u64::from(lease_duration_seconds)),
        metrics_address: args
            .metrics_address
            .or(file.metrics_address)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9464))),
        state_dir,
        max_queue,
        barrier_timeout: Duration::from_secs(
            args.barrier_timeout_seconds
                .or(file.barrier_timeout_seconds)
                .unwrap_or(120)
                .max(1),
        ),
        max_restart_backoff: Duration::from_secs(
            args.max_restart_backoff_seconds
                .or(file.max_restart_backoff_seconds)
                .unwrap_or(30)
                .max(1),
        ),
        warmup_prompt_tokens: args
            .warmup_prompt_tokens
            .clone()
            .or(file.warmup_prompt_tokens)
            .map(|lengths| lengths.into_iter().filter(|&n| n > 0).collect()),
        batching,
        api_limits,
        stall_timeout: guards.stall_timeout(),
        node_name,
    })
}

/// The Hugging Face hub cache directory, as huggingface_hub finds it.
fn default_hf_cache(env: &Environment) -> PathBuf {
    if let Some(dir) = &env.hf_hub_cache {
        return dir.clone();
    }
    if let Some(home) = &env.hf_home {
        return home.join("hub");
    }
    env.home
        .clone()
        .unwrap_or_else(|| env.temp_dir.clone())
        .join(".cache/huggingface/hub")
}

/// A DNS-1123 subdomain from a host name: lower case, other characters
/// replaced by `-`, `.local` dropped.
pub fn node_name_from_hostname(hostname: &str) -> String {
    let host = hostname.trim().trim_end_matches(".local");
    let mut name: String = host
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(253);
    let trimmed = name.trim_matches(|c: char| c == '-' || c == '.');
    if trimmed.is_empty() {
        "node".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "node name `{name}` is not a DNS-1123 subdomain (lower-case letters, digits, `-` and `.`)"
        )))
    }
}

/// Checks a label as the API server would, so a typo fails at start-up
/// with the key named rather than as a rejected registration.
fn validate_label(key: &str, value: &str) -> Result<(), ConfigError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| validate_node_name(p).is_ok());
    let value_ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && (value.is_empty()
            || (value.starts_with(|c: char| c.is_ascii_alphanumeric())
                && value.ends_with(|c: char| c.is_ascii_alphanumeric())));
    if name_ok && prefix_ok && value_ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "label `{key}={value}` is not a valid Kubernetes label"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn env() -> Environment {
        Environment {
            hostname: Some("Studio-1.local".into()),
            outward_address: Some(IpAddr::from([10, 0, 0, 7])),
            hf_hub_cache: None,
            hf_home: None,
            home: Some("/home/me".into()),
            state_home: None,
            temp_dir: "/tmp".into(),
        }
    }

    #[test]
    fn defaults_come_from_the_machine() {
        let c = resolve(&RunArgs::default(), FileConfig::default(), &env()).expect("config");
        assert_eq!(c.node_name, "studio-1");
        assert_eq!(c.advertise_address, IpAddr::from([10, 0, 0, 7]));
        assert_eq!(
            c.model_dirs,
            vec![PathBuf::from("/home/me/.cache/huggingface/hub")]
        );
        assert_eq!(
            c.download_dir,
            PathBuf::from("/home/me/.cache/huggingface/hub")
        );
        assert_eq!(c.lease_namespace, "tandem-system");
        assert_eq!(c.lease_duration, Duration::from_secs(15));
        assert_eq!(c.lease_renew_interval(), Duration::from_secs(5));
        assert_eq!(
            c.port_range,
            PortRange {
                first: 29000,
                last: 29999
            }
        );
        assert_eq!(
            c.state_dir,
            PathBuf::from("/home/me/.local/state/tandem/agent-studio-1")
        );
        assert_eq!(c.gpus, None, "the default waits for the detected backend");
        assert_eq!(c.batching, BatchLimits::default());
    }

    #[test]
    fn the_state_dir_follows_xdg_and_is_never_guessed_in_tmp() {
        let mut machine = env();
        machine.state_home = Some("/var/state".into());
        let c = resolve(&RunArgs::default(), FileConfig::default(), &machine).expect("config");
        assert_eq!(
            c.state_dir,
            PathBuf::from("/var/state/tandem/agent-studio-1")
        );
        machine.state_home = None;
        machine.home = None;
        let err = resolve(&RunArgs::default(), FileConfig::default(), &machine)
            .expect_err("no home, no state home");
        assert!(err.to_string().contains("--state-dir"), "{err}");
        let file: FileConfig = serde_yaml::from_str("stateDir: /srv/tandem\n").expect("yaml");
        let c = resolve(&RunArgs::default(), file, &machine).expect("config");
        assert_eq!(c.state_dir, PathBuf::from("/srv/tandem"));
    }

    #[test]
    fn batch_limits_come_from_flags_over_the_file_and_fill_shards_without_them() {
        let file: FileConfig = serde_yaml::from_str(
            "maxBatchSequences: 4\nmaxBatchTokens: 8192\nprefixCacheBytes: 0\n",
        )
        .expect("yaml");
        let cli = Cli::try_parse_from(["x", "--max-batch-sequences", "16"]).expect("flags");
        let c = resolve(&cli.run, file, &env()).expect("config");
        let want = BatchLimits {
            max_sequences: 16,
            max_tokens: 8192,
            prefill_chunk_tokens: 2048,
            prefix_cache_bytes: 0,
            max_completion_tokens: 4096,
        };
        assert_eq!(c.batching, want);

        // A shard without limits gets the agent's, raised to its context.
        let mut spec: LlamaShardSpec = serde_json::from_value(serde_json::json!({
            "deployment": "d", "epoch": 1, "rank": 0, "worldSize": 1, "nodeName": "n",
            "model": "m/x", "peers": [], "controlAddress": "127.0.0.1:1",
            "groupTokenSecretRef": {"name": "t"}, "maxContextTokens": 16384,
            "architecture": {"numHiddenLayers": 1, "hiddenSize": 64,
                "numAttentionHeads": 4, "numKeyValueHeads": 2,
                "intermediateSize": 128, "vocabSize": 256},
        }))
        .expect("shard spec");
        assert_eq!(
            c.batching_for(&spec),
            BatchLimits {
                max_tokens: 16384,
                ..want
            }
        );
        // The operator's limits win.
        spec.batching = Some(BatchLimits::default());
        assert_eq!(c.batching_for(&spec), BatchLimits::default());

        let cli = Cli::try_parse_from(["x", "--prefill-chunk-tokens", "8"]).expect("flags");
        let err = resolve(&cli.run, FileConfig::default(), &env()).expect_err("too small");
        assert!(err.to_string().contains("--prefill-chunk-tokens"), "{err}");
        let cli = Cli::try_parse_from(["x", "--max-batch-sequences", "0"]).expect("flags");
        assert!(resolve(&cli.run, FileConfig::default(), &env()).is_err());
    }

    #[test]
    fn gpus_come_from_the_flag_or_the_file_and_need_cuda() {
        let file: FileConfig = serde_yaml::from_str("gpus: 4\nbackend: cuda\n").expect("yaml");
        let c = resolve(&RunArgs::default(), file.clone(), &env()).expect("config");
        assert_eq!(c.gpus, Some(4));
        let cli = Cli::try_parse_from(["x", "--gpus", "2"]).expect("flags");
        let c = resolve(&cli.run, file, &env()).expect("config");
        assert_eq!(c.gpus, Some(2));
        assert_eq!(c.backend, BackendChoice::Cuda);

        let cli = Cli::try_parse_from(["x", "--gpus", "2", "--backend", "cpu"]).expect("flags");
        let err = resolve(&cli.run, FileConfig::default(), &env()).expect_err("cpu has no GPUs");
        assert!(
            err.to_string()
                .contains("--gpus 2 needs MLX's CUDA backend")
                && err.to_string().contains("--backend cuda"),
            "{err}"
        );
        let cli = Cli::try_parse_from(["x", "--gpus", "0", "--backend", "metal"]).expect("flags");
        let c = resolve(&cli.run, FileConfig::default(), &env()).expect("0 is fine anywhere");
        assert_eq!(c.gpus, Some(0));
        // With auto, the check waits for the detected backend.
        let cli = Cli::try_parse_from(["x", "--gpus", "1"]).expect("flags");
        assert!(resolve(&cli.run, FileConfig::default(), &env()).is_ok());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = serde_yaml::from_str(
            "nodeName: from-file\nlabels: {rack: a, zone: z1}\nmodelDirs: [/models]\nportRange: 41000-41099\nbackend: cpu\nleaseDurationSeconds: 30\n",
        )
        .expect("yaml");
        let cli = Cli::try_parse_from([
            "x",
            "--node-name",
            "from-flag",
            "--label",
            "rack=b,team=ml",
            "--port-range",
            "42000-42010",
        ])
        .expect("flags");
        let c = resolve(&cli.run, file, &env()).expect("config");
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("b"));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("z1"));
        assert_eq!(c.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(c.model_dirs, vec![PathBuf::from("/models")]);
        assert_eq!(
            c.port_range,
            PortRange {
                first: 42000,
                last: 42010
            }
        );
        assert_eq!(c.backend, BackendChoice::Cpu);
        assert_eq!(c.lease_duration, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_named() {
        assert!("5-1".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("x".parse::<LabelArg>().is_err());
        let args = RunArgs {
            node_name: Some("Bad_Name".into()),
            ..RunArgs::default()
        };
        let err = resolve(&args, FileConfig::default(), &env()).expect_err("invalid");
        assert!(err.to_string().contains("Bad_Name"), "{err}");
        let args = RunArgs {
            labels: vec!["tandem.dev/x=has space".parse().expect("label")],
            ..RunArgs::default()
        };
        assert!(resolve(&args, FileConfig::default(), &env()).is_err());
        let unknown = serde_yaml::from_str::<FileConfig>("nodeNmae: x\n");
        assert!(unknown.is_err(), "unknown keys are rejected");
    }

    #[test]
    fn host_names_become_node_names() {
        assert_eq!(node_name_from_hostname("Mac Studio.local"), "mac-studio");
        assert_eq!(node_name_from_hostname("--"), "node");
    }
}
