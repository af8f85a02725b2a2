//! Finding a shard's model on this node, and downloading it when missing.
//!
//! Local lookup, in each model directory in order:
//! - the Hugging Face cache layout, `models--ORG--NAME/snapshots/COMMIT`,
//!   with the revision resolved through `refs/REVISION` (a 40-hex revision
//!   names the commit itself);
//! - plain directories, `ORG/NAME` and then `NAME`.
//!
//! A directory counts only if it holds a `config.json`. A model ID that is
//! an absolute path is used as it is (handy on a developer machine).
//!
//! Downloads go through the hf-hub crate into the download directory, in
//! the same cache layout (so the next lookup finds them). They honour
//! `HF_ENDPOINT` and `HF_TOKEN`. hf-hub asks the hub for
//! `GET {endpoint}/api/models/{repo}/revision/{rev}` (we add `?blobs=true`
//! for file sizes), then for each file a one-byte ranged
//! `GET {endpoint}/{repo}/resolve/{rev}/{file}` (reading `ETag`,
//! `X-Repo-Commit` and `Content-Range`) and ranged GETs of the content.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hf_hub::api::tokio::{ApiBuilder, ApiError, Progress};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

/// Files a model needs: what mlx-lm downloads.
fn wanted(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    name.ends_with(".json")
        || name.ends_with(".safetensors")
        || name.ends_with(".jinja")
        || name.ends_with(".tiktoken")
        || name.ends_with(".txt")
        || name == "tokenizer.model"
}

/// The Hugging Face cache folder of a model repo.
pub fn cache_folder(model: &str) -> String {
    format!("models--{}", model.replace('/', "--"))
}

fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Why `value` (a model ID, or with `absolute_ok` also a model directory,
/// or a revision) cannot be joined into a path under a model directory:
/// a part between slashes that is empty, `.` or `..`, or a backslash or NUL.
/// `None` when it is safe.
pub fn path_problem(field: &str, value: &str, absolute_ok: bool) -> Option<String> {
    let relative = match value.strip_prefix('/') {
        Some(rest) if absolute_ok => rest,
        _ => value,
    };
    let bad_part = relative
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..");
    (bad_part || value.contains(['\\', '\0'])).then(|| {
        format!(
            "{field} `{}` is not a safe name: every part between slashes must be non-empty and \
             not `.` or `..` (for example `main`, `v1.2` or `org/name`)",
            value.escape_debug()
        )
    })
}

/// Where `model` at `revision` is on this node, if anywhere.
pub fn find_local(dirs: &[PathBuf], model: &str, revision: &str) -> Option<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_absolute() {
        return is_model_dir(as_path).then(|| as_path.to_path_buf());
    }
    for dir in dirs {
        let repo = dir.join(cache_folder(model));
        if repo.is_dir() {
            let commit = if is_commit(revision) {
                Some(revision.to_owned())
            } else {
                std::fs::read_to_string(repo.join("refs").join(revision))
                    .ok()
                    .map(|c| c.trim().to_owned())
                    // A ref names a commit; anything else is not followed.
                    .filter(|c| is_commit(c))
            };
            if let Some(commit) = commit {
                let snapshot = repo.join("snapshots").join(commit);
                if is_model_dir(&snapshot) {
                    return Some(snapshot);
                }
            }
        }
        let plain = dir.join(model);
        if is_model_dir(&plain) {
            return Some(plain);
        }
        if let Some(name) = model.rsplit('/').next() {
            let short = dir.join(name);
            if is_model_dir(&short) {
                return Some(short);
            }
        }
    }
    None
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The hub has no such model or revision (or refuses us).
    #[error("{model}@{revision} is not on {endpoint} (HTTP {status})")]
    NotFound {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// Hub endpoint.
        endpoint: String,
        /// HTTP status.
        status: u16,
    },
    /// The repo lacks a file every model needs.
    #[error("{model}@{revision} on {endpoint} has no {missing}")]
    Incomplete {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// Hub endpoint.
        endpoint: String,
        /// What is missing.
        missing: &'static str,
    },
    /// Downloads are turned off.
    #[error(
        "{model}@{revision} is in none of the model directories {dirs}, and downloads are off (--offline)"
    )]
    Offline {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// The directories searched.
        dirs: String,
    },
    /// The network or the disk failed.
    #[error("downloading {model}@{revision} from {endpoint}: {message}")]
    Transfer {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// Hub endpoint.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
}

impl DownloadError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, DownloadError::Transfer { .. })
    }
}

