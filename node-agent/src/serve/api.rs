//! The OpenAI request bodies this server accepts, checked field by field so
//! every mistake is answered with the parameter it concerns, and the
//! response bodies it writes.

use serde_json::{Map, Value, json};

use super::error::ApiError;
use crate::engine::batch::MAX_TOP_LOGPROBS;
use crate::engine::tokenizer::ChatMessage;

/// Most alternatives the completions endpoint's `logprobs` may ask for
/// (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Messages through the chat template.
    Chat(Vec<ChatMessage>),
    /// Plain text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// A request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The model asked for.
    pub model: String,
    /// The prompt.
    pub prompt: PromptInput,
    /// Token budget, if given.
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 to 2).
    pub temperature: f32,
    /// Nucleus mass (0 exclusive to 1).
    pub top_p: f32,
    /// Seed, if given.
    pub seed: Option<u64>,
    /// Stream server-sent events.
    pub stream: bool,
    /// Add a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Generate through end-of-sequence tokens (vLLM's `ignore_eos`
    /// extension; benchmarks use it for fixed lengths).
    pub ignore_eos: bool,
    /// Report each token's log-probability with this many alternatives
    /// (chat: `logprobs` + `top_logprobs`; completions: `logprobs`).
    pub logprobs: Option<usize>,
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))
}

fn number(
    map: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
    default: f64,
) -> Result<f64, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            let n = v.as_f64().ok_or_else(|| {
                ApiError::invalid_param(
                    key,
                    "invalid_type",
                    format!("`{key}` must be a number, not {v}."),
                )
            })?;
            if n < min || n > max {
                return Err(ApiError::invalid_param(
                    key,
                    "invalid_value",
                    format!("`{key}` must be between {min} and {max}, not {n}."),
                ));
            }
            Ok(n)
        }
    }
}

fn integer(map: &Map<String, Value>, key: &str, min: u64) -> Result<Option<u64>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = v.as_u64().or_else(|| {
                // 16.0 is an integer too.
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                    .map(|f| f as u64)
            });
            match n {
                Some(n) if n >= min => Ok(Some(n)),
                _ => Err(ApiError::invalid_param(
                    key,
                    "invalid_value",
                    format!("`{key}` must be an integer of at least {min}, not {v}."),
                )),
            }
        }
    }
}

fn boolean(map: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid_param(
            key,
            "invalid_type",
            format!("`{key}` must be a boolean, not {v}."),
        )),
    }
}

fn model(map: &Map<String, Value>) -> Result<String, ApiError> {
    match map.get("model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            "model",
            "missing_required_parameter",
            "You must provide a model parameter.",
        )),
        Some(v) => Err(ApiError::invalid_param(
            "model",
            "invalid_type",
            format!("`model` must be a non-empty string, not {v}."),
        )),
    }
}

/// Longest stop sequence, in bytes: every streamed piece is checked
/// against every stop sequence, and text that may start one is held back.
pub const MAX_STOP_BYTES: usize = 256;

