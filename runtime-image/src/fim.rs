//! Fill-in-the-middle: a completions request's `suffix` (OpenAI's insertion), for code models
//! whose vocabulary has FIM tokens, the prompt being the code before the gap and the answer
//! the code that fills it. The format follows the vocabulary, found by its tokens' names as
//! llama.cpp finds them where a GGUF does not declare them:
//! - Mistral's (Codestral): `[SUFFIX]` and `[PREFIX]` control tokens, suffix first, as
//!   mistral-common's `encode_fim` (and vLLM's `suffix` with a Mistral tokenizer):
//!   `<s>[SUFFIX]suffix[PREFIX]prompt`, the suffix encoded as mistral-common does (after a
//!   `☺` whose two tokens are dropped, so that a SentencePiece vocabulary adds no space before
//!   it);
//! - prefix first (PSM), the text `{pre}prompt{suf}suffix{mid}` encoded as the model's own
//!   examples encode it: Qwen2.5-Coder's `<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>`;
//!   StarCoder's `<fim_prefix>`, `<fim_suffix>`, `<fim_middle>`; DeepSeek-Coder's
//!   `<｜fim▁begin｜>`, `<｜fim▁hole｜>`, `<｜fim▁end｜>`.
//!
//! A vocabulary with none of these refuses `suffix` by name.

/// A vocabulary's fill-in-the-middle format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fim {
    /// Mistral's: suffix first, between control tokens.
    Mistral { suffix: u32, prefix: u32 },
    /// Prefix, suffix, middle markers as text.
    Psm {
        pre: &'static str,
        suf: &'static str,
        mid: &'static str,
    },
}

/// The prefix-first marker sets, by model family.
const PSM: [(&str, &str, &str); 3] = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
];

/// The text mistral-common puts before a suffix and drops again (two tokens).
pub const MISTRAL_SUFFIX_LEAD: &str = "☺";

impl Fim {
    /// The format of a vocabulary (`token_id` finds a token's id by its text), if any.
    pub fn detect(token_id: impl Fn(&str) -> Option<u32>) -> Option<Fim> {
        if let (Some(suffix), Some(prefix)) = (token_id("[SUFFIX]"), token_id("[PREFIX]")) {
            return Some(Fim::Mistral { suffix, prefix });
        }
        PSM.iter()
            .find(|(p, s, m)| [p, s, m].iter().all(|t| token_id(t).is_some()))
            .map(|&(pre, suf, mid)| Fim::Psm { pre, suf, mid })
    }

    /// The prompt's ids: `bos` (the beginning of text the model's prompts start with, if
    /// any), then the format's markers around the prompt and suffix; `encode` tokenises text
    /// without adding special tokens, recognising special-token strings in it.
    pub fn prompt<E>(
        &self,
        bos: &[u32],
        prompt: &str,
        suffix: &str,
        encode: impl Fn(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Vec<u32>, E> {
        let mut ids = bos.to_vec();
        match *self {
            Fim::Mistral {
                suffix: suf,
                prefix: pre,
            } => {
                ids.push(suf);
                if !suffix.is_empty() {
                    let lead = encode(&format!("{MISTRAL_SUFFIX_LEAD}{suffix}"))?;
                    ids.extend(lead.into_iter().skip(2));
                }
                ids.push(pre);
                ids.extend(encode(prompt)?);
            }
            Fim::Psm { pre, suf, mid } => {
                ids.extend(encode(&format!("{pre}{prompt}{suf}{suffix}{mid}"))?);
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(names: &[&str]) -> impl Fn(&str) -> Option<u32> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        move |t| names.iter().position(|n| n == t).map(|i| i as u32)
    }

    #[test]
    fn the_format_follows_the_vocabulary() {
        assert_eq!(
            Fim::detect(vocab(&["<s>", "[PREFIX]", "[SUFFIX]"])),
            Some(Fim::Mistral {
                suffix: 2,
                prefix: 1
            })
        );
        let qwen = vocab(&["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]);
        assert_eq!(
            Fim::detect(qwen),
            Some(Fim::Psm {
                pre: "<|fim_prefix|>",
                suf: "<|fim_suffix|>",
                mid: "<|fim_middle|>"
            })
        );
        // All three markers, or none.
        assert_eq!(Fim::detect(vocab(&["<fim_prefix>", "<fim_suffix>"])), None);
        assert_eq!(Fim::detect(vocab(&["<|im_start|>"])), None);
    }

    /// A tokenizer of one id per character, so that the layout shows.
    fn chars(text: &str) -> Result<Vec<u32>, ()> {
        Ok(text.chars().map(|c| c as u32).collect())
    }

    #[test]
    fn mistral_puts_the_suffix_first_and_psm_the_prefix() {
        let m = Fim::Mistral {
            suffix: 15,
            prefix: 14,
        };
        // The lead character is one "token" here, so its drop of two takes the suffix's
        // first: what mistral-common's would do with such a tokenizer.
        assert_eq!(
            m.prompt(&[1], "ab", "xyz", chars).unwrap(),
            [1, 15, 'y' as u32, 'z' as u32, 14, 'a' as u32, 'b' as u32]
        );
        assert_eq!(
            m.prompt(&[1], "ab", "", chars).unwrap(),
            [1, 15, 14, 'a' as u32, 'b' as u32]
        );
        let p = Fim::Psm {
            pre: "<P>",
            suf: "<S>",
            mid: "<M>",
        };
        let text: String = p
            .prompt(&[], "ab", "xy", chars)
            .unwrap()
            .into_iter()
            .map(|c| char::from_u32(c).unwrap())
            .collect();
        assert_eq!(text, "<P>ab<S>xy<M>");
    }
}
