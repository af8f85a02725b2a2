//! The agent's private state directory: where it is by default, how it is
//! created and checked, and how files are written in it.
//!
//! Rank workers read their MLX hostfile from it and keep the MLX kernel
//! cache there, so whoever can write it can point a worker at other peers
//! or plant kernels. It therefore lives under the user's state home (never
//! a predictable path in a shared `/tmp`), is created `0700`, and is
//! refused when it is a symbolic link, belongs to another user, or other
//! users may write it. Files are written to a fresh temporary file in the
//! same directory and renamed into place, so a link planted at the final
//! name is replaced, never followed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the state directory (or a directory or file in it) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// No directory was configured and the environment names no home.
    #[error(
        "no state directory: set --state-dir (TANDEM_STATE_DIR), or $XDG_STATE_HOME or $HOME \
         for the default"
    )]
    NoDefault,
    /// The path is a symbolic link.
    #[error(
        "the state directory {} is a symbolic link; give the directory it points to, or a \
         private directory of this user",
        path.display()
    )]
    Symlink {
        /// The directory.
        path: PathBuf,
    },
    /// The path is not a directory.
    #[error("the state directory {} is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Another user owns it.
    #[error(
        "the state directory {} belongs to user {owner}, not to this process's user {me}; \
         give a directory of this user",
        path.display()
    )]
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Other users may write it.
    #[error(
        "the state directory {} has mode {mode:o}: other users may write it; \
         `chmod go-w` it or give a private directory",
        path.display()
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Creating, checking or writing failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<StateDirError> for std::io::Error {
    fn from(e: StateDirError) -> std::io::Error {
        match e {
            StateDirError::Io { source, .. } => source,
            other => std::io::Error::new(std::io::ErrorKind::PermissionDenied, other.to_string()),
        }
    }
}

/// The default state directory `leaf`: `$XDG_STATE_HOME/tandem/<leaf>`,
/// else `$HOME/.local/state/tandem/<leaf>` (the XDG default); `None` when
/// neither is set.
pub fn default_dir(state_home: Option<&Path>, home: Option<&Path>, leaf: &str) -> Option<PathBuf> {
    let base = match (state_home, home) {
        (Some(state), _) if state.is_absolute() => state.to_owned(),
        (_, Some(home)) if home.is_absolute() => home.join(".local/state"),
        _ => return None,
    };
    Some(base.join("tandem").join(leaf))
}

/// Creates `dir` (mode `0700`; missing parents with the default mode) when
/// it does not exist, then checks it: a real directory, not a link, owned by
/// this process's user, writable by no one else.
pub fn prepare(dir: &Path) -> Result<(), StateDirError> {
    if std::fs::symlink_metadata(dir).is_err() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StateDirError::Io {
                what: "creating the parent of the state directory",
                path: parent.to_owned(),
                source,
            })?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            // Created meanwhile by someone else: the checks below decide.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(StateDirError::Io {
                    what: "creating the state directory",
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
    check(dir)
}

/// Checks an existing directory as [`prepare`] does.
pub fn check(dir: &Path) -> Result<(), StateDirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| StateDirError::Io {
        what: "reading the state directory",
        path: dir.to_owned(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(StateDirError::Symlink {
            path: dir.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateDirError::Owner {
            path: dir.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StateDirError::Writable {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` (mode `0600`) without following a link at
/// `path`: into a new temporary file of the same directory, opened with
/// `O_CREAT | O_EXCL` (which never follows a link), then renamed over
/// `path`, which replaces whatever is there, a link included.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StateDirError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| StateDirError::Io { what, path, source }
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io("creating", &temp))
        .and_then(|mut file| {
            file.write_all(bytes).map_err(io("writing", &temp))?;
            file.sync_all().map_err(io("writing", &temp))
        })
        .and_then(|()| std::fs::rename(&temp, path).map_err(io("replacing", path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tandem-state-dir-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    #[test]
    fn the_default_is_the_users_state_home_never_tmp() {
        assert_eq!(
            default_dir(Some(Path::new("/s")), Some(Path::new("/h")), "agent-a"),
            Some(PathBuf::from("/s/tandem/agent-a"))
        );
        assert_eq!(
            default_dir(None, Some(Path::new("/h")), "agent-a"),
            Some(PathBuf::from("/h/.local/state/tandem/agent-a"))
        );
        // The XDG rule: a relative $XDG_STATE_HOME is ignored.
        assert_eq!(
            default_dir(Some(Path::new("rel")), Some(Path::new("/h")), "x"),
            Some(PathBuf::from("/h/.local/state/tandem/x"))
        );
        assert_eq!(default_dir(None, None, "x"), None);
    }

    #[test]
    fn a_new_state_dir_is_private_and_an_unsafe_one_is_refused() {
        let root = scratch("prepare");
        let dir = root.join("a/b/state");
        prepare(&dir).expect("created");
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare(&dir).expect("an existing private directory is fine");

        let link = root.join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        let err = prepare(&link).expect_err("a link");
        assert!(matches!(err, StateDirError::Symlink { .. }), "{err}");

        let open = root.join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = prepare(&open).expect_err("world-writable");
        assert!(matches!(err, StateDirError::Writable { .. }), "{err}");
        assert!(err.to_string().contains("777"), "{err}");

        let file = root.join("file");
        std::fs::write(&file, "x").expect("write");
        let err = prepare(&file).expect_err("a file");
        assert!(matches!(err, StateDirError::NotADirectory { .. }), "{err}");

        // Another user's directory (needs root to make one).
        if nix::unistd::geteuid().is_root() {
            let theirs = root.join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            let err = prepare(&theirs).expect_err("another user's");
            assert!(
                matches!(err, StateDirError::Owner { owner: 65534, .. }),
                "{err}"
            );
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn writes_replace_a_planted_link_instead_of_following_it() {
        let root = scratch("write");
        let victim = root.join("victim");
        std::fs::write(&victim, "precious").expect("write");
        let target = root.join("hostfile.json");
        std::os::unix::fs::symlink(&victim, &target).expect("symlink");

        write_file(&target, b"[]").expect("written");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
        let meta = std::fs::symlink_metadata(&target).expect("meta");
        assert!(meta.is_file(), "the link was replaced by a file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "[]");
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&root)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let _ = std::fs::remove_dir_all(root);
    }
}
