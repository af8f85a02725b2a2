//! Rank 0's API under clients that misbehave, and a group whose rank stops
//! answering: real `tandem-agent serve` processes, raw TCP clients.
//!
//! - Idle, slow-header and slow-body clients are cut off at the read
//!   timeout (408 for a body), an oversized body gets 413, connections past
//!   the cap get 503 at once, a request without `max_tokens` stops at the
//!   deployment's cap and one asking for more gets 400; a well-behaved
//!   client is answered throughout.
//! - A rank stopped with SIGSTOP mid-generation: the streaming client gets
//!   an error naming the stall within the watchdog's bound, and the group
//!   goes down saying why, instead of hanging.
//! - Limits whose KV cache the memory cannot hold: the group fails at load
//!   with `OutOfMemory` and what would fit, instead of the request that
//!   fills the cache failing mid-step.

mod engine_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use engine_support::serve::Serve;
use engine_support::{agent, model, scratch, tied_spec};
use serde_json::{Value, json};
use tandem_agent::engine::make_model::WeightFormat;

const READ_TIMEOUT_SECONDS: u64 = 2;

fn connect(serve: &Serve) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", serve.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
}

/// Reads until the server closes; the status line's code and the body, or
/// `None` when it closed without answering.
fn answer(mut stream: TcpStream) -> (Option<u16>, String) {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        return (None, raw);
    };
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    (status, body.to_owned())
}

fn error_code(body: &str) -> Value {
    let value: Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    value["error"]["code"].clone()
}

/// A well-behaved client's request, answered whole.
fn well_behaved(serve: &Serve) {
    let (status, answer) = serve.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hello", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{answer}\n{}", serve.logs());
}

#[test]
fn slow_idle_flooding_and_greedy_clients_leave_the_api_answering() {
    let dir = model("guards-tied-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    let serve = Serve::start(
        "guards",
        &dir,
        "tiny",
        1,
        &[
            "--read-timeout-seconds",
            &READ_TIMEOUT_SECONDS.to_string(),
            "--max-connections",
            "8",
            "--max-completion-tokens",
            "8",
        ],
    );
    well_behaved(&serve);

    // An idle connection and one that stops mid-headers are closed at the
    // read timeout without an answer; a body that stops mid-way gets 408.
    let started = Instant::now();
    let idle = connect(&serve);
    let mut half_headers = connect(&serve);
    half_headers
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    let mut half_body = connect(&serve);
    half_body
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"model\":",
        )
        .expect("send");
    // Meanwhile, others are answered.
    well_behaved(&serve);
    let (status, body) = answer(half_body);
    assert_eq!(status, Some(408), "{body}");
    assert_eq!(error_code(&body), "request_timeout", "{body}");
    for (what, stream) in [("idle", idle), ("half headers", half_headers)] {
        let (status, body) = answer(stream);
        assert!(
            status.is_none() || status == Some(408),
            "{what}: the server closes the connection: {status:?} {body}"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(READ_TIMEOUT_SECONDS) && waited < Duration::from_secs(20),
        "slow clients are cut off at the read timeout, not before or much after: {waited:?}"
    );

    // A body over the limit is refused from its Content-Length.
    let mut big = connect(&serve);
    big.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000000000\r\n\r\n",
    )
    .expect("send");
    let (status, body) = answer(big);
    assert_eq!(status, Some(413), "{body}");

    // A flood of idle connections past the cap: those beyond it get a 503
    // at once (a slot still held by a connection just closed may make it a
    // few more); once the read timeout has closed the rest, a well-behaved
    // client is answered again.
    let flood: Vec<TcpStream> = (0..12).map(|_| connect(&serve)).collect();
    let flooded = Instant::now();
    let mut refused = 0;
    let mut idle = Vec::new();
    for stream in flood {
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let mut first = [0u8; 1];
        match stream.peek(&mut first) {
            Ok(n) if n > 0 => {
                let (status, body) = answer(stream);
                assert_eq!(status, Some(503), "{body}");
                assert_eq!(error_code(&body), "too_many_connections", "{body}");
                refused += 1;
            }
            _ => idle.push(stream),
        }
    }
    assert!(
        (4..=12).contains(&refused),
        "12 connections against a cap of 8: {refused} refused\n{}",
        serve.logs()
    );
    assert!(flooded.elapsed() < Duration::from_secs(READ_TIMEOUT_SECONDS + 5));
    for stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let (status, _) = answer(stream);
        assert_eq!(status, None, "an idle connection gets no answer");
    }
    well_behaved(&serve);

    // No max_tokens: the deployment's cap; more than the cap: 400.
    let (status, answer) = serve.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    let (status, answer) = serve.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hello", "max_tokens": 9}),
    );
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "max_tokens", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 8")),
        "{answer}"
    );
    well_behaved(&serve);
}

