//! `tool_choice: "auto"`: tool calls read out of a model's own answer text (vLLM's
//! `--tool-call-parser`).
//!
//! The model answers as it likes; where it opens a call in its family's format, the rest of
//! the call is masked to the tools' schemas ([`crate::json_mode::Constraint::After`], as
//! llama.cpp's lazy grammars do), so that a call the model finishes always names one of the
//! tools and has arguments its `parameters` accept. The answer's text is then split here into
//! the content before the first call and the calls.
//!
//! Formats:
//! - [`ToolCallParser::Hermes`]: `<tool_call>{"name": …, "arguments": …}</tool_call>`, once
//!   per call (Hermes 2 and 3, Qwen 2.5 and 3, SmolLM3, and most templates that mention
//!   `<tool_call>`). A JSON list of such objects inside one block is read as several calls
//!   (SmolLM2's format, from its APIGen training data).
//! - [`ToolCallParser::Llama3Json`]: an answer that is `{"name": …, "parameters": …}`
//!   (Llama 3.1, 3.2 and 3.3, whose templates ask for that format): a call where the
//!   answer's first character is `{`, text otherwise. One call per answer, which ends it.
//! - [`ToolCallParser::Mistral`]: `[TOOL_CALLS] [{"name": …, "arguments": …}, …]` (Mistral 7B
//!   Instruct v0.3 and the templates that write `[TOOL_CALLS]`). `[TOOL_CALLS]` is a control
//!   token, so the call opens when that token is sampled ([`Opening::Token`]), and the
//!   answer is decoded with special tokens kept (vLLM's parser sets
//!   `skip_special_tokens: false` too) for it to be found in the text.
//! - [`ToolCallParser::MistralV11`]: `[TOOL_CALLS]name[ARGS]{…}`, once per call (Mistral's
//!   v11 tokenizers and later: Mistral Small 3.1 and 3.2, Magistral, Devstral, Ministral 3),
//!   chosen where `--tool-call-parser mistral` (or the detected format) meets a template that
//!   writes `[ARGS]` and a vocabulary that has that control token, as vLLM picks the format
//!   by the tokenizer's version. After `[TOOL_CALLS]` the name is masked to the tools'
//!   names, `[ARGS]` is allowed once a whole name is written, and the arguments are masked
//!   to that tool's `parameters` ([`crate::json_mode::Constraint::Named`]).
//! - [`ToolCallParser::Granite`]: `<|tool_call|>[{"name": …, "arguments": …}, …]` (Granite
//!   3.0–3.3, whose templates write past calls so): read as Mistral's list, after Granite's
//!   `<|tool_call|>` token. (Granite 3.1's `<tool_call>[…]` is Hermes' block with a list in
//!   it, which [`ToolCallParser::Hermes`] reads; Granite 4 writes Hermes' blocks.)
//! - [`ToolCallParser::Phi4MiniJson`]: `functools[{"name": …, "arguments": …}, …]` (Phi-4-mini,
//!   with vLLM's `tool_chat_template_phi4_mini.jinja`): the text `functools`, then a JSON list
//!   of calls. A `functools` in the model's prose opens a call too, as it does for vLLM's
//!   parser.
//! - [`ToolCallParser::Pythonic`]: an answer that is a Python list of calls,
//!   `[get_weather(city="Rome"), now()]` (Llama 3.2 and 4 with Meta's pythonic templates,
//!   ToolACE): a call list where the answer's first character is `[`, text otherwise; the list
//!   ends the answer. Masked through its JSON ([`crate::pythonic`]).
//! - [`ToolCallParser::DeepSeekV3`]: `<｜tool▁calls▁begin｜>` then, per call,
//!   ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>name\n```json\n{…}\n```<｜tool▁call▁end｜>``,
//!   then `<｜tool▁calls▁end｜>` (DeepSeek-V3 and R1, the R1 distillations of Qwen and Llama),
//!   chosen where the template writes `<｜tool▁sep｜>` and a `` ```json `` fence.
//! - [`ToolCallParser::DeepSeekV31`]: the same block, each call
//!   `<｜tool▁call▁begin｜>name<｜tool▁sep｜>{…}<｜tool▁call▁end｜>` (DeepSeek-V3.1 and later),
//!   chosen where the template writes `<｜tool▁sep｜>` without the fence.
//!   Both are masked part by part ([`crate::json_mode::Constraint::Named`]): after the block's
//!   token only a call's token, then the fixed text and the tools' names, then that tool's
//!   arguments; after a call, whitespace, the next call or the block's end. The answer is
//!   decoded with special tokens kept, as vLLM's parsers read it.
//! - [`ToolCallParser::Qwen3Coder`] reads Qwen3-Coder's blocks (Qwen3.5's template writes
//!   them too), once per call: `<tool_call>`, `\n<function=name>\n`, per parameter
//!   `<parameter=key>\nvalue\n</parameter>\n`, then `</function>\n</tool_call>`; a value
//!   is raw text where its schema takes a string and JSON otherwise, masked through the JSON
//!   it stands for ([`crate::xml_calls`]). A call that leaves out its `<tool_call>` and
//!   opens with `<function=` in the text is masked and read as one from there (vLLM's
//!   parser and llama.cpp's take such calls too); the content is the text before it.
//! - `parallel_tool_calls: false`: one call, which ends the answer.
//!
//! Decisions, where vLLM's parser is the model:
//! - The content is the text before the first call's opening; `null` when it is only
//!   whitespace (vLLM's Granite and Phi-4-mini parsers drop it; it is kept here as for the
//!   other formats). Text after the last call is dropped. A Llama 3 call has no content.
//! - A block that is not a whole call (an answer cut by `max_tokens`) makes the whole answer
//!   content, as vLLM does when its parser fails.
//! - A call's `arguments` is the model's JSON written again compactly, as a string.

use serde_json::Value;

use std::sync::Arc;

use crate::json_mode::{CallFormat, Constraint, OpenTag, Opening, Part};
use crate::json_schema::Schema;

