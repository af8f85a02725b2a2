//! A byte-level BPE tokenizer with Llama 3's pre-tokenizer and special
//! tokens, its merges generated so the vocabulary has exactly the asked
//! size, and a Llama-3-style chat template.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

/// Ids of Llama 3's special tokens, at the top of the vocabulary as in the
/// real tokenizer (128000 onwards for a vocabulary of 128256).
#[derive(Debug, Clone, Copy)]
pub(super) struct SpecialTokens {
    pub(super) first: u32,
    pub(super) count: u32,
    pub(super) begin_of_text: u32,
    pub(super) end_of_text: u32,
    pub(super) start_header: u32,
    pub(super) end_header: u32,
    pub(super) eom: u32,
    pub(super) eot: u32,
}

/// How many special tokens a vocabulary of this size gets: Llama 3's 256, or
/// 16 for toy vocabularies.
pub(super) fn special_count(vocab: usize) -> usize {
    if vocab >= 4096 { 256 } else { 16 }
}

impl SpecialTokens {
    pub(super) fn new(vocab: usize) -> SpecialTokens {
        let count = special_count(vocab) as u32;
        let first = (vocab as u32).saturating_sub(count);
        SpecialTokens {
            first,
            count,
            begin_of_text: first,
            end_of_text: first + 1,
            start_header: first + 6,
            end_header: first + 7,
            eom: first + 8,
            eot: first + 9,
        }
    }

    /// The name of special token `i` (0-based from `first`), Llama 3's.
    fn name(i: u32) -> String {
        match i {
            0 => "<|begin_of_text|>".into(),
            1 => "<|end_of_text|>".into(),
            2 => "<|reserved_special_token_0|>".into(),
            3 => "<|reserved_special_token_1|>".into(),
            4 => "<|finetune_right_pad_id|>".into(),
            5 => "<|reserved_special_token_2|>".into(),
            6 => "<|start_header_id|>".into(),
            7 => "<|end_header_id|>".into(),
            8 => "<|eom_id|>".into(),
            9 => "<|eot_id|>".into(),
            10 => "<|python_tag|>".into(),
            n => format!("<|reserved_special_token_{}|>", n - 8),
        }
    }
}

/// GPT-2's byte-to-character table of byte-level BPE: printable bytes stand
/// for themselves, the others for code points from 256 upwards.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// Llama 3's pre-tokenizer split: contractions, letter runs with one leading
/// non-letter, up to three digits, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `n` BPE merges over the byte alphabet: pairs of existing tokens in order
/// of the sum of their ranks, letters and the space marker first, so common
/// English fragments get tokens. A token never gains a space inside.
fn generate_merges(n: usize, chars: &[char]) -> (Vec<String>, Vec<(String, String)>) {
    let priority = " etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'-!?:;\"()\n";
    let mut tokens: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for b in priority.bytes().chain(0u8..=255) {
        let t = chars[b as usize].to_string();
        if seen.insert(t.clone()) {
            tokens.push(t);
        }
    }
    let base = tokens.len();
    let space = chars[b' ' as usize];
    let newline = chars[b'\n' as usize];
    let mut merges = Vec::with_capacity(n);
    let mut sum = 0usize;
    while merges.len() < n {
        // Only the first `limit` tokens (the useful base characters and
        // everything built from them) take part; raw bytes never pair.
        let limit = tokens.len();
        for i in 0..=sum {
            let j = sum - i;
            if merges.len() >= n {
                break;
            }
            if i >= limit || j >= limit || (i < base && i >= 80) || (j < base && j >= 80) {
                continue;
            }
            let (a, b) = (&tokens[i], &tokens[j]);
            if b.starts_with(space) || a.contains(newline) || b.contains(newline) {
                continue;
            }
            let joined = format!("{a}{b}");
            if joined.chars().count() > 16 || seen.contains(&joined) {
                continue;
            }
            seen.insert(joined.clone());
            merges.push((a.clone(), b.clone()));
            tokens.push(joined);
        }
        sum += 1;
        if sum > 4 * (n + base) {
            break;
        }
    }
    (tokens, merges)
}

