//! Mistral's Tekken vocabulary as a GGUF carries it, shared by `runtime_models` and
//! `runtime_server` (included with `#[path]`): mistral-common's `tekken_240718.json`
//! (Mistral NeMo's 131,072 tokens) written the way llama.cpp's converter writes it from the
//! model's tokenizer.json (the 1,000 control tokens, then the tiktoken ranks as byte-level
//! strings, with the merges transformers derives from the ranks).

use std::collections::HashMap;

use base64::Engine;
use candle_core::quantized::gguf_file::Value as V;
use kandle_tests::models;

/// The vocabulary: its tiktoken ranks and pattern (what mistral-common runs), its control
/// tokens, and its `tokenizer.ggml.*` metadata.
#[allow(dead_code)] // `runtime_server` needs the metadata alone.
pub struct Tekken {
    pub ranks: Vec<Vec<u8>>,
    pub pattern: String,
    /// The control tokens, ids 0 to 999, before the ranks.
    pub controls: Vec<String>,
    /// `tokenizer.ggml.model`, `pre`, `tokens`, `token_type`, `merges`, `bos_token_id`
    /// and `eos_token_id`; no `add_bos_token`, as llama.cpp's default for Tekken decides it.
    pub meta: Vec<(String, V)>,
}

/// mistral-common's names for the first control tokens (its `DEPRECATED_SPECIAL_TOKENS`,
/// what a v3 Tekken file without a list of its own has); the rest are `<SPECIAL_{id}>`.
const NAMED: [&str; 20] = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
];

/// GPT-2's map of bytes to the characters a byte-level vocabulary writes them as.
fn bytes_to_unicode() -> Vec<char> {
    let kept = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut shifted = 256;
    (0..256u32)
        .map(|b| match kept(b) {
            true => char::from_u32(b).unwrap(),
            false => {
                shifted += 1;
                char::from_u32(shifted - 1).unwrap()
            }
        })
        .collect()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A tiktoken vocabulary's `tokenizer.ggml.*` metadata as llama.cpp's converter writes it from
/// the model's tokenizer.json: the control tokens `before` (ids from 0), the ranks as byte-level
/// strings, the control tokens `after`; the merges transformers' `TikTokenConverter` derives
/// from the ranks; the pre-tokenizer `pre`; the `(bos, eos)` ids; no `add_bos_token`.
pub fn byte_level_vocabulary(
    before: &[String],
    ranks: &[Vec<u8>],
    after: &[String],
    pre: &str,
    (bos, eos): (u32, u32),
) -> Vec<(String, V)> {
    let encoder: HashMap<&[u8], u32> = (ranks.iter().enumerate())
        .map(|(r, b)| (b.as_slice(), r as u32))
        .collect();
    let chars = bytes_to_unicode();
    let text_of = |b: &[u8]| -> String { b.iter().map(|&x| chars[x as usize]).collect() };
    let tokens: Vec<V> = (before.iter().cloned())
        .chain(ranks.iter().map(|b| text_of(b)))
        .chain(after.iter().cloned())
        .map(V::String)
        .collect();
    let is_rank = |i: usize| i >= before.len() && i < before.len() + ranks.len();
    let types: Vec<V> = (0..tokens.len())
        .map(|i| V::I32(if is_rank(i) { 1 } else { 3 }))
        .collect();
    // transformers' `TikTokenConverter`: each token's splits into two tokens, by their ranks,
    // the tokens in rank order.
    let mut merges = Vec::new();
    for b in ranks {
        let mut local: Vec<(u32, u32)> = (1..b.len())
            .filter_map(|i| Some((*encoder.get(&b[..i])?, *encoder.get(&b[i..])?)))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| {
            let (l, r) = (&ranks[l as usize], &ranks[r as usize]);
            V::String(format!("{} {}", text_of(l), text_of(r)))
        }));
    }
    vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(eos)),
    ]
}

/// Mistral NeMo's Tekken vocabulary, fetched with mistral-common on first use.
pub fn tekken() -> Tekken {
    let tekken = json(&models::mistral_tekken_json());
    let config = &tekken["config"];
    let specials = config["default_num_special_tokens"].as_u64().unwrap() as usize;
    let size = config["default_vocab_size"].as_u64().unwrap() as usize;
    let ranks: Vec<Vec<u8>> = tekken["vocab"].as_array().unwrap()[..size - specials]
        .iter()
        .map(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t["token_bytes"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let controls: Vec<String> = (0..specials)
        .map(|i| {
            NAMED
                .get(i)
                .map_or(format!("<SPECIAL_{i}>"), |n| n.to_string())
        })
        .collect();
    let meta = byte_level_vocabulary(&controls, &ranks, &[], "tekken", (1, 2));
    Tekken {
        ranks,
        pattern: config["pattern"].as_str().unwrap().to_owned(),
        controls,
        meta,
    }
}
