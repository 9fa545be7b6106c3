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
//! Mistral's reasoning models (Magistral) think between two control tokens, `[THINK]` and
//! `[/THINK]`, when their system prompt asks them to. With `--reasoning-parser mistral`, as
//! vLLM's parser of that name: the thoughts are what lies between them, and the content the
//! text before `[THINK]` (which a well-prompted model leaves empty) and after `[/THINK]`; an
//! answer with no `[THINK]` is all content (a stray `[/THINK]` dropped) with no reasoning, and
//! one whose thoughts never close has the text before them as content. The control tokens'
//! text is kept in the answer for this (`skip_special_tokens` does not drop them), and a
//! constrained answer may open with `[THINK]` or go straight to what the constraint allows
//! ([`crate::json_mode::Thoughts::Tokens`]).
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

use std::borrow::Cow;

/// The `--reasoning-parser` choices (vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReasoningParser {
    /// `<think>…</think>` then the answer (DeepSeek-R1 and its distillations, QwQ, Qwen3:
    /// `qwen3`, vLLM's name for Qwen3's, is taken for this one, as Qwen3's hybrid models
    /// always write the two tags, empty when not thinking, and a template that turns the
    /// thinking off closes them in the prompt).
    #[value(name = "deepseek_r1", alias = "qwen3")]
    DeepSeekR1,
    /// `[THINK]…[/THINK]`, control tokens, around the thoughts (Magistral).
    #[value(name = "mistral")]
    Mistral,
}

impl ReasoningParser {
    /// The flag's value.
    pub fn name(self) -> &'static str {
        match self {
            ReasoningParser::DeepSeekR1 => "deepseek_r1",
            ReasoningParser::Mistral => "mistral",
        }
    }

    /// The texts that open and close the thoughts.
    pub fn tags(self) -> (&'static str, &'static str) {
        match self {
            ReasoningParser::DeepSeekR1 => ("<think>", "</think>"),
            ReasoningParser::Mistral => ("[THINK]", "[/THINK]"),
        }
    }

    /// How the constraint masks tell the thoughts apart: `None` where the vocabulary lacks
    /// Mistral's control tokens (`token_id` finds a control token's id).
    pub fn thoughts(
        self,
        token_id: impl Fn(&str) -> Option<u32>,
    ) -> Option<crate::json_mode::Thoughts> {
        match self {
            ReasoningParser::DeepSeekR1 => Some(crate::json_mode::Thoughts::Tag),
            ReasoningParser::Mistral => {
                let (start, end) = self.tags();
                Some(crate::json_mode::Thoughts::Tokens {
                    start: token_id(start)?,
                    end: token_id(end)?,
                })
            }
        }
    }

    /// Whether a rendered chat prompt has already closed the answer's thoughts (it ends with
    /// the closing tag and whitespace): the answer is then all content.
    pub fn thoughts_closed(self, prompt: &str) -> bool {
        prompt.trim_end().ends_with(self.tags().1)
    }

    /// Splits `text`, the answer so far (`done`: all of it). Before the end, what may still
    /// become a tag is held back.
    pub fn split(self, text: &str, done: bool) -> Parts<'_> {
        match self {
            ReasoningParser::DeepSeekR1 => split_r1(text, done),
            ReasoningParser::Mistral => split_mistral(text, done),
        }
    }
}

/// The parts of an answer so far: its reasoning and its content, each possibly partial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts<'a> {
    /// `None` where the answer has no thoughts (Mistral's without `[THINK]`).
    pub reasoning: Option<&'a str>,
    /// `None` while the thoughts are open and no content came before them.
    pub content: Option<Cow<'a, str>>,
    /// The thoughts are open: what comes next is reasoning, not content.
    pub open: bool,
}

/// The length of the longest end of `text` that begins `tag` (and is not all of it): what
/// may become the tag as the answer goes on.
fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// DeepSeek-R1's: the thoughts run from the start (a `<think>` there dropped) to `</think>`.
fn split_r1(text: &str, done: bool) -> Parts<'_> {
    let (start, end) = ReasoningParser::DeepSeekR1.tags();
    let body = match text.strip_prefix(start) {
        Some(rest) => rest,
        None if !done && start.starts_with(text) => "",
        None => text,
    };
    match body.find(end) {
        Some(at) => Parts {
            reasoning: Some(&body[..at]),
            content: Some(Cow::Borrowed(&body[at + end.len()..])),
            open: false,
        },
        None => Parts {
            reasoning: Some(match done {
                true => body,
                false => &body[..body.len() - partial_tag(body, end)],
            }),
            content: None,
            open: true,
        },
    }
}