/// `tokenizer.json` for a vocabulary of exactly `vocab` ids.
pub(super) fn tokenizer_json(vocab: usize) -> Value {
    let chars = byte_chars();
    let specials = SpecialTokens::new(vocab);
    let n_merges = vocab - 256 - specials.count as usize;
    let (tokens, merges) = generate_merges(n_merges, &chars);
    // Ids: the 256 byte characters in byte order, then merges in order.
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut ordered: Vec<(String, u32)> = Vec::with_capacity(vocab);
    for c in &chars {
        let id = ordered.len() as u32;
        ids.insert(c.to_string(), id);
        ordered.push((c.to_string(), id));
    }
    for (a, b) in &merges {
        let t = format!("{a}{b}");
        let id = ordered.len() as u32;
        ids.insert(t.clone(), id);
        ordered.push((t, id));
    }
    let _ = tokens;
    let mut vocab_map = serde_json::Map::new();
    for (t, id) in ordered {
        vocab_map.insert(t, json!(id));
    }
    let added: Vec<Value> = (0..specials.count)
        .map(|i| {
            json!({
                "id": specials.first + i,
                "content": SpecialTokens::name(i),
                "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true
            })
        })
        .collect();
    let bos = SpecialTokens::name(0);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}
            ]
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                 "use_regex": true},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": bos, "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {bos.clone(): {"id": bos, "ids": [specials.begin_of_text],
                                                  "tokens": [bos]}}}
            ]
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": true,
            "vocab": Value::Object(vocab_map),
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        }
    })
}

/// A Llama-3-style chat template: a system header with the date, then each
/// turn between header tokens and ended by `<|eot_id|>`.
pub const CHAT_TEMPLATE: &str = r#"{{- bos_token }}
{%- if date_string is not defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "01 Jan 2025" %}
    {%- endif %}
{%- endif %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] | trim %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
    {%- set turns = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_text }}
{{- "<|eot_id|>" }}
{%- for message in turns %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("Unsupported role '" + message['role'] + "': expected user or assistant after the system message") }}
    {%- endif %}
    {{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\n\n" + message['content'] | trim + "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
{%- endif %}
"#;

pub(super) fn tokenizer_config(vocab: usize) -> Value {
    let specials = SpecialTokens::new(vocab);
    let mut decoder = serde_json::Map::new();
    for i in 0..specials.count {
        decoder.insert(
            (specials.first + i).to_string(),
            json!({"content": SpecialTokens::name(i), "lstrip": false, "normalized": false,
                   "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let _ = (specials.start_header, specials.end_header);
    json!({
        "added_tokens_decoder": Value::Object(decoder),
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": true,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_has_exactly_the_asked_size() {
        for vocab in [300, 512, 1000, 5000] {
            let json = tokenizer_json(vocab);
            let text = serde_json::to_string(&json).expect("json");
            let tok = tokenizers::Tokenizer::from_bytes(text.as_bytes()).expect("tokenizer");
            assert_eq!(tok.get_vocab_size(true), vocab, "vocab {vocab}");
            let ids = tok
                .encode("Hello world, the tests", true)
                .expect("encode")
                .get_ids()
                .to_vec();
            assert_eq!(ids[0], SpecialTokens::new(vocab).begin_of_text);
            let back = tok.decode(&ids, true).expect("decode");
            assert_eq!(back, "Hello world, the tests");
        }
    }

    #[test]
    fn specials_sit_where_llama_3_puts_them() {
        let s = SpecialTokens::new(128_256);
        assert_eq!(
            (s.begin_of_text, s.end_of_text, s.eot, s.start_header),
            (128_000, 128_001, 128_009, 128_006)
        );
        assert_eq!(SpecialTokens::name(255), "<|reserved_special_token_247|>");
    }
}
