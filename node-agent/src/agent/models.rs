//! Finding a shard's model on this node, and downloading it when missing.
//!
//! Local lookup, in each model directory in order:
//! - the Hugging Face cache layout, `models--ORG--NAME/snapshots/COMMIT`,
//!   with the revision resolved through `refs/REVISION` (a 40-hex revision
//!   names the commit itself);
//! - plain directories, `ORG/NAME` and then `NAME`.
//!
//! A plain directory counts if it holds a `config.json`. A cache snapshot
//! counts only when it is complete: one this agent downloaded carries the
//! marker [`COMPLETE_MARKER`] (written before the snapshot became visible)
//! and still holds every file the marker lists at its size; any other
//! snapshot (written by `huggingface-cli`, mlx-lm, or an older agent that
//! downloaded in place) needs a `config.json` and every weight file its
//! `model.safetensors.index.json` names (or, without an index, a
//! `*.safetensors`). A model ID that is an absolute path is used as it is.
//!
//! Downloads (see [`Download`]) speak the hub's HTTP protocol themselves:
//! `GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true` for the
//! commit, the file list, sizes and LFS sha256 digests, then
//! `GET {endpoint}/{repo}/resolve/{commit}/{file}` for each file, with a
//! `Range` to resume a partial one. Files go into a staging directory,
//! `<download dir>/.staging/models--ORG--NAME/COMMIT`, each verified
//! (sha256 where the hub gives one, size otherwise); the complete directory
//! then becomes `snapshots/COMMIT` with one rename, and only after that is
//! `refs/REV` written. They honour `HF_ENDPOINT` and `HF_TOKEN`.
//!
//! One download per model and revision runs at a time on a node: within a
//! process, shards that need the same model share one [`Download`]; across
//! processes, an exclusive `flock` on
//! `<download dir>/.staging/models--ORG--NAME/COMMIT.lock` makes the second
//! one wait and then find the snapshot complete.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The file, written last into a staged snapshot, that says it is complete
/// and verified: `{"files": [{"name", "size", "sha256"?}]}`.
pub const COMPLETE_MARKER: &str = ".tandem-complete.json";

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

/// What [`COMPLETE_MARKER`] holds.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    files: Vec<MarkerFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MarkerFile {
    name: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

/// Why the cache snapshot `dir` is not a complete model; `None` when it is.
pub fn snapshot_problem(dir: &Path) -> Option<String> {
    let marker = dir.join(COMPLETE_MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        let Ok(marker) = serde_json::from_str::<Marker>(&text) else {
            return Some(format!("{} is unreadable", marker.display()));
        };
        return marker.files.iter().find_map(|f| {
            let path = dir.join(&f.name);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == f.size => None,
                Ok(m) => Some(format!(
                    "{} has {} bytes, not {}",
                    path.display(),
                    m.len(),
                    f.size
                )),
                Err(e) => Some(format!("{}: {e}", path.display())),
            }
        });
    }
    if !is_model_dir(dir) {
        return Some(format!("{} has no config.json", dir.display()));
    }
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let Ok(index_json) = serde_json::from_str::<Index>(&text) else {
            return Some(format!("{} is unreadable", index.display()));
        };
        let mut shards: Vec<&String> = index_json.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        return shards
            .into_iter()
            .find(|s| path_problem("weight file", s, false).is_some() || !dir.join(s).is_file())
            .map(|s| format!("{} lacks {s}, which its weight index names", dir.display()));
    }
    let has_weights = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name().to_string_lossy().ends_with(".safetensors") && e.path().is_file()
        })
    });
    (!has_weights).then(|| format!("{} has no .safetensors weights", dir.display()))
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

/// The commit `revision` names in the cache repo folder `repo`, if known.
fn resolve_ref(repo: &Path, revision: &str) -> Option<String> {
    if is_commit(revision) {
        return Some(revision.to_owned());
    }
    std::fs::read_to_string(repo.join("refs").join(revision))
        .ok()
        .map(|c| c.trim().to_owned())
        // A ref names a commit; anything else is not followed.
        .filter(|c| is_commit(c))
}

