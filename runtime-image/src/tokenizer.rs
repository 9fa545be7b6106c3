//! Text ↔ token ids. Wraps a Hugging Face `tokenizers::Tokenizer`, loaded from tokenizer.json or
//! rebuilt from a GGUF file's vocabulary (tokens, merges, token types, pre-tokenizer name) the
//! way llama.cpp interprets them. No candle here: the GGUF metadata arrives as [`GgufVocab`].

use std::path::Path;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TruncationParams,
};

use crate::error::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// DeepSeek-Coder's splits (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER`).
const DEEPSEEK_CODER_SPLITS: [&str; 5] = [
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
    "\\p{N}",
];

/// DeepSeek-LLM's splits (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM`).
const DEEPSEEK_LLM_SPLITS: [&str; 6] = [
    "[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
    "\\p{N}+",
];

/// The pre-tokenizer regex llama.cpp uses for Llama 3 style vocabularies.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's (and Qwen2.5's, Qwen3's, DeepSeek-R1's Qwen distillations'): Llama 3's, with digits
/// one at a time (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`, the regex of their tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken pre-tokenizer (Mistral NeMo, Mistral Small 3, Pixtral, Ministral): the
/// pattern of its tokenizer (`tekken.json`, which mistral-common's tiktoken and transformers'
/// tokenizer.json use). llama.cpp rewrites its letter classes for an engine without
/// `\p{Lu}`/`\p{Ll}`, so that it splits differently around combining marks and non-ASCII
/// capitals; kandle keeps the model's own, which its regex engine reads.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's pre-tokenizer (tiktoken's `o200k_base`; Phi-4-mini's vocabulary, llama.cpp's
/// `tokenizer.ggml.pre` "gpt-4o"): Tekken's letter classes with English contractions kept on
/// their word, digits in threes. As for Tekken, kandle keeps the model's own pattern where
/// llama.cpp rewrites the letter classes.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Whether a GGUF vocabulary whose file has no `tokenizer.ggml.add_bos_token` begins a
/// prompt with its beginning-of-text token, as llama.cpp decides it: SentencePiece
/// vocabularies and the Llama 3 and Tekken pre-tokenizers do, other byte-level ones do not.
pub fn adds_bos_by_default(model: &str, pre: &str) -> bool {
    match model {
        "llama" => true,
        "gpt2" => is_llama3_pre(pre) || pre == "tekken",
        _ => false,
    }
}

/// llama.cpp's names for Llama 3's pre-tokenizer.
fn is_llama3_pre(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "falcon3")
}

/// The tokenizer part of a GGUF file's metadata.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` ("gpt2" for byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer name ("smollm", "llama-bpe", "default", ...).
    pub pre: String,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, parallel to `tokens`.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`, each "left right" (BPE).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores`, parallel to `tokens` (SentencePiece; empty when absent).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece: default true).
    pub add_space_prefix: bool,
}

