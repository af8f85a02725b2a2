//! Continuous batching on the real model (SmolLM2-135M-Instruct, 4-bit),
//! through `tandem-agent serve`: real rank processes, the ring backend and
//! rank 0's HTTP API.
//!
//! - A request's greedy answer is the same alone and in a batch of 4 or 8
//!   with different prompt lengths and arrival times, at world sizes 1 and 3
//!   (this model's 9 heads allow 1 and 3, not 2).
//! - A prefix-cache hit gives the same answer as the miss and reports
//!   `usage.prompt_tokens_details.cached_tokens`.
//! - Log-probabilities agree with the engine's own full logits.
//! - A long prompt prefilled in chunks leaves a running stream's tokens
//!   flowing: its largest inter-token gap during the prefill stays a
//!   fraction of the long prompt's time to first token.

mod engine_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use engine_support::serve::Serve;
use engine_support::{our_logits, real_model};
use serde_json::{Value, json};
use tandem_planner::catalog::SMOLLM2_135M_4BIT;

const NAME: &str = "smollm2";

fn model_dir() -> PathBuf {
    real_model(SMOLLM2_135M_4BIT)
}

/// Eight questions of different lengths.
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea, the wind and the old lighthouse keeper who lived by the shore for forty years.",
    "What is 2 + 2?",
    "Explain in a few words why the sky looks blue during the day and red or orange at sunset, as simply as you can.",
    "Say hello.",
    "List the days of the week.",
    "What do bees make?",
];