/// Where `model` at `revision` is on this node, if anywhere.
pub fn find_local(dirs: &[PathBuf], model: &str, revision: &str) -> Option<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_absolute() {
        return is_model_dir(as_path).then(|| as_path.to_path_buf());
    }
    for dir in dirs {
        let repo = dir.join(cache_folder(model));
        if let Some(commit) = resolve_ref(&repo, revision) {
            let snapshot = repo.join("snapshots").join(commit);
            match snapshot_problem(&snapshot) {
                None => return Some(snapshot),
                Some(problem) if snapshot.exists() => {
                    tracing::info!(%model, %revision, %problem, "not using an incomplete snapshot");
                }
                Some(_) => {}
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

// === Download errors ===

/// Why a download failed.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The repo lacks a file every model needs, or lists one we cannot use.
    #[error("{model}@{revision} on {endpoint} has no {missing}")]
    Incomplete {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// Hub endpoint.
        endpoint: String,
        /// What is missing.
        missing: String,
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
    /// The network failed, or the hub answered with a server error: worth
    /// trying again (what arrived is kept and resumed).
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
    /// A file's bytes did not match the hub's digest or size, twice.
    #[error(
        "{model}@{revision}: {file} from {endpoint} is corrupt: {detail} (downloaded twice; \
         the bad copy was deleted)"
    )]
    Corrupt {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// Hub endpoint.
        endpoint: String,
        /// The file, relative to the repo.
        file: String,
        /// Expected and actual digest or size.
        detail: String,
    },
    /// The download directory's file system has too little free space.
    #[error(
        "downloading {model}@{revision} needs {} more in {} but only {} is free there",
        bytes(*.needed), dir.display(), bytes(*.available)
    )]
    InsufficientDisk {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// The download directory.
        dir: PathBuf,
        /// Bytes still to fetch.
        needed: u64,
        /// Bytes free for us there.
        available: u64,
    },
    /// A local file could not be read or written (permissions, I/O).
    #[error("downloading {model}@{revision}: {path}: {message}")]
    Local {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Nobody waits for the download any more.
    #[error("the download of {model}@{revision} was abandoned")]
    Cancelled {
        /// Model ID.
        model: String,
        /// Revision.
        revision: String,
    },
}

impl DownloadError {
    /// Whether trying again later may succeed without anything changing.
    pub fn is_transient(&self) -> bool {
        matches!(self, DownloadError::Transfer { .. })
    }
}

/// `n` bytes for people: `1.5 GiB (1610612736 bytes)`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{value:.1} {} ({n} bytes)", UNITS[unit])
    }
}

/// Bytes the current user may still write on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stats = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    // The block count is 32 bits wide on macOS, 64 on Linux.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(stats.blocks_available()).saturating_mul(u64::from(stats.fragment_size())))
}

// === Progress and single flight ===

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

/// Where a shared download stands.
#[derive(Debug, Clone)]
enum FlightState {
    /// Still going; the note says what it waits for (a retry, a lock).
    Running(Option<String>),
    /// Over.
    Done(Result<PathBuf, DownloadError>),
}

/// One download in progress in this process, shared by its waiters.
#[derive(Debug, Clone)]
struct Flight {
    progress: DownloadProgress,
    state: watch::Sender<FlightState>,
}

type FlightKey = (PathBuf, String, String);

/// The downloads running in this process. A process-wide map because the
/// thing it guards (a model directory on this node) is process-wide too.
fn flights() -> &'static Mutex<HashMap<FlightKey, Flight>> {
    static FLIGHTS: OnceLock<Mutex<HashMap<FlightKey, Flight>>> = OnceLock::new();
    FLIGHTS.get_or_init(Mutex::default)
}

/// A wait for `model` at `revision` in a download directory. Every
/// [`Download`] of the same model, revision and directory in this process
/// shares one transfer; it stops once no [`Download`] of it is left.
/// Network failures are retried inside, with a backoff of 1 s doubling to
/// 30 s, resuming what already arrived; see [`Download::note`].
#[derive(Debug)]
pub struct Download {
    key: FlightKey,
    progress: DownloadProgress,
    state: watch::Receiver<FlightState>,
}