/// A tokenizer for one model.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl TextTokenizer {
    /// Loads tokenizer.json. Padding configured in the file is dropped (the backends pad).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Rebuilds a tokenizer from GGUF metadata: byte-level BPE ("gpt2") vocabularies with a
    /// known pre-tokenizer, and SentencePiece ("llama": Llama 2, Mistral, TinyLlama, Phi-3)
    /// ones ([`TextTokenizer::from_spm_vocab`]); anything else is refused rather than
    /// mis-tokenised.
    pub fn from_gguf_vocab(v: GgufVocab) -> Result<Self> {
        if v.model == "llama" {
            return Self::from_spm_vocab(v);
        }
        if v.model != "gpt2" {
            return Err(Error::Model(format!(
                "GGUF tokenizer model {:?} is not supported without a tokenizer.json (only \"gpt2\" BPE and \"llama\" SentencePiece)",
                v.model
            )));
        }
        let byte_level =
            |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        // Splits by `patterns` in turn (each cutting the pieces the one before left, the
        // matches kept as pieces of their own), then the byte-level alphabet: transformers'
        // `Sequence` of `Split`s, llama.cpp's list of `regex_exprs`.
        let splits = |patterns: &[&str]| -> Result<PreTokenizerWrapper> {
            let mut seq = Vec::with_capacity(patterns.len() + 1);
            for p in patterns {
                seq.push(PreTokenizerWrapper::Split(
                    Split::new(
                        SplitPattern::Regex((*p).into()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(Error::tokenizer)?,
                ));
            }
            seq.push(byte_level(false));
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(seq)))
        };
        let llama3 = is_llama3_pre(&v.pre);
        let pre = match v.pre.as_str() {
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            // llama.cpp: digits one by one, then the GPT-2 regex.
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone"
            | "minerva" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            _ if llama3 => splits(&[LLAMA3_SPLIT])?,
            "qwen2" | "deepseek-r1-qwen" => splits(&[QWEN2_SPLIT])?,
            // DeepSeek's llama-architecture models (DeepSeek-Coder, DeepSeek-LLM): llama.cpp's
            // expressions, as their tokenizer.json's splits.
            "deepseek-coder" => splits(&DEEPSEEK_CODER_SPLITS)?,
            "deepseek-llm" => splits(&DEEPSEEK_LLM_SPLITS)?,
            "tekken" => splits(&[TEKKEN_SPLIT])?,
            "gpt-4o" => splits(&[GPT4O_SPLIT])?,
            other => {
                return Err(Error::Model(format!(
                    "GGUF pre-tokenizer {other:?} is not supported without a tokenizer.json"
                )));
            }
        };
        let vocab = vocab_of(&v.tokens);
        let merges = v
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| Error::Model(format!("malformed GGUF merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        // Llama 3's tokenizer takes a pre-tokenised piece that is itself in the vocabulary
        // whole, without merging (its tokenizer.json's `ignore_merges`; llama.cpp does the
        // same for this pre-tokenizer): " Việt" is one token there, three by the merges.
        // Tekken is tiktoken's, which does the same.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(llama3 || v.pre == "tekken")
            .build()
            .map_err(Error::tokenizer)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::default()));
        add_gguf_special_tokens(&mut inner, &v)?;
        Ok(Self { inner })
    }

    /// A SentencePiece BPE vocabulary (`tokenizer.ggml.model` "llama") as transformers'
    /// `LlamaTokenizerFast` is built from it (its legacy form, which is llama.cpp's
    /// reading): merges from the scores (every split of a piece into two pieces of the
    /// vocabulary, ranked by the whole piece's score, highest first), byte fallback to the
    /// `<0xXX>` tokens, spaces written as `▁`, and with `add_space_prefix` a `▁` before the
    /// text and after each special token (llama.cpp: "prefix with space if previous is
    /// special"; transformers: the normaliser runs on each stretch between special tokens).
    fn from_spm_vocab(v: GgufVocab) -> Result<Self> {
        use tokenizers::decoders::byte_fallback::ByteFallback;
        use tokenizers::decoders::fuse::Fuse;
        use tokenizers::decoders::sequence::Sequence as Decoders;
        use tokenizers::decoders::strip::Strip;
        use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
        use tokenizers::{DecoderWrapper, NormalizerWrapper};

        if v.scores.len() != v.tokens.len() {
            return Err(Error::Model(format!(
                "a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores for its {} tokens \
                 (it has {})",
                v.tokens.len(),
                v.scores.len()
            )));
        }
        let vocab = vocab_of(&v.tokens);
        let merges = spm_merges(&v.tokens, &v.scores, &vocab);
        let unk = v
            .token_types
            .iter()
            .position(|&t| t == TOKEN_TYPE_UNKNOWN)
            .map(|i| v.tokens[i].clone());
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk {
            bpe = bpe.unk_token(unk);
        }
        let mut inner = Tokenizer::new(bpe.build().map_err(Error::tokenizer)?);
        let replace = |from: &str, to: &str| Replace::new(from, to).map_err(Error::tokenizer);
        let mut normalizers = Vec::new();
        if v.add_space_prefix {
            normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
        }
        normalizers.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
        inner
            .with_normalizer(Some(Normalizers::new(normalizers)))
            .map_err(Error::tokenizer)?;
        let mut decoders = vec![
            DecoderWrapper::Replace(replace("▁", " ")?),
            DecoderWrapper::ByteFallback(ByteFallback::default()),
            DecoderWrapper::Fuse(Fuse::default()),
        ];
        if v.add_space_prefix {
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        inner.with_decoder(Some(Decoders::new(decoders)));
        add_gguf_special_tokens(&mut inner, &v)?;
        Ok(Self { inner })
    }

    /// Truncates encodings to `max_tokens` (special tokens included).
    pub fn with_truncation(mut self, max_tokens: usize) -> Result<Self> {
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(Error::tokenizer)?;
        Ok(self)
    }

    /// Encodes text. Special-token strings in the text are recognised as special tokens (as
    /// llama.cpp's `special=true`); `add_special_tokens` runs the post-processor (BOS, CLS/SEP).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(Error::tokenizer)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes two texts as one input, as a cross-encoder reads a pair: the post-processor's
    /// pair template (BERT's `[CLS] a [SEP] b [SEP]`, XLM-RoBERTa's `<s> a </s></s> b </s>`),
    /// truncated as one input with the longer text cut first (transformers' default). Returns
    /// the ids and where the second text's tokens start (token type 1 from there; the length
    /// where the template gives no second type).
    pub fn encode_pair(&self, a: &str, b: &str) -> Result<(Vec<u32>, usize)> {
        let enc = self.inner.encode((a, b), true).map_err(Error::tokenizer)?;
        let types = enc.get_type_ids();
        let second = types.iter().position(|&t| t == 1).unwrap_or(types.len());
        Ok((enc.get_ids().to_vec(), second))
    }

    /// Decodes ids to text, dropping special tokens when asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(Error::tokenizer)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of one token on its own (for logprobs), special tokens included.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The bytes a token stands for, where its text alone is not whole UTF-8: a byte-level
    /// BPE token (GPT-2's alphabet of 256 characters, one per byte) or a byte-fallback token
    /// (`<0xE6>`). `None` for other vocabularies and special tokens.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(id)?;
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
            && hex.len() == 2
        {
            return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
        }
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        if !byte_level {
            return None;
        }
        token.chars().map(byte_of_char).collect()
    }
}

