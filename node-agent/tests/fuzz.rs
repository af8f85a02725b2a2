//! Fuzz targets for every parser of untrusted input, run by `cargo test`
//! for a bounded time (see `fuzz_support` and docs/engine.md#fuzzing):
//!
//! - a model's files, from any hub repository: the safetensors header and
//!   index, `config.json`, `tokenizer.json`, `tokenizer_config.json` and
//!   its chat template;
//! - what clients send rank 0: OpenAI request bodies;
//! - what ranks say to each other: the control protocol's messages, and
//!   the agent's launch line and a worker's event lines.
//!
//! Each target calls the real parsing function and asserts that it returns
//! (an error for garbage, never a panic or a hang) and, where there is one,
//! an invariant of what it accepts.

mod fuzz_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use fuzz_support::{Shape, Target, Verdict, run};
use prost::Message;
use serde_json::Value;
use tandem_agent::control::{GroupIdentity, pb, plan_from_proto, plan_to_proto};
use tandem_agent::engine::config::ModelConfig;
use tandem_agent::engine::safetensors::SafetensorsFile;
use tandem_agent::engine::tokenizer::{ChatMessage, ChatTemplate, TextTokenizer, template_fuel};
use tandem_agent::engine::weights::{Checkpoint, parse_index};
use tandem_agent::serve::api::{GenerationRequest, MAX_STOP_BYTES, PromptInput, parse_chat};
use tandem_agent::serve::api::{MAX_COMPLETION_LOGPROBS, parse_completion};
use tandem_agent::worker::protocol::{Event, Launch};

/// A scratch directory of this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-scratch")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A committed seed of another target.
fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = fuzz_support::corpus_root().join(target).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn fuzz_safetensors_header() {
    let dir = scratch("safetensors_header");
    let file = dir.join("model.safetensors");
    let calls = AtomicU64::new(0);
    run(
        Target {
            name: "safetensors_header",
            shape: Shape::Safetensors,
            max_len: 1 << 16,
        },
        move |input| {
            let parsed = SafetensorsFile::parse(&file, input);
            if let Ok(tensors) = &parsed {
                let header_len = u64::from_le_bytes(*input.first_chunk::<8>().expect("length"));
                for (name, info) in tensors {
                    let elements = info
                        .shape
                        .iter()
                        .try_fold(1u64, |a, d| a.checked_mul(*d))
                        .expect("accepted shapes do not overflow");
                    assert_eq!(info.len, elements * info.dtype.size(), "{name}");
                    assert!(info.start >= 8 + header_len, "{name} starts in the header");
                    assert!(info.start + info.len <= input.len() as u64, "{name}");
                    // What the loader computes from an accepted tensor.
                    let row = info.row_bytes();
                    if let Some(rows) = info.shape.first() {
                        assert!(rows * row <= info.len.max(row), "{name}");
                    }
                }
            }
            // Every 32nd input also goes through the file on disk: the
            // positioned reads must agree with the in-memory parse.
            if calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(32)
            {
                std::fs::write(&file, input).expect("write");
                let opened = SafetensorsFile::open(&file, Arc::new(AtomicU64::new(0)));
                match (&parsed, &opened) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b.tensors()),
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                    _ => panic!(
                        "memory and disk disagree: {:?} / {:?}",
                        parsed.as_ref().err(),
                        opened.as_ref().err()
                    ),
                }
            }
            Verdict::of(&parsed)
        },
    );
}

#[test]
fn fuzz_safetensors_index() {
    // A real two-file checkpoint whose index the fuzzer rewrites; every
    // 16th index is also opened as a whole checkpoint.
    let dir = scratch("safetensors_index");
    let header = seed("safetensors_header", "quantized-linear.safetensors");
    let dense = seed("safetensors_header", "dense-f32.safetensors");
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), &header).expect("write");
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), &dense).expect("write");
    let index = dir.join("model.safetensors.index.json");
    let calls = AtomicU64::new(0);
    run(
        Target {
            name: "safetensors_index",
            shape: Shape::Json,
            max_len: 1 << 16,
        },
        move |input| {
            let parsed = parse_index(&index, input);
            if let Ok(map) = &parsed {
                for (tensor, file) in map {
                    assert!(
                        !file.is_empty() && !file.contains('/') && file != "." && file != "..",
                        "{tensor} -> {file:?}"
                    );
                }
            }
            if calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(16)
            {
                std::fs::write(&index, input).expect("write");
                if let Ok(checkpoint) = Checkpoint::open(&dir) {
                    let map = parsed
                        .as_ref()
                        .expect("an opened checkpoint's index parses");
                    for tensor in map.keys() {
                        assert!(checkpoint.has(tensor), "{tensor}");
                    }
                }
            }
            Verdict::of(&parsed)
        },
    );
}