impl Download {
    /// Joins the download of `model` at `revision` into `dest`, starting it
    /// if none runs. Must be called within a tokio runtime.
    pub fn start(model: &str, revision: &str, dest: &Path) -> Download {
        let key = (dest.to_path_buf(), model.to_owned(), revision.to_owned());
        let mut map = match flights().lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(flight) = map.get(&key) {
            return Download {
                key,
                progress: flight.progress.clone(),
                state: flight.state.subscribe(),
            };
        }
        let (tx, rx) = watch::channel(FlightState::Running(None));
        let flight = Flight {
            progress: DownloadProgress::default(),
            state: tx,
        };
        map.insert(key.clone(), flight.clone());
        drop(map);
        let task_key = key.clone();
        let progress = flight.progress.clone();
        tokio::spawn(async move {
            let (dest, model, revision) = &task_key;
            let result = tokio::select! {
                r = fetch_with_retries(model, revision, dest, &flight) => r,
                () = flight.state.closed() => Err(DownloadError::Cancelled {
                    model: model.clone(),
                    revision: revision.clone(),
                }),
            };
            if let Ok(mut map) = flights().lock()
                && map
                    .get(&task_key)
                    .is_some_and(|f| f.state.same_channel(&flight.state))
            {
                map.remove(&task_key);
            }
            flight.state.send_replace(FlightState::Done(result));
        });
        Download {
            key,
            progress,
            state: rx,
        }
    }

    /// `(bytes done, bytes in all)`; the total is 0 while unknown.
    pub fn progress(&self) -> (u64, u64) {
        self.progress.get()
    }

    /// What the download waits for now, if anything: the retry after a
    /// network failure, or another process downloading the same model.
    pub fn note(&self) -> Option<String> {
        match &*self.state.borrow() {
            FlightState::Running(note) => note.clone(),
            FlightState::Done(_) => None,
        }
    }

    /// Waits for the snapshot directory, or the reason there is none.
    pub async fn finish(&mut self) -> Result<PathBuf, DownloadError> {
        loop {
            let outcome = match self
                .state
                .wait_for(|s| matches!(s, FlightState::Done(_)))
                .await
            {
                Ok(state) => match &*state {
                    FlightState::Done(r) => r.clone(),
                    FlightState::Running(_) => continue,
                },
                Err(_) => Err(DownloadError::Cancelled {
                    model: self.key.1.clone(),
                    revision: self.key.2.clone(),
                }),
            };
            match outcome {
                // Joined a download just as its last waiter left: start anew.
                Err(DownloadError::Cancelled { .. }) => {
                    *self = Download::start(&self.key.1, &self.key.2, &self.key.0);
                }
                other => return other,
            }
        }
    }
}