/// `text` without any `tag` in it.
fn without<'a>(text: &'a str, tag: &str) -> Cow<'a, str> {
    match text.contains(tag) {
        true => Cow::Owned(text.replace(tag, "")),
        false => Cow::Borrowed(text),
    }
}

/// Mistral's, as vLLM's `mistral` parser: the thoughts lie between the first `[THINK]` and
/// the first `[/THINK]` after it; the content is the text around them. A stray `[/THINK]`
/// before any `[THINK]` is dropped (vLLM drops it only where no `[THINK]` follows; dropping it
/// always keeps what was streamed as content before a `[THINK]` the start of the whole).
fn split_mistral(text: &str, done: bool) -> Parts<'_> {
    let (start, end) = ReasoningParser::Mistral.tags();
    let Some(at) = text.find(start) else {
        // No thoughts: all content.
        let held = match done {
            true => 0,
            false => partial_tag(text, start).max(partial_tag(text, end)),
        };
        return Parts {
            reasoning: None,
            content: Some(without(&text[..text.len() - held], end)),
            open: false,
        };
    };
    let (before, body) = (without(&text[..at], end), &text[at + start.len()..]);
    match body.find(end) {
        Some(to) => {
            let after = &body[to + end.len()..];
            Parts {
                reasoning: Some(&body[..to]),
                content: Some(match before.is_empty() {
                    true => Cow::Borrowed(after),
                    false => Cow::Owned(format!("{before}{after}")),
                }),
                open: false,
            }
        }
        None => Parts {
            reasoning: Some(match done {
                true => body,
                false => &body[..body.len() - partial_tag(body, end)],
            }),
            content: (!before.is_empty()).then_some(before),
            open: true,
        },
    }
}

/// One streamed answer's split: what each call adds to the reasoning and to the content.
#[derive(Debug)]
pub struct Stream {
    parser: ReasoningParser,
    text: String,
    reasoning_sent: usize,
    content_sent: usize,
    closed: bool,
}

impl Stream {
    pub fn new(parser: ReasoningParser) -> Stream {
        Stream {
            parser,
            text: String::new(),
            reasoning_sent: 0,
            content_sent: 0,
            closed: false,
        }
    }

    /// Takes the answer's next `delta` (`done`: its end) and returns the new reasoning and
    /// the new content, each possibly empty.
    pub fn push(&mut self, delta: &str, done: bool) -> (String, String) {
        self.text.push_str(delta);
        let parts = self.parser.split(&self.text, done);
        let reasoning = parts.reasoning.unwrap_or("");
        let new_reasoning = reasoning[self.reasoning_sent.min(reasoning.len())..].to_owned();
        self.reasoning_sent = self.reasoning_sent.max(reasoning.len());
        self.closed = !parts.open;
        let content = parts.content.as_deref().unwrap_or("");
        let new_content = content[self.content_sent.min(content.len())..].to_owned();
        self.content_sent = self.content_sent.max(content.len());
        (new_reasoning, new_content)
    }

    /// Whether the thoughts are closed (or, Mistral's, none are open): what follows is the
    /// answer's content.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: ReasoningParser = ReasoningParser::DeepSeekR1;
    const MISTRAL: ReasoningParser = ReasoningParser::Mistral;

