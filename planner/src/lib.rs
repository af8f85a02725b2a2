//! Tandem's planning core: pure functions with no Kubernetes client, no async
//! runtime and no I/O, so every decision the operator makes about a
//! `LlamaDeployment` can be tested with plain values.
//!
//! - [`model`]: the shape of a Llama model, the tensor-parallel sharding rules
//!   ([`valid_world_sizes`]) and the memory a rank needs ([`memory_per_rank`]).
//! - [`catalog`]: the bundled mlx-community models and [`resolve_model`].
//! - [`selector`]: Kubernetes label selectors over LlamaNode labels.
//! - [`text`]: wording shared by the planner's and the operator's messages.
//! - [`placement`]: [`plan_placement`], which picks a node and ports per rank
//!   (`assign`), and explains in words why none exists (`diagnose`).
//! - [`error`]: [`PlanError`], whose [`reason`](PlanError::reason) is the
//!   CamelCase reason the operator puts on conditions and Events.
//!
//! The operator's reconcile pipeline is `observe → resolve_model → plan_placement
//! → build objects → apply`; only the ends do I/O.

pub mod catalog;
pub mod error;
pub mod model;
pub mod placement;
pub mod selector;
pub mod text;

pub use catalog::{CATALOG, CatalogEntry, TINY_TEST_MODEL, lookup_model, resolve_model};
pub use error::PlanError;
pub use model::{
    MAX_WORLD_SIZE, MemoryEstimate, ModelShape, Quantization, ServingBudget, ShapeError,
    WeightDtype, check_world_size, memory_per_rank, valid_world_sizes,
};
pub use placement::{
    CurrentRank, DeploymentRequest, NodeInfo, Plan, PlanInput, PortRange, RankPlacement,
    ShardingStrategy, plan_placement,
};
pub use selector::{LabelSelector, SelectorOperator, SelectorRequirement};