#[test]
fn fuzz_config_json() {
    let path = PathBuf::from("config.json");
    let generation = PathBuf::from("generation_config.json");
    run(
        Target {
            name: "config_json",
            shape: Shape::Json,
            max_len: 1 << 16,
        },
        move |input| {
            let parsed = ModelConfig::parse(&path, input);
            if let Ok(config) = &parsed {
                assert!(config.hidden_size > 0 && config.num_hidden_layers > 0);
                assert!(config.intermediate_size > 0 && config.vocab_size > 0);
                assert!(config.head_dim > 0 && config.head_dim.is_multiple_of(2));
                assert!(
                    config
                        .num_attention_heads
                        .is_multiple_of(config.num_key_value_heads)
                );
                // What the loader does next: the planner's sharding rules.
                let shape = config.shape();
                let valid = tandem_planner::valid_world_sizes(&shape, 16);
                for world in 1..=16u32 {
                    let ok = tandem_agent::engine::model::check_world_size(config, world as usize)
                        .is_ok();
                    assert_eq!(ok, valid.contains(&world), "world size {world}");
                }
                let _ = shape.total_weight_bytes();
                let _ = shape.kv_cache_bytes(1, 4096);
                // The same bytes as generation_config.json only add stop ids.
                let mut with = config.clone();
                if with.add_generation_config(&generation, input).is_ok() {
                    assert!(with.eos_token_ids.starts_with(&config.eos_token_ids));
                }
            }
            Verdict::of(&parsed)
        },
    );
}

/// A conversation every tokenizer and template target renders.
fn conversation() -> Vec<ChatMessage> {
    let m = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    vec![
        m("system", "  Be terse.  "),
        m("user", "héllo wörld → 🦙 <|eot_id|>"),
        m("assistant", "Hi!"),
        m("user", "What is the capital of France?"),
    ]
}

/// Uses a loaded tokenizer the way rank 0 does: encode, decode, chat.
fn exercise(tokenizer: &TextTokenizer) {
    for text in [
        "hello world",
        "",
        "héllo wörld → 🦙!",
        "<|begin_of_text|>hi",
        "  \n\t 123456",
    ] {
        if let Ok(ids) = tokenizer.encode_plain(text) {
            let _ = tokenizer.decode(&ids);
        }
    }
    let _ = tokenizer.decode(&[0, 1, 2, 3, u32::MAX]);
    let _ = tokenizer.eos_token_id();
    if let Ok(text) = tokenizer.render_chat(&conversation(), true, &serde_json::Map::new()) {
        let _ = tokenizer.encode(&text, false);
    }
}

#[test]
fn fuzz_tokenizer_json() {
    let config: Value = serde_json::from_slice(&seed("tokenizer_config", "smollm2-chatml.json"))
        .expect("a JSON seed");
    run(
        Target {
            name: "tokenizer_json",
            shape: Shape::Json,
            max_len: 1 << 16,
        },
        move |input| {
            let loaded = TextTokenizer::from_parts(input, &config, None);
            if let Ok(tokenizer) = &loaded {
                exercise(tokenizer);
            }
            Verdict::of(&loaded)
        },
    );
}

#[test]
fn fuzz_tokenizer_config() {
    // Parsed once, cloned per input: a word-level tokenizer, because a
    // clone of the byte-level one compiles its split regex again (slow).
    let inner = tokenizers::Tokenizer::from_bytes(seed("tokenizer_json", "word-level.json"))
        .expect("a seed tokenizer loads");
    run(
        Target {
            name: "tokenizer_config",
            shape: Shape::Json,
            max_len: 1 << 15,
        },
        move |input| {
            let Ok(config) = serde_json::from_slice::<Value>(input) else {
                return Verdict::Rejected;
            };
            let tokenizer = TextTokenizer::with_config(inner.clone(), &config, None);
            exercise(&tokenizer);
            match tokenizer.render_chat(&conversation(), true, &serde_json::Map::new()) {
                Ok(_) => Verdict::Accepted,
                Err(_) => Verdict::Rejected,
            }
        },
    );
}

/// Fuel for fuzzed templates: far less than a real render gets, so that
/// expensive templates cost the fuzzer little time.
const FUZZ_FUEL: u64 = 50_000;

