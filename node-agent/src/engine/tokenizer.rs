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

use minijinja::machinery::{Token, tokenize};
use minijinja::syntax::SyntaxConfig;
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
    /// The template, compiled once at load; a template that does not
    /// compile is kept as its error, so plain prompts still work and every
    /// chat request says why chats do not.
    chat_template: Option<Result<ChatTemplate, String>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// The `tokenizers` crate's tokenizer from the bytes of `tokenizer.json`.
///
/// The crate panics on some malformed files instead of returning an error
/// (found by the fuzzer: a JSON syntax error inside `decoder` hits an
/// `expect` in 0.22), and a model's files come from any hub repository.
/// So the bytes are checked to be JSON first, which turns that case into
/// an error naming the line and column, and any other panic of the crate
/// while parsing becomes an error too instead of ending the worker.
fn parse_tokenizer_json(bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| EngineError::Tokenizer {
        message: format!("not JSON: {e}"),
    })?;
    guarded("parsing", || tokenizers::Tokenizer::from_bytes(bytes))
}

/// A call into the `tokenizers` crate, its error or panic made an
/// [`EngineError::Tokenizer`] saying what was being done. Some
/// `tokenizer.json` files make the crate panic while encoding (found by the
/// fuzzer: a post-processor sequence of several `TemplateProcessing`s
/// reaches a `todo!()` in 0.22); a request must fail with an error then,
/// not take its thread down.
fn guarded<T>(what: &str, call: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(EngineError::Tokenizer {
            message: format!("{what}: {e}"),
        }),
        Err(_) => Err(EngineError::Tokenizer {
            message: format!("{what}: the tokenizers library failed on this tokenizer.json"),
        }),
    }
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
    /// Loads `tokenizer.json`, `tokenizer_config.json` (when present) and
    /// `chat_template.jinja` (when the config has no template).
    pub fn load(dir: &Path) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read(&path).map_err(EngineError::io(&path))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let jinja = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(EngineError::io(&jinja))?)
        } else {
            None
        };
        TextTokenizer::from_parts(&tokenizer_json, &config, jinja).map_err(|e| match e {
            EngineError::Tokenizer { message } => EngineError::Tokenizer {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// Builds the tokenizer from the bytes of `tokenizer.json`, the parsed
    /// `tokenizer_config.json` (`Value::Null` when absent) and the text of
    /// `chat_template.jinja`, used when the config has no template.
    pub fn from_parts(
        tokenizer_json: &[u8],
        config: &Value,
        chat_template_file: Option<String>,
    ) -> Result<TextTokenizer> {
        let inner = parse_tokenizer_json(tokenizer_json)?;
        // A tokenizer that cannot encode one word is refused at load, not
        // on every request.
        for add_special_tokens in [true, false] {
            guarded("encoding a test word", || {
                inner.encode("hello", add_special_tokens)
            })?;
        }
        Ok(TextTokenizer::with_config(
            inner,
            config,
            chat_template_file,
        ))
    }

    /// Builds the tokenizer from a parsed `tokenizer.json` and the rest as
    /// in [`TextTokenizer::from_parts`].
    pub fn with_config(
        inner: tokenizers::Tokenizer,
        config: &Value,
        chat_template_file: Option<String>,
    ) -> TextTokenizer {
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
        let chat_template = chat_template
            .or(chat_template_file)
            .map(|source| ChatTemplate::compile(source).map_err(|e| e.to_string()));
        TextTokenizer {
            inner,
            chat_template,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        }
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
        let encoding = guarded("encoding", || self.inner.encode(text, add_special_tokens))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded("decoding", || self.inner.decode(ids, true))
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
        let template = match &self.chat_template {
            Some(Ok(template)) => template,
            Some(Err(message)) => {
                return Err(EngineError::Template {
                    message: message.clone(),
                });
            }
            None => {
                return Err(EngineError::Template {
                    message: "the tokenizer config has no chat_template".into(),
                });
            }
        };
        template.render(
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

/// Fuel (minijinja's unit of template work: about one instruction, or 64
/// bytes of data created) every render may use, whatever the conversation.
/// The SmolLM2 and Llama-3-style templates render a one-question chat on a
/// hundredth of it (tested).
pub const TEMPLATE_FUEL_BASE: u64 = 1_000_000;

/// Fuel added per message of the conversation.
pub const TEMPLATE_FUEL_PER_MESSAGE: u64 = 10_000;

/// Fuel added per byte of the conversation's text and extra variables
/// (writing text out costs one per 64 bytes).
pub const TEMPLATE_FUEL_PER_BYTE: u64 = 1;

/// The fuel a render of `messages` (plus `extra` variables) may use: the
/// real SmolLM2 and Llama 3 templates render a 400-turn chat on a tenth of
/// it (tested), and it bounds the time and memory of a template from an
/// untrusted repository.
pub fn template_fuel(messages: &[ChatMessage], extra: &serde_json::Map<String, Value>) -> u64 {
    let text: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum::<usize>()
        + extra
            .iter()
            .map(|(k, v)| k.len() + v.to_string().len())
            .sum::<usize>();
    let count = u64::try_from(messages.len()).unwrap_or(u64::MAX);
    let bytes = u64::try_from(text).unwrap_or(u64::MAX);
    TEMPLATE_FUEL_BASE
        .saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(count))
        .saturating_add(TEMPLATE_FUEL_PER_BYTE.saturating_mul(bytes))
}

/// A Hugging Face chat template, compiled once, rendered per request.
///
/// Templates come with the model, from repositories anyone can publish, so
/// each render runs on a budget of minijinja fuel ([`template_fuel`]): a
/// template that loops too long or builds too much data fails that request
/// with an error instead of holding a CPU or filling memory.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// The template's name inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Stack of the thread that compiles a template. minijinja's parser
/// recurses through a dozen functions per nesting level of an expression
/// or block, up to its limit of 150 levels, which a template from the hub
/// can reach on purpose: found by the fuzzer, 180 nested `join(` calls
/// overflowed a 2 MiB stack (the size of tokio's blocking threads) in a
/// debug build and aborted the process before the parser's own limit
/// refused the template.
const COMPILE_STACK_BYTES: usize = 64 << 20;

impl ChatTemplate {
    /// Compiles `source` with the settings transformers renders templates
    /// with; a syntax error is an [`EngineError::Template`]. The parser runs
    /// on a thread of its own with a 64 MiB stack, so no nesting that stays
    /// below the parser's limit can overflow the caller's stack.
    pub fn compile(source: String) -> Result<ChatTemplate> {
        let failed = |message: String| EngineError::Template { message };
        std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(move || ChatTemplate::compile_here(source))
            .map_err(|e| failed(format!("starting the template compiler: {e}")))?
            .join()
            .map_err(|_| failed("the template compiler panicked".into()))?
    }

    fn compile_here(source: String) -> Result<ChatTemplate> {
        let fail = |e: JinjaError| EngineError::Template {
            message: describe(&e),
        };
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(fail)?;
        let mut env = Environment::new();
        env.set_syntax(syntax.clone());
        // Quadratic in a value's depth (each level indents all below it),
        // and no chat template prints a value for people to read.
        env.remove_filter("pprint");
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<JinjaValue, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(fail)?;
        check_namespaces(&source, syntax).map_err(|message| EngineError::Template { message })?;
        Ok(ChatTemplate { env })
    }

    /// Renders the template over `messages` with the fuel of
    /// [`template_fuel`]; running out of it is an [`EngineError::Template`]
    /// that says so.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        self.render_with_fuel(
            template_fuel(messages, extra),
            messages,
            add_generation_prompt,
            bos_token,
            eos_token,
            extra,
        )
    }

    /// [`ChatTemplate::render`] with an explicit fuel budget.
    pub fn render_with_fuel(
        &self,
        fuel: u64,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let fail = |e: JinjaError| EngineError::Template {
            message: if e.kind() == ErrorKind::OutOfFuel {
                format!(
                    "the chat template used up its budget of {fuel} fuel units (template \
                     work) without finishing; it may loop too long or build too much text"
                )
            } else {
                describe(&e)
            },
        };
        let fuel = fuel.min(MAX_TEMPLATE_FUEL);
        // The environment is shared, compiled template included (its
        // parts are reference-counted); only the fuel is per render.
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel));
        let tmpl = env.get_template(TEMPLATE_NAME).map_err(fail)?;
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
        // On a thread whose stack holds the deepest value this fuel can
        // build: printing, comparing, serializing and dropping a value
        // recurse once per level of nesting (see `RENDER_STACK_PER_FUEL`).
        let stack = usize::try_from(fuel)
            .unwrap_or(usize::MAX)
            .saturating_mul(RENDER_STACK_PER_FUEL)
            .max(RENDER_STACK_MIN);
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("chat-template".into())
                .stack_size(stack)
                .spawn_scoped(scope, move || tmpl.render(ctx).map_err(fail))
                .map_err(|e| EngineError::Template {
                    message: format!("starting the template renderer: {e}"),
                })?
                .join()
                .map_err(|_| EngineError::Template {
                    message: "the template renderer panicked".into(),
                })?
        })
    }
}

