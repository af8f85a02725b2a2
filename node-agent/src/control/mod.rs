//! Rank 0's gRPC control service (`proto/control.proto`) and the client
//! the other ranks use.
//!
//! One module each:
//! - [`Coordinator`] (`coordinator`): the group's state on rank 0: the barriers (which ranks
//!   have arrived at which [`Stage`]), the step streams to ranks 1..N, and
//!   whether the group is broken (a rank's stream closed). It is the
//!   [`PlanSink`] rank 0's decode loop hands every step's plan to.
//! - [`ControlService`] (`service`): the tonic service over a coordinator, with the
//!   group-token check in front ([`serve`]), and tonic-health beside it.
//! - [`ControlClient`] (`client`): joins a barrier with retries until a deadline, and
//!   opens the step stream, presenting the group token on every call.
//! - [`plan_to_proto`] and [`plan_from_proto`] (`wire`): a step's wire form.
//!
//! With the shard's TLS material, the service is TLS and the clients accept
//! only rank 0's certificate from the shard's CA; the token check is the
//! same either way. Rank 0 refuses callers without the token (UNAUTHENTICATED), callers of
//! another epoch, model or group shape (FAILED_PRECONDITION), and joins
//! after the group has formed (ABORTED: an old incarnation's rank 0 tells a
//! restarted rank to come back to the next one).

/// Generated messages, client and server of `tandem.control.v1`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("tandem.control.v1");
}

pub use pb::Stage;

/// Steps a rank's stream may hold unread before rank 0 gives up on it.
const STEP_BACKLOG: usize = 256;

/// Metadata key of the group token.
const AUTHORIZATION: &str = "authorization";

/// The group a rank belongs to; every field must match rank 0's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupIdentity {
    /// Deployment name.
    pub deployment: String,
    /// Epoch.
    pub epoch: i64,
    /// Ranks in the group.
    pub world_size: i32,
    /// Model ID.
    pub model: String,
    /// Model revision.
    pub revision: String,
}

impl GroupIdentity {
    /// The message a rank sends.
    pub fn member(&self, rank: i32) -> pb::Member {
        pb::Member {
            deployment: self.deployment.clone(),
            epoch: self.epoch,
            rank,
            world_size: self.world_size,
            model: self.model.clone(),
            revision: self.revision.clone(),
        }
    }

    /// Why `member` does not belong to this group, if it does not.
    pub fn mismatch(&self, m: &pb::Member) -> Option<String> {
        if m.deployment != self.deployment {
            return Some(format!(
                "rank {} belongs to deployment `{}`, rank 0 to `{}`",
                m.rank, m.deployment, self.deployment
            ));
        }
        if m.epoch != self.epoch {
            return Some(format!(
                "rank {} is of epoch {}, rank 0 runs epoch {}",
                m.rank, m.epoch, self.epoch
            ));
        }
        if m.model != self.model || m.revision != self.revision {
            return Some(format!(
                "rank {} runs model {}@{}, rank 0 runs {}@{}",
                m.rank, m.model, m.revision, self.model, self.revision
            ));
        }
        if m.world_size != self.world_size {
            return Some(format!(
                "rank {} expects {} ranks, rank 0 expects {}",
                m.rank, m.world_size, self.world_size
            ));
        }
        if m.rank < 1 || m.rank >= self.world_size {
            return Some(format!(
                "rank {} is not a remote rank of a group of {}",
                m.rank, self.world_size
            ));
        }
        None
    }
}

mod client;
mod coordinator;
mod service;
mod wire;

pub use client::{ClientError, ControlClient, PresentToken};
pub use coordinator::{BarrierError, Coordinator};
pub use service::{ControlService, HANDSHAKE_TIMEOUT, RequireToken, bind, serve};
pub use wire::{plan_from_proto, plan_to_proto};

#[cfg(test)]
mod tests;