#[test]
fn fuzz_chat_template() {
    let messages = conversation();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "tools".into(),
        serde_json::json!([{"name": "f", "parameters": {"x": [1, 2.5, null, true]}}]),
    );
    extra.insert("date_string".into(), "26 Jul 2024".into());
    run(
        Target {
            name: "chat_template",
            shape: Shape::Text,
            max_len: 1 << 13,
        },
        move |input| {
            let source = String::from_utf8_lossy(input).into_owned();
            let Ok(template) = ChatTemplate::compile(source) else {
                return Verdict::Rejected;
            };
            let rendered = template.render_with_fuel(
                FUZZ_FUEL,
                &messages,
                true,
                Some("<s>"),
                Some("</s>"),
                &extra,
            );
            Verdict::of(&rendered)
        },
    );
}

#[test]
fn the_chat_template_regressions_end_in_errors() {
    let text = |name: &str| String::from_utf8(seed("chat_template", name)).expect("UTF-8");
    // A namespace stored in itself: refused when the template loads.
    let err =
        ChatTemplate::compile(text("regression-namespace-in-itself.jinja")).expect_err("refused");
    assert!(
        err.to_string()
            .contains("other than through its attributes"),
        "{err}"
    );
    // A list nested as deep as the fuel goes, then printed; and output
    // that grows faster than the fuel counts.
    for name in [
        "regression-deep-list.jinja",
        "regression-output-bombs.jinja",
    ] {
        let template = ChatTemplate::compile(text(name)).expect("compiles");
        let err = template
            .render_with_fuel(
                FUZZ_FUEL,
                &conversation(),
                true,
                None,
                None,
                &Default::default(),
            )
            .expect_err("an error, not an abort");
        assert!(
            err.to_string().contains("fuel") || err.to_string().contains("tojson"),
            "{name}: {err}"
        );
    }
}

/// What the parser guarantees about an accepted request.
fn check_request(request: &GenerationRequest) {
    assert!((0.0..=2.0).contains(&request.temperature), "{request:?}");
    assert!(request.top_p > 0.0 && request.top_p <= 1.0, "{request:?}");
    assert!(request.stop.len() <= 4, "{request:?}");
    for s in &request.stop {
        assert!(!s.is_empty() && s.len() <= MAX_STOP_BYTES, "{s:?}");
    }
    assert!(request.max_tokens != Some(0), "{request:?}");
    assert!(!request.model.is_empty());
    assert!(!request.include_usage || request.stream);
    assert!(request.logprobs.unwrap_or(0) <= 20, "{request:?}");
    match &request.prompt {
        PromptInput::Chat(messages) => {
            assert!(!messages.is_empty());
            for m in messages {
                assert!(matches!(m.role.as_str(), "system" | "user" | "assistant"));
            }
        }
        PromptInput::Ids(ids) => assert!(!ids.is_empty()),
        PromptInput::Text(_) => {}
    }
}

#[test]
fn fuzz_openai_request() {
    // Accepted chats go on through the real templates, as rank 0 does.
    let templates: Vec<ChatTemplate> = ["smollm2-chatml.jinja", "llama3-style.jinja"]
        .iter()
        .map(|name| {
            let source = String::from_utf8(seed("chat_template", name)).expect("UTF-8");
            ChatTemplate::compile(source).expect("a seed template compiles")
        })
        .collect();
    run(
        Target {
            name: "openai_request",
            shape: Shape::Json,
            max_len: 1 << 16,
        },
        move |input| {
            let Ok(body) = serde_json::from_slice::<Value>(input) else {
                return Verdict::Rejected;
            };
            let mut verdict = Verdict::Rejected;
            for parsed in [parse_chat(&body), parse_completion(&body)] {
                match parsed {
                    Ok(request) => {
                        check_request(&request);
                        verdict = Verdict::Accepted;
                        if let PromptInput::Chat(messages) = &request.prompt {
                            let none = serde_json::Map::new();
                            for template in &templates {
                                let fuel = template_fuel(messages, &none);
                                if let Err(e) =
                                    template.render(messages, true, Some("<s>"), None, &none)
                                {
                                    let text = e.to_string();
                                    // The Llama 3 template refuses misplaced system turns.
                                    assert!(
                                        text.contains("Unsupported role"),
                                        "{text} (fuel {fuel})"
                                    );
                                }
                            }
                        }
                        if request.endpoint == tandem_agent::serve::api::Endpoint::Completions {
                            assert!(
                                request.logprobs.unwrap_or(0) as u64 <= MAX_COMPLETION_LOGPROBS
                            );
                        }
                    }
                    Err(e) => {
                        assert!(e.status.is_client_error(), "{e:?}");
                        assert!(e.body()["error"]["message"].is_string());
                    }
                }
            }
            verdict
        },
    );
}

