//! The engine's error type: every way loading, tokenizing or running a model
//! can fail, each naming the file and the tensor involved.

use std::path::PathBuf;

use crate::mlx::distributed::DistributedError;

/// Why the engine could not load or run a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file (config, index, tokenizer config) does not parse.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// `config.json` (or `generation_config.json`) describes no usable Llama model.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model uses a feature this engine does not implement.
    #[error("unsupported model: {what}")]
    Unsupported {
        /// The feature.
        what: String,
    },
    /// A safetensors header is not what the format promises.
    #[error("{}: corrupt safetensors header: {message}", file.display())]
    CorruptHeader {
        /// The safetensors file.
        file: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor's bytes lie past the end of its file.
    #[error(
        "{}: truncated: tensor `{tensor}` needs bytes up to {needed} but the file has {actual}",
        file.display()
    )]
    Truncated {
        /// The safetensors file.
        file: PathBuf,
        /// The first tensor that does not fit.
        tensor: String,
        /// File length the tensor needs.
        needed: u64,
        /// The file's actual length.
        actual: u64,
    },
    /// `model.safetensors.index.json` is unusable.
    #[error("{}: {message}", file.display())]
    Index {
        /// The index file.
        file: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is in none of the checkpoint's files.
    #[error("missing tensor `{tensor}` (looked in {where_})")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
        /// The files or index searched.
        where_: String,
    },
    /// A tensor has another shape than `config.json` implies.
    #[error("{}: tensor `{tensor}` has shape {found:?}, expected {expected:?}", file.display())]
    Shape {
        /// The tensor's name.
        tensor: String,
        /// Its file.
        file: PathBuf,
        /// The shape config.json implies.
        expected: Vec<u64>,
        /// The shape in the file.
        found: Vec<u64>,
    },
    /// A tensor has another element type than the model needs.
    #[error("{}: tensor `{tensor}` has dtype {found}, expected {expected}", file.display())]
    Dtype {
        /// The tensor's name.
        tensor: String,
        /// Its file.
        file: PathBuf,
        /// What the model needs.
        expected: String,
        /// What the file holds.
        found: String,
    },
    /// This rank's slice of a quantized tensor does not fall on group
    /// boundaries, so it cannot be dequantized on its own.
    #[error("{}: tensor `{tensor}`: {message}", file.display())]
    SplitsQuantGroup {
        /// The tensor's name.
        tensor: String,
        /// Its file.
        file: PathBuf,
        /// Which slice and which group size.
        message: String,
    },
    /// The model cannot be split over this many ranks.
    #[error("cannot split the model over {world_size} ranks: {message}")]
    Sharding {
        /// The world size asked for.
        world_size: usize,
        /// Why not, and what would work.
        message: String,
    },
    /// An MLX operation failed.
    #[error("MLX failed while {context}: {source}")]
    Mlx {
        /// What the engine was doing.
        context: String,
        /// MLX's error.
        source: mlx_rs::error::Exception,
    },
    /// The distributed group failed.
    #[error(transparent)]
    Distributed(#[from] DistributedError),
    /// `tokenizer.json` could not be loaded or used.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// What went wrong.
        message: String,
    },
    /// The chat template could not be rendered.
    #[error("chat template: {message}")]
    Template {
        /// What went wrong (the template's own `raise_exception` text included).
        message: String,
    },
    /// Invalid generation or model-writing parameters.
    #[error("invalid argument: {0}")]
    Argument(String),
    /// A batch plan this rank cannot apply: the ranks no longer agree on
    /// what the batch holds, so the group cannot go on.
    #[error("the ranks are out of step: {0}")]
    OutOfStep(String),
}

impl EngineError {
    /// Wraps an MLX error with what the engine was doing.
    pub fn mlx(context: impl Into<String>) -> impl FnOnce(mlx_rs::error::Exception) -> EngineError {
        let context = context.into();
        move |source| EngineError::Mlx { context, source }
    }

    /// Wraps an I/O error with the file involved.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EngineError {
        let path = path.into();
        move |source| EngineError::Io { path, source }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