/// Each token to its id (its index).
fn vocab_of(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// The GGUF's control tokens as special tokens, and its user-defined ones as added tokens,
/// both matched whole in the text before the model's own splitting (llama.cpp's
/// `tokenizer_st_partition`).
fn add_gguf_special_tokens(inner: &mut Tokenizer, v: &GgufVocab) -> Result<()> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (tok, ty) in v.tokens.iter().zip(v.token_types.iter()) {
        match *ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(tok.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(tok.clone(), false)),
            _ => {}
        }
    }
    inner
        .add_special_tokens(special)
        .map_err(Error::tokenizer)?;
    inner.add_tokens(user).map_err(Error::tokenizer)?;
    Ok(())
}

/// A SentencePiece vocabulary's merges, as transformers' `SentencePieceExtractor` derives
/// them: for each piece in id order, every split into two pieces of the vocabulary (ordered
/// by their ids), then all of them ranked by the whole piece's score, highest first (a
/// stable sort, so ties keep that order).
fn spm_merges(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(u32, u32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*vocab.get(l)?, *vocab.get(r)?))
            })
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

/// The byte that GPT-2's byte-level alphabet writes as `c`: printable bytes as themselves,
/// the others (0–32, 127–160, 173) as U+0100 onwards in order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let n = c as u32;
    if n < 256 {
        return printable(n).then_some(n as u8);
    }
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth((n - 256) as usize)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's defaults where a GGUF does not say (`llama-vocab.cpp`: SentencePiece
    /// and the Llama 3 and Tekken pre-tokenizers set `add_bos`, other byte-level ones not).
    #[test]
    fn a_vocabulary_without_add_bos_token_takes_llama_cpp_s_default() {
        assert!(adds_bos_by_default("llama", "default"));
        assert!(adds_bos_by_default("gpt2", "llama-bpe"));
        assert!(adds_bos_by_default("gpt2", "tekken"));
        assert!(!adds_bos_by_default("gpt2", "smollm"));
        assert!(!adds_bos_by_default("gpt2", "default"));
        assert!(!adds_bos_by_default("", ""));
    }

    /// A small SentencePiece vocabulary: merges ranked by the merged piece's score, byte
    /// fallback for what the vocabulary lacks, `▁` for spaces with one before the text and
    /// after a special token, and decoding back.
    #[test]
    fn a_sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes() {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        let words = ["▁", "a", "b", "c", "ab", "bc", "▁a", "▁ab", "▁abc"];
        tokens.extend(words.map(String::from));
        types.extend([1; 9]);
        let mut scores = vec![0f32; tokens.len()];
        let at = |w: &str, tokens: &[String]| tokens.iter().position(|t| t == w).unwrap();
        // "bc" outranks "ab": "abc" alone splits a|bc, not ab|c.
        for (w, sc) in [
            ("ab", -5.0),
            ("bc", -2.0),
            ("▁a", -3.0),
            ("▁ab", -4.0),
            ("▁abc", -1.0),
        ] {
            scores[at(w, &tokens)] = sc;
        }
        for w in ["▁", "a", "b", "c"] {
            scores[at(w, &tokens)] = -10.0;
        }
        let merges = spm_merges(&tokens, &scores, &vocab_of(&tokens));
        let pair = |l: &str, r: &str| (l.to_owned(), r.to_owned());
        // "▁abc" splits as ▁a|bc and ▁ab|c (in id order; "abc" is no piece), then "bc",
        // "▁a", "▁ab" (two ways) and "ab" by score.
        assert_eq!(
            merges,
            [
                pair("▁a", "bc"),
                pair("▁ab", "c"),
                pair("b", "c"),
                pair("▁", "a"),
                pair("▁", "ab"),
                pair("▁a", "b"),
                pair("a", "b"),
            ]
        );
        let tok = TextTokenizer::from_gguf_vocab(GgufVocab {
            model: "llama".into(),
            pre: "default".into(),
            tokens: tokens.clone(),
            token_types: types,
            merges: Vec::new(),
            scores,
            add_space_prefix: true,
        })
        .unwrap();
        let ids = |s: &[&str]| s.iter().map(|w| at(w, &tokens) as u32).collect::<Vec<_>>();
        assert_eq!(tok.encode("abc", false).unwrap(), ids(&["▁abc"]));
        assert_eq!(
            tok.encode("abc abc", false).unwrap(),
            ids(&["▁abc", "▁abc"])
        );
        // "é" is not in the vocabulary: its two UTF-8 bytes.
        assert_eq!(
            tok.encode("é", false).unwrap(),
            ids(&["▁", "<0xC3>", "<0xA9>"])
        );
        // A special token splits the text, and the text after it gets its own `▁`.
        assert_eq!(tok.encode("<s>abc", false).unwrap(), ids(&["<s>", "▁abc"]));
        assert_eq!(
            tok.decode(&ids(&["▁abc", "▁a", "<0xC3>", "<0xA9>"]), true)
                .unwrap(),
            "abc aé"
        );
        assert_eq!(
            tok.token_bytes(at("<0xC3>", &tokens) as u32),
            Some(vec![0xC3])
        );
        let no_scores = GgufVocab {
            model: "llama".into(),
            pre: "default".into(),
            tokens: tokens.clone(),
            token_types: vec![1; tokens.len()],
            merges: Vec::new(),
            scores: Vec::new(),
            add_space_prefix: true,
        };
        let err = TextTokenizer::from_gguf_vocab(no_scores)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.ggml.scores"), "{err}");
    }

    #[test]
    fn gpt2_s_byte_alphabet_maps_back_to_bytes() {
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('\u{100}'), Some(0));
        assert_eq!(byte_of_char('ÿ'), Some(0xff));
        assert_eq!(byte_of_char('\u{143}'), Some(0xad), "the last: 173");
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(byte_of_char(' '), None, "a space is not in the alphabet");
        // Every byte has one character, and back.
        let mut seen = [false; 256];
        for c in (0u32..0x200).filter_map(char::from_u32) {
            if let Some(b) = byte_of_char(c) {
                assert!(!seen[b as usize], "{c:?}");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
