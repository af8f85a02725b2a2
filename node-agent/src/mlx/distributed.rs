//! Safe access to MLX's distributed group: joining it, rank, size, `all_sum`.
//!
//! mlx-rs 0.33 has no distributed API, so this module calls the mlx-c functions
//! in mlx-sys directly. It is the only module of the crate allowed to use
//! `unsafe`; each block states what makes it sound.
//!
//! MLX keeps one group per process. The `ring` backend reads its peers from
//! `MLX_HOSTFILE` (a JSON list, indexed by rank, of `"ip:port"` lists) and this
//! process's rank from `MLX_RANK`; forming a group of another size means a new
//! process.
//!
//! Errors: mlx-c reports failures through one process-wide error handler. mlx-rs
//! installs its own (lazily, once) and keeps the message in thread-local storage
//! that only it can read. To recover the messages of the calls made here, we
//! install a handler that keeps the message while one of our calls runs on the
//! current thread, and hands every other message on to mlx-rs's handler
//! unchanged (`default_mlx_error_handler`, an exported symbol of mlx-rs 0.33.0,
//! which the workspace pins exactly).

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::str::FromStr;
use std::sync::Once;

use mlx_rs::{Array, Stream};

/// A distributed backend of MLX (`mlx.distributed.init(backend=...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The first backend that can be initialized.
    Any,
    /// TCP sockets arranged in a ring; works everywhere.
    Ring,
    /// RDMA over Thunderbolt (macOS only).
    Jaccl,
    /// MPI, when libmpi is present.
    Mpi,
    /// NCCL, on CUDA builds.
    Nccl,
}

impl Backend {
    /// The name MLX uses for this backend.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Any => "any",
            Backend::Ring => "ring",
            Backend::Jaccl => "jaccl",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }

    fn c_name(self) -> CString {
        // The names are fixed ASCII without NUL bytes.
        CString::new(self.as_str()).unwrap_or_default()
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = DistributedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "any" => Ok(Backend::Any),
            "ring" => Ok(Backend::Ring),
            "jaccl" => Ok(Backend::Jaccl),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            _ => Err(DistributedError::UnknownBackend { name: s.to_owned() }),
        }
    }
}

/// Why a distributed operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The name is not one of MLX's backends.
    #[error("unknown MLX distributed backend `{name}` (expected any, ring, jaccl, mpi or nccl)")]
    UnknownBackend {
        /// The name given.
        name: String,
    },
    /// This libmlx was built without the backend.
    #[error("MLX distributed backend `{backend}` is not available in this libmlx")]
    Unavailable {
        /// The backend asked for.
        backend: Backend,
    },
    /// The group could not be formed (bad hostfile, unreachable peers, ...).
    #[error("joining the MLX `{backend}` group failed: {message}")]
    Join {
        /// The backend asked for.
        backend: Backend,
        /// MLX's message.
        message: String,
    },
    /// A collective operation could not be built.
    #[error("MLX {operation} failed: {message}")]
    Collective {
        /// The operation, e.g. `all_sum`.
        operation: &'static str,
        /// MLX's message.
        message: String,
    },
}

/// Whether this libmlx has `backend`.
pub fn is_available(backend: Backend) -> bool {
    let name = backend.c_name();
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // mlx-c only reads it.
    unsafe { mlx_sys::mlx_distributed_is_available(name.as_ptr()) }
}

/// This process's membership in an MLX distributed group.
pub struct Group {
    raw: mlx_sys::mlx_distributed_group,
    backend: Backend,
}

// SAFETY: the handle owns a reference-counted C++ `mlx::core::distributed::Group`
// that does not depend on the thread that created it, so it may move between
// threads. It is not `Sync`: MLX does not promise concurrent use of one group.
unsafe impl Send for Group {}

impl Group {
    /// Joins the group of `backend`, failing if it cannot be formed (MLX's
    /// `strict=True`). With `ring`, the peers come from `MLX_HOSTFILE` and
    /// the rank from `MLX_RANK`.
    pub fn join(backend: Backend) -> Result<Group, DistributedError> {
        Self::init(backend, true)
    }

    /// Like [`Group::join`], but when no group can be formed MLX hands back a
    /// group of size 1, so a single process runs without any configuration
    /// (MLX's `strict=False`).
    pub fn join_or_alone(backend: Backend) -> Result<Group, DistributedError> {
        Self::init(backend, false)
    }

    fn init(backend: Backend, strict: bool) -> Result<Group, DistributedError> {
        if !is_available(backend) {
            return Err(DistributedError::Unavailable { backend });
        }
        let name = backend.c_name();
        // SAFETY: creates an empty handle; we own it from here on.
        let mut raw = unsafe { mlx_sys::mlx_distributed_group_new() };
        // SAFETY: `raw` is a live handle for mlx-c to fill in; `name` outlives the call.
        let outcome = with_mlx_errors(|| unsafe {
            mlx_sys::mlx_distributed_init(&mut raw, strict, name.as_ptr())
        });
        let group = Group { raw, backend };
        match outcome {
            Ok(()) => Ok(group),
            Err(message) => Err(DistributedError::Join { backend, message }),
        }
    }

    /// The backend this group was formed with.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// This process's rank, from 0 to `size() - 1`.
    pub fn rank(&self) -> usize {
        // SAFETY: `self.raw` is a live group handle.
        let rank = unsafe { mlx_sys::mlx_distributed_group_rank(self.raw) };
        usize::try_from(rank).unwrap_or(0)
    }