fn stop(map: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "stop",
            "invalid_value",
            format!(
                "`stop` must be a string or a list of at most 4 non-empty strings of at most \
                 {MAX_STOP_BYTES} bytes each."
            ),
        )
    };
    let one = |s: &str| (!s.is_empty() && s.len() <= MAX_STOP_BYTES).then(|| s.to_owned());
    match map.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => one(s).map(|s| vec![s]).ok_or_else(bad),
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|i| i.as_str().and_then(one).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Options both endpoints share.
fn common(
    map: &Map<String, Value>,
    endpoint: Endpoint,
    prompt: PromptInput,
) -> Result<GenerationRequest, ApiError> {
    if let Some(n) = integer(map, "n", 1)?
        && n != 1
    {
        return Err(ApiError::invalid_param(
            "n",
            "unsupported_value",
            "Only `n` = 1 is supported.",
        ));
    }
    for unsupported in ["tools", "functions", "best_of", "suffix"] {
        match map.get(unsupported) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Number(n)) if unsupported == "best_of" && n.as_u64() == Some(1) => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    unsupported,
                    "unsupported_parameter",
                    format!("`{unsupported}` is not supported by this server."),
                ));
            }
        }
    }
    let max_tokens = match endpoint {
        Endpoint::Chat => match integer(map, "max_completion_tokens", 1)? {
            Some(n) => Some(n),
            None => integer(map, "max_tokens", 1)?,
        },
        // Absent: the legacy endpoint's documented default of 16 applies
        // (`start`, within the deployment's cap).
        Endpoint::Completions => integer(map, "max_tokens", 1)?,
    };
    let include_usage = match map.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            boolean(o, "include_usage").map_err(|e| e.param("stream_options"))?
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "invalid_type",
                "`stream_options` must be an object.",
            ));
        }
    };
    let logprobs = match endpoint {
        Endpoint::Chat => {
            let wanted = boolean(map, "logprobs")?;
            let top = integer(map, "top_logprobs", 0)?;
            match (wanted, top) {
                (_, Some(n)) if n > MAX_TOP_LOGPROBS as u64 => {
                    return Err(ApiError::invalid_param(
                        "top_logprobs",
                        "invalid_value",
                        format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}."),
                    ));
                }
                (false, Some(_)) => {
                    return Err(ApiError::invalid_param(
                        "top_logprobs",
                        "invalid_value",
                        "`top_logprobs` needs `logprobs` set to true.",
                    ));
                }
                (true, top) => Some(top.unwrap_or(0) as usize),
                (false, None) => None,
            }
        }
        Endpoint::Completions => match integer(map, "logprobs", 0)? {
            Some(n) if n > MAX_COMPLETION_LOGPROBS => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    "invalid_value",
                    format!("`logprobs` must be at most {MAX_COMPLETION_LOGPROBS}."),
                ));
            }
            other => other.map(|n| n as usize),
        },
    };
    let stream = boolean(map, "stream")?;
    if include_usage && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "invalid_value",
            "`stream_options` is only allowed when `stream` is true.",
        ));
    }
    Ok(GenerationRequest {
        endpoint,
        model: model(map)?,
        prompt,
        max_tokens: max_tokens.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        temperature: number(map, "temperature", 0.0, 2.0, 1.0)? as f32,
        top_p: {
            let p = number(map, "top_p", 0.0, 1.0, 1.0)?;
            if p == 0.0 {
                return Err(ApiError::invalid_param(
                    "top_p",
                    "invalid_value",
                    "`top_p` must be greater than 0.",
                ));
            }
            p as f32
        },
        seed: integer(map, "seed", 0)?,
        stream,
        include_usage,
        stop: stop(map)?,
        ignore_eos: boolean(map, "ignore_eos")?,
        logprobs,
    })
}

