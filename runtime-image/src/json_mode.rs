//! JSON mode (`response_format: {"type": "json_object"}`): the answer is one JSON object.
//!
//! A pushdown automaton over characters ([`JsonState`]) follows the text generated so far;
//! before each token is sampled, every token whose text the automaton would refuse next is
//! masked out of the logits ([`JsonMode::mask`]), as vLLM's and TGI's guided decoding do. The
//! object's closing brace ends the answer (`finish_reason: "stop"`); end-of-text tokens and
//! tokens with no text (special tokens) are never allowed before it.
//!
//! Decisions, where OpenAI's JSON mode says nothing:
//! - The top-level value is an object (OpenAI's JSON mode promises "a valid JSON object").
//! - At most [`MAX_WHITESPACE`] whitespace characters in a row, and nesting at most
//!   [`MAX_DEPTH`] deep: a model that would otherwise emit newlines forever is made to go on.
//! - A token's text is what it adds after an ordinary token ([`token_texts`]): a
//!   SentencePiece piece's leading space counts, as it does in the decoded answer. A token
//!   that holds part of a UTF-8 character (byte-level BPE, byte fallback) is read as its
//!   bytes ([`JsonVocab::with_bytes`]): a character begun must be finished by the next
//!   tokens before anything else, and may begin only where a character starting so may go
//!   (a string; under a schema, an enum value, key or pattern that has one), so no answer
//!   that ends by itself holds a half-written character. Where the tokenizer does not say a
//!   token's bytes, it is read as U+FFFD, which only a string may hold.
//! - An answer cut by `max_tokens` (`finish_reason: "length"`) is not complete JSON, as in
//!   OpenAI's API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use regex_automata::util::primitives::StateID;

use crate::grammar::{ByteTrie, Grammar, GrammarState, mask_grammar};
use crate::json_schema::{Schema, SchemaState, TextPattern};

/// Whitespace characters allowed in a row.
pub const MAX_WHITESPACE: u8 = 32;
/// Objects and arrays open at once, at most.
pub const MAX_DEPTH: usize = 64;

/// An open container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Object,
    Array,
}

/// Where in a number the last character left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

/// What the automaton expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object: whitespace, then `{`.
    Start,
    /// A value (after `:`, or after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value in a container: `,` or the container's end.
    CommaOrEnd,
    /// Inside a string (`key`: an object's key); `escape`: after a backslash (0), or the hex
    /// digits of a `\u` still to come (1–4); `None`: plain characters.
    Str {
        key: bool,
        escape: Option<u8>,
    },
    Number(Num),
    /// Inside `true`, `false` or `null`: the characters still to come.
    Literal(&'static [u8]),
    /// The top-level object is closed: only whitespace may follow.
    Done,
}

/// The containers of a [`JsonState`], or of a trial run on top of them ([`Overlay`]).
trait Stack {
    fn top(&self) -> Option<Frame>;
    fn push(&mut self, f: Frame) -> bool;
    fn pop(&mut self) -> Option<Frame>;
}

impl Stack for Vec<Frame> {
    fn top(&self) -> Option<Frame> {
        self.last().copied()
    }
    fn push(&mut self, f: Frame) -> bool {
        if self.len() >= MAX_DEPTH {
            return false;
        }
        Vec::push(self, f);
        true
    }
    fn pop(&mut self) -> Option<Frame> {
        Vec::pop(self)
    }
}

/// A trial of a token's text: the state's containers, read-only, with what the text closes
/// taken off and what it opens (a few) put on, so that no token's trial allocates.
struct Overlay<'a> {
    base: &'a [Frame],
    pushed: [Frame; 8],
    n: usize,
}

impl Stack for Overlay<'_> {
    fn top(&self) -> Option<Frame> {
        match self.n {
            0 => self.base.last().copied(),
            n => Some(self.pushed[n - 1]),
        }
    }
    fn push(&mut self, f: Frame) -> bool {
        if self.n == self.pushed.len() || self.base.len() + self.n >= MAX_DEPTH {
            return false;
        }
        self.pushed[self.n] = f;
        self.n += 1;
        true
    }
    fn pop(&mut self) -> Option<Frame> {
        if self.n > 0 {
            self.n -= 1;
            Some(self.pushed[self.n])
        } else {
            let (last, rest) = self.base.split_last()?;
            self.base = rest;
            Some(*last)
        }
    }
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The mode after a value ends: the next item of its container, or done at the top.
fn after_value(stack: &impl Stack) -> Mode {
    match stack.top() {
        None => Mode::Done,
        Some(_) => Mode::CommaOrEnd,
    }
}

/// One character: the next (mode, whitespace run), or `None` when JSON does not allow it.
fn step(mode: Mode, ws: u8, stack: &mut impl Stack, c: char) -> Option<(Mode, u8)> {
    let outside = !matches!(mode, Mode::Str { .. } | Mode::Number(_) | Mode::Literal(_));
    if outside && is_whitespace(c) {
        return (ws < MAX_WHITESPACE).then_some((mode, ws + 1));
    }
    let next = match mode {
        Mode::Done => return None,
        Mode::Start => match c {
            '{' => stack.push(Frame::Object).then_some(Mode::KeyOrEnd)?,
            _ => return None,
        },
        Mode::Value | Mode::ValueOrEnd => match c {
            '{' => stack.push(Frame::Object).then_some(Mode::KeyOrEnd)?,
            '[' => stack.push(Frame::Array).then_some(Mode::ValueOrEnd)?,
            '"' => Mode::Str {
                key: false,
                escape: None,
            },
            '-' => Mode::Number(Num::Minus),
            '0' => Mode::Number(Num::Zero),
            '1'..='9' => Mode::Number(Num::Int),
            't' => Mode::Literal(b"rue"),
            'f' => Mode::Literal(b"alse"),
            'n' => Mode::Literal(b"ull"),
            ']' if mode == Mode::ValueOrEnd => {
                stack.pop();
                after_value(stack)
            }
            _ => return None,
        },
        Mode::KeyOrEnd | Mode::Key => match c {
            '"' => Mode::Str {
                key: true,
                escape: None,
            },
            '}' if mode == Mode::KeyOrEnd => {
                stack.pop();
                after_value(stack)
            }
            _ => return None,
        },
        Mode::Colon => match c {
            ':' => Mode::Value,
            _ => return None,
        },
        Mode::CommaOrEnd => match (c, stack.top()?) {
            (',', Frame::Object) => Mode::Key,
            (',', Frame::Array) => Mode::Value,
            ('}', Frame::Object) | (']', Frame::Array) => {
                stack.pop();
                after_value(stack)
            }
            _ => return None,
        },
        Mode::Str { key, escape } => match (escape, c) {
            (None, '"') if key => Mode::Colon,
            (None, '"') => after_value(stack),
            (None, '\\') => Mode::Str {
                key,
                escape: Some(0),
            },
            (None, c) if (c as u32) < 0x20 => return None,
            (None, _) => mode,
            (Some(0), '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => {
                Mode::Str { key, escape: None }
            }
            (Some(0), 'u') => Mode::Str {
                key,
                escape: Some(4),
            },
            (Some(n @ 1..=4), c) if c.is_ascii_hexdigit() => Mode::Str {
                key,
                escape: (n > 1).then_some(n - 1),
            },
            _ => return None,
        },
        Mode::Number(n) => {
            let digit = c.is_ascii_digit();
            let next = match (n, c) {
                (Num::Minus, '0') => Some(Num::Zero),
                (Num::Minus, _) if digit => Some(Num::Int),
                (Num::Int, _) if digit => Some(Num::Int),
                (Num::Zero | Num::Int, '.') => Some(Num::Dot),
                (Num::Dot | Num::Frac, _) if digit => Some(Num::Frac),
                (Num::Zero | Num::Int | Num::Frac, 'e' | 'E') => Some(Num::E),
                (Num::E, '+' | '-') => Some(Num::ESign),
                (Num::E | Num::ESign | Num::Exp, _) if digit => Some(Num::Exp),
                _ => None,
            };
            match next {
                Some(n) => Mode::Number(n),
                // The number ends; the character belongs to what follows it.
                None if n.complete() => return step(after_value(stack), 0, stack, c),
                None => return None,
            }
        }
        Mode::Literal(rest) => match rest.split_first() {
            Some((&b, rest)) if c == b as char => match rest.is_empty() {
                true => after_value(stack),
                false => Mode::Literal(rest),
            },
            _ => return None,
        },
    };
    Some((next, 0))
}

/// The automaton after the text so far.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonState {
    mode: Mode,
    ws: u8,
    stack: Vec<Frame>,
    /// The first bytes of a character not yet whole ([`JsonState::push_bytes`]).
    pending: Vec<u8>,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState {
            mode: Mode::Start,
            ws: 0,
            stack: Vec::new(),
            pending: Vec::new(),
        }
    }
}

/// `bytes` as whole characters and the first bytes of one more (`None`: not UTF-8, a
/// continuation byte without its lead, say).
pub(crate) fn split_utf8(bytes: &[u8]) -> Option<(&str, &[u8])> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Some((text, &[])),
        Err(e) if e.error_len().is_none() => {
            let (whole, tail) = bytes.split_at(e.valid_up_to());
            Some((std::str::from_utf8(whole).ok()?, tail))
        }
        Err(_) => None,
    }
}

impl JsonState {
    /// Part of a character written (a token of bytes ended inside it).
    pub fn in_partial_char(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes a token's bytes, which may begin or end inside a character (byte-level BPE):
    /// whole characters as [`JsonState::push`] does, a character's first bytes only inside
    /// a string, the one place such a character may go.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> bool {
        let mut buf = self.pending.clone();
        buf.extend_from_slice(bytes);
        let Some((text, tail)) = split_utf8(&buf) else {
            return false;
        };
        let mut trial = JsonState {
            pending: Vec::new(),
            ..self.clone()
        };
        if !(text.is_empty() || trial.push(text)) || !(tail.is_empty() || trial.in_plain_string()) {
            return false;
        }
        trial.pending = tail.to_vec();
        *self = trial;
        true
    }

