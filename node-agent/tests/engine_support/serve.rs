//! `tandem-agent serve` as a test harness: a real local group (rank worker
//! processes, the ring backend and rank 0's control service on loopback)
//! answering real HTTP requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;
use tandem_agent::engine::launch::free_ports;

use super::{agent, scratch};

const READY_DEADLINE: Duration = Duration::from_secs(180);

pub struct Serve {
    /// The `serve` process.
    pub child: Child,
    /// Rank 0's HTTP port.
    pub port: u16,
    stderr: Mutex<mpsc::Receiver<String>>,
}

impl Serve {
    /// Starts `tandem-agent serve` on `dir` as `model_name` with `world`
    /// ranks (and `extra` flags), and waits until it serves: plain HTTP
    /// unless `extra` holds `--tls-cert`.
    pub fn start(name: &str, dir: &Path, model_name: &str, world: usize, extra: &[&str]) -> Serve {
        let state = scratch(name);
        // `serve` refuses a state directory others may write.
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("a private state directory");
        let port = free_ports(1).expect("a free port")[0];
        let mut child = Command::new(agent())
            .args([
                "serve",
                "--world-size",
                &world.to_string(),
                "--port",
                &port.to_string(),
            ])
            .arg("--model")
            .arg(dir)
            .arg("--state-dir")
            .arg(&state)
            .args(["--name", model_name])
            .args(extra)
            // Plain HTTP unless the test gives a certificate.
            .args(
                ["--plain-http"]
                    .iter()
                    .filter(|_| !extra.contains(&"--tls-cert")),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tandem-agent serve");
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let out = child.stdout.take().expect("stdout");
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("serving ") {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let serve = Serve {
            child,
            port,
            stderr: Mutex::new(stderr),
        };
        match ready.recv_timeout(READY_DEADLINE) {
            Ok(line) => assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}"),
            Err(_) => panic!("serve never became ready:\n{}", serve.logs()),
        }
        serve
    }

    /// Everything it logged since the last call.
    pub fn logs(&self) -> String {
        let stderr = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    fn exchange(&self, request: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .expect("timeout");
        stream.write_all(request.as_bytes()).expect("send");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        (status, body.to_owned())
    }

    /// POSTs `body` as JSON; the status and the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let body = body.to_string();
        let (status, answer) = self.exchange(&format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let json = serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"));
        (status, json)
    }

    /// One sample of rank 0's `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) =
            self.exchange("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
