//! Rank 0's text side: the chat template, encoding and decoding
//! ([`TextCodec`], implemented by [`TokenizerCodec`] over the model's own
//! tokenizer files), and the incremental [`Detokenizer`] that turns streamed
//! ids into whole characters.

use std::path::Path;

use super::Result;
use super::config::ModelConfig;
use super::tokenizer::{ChatMessage, TextTokenizer};

/// Rank 0's text handling.
pub trait TextCodec: Send + Sync {
    /// Prompt ids of a chat, through the model's chat template.
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>>;
    /// Prompt ids of plain text.
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of generated ids.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Ids that end a generation.
    fn stop_ids(&self) -> Vec<u32>;
}

/// Rank 0's text side, from the model directory's tokenizer and config.
#[derive(Debug)]
pub struct TokenizerCodec {
    tokenizer: TextTokenizer,
    stop_ids: Vec<u32>,
}

impl TokenizerCodec {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and the end-of-sequence
    /// ids of `config.json`.
    pub fn load(dir: &Path) -> Result<TokenizerCodec> {
        let tokenizer = TextTokenizer::load(dir)?;
        let config = ModelConfig::load(dir)?;
        let mut stop_ids = config.eos_token_ids.clone();
        if let Some(eos) = tokenizer.eos_token_id()
            && !stop_ids.contains(&eos)
        {
            stop_ids.push(eos);
        }
        Ok(TokenizerCodec {
            tokenizer,
            stop_ids,
        })
    }
}

impl TextCodec for TokenizerCodec {
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.tokenizer.encode_chat(messages)
    }

    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_plain(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    fn stop_ids(&self) -> Vec<u32> {
        self.stop_ids.clone()
    }
}

/// Turns a growing list of token ids into text pieces, holding back a piece
/// while it ends in the middle of a UTF-8 character.
///
/// Only a short window is decoded per token (the tokens since the last
/// emitted piece, plus the piece before them for context), as vLLM's
/// incremental detokenizer does, so a long generation costs linear time.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the new text, if any whole characters arrived.
    pub fn push(&mut self, codec: &dyn TextCodec, id: u32) -> Option<String> {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix..self.read]).ok()?;
        let now = codec.decode(&self.ids[self.prefix..]).ok()?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return None;
        }
        let fresh = now.get(before.len()..)?.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Some(fresh)
    }

    /// The text not yet returned, even if it ends mid-character (the
    /// generation is over; nothing will complete it).
    pub fn flush(&mut self, codec: &dyn TextCodec) -> Option<String> {
        let before = codec.decode(&self.ids[self.prefix..self.read]).ok()?;
        let now = codec.decode(&self.ids[self.prefix..]).ok()?;
        let rest = now.get(before.len()..)?.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        (!rest.is_empty()).then_some(rest)
    }

    /// Everything decoded so far.
    pub fn text(&self, codec: &dyn TextCodec) -> String {
        codec.decode(&self.ids).unwrap_or_default()
    }

    /// The ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte: multi-byte characters arrive in pieces, as with
    /// Llama 3's byte-level BPE.
    struct Bytes;

    impl TextCodec for Bytes {
        fn encode_chat(&self, _: &[ChatMessage]) -> Result<Vec<u32>> {
            Ok(Vec::new())
        }
        fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let bytes: Vec<u8> = ids.iter().map(|i| *i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn stop_ids(&self) -> Vec<u32> {
            Vec::new()
        }
    }

    #[test]
    fn pieces_are_whole_characters_and_add_up_to_the_text() {
        let text = "héllo wörld → 🦙!";
        let mut d = Detokenizer::default();
        let mut out = String::new();
        for id in Bytes.encode_plain(text).expect("encode") {
            if let Some(piece) = d.push(&Bytes, id) {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                out.push_str(&piece);
            }
        }
        assert_eq!(out, text);
        assert_eq!(d.text(&Bytes), text);
        assert_eq!(d.flush(&Bytes), None);
    }

    #[test]
    fn an_unfinished_character_is_flushed_at_the_end() {
        let mut d = Detokenizer::default();
        assert_eq!(d.push(&Bytes, u32::from(b'a')), Some("a".into()));
        // The first byte of "é" alone is held back...
        assert_eq!(d.push(&Bytes, 0xC3), None);
        // ...and comes out as a replacement character when nothing follows.
        assert_eq!(d.flush(&Bytes), Some("\u{FFFD}".into()));
    }
}