    /// Whether `text` may come next (the empty text may not: it would change nothing).
    pub fn accepts(&self, text: &str) -> bool {
        if text.is_empty() || self.in_partial_char() {
            return false;
        }
        let mut stack = Overlay {
            base: &self.stack,
            pushed: [Frame::Object; 8],
            n: 0,
        };
        let (mut mode, mut ws) = (self.mode, self.ws);
        for c in text.chars() {
            match step(mode, ws, &mut stack, c) {
                Some((m, w)) => (mode, ws) = (m, w),
                None => return false,
            }
        }
        true
    }

    /// Takes `text`, which [`JsonState::accepts`]; `false` (and the state unchanged) if not.
    pub fn push(&mut self, text: &str) -> bool {
        if !self.accepts(text) {
            return false;
        }
        for c in text.chars() {
            let (m, w) = step(self.mode, self.ws, &mut self.stack, c).expect("accepted");
            (self.mode, self.ws) = (m, w);
        }
        true
    }

    /// Whether the top-level object is closed.
    pub fn complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// An automaton for one value of any kind (a schema's free parts, [`crate::json_schema`]),
    /// done when that value ends.
    pub(crate) fn value() -> JsonState {
        JsonState {
            mode: Mode::Value,
            ws: 0,
            stack: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Takes one character; `false` (and the state unchanged) when JSON does not allow it.
    pub(crate) fn push_char(&mut self, c: char) -> bool {
        let mut stack = self.stack.clone();
        match step(self.mode, self.ws, &mut stack, c) {
            Some((m, w)) => {
                (self.mode, self.ws, self.stack) = (m, w, stack);
                true
            }
            None => false,
        }
    }

    /// Inside a string's plain characters (not an escape).
    pub(crate) fn in_plain_string(&self) -> bool {
        matches!(self.mode, Mode::Str { escape: None, .. })
    }

    /// Inside a number (`may_end`: one that could end here).
    pub(crate) fn in_number(&self) -> Option<bool> {
        match self.mode {
            Mode::Number(n) => Some(n.complete()),
            _ => None,
        }
    }

    /// Nothing but whitespace taken yet.
    pub(crate) fn at_value_start(&self) -> bool {
        self.mode == Mode::Value && self.stack.is_empty()
    }
}

/// Each token's text as JSON mode reads it: what the token adds to the decoded text after an
/// ordinary token (`anchor`), special tokens skipped (so theirs is empty and never allowed).
/// Decoding a SentencePiece piece alone drops its leading space, which the answer has.
pub fn token_texts(
    vocab: usize,
    anchor: u32,
    decode: impl Fn(&[u32]) -> Option<String>,
) -> Vec<String> {
    let before = decode(&[anchor]).unwrap_or_default();
    (0..vocab as u32)
        .map(|id| match decode(&[anchor, id]) {
            Some(both) if both.starts_with(&before) => both[before.len()..].to_owned(),
            _ => decode(&[id]).unwrap_or_default(),
        })
        .collect()
}

/// The vocabulary as JSON mode reads it: each token's text ([`token_texts`]), and whether it
/// is plain string content (no quote, backslash or control character), which a string takes
/// without a character-by-character trial: inside a string, where an answer spends most of
/// its tokens, the mask is then a look-up for all but a few tokens.
#[derive(Debug, Clone, Default)]
pub struct JsonVocab {
    texts: Vec<String>,
    plain: Vec<bool>,
    /// Per character asked for ([`JsonVocab::containing`]), the tokens whose text holds it.
    containing: Arc<Mutex<HashMap<char, Arc<[u32]>>>>,
    /// The end-of-text tokens, which a regex allows where its text is whole.
    eos: Vec<u32>,
    /// The bytes of tokens whose text alone is not whole UTF-8 (read as U+FFFD), where the
    /// tokenizer says them: a regex steps over bytes.
    raw: HashMap<u32, Vec<u8>>,
    /// Per token, whether `raw` holds it (a look-up the mask makes for every token).
    is_raw: Vec<bool>,
    /// [`JsonVocab::trie`], built once.
    trie: std::sync::OnceLock<Arc<ByteTrie>>,
}

impl JsonVocab {
    pub fn new(texts: Vec<String>) -> JsonVocab {
        let plain = texts
            .iter()
            .map(|t| {
                !t.is_empty()
                    && !t
                        .chars()
                        .any(|c| c == '"' || c == '\\' || (c as u32) < 0x20)
            })
            .collect();
        JsonVocab {
            texts,
            plain,
            containing: Default::default(),
            eos: Vec::new(),
            raw: HashMap::new(),
            is_raw: Vec::new(),
            trie: Default::default(),
        }
    }

    /// The vocabulary with the bytes of its tokens that are not whole characters (`bytes`:
    /// a token's, if known), for [`Constraint::Regex`].
    pub fn with_bytes(mut self, bytes: impl Fn(u32) -> Option<Vec<u8>>) -> JsonVocab {
        for (id, t) in self.texts.iter().enumerate() {
            if t.contains('\u{FFFD}')
                && let Some(b) = bytes(id as u32)
            {
                self.raw.insert(id as u32, b);
                self.is_raw.resize(self.texts.len(), false);
                self.is_raw[id] = true;
                // Not plain string content: it may end a character another token began.
                self.plain[id] = false;
            }
        }
        self
    }

    /// Whether token `id` is one of bytes that are not whole UTF-8.
    pub fn is_raw(&self, id: u32) -> bool {
        self.is_raw.get(id as usize).copied().unwrap_or(false)
    }

    /// Token `id`'s bytes: its text's, or the raw bytes of one that is not whole UTF-8.
    pub fn bytes(&self, id: u32) -> &[u8] {
        match self.is_raw(id).then(|| self.raw.get(&id)).flatten() {
            Some(b) => b,
            None => self.text(id).as_bytes(),
        }
    }

    /// The tokens as a trie over their bytes (built once, then kept), for grammars.
    pub fn trie(&self) -> &ByteTrie {
        self.trie.get_or_init(|| Arc::new(ByteTrie::new(self)))
    }

    /// Tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The end-of-text tokens.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// The vocabulary with its end-of-text tokens.
    pub fn with_eos(mut self, eos: &[u32]) -> JsonVocab {
        self.eos = eos.to_vec();
        self
    }

    /// The tokens whose text holds `c` (found once per character, then kept).
    pub fn containing(&self, c: char) -> Arc<[u32]> {
        let mut m = self.containing.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(c)
            .or_insert_with(|| {
                (self.texts.iter().enumerate())
                    .filter(|(_, t)| t.contains(c))
                    .map(|(id, _)| id as u32)
                    .collect()
            })
            .clone()
    }

    /// Token `id`'s text ("" past the tokenizer's vocabulary).
    pub fn text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", String::as_str)
    }
}

/// What a request constrains its answer to.
#[derive(Debug, Clone)]
pub enum Constraint {
    /// JSON mode: one JSON object.
    Object,
    /// Structured outputs: a value the schema accepts ([`crate::json_schema`]).
    Schema(Arc<Schema>),
    /// Free text, in which an opening starts a value the schema accepts: tool calls in a
    /// model's own format ([`crate::tool_calls`]), as llama.cpp's lazy grammars. `once`:
    /// the answer ends with its first value.
    After {
        opening: Opening,
        schema: Arc<Schema>,
        once: bool,
    },
    /// Text that a regex matches whole (vLLM's `guided_regex` and `guided_choice`): a
    /// token is masked where no match can follow it, end-of-text allowed only on a match;
    /// the answer ends by itself where the match can go no further.
    Regex(Arc<TextPattern>),
    /// Text that a grammar derives whole (vLLM's `guided_grammar`), held as a regex is.
    Grammar(Arc<Grammar>),
    /// Free text in which a control token starts calls written in `format`'s parts: a
    /// tool's name among control tokens and fixed text, then arguments that tool's schema
    /// accepts (Mistral's v11 format, `[TOOL_CALLS]name[ARGS]{…}`; DeepSeek's); `once`: the
    /// answer ends with its first call.
    Named {
        format: Arc<CallFormat>,
        tools: Arc<[(String, Arc<Schema>)]>,
        once: bool,
    },
    /// A reasoning model's answer (`--reasoning-parser`): free thoughts, then what the inner
    /// constraint allows, as vLLM applies structured outputs once the reasoning has ended.
    AfterThoughts(Box<Constraint>, Thoughts),
}

/// How a reasoning model's thoughts are told apart ([`crate::reasoning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thoughts {
    /// Open from the answer's start until the text `</think>` (DeepSeek-R1's).
    Tag,
    /// Between two control tokens, whose text the masks do not see (Mistral's `[THINK]` and
    /// `[/THINK]`): the answer may open with `start`, its thoughts free until `end`, or go
    /// straight to what the inner constraint allows. (vLLM leaves an answer unconstrained
    /// until a `[THINK]` … `[/THINK]` has passed, so one that does not think is never
    /// constrained; a constraint here holds either way.)
    Tokens { start: u32, end: u32 },
}

/// The tag that ends a reasoning model's thoughts ([`crate::reasoning`]).
const THOUGHTS_END: &str = "</think>";

/// Where a value of [`Constraint::After`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// After each occurrence of one of these texts (Hermes' `<tool_call>`), the one that
    /// ends first.
    Tags(Arc<[OpenTag]>),
    /// At the answer's start, after any whitespace, where its first character is this one,
    /// which begins the value (Llama 3's `{`).
    Start(char),
    /// After each time this token is sampled: a control token, whose text the masks do not
    /// see (Mistral's `[TOOL_CALLS]`).
    Token(u32),
}

/// A text that opens a value ([`Opening::Tags`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTag {
    /// The text, which is not part of the value.
    pub text: Arc<str>,
    /// What the value is taken to have begun with, before what follows the text (a format's
    /// fallback: Qwen3-Coder's `<function=` written without its `<tool_call>` stands for
    /// the call's own start, `\n<function=`).
    pub given: &'static str,
}