/// Stack a render gets per unit of its fuel. Lists and maps nest one
/// level per unit of fuel at best (a literal `[[[ … x … ]]]` in a loop),
/// and minijinja prints, compares, serializes and drops a value by
/// recursion, one or two frames per level, with no depth limit. Measured in
/// a debug build, turning a list nested 100 000 deep into text used
/// between 64 and 256 MiB of stack; release frames are smaller. The
/// thread's stack is reserved address space, and only what a render
/// touches becomes memory.
const RENDER_STACK_PER_FUEL: usize = 4096;

/// The smallest render stack, whatever the fuel.
const RENDER_STACK_MIN: usize = 64 << 20;

/// The most fuel any one render gets, so that its stack reservation stays
/// within 8 GiB of address space: four times what the real templates use
/// on a 400-turn chat.
pub const MAX_TEMPLATE_FUEL: u64 = 2_000_000;

/// Refuses a template that uses a `namespace()` other than in place.
///
/// A namespace is the one value a template can change after making it, so
/// it is the one way a value can come to contain itself (`{% set ns.a = ns
/// %}`). minijinja prints, compares and serializes values by recursion
/// with no cycle check, so rendering such a value recurses until the stack
/// overflows, and that aborts the process: rank 0's worker, on every chat
/// request. The fuzzer found it.
///
/// Allowed: `{% set NAME = namespace(...) %}`, and `NAME` afterwards only
/// through its attributes (`NAME.x`, `NAME['x']`, `{% set NAME.x = ... %}`)
/// or as a keyword argument's name. Then no expression ever yields a
/// namespace except that binding, no namespace is stored in another value,
/// and no value can contain itself. The check reads the template's tokens
/// and is conservative: it refuses some templates that would render (one
/// printing a namespace, passing one to a macro or looping over one).
fn check_namespaces(source: &str, syntax: SyntaxConfig) -> std::result::Result<(), String> {
    // A template the lexer refuses was already refused by the compiler.
    let Ok(tokens) = tokenize(source, false, syntax).collect::<std::result::Result<Vec<_>, _>>()
    else {
        return Ok(());
    };
    let token = |i: usize| tokens.get(i).map(|(t, _)| t);
    let ident = |i: usize| match token(i) {
        Some(Token::Ident(name)) => Some(*name),
        _ => None,
    };
    let before = |i: usize| i.checked_sub(1).and_then(token);
    // `{% set NAME = namespace(`, with `i` at NAME.
    let binds = |i: usize| {
        i.checked_sub(2)
            .is_some_and(|j| matches!(token(j), Some(Token::BlockStart)))
            && before(i).is_some_and(|t| matches!(t, Token::Ident("set")))
            && matches!(token(i + 1), Some(Token::Assign))
            && ident(i + 2) == Some("namespace")
            && matches!(token(i + 3), Some(Token::ParenOpen))
    };
    let names: std::collections::HashSet<&str> = (0..tokens.len())
        .filter(|&i| binds(i))
        .filter_map(ident)
        .collect();
    for (i, (_, span)) in tokens.iter().enumerate() {
        let Some(name) = ident(i) else { continue };
        if matches!(before(i), Some(Token::Dot)) {
            continue; // an attribute's name, not a variable
        }
        let line = span.start_line;
        if name == "namespace" {
            if i.checked_sub(2).is_some_and(binds) {
                continue;
            }
            return Err(format!(
                "the chat template calls `namespace` other than as `{{% set NAME = \
                 namespace(...) %}}` (line {line}), which Tandem refuses: a namespace stored \
                 in another value can come to contain itself, and rendering that never ends"
            ));
        }
        if !names.contains(name) {
            continue;
        }
        let in_place = matches!(token(i + 1), Some(Token::Dot | Token::BracketOpen));
        let keyword = matches!(token(i + 1), Some(Token::Assign))
            && matches!(before(i), Some(Token::ParenOpen | Token::Comma));
        if in_place || keyword || binds(i) {
            continue;
        }
        return Err(format!(
            "the chat template uses the namespace `{name}` other than through its attributes \
             (line {line}; only `{name}.x`, `{name}['x']` and `{{% set {name}.x = ... %}}` are \
             allowed), which Tandem refuses: a namespace stored in another value can come to \
             contain itself, and rendering that never ends"
        ));
    }
    Ok(())
}