/// The pids of `parent`'s children, oldest first.
fn children(parent: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &parent.to_string()])
        .output()
        .expect("pgrep");
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[test]
fn a_stopped_rank_fails_the_stream_within_the_watchdog_bound() {
    let stall_seconds = 2;
    let dir = model("guards-stall-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    let mut serve = Serve::start(
        "guards-stall",
        &dir,
        "tiny",
        2,
        &["--stall-timeout-seconds", &stall_seconds.to_string()],
    );
    let workers = children(serve.child.id());
    assert_eq!(workers.len(), 2, "two rank workers: {workers:?}");
    let rank1 = workers[1];

    // A long streamed generation; stop rank 1 once tokens flow.
    let mut stream = connect(&serve);
    let body = json!({"model": "tiny", "prompt": "hello", "max_tokens": 4000,
        "ignore_eos": true, "stream": true})
    .to_string();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut lines = BufReader::new(stream);
    let mut tokens = 0;
    let mut line = String::new();
    while tokens < 5 {
        line.clear();
        assert!(
            lines.read_line(&mut line).expect("read") > 0,
            "stream ended"
        );
        if line.starts_with("data: {") {
            tokens += 1;
        }
    }
    signal(rank1, "STOP");
    let stopped = Instant::now();

    // The stream ends with an error naming the stall, within the bound.
    let mut error = None;
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(data) = line.trim().strip_prefix("data: ")
                    && let Ok(value) = serde_json::from_str::<Value>(data)
                    && value.get("error").is_some()
                {
                    error = Some(value);
                    break;
                }
            }
        }
    }
    let waited = stopped.elapsed();
    let error = error.unwrap_or_else(|| panic!("no error event:\n{}", serve.logs()));
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stalled"), "{error}");
    assert!(
        waited < Duration::from_secs(stall_seconds + 10),
        "the error came {waited:?} after the stop"
    );

    // The group goes down saying why, rather than hanging.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = serve.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve hung with a stopped rank:\n{}",
            serve.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Serve ends its workers; make sure of it even so.
    let _ = Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status();
    assert!(!exited.success());
    let logs = serve.logs();
    assert!(logs.contains("GroupStalled"), "{logs}");
}

#[test]
fn limits_the_memory_cannot_hold_fail_at_load_saying_what_fits() {
    let dir = model("guards-oom-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    let state = scratch("guards-oom-state");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("a private state directory");
    let port = tandem_agent::engine::launch::free_ports(1).expect("a port")[0];
    // Four billion positions of KV: no machine holds that.
    let out = Command::new(agent())
        .args(["serve", "--world-size", "1", "--port", &port.to_string()])
        .arg("--model")
        .arg(&dir)
        .arg("--state-dir")
        .arg(&state)
        .args(["--max-batch-tokens", "4000000000", "--plain-http"])
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 0 failed (OutOfMemory): serving within the deployment's limits")
            && stderr.contains("the KV cache for 4000000000 positions")
            && stderr.contains("positions fit beside the prefix cache"),
        "{stderr}"
    );
}
