//! The MLX engine: what mlx-rs does not provide, built on mlx-rs and mlx-sys.

pub mod distributed;
