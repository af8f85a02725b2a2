//! `tandem-agent serve`: a real local group (rank worker processes, the ring
//! backend and rank 0's control service on loopback, rank 0's HTTP API),
//! checked through real HTTP requests: answers equal to `generate` alone
//! and the same alone as in a batch at world size 2, and a dead rank taking
//! the group down.

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