impl Opening {
    /// [`Opening::Tags`] of one text, after which the value begins.
    pub fn tag(text: &str) -> Opening {
        Opening::Tags(Arc::new([OpenTag {
            text: text.into(),
            given: "",
        }]))
    }
}

/// How a format writes the calls of a [`Constraint::Named`]: each call a sequence of parts,
/// of which one names the tool and a later one holds its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFormat {
    /// The control tokens that open and close a block of calls (DeepSeek's
    /// `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>`); in the block, after a call, only
    /// whitespace, the next call or the block's end may come (after one call that ends the
    /// answer, only the block's end). `None`: each call opens in free
    /// text by its first part, a control token (Mistral's `[TOOL_CALLS]`).
    pub block: Option<(u32, u32)>,
    /// One call's parts, in order; the first is a control token.
    pub parts: Vec<Part>,
}

impl CallFormat {
    /// The control token each call starts with.
    pub fn call_token(&self) -> Option<u32> {
        match self.parts.first() {
            Some(Part::Token(t)) => Some(*t),
            _ => None,
        }
    }

    /// The control token that starts calls in free text: the block's, or a call's.
    pub fn opening(&self) -> Option<u32> {
        match self.block {
            Some((open, _)) => Some(open),
            None => self.call_token(),
        }
    }
}