    /// The number of processes in the group.
    pub fn size(&self) -> usize {
        // SAFETY: `self.raw` is a live group handle.
        let size = unsafe { mlx_sys::mlx_distributed_group_size(self.raw) };
        usize::try_from(size).unwrap_or(0)
    }

    /// The element-wise sum of `x` over every rank of the group.
    ///
    /// Like every MLX op it is lazy: the communication happens when the result
    /// is evaluated, and every rank must evaluate it.
    ///
    /// It takes no stream, on purpose: MLX runs a collective on its group's
    /// communication stream only when the caller names none (as
    /// `mx.distributed.all_sum(x)` does in Python). mlx-c's own
    /// `mlx_distributed_all_sum` always passes one, and the caller's default
    /// stream is the GPU stream on Metal and CUDA builds, where the ring
    /// backend has no kernels: the collective then aborts the process. The
    /// CPU build hides this, because there the default stream is a CPU one.
    pub fn all_sum(&self, x: &Array) -> Result<Array, DistributedError> {
        // SAFETY: creates an empty array handle for mlx-c to fill in.
        let mut result = unsafe { mlx_sys::mlx_array_new() };
        // SAFETY: `result`, `x` and the group are live handles for the whole
        // call; the shim only writes into `result`.
        let outcome = with_mlx_errors(|| unsafe {
            mlx_sys::tandem_distributed_all_sum(&mut result, x.as_ptr(), self.raw)
        });
        // SAFETY: `result` is a handle we own (filled or still empty); `Array`
        // takes that ownership and frees it on drop.
        let result = unsafe { Array::from_ptr(result) };
        match outcome {
            Ok(()) => Ok(result),
            Err(message) => Err(DistributedError::Collective {
                operation: "all_sum",
                message,
            }),
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: we own `self.raw` and never use it again. Freeing the handle
        // drops one reference; MLX keeps the process-wide group alive.
        unsafe {
            mlx_sys::mlx_distributed_group_free(self.raw);
        }
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("backend", &self.backend)
            .field("rank", &self.rank())
            .field("size", &self.size())
            .finish()
    }
}

thread_local! {
    /// True while one of this module's mlx-c calls runs on this thread.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The newest message mlx-c reported during that call.
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL_HANDLER: Once = Once::new();

unsafe extern "C" {
    /// mlx-rs 0.33.0's error handler (exported `#[no_mangle]`), which stores the
    /// message where mlx-rs's own error path reads it.
    fn default_mlx_error_handler(msg: *const c_char, data: *mut c_void);
}

extern "C" fn capture_or_forward(msg: *const c_char, data: *mut c_void) {
    if CAPTURING.with(Cell::get) {
        let text = if msg.is_null() {
            String::from("(no message)")
        } else {
            // SAFETY: mlx-c passes a NUL-terminated string valid for this call.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        CAPTURED.with(|slot| *slot.borrow_mut() = Some(text));
    } else {
        // SAFETY: exactly the call mlx-c would have made had mlx-rs's handler
        // still been installed; the arguments are passed through untouched.
        unsafe { default_mlx_error_handler(msg, data) };
    }
}

/// Runs an mlx-c call (returning 0 on success) and turns a failure into MLX's
/// message.
fn with_mlx_errors(call: impl FnOnce() -> i32) -> Result<(), String> {
    INSTALL_HANDLER.call_once(|| {
        // mlx-rs installs its handler on its first fallible operation and never
        // again; make that happen now, so it cannot later replace ours. (Were
        // ours not installed, mlx-c's default handler would exit the process.)
        let _ = Stream::cpu().get_index();
        // SAFETY: the handler is a plain function that lives for the whole
        // program; no user data or destructor is involved.
        unsafe {
            mlx_sys::mlx_set_error_handler(Some(capture_or_forward), std::ptr::null_mut(), None);
        }
    });
    CAPTURED.with(|slot| slot.borrow_mut().take());
    CAPTURING.with(|flag| flag.set(true));
    let status = call();
    CAPTURING.with(|flag| flag.set(false));
    let message = CAPTURED.with(|slot| slot.borrow_mut().take());
    match status {
        0 => Ok(()),
        _ => Err(message.unwrap_or_else(|| format!("mlx-c returned status {status}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for backend in [
            Backend::Any,
            Backend::Ring,
            Backend::Jaccl,
            Backend::Mpi,
            Backend::Nccl,
        ] {
            assert_eq!(backend.as_str().parse::<Backend>().ok(), Some(backend));
        }
        assert!("tcp".parse::<Backend>().is_err());
    }

    #[test]
    fn ring_is_in_this_libmlx() {
        assert!(is_available(Backend::Ring));
    }

    #[test]
    fn a_lone_process_forms_a_group_of_one() {
        // No MLX_HOSTFILE in the test environment: non-strict init falls back to
        // a singleton group, in which all_sum is the identity.
        let group = Group::join_or_alone(Backend::Any).expect("singleton group");
        assert_eq!((group.rank(), group.size()), (0, 1));
        let x = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]);
        let sum = group.all_sum(&x).expect("all_sum");
        sum.eval().expect("eval");
        assert_eq!(sum.as_slice::<f32>(), &[1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_ring_without_a_hostfile_is_an_error_not_an_exit() {
        // Strict ring init needs MLX_HOSTFILE; the message must come back as
        // an error (mlx-c's default handler would have exited the process).
        if std::env::var_os("MLX_HOSTFILE").is_some() {
            return;
        }
        let err = Group::join(Backend::Ring).expect_err("no hostfile");
        assert!(matches!(err, DistributedError::Join { .. }), "{err}");
        assert!(!err.to_string().contains("status"), "{err}");
    }
}