/// The text of a message's `content`: a string, or a list of text parts.
fn content(value: Option<&Value>, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid_param(
                            &param,
                            "unsupported_content",
                            "Only text content parts are supported.",
                        ));
                    }
                }
            }
            Ok(text)
        }
        Some(v) => Err(ApiError::invalid_param(
            &param,
            "invalid_type",
            format!("`{param}` must be a string or a list of text parts, not {v}."),
        )),
    }
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &Value) -> Result<GenerationRequest, ApiError> {
    let map = object(body)?;
    let messages = match map.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_param(
                "messages",
                "empty_array",
                "`messages` must hold at least one message.",
            ));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "messages",
                "missing_required_parameter",
                "You must provide a `messages` parameter.",
            ));
        }
        Some(v) => {
            return Err(ApiError::invalid_param(
                "messages",
                "invalid_type",
                format!("`messages` must be a list, not {v}."),
            ));
        }
    };
    let mut parsed = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(other) => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    "invalid_value",
                    format!("Role `{other}` is not supported; use system, user or assistant."),
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    "missing_required_parameter",
                    format!("`messages[{i}]` has no `role`."),
                ));
            }
        };
        parsed.push(ChatMessage {
            role: role.to_owned(),
            content: content(m.get("content"), i)?,
        });
    }
    common(map, Endpoint::Chat, PromptInput::Chat(parsed))
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &Value) -> Result<GenerationRequest, ApiError> {
    let map = object(body)?;
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "invalid_value",
            "`prompt` must be a string, a list of one string, or a list of token ids.",
        )
    };
    let ids = |items: &Vec<Value>| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let prompt = match map.get("prompt") {
        Some(Value::String(s)) => PromptInput::Text(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            PromptInput::Text(items[0].as_str().unwrap_or_default().to_owned())
        }
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_array() => {
            let inner = items[0].as_array().ok_or_else(bad)?;
            PromptInput::Ids(ids(inner).filter(|v| !v.is_empty()).ok_or_else(bad)?)
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            PromptInput::Ids(ids(items).ok_or_else(bad)?)
        }
        Some(Value::Array(items)) if items.len() > 1 => {
            return Err(ApiError::invalid_param(
                "prompt",
                "unsupported_value",
                "Only one prompt per request is supported.",
            ));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "missing_required_parameter",
                "You must provide a `prompt` parameter.",
            ));
        }
        Some(_) => return Err(bad()),
    };
    if boolean(map, "echo")? {
        return Err(ApiError::invalid_param(
            "echo",
            "unsupported_parameter",
            "`echo` is not supported by this server.",
        ));
    }
    common(map, Endpoint::Completions, prompt)
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    /// The `usage` object.
    pub fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// One generated token as `logprobs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    /// The token's text.
    pub text: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely alternatives, most likely first.
    pub top: Vec<(String, f32)>,
}

/// The `logprobs` object of a choice (or of one chunk) for `tokens`;
/// `offset` is where the first token's text starts in the completion
/// (completions' `text_offset`).
pub fn logprobs_json(endpoint: Endpoint, tokens: &[TokenInfo], offset: usize) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let entry = |text: &str, logprob: f32| json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()});
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(&t.text, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|(s, l)| entry(s, *l)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Endpoint::Completions => {
            let mut offsets = Vec::with_capacity(tokens.len());
            let mut at = offset;
            for t in tokens {
                offsets.push(at);
                at += t.text.len();
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut m = Map::new();
                    for (s, l) in &t.top {
                        m.entry(s.clone()).or_insert(json!(l));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// Identity of one response: id, creation time and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// `chatcmpl-...` or `cmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model, as asked for.
    pub model: String,
}

/// A whole (non-streamed) response body.
pub fn full_response(
    endpoint: Endpoint,
    meta: &ResponseMeta,
    text: &str,
    finish: &str,
    usage: Usage,
    logprobs: Option<Value>,
) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
            "usage": usage.json(),
        }),
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
            "usage": usage.json(),
        }),
    }
}

/// One streamed chunk: `text` (with the assistant role on the first chat
/// chunk), or the end with a finish reason.
pub fn chunk(
    endpoint: Endpoint,
    meta: &ResponseMeta,
    text: Option<&str>,
    first: bool,
    finish: Option<&str>,
    logprobs: Option<Value>,
) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let delta = match (text, first) {
                (Some(t), true) => json!({"role": "assistant", "content": t}),
                (Some(t), false) => json!({"content": t}),
                (None, _) => json!({}),
            };
            json!({
                "id": meta.id,
                "object": "chat.completion.chunk",
                "created": meta.created,
                "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            })
        }
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}],
        }),
    }
}

