//! `tandem-agent serve`: a real local group (rank worker processes, the ring
//! backend and rank 0's control service on loopback, rank 0's HTTP API),
//! checked through real HTTP requests.

mod engine_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use engine_support::{agent, model, scratch, tied_spec};
use serde_json::{Value, json};
use tandem_agent::engine::launch::free_ports;
use tandem_agent::engine::make_model::WeightFormat;

const READY_DEADLINE: Duration = Duration::from_secs(180);

struct Serve {
    child: Child,
    port: u16,
    stderr: mpsc::Receiver<String>,
}

impl Serve {
    fn start(name: &str, world: usize) -> Serve {
        let dir = model("serve-tied-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
        let state = scratch(name);
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
            .arg(&dir)
            .arg("--state-dir")
            .arg(&state)
            .args(["--name", "tiny"])
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
        let mut serve = Serve {
            child,
            port,
            stderr,
        };
        match ready.recv_timeout(READY_DEADLINE) {
            Ok(line) => assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}"),
            Err(_) => panic!("serve never became ready:\n{}", serve.logs()),
        }
        serve
    }

    fn logs(&mut self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let body = body.to_string();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        let json =
            serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        (status, json)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_local_group_of_two_answers_like_generate_alone() {
    let mut serve = Serve::start("serve-two", 2);
    let (status, answer) = serve.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{answer}\n{}", serve.logs());
    assert_eq!(answer["usage"]["completion_tokens"], 6, "{answer}");
    let served = answer["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();

    // The same greedy completion from `generate`, one rank, no server.
    let dir = model("serve-tied-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    let alone = engine_support::generate(
        &dir,
        &[
            "--prompt",
            "hello world",
            "--max-tokens",
            "6",
            "--ignore-eos",
        ],
    );
    assert_eq!(alone["text"].as_str(), Some(served.as_str()), "{alone}");

    // A bad request is an OpenAI-style error, and the group keeps serving.
    let (status, error) = serve.post("/v1/completions", &json!({"model": "tiny"}));
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"].is_string(), "{error}");
    let (status, _) = serve.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "again", "max_tokens": 2}),
    );
    assert_eq!(status, 200);
}

#[test]
fn a_dead_rank_takes_the_local_group_down_and_says_which() {
    let mut serve = Serve::start("serve-kill", 2);
    let pid = serve.child.id();
    let children = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("pgrep");
    let pids: Vec<String> = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), 2, "two rank workers: {pids:?}");
    // Workers start in rank order, so the higher pid is rank 1.
    let rank1 = pids
        .iter()
        .max_by_key(|p| p.parse::<u32>().unwrap_or(0))
        .expect("a pid");
    let killed = Command::new("kill")
        .args(["-9", rank1])
        .status()
        .expect("kill");
    assert!(killed.success());

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = serve.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve outlived its rank 1:\n{}",
            serve.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success(), "serve must fail when a rank dies");
    let logs = serve.logs();
    assert!(logs.contains("rank 1"), "the error names the rank:\n{logs}");
}
