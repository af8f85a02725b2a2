//! A local stand-in for the Hugging Face hub, over real HTTP on 127.0.0.1,
//! serving model directories the way huggingface.co does:
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]`: the repo
//!   info, `{"sha", "siblings": [{"rfilename", "size", "lfs"?}]}`, where
//!   `.safetensors` files (LFS files on the real hub) carry
//!   `lfs: {"sha256", "size"}`;
//! - `GET /{org}/{name}/resolve/{rev}/{file}`, with or without a
//!   `Range: bytes=A-[B]` header: the bytes (206 with `Content-Range` for a
//!   range), with `ETag` and `X-Repo-Commit`.
//!
//! Anything else is 404. Every request is recorded with its range. Faults
//! can be injected per file: corrupted bytes of the right length, a
//! connection cut or stalled after some bytes, and a slow body.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request the hub saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request target (path and query).
    pub target: String,
    /// The first byte asked for by a `Range` header, if there was one.
    pub range_start: Option<usize>,
}

/// What goes wrong with a file's next responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// One byte in the middle is flipped; the length is right.
    Corrupt,
    /// The connection closes after this many body bytes.
    Cut(usize),
    /// The body stops after this many bytes and the connection stays open.
    Stall(usize),
}

#[derive(Debug, Default)]
struct Behaviour {
    /// Per file: the fault and how many more responses it applies to.
    faults: BTreeMap<String, (Fault, usize)>,
    /// Bytes per step and the pause between steps of every file body.
    throttle: Option<(usize, Duration)>,
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// Requests so far.
    pub requests: Arc<Mutex<Vec<Request>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The commit every served repo is at.
pub const COMMIT: &str = "1111111111111111111111111111111111111111";

struct Repo {
    files: BTreeMap<String, Vec<u8>>,
}

impl Hub {
    /// Serves each `(repo id, directory)`'s files at revision `main`,
    /// pausing `delay` before each file response.
    pub async fn start(repos: &[(&str, PathBuf)], delay: Duration) -> Hub {
        let mut served = BTreeMap::new();
        for (id, dir) in repos {
            let mut files = BTreeMap::new();
            for entry in std::fs::read_dir(dir).expect("model directory").flatten() {
                if entry.path().is_file() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    files.insert(name, std::fs::read(entry.path()).expect("model file"));
                }
            }
            served.insert((*id).to_owned(), Repo { files });
        }
        let served = Arc::new(served);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let log = requests.clone();
        let rules = behaviour.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let served = served.clone();
                let log = log.clone();
                let rules = rules.clone();
                tokio::spawn(async move {
                    let _ = answer(stream, &served, &log, &rules, delay).await;
                });
            }
        });
        Hub {
            endpoint,
            requests,
            behaviour,
            task,
        }
    }

    /// The paths requested so far.
    pub fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .map(|r| r.iter().map(|r| r.target.clone()).collect())
            .unwrap_or_default()
    }

    /// The `resolve` requests for `file` so far, each as its range start
    /// (`None`: the whole file).
    pub fn fetches(&self, file: &str) -> Vec<Option<usize>> {
        let suffix = format!("/{file}");
        self.requests
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|r| r.target.contains("/resolve/") && r.target.ends_with(&suffix))
                    .map(|r| r.range_start)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies `fault` to the next `times` responses for `file`.
    pub fn fault(&self, file: &str, fault: Fault, times: usize) {
        if let Ok(mut b) = self.behaviour.lock() {
            b.faults.insert(file.to_owned(), (fault, times));
        }
    }

    /// Sends every file body `bytes` at a time, pausing `pause` in between.
    pub fn throttle(&self, bytes: usize, pause: Duration) {
        if let Ok(mut b) = self.behaviour.lock() {
            b.throttle = Some((bytes.max(1), pause));
        }
    }
}

fn etag(bytes: &[u8]) -> String {
    // FNV-1a, printed as hex: a stable, path-safe blob name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

/// The sha256 of `bytes` as lowercase hex, via the system's `sha256sum`
/// (the test crate carries no hash crate).
fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feeding sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn answer(
    stream: tokio::net::TcpStream,
    served: &BTreeMap<String, Repo>,
    log: &Mutex<Vec<Request>>,
    rules: &Mutex<Behaviour>,
    delay: Duration,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let mut range: Option<(usize, Option<usize>)> = None;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => {
                    if let Some((a, b)) = v.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
                        range = a.parse().ok().map(|a| (a, b.parse().ok()));
                    }
                }
                "content-length" => content_length = v.parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).await?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/").to_owned();
    if let Ok(mut l) = log.lock() {
        l.push(Request {
            target: target.clone(),
            range_start: range.map(|(a, _)| a),
        });
    }
    let path = target.split('?').next().unwrap_or("/");
    let mut stream = reader.into_inner();

    let file = path
        .contains("/resolve/")
        .then(|| path.rsplit('/').next().unwrap_or_default().to_owned());
    if file.is_some() {
        tokio::time::sleep(delay).await;
    }
    // This response's fault, if any, and the body's pace.
    let (fault, throttle) = match rules.lock() {
        Ok(mut b) => {
            let fault = file.as_ref().and_then(|f| match b.faults.get_mut(f) {
                Some((fault, times)) if *times > 0 => {
                    *times -= 1;
                    Some(*fault)
                }
                _ => None,
            });
            (fault, b.throttle)
        }
        Err(_) => (None, None),
    };
    let response = route(method, path, range, served);
    let (status, reason, headers, mut content) = match response {
        Some(r) => r,
        None => (
            404,
            "Not Found",
            vec![("Content-Type".to_owned(), "application/json".to_owned())],
            br#"{"error":"Repository not found"}"#.to_vec(),
        ),
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Length: {}\r\n",
        content.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if method == "HEAD" {
        return stream.shutdown().await;
    }
    let mut limit = content.len();
    match fault {
        Some(Fault::Corrupt) if !content.is_empty() => {
            let middle = content.len() / 2;
            content[middle] ^= 0xff;
        }
        Some(Fault::Cut(after)) | Some(Fault::Stall(after)) => limit = after.min(content.len()),
        _ => {}
    }
    if file.is_none() || throttle.is_none() {
        stream.write_all(&content[..limit]).await?;
    } else if let Some((step, pause)) = throttle {
        for chunk in content[..limit].chunks(step) {
            stream.write_all(chunk).await?;
            stream.flush().await?;
            tokio::time::sleep(pause).await;
        }
    }
    if let Some(Fault::Stall(_)) = fault {
        // Hold the connection open, sending nothing, until the client leaves.
        let mut sink = [0u8; 64];
        let _ = stream.read(&mut sink).await;
        return Ok(());
    }
    stream.shutdown().await
}

type Answer = (u16, &'static str, Vec<(String, String)>, Vec<u8>);

fn route(
    method: &str,
    path: &str,
    range: Option<(usize, Option<usize>)>,
    served: &BTreeMap<String, Repo>,
) -> Option<Answer> {
    if method != "GET" && method != "HEAD" {
        return None;
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let (repo_id, revision) = rest.split_once("/revision/")?;
        if revision != "main" && revision != COMMIT {
            return None;
        }
        let repo = served.get(repo_id)?;
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|(name, bytes)| {
                if name.ends_with(".safetensors") {
                    serde_json::json!({
                        "rfilename": name,
                        "size": bytes.len(),
                        "lfs": {"sha256": sha256(bytes), "size": bytes.len(), "pointerSize": 134},
                    })
                } else {
                    serde_json::json!({"rfilename": name, "size": bytes.len()})
                }
            })
            .collect();
        let info = serde_json::json!({"id": repo_id, "sha": COMMIT, "siblings": siblings});
        return Some((
            200,
            "OK",
            vec![("Content-Type".into(), "application/json".into())],
            info.to_string().into_bytes(),
        ));
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let (repo_id, rest) = path.trim_start_matches('/').split_once("/resolve/")?;
    let (revision, file) = rest.split_once('/')?;
    if revision != "main" && revision != COMMIT {
        return None;
    }
    let bytes = served.get(repo_id)?.files.get(file)?;
    let mut headers = vec![
        ("ETag".to_owned(), format!("\"{}\"", etag(bytes))),
        ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
        ("Accept-Ranges".to_owned(), "bytes".to_owned()),
    ];
    match range {
        Some((start, end)) if start < bytes.len() => {
            // A range may reach past the end; clamp as servers do.
            let end = end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
            headers.push((
                "Content-Range".to_owned(),
                format!("bytes {start}-{end}/{}", bytes.len()),
            ));
            Some((206, "Partial Content", headers, bytes[start..=end].to_vec()))
        }
        Some(_) => Some((416, "Range Not Satisfiable", headers, Vec::new())),
        None => Some((200, "OK", headers, bytes.clone())),
    }
}