/// The final usage chunk of a stream (`stream_options.include_usage`).
pub fn usage_chunk(endpoint: Endpoint, meta: &ResponseMeta, usage: Usage) -> Value {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage.json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_parses_with_defaults() {
        let r = parse_chat(&json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}
            ]
        }))
        .expect("valid");
        assert_eq!(r.model, "m");
        assert_eq!(r.max_tokens, None);
        assert_eq!(r.temperature, 1.0);
        assert!(!r.stream);
        match r.prompt {
            PromptInput::Chat(m) => {
                assert_eq!(m.len(), 2);
                assert_eq!(m[1].content, "hi");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_bad_parameter_is_named() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}),
                "top_p",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "x".repeat(MAX_STOP_BYTES + 1)}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["ok", ""]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}),
                "logprobs",
            ),
        ];
        for (body, param) in cases {
            let e = parse_chat(&body).expect_err(param);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{param}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        assert!(parse_chat(&json!([1, 2])).is_err());
    }

    #[test]
    fn completion_prompts_take_every_openai_shape() {
        let text = parse_completion(&json!({"model": "m", "prompt": "hello"})).expect("text");
        assert_eq!(text.prompt, PromptInput::Text("hello".into()));
        assert_eq!(text.max_tokens, None, "the default is applied when queued");
        let ids = parse_completion(&json!({"model": "m", "prompt": [1, 2, 3]})).expect("ids");
        assert_eq!(ids.prompt, PromptInput::Ids(vec![1, 2, 3]));
        let nested = parse_completion(&json!({"model": "m", "prompt": [[4, 5]]})).expect("nested");
        assert_eq!(nested.prompt, PromptInput::Ids(vec![4, 5]));
        let e = parse_completion(&json!({"model": "m", "prompt": ["a", "b"]})).expect_err("two");
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = parse_completion(&json!({"model": "m", "prompt": {"x": 1}})).expect_err("object");
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn chunks_have_the_openai_shape() {
        let meta = ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 5,
            model: "m".into(),
        };
        let first = chunk(Endpoint::Chat, &meta, Some("He"), true, None, None);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first["choices"][0]["finish_reason"].is_null());
        let last = chunk(Endpoint::Chat, &meta, None, false, Some("stop"), None);
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        let usage = usage_chunk(
            Endpoint::Chat,
            &meta,
            Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 2,
            },
        );
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    }

    #[test]
    fn logprobs_parse_and_take_the_openai_shapes() {
        let chat = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            parse_chat(&body)
        };
        assert_eq!(chat(json!({})).expect("none").logprobs, None);
        assert_eq!(
            chat(json!({"logprobs": true})).expect("on").logprobs,
            Some(0)
        );
        assert_eq!(
            chat(json!({"logprobs": true, "top_logprobs": 20}))
                .expect("top")
                .logprobs,
            Some(20)
        );
        let completion =
            parse_completion(&json!({"model": "m", "prompt": "x", "logprobs": 2})).expect("c");
        assert_eq!(completion.logprobs, Some(2));
        let e = parse_completion(&json!({"model": "m", "prompt": "x", "logprobs": 6}))
            .expect_err("too many");
        assert_eq!(e.param.as_deref(), Some("logprobs"));

        let tokens = [
            TokenInfo {
                text: "Par".into(),
                logprob: -0.5,
                top: vec![("Par".into(), -0.5), ("Lon".into(), -1.5)],
            },
            TokenInfo {
                text: "is".into(),
                logprob: -0.1,
                top: vec![("is".into(), -0.1)],
            },
        ];
        let c = logprobs_json(Endpoint::Chat, &tokens, 0);
        assert_eq!(c["content"][0]["token"], "Par");
        assert_eq!(c["content"][0]["bytes"], json!([80, 97, 114]));
        assert_eq!(c["content"][0]["top_logprobs"][1]["token"], "Lon");
        let l = logprobs_json(Endpoint::Completions, &tokens, 4);
        assert_eq!(l["tokens"], json!(["Par", "is"]));
        assert_eq!(l["text_offset"], json!([4, 7]));
        assert_eq!(l["top_logprobs"][0]["Lon"], json!(-1.5));
    }
}