/// A model family's tool-call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolCallParser {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>`.
    Hermes,
    /// `{"name": …, "parameters": …}` as the whole answer.
    #[value(name = "llama3_json")]
    Llama3Json,
    /// `[TOOL_CALLS]` (a control token) then a JSON list of calls; with a v11 template and
    /// vocabulary, [`ToolCallParser::MistralV11`].
    Mistral,
    /// `[TOOL_CALLS]name[ARGS]{…}` per call; not a flag's value (see [`ToolCallParser::refine`]).
    #[value(skip)]
    MistralV11,
    /// `<|tool_call|>` (a control token) then a JSON list of calls.
    Granite,
    /// `functools` then a JSON list of calls.
    #[value(name = "phi4_mini_json")]
    Phi4MiniJson,
    /// `[name(key=value, …), …]` as the whole answer.
    Pythonic,
    /// DeepSeek-V3's and R1's block of calls, each a type, name and fenced JSON.
    #[value(name = "deepseek_v3")]
    DeepSeekV3,
    /// DeepSeek-V3.1's block of calls, each a name and JSON.
    #[value(name = "deepseek_v31")]
    DeepSeekV31,
    /// `<tool_call>` then `<function=name>` and its `<parameter=key>`s (vLLM's `qwen3_coder`
    /// and `qwen3_xml`).
    #[value(name = "qwen3_coder", alias = "qwen3_xml")]
    Qwen3Coder,
    /// No format: `tool_choice: "auto"` is refused.
    None,
}

/// What a call in the model's format is masked to.
#[derive(Debug, Clone)]
pub enum CallShape {
    /// One JSON value: a call, or a list of them.
    Json(Arc<Schema>),
    /// A tool's name, then its arguments, each tool's by its own schema (written in the
    /// parts of [`ToolCallParser::call_format`]).
    Named(Arc<[(String, Arc<Schema>)]>),
}

/// One call read from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as compact JSON text.
    pub arguments: String,
}

/// An answer split into what it says and what it calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAnswer {
    /// The text before the first call (`None`: only whitespace).
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

impl ToolCallParser {
    /// The format a chat template's own text implies: Hermes where it mentions
    /// `<tool_call>`, Llama 3's JSON where it asks for it in Llama 3.1–3.3's words, else
    /// none (vLLM asks for the flag; a template that writes the format into the prompt
    /// already says which one the model was taught).
    pub fn detect(template: &str) -> ToolCallParser {
        if template.contains(DEEPSEEK_SEP) {
            match template.contains(DEEPSEEK_V3_FENCE.trim()) {
                true => ToolCallParser::DeepSeekV3,
                false => ToolCallParser::DeepSeekV31,
            }
        } else if template.contains(GRANITE_OPEN) {
            ToolCallParser::Granite
        } else if template.contains(PHI4_ASK) {
            ToolCallParser::Phi4MiniJson
        } else if template.contains(PYTHONIC_ASK) {
            ToolCallParser::Pythonic
        } else if template.contains(XML_FUNCTION) {
            // Qwen3-Coder's `<tool_call><function=…><parameter=…>` blocks: Hermes' tag, but
            // not Hermes' JSON inside it.
            ToolCallParser::Qwen3Coder
        } else if template.contains(HERMES_OPEN) {
            ToolCallParser::Hermes
        } else if template.contains(MISTRAL_OPEN) {
            ToolCallParser::Mistral.refine(template)
        } else if template.contains(LLAMA3_ASK) {
            ToolCallParser::Llama3Json
        } else {
            ToolCallParser::None
        }
    }

    /// Mistral's v11 format where the chat template writes calls with `[ARGS]` (a template
    /// of Mistral's earlier format, or none, keeps the JSON list).
    pub fn refine(self, template: &str) -> ToolCallParser {
        match self {
            ToolCallParser::Mistral if template.contains(MISTRAL_ARGS) => {
                ToolCallParser::MistralV11
            }
            p => p,
        }
    }

    /// Where a call starts, after which the answer is masked to the call's schema;
    /// `token_id` finds a control token's id in the vocabulary (`None`: the format cannot
    /// be read with this vocabulary).
    pub fn opening(self, token_id: impl Fn(&str) -> Option<u32>) -> Option<Opening> {
        match self {
            ToolCallParser::Hermes => Some(Opening::tag(HERMES_OPEN)),
            ToolCallParser::Qwen3Coder => Some(Opening::Tags(Arc::new([
                OpenTag {
                    text: HERMES_OPEN.into(),
                    given: "",
                },
                OpenTag {
                    text: XML_FUNCTION.into(),
                    given: XML_CALL_START,
                },
            ]))),
            ToolCallParser::Llama3Json => Some(Opening::Start('{')),
            ToolCallParser::Mistral => token_id(MISTRAL_OPEN).map(Opening::Token),
            ToolCallParser::MistralV11
            | ToolCallParser::DeepSeekV3
            | ToolCallParser::DeepSeekV31 => {
                self.call_format(token_id)?.opening().map(Opening::Token)
            }
            ToolCallParser::Granite => token_id(GRANITE_OPEN).map(Opening::Token),
            ToolCallParser::Phi4MiniJson => Some(Opening::tag(PHI4_OPEN)),
            ToolCallParser::Pythonic => Some(Opening::Start('[')),
            ToolCallParser::None => None,
        }
    }

