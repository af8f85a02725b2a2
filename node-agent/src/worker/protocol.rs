//! What the agent and a rank worker say to each other.
//!
//! The agent writes one [`Launch`] as a JSON line to the worker's stdin and
//! keeps stdin open: secrets never appear in argv or the environment, and
//! the worker takes end-of-file on stdin as its agent going away (the
//! portable stand-in for Linux's parent-death signal). The worker writes
//! [`Event`]s as JSON lines to stdout; its logs go to stderr.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_crds::{LlamaShardSpec, Progress, ShardPhase};

/// Everything a rank worker needs to run one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    /// Namespace of the LlamaShard.
    pub namespace: String,
    /// Name of the LlamaShard.
    pub shard_name: String,
    /// The shard's spec.
    pub spec: LlamaShardSpec,
    /// The model directory on this node.
    pub model_dir: PathBuf,
    /// The group token every rank presents to rank 0.
    pub group_token: String,
    /// Rank 0's certificate and key, and the CA the other ranks verify it
    /// against: the API and the control stream are TLS with it. `None`
    /// only when the deployment turned TLS off (or `serve --plain-http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsMaterial>,
    /// Hex SHA-256 of the bearer key HTTP clients must present (rank 0), if
    /// any; the key itself never reaches the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<String>,
    /// Requests rank 0 queues before answering 429.
    pub max_queue: usize,
    /// How long to wait at (and for) rank 0's barrier, and for the MLX
    /// group to form, in milliseconds.
    pub barrier_timeout_ms: u64,
    /// Rank 0's progress watchdog: the shortest time without a finished
    /// step, while work is outstanding, that breaks the group, in
    /// milliseconds (the bound grows with the measured step time, see
    /// `serve::watchdog`). `None` takes the default (30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout_ms: Option<u64>,
    /// Where to write the MLX ring hostfile.
    pub hostfile: PathBuf,
    /// Prompt lengths rank 0 runs through the group before it reports
    /// Ready, so that the kernels real prompts need are compiled (MLX's GPU
    /// backends compile per shape on first use); empty turns it off, and
    /// `None` leaves the choice to the worker ([`warmup_prompt_tokens`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_prompt_tokens: Option<Vec<usize>>,
    /// How rank 0 batches requests: the shard's limits, or the agent's own
    /// defaults (its flags) where the shard names none.
    #[serde(default)]
    pub batching: tandem_crds::BatchLimits,
    /// What one client can take from rank 0's API.
    #[serde(default)]
    pub api_limits: crate::serve::ApiLimits,
}

/// The warm-up's prompt lengths when none are configured. On a GPU, a
/// decode-sized prompt and three prefill sizes, which compile the kernels
/// of the shapes ordinary prompts take; on the CPU, which compiles nothing,
/// a single token, enough to fault in the weights and check the group.
pub fn warmup_prompt_tokens(on_gpu: bool) -> Vec<usize> {
    if on_gpu {
        vec![1, 16, 128, 512]
    } else {
        vec![1]
    }
}

/// Why a shard failed, as `status.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureReason {
    /// The model is in no model directory and could not be downloaded.
    ModelNotFound,
    /// The model's files are unreadable or inconsistent.
    CorruptModel,
    /// This rank's slice does not fit in memory.
    OutOfMemory,
    /// The other ranks could not be reached, or one left the group.
    PeerUnreachable,
    /// The worker process died without saying why.
    WorkerCrashed,
    /// The shard spec (or a Secret it names) is unusable.
    InvalidShard,
    /// Rank 0's watchdog saw no step finish within its bound: a rank
    /// stopped answering inside a collective, or a ring link is down.
    GroupStalled,
    /// The download directory has too little free space for the model.
    InsufficientDisk,
}

impl FailureReason {
    /// The CamelCase reason written to the shard status.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ModelNotFound => "ModelNotFound",
            FailureReason::CorruptModel => "CorruptModel",
            FailureReason::OutOfMemory => "OutOfMemory",
            FailureReason::PeerUnreachable => "PeerUnreachable",
            FailureReason::WorkerCrashed => "WorkerCrashed",
            FailureReason::InvalidShard => "InvalidShard",
            FailureReason::GroupStalled => "GroupStalled",
            FailureReason::InsufficientDisk => "InsufficientDisk",
        }
    }

    /// Whether starting the worker again can help without a change to the
    /// shard or the model files. A crash, a lost peer or a stalled group
    /// is often transient; a missing or corrupt model, or too little
    /// memory, is not.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailureReason::PeerUnreachable
                | FailureReason::WorkerCrashed
                | FailureReason::GroupStalled
        )
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One report from a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "event",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Event {
    /// The rank moved to a phase.
    Phase {
        /// The phase.
        phase: ShardPhase,
        /// Bytes loaded so far, where known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Progress>,
        /// Seconds spent loading (from `Loaded` on).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load_seconds: Option<f64>,
        /// What the rank is doing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// Bytes of memory this rank holds, where known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_bytes: Option<u64>,
    },
    /// The rank cannot go on; the worker exits after this.
    Failed {
        /// The reason.
        reason: FailureReason,
        /// The detail.
        message: String,
    },
}

impl Event {
    /// A phase change with a message and nothing else.
    pub fn phase(phase: ShardPhase, message: impl Into<String>) -> Event {
        Event::Phase {
            phase,
            progress: None,
            load_seconds: None,
            message: Some(message.into()),
            memory_bytes: None,
        }
    }

    /// The event as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        // Serializing plain data cannot fail; keep a readable fallback.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"event\":\"invalid\",\"error\":\"{e}\"}}"))
    }

    /// Parses a line the worker wrote; `None` for lines that are not events.
    pub fn parse(line: &str) -> Option<Event> {
        let line = line.trim();
        if !line.starts_with('{') {
            return None;
        }
        serde_json::from_str(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_lines() {
        let events = [
            Event::phase(ShardPhase::Connecting, "waiting for ranks 1, 2"),
            Event::Phase {
                phase: ShardPhase::Loaded,
                progress: Some(Progress {
                    bytes_done: 10,
                    bytes_total: Some(10),
                }),
                load_seconds: Some(1.5),
                message: None,
                memory_bytes: Some(100),
            },
            Event::Failed {
                reason: FailureReason::CorruptModel,
                message: "bad header".into(),
            },
        ];
        for e in events {
            let line = e.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(Event::parse(&line), Some(e));
        }
        assert_eq!(Event::parse("plain log line"), None);
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(FailureReason::WorkerCrashed.retryable());
        assert!(FailureReason::PeerUnreachable.retryable());
        assert!(!FailureReason::CorruptModel.retryable());
        assert!(!FailureReason::ModelNotFound.retryable());
        assert!(!FailureReason::OutOfMemory.retryable());
    }
}
