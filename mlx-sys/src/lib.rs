//! Raw bindings to the mlx-c 0.7.0 C API, built against a prebuilt libmlx.
//!
//! This replaces the crates.io `mlx-sys` 0.7.0 (through `[patch.crates-io]`)
//! so that mlx-rs 0.33.0 builds on Linux as well as macOS. The items are
//! bindgen's output for mlx-c's headers, plus the few definitions bindgen
//! cannot produce portably (below). Where libmlx comes from is decided at build
//! time by `MLX_DIR`; see docs/mlx.md.

mod bindings {
    #![allow(
        non_upper_case_globals,
        non_camel_case_types,
        non_snake_case,
        dead_code,
        unused_imports,
        unsafe_op_in_unsafe_fn,
        missing_debug_implementations,
        clippy::all,
        clippy::unwrap_used
    )]
    use super::{bfloat16_t, float16_t};
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub use bindings::*;

/// An IEEE 754 half-precision value, as its raw bits.
///
/// mlx-rs expects the shape bindgen gives C's `__fp16` on Apple Silicon: a
/// tuple struct around the bits. Defining it here gives every platform the same
/// type, whatever the C side calls it.
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct __BindgenFloat16(pub u16);

/// mlx-c's `float16_t`.
#[allow(non_camel_case_types)]
pub type float16_t = __BindgenFloat16;

/// mlx-c's `bfloat16_t`, as its raw bits (what mlx-rs reads back with
/// `bf16::from_bits`).
#[allow(non_camel_case_types)]
pub type bfloat16_t = u16;

/// Stand-in for Darwin's `mach_approximate_time`, which mlx-rs calls to seed its
/// default random state. Off Apple platforms the symbol does not exist, so we
/// export one: monotonic nanoseconds. Only its use as a varying seed matters.
#[cfg(not(target_vendor = "apple"))]
#[unsafe(no_mangle)]
pub extern "C" fn mach_approximate_time() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.wrapping_mul(1_000_000_000).wrapping_add(nanos)
}
