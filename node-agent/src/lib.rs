//! Tandem's node agent (crate `tandem-agent`).
//!
//! - [`mlx::distributed`]: the distributed group tensor-parallel ranks form,
//!   wrapped safely.
//! - [`engine`]: the Llama inference engine on MLX (loading slices, forward
//!   pass, sampling, tokenizer, random test models, local multi-rank launch).
//! - [`agent`]: the node daemon (`tandem-agent run`): configuration,
//!   registration and Lease, the shard watcher and the rank-worker supervisor.
//! - [`worker`]: a rank worker process (`tandem-agent worker`): forms the
//!   group, loads its slice, runs jobs; rank 0 also serves HTTP.
//! - [`control`]: rank 0's gRPC control service (barriers, job fan-out).
//! - [`serve`]: rank 0's OpenAI-compatible HTTP API.
//! - [`backoff`]: the capped doubling pause every retry loop uses.
//! - [`secret`]: constant-time comparison of presented secrets.
//! - [`tls`]: the certificate rank 0 serves both with, and the CA the
//!   other ranks check it against.

pub mod agent;
pub mod backoff;
pub mod control;
pub mod engine;
pub mod mlx;
pub mod secret;
pub mod serve;
pub mod tls;
pub mod worker;