#[test]
fn fuzz_control_messages() {
    let identity = GroupIdentity {
        deployment: "llama-70b".into(),
        epoch: 3,
        world_size: 4,
        model: "mlx-community/Llama-3.3-70B-Instruct-4bit".into(),
        revision: "main".into(),
    };
    run(
        Target {
            name: "control_messages",
            shape: Shape::Bytes,
            max_len: 1 << 14,
        },
        move |input| {
            let Some((kind, bytes)) = input.split_first() else {
                return Verdict::Rejected;
            };
            match kind % 4 {
                0 => {
                    let Ok(step) = pb::Step::decode(bytes) else {
                        return Verdict::Rejected;
                    };
                    // What a rank does with it: the plan, and back on the
                    // wire unchanged (a reuse of 0 tokens names no entry).
                    let plan = plan_from_proto(step.clone());
                    let mut expected = step;
                    for a in &mut expected.admit {
                        if a.reuse_tokens == 0 {
                            a.reuse_entry = 0;
                        }
                    }
                    // Compared as bytes: a NaN sampling parameter is not
                    // equal to itself, but must come back bit for bit.
                    let again = plan_to_proto(&plan).encode_to_vec();
                    assert_eq!(again, expected.encode_to_vec(), "{expected:?}");
                    let _ = plan.runs();
                    Verdict::Accepted
                }
                1 => {
                    let Ok(join) = pb::JoinRequest::decode(bytes) else {
                        return Verdict::Rejected;
                    };
                    let _ = pb::Stage::try_from(join.stage);
                    check_member(&identity, join.member.as_ref())
                }
                2 => {
                    let Ok(request) = pb::StepsRequest::decode(bytes) else {
                        return Verdict::Rejected;
                    };
                    check_member(&identity, request.member.as_ref())
                }
                _ => Verdict::of(&pb::JoinReply::decode(bytes)),
            }
        },
    );
}

fn check_member(identity: &GroupIdentity, member: Option<&pb::Member>) -> Verdict {
    let Some(member) = member else {
        return Verdict::Rejected;
    };
    match identity.mismatch(member) {
        None => {
            assert!(member.rank >= 1 && member.rank < identity.world_size);
            Verdict::Accepted
        }
        Some(why) => {
            assert!(!why.is_empty());
            Verdict::Rejected
        }
    }
}

/// Whether `value` holds a float anywhere (floats may move by an ulp on a
/// JSON round trip; everything else must come back the same).
fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

#[test]
fn fuzz_worker_protocol() {
    run(
        Target {
            name: "worker_protocol",
            shape: Shape::Json,
            max_len: 1 << 15,
        },
        move |input| {
            let mut verdict = Verdict::Rejected;
            let line = String::from_utf8_lossy(input);
            if let Some(event) = Event::parse(&line) {
                verdict = Verdict::Accepted;
                let again = event.to_line();
                assert!(!again.contains('\n'));
                let reparsed = Event::parse(&again).expect("an event's own line parses");
                let value: Value = serde_json::from_str(&again).expect("JSON");
                if !has_float(&value) {
                    assert_eq!(reparsed, event);
                }
            }
            if let Ok(launch) = serde_json::from_slice::<Launch>(input) {
                verdict = Verdict::Accepted;
                let line = serde_json::to_string(&launch).expect("a launch serializes");
                let again: Launch = serde_json::from_str(&line).expect("its own line parses");
                let value: Value = serde_json::from_str(&line).expect("JSON");
                if !has_float(&value) {
                    assert_eq!(again, launch);
                }
            }
            verdict
        },
    );
}

/// The harness itself: mutations are deterministic for a seed, and stay
/// within the length limit.
#[test]
fn mutations_repeat_for_a_seed() {
    let target = Target {
        name: "config_json",
        shape: Shape::Json,
        max_len: 4096,
    };
    let pool: Vec<Vec<u8>> = fuzz_support::load_corpus("config_json")
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let draw = |seed: u64| -> Vec<Vec<u8>> {
        let mut rng = fuzz_support::Rng::new(seed);
        (0..200)
            .map(|i| fuzz_support::mutate(&pool[i % pool.len()], &mut rng, &pool, &target))
            .collect()
    };
    let a = draw(7);
    assert_eq!(a, draw(7));
    assert_ne!(a, draw(8));
    assert!(a.iter().all(|m| m.len() <= 4096));
    let distinct: std::collections::BTreeSet<&Vec<u8>> = a.iter().collect();
    assert!(distinct.len() > 150, "{} distinct of 200", distinct.len());
}