    /// The text a call opens with (Hermes' tag, a control token's text); `None` for a
    /// format that opens by the answer's first character.
    fn open_text(self) -> Option<&'static str> {
        match self {
            ToolCallParser::Hermes | ToolCallParser::Qwen3Coder => Some(HERMES_OPEN),
            ToolCallParser::Mistral | ToolCallParser::MistralV11 => Some(MISTRAL_OPEN),
            ToolCallParser::Granite => Some(GRANITE_OPEN),
            ToolCallParser::Phi4MiniJson => Some(PHI4_OPEN),
            ToolCallParser::DeepSeekV3 | ToolCallParser::DeepSeekV31 => Some(DEEPSEEK_CALLS_BEGIN),
            ToolCallParser::Llama3Json | ToolCallParser::Pythonic | ToolCallParser::None => None,
        }
    }

    /// Whether the answer must be decoded with its special tokens for its calls to show.
    pub fn keeps_special_tokens(self) -> bool {
        matches!(
            self,
            ToolCallParser::Mistral
                | ToolCallParser::MistralV11
                | ToolCallParser::Granite
                | ToolCallParser::DeepSeekV3
                | ToolCallParser::DeepSeekV31
        )
    }

    /// How a format whose calls name their tool in text writes a call, with its control
    /// tokens' ids (`None`: the vocabulary lacks one, or the format writes JSON calls).
    pub fn call_format(self, token_id: impl Fn(&str) -> Option<u32>) -> Option<CallFormat> {
        let deepseek_block = || {
            Some((
                token_id(DEEPSEEK_CALLS_BEGIN)?,
                token_id(DEEPSEEK_CALLS_END)?,
            ))
        };
        let t = |text: &str| token_id(text).map(Part::Token);
        Some(match self {
            ToolCallParser::MistralV11 => CallFormat {
                block: None,
                parts: vec![
                    t(MISTRAL_OPEN)?,
                    Part::Name(""),
                    t(MISTRAL_ARGS)?,
                    Part::Args,
                ],
            },
            ToolCallParser::DeepSeekV31 => CallFormat {
                block: Some(deepseek_block()?),
                parts: vec![
                    t(DEEPSEEK_CALL_BEGIN)?,
                    Part::Name(""),
                    t(DEEPSEEK_SEP)?,
                    Part::Args,
                    t(DEEPSEEK_CALL_END)?,
                ],
            },
            ToolCallParser::DeepSeekV3 => CallFormat {
                block: Some(deepseek_block()?),
                parts: vec![
                    t(DEEPSEEK_CALL_BEGIN)?,
                    Part::Text("function"),
                    t(DEEPSEEK_SEP)?,
                    Part::Name(DEEPSEEK_V3_FENCE),
                    Part::Args,
                    Part::Text(DEEPSEEK_V3_FENCE_END),
                    t(DEEPSEEK_CALL_END)?,
                ],
            },
            _ => return None,
        })
    }

    /// What a call may be, written in this format, of one of `tools`; `parallel`: several
    /// calls in one block where the format has them.
    pub fn shape(self, tools: &[(String, Value)], parallel: bool) -> Result<CallShape, String> {
        let json = |s: Result<Schema, String>| s.map(|s| CallShape::Json(Arc::new(s)));
        match (self, parallel) {
            (ToolCallParser::Hermes, true) => json(Schema::tool_calls(tools)),
            // A list even for one call, as Mistral's models write it (or a lone call).
            (ToolCallParser::Mistral, parallel) => {
                json(Schema::tool_calls_upto(tools, (!parallel).then_some(1)))
            }
            // Only a list: Granite's and Phi-4-mini's parsers read no lone call.
            (ToolCallParser::Granite | ToolCallParser::Phi4MiniJson, parallel) => {
                json(Schema::tool_call_list(tools, (!parallel).then_some(1)))
            }
            (
                ToolCallParser::MistralV11
                | ToolCallParser::DeepSeekV3
                | ToolCallParser::DeepSeekV31,
                _,
            ) => {
                let named = tools
                    .iter()
                    .map(|(name, params)| Ok((name.clone(), Arc::new(Schema::compile(params)?))));
                Ok(CallShape::Named(
                    named.collect::<Result<Vec<_>, String>>()?.into(),
                ))
            }
            (ToolCallParser::Llama3Json, _) => json(Schema::tool_call_keyed(tools, "parameters")),
            (ToolCallParser::Pythonic, parallel) => {
                json(Schema::pythonic_calls(tools, (!parallel).then_some(1)))
            }
            (ToolCallParser::Qwen3Coder, _) => json(Schema::xml_call(tools)),
            _ => json(Schema::tool_call(tools)),
        }
    }

    /// The answer's [`Constraint`]: free text in which calls of `shape` are masked once they
    /// open (`None` where the vocabulary lacks the format's control tokens).
    pub fn constraint(
        self,
        shape: &CallShape,
        once: bool,
        token_id: impl Fn(&str) -> Option<u32>,
    ) -> Option<Constraint> {
        let opening = self.opening(&token_id)?;
        let token_id = &token_id;
        Some(match shape {
            CallShape::Json(schema) => Constraint::After {
                opening,
                schema: schema.clone(),
                once,
            },
            CallShape::Named(tools) => Constraint::Named {
                format: Arc::new(self.call_format(token_id)?),
                tools: tools.clone(),
                once,
            },
        })
    }

    /// Whether the answer ends with its first call.
    pub fn once(self, parallel: bool) -> bool {
        !parallel || matches!(self, ToolCallParser::Llama3Json | ToolCallParser::Pythonic)
    }

    /// How much of an unfinished answer `text` may be sent as content now: all but what may
    /// still turn out to be a call.
    pub fn content_so_far(self, text: &str) -> usize {
        if let Some(open) = self.open_text() {
            // Qwen3-Coder's calls may also open with their `<function=` alone.
            let bare = (self == ToolCallParser::Qwen3Coder).then_some(XML_FUNCTION);
            let opens = std::iter::once(open).chain(bare);
            return match opens.clone().filter_map(|o| text.find(o)).min() {
                Some(at) => at,
                None => text.len() - opens.map(|o| partial_opening(text, o)).max().unwrap_or(0),
            };
        }
        let first = match self {
            ToolCallParser::Llama3Json => '{',
            ToolCallParser::Pythonic => '[',
            _ => return text.len(),
        };
        // Formats whose call is the whole answer: nothing is sent until its first
        // character says which.
        let t = text.trim_start();
        match t.is_empty() || t.starts_with(first) {
            true => 0,
            false => text.len(),
        }
    }

    /// `text`, an answer masked to `shape`, split into content and calls; `None` where it
    /// opens no call, or a block is not a whole call (the answer is then content, as it is).
    pub fn parse(self, text: &str, shape: &CallShape) -> Option<ParsedAnswer> {
        if let (ToolCallParser::Qwen3Coder, CallShape::Json(schema)) = (self, shape) {
            return parse_xml(text, schema);
        }
        if self == ToolCallParser::Pythonic {
            return Some(ParsedAnswer {
                content: None,
                calls: crate::pythonic::parse(text)?,
            });
        }
        if let ToolCallParser::DeepSeekV3 | ToolCallParser::DeepSeekV31 = self {
            return self.parse_deepseek(text);
        }
        if self == ToolCallParser::Llama3Json {
            // The first JSON value of the answer; what follows it is not read.
            let t = text.trim_start();
            if !t.starts_with('{') {
                return None;
            }
            let mut values = serde_json::Deserializer::from_str(t).into_iter::<Value>();
            let call = call_of(&values.next()?.ok()?)?;
            return Some(ParsedAnswer {
                content: None,
                calls: vec![call],
            });
        }
        let open = self.open_text()?;
        let first = text.find(open)?;
        let mut calls = Vec::new();
        let mut rest = &text[first..];
        while let Some(at) = rest.find(open) {
            let body = &rest[at + open.len()..];
            let (value, after) = match self {
                ToolCallParser::MistralV11 => {
                    // name[ARGS]{…}: the name up to the arguments token (or, decoded without
                    // special tokens, the arguments' brace), then the first JSON value.
                    let end = body.find(MISTRAL_ARGS).or_else(|| body.find('{'))?;
                    let name = Some(body[..end].trim()).filter(|n| !n.is_empty())?;
                    let args = body[end..]
                        .strip_prefix(MISTRAL_ARGS)
                        .unwrap_or(&body[end..]);
                    let mut values = serde_json::Deserializer::from_str(args).into_iter::<Value>();
                    let arguments = values.next()?.ok()?;
                    let after = &args[values.byte_offset()..];
                    (
                        serde_json::json!({"name": name, "arguments": arguments}),
                        after,
                    )
                }
                ToolCallParser::Mistral
                | ToolCallParser::Granite
                | ToolCallParser::Phi4MiniJson => {
                    // The first JSON value after the opening; text after it is not a call.
                    let mut values = serde_json::Deserializer::from_str(body).into_iter::<Value>();
                    let v = values.next()?.ok()?;
                    (v, &body[values.byte_offset()..])
                }
                _ => {
                    let (inner, after) = match body.find(HERMES_CLOSE) {
                        Some(end) => (&body[..end], &body[end + HERMES_CLOSE.len()..]),
                        None => (body, ""),
                    };
                    (serde_json::from_str::<Value>(inner.trim()).ok()?, after)
                }
            };
            match value {
                Value::Array(list) if !list.is_empty() => {
                    for v in &list {
                        calls.push(call_of(v)?);
                    }
                }
                v @ Value::Object(_) => calls.push(call_of(&v)?),
                _ => return None,
            }
            rest = after;
        }
        let content = &text[..first];
        Some(ParsedAnswer {
            content: (!content.trim().is_empty()).then(|| content.to_owned()),
            calls,
        })
    }
}