/// Bytes done and total of a download, shared with whoever reports it.
#[derive(Debug, Clone, Default)]
pub struct DownloadProgress {
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl DownloadProgress {
    /// `(bytes done, bytes in all)`; the total is 0 while unknown.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

impl Progress for DownloadProgress {
    async fn init(&mut self, _size: usize, _filename: &str) {}

    async fn update(&mut self, size: usize) {
        self.done.fetch_add(size as u64, Ordering::Relaxed);
    }

    async fn finish(&mut self) {}
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
}

/// The hub endpoint in use: `$HF_ENDPOINT` or huggingface.co.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .map(|e| e.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// Downloads `model` at `revision` into `dest` (cache layout) and returns
/// its snapshot directory. Files already there are not fetched again.
pub async fn download(
    model: &str,
    revision: &str,
    dest: &Path,
    progress: DownloadProgress,
) -> Result<PathBuf, DownloadError> {
    let endpoint = endpoint();
    let transfer = |message: String| DownloadError::Transfer {
        model: model.to_owned(),
        revision: revision.to_owned(),
        endpoint: endpoint.clone(),
        message,
    };
    let not_found = |status: u16| DownloadError::NotFound {
        model: model.to_owned(),
        revision: revision.to_owned(),
        endpoint: endpoint.clone(),
        status,
    };
    std::fs::create_dir_all(dest)
        .map_err(|e| transfer(format!("creating {}: {e}", dest.display())))?;
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let mut builder = ApiBuilder::from_cache(Cache::new(dest.to_path_buf()))
        .with_endpoint(endpoint.clone())
        .with_progress(false);
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder.build().map_err(|e| transfer(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        model.to_owned(),
        RepoType::Model,
        revision.to_owned(),
    ));

    let response = repo
        .info_request()
        .query(&[("blobs", "true")])
        .send()
        .await
        .map_err(|e| transfer(e.to_string()))?;
    let status = response.status().as_u16();
    if matches!(status, 401 | 403 | 404) {
        return Err(not_found(status));
    }
    if !(200..300).contains(&status) {
        return Err(transfer(format!("the hub answered HTTP {status}")));
    }
    let body = response.text().await.map_err(|e| transfer(e.to_string()))?;
    let info: RepoInfo =
        serde_json::from_str(&body).map_err(|e| transfer(format!("unreadable repo info: {e}")))?;
    let files: Vec<&Sibling> = info
        .siblings
        .iter()
        .filter(|s| wanted(&s.rfilename))
        .collect();
    let incomplete = |missing| DownloadError::Incomplete {
        model: model.to_owned(),
        revision: revision.to_owned(),
        endpoint: endpoint.clone(),
        missing,
    };
    if !files.iter().any(|f| f.rfilename == "config.json") {
        return Err(incomplete("config.json"));
    }
    if !files.iter().any(|f| f.rfilename.ends_with(".safetensors")) {
        return Err(incomplete("safetensors weights"));
    }
    if files.iter().all(|f| f.size.is_some()) {
        let total: u64 = files.iter().filter_map(|f| f.size).sum();
        progress.total.store(total, Ordering::Relaxed);
    }

    let snapshot = dest
        .join(cache_folder(model))
        .join("snapshots")
        .join(&info.sha);
    for file in files {
        let local = snapshot.join(&file.rfilename);
        if let (Ok(meta), Some(size)) = (std::fs::metadata(&local), file.size)
            && meta.len() == size
        {
            progress.done.fetch_add(size, Ordering::Relaxed);
            continue;
        }
        if file.size == Some(0) {
            // hf-hub cannot fetch empty files; write it ourselves.
            if let Some(parent) = local.parent() {
                std::fs::create_dir_all(parent).map_err(|e| transfer(e.to_string()))?;
            }
            std::fs::write(&local, b"").map_err(|e| transfer(e.to_string()))?;
            continue;
        }
        repo.download_with_progress(&file.rfilename, progress.clone())
            .await
            .map_err(|e| match &e {
                ApiError::RequestError(r) if r.status().is_some_and(|s| s.as_u16() == 404) => {
                    not_found(404)
                }
                _ => transfer(format!("{}: {e}", file.rfilename)),
            })?;
    }
    // hf-hub records `refs/<revision>`; a commit revision needs no ref.
    if is_model_dir(&snapshot) {
        Ok(snapshot)
    } else {
        Err(incomplete("config.json in the downloaded snapshot"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(path: &Path) {
        std::fs::create_dir_all(path).expect("mkdir");
        std::fs::write(path.join("config.json"), "{}").expect("write");
    }

    #[test]
    fn names_that_would_leave_the_model_directories_are_refused() {
        for good in ["main", "v1.2", "refs/pr/1", "a..b"] {
            assert_eq!(path_problem("spec.revision", good, false), None, "{good}");
        }
        assert_eq!(path_problem("spec.model", "/models/m", true), None);
        for bad in [
            "..",
            "../x",
            "main/../../etc",
            "a//b",
            "./a",
            "a/",
            "/abs",
            "a\\b",
            "a\0",
        ] {
            let problem = path_problem("spec.revision", bad, false).expect(bad);
            assert!(problem.contains("spec.revision"), "{problem}");
        }
        assert!(path_problem("spec.model", "/models/../etc", true).is_some());
    }

    #[test]
    fn models_are_found_in_every_layout() {
        let root = std::env::temp_dir().join(format!("tandem-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let hub = root.join("hub");
        let plain = root.join("plain");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = hub.join("models--org--tiny");
        model_dir(&repo.join("snapshots").join(commit));
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).expect("ref");
        model_dir(&plain.join("org/other"));
        model_dir(&plain.join("short"));
        let dirs = vec![hub.clone(), plain.clone()];

        assert_eq!(
            find_local(&dirs, "org/tiny", "main"),
            Some(repo.join("snapshots").join(commit))
        );
        assert_eq!(
            find_local(&dirs, "org/tiny", commit),
            Some(repo.join("snapshots").join(commit))
        );
        assert_eq!(find_local(&dirs, "org/tiny", "v2"), None);
        assert_eq!(
            find_local(&dirs, "org/other", "main"),
            Some(plain.join("org/other"))
        );
        assert_eq!(
            find_local(&dirs, "someone/short", "main"),
            Some(plain.join("short"))
        );
        assert_eq!(find_local(&dirs, "org/absent", "main"), None);
        // A ref that does not hold a commit is not followed.
        std::fs::write(repo.join("refs/odd"), "../../../plain/short\n").expect("ref");
        assert_eq!(find_local(&dirs, "org/tiny", "odd"), None);
        let absolute = plain.join("short");
        assert_eq!(
            find_local(&[], absolute.to_str().expect("utf-8"), "main"),
            Some(absolute.clone())
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn only_model_files_are_fetched() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            ".gitattributes",
            "README.md",
            "model.gguf",
            "pytorch_model.bin",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
