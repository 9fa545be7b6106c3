//! Reasoning models' thoughts apart from their answer: vLLM's `--reasoning-parser`.
//!
//! DeepSeek-R1 and its distillations (DeepSeek-R1-Distill-Llama-8B/70B, llama-architecture
//! GGUFs among them) think before they answer: `…thoughts…</think>answer`, their chat template
//! having opened the `<think>` (older ones have the model write it). With `--reasoning-parser
//! deepseek_r1` a chat answer's thoughts go to `message.reasoning_content` (DeepSeek's own
//! API's field, which many clients read) and `message.reasoning` (vLLM's since 0.11, which
//! dropped the other), with the same text, and the rest to `content`; streamed, to the
//! deltas' two fields, then `delta.content`. As vLLM's parser: an answer that never
//! closes its thoughts (cut by `max_tokens`) is all reasoning, with `content` null. One
//! deliberate difference: a `<think>` is dropped only at the very start of the answer (vLLM
//! drops everything up to the first one anywhere), so that what streams as reasoning before
//! it is never taken back.
//!
//! Where the prompt itself closes the thoughts (it ends with `</think>`, as Qwen3's template
//! writes it with `enable_thinking: false`), the answer is all content.
//!
//! Constrained answers (`response_format`, vLLM's `guided_*`) think first too: the mask
//! leaves the thoughts free and applies after `</think>`
//! ([`crate::json_mode::Constraint::AfterThoughts`]), as vLLM applies structured outputs once
//! the reasoning has ended. Tool calls likewise: the thoughts go to `reasoning_content`, and
//! the calls (forced, or `auto` in the model's format) are read from the content after them,
//! their masks applying from `</think>` on, as vLLM reads them. An answer whose thoughts
//! never close holds no call.
//!
//! Pure text functions; the server applies them to chat answers.

/// The `--reasoning-parser` choices (vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReasoningParser {
    /// `<think>…</think>` then the answer (DeepSeek-R1 and its distillations, QwQ).
    #[value(name = "deepseek_r1")]
    DeepSeekR1,
}

const START: &str = "<think>";
const END: &str = "</think>";

/// Whether a rendered chat prompt has already closed the answer's thoughts (it ends with
/// `</think>` and whitespace): the answer is then all content.
pub fn thoughts_closed(prompt: &str) -> bool {
    prompt.trim_end().ends_with(END)
}

/// The parts of an answer so far: its reasoning and its content, each possibly partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts<'a> {
    pub reasoning: &'a str,
    /// `None` until the thoughts are closed.
    pub content: Option<&'a str>,
}

/// Splits `text`, the answer so far (`done`: all of it). Before the end, what may still
/// become a `<think>` at the start or the closing `</think>` is held back.
pub fn split(text: &str, done: bool) -> Parts<'_> {
    let body = match text.strip_prefix(START) {
        Some(rest) => rest,
        None if !done && START.starts_with(text) => "",
        None => text,
    };
    match body.find(END) {
        Some(at) => Parts {
            reasoning: &body[..at],
            content: Some(&body[at + END.len()..]),
        },
        None if done => Parts {
            reasoning: body,
            content: None,
        },
        None => {
            let hold = (1..END.len())
                .rev()
                .find(|&n| body.ends_with(&END[..n]))
                .unwrap_or(0);
            Parts {
                reasoning: &body[..body.len() - hold],
                content: None,
            }
        }
    }
}

/// One streamed answer's split: what each call adds to the reasoning and to the content.
#[derive(Debug, Default)]
pub struct Stream {
    text: String,
    reasoning_sent: usize,
    content_sent: usize,
    closed: bool,
}

impl Stream {
    /// Takes the answer's next `delta` (`done`: its end) and returns the new reasoning and
    /// the new content, each possibly empty.
    pub fn push(&mut self, delta: &str, done: bool) -> (String, String) {
        self.text.push_str(delta);
        let parts = split(&self.text, done);
        let reasoning =
            parts.reasoning[self.reasoning_sent.min(parts.reasoning.len())..].to_owned();
        self.reasoning_sent = self.reasoning_sent.max(parts.reasoning.len());
        self.closed |= parts.content.is_some();
        let content = parts.content.unwrap_or("");
        let new_content = content[self.content_sent.min(content.len())..].to_owned();
        self.content_sent = self.content_sent.max(content.len());
        (reasoning, new_content)
    }

    /// Whether the thoughts are closed: what follows is the answer's content.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_answer_splits_at_the_closing_tag() {
        let p = split("Let me see. 2+2=4.</think>\n\nIt is 4.", true);
        assert_eq!(p.reasoning, "Let me see. 2+2=4.");
        assert_eq!(p.content, Some("\n\nIt is 4."));
        let p = split("<think>hmm</think>yes", true);
        assert_eq!((p.reasoning, p.content), ("hmm", Some("yes")));
        // Never closed (cut short): all reasoning.
        let p = split("still thinking", true);
        assert_eq!((p.reasoning, p.content), ("still thinking", None));
        // A <think> past the start is text.
        let p = split("a<think>b</think>c", true);
        assert_eq!((p.reasoning, p.content), ("a<think>b", Some("c")));
    }

    #[test]
    fn a_prompt_that_ends_with_the_closing_tag_has_closed_the_thoughts() {
        assert!(thoughts_closed(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!thoughts_closed("<|im_start|>assistant\n<think>\n"));
        // A closed tag earlier in the conversation (a past answer) leaves this one's open.
        assert!(!thoughts_closed("a</think>b<|im_start|>assistant\n"));
    }

    #[test]
    fn what_may_become_a_tag_waits() {
        assert_eq!(split("<thi", false).reasoning, "");
        assert_eq!(split("<thi", true).reasoning, "<thi");
        assert_eq!(split("so</thi", false).reasoning, "so");
        assert_eq!(split("so</thi", true).reasoning, "so</thi");
        assert_eq!(split("a<", false).reasoning, "a");
        assert_eq!(split("a<b", false).reasoning, "a<b");
    }

    /// Every way of cutting the answer into deltas streams the same parts as the whole.
    #[test]
    fn a_stream_in_any_pieces_adds_up_to_the_whole_split() {
        for text in [
            "<think>Let me see.</think>It is 4.",
            "x</think>",
            "thinking <b> </thin and on",
            "</think></think>",
            "<think></think>",
            "ab",
        ] {
            let whole = split(text, true);
            for cut in 0..=text.len() {
                for cut2 in cut..=text.len() {
                    if !text.is_char_boundary(cut) || !text.is_char_boundary(cut2) {
                        continue;
                    }
                    let mut s = Stream::default();
                    let (mut r, mut c) = (String::new(), String::new());
                    for (piece, done) in [
                        (&text[..cut], false),
                        (&text[cut..cut2], false),
                        (&text[cut2..], false),
                        ("", true),
                    ] {
                        let (dr, dc) = s.push(piece, done);
                        r.push_str(&dr);
                        c.push_str(&dc);
                    }
                    assert_eq!(r, whole.reasoning, "{text:?} cut at {cut}, {cut2}");
                    assert_eq!(s.closed(), whole.content.is_some());
                    assert_eq!(
                        c,
                        whole.content.unwrap_or(""),
                        "{text:?} cut at {cut}, {cut2}"
                    );
                }
            }
        }
    }
}