impl ToolCallParser {
    /// DeepSeek's block of calls read as vLLM's `deepseek_v3` and `deepseek_v31` parsers
    /// do: each whole `<｜tool▁call▁begin｜>…<｜tool▁call▁end｜>` in it is a call (a type, then
    /// the name and fenced JSON for V3; the name, then JSON for V3.1).
    fn parse_deepseek(self, text: &str) -> Option<ParsedAnswer> {
        let first = text.find(DEEPSEEK_CALLS_BEGIN)?;
        let mut rest = &text[first + DEEPSEEK_CALLS_BEGIN.len()..];
        let mut calls = Vec::new();
        while let Some(at) = rest.find(DEEPSEEK_CALL_BEGIN) {
            let body = &rest[at + DEEPSEEK_CALL_BEGIN.len()..];
            let end = body.find(DEEPSEEK_CALL_END)?;
            let (head, tail) = body[..end].split_once(DEEPSEEK_SEP)?;
            let (name, args) = match self {
                ToolCallParser::DeepSeekV3 => {
                    let (name, fenced) = tail.split_once(DEEPSEEK_V3_FENCE)?;
                    (name, fenced.trim_end().strip_suffix("```")?)
                }
                _ => (head, tail),
            };
            let arguments: Value = serde_json::from_str(args.trim()).ok()?;
            calls.push(call_of(
                &serde_json::json!({"name": name.trim(), "arguments": arguments}),
            )?);
            rest = &body[end + DEEPSEEK_CALL_END.len()..];
        }
        let content = &text[..first];
        Some(ParsedAnswer {
            content: (!content.trim().is_empty()).then(|| content.to_owned()),
            calls: Some(calls).filter(|c| !c.is_empty())?,
        })
    }
}

/// Qwen3-Coder's calls, each block read as [`crate::xml_calls`] masks it (what follows the
/// call's `</function>` in its block, the `</tool_call>`, is not read).
fn parse_xml(text: &str, schema: &Schema) -> Option<ParsedAnswer> {
    // The next call: after its `<tool_call>`, or from a `<function=` without one (vLLM's and
    // llama.cpp's fallback), whichever comes first; where it starts, where its body does,
    // and what the body is taken to have begun with.
    let next = |s: &str| {
        let tagged = s
            .find(HERMES_OPEN)
            .map(|at| (at, at + HERMES_OPEN.len(), ""));
        let bare = (s.find(XML_FUNCTION)).map(|at| (at, at + XML_FUNCTION.len(), XML_CALL_START));
        tagged.into_iter().chain(bare).min()
    };
    let (first, ..) = next(text)?;
    let mut rest = &text[first..];
    let mut calls = Vec::new();
    while let Some((_, body, given)) = next(rest) {
        let body = &rest[body..];
        let (json, used) = crate::json_schema::xml_call_json(schema, given, body)?;
        calls.push(call_of(&serde_json::from_str(&json).ok()?)?);
        rest = &body[used..];
    }
    let content = &text[..first];
    Some(ParsedAnswer {
        content: (!content.trim().is_empty()).then(|| content.to_owned()),
        calls,
    })
}