fn chat(question: &str, max_tokens: usize) -> Value {
    json!({
        "model": NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn answer_of(serve: &Serve, body: &Value) -> Value {
    let (status, answer) = serve.post("/v1/chat/completions", body);
    assert_eq!(status, 200, "{answer}");
    answer
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {answer}"))
        .to_owned()
}

/// Sends every body at once, the i-th after `i * stagger`, and returns the
/// answers in order.
fn concurrently(serve: &Serve, bodies: &[Value], stagger: Duration) -> Vec<Value> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                scope.spawn(move || {
                    std::thread::sleep(stagger * i as u32);
                    answer_of(serve, body)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread"))
            .collect()
    })
}

fn batched_equals_solo(world: usize) {
    let dir = model_dir();
    let serve = Serve::start(
        &format!("batching-ws{world}"),
        &dir,
        NAME,
        world,
        // Small chunks, so long prompts share steps with running ones.
        &["--prefill-chunk-tokens", "16"],
    );
    let bodies: Vec<Value> = QUESTIONS.iter().map(|q| chat(q, 12)).collect();
    let solo: Vec<String> = bodies.iter().map(|b| text(&answer_of(&serve, b))).collect();
    assert!(
        solo[0].contains("Paris"),
        "the capital question: {:?}",
        solo[0]
    );
    for (size, stagger) in [
        (4, Duration::from_millis(0)),
        (8, Duration::from_millis(40)),
    ] {
        let steps = serve.metric("tandem_batch_steps_total");
        let tokens = serve.metric("tandem_generated_tokens_total");
        let batched = concurrently(&serve, &bodies[..size], stagger);
        let steps = serve.metric("tandem_batch_steps_total") - steps;
        let tokens = serve.metric("tandem_generated_tokens_total") - tokens;
        // One at a time, every token would take a step of its own.
        assert!(
            steps < tokens * 0.75,
            "a batch of {size} ran {steps} steps for {tokens} tokens: not batched"
        );
        for (i, answer) in batched.iter().enumerate() {
            assert_eq!(
                text(answer),
                solo[i],
                "world size {world}, batch of {size}: request {i} ({:?}) differs from its solo answer\n{}",
                QUESTIONS[i],
                serve.logs()
            );
        }
    }
}

#[test]
fn batched_greedy_answers_equal_solo_ones_at_world_size_1() {
    batched_equals_solo(1);
}

#[test]
fn batched_greedy_answers_equal_solo_ones_at_world_size_3() {
    batched_equals_solo(3);
}

#[test]
fn a_prefix_cache_hit_gives_the_same_answer_and_reports_cached_tokens() {
    let dir = model_dir();
    let serve = Serve::start("prefix-cache", &dir, NAME, 1, &[]);
    let system = "You are a helpful assistant. Answer in one short sentence. \
                  Be exact about geography and never invent facts.";
    let turn = |messages: Value| json!({"model": NAME, "messages": messages, "max_tokens": 16, "temperature": 0});
    let first = turn(json!([
        {"role": "system", "content": system},
        {"role": "user", "content": "What is the capital of France?"}
    ]));
    let miss = answer_of(&serve, &first);
    let cached = |a: &Value| a["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached(&miss), Some(0), "{miss}");
    let hit = answer_of(&serve, &first);
    let prompt = hit["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    assert_eq!(
        cached(&hit),
        Some(prompt - 1),
        "all but the last prompt token come from the cache: {hit}"
    );
    assert_eq!(text(&hit), text(&miss), "a hit answers like the miss");

    // The next turn of the chat reuses the first turn and its answer.
    let second = turn(json!([
        {"role": "system", "content": system},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": text(&miss)},
        {"role": "user", "content": "And of Italy?"}
    ]));
    let next = answer_of(&serve, &second);
    assert!(
        cached(&next).is_some_and(|n| n >= prompt - 1),
        "the second turn reuses at least the first turn's prompt: {next}"
    );
    // The same turn on a server without the cache answers the same.
    let cold = Serve::start(
        "prefix-cache-off",
        &dir,
        NAME,
        1,
        &["--prefix-cache-bytes", "0"],
    );
    let reference = answer_of(&cold, &second);
    assert_eq!(cached(&reference), Some(0));
    assert_eq!(text(&next), text(&reference));
}

#[test]
fn logprobs_agree_with_the_engines_logits() {
    let dir = model_dir();
    let serve = Serve::start("logprobs", &dir, NAME, 1, &[]);
    let prompt: Vec<u32> = vec![504, 3575, 282, 4649, 314];
    let (status, answer) = serve.post(
        "/v1/completions",
        &json!({"model": NAME, "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 5}),
    );
    assert_eq!(status, 200, "{answer}");
    let lp = &answer["choices"][0]["logprobs"];
    let chosen: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(chosen.len(), 3, "{lp}");
    let tops = lp["top_logprobs"].as_array().expect("top_logprobs");
    for (i, top) in tops.iter().enumerate() {
        let top = top.as_object().expect("a map");
        assert!(!top.is_empty() && top.len() <= 5, "{top:?}");
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::NEG_INFINITY, f64::max);
        // Greedy: the chosen token is the most likely one.
        assert!((best - chosen[i]).abs() < 1e-6, "{best} vs {}", chosen[i]);
        assert!(chosen[i] <= 0.0);
    }
    // The first token's log-probability, from the engine's own logits of
    // the prompt (which the reference tests hold equal to mlx-lm's).
    let logits = our_logits(&dir, &prompt, &[]);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let expected = best - max as f64 - sum.ln();
    assert!(
        (chosen[0] - expected).abs() < 1e-3,
        "first token: served {} vs {expected} from the logits",
        chosen[0]
    );

    // Chat: `logprobs` with `top_logprobs`, streamed.
    let events = stream(
        serve.port,
        &json!({"model": NAME, "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 4, "temperature": 0, "stream": true,
                "logprobs": true, "top_logprobs": 3}),
    );
    let entries: Vec<&Value> = events
        .iter()
        .filter_map(|(_, e)| e["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .collect();
    assert_eq!(entries.len(), 4, "{events:?}");
    for e in entries {
        assert!(e["token"].is_string() && e["logprob"].is_number(), "{e}");
        assert_eq!(e["top_logprobs"].as_array().map(Vec::len), Some(3), "{e}");
    }
}

/// Streams `body` to `/v1/chat/completions`; every event with the time it
/// arrived, until `[DONE]`.
fn stream(port: u16, body: &Value) -> Vec<(Instant, Value)> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    let body = body.to_string();
    write!(
        tcp,
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut events = Vec::new();
    for line in BufReader::new(tcp).lines().map_while(Result::ok) {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data).expect("a JSON event");
        events.push((Instant::now(), event));
    }
    events
}

/// Whether a chat chunk carries generated text (the first one carries only
/// the role).
fn has_text(event: &Value) -> bool {
    event["choices"][0]["delta"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty())
}

#[test]
fn a_long_prompt_in_chunks_leaves_other_streams_flowing() {
    let dir = model_dir();
    let serve = Serve::start(
        "chunked-prefill",
        &dir,
        NAME,
        1,
        &["--prefill-chunk-tokens", "16"],
    );
    let port = serve.port;
    let long_question = format!(
        "Summarize this: {}",
        "the river runs past the old mill and the stone bridge. ".repeat(25)
    );
    let (running, long) = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            stream(
                port,
                &json!({"model": NAME, "messages": [{"role": "user", "content": "Tell me a long story."}],
                        "max_tokens": 100, "temperature": 0, "stream": true, "ignore_eos": true}),
            )
        });
        // Let the running stream get going before the long prompt arrives.
        std::thread::sleep(Duration::from_secs(3));
        let long = scope.spawn(|| {
            let sent = Instant::now();
            let events = stream(
                port,
                &json!({"model": NAME, "messages": [{"role": "user", "content": long_question}],
                        "max_tokens": 2, "temperature": 0, "stream": true}),
            );
            (sent, events)
        });
        (
            running.join().expect("the running stream"),
            long.join().expect("the long prompt"),
        )
    });
    let (sent, long_events) = long;
    let first_token = long_events
        .iter()
        .find(|(_, e)| has_text(e))
        .map(|(t, _)| *t)
        .expect("the long prompt's first token");
    let ttft = first_token.duration_since(sent);
    // The running stream's gaps while the long prompt was being prefilled.
    let times: Vec<Instant> = running
        .iter()
        .filter(|(_, e)| has_text(e))
        .map(|(t, _)| *t)
        .collect();
    let during: Vec<Duration> = times
        .windows(2)
        .filter(|w| w[1] > sent && w[0] < first_token)
        .map(|w| w[1].duration_since(w[0]))
        .collect();
    assert!(
        during.len() >= 3,
        "the running stream kept producing tokens during the {ttft:?} prefill ({} gaps)",
        during.len()
    );
    let worst = during.iter().max().copied().unwrap_or_default();
    assert!(
        worst * 3 < ttft,
        "the largest gap ({worst:?}) stays well under the long prompt's prefill ({ttft:?})"
    );
}
