//! A local stand-in for the Hugging Face hub, over real HTTP on 127.0.0.1,
//! serving model directories the way huggingface.co does for the requests
//! hf-hub makes:
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]`: the repo
//!   info, `{"sha", "siblings": [{"rfilename", "size"}]}`;
//! - `GET /{org}/{name}/resolve/{rev}/{file}`, usually with a `Range`
//!   header: the bytes (206 with `Content-Range`), with `ETag` and
//!   `X-Repo-Commit`.
//!
//! Anything else is 404. Every request path is recorded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// Paths requested so far.
    pub requests: Arc<Mutex<Vec<String>>>,
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
    pub async fn start(repos: &[(&str, PathBuf)], delay: std::time::Duration) -> Hub {
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
        let log = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let served = served.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = answer(stream, &served, &log, delay).await;
                });
            }
        });
        Hub {
            endpoint,
            requests,
            task,
        }
    }

    /// The paths requested so far.
    pub fn paths(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
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

async fn answer(
    stream: tokio::net::TcpStream,
    served: &BTreeMap<String, Repo>,
    log: &Mutex<Vec<String>>,
    delay: std::time::Duration,
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
        l.push(target.clone());
    }
    let path = target.split('?').next().unwrap_or("/");
    let mut stream = reader.into_inner();

    if path.contains("/resolve/") {
        tokio::time::sleep(delay).await;
    }
    let response = route(method, path, range, served);
    let (status, reason, headers, content) = match response {
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
    if method != "HEAD" {
        stream.write_all(&content).await?;
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
            .map(|(name, bytes)| serde_json::json!({"rfilename": name, "size": bytes.len()}))
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
            // hf-hub may ask one byte past the end; clamp as servers do.
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