const HERMES_OPEN: &str = "<tool_call>";
const DEEPSEEK_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DEEPSEEK_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DEEPSEEK_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DEEPSEEK_CALL_END: &str = "<｜tool▁call▁end｜>";
const DEEPSEEK_SEP: &str = "<｜tool▁sep｜>";
/// What DeepSeek-V3's and R1's templates write between a call's name and its arguments, and
/// after the arguments.
const DEEPSEEK_V3_FENCE: &str = "\n```json\n";
const DEEPSEEK_V3_FENCE_END: &str = "\n```";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const HERMES_CLOSE: &str = "</tool_call>";
const GRANITE_OPEN: &str = "<|tool_call|>";
const PHI4_OPEN: &str = "functools";
/// How Qwen3-Coder's template writes a call's function.
const XML_FUNCTION: &str = "<function=";
/// How a Qwen3-Coder call starts after its `<tool_call>`.
const XML_CALL_START: &str = "\n<function=";
/// What vLLM's Phi-4-mini template shows a model given tools.
const PHI4_ASK: &str = "functools[";
/// What Meta's pythonic templates (Llama 3.2's in vLLM's examples, Llama 4's) ask of a model
/// given tools.
const PYTHONIC_ASK: &str = "[func_name1(params_name1=params_value1";
/// What Llama 3.1–3.3's templates ask of a model given tools.
const LLAMA3_ASK: &str = "\"parameters\": dictionary of argument name and its value";