/// Runs [`fetch`] until it succeeds or fails for a reason that waiting
/// does not cure; between tries the flight's note says why and when.
async fn fetch_with_retries(
    model: &str,
    revision: &str,
    dest: &Path,
    flight: &Flight,
) -> Result<PathBuf, DownloadError> {
    let mut backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut failures = 0u32;
    loop {
        match fetch(model, revision, dest, flight).await {
            Err(e) if e.is_transient() => {
                failures += 1;
                let delay = backoff.next_delay();
                tracing::warn!(%model, %revision, error = %e, "download interrupted; retrying in {}s", delay.as_secs());
                let (done, total) = flight.progress.get();
                flight.state.send_replace(FlightState::Running(Some(format!(
                    "{e}; {} of {} kept, retrying in {}s (failure {failures})",
                    bytes(done),
                    bytes(total),
                    delay.as_secs()
                ))));
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

// === The transfer ===

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Debug, Clone, Deserialize)]
struct LfsInfo {
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().and_then(|l| l.size).or(self.size)
    }

    fn sha256(&self) -> Option<String> {
        self.lfs
            .as_ref()
            .and_then(|l| l.sha256.clone())
            .map(|s| s.to_ascii_lowercase())
    }
}

/// The hub endpoint in use: `$HF_ENDPOINT` or huggingface.co.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .map(|e| e.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// How long a response may send nothing before it counts as a network cut:
/// `$TANDEM_DOWNLOAD_READ_TIMEOUT_SECONDS`, default 30.
fn read_timeout() -> Duration {
    let seconds = std::env::var("TANDEM_DOWNLOAD_READ_TIMEOUT_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

/// The context every error of one download names.
struct Job<'a> {
    model: &'a str,
    revision: &'a str,
    endpoint: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Job<'_> {
    fn transfer(&self, message: impl Into<String>) -> DownloadError {
        DownloadError::Transfer {
            model: self.model.to_owned(),
            revision: self.revision.to_owned(),
            endpoint: self.endpoint.clone(),
            message: message.into(),
        }
    }

    fn local(&self, path: &Path, e: impl std::fmt::Display) -> DownloadError {
        DownloadError::Local {
            model: self.model.to_owned(),
            revision: self.revision.to_owned(),
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// A write error: a full disk is [`DownloadError::InsufficientDisk`].
    fn write_error(
        &self,
        path: &Path,
        e: std::io::Error,
        dest: &Path,
        needed: u64,
    ) -> DownloadError {
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            DownloadError::InsufficientDisk {
                model: self.model.to_owned(),
                revision: self.revision.to_owned(),
                dir: dest.to_path_buf(),
                needed,
                available: free_bytes(dest).unwrap_or(0),
            }
        } else {
            self.local(path, e)
        }
    }

    fn not_found(&self, status: u16) -> DownloadError {
        DownloadError::NotFound {
            model: self.model.to_owned(),
            revision: self.revision.to_owned(),
            endpoint: self.endpoint.clone(),
            status,
        }
    }

    fn incomplete(&self, missing: impl Into<String>) -> DownloadError {
        DownloadError::Incomplete {
            model: self.model.to_owned(),
            revision: self.revision.to_owned(),
            endpoint: self.endpoint.clone(),
            missing: missing.into(),
        }
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let request = self.client.get(url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// Holds the cross-process lock of one model commit while alive.
#[derive(Debug)]
struct CommitLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the lock file `path`, waiting (and saying so in the flight's note)
/// while another process holds it.
async fn lock_commit(
    job: &Job<'_>,
    path: &Path,
    flight: &Flight,
) -> Result<CommitLock, DownloadError> {
    let mut waiting = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| job.local(path, e))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                if waiting {
                    flight.state.send_replace(FlightState::Running(None));
                }
                return Ok(CommitLock { _lock: lock });
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if !waiting {
                    waiting = true;
                    let note = format!(
                        "waiting for another process downloading {}@{} (lock {})",
                        job.model,
                        job.revision,
                        path.display()
                    );
                    tracing::info!("{note}");
                    flight.state.send_replace(FlightState::Running(Some(note)));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err((_, e)) => return Err(job.local(path, e)),
        }
    }
}

/// One try at downloading `model` at `revision` into `dest`.
async fn fetch(
    model: &str,
    revision: &str,
    dest: &Path,
    flight: &Flight,
) -> Result<PathBuf, DownloadError> {
    let progress = &flight.progress;
    let client = reqwest::Client::builder()
        .user_agent(concat!("tandem-agent/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(read_timeout())
        .build();
    let endpoint = endpoint();
    let job = Job {
        model,
        revision,
        endpoint: endpoint.clone(),
        token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        client: match client {
            Ok(c) => c,
            Err(e) => {
                return Err(DownloadError::Local {
                    model: model.to_owned(),
                    revision: revision.to_owned(),
                    path: dest.to_path_buf(),
                    message: format!("building the HTTP client: {e}"),
                });
            }
        },
    };
    // A complete snapshot already here (another process just finished).
    if let Some(dir) = find_local(&[dest.to_path_buf()], model, revision)
        && dir.starts_with(dest.join(cache_folder(model)))
    {
        return Ok(dir);
    }

    // What the revision is.
    let info_url = format!("{endpoint}/api/models/{model}/revision/{revision}?blobs=true");
    let response = job
        .get(&info_url)
        .send()
        .await
        .map_err(|e| job.transfer(format!("asking for the file list: {e}")))?;
    let status = response.status().as_u16();
    if matches!(status, 401 | 403 | 404) {
        return Err(job.not_found(status));
    }
    if !response.status().is_success() {
        return Err(job.transfer(format!("the hub answered HTTP {status} for the file list")));
    }
    let body = response
        .text()
        .await
        .map_err(|e| job.transfer(format!("reading the file list: {e}")))?;
    let info: RepoInfo = serde_json::from_str(&body)
        .map_err(|e| job.transfer(format!("unreadable repo info: {e}")))?;
    if !is_commit(&info.sha) {
        return Err(job.incomplete(format!("commit id (the hub said `{}`)", info.sha)));
    }
    let files: Vec<Sibling> = info
        .siblings
        .iter()
        .filter(|s| wanted(&s.rfilename))
        .cloned()
        .collect();
    if !files.iter().any(|f| f.rfilename == "config.json") {
        return Err(job.incomplete("config.json"));
    }
    if !files.iter().any(|f| f.rfilename.ends_with(".safetensors")) {
        return Err(job.incomplete("safetensors weights"));
    }
    if let Some(problem) = files
        .iter()
        .find_map(|f| path_problem("file", &f.rfilename, false))
    {
        return Err(job.incomplete(format!("usable file name: {problem}")));
    }

    // One process at a time per commit.
    let repo = dest.join(cache_folder(model));
    let snapshot = repo.join("snapshots").join(&info.sha);
    let staging_root = dest.join(".staging").join(cache_folder(model));
    std::fs::create_dir_all(&staging_root).map_err(|e| job.local(&staging_root, e))?;
    let _lock = lock_commit(
        &job,
        &staging_root.join(format!("{}.lock", info.sha)),
        flight,
    )
    .await?;
    if snapshot_problem(&snapshot).is_none() {
        write_ref(&job, &repo, revision, &info.sha)?;
        return Ok(snapshot);
    }

    // What is still to fetch, and whether it fits.
    let staging = staging_root.join(&info.sha);
    std::fs::create_dir_all(&staging).map_err(|e| job.local(&staging, e))?;
    let total: u64 = files.iter().filter_map(Sibling::size).sum();
    let mut have = 0u64;
    for f in &files {
        let size = f.size().unwrap_or(u64::MAX);
        let whole = std::fs::metadata(staging.join(&f.rfilename)).map(|m| m.len());
        let part = std::fs::metadata(part_path(&staging, &f.rfilename)).map(|m| m.len());
        have += match (whole, part) {
            (Ok(n), _) if n == size => n,
            (_, Ok(n)) if n <= size => n,
            _ => 0,
        };
    }
    let needed = total.saturating_sub(have);
    let available = free_bytes(dest).map_err(|e| job.local(dest, e))?;
    if available < needed {
        return Err(DownloadError::InsufficientDisk {
            model: model.to_owned(),
            revision: revision.to_owned(),
            dir: dest.to_path_buf(),
            needed,
            available,
        });
    }
    progress.total.store(total, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);

    let mut marker = Marker { files: Vec::new() };
    for f in &files {
        let size = fetch_verified(&job, f, &info.sha, &staging, dest, needed, progress).await?;
        marker.files.push(MarkerFile {
            name: f.rfilename.clone(),
            size,
            sha256: f.sha256(),
        });
    }
    let marker_path = staging.join(COMPLETE_MARKER);
    let text = serde_json::to_string_pretty(&marker).map_err(|e| job.local(&marker_path, e))?;
    write_synced(&marker_path, text.as_bytes())
        .map_err(|e| job.write_error(&marker_path, e, dest, needed))?;

    // Make it visible in one step; an incomplete snapshot in the way (an
    // older agent's, downloaded in place) is moved out first.
    if snapshot.exists() {
        let discarded = staging_root.join(format!("{}.discarded-{}", info.sha, std::process::id()));
        std::fs::rename(&snapshot, &discarded).map_err(|e| job.local(&snapshot, e))?;
        if let Err(e) = std::fs::remove_dir_all(&discarded) {
            tracing::warn!(dir = %discarded.display(), error = %e, "removing an incomplete snapshot failed");
        }
    }
    let snapshots = repo.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(|e| job.local(&snapshots, e))?;
    std::fs::rename(&staging, &snapshot).map_err(|e| job.local(&snapshot, e))?;
    write_ref(&job, &repo, revision, &info.sha)?;
    tracing::info!(%model, %revision, commit = %info.sha, dir = %snapshot.display(), "model downloaded and verified");
    Ok(snapshot)
}

/// Where a file's partial bytes wait in the staging directory.
fn part_path(staging: &Path, file: &str) -> PathBuf {
    staging.join(format!("{file}.incomplete"))
}

/// Writes `bytes` to `path` and flushes them to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Records `refs/<revision>` (a commit revision needs none), atomically.
fn write_ref(
    job: &Job<'_>,
    repo: &Path,
    revision: &str,
    commit: &str,
) -> Result<(), DownloadError> {
    if is_commit(revision) {
        return Ok(());
    }
    let path = repo.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| job.local(parent, e))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    write_synced(&tmp, commit.as_bytes()).map_err(|e| job.local(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| job.local(&path, e))
}

/// The lowercase hex sha256 of the file at `path`.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(hasher.finish().as_ref()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// How one file's bytes compare with what the hub promised; `None` when
/// they match.
fn mismatch(path: &Path, file: &Sibling) -> std::io::Result<Option<String>> {
    let len = std::fs::metadata(path)?.len();
    if let Some(size) = file.size()
        && len != size
    {
        return Ok(Some(format!("{len} bytes, the hub lists {size}")));
    }
    if let Some(expected) = file.sha256() {
        let actual = sha256_file(path)?;
        if actual != expected {
            return Ok(Some(format!("sha256 {actual}, the hub lists {expected}")));
        }
    }
    Ok(None)
}

/// Brings one file into the staging directory, verified: keeps a verified
/// copy already there, resumes a partial one by range, and fetches it once
/// more from the start when the bytes do not match. Returns its size.
async fn fetch_verified(
    job: &Job<'_>,
    file: &Sibling,
    commit: &str,
    staging: &Path,
    dest: &Path,
    needed: u64,
    progress: &DownloadProgress,
) -> Result<u64, DownloadError> {
    let target = staging.join(&file.rfilename);
    let part = part_path(staging, &file.rfilename);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| job.local(parent, e))?;
    }
    if target.is_file() {
        match mismatch(&target, file).map_err(|e| job.local(&target, e))? {
            None => {
                let len = std::fs::metadata(&target)
                    .map_err(|e| job.local(&target, e))?
                    .len();
                progress.done.fetch_add(len, Ordering::Relaxed);
                return Ok(len);
            }
            Some(detail) => {
                tracing::warn!(file = %target.display(), %detail, "a staged file no longer matches; fetching it again");
                std::fs::remove_file(&target).map_err(|e| job.local(&target, e))?;
            }
        }
    }
    let mut corrupt_once = false;
    for _ in 0..2 {
        transfer_file(job, file, commit, &part, dest, needed, progress).await?;
        match mismatch(&part, file).map_err(|e| job.local(&part, e))? {
            None => {
                std::fs::rename(&part, &target).map_err(|e| job.local(&target, e))?;
                let len = std::fs::metadata(&target)
                    .map_err(|e| job.local(&target, e))?
                    .len();
                return Ok(len);
            }
            Some(detail) => {
                tracing::warn!(model = %job.model, file = %file.rfilename, %detail, "downloaded file is corrupt");
                let len = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                progress.done.fetch_sub(
                    len.min(progress.done.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                std::fs::remove_file(&part).map_err(|e| job.local(&part, e))?;
                if corrupt_once {
                    return Err(DownloadError::Corrupt {
                        model: job.model.to_owned(),
                        revision: job.revision.to_owned(),
                        endpoint: job.endpoint.clone(),
                        file: file.rfilename.clone(),
                        detail,
                    });
                }
                corrupt_once = true;
            }
        }
    }
    Err(job.transfer(format!("{}: no verified copy", file.rfilename)))
}

/// Fetches one file's bytes into `part`, resuming from its length when the
/// server honours ranges; returns once the body has ended with as many bytes
/// as the hub lists (a shorter body is a network failure).
async fn transfer_file(
    job: &Job<'_>,
    file: &Sibling,
    commit: &str,
    part: &Path,
    dest: &Path,
    needed: u64,
    progress: &DownloadProgress,
) -> Result<(), DownloadError> {
    let name = &file.rfilename;
    let mut offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if file.size().is_some_and(|size| offset > size) {
        offset = 0;
    }
    if file.size() == Some(offset) && offset > 0 {
        // Everything arrived before; only the check is left.
        progress.done.fetch_add(offset, Ordering::Relaxed);
        return Ok(());
    }
    let url = format!("{}/{}/resolve/{commit}/{name}", job.endpoint, job.model);
    let mut request = job.get(&url);
    if offset > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| job.transfer(format!("{name}: {e}")))?;
    let status = response.status().as_u16();
    let resumed = match status {
        206 if offset > 0 => {
            let from = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if from != Some(offset) {
                return Err(job.transfer(format!(
                    "{name}: asked for bytes from {offset}, the server sent {from:?}"
                )));
            }
            true
        }
        200 => false,
        401 | 403 | 404 => return Err(job.not_found(status)),
        416 => {
            // What we kept is no prefix of the file: start over next time.
            std::fs::remove_file(part).map_err(|e| job.local(part, e))?;
            return Err(job.transfer(format!(
                "{name}: the server refused the range from {offset}"
            )));
        }
        _ => return Err(job.transfer(format!("{name}: the hub answered HTTP {status}"))),
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| job.write_error(part, e, dest, needed))?;
    let mut written = if resumed { offset } else { 0 };
    progress.done.fetch_add(written, Ordering::Relaxed);
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                let _ = out.sync_all();
                return Err(job.transfer(format!(
                    "{name}: the connection broke after {} of {}: {e}",
                    bytes(written),
                    file.size().map(bytes).unwrap_or_else(|| "?".into())
                )));
            }
        };
        out.write_all(&chunk)
            .map_err(|e| job.write_error(part, e, dest, needed))?;
        written += chunk.len() as u64;
        progress
            .done
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    out.sync_all()
        .map_err(|e| job.write_error(part, e, dest, needed))?;
    match file.size() {
        Some(size) if written < size => Err(job.transfer(format!(
            "{name}: the body ended after {} of {}",
            bytes(written),
            bytes(size)
        ))),
        _ => Ok(()),
    }
}

// === `tandem-agent download` ===

/// `tandem-agent download`: fetch a model into a directory the way the
/// agent does for a shard, so a node can be filled ahead of time.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Model ID on the hub, `ORG/NAME`.
    pub model: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = tandem_crds::DEFAULT_REVISION)]
    pub revision: String,
    /// Directory to download into, in the Hugging Face cache layout (the
    /// agent's `--download-dir`).
    #[arg(long, env = "TANDEM_DOWNLOAD_DIR", value_name = "DIR")]
    pub download_dir: PathBuf,
}

/// Runs `tandem-agent download`: logs progress about once a second and
/// returns the snapshot directory.
pub async fn download_command(args: DownloadArgs) -> Result<PathBuf, DownloadError> {
    if let Some(problem) = path_problem("model", &args.model, false)
        .or_else(|| path_problem("revision", &args.revision, false))
    {
        return Err(DownloadError::Incomplete {
            model: args.model.clone(),
            revision: args.revision.clone(),
            endpoint: endpoint(),
            missing: problem,
        });
    }
    let mut transfer = Download::start(&args.model, &args.revision, &args.download_dir);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            done = transfer.finish() => return done,
            _ = tick.tick() => {
                let (done, total) = transfer.progress();
                match transfer.note() {
                    Some(note) => tracing::info!(done, total, "{note}"),
                    None => tracing::info!(done, total, "downloading {}@{}", args.model, args.revision),
                }
            }
        }
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
        std::fs::write(
            repo.join("snapshots")
                .join(commit)
                .join("model.safetensors"),
            b"weights",
        )
        .expect("weights");
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
    fn a_partial_snapshot_is_not_taken_for_a_model() {
        let root = std::env::temp_dir().join(format!("tandem-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let commit = "89abcdef0123456789abcdef0123456789abcdef";
        let repo = root.join("models--org--big");
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::write(repo.join("refs/main"), commit).expect("ref");
        let dirs = vec![root.clone()];

        // What an older agent left when it was stopped after config.json.
        model_dir(&snapshot);
        assert!(snapshot_problem(&snapshot).is_some_and(|p| p.contains("no .safetensors")));
        assert_eq!(find_local(&dirs, "org/big", "main"), None);

        // An index names two shards; one is there.
        std::fs::write(
            snapshot.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#,
        )
        .expect("index");
        std::fs::write(snapshot.join("model-1.safetensors"), b"1").expect("shard");
        let problem = snapshot_problem(&snapshot).expect("a shard is missing");
        assert!(problem.contains("model-2.safetensors"), "{problem}");
        assert_eq!(find_local(&dirs, "org/big", "main"), None);
        std::fs::write(snapshot.join("model-2.safetensors"), b"2").expect("shard");
        assert_eq!(find_local(&dirs, "org/big", "main"), Some(snapshot.clone()));

        // A marker binds the snapshot to the sizes it lists.
        std::fs::write(
            snapshot.join(COMPLETE_MARKER),
            r#"{"files": [{"name": "config.json", "size": 2}, {"name": "model-1.safetensors", "size": 5}]}"#,
        )
        .expect("marker");
        let problem = snapshot_problem(&snapshot).expect("a size differs");
        assert!(
            problem.contains("model-1.safetensors") && problem.contains("not 5"),
            "{problem}"
        );
        assert_eq!(find_local(&dirs, "org/big", "main"), None);
        std::fs::write(snapshot.join("model-1.safetensors"), b"11111").expect("shard");
        assert_eq!(find_local(&dirs, "org/big", "main"), Some(snapshot));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn sizes_read_for_people() {
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(3 << 20), "3.0 MiB (3145728 bytes)");
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