/// A piece of a [`CallFormat`]'s call. A token may not run from one part into the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A control token.
    Token(u32),
    /// This text (DeepSeek V3's `function`).
    Text(&'static str),
    /// A tool's name, then this text (DeepSeek V3's newline and markdown fence).
    Name(&'static str),
    /// The arguments, as the named tool's schema accepts them.
    Args,
}

/// [`JsonMode::mask`] for a regex at `state`: each token whose text leads where no match
/// can follow is masked (tried once per first byte before its whole text), and the
/// end-of-text tokens unless the text so far matches.
fn mask_regex(p: &TextPattern, state: StateID, vocab: &JsonVocab, logits: &mut [f32]) -> bool {
    let matched = p.matches(state);
    let mut first: [Option<bool>; 256] = [None; 256];
    let mut any = false;
    for (id, l) in logits.iter_mut().enumerate() {
        let ok = match vocab.texts.get(id) {
            None => false,
            Some(t) if t.is_empty() => matched && vocab.eos.contains(&(id as u32)),
            Some(_) => {
                let t = vocab.bytes(id as u32);
                *first[t[0] as usize].get_or_insert_with(|| p.byte_ok(state, t[0]))
                    && (t.len() == 1 || p.step(state, t).is_some())
            }
        };
        if ok {
            any |= *l > f32::NEG_INFINITY;
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    any
}

/// One sequence's JSON mode or structured output: the automaton, stepped by the texts of its
/// sampled tokens.
#[derive(Debug, Clone)]
pub enum JsonMode {
    Object(JsonState),
    Schema(Arc<Schema>, SchemaState),
    After(Box<Lazy>),
    Regex(Arc<TextPattern>, StateID),
    Grammar(Arc<Grammar>, GrammarState),
    Named(Box<NamedCalls>),
    Thinking(Box<Thinking>),
}

/// [`Constraint::AfterThoughts`]'s state.
#[derive(Debug, Clone)]
pub struct Thinking {
    inner: JsonMode,
    kind: Thoughts,
    /// Still in the thoughts.
    open: bool,
    /// No token sampled yet.
    first: bool,
    /// The thoughts' end that may be the start of the closing tag.
    tail: String,
}

impl Thinking {
    fn mask(&self, vocab: &JsonVocab, logits: &mut [f32]) -> bool {
        match (self.kind, self.open) {
            (Thoughts::Tag, true) => self.mask_thoughts(vocab, logits),
            (Thoughts::Tokens { .. }, true) => logits.iter().any(|&l| l > f32::NEG_INFINITY),
            // The answer's first token may open the thoughts, or start what the inner
            // constraint allows.
            (Thoughts::Tokens { start, .. }, false) if self.first => {
                let opening = logits.get(start as usize).copied();
                let any = self.inner.mask(vocab, logits);
                match (opening, logits.get_mut(start as usize)) {
                    (Some(l), Some(slot)) => {
                        *slot = l;
                        any || l > f32::NEG_INFINITY
                    }
                    _ => any,
                }
            }
            (_, false) => self.inner.mask(vocab, logits),
        }
    }

    /// Masks, in the thoughts, the tokens that would close them and go on with text the
    /// inner constraint refuses.
    fn mask_thoughts(&self, vocab: &JsonVocab, logits: &mut [f32]) -> bool {
        for &id in vocab.containing('>').iter() {
            let text = vocab.text(id);
            if let Some(l) = logits.get_mut(id as usize)
                && let Some(at) = opening_end(&self.tail, text, THOUGHTS_END)
                && !(text[at..].is_empty() || self.inner.takes(&text[at..]))
            {
                *l = f32::NEG_INFINITY;
            }
        }
        logits.iter().any(|&l| l > f32::NEG_INFINITY)
    }

    fn advance_id(&mut self, vocab: &JsonVocab, id: u32) {
        let first = std::mem::replace(&mut self.first, false);
        match (self.kind, self.open) {
            (Thoughts::Tag, true) => self.advance(vocab.text(id)),
            (Thoughts::Tokens { start, .. }, false) if first && id == start => self.open = true,
            (Thoughts::Tokens { end, .. }, true) => self.open = id != end,
            (_, false) => self.inner.advance_id(vocab, id),
        }
    }

    /// Steps over a token's text; a control token that opens or closes Mistral's thoughts
    /// is seen by [`Self::advance_id`] only.
    fn advance(&mut self, text: &str) {
        self.first = false;
        if !self.open {
            return self.inner.advance(text);
        }
        if self.kind != Thoughts::Tag {
            return;
        }
        match opening_end(&self.tail, text, THOUGHTS_END) {
            Some(at) => {
                self.open = false;
                self.tail.clear();
                if !text[at..].is_empty() {
                    self.inner.advance(&text[at..]);
                }
            }
            None => keep_partial_opening(&mut self.tail, text, [THOUGHTS_END]),
        }
    }
}

/// [`Constraint::Named`]'s state.
#[derive(Debug, Clone)]
pub struct NamedCalls {
    format: Arc<CallFormat>,
    tools: Arc<[(String, Arc<Schema>)]>,
    once: bool,
    at: CallAt,
    /// Calls written in the current block.
    calls: usize,
}

/// Where in a [`NamedCalls`] answer the text is.
#[derive(Debug, Clone)]
enum CallAt {
    Free,
    /// In a block of calls, before a call or after one.
    Between,
    /// At part `part` of a call, a control token or text: its bytes so far; `tool`, the one
    /// named (0 before the name).
    Label {
        part: usize,
        tool: usize,
        written: Vec<u8>,
    },
    /// At the arguments part of a call of tool `tool`.
    Args {
        part: usize,
        tool: usize,
        st: SchemaState,
    },
    /// `once`: the call (and its block) is complete, and so the answer.
    Done,
}

/// How the bytes written at a text part fit what it may be.
struct LabelFit {
    /// They lead to some candidate.
    prefix: bool,
    /// The tool whose candidate they are, whole.
    whole: Option<usize>,
    /// A longer candidate goes on from them.
    longer: bool,
}

impl NamedCalls {
    /// How `bytes`, written at text part `part`, fit what that part may be: its text, or a
    /// tool's name and the text after it.
    fn fit(&self, part: usize, bytes: &[u8]) -> LabelFit {
        let mut fit = LabelFit {
            prefix: false,
            whole: None,
            longer: false,
        };
        let mut check = |tool: usize, a: &[u8], b: &[u8]| {
            let (head, tail) = bytes.split_at(bytes.len().min(a.len()));
            if a.starts_with(head) && b.starts_with(tail) {
                fit.prefix = true;
                match bytes.len() == a.len() + b.len() {
                    true => fit.whole = fit.whole.or(Some(tool)),
                    false => fit.longer = true,
                }
            }
        };
        match &self.format.parts[part] {
            Part::Text(t) => check(0, t.as_bytes(), b""),
            Part::Name(after) => {
                for (i, (name, _)) in self.tools.iter().enumerate() {
                    check(i, name.as_bytes(), after.as_bytes());
                }
            }
            Part::Token(_) | Part::Args => {}
        }
        fit
    }

    /// The state at part `part` of a call of tool `tool`, or after the call's last part.
    fn enter(&mut self, part: usize, tool: usize) -> CallAt {
        match self.format.parts.get(part) {
            Some(Part::Args) => CallAt::Args {
                part,
                tool,
                st: SchemaState::new(&self.tools[tool].1),
            },
            Some(_) => CallAt::Label {
                part,
                tool,
                written: Vec::new(),
            },
            None if self.format.block.is_some() => {
                self.calls += 1;
                CallAt::Between
            }
            None => self.after_calls(),
        }
    }

    /// Free text again, or (`once`) the end.
    fn after_calls(&self) -> CallAt {
        match self.once {
            true => CallAt::Done,
            false => CallAt::Free,
        }
    }

    fn call_token(&self) -> Option<u32> {
        self.format.call_token()
    }

    /// Whether token `id` (`control`: a control token, without text) may come next, at a
    /// text part or between a block's calls; `joined`, a buffer.
    fn allows(&self, vocab: &JsonVocab, id: u32, control: bool, joined: &mut Vec<u8>) -> bool {
        match &self.at {
            CallAt::Between => {
                let n = self.calls;
                let end = self.format.block.map(|(_, end)| end);
                let more = n == 0 || !self.once;
                (more && Some(id) == self.call_token())
                    || (n > 0 && Some(id) == end)
                    || (n > 0
                        && more
                        && !control
                        && vocab.bytes(id).iter().all(u8::is_ascii_whitespace))
            }
            CallAt::Label { part, written, .. } => match &self.format.parts[*part] {
                Part::Token(t) => id == *t,
                // A whole name that a longer one goes on from may end at the next part's
                // token (a control token, or an added token with text).
                _ if self.format.parts.get(*part + 1) == Some(&Part::Token(id)) => {
                    self.fit(*part, written).whole.is_some()
                }
                _ if control => false,
                _ => {
                    joined.clear();
                    joined.extend_from_slice(written);
                    joined.extend_from_slice(vocab.bytes(id));
                    self.fit(*part, joined).prefix
                }
            },
            CallAt::Free | CallAt::Done | CallAt::Args { .. } => true,
        }
    }

    fn mask(&self, vocab: &JsonVocab, logits: &mut [f32]) -> bool {
        match &self.at {
            CallAt::Free | CallAt::Done => logits.iter().any(|&l| l > f32::NEG_INFINITY),
            CallAt::Args { tool, st, .. } => {
                JsonMode::Schema(self.tools[*tool].1.clone(), st.clone()).mask(vocab, logits)
            }
            CallAt::Between | CallAt::Label { .. } => {
                let mut any = false;
                let mut joined = Vec::with_capacity(64);
                for (id, l) in logits.iter_mut().enumerate() {
                    let id = id as u32;
                    let control = vocab.text(id).is_empty() && !vocab.is_raw(id);
                    if (id as usize) < vocab.len() && self.allows(vocab, id, control, &mut joined) {
                        any |= *l > f32::NEG_INFINITY;
                    } else {
                        *l = f32::NEG_INFINITY;
                    }
                }
                any
            }
        }
    }

    fn advance_id(&mut self, vocab: &JsonVocab, id: u32) {
        let raw = vocab.is_raw(id);
        self.step(Some(id), vocab.text(id), vocab.bytes(id), raw);
    }

    /// Steps over an ordinary token's text (the id matters only for control tokens, which
    /// have none).
    fn advance_text(&mut self, text: &str) {
        self.step(None, text, text.as_bytes(), false);
    }

    /// Steps over a sampled token: its id (`None`: its text alone), text, bytes, and
    /// whether those are raw bytes, not whole UTF-8.
    fn step(&mut self, id: Option<u32>, text: &str, bytes: &[u8], raw: bool) {
        let block_end = self.format.block.map(|(_, end)| end);
        self.at = match std::mem::replace(&mut self.at, CallAt::Free) {
            CallAt::Free => match self.format.block {
                Some((open, _)) if id == Some(open) => {
                    self.calls = 0;
                    CallAt::Between
                }
                None if id.is_some() && id == self.call_token() => self.enter(1, 0),
                _ => CallAt::Free,
            },
            CallAt::Done => CallAt::Done,
            CallAt::Between if id.is_some() && id == self.call_token() => self.enter(1, 0),
            CallAt::Between if id.is_some() && id == block_end => self.after_calls(),
            CallAt::Between => CallAt::Between,
            CallAt::Label { part, tool, .. }
                if matches!(self.format.parts[part], Part::Token(_)) =>
            {
                self.enter(part + 1, tool)
            }
            CallAt::Label {
                part,
                tool,
                written,
            } if id.is_some_and(|id| self.format.parts.get(part + 1) == Some(&Part::Token(id))) => {
                // The next part's token, after a whole name that a longer one goes on from.
                let whole = self.fit(part, &written).whole;
                debug_assert!(whole.is_some(), "a masked token was sampled: {id:?}");
                self.enter(part + 2, whole.unwrap_or(tool))
            }
            CallAt::Label {
                part,
                tool,
                mut written,
            } => {
                written.extend_from_slice(bytes);
                let fit = self.fit(part, &written);
                debug_assert!(fit.prefix, "a masked token was sampled: {text:?}");
                match (fit.whole, fit.longer) {
                    (Some(whole), false) => {
                        let named = matches!(self.format.parts[part], Part::Name(_));
                        self.enter(part + 1, if named { whole } else { tool })
                    }
                    _ => CallAt::Label {
                        part,
                        tool,
                        written,
                    },
                }
            }
            CallAt::Args { part, tool, mut st } => {
                let schema = &self.tools[tool].1;
                let ok = match raw || st.in_partial_char() {
                    true => st.push_bytes(schema, bytes),
                    false => st.push(schema, text),
                };
                debug_assert!(ok, "a masked token was sampled: {text:?}");
                match st.complete() {
                    true => self.enter(part + 1, tool),
                    false => CallAt::Args { part, tool, st },
                }
            }
        };
    }
}

/// [`Constraint::After`]'s state: in free text, or inside a value an opening started.
#[derive(Debug, Clone)]
pub struct Lazy {
    opening: Opening,
    schema: Arc<Schema>,
    once: bool,
    inside: Option<SchemaState>,
    /// In free text after [`Opening::Tags`]: its end, where that may be the start of a tag
    /// (shorter than it).
    tail: String,
    /// Some character other than whitespace written ([`Opening::Start`]).
    begun: bool,
    /// `once`: the value is complete, and so the answer.
    finished: bool,
}

/// Where `opening` first ends in `text`, written after `tail` (shorter than `opening`, so
/// that any occurrence ends inside `text`): the byte offset in `text` just after it.
fn opening_end(tail: &str, text: &str, opening: &str) -> Option<usize> {
    if tail.is_empty() {
        // Most tokens, tried at every step of free text: no copy.
        return text.find(opening).map(|at| at + opening.len());
    }
    let joined = format!("{tail}{text}");
    let at = joined.find(opening)?;
    Some(at + opening.len() - tail.len())
}

/// `tail` after `text`, written where none of `openings` ended: only what may still be the
/// start of one is kept.
fn keep_partial_opening<'o>(
    tail: &mut String,
    text: &str,
    openings: impl IntoIterator<Item = &'o str>,
) {
    tail.push_str(text);
    let keep = (openings.into_iter())
        .map(|o| crate::tool_calls::partial_opening(tail, o))
        .max()
        .unwrap_or(0);
    tail.drain(..tail.len() - keep);
}

impl Lazy {
    /// Where in a token's `text`, written in free text, a value would start (`None`: it
    /// starts none), and what it is taken to have begun with ([`OpenTag::given`]).
    fn value_start(&self, text: &str) -> Option<(usize, &'static str)> {
        match &self.opening {
            Opening::Tags(tags) => (tags.iter())
                .filter_map(|t| Some((opening_end(&self.tail, text, &t.text)?, t.given)))
                .min_by_key(|(end, _)| *end),
            Opening::Start(_) if self.begun => None,
            Opening::Start(c) => {
                let trimmed = text.trim_start();
                trimmed
                    .starts_with(*c)
                    .then(|| (text.len() - trimmed.len(), ""))
            }
            // Opened by its id ([`JsonMode::advance_id`]), never by text.
            Opening::Token(_) => None,
        }
    }

    /// The characters one of which every token that may start a value holds (`None`: no
    /// token can).
    fn opening_chars(&self) -> Option<Vec<char>> {
        match &self.opening {
            Opening::Tags(tags) => {
                Some(tags.iter().filter_map(|t| t.text.chars().last()).collect())
            }
            Opening::Start(_) if self.begun => None,
            Opening::Start(c) => Some(vec![*c]),
            // The token itself opens the value, and any token may follow free text.
            Opening::Token(_) => None,
        }
    }

    /// A value's state as `given` opens it.
    fn opened(&self, given: &str) -> SchemaState {
        let mut st = SchemaState::new(&self.schema);
        let ok = given.is_empty() || st.push(&self.schema, given);
        debug_assert!(ok, "an opening's given text is a value's start: {given:?}");
        st
    }

    /// Whether a token's `text` may come next in free text: one that starts a value must go
    /// on (if at all) as the value may.
    fn free_accepts(&self, text: &str) -> bool {
        match self.value_start(text) {
            None => true,
            Some((at, given)) => {
                let rest = &text[at..];
                rest.is_empty() || self.opened(given).accepts(&self.schema, rest)
            }
        }
    }

    /// A value is complete: back to free text, or (`once`) the end.
    fn value_done(&mut self) {
        self.inside = None;
        self.finished = self.once;
    }

    fn advance(&mut self, text: &str) {
        if let Some(st) = &mut self.inside {
            let ok = st.push(&self.schema, text);
            debug_assert!(ok, "a masked token was sampled: {text:?}");
            if st.complete() {
                self.value_done();
            }
            return;
        }
        let start = self.value_start(text);
        self.begun |= !text.trim_start().is_empty();
        match start {
            Some((at, given)) => {
                self.tail.clear();
                let mut st = self.opened(given);
                let rest = &text[at..];
                let ok = rest.is_empty() || st.push(&self.schema, rest);
                debug_assert!(ok, "a masked token was sampled: {text:?}");
                self.inside = Some(st);
                if self.inside.as_ref().is_some_and(SchemaState::complete) {
                    self.value_done();
                }
            }
            None => {
                if let Opening::Tags(tags) = &self.opening {
                    keep_partial_opening(&mut self.tail, text, tags.iter().map(|t| &*t.text));
                }
            }
        }
    }
}

impl Default for JsonMode {
    fn default() -> Self {
        JsonMode::Object(JsonState::default())
    }
}

impl JsonMode {
    pub fn new(c: &Constraint) -> JsonMode {
        match c {
            Constraint::Object => JsonMode::default(),
            Constraint::Schema(s) => JsonMode::Schema(s.clone(), SchemaState::new(s)),
            Constraint::Regex(p) => JsonMode::Regex(p.clone(), p.start()),
            Constraint::Grammar(g) => JsonMode::Grammar(g.clone(), GrammarState::new(g)),
            Constraint::AfterThoughts(inner, kind) => JsonMode::Thinking(Box::new(Thinking {
                inner: JsonMode::new(inner),
                kind: *kind,
                open: *kind == Thoughts::Tag,
                first: true,
                tail: String::new(),
            })),
            Constraint::Named {
                format,
                tools,
                once,
            } => JsonMode::Named(Box::new(NamedCalls {
                format: format.clone(),
                tools: tools.clone(),
                once: *once,
                at: CallAt::Free,
                calls: 0,
            })),
            Constraint::After {
                opening,
                schema,
                once,
            } => JsonMode::After(Box::new(Lazy {
                opening: opening.clone(),
                schema: schema.clone(),
                once: *once,
                inside: None,
                tail: String::new(),
                begun: false,
                finished: false,
            })),
        }
    }

    /// Sets to −∞ the logits of the tokens that may not come next (ids past the tokenizer's
    /// vocabulary are never allowed). Returns whether any token is left.
    pub fn mask(&self, vocab: &JsonVocab, logits: &mut [f32]) -> bool {
        let (in_string, partial) = match self {
            JsonMode::Regex(p, state) => return mask_regex(p, *state, vocab, logits),
            JsonMode::Grammar(g, state) => return mask_grammar(g, state, vocab, logits),
            JsonMode::Thinking(t) => return t.mask(vocab, logits),
            JsonMode::Named(calls) => return calls.mask(vocab, logits),
            JsonMode::Object(st) => (st.in_plain_string(), st.in_partial_char()),
            JsonMode::Schema(_, st) => (st.in_plain_string(), st.in_partial_char()),
            JsonMode::After(lazy) => match &lazy.inside {
                Some(st) => {
                    return JsonMode::Schema(lazy.schema.clone(), st.clone()).mask(vocab, logits);
                }
                None => {
                    // Only the tokens that hold the opening's (last) character can start a
                    // value; where none can, nothing is masked.
                    let Some(chars) = lazy.opening_chars() else {
                        return logits.iter().any(|&l| l > f32::NEG_INFINITY);
                    };
                    for c in chars {
                        for &id in vocab.containing(c).iter() {
                            if let Some(l) = logits.get_mut(id as usize)
                                && !lazy.free_accepts(vocab.text(id))
                            {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                    return logits.iter().any(|&l| l > f32::NEG_INFINITY);
                }
            },
        };
        // Inside a character begun, only tokens of bytes may finish it.
        let in_string = in_string && !partial;
        // Whether a token's first character may come next, tried once per character (a
        // schema's trial copies its state; most tokens fail on their first character).
        let mut first: [Option<bool>; 128] = [None; 128];
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = match vocab.texts.get(id) {
                None => false,
                Some(_) if vocab.is_raw(id as u32) => {
                    let bytes = vocab.bytes(id as u32);
                    match self {
                        JsonMode::Object(st) => st.clone().push_bytes(bytes),
                        JsonMode::Schema(schema, st) => st.clone().push_bytes(schema, bytes),
                        _ => unreachable!("answered above"),
                    }
                }
                Some(_) if partial => false,
                Some(t) if t.is_empty() => false,
                Some(_) if in_string && vocab.plain[id] => true,
                Some(t) => match self {
                    JsonMode::Object(st) => st.accepts(t),
                    JsonMode::Schema(schema, st) => {
                        let c = t.chars().next().unwrap_or('\u{0}');
                        let first_ok = match c.is_ascii() {
                            true => *first[c as usize]
                                .get_or_insert_with(|| st.accepts(schema, &t[..1])),
                            false => true,
                        };
                        first_ok && (t.len() == 1 || st.accepts(schema, t))
                    }
                    _ => unreachable!("answered above"),
                },
            };
            if ok {
                any |= *l > f32::NEG_INFINITY;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        any
    }

    /// Steps over sampled token `id` (one the mask allowed): a regex over its bytes, the
    /// others over its text.
    pub fn advance_id(&mut self, vocab: &JsonVocab, id: u32) {
        match self {
            JsonMode::Named(calls) => calls.advance_id(vocab, id),
            JsonMode::Thinking(t) => t.advance_id(vocab, id),
            JsonMode::Grammar(g, state) => {
                let ok = state.push_bytes(g, vocab.bytes(id));
                debug_assert!(ok, "a masked token was sampled: {id}");
            }
            JsonMode::Regex(p, state) => {
                let bytes = vocab.bytes(id);
                if let Some(next) = p.step(*state, bytes) {
                    *state = next;
                } else {
                    debug_assert!(bytes.is_empty(), "a masked token was sampled: {id}");
                }
            }
            // A token of bytes, or one after a character begun: over bytes.
            JsonMode::Object(st) if vocab.is_raw(id) || st.in_partial_char() => {
                let ok = st.push_bytes(vocab.bytes(id));
                debug_assert!(ok, "a masked token was sampled: {id}");
            }
            JsonMode::Schema(schema, st) if vocab.is_raw(id) || st.in_partial_char() => {
                let ok = st.push_bytes(schema, vocab.bytes(id));
                debug_assert!(ok, "a masked token was sampled: {id}");
            }
            JsonMode::After(lazy)
                if lazy
                    .inside
                    .as_ref()
                    .is_some_and(|st| vocab.is_raw(id) || st.in_partial_char()) =>
            {
                let st = lazy.inside.as_mut().expect("inside a value");
                let ok = st.push_bytes(&lazy.schema, vocab.bytes(id));
                debug_assert!(ok, "a masked token was sampled: {id}");
                if st.complete() {
                    lazy.value_done();
                }
            }
            // The opening token: the value starts after it.
            JsonMode::After(lazy)
                if lazy.inside.is_none() && lazy.opening == Opening::Token(id) =>
            {
                lazy.inside = Some(SchemaState::new(&lazy.schema));
            }
            _ => self.advance(vocab.text(id)),
        }
    }

    /// Steps over a sampled token's text (one the mask allowed).
    pub fn advance(&mut self, text: &str) {
        let ok = match self {
            JsonMode::Object(st) => st.push(text),
            JsonMode::Schema(schema, st) => st.push(schema, text),
            JsonMode::After(lazy) => {
                lazy.advance(text);
                true
            }
            JsonMode::Regex(p, state) => match p.step(*state, text.as_bytes()) {
                Some(next) => {
                    *state = next;
                    true
                }
                None => text.is_empty(), // an end-of-text token
            },
            JsonMode::Grammar(g, state) => state.push_bytes(g, text.as_bytes()),
            JsonMode::Named(calls) => {
                calls.advance_text(text);
                true
            }
            JsonMode::Thinking(t) => {
                t.advance(text);
                true
            }
        };
        debug_assert!(ok, "a masked token was sampled: {text:?}");
    }

    /// Whether the answer is complete: its value is. Free text with values in it ends as
    /// any answer does, or (`once`) with its first value.
    pub fn complete(&self) -> bool {
        match self {
            JsonMode::Object(st) => st.complete(),
            JsonMode::Schema(_, st) => st.complete(),
            JsonMode::After(lazy) => lazy.finished,
            JsonMode::Regex(p, state) => p.matches(*state) && !p.goes_on(*state),
            JsonMode::Grammar(_, state) => state.matched() && !state.goes_on(),
            JsonMode::Named(calls) => matches!(calls.at, CallAt::Done),
            JsonMode::Thinking(t) => !t.open && t.inner.complete(),
        }
    }

    /// Whether `text` may come next (a trial; free text takes anything).
    fn takes(&self, text: &str) -> bool {
        match self {
            JsonMode::Object(st) => st.accepts(text),
            JsonMode::Schema(schema, st) => st.accepts(schema, text),
            JsonMode::Regex(p, state) => p.step(*state, text.as_bytes()).is_some(),
            JsonMode::Grammar(g, st) => st.clone().push_bytes(g, text.as_bytes()),
            JsonMode::Thinking(t) if !t.open => t.inner.takes(text),
            JsonMode::After(_) | JsonMode::Named(_) | JsonMode::Thinking(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `text`, fed a character at a time, is accepted throughout, and complete.
    fn run(text: &str) -> (bool, bool) {
        let mut s = JsonState::default();
        for c in text.chars() {
            if !s.push(&c.to_string()) {
                return (false, false);
            }
        }
        (true, s.complete())
    }

    #[test]
    fn valid_objects_are_accepted_to_completion() {
        for doc in [
            "{}",
            " {\"a\": 1}",
            "{\"a\":[1,2.5,-0.3e+7,0,1E5,true,false,null,\"x\"],\"b\":{}}",
            "{\n  \"name\": \"Ann \\\"A\\\" \\u00e9\\n\",\n  \"age\": 30\n}",
            "{\"a\": [], \"b\": [[]], \"c\": [{\"d\": -1}]}",
            "{\"é東\": \"🙂\"}  ",
        ] {
            assert_eq!(run(doc), (true, true), "{doc}");
            serde_json::from_str::<serde_json::Value>(doc).expect("the test's document is JSON");
        }
    }

    #[test]
    fn prefixes_are_accepted_but_not_complete() {
        let doc = "{\"a\": [1, {\"b\": \"c\"}], \"d\": 2.5e-3}";
        for (i, _) in doc.char_indices().skip(1) {
            assert_eq!(run(&doc[..i]), (true, false), "{}", &doc[..i]);
        }
    }

    #[test]
    fn what_json_does_not_allow_is_refused() {
        for bad in [
            "[1]",
            "1",
            "\"a\"",
            "{a: 1}",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1.}",
            "{\"a\": .5}",
            "{\"a\": -}",
            "{\"a\": 1e}",
            "{\"a\": tru}",
            "{\"a\": True}",
            "{\"a\": 1,}",
            "{\"a\": [1,]}",
            "{\"a\": [1}",
            "{\"a\": \"x\ny\"}",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"\\u12g4\"}",
            "{} x",
            "{}}",
            "{\"a\": \u{FFFD}}",
        ] {
            assert!(
                !run(bad).0 || !run(bad).1,
                "{bad:?} was taken as complete JSON"
            );
            assert!(
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(bad).is_err(),
                "the test's {bad:?} is a JSON object"
            );
        }
        // A number ends at whatever follows it, even a refused character.
        assert_eq!(run("{\"a\": 12 3}"), (false, false));
    }

    #[test]
    fn a_token_is_tried_whole_without_changing_the_state() {
        let mut s = JsonState::default();
        assert!(s.push("{\"a\": [1"));
        assert!(s.accepts("]}"));
        assert!(s.accepts(", [[{\"b\": 2}]]]}"));
        assert!(!s.accepts(", [[{\"b\": 2}]]}"), "the array is still open");
        assert!(!s.accepts("}"));
        assert!(!s.accepts(""));
        assert!(s.push("2, 3]"));
        assert!(s.accepts("}") && !s.accepts("]"));
        assert!(s.push("}\n"));
        assert!(s.complete());
        assert!(s.accepts(" ") && !s.accepts("{"));
    }

    #[test]
    fn whitespace_runs_and_nesting_are_bounded() {
        let mut s = JsonState::default();
        assert!(s.push("{"));
        let run = " ".repeat(MAX_WHITESPACE as usize);
        assert!(s.push(&run));
        assert!(!s.accepts(" "));
        assert!(s.accepts("}"));
        assert!(s.push("\"a\":"));
        assert!(s.accepts(" "));
        for _ in 1..MAX_DEPTH {
            assert!(s.push("["));
        }
        assert!(!s.accepts("["), "nesting past MAX_DEPTH");
        assert!(s.accepts("1"));
    }

    #[test]
    fn the_mask_keeps_exactly_the_tokens_that_may_come_next() {
        let texts: Vec<String> = ["{", "}", " {", "\"a", "\":", "1", "", "x", "\u{FFFD}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let vocab = JsonVocab::new(texts.clone());
        let allowed = |m: &JsonMode| -> Vec<usize> {
            let mut logits = vec![0.0; texts.len() + 1];
            m.mask(&vocab, &mut logits);
            (0..logits.len())
                .filter(|&i| logits[i] > f32::NEG_INFINITY)
                .collect()
        };
        let mut m = JsonMode::default();
        assert_eq!(allowed(&m), [0, 2]);
        m.advance("{");
        // `":` opens a key holding a colon.
        assert_eq!(allowed(&m), [1, 3, 4]);
        m.advance("\"a");
        assert_eq!(allowed(&m), [0, 1, 2, 4, 5, 7, 8], "inside a string");
        m.advance("\":");
        assert_eq!(
            allowed(&m),
            [0, 2, 3, 4, 5],
            "a value: an object, a string, a number"
        );
        m.advance("1");
        assert_eq!(allowed(&m), [1, 5]);
        m.advance("}");
        assert!(m.complete());
        assert!(allowed(&m).is_empty());
    }

    /// The tokens `m` leaves (some must be left).
    /// The ids `0..n` but `no`'s.
    fn all_but(n: usize, no: &[usize]) -> Vec<usize> {
        (0..n).filter(|i| !no.contains(i)).collect()
    }

    fn unmasked(m: &JsonMode, vocab: &JsonVocab) -> Vec<usize> {
        let mut logits = vec![0.0; vocab.texts.len()];
        assert!(m.mask(vocab, &mut logits));
        (0..logits.len())
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .collect()
    }

    #[test]
    fn thoughts_are_free_and_the_constraint_applies_after_them() {
        let texts: Vec<String> = [
            "Hmm",
            "</",
            "think",
            ">",
            "</think>",
            "</think>{",
            "</think>x",
            "{",
            "}",
            "> x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts);
        let mut m = JsonMode::new(&Constraint::AfterThoughts(
            Box::new(Constraint::Object),
            Thoughts::Tag,
        ));
        assert_eq!(
            unmasked(&m, &vocab),
            [0, 1, 2, 3, 4, 5, 7, 8, 9],
            "all but closing into x"
        );
        for id in [0, 7, 1, 2] {
            m.advance_id(&vocab, id);
        }
        assert!(!m.complete(), "a `{{` in the thoughts is no answer");
        assert_eq!(
            unmasked(&m, &vocab),
            [0, 1, 2, 3, 4, 5, 7, 8],
            "`>` closes the tag now, and `> x` into x"
        );
        m.advance_id(&vocab, 3);
        assert_eq!(unmasked(&m, &vocab), [7], "the object's start");
        m.advance_id(&vocab, 7);
        m.advance_id(&vocab, 8);
        assert!(m.complete());
        // A token that closes the thoughts and starts the answer.
        let mut m = JsonMode::new(&Constraint::AfterThoughts(
            Box::new(Constraint::Object),
            Thoughts::Tag,
        ));
        m.advance_id(&vocab, 5);
        assert_eq!(unmasked(&m, &vocab), [8]);
    }

    /// Mistral's thoughts between control tokens (no text): the first token may open them
    /// or start the value; inside them anything goes; after them, the value.
    #[test]
    fn thoughts_between_control_tokens_may_open_the_answer_or_be_left_out() {
        // 0 [THINK], 1 [/THINK] (control tokens: no text), 2 end of text.
        let texts: Vec<String> = ["", "", "", "Hmm", "{", "}", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let vocab = JsonVocab::new(texts).with_eos(&[2]);
        let thoughts = Thoughts::Tokens { start: 0, end: 1 };
        let c = Constraint::AfterThoughts(Box::new(Constraint::Object), thoughts);
        let mut m = JsonMode::new(&c);
        assert_eq!(
            unmasked(&m, &vocab),
            [0, 4],
            "[THINK] or the object's start"
        );
        m.advance_id(&vocab, 0);
        assert_eq!(unmasked(&m, &vocab), [0, 1, 2, 3, 4, 5, 6], "free thoughts");
        for id in [3, 4, 0] {
            m.advance_id(&vocab, id);
        }
        assert!(!m.complete(), "a `{{` in the thoughts is no answer");
        m.advance_id(&vocab, 1);
        assert_eq!(
            unmasked(&m, &vocab),
            [4],
            "the object's start, [THINK] no more"
        );
        m.advance_id(&vocab, 4);
        m.advance_id(&vocab, 5);
        assert!(m.complete());
        // Straight to the value: thoughts may not open later.
        let mut m = JsonMode::new(&c);
        m.advance_id(&vocab, 4);
        assert_eq!(unmasked(&m, &vocab), [5]);
        m.advance_id(&vocab, 5);
        assert!(m.complete());
    }

    /// Two tools: `get_weather`, whose `city` is `"Rome"`, and `other`, of no arguments.
    fn weather_and(other: &str) -> Arc<[(String, Arc<Schema>)]> {
        let schema = |v: serde_json::Value| Arc::new(Schema::compile(&v).unwrap());
        let weather = serde_json::json!({"type": "object", "properties": {"city": {"enum": ["Rome"]}},
                               "required": ["city"]});
        let none = serde_json::json!({"type": "object", "properties": {}});
        vec![
            ("get_weather".to_string(), schema(weather)),
            (other.to_string(), schema(none)),
        ]
        .into()
    }

    #[test]
    fn a_named_call_masks_its_name_then_that_tools_arguments() {
        // 0 [TOOL_CALLS], 1 [ARGS] (control tokens: no text), 2 end of text.
        let texts: Vec<String> = [
            "",
            "",
            "",
            "get",
            "_weather",
            "_time",
            "{}",
            "{\"city\": ",
            "\"Rome\"",
            "}",
            "hi",
            " get",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts).with_eos(&[2]);
        let tools = weather_and("get_time");
        let format = Arc::new(CallFormat {
            block: None,
            parts: vec![Part::Token(0), Part::Name(""), Part::Token(1), Part::Args],
        });
        let named = |once| Constraint::Named {
            format: format.clone(),
            tools: tools.clone(),
            once,
        };
        let c = named(false);
        let mut m = JsonMode::new(&c);
        assert_eq!(unmasked(&m, &vocab).len(), 12, "free text");
        m.advance_id(&vocab, 10);
        m.advance_id(&vocab, 0);
        assert_eq!(unmasked(&m, &vocab), [3], "a name's start, no space");
        m.advance_id(&vocab, 3);
        assert_eq!(unmasked(&m, &vocab), [4, 5]);
        m.advance_id(&vocab, 4);
        assert_eq!(
            unmasked(&m, &vocab),
            [1],
            "a whole name: the arguments token"
        );
        m.advance_id(&vocab, 1);
        assert_eq!(unmasked(&m, &vocab), [7], "get_weather's object, whole");
        m.advance_id(&vocab, 7);
        m.advance_id(&vocab, 8);
        assert_eq!(unmasked(&m, &vocab), [9]);
        m.advance_id(&vocab, 9);
        assert!(!m.complete(), "free text again, for another call");
        assert_eq!(unmasked(&m, &vocab).len(), 12);
        // get_time takes an empty object; once, the call ends the answer.
        let mut m = JsonMode::new(&named(true));
        for id in [0, 3, 5, 1] {
            m.advance_id(&vocab, id);
        }
        assert_eq!(unmasked(&m, &vocab), [6]);
        m.advance_id(&vocab, 6);
        assert!(m.complete());
    }

    /// DeepSeek-V3's calls: a block of them, each a control token, fixed text, another
    /// token, a name with a fence after it, the arguments, a closing fence and a token.
    #[test]
    fn a_block_of_calls_masks_each_part_in_turn() {
        // 0 block open, 1 block close, 2 call open, 3 separator, 4 call close (control tokens:
        // no text), 5 end of text.
        let texts: Vec<String> = [
            "",
            "",
            "",
            "",
            "",
            "",
            "function",
            "func",
            "tion",
            "get",
            "_weather",
            "\n```json\n",
            "\n",
            "```",
            "json",
            "{}",
            "{\"city\": ",
            "\"Rome\"",
            "}",
            " ",
            "hi",
            "get_weather\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts).with_eos(&[5]);
        let tools = weather_and("get");
        let format = Arc::new(CallFormat {
            block: Some((0, 1)),
            parts: vec![
                Part::Token(2),
                Part::Text("function"),
                Part::Token(3),
                Part::Name("\n```json\n"),
                Part::Args,
                Part::Text("\n```"),
                Part::Token(4),
            ],
        });
        let named = |once| {
            JsonMode::new(&Constraint::Named {
                format: format.clone(),
                tools: tools.clone(),
                once,
            })
        };
        let mut m = named(false);
        assert_eq!(unmasked(&m, &vocab).len(), 22, "free text");
        m.advance_id(&vocab, 20);
        m.advance_id(&vocab, 0);
        assert_eq!(unmasked(&m, &vocab), [2], "a call first");
        m.advance_id(&vocab, 2);
        assert_eq!(unmasked(&m, &vocab), [6, 7], "the fixed text");
        m.advance_id(&vocab, 7);
        assert_eq!(unmasked(&m, &vocab), [8]);
        m.advance_id(&vocab, 8);
        assert_eq!(unmasked(&m, &vocab), [3], "its end: the separator");
        m.advance_id(&vocab, 3);
        assert_eq!(unmasked(&m, &vocab), [9, 21], "a name's start");
        m.advance_id(&vocab, 9);
        // `get` is a whole name: its fence may follow, as may the longer name.
        assert_eq!(unmasked(&m, &vocab), [10, 11, 12]);
        m.advance_id(&vocab, 10);
        assert_eq!(
            unmasked(&m, &vocab),
            [11, 12],
            "the fence, whole or in parts"
        );
        m.advance_id(&vocab, 12);
        assert_eq!(unmasked(&m, &vocab), [13]);
        m.advance_id(&vocab, 13);
        m.advance_id(&vocab, 14);
        assert_eq!(unmasked(&m, &vocab), [12], "the fence's last newline");
        m.advance_id(&vocab, 12);
        assert_eq!(
            unmasked(&m, &vocab),
            [12, 16, 19],
            "get_weather's arguments (JSON may start with whitespace)"
        );
        for id in [16, 17, 18] {
            m.advance_id(&vocab, id);
        }
        assert_eq!(
            unmasked(&m, &vocab),
            [12],
            "no token runs from the arguments on"
        );
        m.advance_id(&vocab, 12);
        m.advance_id(&vocab, 13);
        assert_eq!(unmasked(&m, &vocab), [4]);
        m.advance_id(&vocab, 4);
        assert_eq!(
            unmasked(&m, &vocab),
            [1, 2, 12, 19],
            "the block's end, another call, or whitespace"
        );
        m.advance_id(&vocab, 12);
        m.advance_id(&vocab, 2);
        for id in [6, 3, 21, 13, 14, 12, 16, 17, 18, 12, 13, 4] {
            assert!(!unmasked(&m, &vocab).is_empty());
            m.advance_id(&vocab, id);
        }
        m.advance_id(&vocab, 1);
        assert!(!m.complete(), "free text again");
        assert_eq!(unmasked(&m, &vocab).len(), 22);

        // Once: after one call only the block's end, which ends the answer; `get` by its
        // own fence.
        let mut m = named(true);
        for id in [0, 2, 6, 3, 9, 11, 15, 12, 13, 4] {
            m.advance_id(&vocab, id);
        }
        assert_eq!(unmasked(&m, &vocab), [1]);
        m.advance_id(&vocab, 1);
        assert!(m.complete());
    }

    /// A name that is the start of another ends at the next part's token, whether that is a
    /// control token or an added token with text (as DeepSeek's are in some vocabularies).
    #[test]
    fn a_shorter_name_ends_at_the_next_token_with_or_without_text() {
        for sep_text in ["", "<sep>"] {
            // 0 call open (control), 1 separator, 2 end of text.
            let texts: Vec<String> = ["", sep_text, "", "get", "_weather", "{}"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let vocab = JsonVocab::new(texts).with_eos(&[2]);
            let tools = weather_and("get");
            let format = Arc::new(CallFormat {
                block: None,
                parts: vec![Part::Token(0), Part::Name(""), Part::Token(1), Part::Args],
            });
            let c = Constraint::Named {
                format,
                tools,
                once: true,
            };
            let mut m = JsonMode::new(&c);
            m.advance_id(&vocab, 0);
            assert_eq!(unmasked(&m, &vocab), [3], "{sep_text:?}");
            m.advance_id(&vocab, 3);
            assert_eq!(
                unmasked(&m, &vocab),
                [1, 4],
                "{sep_text:?}: get, or more of it"
            );
            m.advance_id(&vocab, 1);
            assert_eq!(unmasked(&m, &vocab), [5], "{sep_text:?}: get's arguments");
            m.advance_id(&vocab, 5);
            assert!(m.complete(), "{sep_text:?}");
        }
    }

    #[test]
    fn after_its_opening_a_value_is_masked_and_then_text_is_free_again() {
        let texts: Vec<String> = [
            "Hi",
            " <",
            "tool",
            "_call",
            ">",
            ">\n{",
            ">x",
            "<tool_call>x",
            "<tool_call>",
            "{\"name\": \"now\", \"arguments\": {}}",
            "}",
            "",
            "\n</tool_call>",
            "\"name\": \"now\", \"arguments\": {}}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone());
        let schema =
            Schema::tool_calls(&[("now".to_string(), serde_json::json!({"type": "object"}))])
                .unwrap();
        let allowed = |m: &JsonMode| unmasked(m, &vocab);
        let all_but = |no: &[usize]| all_but(texts.len(), no);
        let mut m = JsonMode::new(&Constraint::After {
            opening: Opening::tag("<tool_call>"),
            schema: Arc::new(schema),
            once: false,
        });
        // Free text: anything, the end of text too, but an opening followed by what no call
        // starts with.
        assert_eq!(allowed(&m), all_but(&[7]));
        for t in ["Hi", " <", "tool", "_call"] {
            m.advance(t);
        }
        // "<tool_call" so far: ">x" would now complete the opening and go on wrongly.
        assert_eq!(allowed(&m), all_but(&[6, 7]));
        m.advance(">\n{");
        // Inside the call: only its JSON, no end of text.
        assert_eq!(allowed(&m), [13]);
        m.advance("\"name\": \"now\", \"arguments\": {}}");
        assert!(!m.complete(), "the answer goes on after a call");
        assert_eq!(allowed(&m), all_but(&[7]));
        // An opening and a whole call in one token.
        m.advance("\n</tool_call>");
        m.advance("<tool_call>");
        assert_eq!(allowed(&m), [9]);
        m.advance("{\"name\": \"now\", \"arguments\": {}}");
        assert_eq!(allowed(&m), all_but(&[7]));
    }

    /// Qwen3-Coder's XML calls after `<tool_call>` ([`crate::xml_calls`]): the layout, the
    /// tools' names, the required parameter, an optional one or not, in order, raw text for a string (anything up to its
    /// end, which may take a while to tell from text) and JSON for an integer.
    #[test]
    fn an_xml_call_is_masked_through_the_json_it_stands_for() {
        let texts: Vec<String> = [
            "Hi",
            "<tool_call>",
            "\n<function=",
            "get_weather",
            "now",
            ">\n",
            "<parameter=",
            "city",
            "days",
            "Rome \"x\"\\",
            "\n</parameter>\n",
            "</function>",
            "3",
            "x",
            "\n",
            "",
            "\n</tool_call>",
            "</",
            "</function>\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone());
        let params = serde_json::json!({"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]});
        let schema = Schema::xml_call(&[("get_weather".to_string(), params)]).unwrap();
        let allowed = |m: &JsonMode| unmasked(m, &vocab);
        let all_but = |no: &[usize]| all_but(texts.len(), no);
        let mut m = JsonMode::new(&Constraint::After {
            opening: Opening::tag("<tool_call>"),
            schema: Arc::new(schema),
            once: false,
        });
        let steps: [(usize, &[usize]); 12] = [
            (1, &[2, 14]),
            (2, &[3]),
            (3, &[5]),
            // No `</function>` before the parameters, `days` only after `city`.
            (5, &[6]),
            (6, &[7]),
            (7, &[5]),
            (5, &[]),
            (9, &[]),
            // `days` is optional: another parameter or the function's end.
            (10, &[6, 11, 17, 18]),
            (6, &[8]),
            (8, &[5]),
            (5, &[12, 14]),
        ];
        for (i, (token, then)) in steps.into_iter().enumerate() {
            m.advance(&texts[token]);
            match then.is_empty() {
                // Raw text: anything but the end of text.
                true => assert_eq!(allowed(&m), all_but(&[15]), "step {i}"),
                false => assert_eq!(allowed(&m), then, "step {i}"),
            }
        }
        // `3`: the number may end (`\n</parameter>`, `</`) or go on; `</function>` does not
        // end a parameter.
        m.advance("3");
        assert_eq!(allowed(&m), [10, 12, 14, 17]);
        m.advance("\n</parameter>\n");
        assert_eq!(
            allowed(&m),
            [11, 17, 18],
            "no parameter past the declared ones"
        );
        m.advance("</function>\n");
        assert!(!m.complete(), "free text after a call");
        assert_eq!(allowed(&m), all_but(&[]), "the end of text too");
    }

    /// Qwen3-Coder's `<function=` without its `<tool_call>` opens a call too, as the call's
    /// own start: the tools' names follow it, whole or split across tokens.
    #[test]
    fn a_bare_function_tag_opens_a_qwen3_coder_call() {
        let texts: Vec<String> = [
            "Hi",
            "<function=",
            "get_weather",
            ">\n",
            "<parameter=",
            "city",
            "Rome",
            "\n</parameter>\n",
            "</function>",
            "<func",
            "tion=",
            "<function=now",
            "<function=get_weather",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone());
        let params = serde_json::json!({"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]});
        let parser = crate::tool_calls::ToolCallParser::Qwen3Coder;
        let mut m = JsonMode::new(&Constraint::After {
            opening: parser.opening(|_| None).unwrap(),
            schema: Arc::new(Schema::xml_call(&[("get_weather".to_string(), params)]).unwrap()),
            once: false,
        });
        let free = all_but(texts.len(), &[11]);
        assert_eq!(unmasked(&m, &vocab), free, "no tool called now");
        m.advance("Hi");
        m.advance("<func");
        assert_eq!(unmasked(&m, &vocab), free);
        m.advance("tion=");
        assert_eq!(unmasked(&m, &vocab), [2], "a tool's name");
        for (token, then) in [
            ("get_weather", &[3][..]),
            (">\n", &[4]),
            ("<parameter=", &[5]),
            ("city", &[3]),
            (">\n", &all_but(texts.len(), &[13])),
            ("Rome", &all_but(texts.len(), &[13])),
            ("\n</parameter>\n", &[8]),
        ] {
            m.advance(token);
            assert_eq!(unmasked(&m, &vocab), then, "after {token:?}");
        }
        m.advance("</function>");
        assert!(!m.complete(), "free text after a call");
        m.advance("<function=get_weather");
        assert_eq!(
            unmasked(&m, &vocab),
            [3],
            "a whole name in the opening's token"
        );
    }

    #[test]
    fn a_value_at_the_start_is_masked_and_ends_the_answer_once_complete() {
        let texts: Vec<String> = [
            " ",
            "{",
            " {\"",
            "{x",
            "Hi {x",
            "name\": \"now\", \"parameters\": {}}",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone());
        let schema = Arc::new(
            Schema::tool_call_keyed(
                &[("now".to_string(), serde_json::json!({"type": "object"}))],
                "parameters",
            )
            .unwrap(),
        );
        let allowed = |m: &JsonMode| unmasked(m, &vocab);
        let start = Constraint::After {
            opening: Opening::Start('{'),
            schema,
            once: true,
        };
        let mut m = JsonMode::new(&start);
        // At the start, and after whitespace: "{x" starts no call.
        assert_eq!(allowed(&m), [0, 1, 2, 4, 5, 6]);
        m.advance(" ");
        assert_eq!(allowed(&m), [0, 1, 2, 4, 5, 6]);
        m.advance(" {\"");
        assert_eq!(allowed(&m), [5], "inside the call");
        m.advance("name\": \"now\", \"parameters\": {}}");
        assert!(m.complete(), "the call ends the answer");
        // Text first: no call later, nothing masked.
        let mut m = JsonMode::new(&start);
        m.advance("Hi {x");
        assert_eq!(allowed(&m), [0, 1, 2, 3, 4, 5, 6]);
        assert!(!m.complete());
    }

    /// A control token opens the value (its text, empty to the masks, is not part of it).
    #[test]
    fn a_value_after_an_opening_token_is_masked_and_free_text_is_not() {
        // Token 3 stands for a control token such as `[TOOL_CALLS]`: no text.
        let texts: Vec<String> = [
            "Hi",
            " [",
            "{\"name\": \"now\", \"arguments\": {}}]",
            "",
            "x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone()).with_eos(&[3]);
        let schema = Arc::new(
            Schema::tool_calls(&[("now".to_string(), serde_json::json!({"type": "object"}))])
                .unwrap(),
        );
        let allowed = |m: &JsonMode| unmasked(m, &vocab);
        let mut m = JsonMode::new(&Constraint::After {
            opening: Opening::Token(3),
            schema,
            once: true,
        });
        assert_eq!(allowed(&m), [0, 1, 2, 3, 4], "free text: nothing masked");
        m.advance_id(&vocab, 0);
        assert_eq!(allowed(&m), [0, 1, 2, 3, 4]);
        m.advance_id(&vocab, 3);
        assert_eq!(allowed(&m), [1], "inside the call: its JSON only");
        m.advance_id(&vocab, 1);
        assert_eq!(allowed(&m), [2]);
        m.advance_id(&vocab, 2);
        assert!(m.complete(), "one call ends the answer");
    }

    #[test]
    fn a_regex_masks_tokens_that_cannot_lead_to_a_match_and_ends_on_one() {
        let texts: Vec<String> = ["(", "12", "3) ", "x", "", "4", ")", "9-", "a.b", "a", ".b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let vocab = JsonVocab::new(texts.clone()).with_eos(&[4]);
        let p = Arc::new(TextPattern::whole(r"\([0-9]{3}\) ?[0-9]?").unwrap());
        let mut m = JsonMode::new(&Constraint::Regex(p));
        assert_eq!(unmasked(&m, &vocab), [0]);
        m.advance("(");
        assert_eq!(unmasked(&m, &vocab), [1, 5]);
        m.advance("12");
        assert_eq!(unmasked(&m, &vocab), [2, 5]);
        m.advance("3) ");
        // A match now: the end of text is allowed, or one more digit (not two).
        assert_eq!(unmasked(&m, &vocab), [4, 5]);
        assert!(!m.complete(), "a digit may still follow");
        m.advance("4");
        assert!(m.complete(), "nothing may follow");
        // Choices are literal: "a.b" is not "a" then any character.
        let c = Arc::new(TextPattern::choice(&["a.b".into(), "(x)".into()]).unwrap());
        let mut m = JsonMode::new(&Constraint::Regex(c));
        assert_eq!(unmasked(&m, &vocab), [0, 8, 9]);
        m.advance("a");
        assert_eq!(unmasked(&m, &vocab), [10]);
        m.advance(".b");
        assert!(m.complete());
        // Byte tokens: "東" is E6 9D B1, which no token holds whole here.
        let texts: Vec<String> = ["\u{FFFD}", "\u{FFFD}", "\u{FFFD}", "é"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let raw = [vec![0xe6], vec![0x9d, 0xb1], vec![0xe5]];
        let vocab = JsonVocab::new(texts).with_bytes(|id| raw.get(id as usize).cloned());
        let c = Arc::new(TextPattern::choice(&["東".into(), "é".into()]).unwrap());
        let mut m = JsonMode::new(&Constraint::Regex(c));
        assert_eq!(unmasked(&m, &vocab), [0, 3]);
        m.advance_id(&vocab, 0);
        assert_eq!(unmasked(&m, &vocab), [1]);
        m.advance_id(&vocab, 1);
        assert!(m.complete());
    }

    #[test]
    fn a_character_in_byte_tokens_is_finished_before_anything_else() {
        let mut s = JsonState::default();
        assert!(s.push("{\"a\": \""));
        assert!(
            !s.clone().push_bytes(&[0x9d]),
            "a continuation byte without its lead"
        );
        assert!(s.push_bytes(&[0xe6]));
        assert!(s.in_partial_char() && !s.accepts("\"") && !s.accepts("x"));
        assert!(s.push_bytes(&[0x9d, 0xb1]));
        assert!(s.push("\"}") && s.complete());
        let mut outside = JsonState::default();
        assert!(outside.push("{"));
        assert!(
            !outside.push_bytes(&[0xe6]),
            "only a string holds such a character"
        );

        // The mask: the bytes of "東" (E6 | 9D B1), text tokens, a quote.
        let texts: Vec<String> = ["\u{FFFD}", "\u{FFFD}", "x", "\""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let raw = [vec![0xe6], vec![0x9d, 0xb1]];
        let vocab = JsonVocab::new(texts).with_bytes(|id| raw.get(id as usize).cloned());
        let mut m = JsonMode::default();
        m.advance("{\"a\": \"");
        assert_eq!(
            unmasked(&m, &vocab),
            [0, 2, 3],
            "in a string: a lead byte, text, the end"
        );
        m.advance_id(&vocab, 0);
        assert_eq!(unmasked(&m, &vocab), [1], "only the character's last bytes");
        m.advance_id(&vocab, 1);
        assert_eq!(unmasked(&m, &vocab), [0, 2, 3]);
    }

    #[test]
    fn the_masks_look_up_of_plain_string_tokens_agrees_with_a_trial_of_each() {
        let texts: Vec<String> = [
            "abc", " de", "\"", "\",", "x\"}", "\\n", "\\", "\n", "\t", "é", "\u{FFFD}", "}",
            "\": 1", "1", "", "\u{1}", "a\\\"b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone());
        for prefix in [
            "{\"",
            "{\"a\": \"x",
            "{\"a\": [\"",
            "{\"k\\",
            "{\"a\": 1",
            "{",
        ] {
            let mut m = JsonMode::default();
            m.advance(prefix);
            let mut logits = vec![0.0; texts.len()];
            m.mask(&vocab, &mut logits);
            for (t, l) in texts.iter().zip(&logits) {
                assert_eq!(
                    *l > f32::NEG_INFINITY,
                    match &m {
                        JsonMode::Object(st) => st.accepts(t),
                        _ => unreachable!(),
                    },
                    "{t:?} after {prefix:?}"
                );
            }
        }
    }

    #[test]
    fn a_schemas_mask_agrees_with_a_trial_of_each_token() {
        let schema = Arc::new(
            Schema::compile(&serde_json::json!({"type": "object", "properties": {
                "a": {"type": "integer"}, "é": {"enum": ["x", "y"]}}}))
            .unwrap(),
        );
        let texts: Vec<String> = [
            "", "{", " {", "{\"", "\"a", "\"é", "\":", " 1", "1", "12,", ",", "}", "é", "\"x\"",
            "\"y\"}", "\n  ", "\t", "1.5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = JsonVocab::new(texts.clone());
        let mut m = JsonMode::new(&Constraint::Schema(schema.clone()));
        for next in ["{", "\"a\": 1", "2", ", ", "\"é\":", "\"y\"", "}"] {
            let JsonMode::Schema(_, st) = &m else {
                unreachable!()
            };
            let mut logits = vec![0.0; texts.len()];
            m.mask(&vocab, &mut logits);
            for (t, l) in texts.iter().zip(&logits) {
                assert_eq!(
                    *l > f32::NEG_INFINITY,
                    st.accepts(&schema, t),
                    "{t:?} before {next:?}"
                );
            }
            m.advance(next);
        }
        assert!(m.complete());
    }

    #[test]
    fn token_texts_keep_the_space_a_piece_adds_after_another() {
        // A SentencePiece-like decoder: "▁" is a space, except at the very start.
        let pieces = ["a", "▁b", "c", "<s>"];
        let decode = |ids: &[u32]| -> Option<String> {
            let s: String = ids
                .iter()
                .filter(|&&i| i != 3)
                .map(|&i| pieces[i as usize].replace('▁', " "))
                .collect();
            Some(s.strip_prefix(' ').unwrap_or(&s).to_owned())
        };
        assert_eq!(token_texts(4, 0, decode), ["a", " b", "c", ""]);
    }
}
