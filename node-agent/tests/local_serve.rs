//! `tandem-agent serve`: a real local group (rank worker processes, the ring
//! backend and rank 0's control service on loopback, rank 0's HTTP API),
//! checked through real HTTP requests: answers equal to `generate` alone
//! and the same alone as in a batch at world size 2, and a dead rank taking
//! the group down; over TLS, the control stream and the API with the
//! certificate given on the command line.

mod engine_support;

use std::process::Command;
use std::time::{Duration, Instant};

use engine_support::serve::Serve;
use engine_support::{model, tied_spec};
use serde_json::json;
use tandem_agent::engine::make_model::WeightFormat;

fn tiny_group(name: &str, world: usize) -> Serve {
    let dir = model("serve-tied-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    Serve::start(name, &dir, "tiny", world, &[])
}

#[test]
fn a_local_group_of_two_answers_like_generate_alone() {
    let serve = tiny_group("serve-two", 2);
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
    let mut serve = tiny_group("serve-kill", 2);
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

#[test]
fn a_group_of_two_answers_the_same_alone_and_in_a_batch() {
    let serve = tiny_group("serve-batch-two", 2);
    let prompts = [
        "hello world",
        "a much longer prompt about rivers, stones and light in the garden",
        "x",
        "the quick brown fox jumps over the lazy dog again and again",
    ];
    let body = |p: &str| json!({"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let text =
        |answer: &serde_json::Value| answer["choices"][0]["text"].as_str().map(str::to_owned);
    let solo: Vec<Option<String>> = prompts
        .iter()
        .map(|p| {
            let (status, answer) = serve.post("/v1/completions", &body(p));
            assert_eq!(status, 200, "{answer}");
            text(&answer)
        })
        .collect();
    let steps = serve.metric("tandem_batch_steps_total");
    let tokens = serve.metric("tandem_generated_tokens_total");
    let batched: Vec<Option<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let serve = &serve;
                let body = body(p);
                scope.spawn(move || {
                    std::thread::sleep(Duration::from_millis(30 * i as u64));
                    let (status, answer) = serve.post("/v1/completions", &body);
                    assert_eq!(status, 200, "{answer}");
                    text(&answer)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    assert_eq!(batched, solo, "{}", serve.logs());
    let steps = serve.metric("tandem_batch_steps_total") - steps;
    let tokens = serve.metric("tandem_generated_tokens_total") - tokens;
    // Alone, each token takes a step of its own (and each prompt one more).
    assert!(
        steps < tokens,
        "{steps} steps for {tokens} tokens: not batched"
    );
}

#[test]
fn a_chat_template_that_never_ends_fails_its_request_and_the_group_serves_on() {
    // The tiny model, with a template of ten billion iterations: a model
    // repository's template is untrusted code.
    let base = model("serve-tied-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    let dir = engine_support::scratch("model-serve-template-bomb");
    for entry in std::fs::read_dir(&base).expect("the model directory") {
        let path = entry.expect("an entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().expect("a name"))).expect("copy");
        }
    }
    let config_path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("read")).expect("JSON");
    config["chat_template"] =
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into();
    std::fs::write(&config_path, config.to_string()).expect("write");

    let serve = Serve::start("serve-template-bomb", &dir, "tiny", 1, &[]);
    let started = Instant::now();
    let (status, error) = serve.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_prompt", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("fuel"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let (status, answer) = serve.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hello", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{answer}\n{}", serve.logs());
}

/// A CA and a certificate it issued for 127.0.0.1, as files in `dir`:
/// (`tls.crt`, `tls.key`, `ca.crt`).
fn certificate_files(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    std::fs::create_dir_all(dir).expect("dir");
    let files = [dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt")];
    for (path, pem) in files
        .iter()
        .zip([cert.pem(), key.serialize_pem(), ca.pem()])
    {
        std::fs::write(path, pem).expect("write");
    }
    files
}

/// One HTTP/1.1 exchange over TLS with 127.0.0.1:`port`, trusting only
/// `ca_pem`; the raw answer.
fn https_exchange(port: u16, ca_pem: &str, request: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    raw
}

#[test]
fn a_local_group_of_two_serves_https_and_meets_over_tls() {
    let dir = model("serve-tied-q4", &tied_spec(WeightFormat::Quantized(4)), 1);
    let tls_dir = engine_support::scratch("serve-tls-certs");
    let [cert, key, ca] = certificate_files(&tls_dir);
    let path = |p: &std::path::Path| p.to_str().expect("UTF-8 path").to_owned();
    let (cert, key, ca_file) = (path(&cert), path(&key), path(&ca));
    // Rank 1 reaches rank 0's control service over TLS, or the group never
    // serves.
    let serve = Serve::start(
        "serve-tls",
        &dir,
        "tiny",
        2,
        &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_file],
    );
    let ca_pem = std::fs::read_to_string(&ca).expect("ca");
    let body = json!({"model": "tiny", "prompt": "hello world", "max_tokens": 4}).to_string();
    let answer = https_exchange(
        serve.port,
        &ca_pem,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        serve.logs()
    );
    assert!(answer.contains("\"completion_tokens\":4"), "{answer}");

    // Plain HTTP to the same port is never answered.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", serve.port)).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw);
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}
