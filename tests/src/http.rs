//! The clients tests reach a server with: plain HTTP/1.0 over TCP (rank 0's
//! API, the agents' and the operator's health and metrics ports), TLS that
//! trusts only a deployment's CA, and the real `openai` Python client.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::scratch;
use crate::repo_root;

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

/// Sends one HTTP/1.0 request to 127.0.0.1:`port` (a JSON body when given)
/// and returns the connection to read the answer from; reads time out after
/// 60 s, so a hang fails the test instead of stalling it. The server closes
/// the connection after the response, so a streamed body ends at EOF.
pub fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes())?;
    }
    Ok(stream)
}

/// Reads a whole response from a connection [`send`] opened.
pub fn read_response(stream: TcpStream) -> anyhow::Result<Response> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context(format!("no status line: {status_line:?}"))?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One HTTP/1.0 request to 127.0.0.1:`port` and its whole response (see
/// [`send`]).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<Response> {
    read_response(send(port, method, path, headers, body)?)
}

/// POSTs JSON to rank 0's API.
pub fn post(port: u16, path: &str, body: &serde_json::Value) -> anyhow::Result<Response> {
    request(port, "POST", path, &[], Some(&body.to_string()))
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_owned())
        .collect()
}

/// The value of `series` (an unlabelled metric's name, or `name{labels}`)
/// in a Prometheus text exposition.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// The `host:port` of an endpoint URL, and its host alone.
pub fn endpoint_address(endpoint: &str) -> (String, String) {
    let address = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/')
        .to_owned();
    let host = address
        .rsplit_once(':')
        .map_or(address.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    (address, host)
}

/// A TLS connection to `endpoint` (`https://ip:port`) that trusts only
/// `ca_pem` and checks the certificate names the endpoint's address; reads
/// time out after `read_timeout`.
pub fn tls_connect(
    endpoint: &str,
    ca_pem: &str,
    read_timeout: Duration,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("the CA bundle")?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (address, host) = endpoint_address(endpoint);
    let name = rustls::pki_types::ServerName::try_from(host)?;
    let tcp = TcpStream::connect(&address).with_context(|| format!("connecting to {address}"))?;
    tcp.set_read_timeout(Some(read_timeout))?;
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    Ok(rustls::StreamOwned::new(connection, tcp))
}

/// `pem` in a file of the scratch directory, named by its content, for
/// clients that take a CA file.
pub fn ca_file(pem: &str) -> anyhow::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pem.hash(&mut h);
    let path = scratch("ca-bundles").join(format!("{:016x}.pem", h.finish()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The Python of the venv `dev/py-client.sh` keeps, with the `openai`
/// client installed.
pub fn openai_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(repo_root().join("dev/py-client.sh"))
                .arg("python")
                .output()
                .expect("running dev/py-client.sh");
            assert!(
                out.status.success(),
                "dev/py-client.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// A chat completion through the `openai` Python client against
/// `endpoint` (`https://host:port`, or `http://` with TLS off), trusting
/// only the CA `ca_pem` when given (as a user would with `status.caBundle`);
/// returns the model's reply and its completion token count.
pub fn openai_chat(
    endpoint: &str,
    ca_pem: Option<&str>,
    question: &str,
) -> anyhow::Result<(String, u64)> {
    const CHAT: &str = r#"
import json, ssl, sys, httpx, openai
options = {}
if len(sys.argv) > 3:
    trust = ssl.create_default_context(cafile=sys.argv[3])
    options["http_client"] = httpx.Client(verify=trust, timeout=60)
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=60,
                       **options)
model = client.models.list().data[0].id
reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": sys.argv[2]}],
    max_tokens=24, temperature=0,
)
print(json.dumps({"content": reply.choices[0].message.content,
                  "tokens": reply.usage.completion_tokens,
                  "finish": reply.choices[0].finish_reason}))
"#;
    let mut command = Command::new(openai_python());
    command.args(["-c", CHAT, endpoint, question]);
    if let Some(pem) = ca_pem {
        command.arg(ca_file(pem)?);
    }
    let out = command.output().context("running the openai client")?;
    if !out.status.success() {
        bail!(
            "the openai client failed against {endpoint}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("openai client output {:?}", out.stdout))?;
    let tokens = v["tokens"].as_u64().context("usage.completion_tokens")?;
    if tokens == 0 || !matches!(v["finish"].as_str(), Some("stop" | "length")) {
        bail!("an empty or unfinished reply from {endpoint}: {v}");
    }
    Ok((v["content"].as_str().unwrap_or_default().to_owned(), tokens))
}