/// Renders a Hugging Face chat template once: [`ChatTemplate::compile`]
/// then [`ChatTemplate::render`].
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    extra: &serde_json::Map<String, Value>,
) -> Result<String> {
    ChatTemplate::compile(template.to_owned())?.render(
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
        extra,
    )
}

/// `strftime_now` as transformers defines it: the local time in a
/// `strftime` format.
fn strftime_now(format: String) -> Result<String, JinjaError> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format `{format}`"),
        )
    })?;
    Ok(out)
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
    python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out).map_err(|()| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("tojson: the text would be over {MAX_TOJSON_BYTES} bytes"),
        )
    })?;
    Ok(out)
}

/// The longest text `tojson` writes. Indentation grows with depth, so a
/// deep value with a wide indent would otherwise be quadratic in its size,
/// beyond what the render's fuel counts.
const MAX_TOJSON_BYTES: usize = 16 << 20;

/// Writes `value` as Python's `json.dumps` does; `Err` once the text
/// would pass [`MAX_TOJSON_BYTES`].
fn python_json(
    value: &Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), ()> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            let spaces = width.saturating_mul(depth);
            if out.len().saturating_add(spaces) >= MAX_TOJSON_BYTES {
                return Err(());
            }
            out.push('\n');
            out.push_str(&" ".repeat(spaces));
        }
        Ok(())
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1)?;
                python_json(item, indent, sort, depth + 1, out)?;
            }
            newline(out, depth)?;
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
                newline(out, depth + 1)?;
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push_str(": ");
                if let Some(v) = map.get(*key) {
                    python_json(v, indent, sort, depth + 1, out)?;
                }
            }
            newline(out, depth)?;
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
    if out.len() > MAX_TOJSON_BYTES {
        return Err(());
    }
    Ok(())
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

    /// SmolLM2's ChatML template, as its tokenizer_config.json has it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A long conversation: `turns` exchanges of about 1 KiB each.
    fn long_conversation(turns: usize) -> Vec<ChatMessage> {
        let mut messages = vec![ChatMessage {
            role: "system".into(),
            content: "Be brief. ".repeat(20),
        }];
        for i in 0..turns {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(ChatMessage {
                role: role.into(),
                content: format!("turn {i}: {}", "lorem ipsum dolor ".repeat(56)),
            });
        }
        messages
    }

    #[test]
    fn real_templates_render_long_chats_on_a_tenth_of_their_fuel() {
        let messages = long_conversation(400);
        let none = serde_json::Map::new();
        for source in [CHATML, crate::engine::make_model::CHAT_TEMPLATE] {
            let template = ChatTemplate::compile(source.to_owned()).expect("compiles");
            let budget = template_fuel(&messages, &none);
            let full = template
                .render(&messages, true, Some("<s>"), None, &none)
                .expect("renders within its fuel");
            let tenth = template
                .render_with_fuel(budget / 10, &messages, true, Some("<s>"), None, &none)
                .expect("renders within a tenth of its fuel");
            assert_eq!(full, tenth);
            assert!(full.len() > 400 * 1000, "{}", full.len());
            // The ceiling on any render's fuel leaves room four times over.
            template
                .render_with_fuel(
                    MAX_TEMPLATE_FUEL / 4,
                    &messages,
                    true,
                    Some("<s>"),
                    None,
                    &none,
                )
                .expect("renders within a quarter of the most fuel a render gets");
            // A short chat needs far less than the fixed allowance.
            template
                .render_with_fuel(
                    TEMPLATE_FUEL_BASE / 100,
                    &[user("What is the capital of France?")],
                    true,
                    Some("<s>"),
                    None,
                    &none,
                )
                .expect("a short chat renders on a hundredth of the base fuel");
        }
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel_quickly() {
        let bombs = [
            // Ten billion iterations.
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            // Ever longer strings: 2^40 bytes if nothing stopped it.
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            // A recursive macro with a wide fan-out.
            "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        ];
        for source in bombs {
            let template = ChatTemplate::compile(source.to_owned()).expect("compiles");
            let started = std::time::Instant::now();
            let err = template
                .render(&[user("hi")], true, None, None, &serde_json::Map::new())
                .expect_err("runs out of fuel");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "{source}: {:?}",
                started.elapsed()
            );
            let text = err.to_string();
            assert!(
                matches!(err, EngineError::Template { .. }) && text.contains("budget"),
                "{source}: {text}"
            );
        }
    }

    #[test]
    fn deeply_nested_templates_are_refused_without_overflowing_the_stack() {
        // Each compiles from a thread with a small stack, as a request's
        // blocking thread would; none may abort the process.
        let deep = |open: &str, middle: &str, close: &str, n: usize| {
            format!("{{{{ {}{middle}{} }}}}", open.repeat(n), close.repeat(n))
        };
        let regression = String::from_utf8(
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fuzz/corpus/chat_template/regression-nested-join.jinja"),
            )
            .expect("the regression seed"),
        )
        .expect("UTF-8");
        let sources = [
            regression,
            deep("(", "1", ")", 149),
            deep("(", "1", ")", 5000),
            deep("[", "1", "]", 149),
            deep("x | join(", "','", ")", 149),
            deep("not ", "x", "", 5000),
            deep("-", "1", "", 5000),
            deep("1 if x else (", "2", ")", 149),
            format!("{}x{}", "{% if x %}".repeat(149), "{% endif %}".repeat(149)),
            format!(
                "{}x{}",
                "{% for a in b %}".repeat(5000),
                "{% endfor %}".repeat(5000)
            ),
        ];
        for source in sources {
            let head: String = source.chars().take(40).collect();
            let outcome = std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    ChatTemplate::compile(source).map(|t| {
                        t.render(&[user("hi")], true, None, None, &serde_json::Map::new())
                            .map(|_| ())
                    })
                })
                .expect("thread")
                .join()
                .expect("no panic");
            // Compiled, or refused with the parser's message; either way
            // the test is still running.
            if let Err(e) = outcome {
                assert!(matches!(e, EngineError::Template { .. }), "{head}: {e}");
            }
        }
    }

    #[test]
    fn tokenizer_files_the_tokenizers_crate_panics_on_are_errors() {
        let seed = |name: &str| {
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fuzz/corpus/tokenizer_json")
                    .join(name),
            )
            .expect("a regression seed")
        };
        // A syntax error inside `decoder` (the crate's `expect`).
        let err = TextTokenizer::from_parts(
            &seed("regression-bad-json-in-decoder.json"),
            &Value::Null,
            None,
        )
        .expect_err("not JSON");
        assert!(err.to_string().contains("not JSON"), "{err}");
        // Post-processors that make encoding reach the crate's `todo!()`.
        let err = TextTokenizer::from_parts(
            &seed("regression-template-processing-todo.json"),
            &Value::Null,
            None,
        )
        .expect_err("cannot encode");
        assert!(err.to_string().contains("encoding a test word"), "{err}");
    }

    #[test]
    fn a_template_that_does_not_compile_fails_chats_but_not_the_tokenizer() {
        let tokenizer_json = serde_json::to_vec(&serde_json::json!({
            "model": {"type": "WordLevel", "vocab": {"a": 0, "<unk>": 1}, "unk_token": "<unk>"}
        }))
        .expect("json");
        let config = serde_json::json!({"chat_template": "{% for m in messages %}"});
        let tokenizer =
            TextTokenizer::from_parts(&tokenizer_json, &config, None).expect("the tokenizer loads");
        assert!(tokenizer.has_chat_template());
        let err = tokenizer
            .render_chat(&[user("hi")], true, &serde_json::Map::new())
            .expect_err("the template is broken");
        assert!(matches!(err, EngineError::Template { .. }), "{err}");
        assert!(err.to_string().contains("syntax error"), "{err}");
        assert_eq!(tokenizer.encode("a", false).expect("plain text"), vec![0]);
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

    fn render_alone(source: &str, fuel: u64) -> Result<String> {
        ChatTemplate::compile(source.to_owned())?.render_with_fuel(
            fuel,
            &[user("hi")],
            true,
            None,
            None,
            &serde_json::Map::new(),
        )
    }

    #[test]
    fn namespaces_are_used_in_place_or_the_template_is_refused() {
        // Found by the fuzzer: a namespace stored in itself made printing
        // it recurse until the stack overflowed and the process aborted.
        for (source, needle) in [
            (
                "{% set ns = namespace() %}{% set ns.a = ns %}{{ ns }}",
                "namespace `ns` other than through its attributes (line 1",
            ),
            ("{% set ns = namespace() %}\n{{ ns }}", "(line 2;"),
            (
                "{% set ns = namespace() %}{% set x = [ns] %}",
                "namespace `ns`",
            ),
            (
                "{% set ns = namespace() %}{% for n in [1] %}{% set ns.a = ns.b ~ ns %}{% endfor %}",
                "namespace `ns`",
            ),
            (
                "{% macro m(ns) %}{% endmacro %}{% set ns = namespace() %}",
                "namespace `ns`",
            ),
            ("{% set f = namespace %}", "calls `namespace` other than as"),
            (
                "{% set ns = namespace() %}{% set ns.inner = namespace() %}",
                "calls `namespace` other than as",
            ),
            (
                "{% set ns = namespace(a=namespace()) %}",
                "calls `namespace` other than as",
            ),
            ("{{ namespace() }}", "calls `namespace` other than as"),
        ] {
            match ChatTemplate::compile(source.to_owned()) {
                Err(EngineError::Template { message }) => {
                    assert!(message.contains(needle), "{source}: {message}")
                }
                other => panic!("{source}: {other:?}"),
            }
        }
        // In place, as real templates use them: reads, writes, item
        // access, keyword arguments, and a second binding.
        let source = "{%- set ns = namespace(found=false, n=0, text='') %}\
            {%- for m in messages %}{% set ns.n = ns.n + 1 %}{% set ns.text = ns['text'] ~ m.content %}\
            {%- if m.role == 'user' %}{% set ns.found = true %}{% endif %}{% endfor %}\
            {%- set ns = namespace(ns=1) %}{{ ns.ns }}{{ ns.missing is undefined }}";
        let out = render_alone(source, 10_000).expect("renders");
        assert_eq!(out, "1True");
        // Attribute names and strings that spell a namespace's name.
        let source = "{% set ns = namespace(x=1) %}{{ {'ns': 2}.ns }}{{ 'ns' }}{{ ns.x }}";
        assert_eq!(render_alone(source, 10_000).expect("renders"), "2ns1");
    }

    #[test]
    fn a_value_nested_as_deep_as_the_fuel_allows_renders_without_overflowing() {
        // Forty levels of list per loop turn, one unit of fuel each or so:
        // a list nested 100 000 deep, then printed, serialized, compared
        // and dropped. Each of those recurses once per level; on a thread
        // of the default stack this aborted the process.
        let source = format!(
            "{{% set ns = namespace(x=1) %}}{{% for i in range(100000) %}}\
             {{% set ns.x = {}ns.x{} %}}{{% if loop.index * 40 >= 100000 %}}{{% break %}}{{% endif %}}\
             {{% endfor %}}{{{{ ns.x|tojson|length }}}} {{{{ ns.x == [ns.x] }}}} {{{{ (ns.x ~ '')|length }}}}",
            "[".repeat(40),
            "]".repeat(40)
        );
        let out = render_alone(&source, 1_000_000).expect("renders");
        assert_eq!(out, "200001 False 200001");
        // Out of fuel half way: the error, and the half-built value dropped.
        let err = render_alone(&source, 50_000).expect_err("runs out of fuel");
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn output_bombs_are_refused() {
        // `pprint` indents each level below the last: quadratic in depth.
        let err = render_alone("{{ [1]|pprint }}", 10_000).expect_err("no pprint");
        assert!(err.to_string().contains("pprint"), "{err}");
        let err = render_alone("{{ [[1, 2]]|tojson(indent=1000000000) }}", 10_000)
            .expect_err("too much indentation");
        assert!(
            err.to_string().contains("tojson: the text would be over"),
            "{err}"
        );
        assert_eq!(
            render_alone("{{ {'a': [1]}|tojson(indent=2) }}", 10_000).expect("renders"),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
    }
}