    /// `(reasoning, content)` of a split.
    fn parts(p: ReasoningParser, text: &str, done: bool) -> (Option<&str>, Option<String>) {
        let parts = p.split(text, done);
        (parts.reasoning, parts.content.map(|c| c.into_owned()))
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn a_whole_answer_splits_at_the_closing_tag() {
        assert_eq!(
            parts(R1, "Let me see. 2+2=4.</think>\n\nIt is 4.", true),
            (Some("Let me see. 2+2=4."), some("\n\nIt is 4."))
        );
        assert_eq!(
            parts(R1, "<think>hmm</think>yes", true),
            (Some("hmm"), some("yes"))
        );
        // Never closed (cut short): all reasoning.
        assert_eq!(
            parts(R1, "still thinking", true),
            (Some("still thinking"), None)
        );
        // A <think> past the start is text.
        assert_eq!(
            parts(R1, "a<think>b</think>c", true),
            (Some("a<think>b"), some("c"))
        );
    }

    /// vLLM's `mistral` parser's four cases.
    #[test]
    fn mistral_s_thoughts_lie_between_its_control_tokens() {
        assert_eq!(
            parts(MISTRAL, "[THINK]2+2=4.[/THINK]It is 4.", true),
            (Some("2+2=4."), some("It is 4."))
        );
        // Text before the thoughts is content, with the text after them.
        assert_eq!(
            parts(MISTRAL, "So [THINK]hmm[/THINK]yes", true),
            (Some("hmm"), some("So yes"))
        );
        // Nothing after them: no content.
        assert_eq!(
            parts(MISTRAL, "[THINK]hmm[/THINK]", true),
            (Some("hmm"), some(""))
        );
        // Never closed: all reasoning, the text before them content.
        assert_eq!(parts(MISTRAL, "[THINK]hmm", true), (Some("hmm"), None));
        assert_eq!(
            parts(MISTRAL, "a[THINK]hmm", true),
            (Some("hmm"), some("a"))
        );
        // No thoughts: all content, a stray closing tag dropped.
        assert_eq!(parts(MISTRAL, "It is 4.", true), (None, some("It is 4.")));
        assert_eq!(parts(MISTRAL, "a[/THINK]b", true), (None, some("ab")));
        // Only the first thoughts are thoughts.
        assert_eq!(
            parts(MISTRAL, "[THINK]a[/THINK]b[THINK]c[/THINK]", true),
            (Some("a"), some("b[THINK]c[/THINK]"))
        );
    }

    #[test]
    fn a_prompt_that_ends_with_the_closing_tag_has_closed_the_thoughts() {
        assert!(R1.thoughts_closed("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!R1.thoughts_closed("<|im_start|>assistant\n<think>\n"));
        // A closed tag earlier in the conversation (a past answer) leaves this one's open.
        assert!(!R1.thoughts_closed("a</think>b<|im_start|>assistant\n"));
        assert!(MISTRAL.thoughts_closed("[INST]hi[/INST][THINK]x[/THINK]"));
        assert!(!MISTRAL.thoughts_closed("[INST]hi[/INST]"));
    }

    #[test]
    fn what_may_become_a_tag_waits() {
        let reasoning = |p: ReasoningParser, text, done| p.split(text, done).reasoning;
        assert_eq!(reasoning(R1, "<thi", false), Some(""));
        assert_eq!(reasoning(R1, "<thi", true), Some("<thi"));
        assert_eq!(reasoning(R1, "so</thi", false), Some("so"));
        assert_eq!(reasoning(R1, "so</thi", true), Some("so</thi"));
        assert_eq!(reasoning(R1, "a<", false), Some("a"));
        assert_eq!(reasoning(R1, "a<b", false), Some("a<b"));
        assert_eq!(parts(MISTRAL, "a[TH", false), (None, some("a")));
        assert_eq!(parts(MISTRAL, "a[TH", true), (None, some("a[TH")));
        assert_eq!(parts(MISTRAL, "a[/TH", false), (None, some("a")));
        assert_eq!(parts(MISTRAL, "[THINK]so[/THI", false), (Some("so"), None));
    }

    /// Every way of cutting the answer into deltas streams the same parts as the whole.
    #[test]
    fn a_stream_in_any_pieces_adds_up_to_the_whole_split() {
        let cases = [
            (R1, "<think>Let me see.</think>It is 4."),
            (R1, "x</think>"),
            (R1, "thinking <b> </thin and on"),
            (R1, "</think></think>"),
            (R1, "<think></think>"),
            (R1, "ab"),
            (MISTRAL, "[THINK]Let me see.[/THINK]It is 4."),
            (MISTRAL, "So [THINK]hmm[/THINK] yes"),
            (MISTRAL, "a[/THINK]b[TH"),
            (MISTRAL, "[THINK]never [/THI"),
            (MISTRAL, "x[THINK]y"),
            (MISTRAL, "[THINK]a[/THINK]b[THINK]c"),
            (MISTRAL, "a[/THINK]b[THINK]c[/THINK]d"),
        ];
        for (parser, text) in cases {
            let whole = parser.split(text, true);
            for cut in 0..=text.len() {
                for cut2 in cut..=text.len() {
                    if !text.is_char_boundary(cut) || !text.is_char_boundary(cut2) {
                        continue;
                    }
                    let mut s = Stream::new(parser);
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
                    let at = format!("{text:?} cut at {cut}, {cut2}");
                    assert_eq!(r, whole.reasoning.unwrap_or(""), "{at}");
                    assert_eq!(c, whole.content.as_deref().unwrap_or(""), "{at}");
                    assert_eq!(s.closed(), !whole.open, "{at}");
                    if parser == R1 {
                        assert_eq!(s.closed(), whole.content.is_some(), "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn mistral_s_content_follows_until_thoughts_open_and_after_they_close() {
        let mut s = Stream::new(MISTRAL);
        s.push("So ", false);
        assert!(s.closed());
        s.push("[THINK]hmm", false);
        assert!(!s.closed());
        s.push("[/THINK]yes", false);
        assert!(s.closed());
    }
}
