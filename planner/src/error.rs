//! Why a deployment cannot be planned. Each variant maps to one condition
//! reason and Event reason; its message says what would work instead.

use thiserror::Error;

/// Why no plan could be made. Bad specs and a full cluster are ordinary
/// outcomes, not bugs: the operator sets a False condition with
/// [`reason`](PlanError::reason) and the message, emits an Event, and waits
/// for a change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// Not enough nodes match the selector and are ready and schedulable (or
    /// have free ports) for the requested number of ranks.
    #[error("{message}")]
    NoMatchingNodes {
        /// Ranks requested.
        world_size: u32,
        /// Nodes that match the selector and could take a rank, ignoring memory.
        eligible_nodes: u32,
        /// What is missing and what would work.
        message: String,
    },
    /// Enough nodes match, but too few have the memory one rank needs.
    #[error("{message}")]
    InsufficientMemory {
        /// Ranks requested.
        world_size: u32,
        /// Memory one rank needs.
        bytes_per_rank: u64,
        /// Which nodes fall short and which world sizes would fit.
        message: String,
    },
    /// The model cannot be split into the requested number of ranks, the
    /// strategy is not supported, or the architecture is inconsistent.
    #[error("{message}")]
    InvalidSharding {
        /// Ranks requested.
        world_size: u32,
        /// World sizes up to [`MAX_WORLD_SIZE`](crate::MAX_WORLD_SIZE) that would work.
        valid_world_sizes: Vec<u32>,
        /// Why, followed by the valid world sizes.
        message: String,
    },
    /// The model is not in the catalog and the spec gives no architecture.
    #[error("{message}")]
    UnknownModel {
        /// The model ID from the spec.
        model: String,
        /// What to set instead.
        message: String,
    },
}

impl PlanError {
    /// The CamelCase reason for conditions and Events: the variant's name.
    pub fn reason(&self) -> &'static str {
        match self {
            PlanError::NoMatchingNodes { .. } => "NoMatchingNodes",
            PlanError::InsufficientMemory { .. } => "InsufficientMemory",
            PlanError::InvalidSharding { .. } => "InvalidSharding",
            PlanError::UnknownModel { .. } => "UnknownModel",
        }
    }

    /// The human-readable message, which says what would work.
    pub fn message(&self) -> &str {
        match self {
            PlanError::NoMatchingNodes { message, .. }
            | PlanError::InsufficientMemory { message, .. }
            | PlanError::InvalidSharding { message, .. }
            | PlanError::UnknownModel { message, .. } => message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_variant_names() {
        let m = || "m".to_owned();
        let cases = [
            (
                PlanError::NoMatchingNodes {
                    world_size: 1,
                    eligible_nodes: 0,
                    message: m(),
                },
                "NoMatchingNodes",
            ),
            (
                PlanError::InsufficientMemory {
                    world_size: 1,
                    bytes_per_rank: 1,
                    message: m(),
                },
                "InsufficientMemory",
            ),
            (
                PlanError::InvalidSharding {
                    world_size: 3,
                    valid_world_sizes: vec![1],
                    message: m(),
                },
                "InvalidSharding",
            ),
            (
                PlanError::UnknownModel {
                    model: m(),
                    message: m(),
                },
                "UnknownModel",
            ),
        ];
        for (err, reason) in cases {
            assert_eq!(err.reason(), reason);
            assert_eq!(err.message(), "m");
            assert_eq!(err.to_string(), "m");
        }
    }
}
