//! Text in and out: `tokenizer.json` through Hugging Face's `tokenizers`
//! crate, and the chat template of `tokenizer_config.json` rendered with
//! minijinja the way transformers renders it (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, `strftime_now`, Python-style `tojson`, and Python string
//! methods such as `.strip()`).
//!
//! Prompt conventions follow mlx-lm: a plain prompt is encoded with the
//! tokenizer's special tokens (Llama 3 prepends `<|begin_of_text|>`) unless it
//! already starts with the BOS text; a chat prompt is rendered by the template
//! (which writes the BOS itself) and encoded without them.

use std::path::Path;

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

use super::config::read_json;
use super::error::{EngineError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer and chat template.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special-token field of tokenizer_config.json: a string or an
/// `{"content": ...}` object.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and (when present) `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
                message: format!("{}: {e}", path.display()),
            })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(EngineError::io(&jinja))?)
                } else {
                    None
                }
            }
        };
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        })
    }

    /// The id of the tokenizer config's `eos_token`, if it has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text`, with the tokenizer's special tokens (BOS) added
    /// when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| EngineError::Tokenizer {
                    message: format!("encoding: {e}"),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer {
                message: format!("decoding: {e}"),
            })
    }

    /// A plain prompt's ids, as mlx-lm encodes them: BOS added unless the
    /// text already starts with it.
    pub fn encode_plain(&self, prompt: &str) -> Result<Vec<u32>> {
        let has_bos = self
            .bos_token
            .as_deref()
            .is_some_and(|bos| prompt.starts_with(bos));
        self.encode(prompt, !has_bos)
    }

    /// Renders the chat template over `messages`. `extra` adds variables
    /// (for example a fixed `date_string`).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| EngineError::Template {
                message: "the tokenizer config has no chat_template".into(),
            })?;
        render_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
            extra,
        )
    }

    /// A chat prompt's ids: the rendered template, encoded without adding
    /// special tokens (the template writes them).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, true, &serde_json::Map::new())?;
        self.encode(&text, false)
    }
}

/// Renders a Hugging Face chat template.
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    extra: &serde_json::Map<String, Value>,
) -> Result<String> {
    let fail = |e: JinjaError| EngineError::Template {
        message: describe(&e),
    };
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(fail)?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<JinjaValue, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function(
        "strftime_now",
        |format: String| -> Result<String, JinjaError> {
            use std::fmt::Write;
            let mut out = String::new();
            write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: bad format `{format}`"),
                )
            })?;
            Ok(out)
        },
    );
    env.add_filter("tojson", tojson);
    let tmpl = env.template_from_str(template).map_err(fail)?;
    let mut context = serde_json::Map::new();
    context.insert(
        "messages".into(),
        serde_json::to_value(messages).unwrap_or_default(),
    );
    context.insert("add_generation_prompt".into(), add_generation_prompt.into());
    if let Some(bos) = bos_token {
        context.insert("bos_token".into(), bos.into());
    }
    if let Some(eos) = eos_token {
        context.insert("eos_token".into(), eos.into());
    }
    for (k, v) in extra {
        context.insert(k.clone(), v.clone());
    }
    let ctx = JinjaValue::from(minijinja::value::Serde(Value::Object(context)));
    tmpl.render(ctx).map_err(fail)
}

/// The error with its chain of causes (a `raise_exception` message is the
/// detail of the first).
fn describe(error: &JinjaError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `tojson` as transformers defines it: Python's `json.dumps` with
/// `ensure_ascii=False` (`", "` and `": "` separators), optional `indent`.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<String, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(out)
}

fn python_json(value: &Value, indent: Option<usize>, sort: bool, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut keys: Vec<&String> = map.keys().collect();
            if sort {
                keys.sort();
            }
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push_str(": ");
                if let Some(v) = map.get(*key) {
                    python_json(v, indent, sort, depth + 1, out);
                }
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: text.into(),
        }
    }

    #[test]
    fn renders_with_transformers_whitespace_rules() {
        let template = "{{ bos_token }}\n{% for m in messages %}\n  <{{ m.role }}>{{ m.content | trim }}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}";
        let text = render_template(
            template,
            &[user("  hi  ")],
            true,
            Some("<s>"),
            None,
            &serde_json::Map::new(),
        )
        .expect("render");
        // What Python's jinja2 gives with trim_blocks and lstrip_blocks.
        assert_eq!(text, "<s>\n  <user>hi\n<assistant>");
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let err = render_template(
            "{{ raise_exception('roles must alternate') }}",
            &[],
            false,
            None,
            None,
            &serde_json::Map::new(),
        )
        .expect_err("raises");
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn python_helpers_behave_like_transformers() {
        let mut extra = serde_json::Map::new();
        extra.insert(
            "tools".into(),
            serde_json::json!([{"name": "f", "args": [1, 2]}]),
        );
        let text = render_template(
            "{{ tools | tojson }}|{{ '  x '.strip() }}|{{ strftime_now('%Y') | length }}",
            &[],
            false,
            None,
            None,
            &extra,
        )
        .expect("render");
        // Keys come out sorted (the context passes through serde_json maps).
        assert_eq!(text, r#"[{"args": [1, 2], "name": "f"}]|x|4"#);
    }
}