/// A call written as `{"name": …, "arguments": …}` (or Llama 3's `parameters`; absent:
/// `{}`).
pub fn call_of(v: &Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_owned(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}

/// How many bytes at the end of `text` may be the start of `opening` (the longest suffix
/// that is a proper prefix of it): text a stream holds back until it knows.
pub fn partial_opening(text: &str, opening: &str) -> usize {
    (1..opening.len().min(text.len() + 1))
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k)
                && opening.is_char_boundary(k)
                && text.ends_with(&opening[..k])
        })
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::json_schema::SchemaState;

    /// A shape for the formats read without one (all but Qwen3-Coder's).
    fn free() -> CallShape {
        CallShape::Json(Arc::new(Schema::compile(&serde_json::json!({})).unwrap()))
    }

    /// A call as the parsers read it.
    pub(crate) fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_blocks_are_read_as_calls_after_the_content() {
        let p = ToolCallParser::Hermes;
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\"}</tool_call> trailing";
        assert_eq!(
            p.parse(text, &free()),
            Some(ParsedAnswer {
                content: Some("Let me look.\n".into()),
                calls: vec![
                    call("get_weather", "{\"city\":\"Rome\"}"),
                    call("now", "{}")
                ],
            })
        );
        // SmolLM2's list in one block; no content before it.
        let list = "<tool_call>[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"x\": 1}}]</tool_call>";
        assert_eq!(
            p.parse(list, &free()),
            Some(ParsedAnswer {
                content: None,
                calls: vec![call("a", "{}"), call("b", "{\"x\":1}")],
            })
        );
        // An unclosed last block is read to the end of the text.
        assert_eq!(
            p.parse(
                " \n<tool_call>{\"name\": \"a\", \"arguments\": {}}",
                &free()
            )
            .map(|a| (a.content, a.calls.len())),
            Some((None, 1))
        );
    }

    #[test]
    fn a_llama3_answer_that_starts_with_an_object_is_its_call() {
        let p = ToolCallParser::Llama3Json;
        let one = ParsedAnswer {
            content: None,
            calls: vec![call("now", "{\"tz\":\"UTC\"}")],
        };
        for text in [
            "{\"name\": \"now\", \"parameters\": {\"tz\": \"UTC\"}}",
            " \n{\"name\": \"now\", \"arguments\": {\"tz\": \"UTC\"}}; {\"name\": \"x\"}",
        ] {
            assert_eq!(p.parse(text, &free()), Some(one.clone()), "{text}");
        }
        for text in [
            "The weather is {\"name\": \"now\"}",
            "{\"name\": \"now\", \"parameters\": {\"tz\"",
            "{\"parameters\": {}}",
        ] {
            assert_eq!(p.parse(text, &free()), None, "{text}");
        }
        assert_eq!(p.content_so_far("  "), 0);
        assert_eq!(p.content_so_far(" {\"na"), 0);
        assert_eq!(p.content_so_far(" It is {"), 8);
        assert_eq!(ToolCallParser::Hermes.content_so_far("Hi <tool"), 3);
        assert_eq!(ToolCallParser::Hermes.content_so_far("Hi <tool_call>{"), 3);
        assert!(p.once(true) && ToolCallParser::Hermes.once(false));
        assert!(!ToolCallParser::Hermes.once(true));
    }

    #[test]
    fn mistral_calls_follow_their_token_as_a_list() {
        let p = ToolCallParser::Mistral;
        let text = "Let me check. [TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": 1}}, \
                    {\"name\": \"b\", \"arguments\": {}}]";
        assert_eq!(
            p.parse(text, &free()),
            Some(ParsedAnswer {
                content: Some("Let me check. ".into()),
                calls: vec![call("a", "{\"x\":1}"), call("b", "{}")],
            })
        );
        assert_eq!(
            p.parse(
                "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {}}] and on",
                &free()
            ),
            Some(ParsedAnswer {
                content: None,
                calls: vec![call("a", "{}")],
            })
        );
        assert_eq!(
            p.parse("[TOOL_CALLS] [{\"name\": \"a\"", &free()),
            None,
            "cut short"
        );
        assert_eq!(p.parse("no call", &free()), None);
        assert_eq!(p.content_so_far("Sure [TOOL"), 5);
        assert_eq!(p.content_so_far("Sure [TOOL_CALLS] [{"), 5);
        let ids = |t: &str| (t == "[TOOL_CALLS]").then_some(5);
        assert_eq!(p.opening(ids), Some(Opening::Token(5)));
        assert_eq!(p.opening(|_| None), None, "a vocabulary without the token");
        assert!(p.keeps_special_tokens() && !ToolCallParser::Hermes.keeps_special_tokens());
    }

    /// Granite 3's `<|tool_call|>` and Phi-4-mini's `functools`, each before a list.
    #[test]
    fn granite_and_phi4_mini_calls_are_a_list_after_their_opening() {
        let list = "[{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \
                    \"arguments\": {}}]";
        for (p, open) in [
            (ToolCallParser::Granite, "<|tool_call|>"),
            (ToolCallParser::Phi4MiniJson, "functools"),
        ] {
            assert_eq!(
                p.parse(&format!("{open}{list}<|end_of_text|>"), &free()),
                Some(ParsedAnswer {
                    content: None,
                    calls: vec![call("a", "{\"x\":1}"), call("b", "{}")],
                }),
                "{p:?}"
            );
            assert_eq!(
                p.parse(&format!("Checking. {open}{list}"), &free())
                    .unwrap()
                    .content,
                Some("Checking. ".into())
            );
            assert_eq!(
                p.parse(&format!("{open}[{{\"name\": \"a\""), &free()),
                None,
                "cut short"
            );
            assert_eq!(p.parse(list, &free()), None, "no opening");
            assert_eq!(p.content_so_far(&format!("Sure {}", &open[..4])), 5);
            assert_eq!(p.content_so_far(&format!("Sure {open}[")), 5);
            let tools = [("a".to_string(), serde_json::json!({"type": "object"}))];
            let CallShape::Json(schema) = p.shape(&tools, false).unwrap() else {
                panic!("{p:?}: a JSON list")
            };
            assert!(SchemaState::new(&schema).accepts(&schema, "[{\"name\": \"a\""));
            assert!(
                !SchemaState::new(&schema).accepts(&schema, "{"),
                "{p:?}: a list"
            );
        }
        let ids = |t: &str| (t == "<|tool_call|>").then_some(7);
        let granite = ToolCallParser::Granite;
        assert_eq!(granite.opening(ids), Some(Opening::Token(7)));
        assert_eq!(granite.opening(|_| None), None);
        assert!(granite.keeps_special_tokens());
        let phi = ToolCallParser::Phi4MiniJson;
        assert_eq!(phi.opening(|_| None), Some(Opening::tag("functools")));
        assert!(!phi.keeps_special_tokens() && !phi.once(true) && phi.once(false));
    }

    /// Python calls, masked to the tools through their JSON: the declared keywords in order,
    /// the required ones always, a name among the tools, an enum's values, Python's literals.
    #[test]
    fn pythonic_calls_are_a_list_masked_to_the_tools() {
        let p = ToolCallParser::Pythonic;
        let tools = [
            (
                "weather_now".to_string(),
                serde_json::json!({"type": "object", "properties": {
                    "location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "array", "items": {"type": "boolean"}}},
                    "required": ["location", "unit"]}),
            ),
            ("now".to_string(), serde_json::json!({"type": "object"})),
        ];
        let CallShape::Json(schema) = p.shape(&tools, true).unwrap() else {
            panic!("one value")
        };
        let whole = "[weather_now(location=\"Rome\", unit=\"celsius\", days=[True, False]), now()]";
        let short = "[weather_now(location=\"Rome\", unit=\"celsius\")]";
        for whole in [whole, &whole.replace('"', "'"), short] {
            let mut st = SchemaState::new(&schema);
            assert!(st.push(&schema, whole) && st.complete(), "{whole}");
        }
        for bad in [
            "[weather(",
            "[weather_now(unit=",
            "[weather_now(location=\"Rome\", unit=\"kelvin",
            "[weather_now(location=\"Rome\", unit=\"celsius\", days=[true",
            "[weather_now(location=\"Rome\")",
            "[weather_now(location='Rome', unit='kelvin",
            "{",
        ] {
            assert!(!SchemaState::new(&schema).accepts(&schema, bad), "{bad}");
        }
        let CallShape::Json(one) = p.shape(&tools, false).unwrap() else {
            panic!("one value")
        };
        assert!(
            !SchemaState::new(&one).accepts(&one, "[now(), "),
            "one call"
        );
        let bad = [(
            "f".to_string(),
            serde_json::json!({"properties": {"a-b": {}}}),
        )];
        assert!(p.shape(&bad, true).unwrap_err().contains("\"a-b\""));

        assert_eq!(
            p.parse(&format!(" {whole}"), &free()),
            Some(ParsedAnswer {
                content: None,
                calls: vec![
                    call(
                        "weather_now",
                        "{\"location\":\"Rome\",\"unit\":\"celsius\",\"days\":[true,false]}"
                    ),
                    call("now", "{}")
                ],
            })
        );
        assert_eq!(p.parse("[now(", &free()), None, "cut short");
        assert_eq!(p.parse("It is sunny.", &free()), None);
        assert_eq!(p.content_so_far(" "), 0);
        assert_eq!(p.content_so_far(" [now"), 0);
        assert_eq!(p.content_so_far("It"), 2);
        assert_eq!(p.opening(|_| None), Some(Opening::Start('[')));
        assert!(p.once(true) && !p.keeps_special_tokens());
    }

    #[test]
    fn text_without_a_whole_call_is_not_a_call() {
        let p = ToolCallParser::Hermes;
        for text in [
            "just an answer",
            "<tool_call>{\"name\": \"a\", \"argu",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call>",
            "<tool_call>[]</tool_call>",
            "<tool_call>{\"name\": \"a\"}</tool_call><tool_call>oops</tool_call>",
        ] {
            assert_eq!(p.parse(text, &free()), None, "{text}");
        }
        assert_eq!(
            ToolCallParser::None.parse("<tool_call>{\"name\": \"a\"}", &free()),
            None
        );
    }

    #[test]
    fn mistral_v11_calls_are_a_name_then_its_arguments() {
        let p = ToolCallParser::MistralV11;
        let text = "Checking.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}\
                    [TOOL_CALLS]now[ARGS]{}</s>";
        assert_eq!(
            p.parse(text, &free()),
            Some(ParsedAnswer {
                content: Some("Checking.".into()),
                calls: vec![
                    call("get_weather", "{\"city\":\"Rome\"}"),
                    call("now", "{}")
                ],
            })
        );
        // Decoded without special tokens, `[ARGS]` is gone, as vLLM's tests write it.
        assert_eq!(
            p.parse("[TOOL_CALLS]add{\"a\": 1}", &free())
                .map(|a| a.calls),
            Some(vec![call("add", "{\"a\":1}")])
        );
        for cut in [
            "[TOOL_CALLS]get_weather[ARGS]{\"city\"",
            "[TOOL_CALLS][ARGS]{}",
            "[TOOL_CALLS]now[ARGS][1]",
        ] {
            assert_eq!(p.parse(cut, &free()), None, "{cut}");
        }
        assert_eq!(p.content_so_far("Sure [TOOL"), 5);
        // Both control tokens are needed.
        let ids = |t: &str| match t {
            "[TOOL_CALLS]" => Some(5),
            "[ARGS]" => Some(6),
            _ => None,
        };
        assert_eq!(p.opening(ids), Some(Opening::Token(5)));
        assert_eq!(p.opening(|t| (t == "[TOOL_CALLS]").then_some(5)), None);
        assert!(p.keeps_special_tokens());
        let tools = [("now".to_string(), serde_json::json!({"type": "object"}))];
        let shape = p.shape(&tools, true).unwrap();
        match p.constraint(&shape, false, ids) {
            Some(Constraint::Named { format, once, .. }) => {
                assert!(!once);
                assert_eq!(format.block, None);
                assert_eq!(
                    format.parts,
                    [Part::Token(5), Part::Name(""), Part::Token(6), Part::Args]
                );
            }
            other => panic!("{other:?}"),
        }
        let shape = ToolCallParser::Mistral.shape(&tools, true).unwrap();
        assert!(matches!(
            ToolCallParser::Mistral.constraint(&shape, true, ids),
            Some(Constraint::After {
                opening: Opening::Token(5),
                once: true,
                ..
            })
        ));
    }

    #[test]
    fn deepseek_blocks_are_read_call_by_call() {
        let v3 = ToolCallParser::DeepSeekV3;
        let text = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>\
                    get_weather\n```json\n{\"city\": \"Rome\"}\n```<｜tool▁call▁end｜>\n\
                    <｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```\
                    <｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let a = v3.parse(text, &free()).unwrap();
        assert_eq!(a.content.as_deref(), Some("Let me check."));
        assert_eq!(
            a.calls,
            [
                call("get_weather", "{\"city\":\"Rome\"}"),
                call("now", "{}")
            ]
        );
        let v31 = ToolCallParser::DeepSeekV31;
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>\
                    {\"city\": \"Rome\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let a = v31.parse(text, &free()).unwrap();
        assert_eq!(a.content, None);
        assert_eq!(a.calls, [call("get_weather", "{\"city\":\"Rome\"}")]);
        // A call cut short, arguments that are not an object, no call: the answer is text.
        for cut in [
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{}",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>[1]<｜tool▁call▁end｜>",
            "<｜tool▁calls▁begin｜><｜tool▁calls▁end｜>",
            "no calls",
        ] {
            assert_eq!(v31.parse(cut, &free()), None, "{cut}");
        }
        // V3's fence is needed by V3's reading.
        assert_eq!(v3.parse(text, &free()), None);
        assert_eq!(v31.content_so_far("Sure<｜tool▁calls"), 4);

        // Every control token is needed; the block's token opens the calls.
        let names = [
            DEEPSEEK_CALLS_BEGIN,
            DEEPSEEK_CALLS_END,
            DEEPSEEK_CALL_BEGIN,
            DEEPSEEK_SEP,
            DEEPSEEK_CALL_END,
        ];
        let ids = |t: &str| names.iter().position(|n| *n == t).map(|i| 10 + i as u32);
        assert_eq!(v3.opening(ids), Some(Opening::Token(10)));
        assert_eq!(v31.opening(|t| ids(t).filter(|&i| i != 13)), None);
        assert!(v3.keeps_special_tokens() && v31.keeps_special_tokens());
        let tools = [("now".to_string(), serde_json::json!({"type": "object"}))];
        let shape = v3.shape(&tools, false).unwrap();
        match v3.constraint(&shape, v3.once(false), ids) {
            Some(Constraint::Named { format, once, .. }) => {
                assert!(once);
                assert_eq!(format.block, Some((10, 11)));
                assert_eq!(
                    format.parts,
                    [
                        Part::Token(12),
                        Part::Text("function"),
                        Part::Token(13),
                        Part::Name("\n```json\n"),
                        Part::Args,
                        Part::Text("\n```"),
                        Part::Token(14),
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// Qwen3-Coder's blocks, read by the steps that mask them: raw text for a string (quotes
    /// as written), JSON for the rest; a block that is not a whole call the tools allow
    /// leaves the answer text.
    #[test]
    fn qwen3_coder_calls_are_read_as_their_mask_reads_them() {
        let p = ToolCallParser::Qwen3Coder;
        let params = serde_json::json!({"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"},
            "unit": {"enum": ["c", "f"]}, "opts": {"type": "object"}},
            "required": ["city", "days"]});
        let shape = p.shape(&[("get_weather".into(), params)], true).unwrap();
        let call_of = |city: &str, days: &str| {
            format!(
                "<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n\
                 <parameter=days>\n{days}\n</parameter>\n<parameter=unit>\nc\n</parameter>\n\
                 <parameter=opts>\n{{\"a\": [1]}}\n</parameter>\n</function>\n</tool_call>"
            )
        };
        let text = format!(
            "Let me check.\n{}\n{}",
            call_of("New \"York\"", "3"),
            call_of("Rome", "1")
        );
        let a = p.parse(&text, &shape).unwrap();
        assert_eq!(a.content.as_deref(), Some("Let me check.\n"));
        let args = r#""unit":"c","opts":{"a":[1]}}"#;
        assert_eq!(
            a.calls,
            [
                call(
                    "get_weather",
                    &format!(r#"{{"city":"New \"York\"","days":3,{args}"#)
                ),
                call(
                    "get_weather",
                    &format!(r#"{{"city":"Rome","days":1,{args}"#)
                ),
            ]
        );
        let rome = call_of("Rome", "1");
        assert_eq!(p.parse(&rome, &shape).unwrap().content, None);
        // A call without its `<tool_call>`, from its `<function=`, after text and before a
        // tagged one.
        let bare = "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n\
                    <parameter=days>\n2\n</parameter>\n</function>";
        let a = p.parse(&format!("Sure.\n{bare}\n{rome}"), &shape).unwrap();
        assert_eq!(a.content.as_deref(), Some("Sure.\n"));
        assert_eq!(
            a.calls[0],
            call("get_weather", r#"{"city":"Oslo","days":2}"#)
        );
        assert_eq!(
            a.calls[1].arguments,
            format!(r#"{{"city":"Rome","days":1,{args}"#)
        );
        assert_eq!(p.content_so_far("Sure <func"), 5, "held back");
        assert_eq!(p.content_so_far(&format!("Sure {bare}")), 5);
        assert_eq!(p.content_so_far("Sure <tool_call>\n<function="), 5);
        // The optional parameters left out.
        let required = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n\
                        <parameter=days>\n1\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(
            p.parse(required, &shape).unwrap().calls,
            [call("get_weather", r#"{"city":"Rome","days":1}"#)]
        );
        let cut = &rome[..rome.find("</function>").unwrap()];
        for bad in [
            cut,
            &call_of("Rome", "three"),
            "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>",
            "<tool_call>\n<function=now>\n</function>\n</tool_call>",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}",
            "<function=get_weather>\n</function>",
            "<function=now>\n</function>",
            "No call.",
        ] {
            assert_eq!(p.parse(bad, &shape), None, "{bad}");
        }
        // Parameters' names must be writable inside `<parameter=…>`.
        let spaced = serde_json::json!({"type": "object", "properties": {"a b": {}}});
        let err = p.shape(&[("f".into(), spaced)], true).unwrap_err();
        assert!(err.contains("\"a b\""), "{err}");
    }

    #[test]
    fn the_format_is_detected_from_the_template() {
        assert_eq!(
            ToolCallParser::detect("{% for tool in tools %}...<tool_call>\n"),
            ToolCallParser::Hermes
        );
        assert_eq!(
            ToolCallParser::detect("{{ bos_token }}{% for m in messages %}"),
            ToolCallParser::None
        );
        // Llama 3.2's template, as Meta wrote it.
        let llama = "{{- 'Respond in the format {\"name\": function name, \"parameters\": \
                     dictionary of argument name and its value}.' }}";
        assert_eq!(ToolCallParser::detect(llama), ToolCallParser::Llama3Json);
        // DeepSeek-R1's (and V3's) template fences the arguments; V3.1's does not.
        let r1 = "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' \
                  + tool['function']['name'] + '\\n' + '```json' + '\\n' + \
                  tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}";
        assert_eq!(ToolCallParser::detect(r1), ToolCallParser::DeepSeekV3);
        let v31 = "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + \
                   '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}";
        assert_eq!(ToolCallParser::detect(v31), ToolCallParser::DeepSeekV31);
        // Mistral 7B Instruct v0.3's.
        assert_eq!(
            ToolCallParser::detect("{{- \"[AVAILABLE_TOOLS] [\" }}...{{- \"[TOOL_CALLS] [\" }}"),
            ToolCallParser::Mistral
        );
        // Mistral Small 3.2's, and the flag refined by it.
        let v11 = "{{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}";
        assert_eq!(ToolCallParser::detect(v11), ToolCallParser::MistralV11);
        assert_eq!(
            ToolCallParser::Mistral.refine(v11),
            ToolCallParser::MistralV11
        );
        assert_eq!(ToolCallParser::Mistral.refine(""), ToolCallParser::Mistral);
        assert_eq!(ToolCallParser::Hermes.refine(v11), ToolCallParser::Hermes);
        // Granite 3's way of writing a past call; its token is looked for before Hermes' tag.
        let granite = "{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' + \
                       message.tool_calls | tojson }} <tool_call>";
        assert_eq!(ToolCallParser::detect(granite), ToolCallParser::Granite);
        // vLLM's Phi-4-mini template.
        let phi = "all function calls should be generated in a single JSON list formatted \
                   as functools[{\"name\": [function name], \"arguments\": [function \
                   arguments as JSON]}, ...]";
        assert_eq!(ToolCallParser::detect(phi), ToolCallParser::Phi4MiniJson);
        // Qwen3-Coder's, whose blocks are not Hermes' JSON.
        let xml = "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}";
        assert_eq!(ToolCallParser::detect(xml), ToolCallParser::Qwen3Coder);
        // vLLM's Llama 3.2 pythonic template, in Meta's words.
        let pythonic = "you MUST put it in the format of [func_name1(params_name1=params_value1, \
                        params_name2=params_value2...), func_name2(params)]";
        assert_eq!(ToolCallParser::detect(pythonic), ToolCallParser::Pythonic);
    }

    #[test]
    fn a_partial_opening_is_held_back() {
        let open = "<tool_call>";
        assert_eq!(partial_opening("Sure <tool_c", open), 7);
        assert_eq!(partial_opening("a <", open), 1);
        assert_eq!(partial_opening("a < b", open), 0);
        assert_eq!(partial_opening("<tool_call>", open), 0);
        assert_eq!(partial_opening("", open), 0);
        assert_eq!(partial_opening("é", open), 0);
    }
}
