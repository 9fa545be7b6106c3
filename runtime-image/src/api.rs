//! The OpenAI wire format: request bodies, validation into engine requests, and the error body.
//! Plain data and pure functions; the HTTP plumbing lives in `server`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::chat::{ChatMessage, ChatOptions};
use crate::engine::Ending;
use crate::grammar::Grammar;
use crate::json_mode::Constraint;
use crate::json_schema::{Schema, TextPattern};
use crate::sampling::SamplingParams;
use crate::tool_calls::{CallShape, ToolCallParser};

/// An error as OpenAI reports it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
    pub fn with_status(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }
    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or a list of parts of which only text is supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant turn's calls (passed to the template as given).
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A `tool` turn's call id.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "false_if_null")]
    pub include_usage: bool,
    /// vLLM's: with `include_usage`, every chunk of a choice carries the usage so far.
    #[serde(default, deserialize_with = "false_if_null")]
    pub continuous_usage_stats: bool,
}

impl StreamOptions {
    /// Whether every chunk carries the usage so far (vLLM asks `include_usage` too).
    pub fn continuous(&self) -> bool {
        self.include_usage && self.continuous_usage_stats
    }
}

/// Sampling fields shared by chat and completions.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    /// vLLM's and llama.cpp's `min_p`.
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// POST /v1/chat/completions
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(default, deserialize_with = "false_if_null")]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StopSpec>,
    #[serde(default, deserialize_with = "false_if_null")]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub n: Option<i64>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    #[serde(flatten)]
    pub unsupported: ChatUnsupported,
    #[serde(flatten)]
    pub vllm: VllmFields,
    #[serde(flatten)]
    pub template: TemplateFields,
}

/// vLLM's fields for how `messages` are rendered (chat and `/tokenize`).
#[derive(Debug, Clone, Deserialize)]
pub struct TemplateFields {
    /// Open the assistant's turn (default `true`).
    #[serde(default = "yes", deserialize_with = "true_if_null")]
    pub add_generation_prompt: bool,
    /// Continue the last message instead (a prefilled answer).
    #[serde(default, deserialize_with = "false_if_null")]
    pub continue_final_message: bool,
    /// More variables for the chat template.
    pub chat_template_kwargs: Option<Value>,
}

impl TemplateFields {
    /// The rendering these ask for, checked against `messages` ([`ChatOptions::check`]).
    pub fn options(&self, messages: &[ChatMessage]) -> Result<ChatOptions, ApiError> {
        let kwargs = match &self.chat_template_kwargs {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(o.clone()),
            Some(v) => {
                return Err(ApiError::invalid(
                    format!("chat_template_kwargs must be an object, got {v}"),
                    Some("chat_template_kwargs"),
                ));
            }
        };
        let opts = ChatOptions {
            add_generation_prompt: self.add_generation_prompt,
            continue_final_message: self.continue_final_message,
            kwargs,
        };
        opts.check(messages)
            .map_err(|(msg, field)| ApiError::invalid(msg, Some(field)))?;
        Ok(opts)
    }
}

/// Chat fields of OpenAI's API that shape the answer beyond sampling: tools, the response
/// format, and the legacy functions. What kandle cannot do with them is refused rather than
/// silently ignored (a client asking for JSON or a tool call must not get plain text it takes
/// for either). Other unknown fields are ignored, as vLLM and TGI do.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ChatUnsupported {
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// `false`: at most one call ([`ChatUnsupported::tool_use`]).
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
}

/// vLLM's sampling fields beyond OpenAI's, which vLLM's clients and load generators
/// (`benchmark_serving`, genai-perf, llmperf) send: read, where ignoring them would change
/// what a client measures or gets.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct VllmFields {
    /// Generate to `max_tokens`: the end-of-text tokens are masked, as llama.cpp's server
    /// reads it (vLLM samples them and goes on; either way the answer runs to its limit).
    #[serde(default, deserialize_with = "false_if_null")]
    pub ignore_eos: bool,
    /// Tokens before which neither an end-of-text token, nor `stop_token_ids`, nor a stop
    /// sequence ends the answer.
    pub min_tokens: Option<i64>,
    /// More tokens that end the answer, kept in it as vLLM keeps them (a special token's
    /// text is empty).
    pub stop_token_ids: Option<Vec<i64>>,
    /// [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f32>,
    /// The stop sequence, or the token, that ended the answer stays at its end.
    #[serde(default, deserialize_with = "false_if_null")]
    pub include_stop_str_in_output: bool,
    /// `false`: special tokens' text stays in the answer (default `true`).
    pub skip_special_tokens: Option<bool>,
    /// vLLM's guided decoding ([`VllmFields::guided`]), and its newer `structured_outputs`
    /// object of the same (`json`, `regex`, `choice`, `grammar`, `json_object`).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub structured_outputs: Option<Value>,
    /// llama.cpp's server's names for a GBNF grammar and a JSON schema, read as
    /// `guided_grammar` and `guided_json`, so that its clients' constraints are not ignored.
    pub grammar: Option<Value>,
    pub json_schema: Option<Value>,
    /// vLLM's left truncation of the prompt ([`VllmFields::truncate_prompt`]).
    pub truncate_prompt_tokens: Option<i64>,
}

impl VllmFields {
    /// vLLM's `truncate_prompt_tokens`: `k` ≥ 1 keeps the prompt's last `k` tokens (after the
    /// chat template), -1 its last `context` (the model's length); absent, the prompt is
    /// whole. Other values get a 400 naming the field.
    pub fn truncate_prompt(&self, prompt: Vec<u32>, context: usize) -> Result<Vec<u32>, ApiError> {
        let keep = match self.truncate_prompt_tokens {
            None => return Ok(prompt),
            Some(-1) => context,
            Some(k) if k >= 1 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("truncate_prompt_tokens must be -1 or at least 1, got {k}"),
                    Some("truncate_prompt_tokens"),
                ));
            }
        };
        let cut = prompt.len().saturating_sub(keep);
        Ok(match cut {
            0 => prompt,
            _ => prompt[cut..].to_vec(),
        })
    }

    /// What vLLM's guided decoding fields constrain the answer to: a JSON schema (as
    /// `response_format`'s), a regex the whole answer matches, one of a list of texts, or
    /// text a GBNF grammar derives ([`crate::grammar`]; also llama.cpp's `grammar` and
    /// `json_schema`). More than one field is refused.
    pub fn guided(&self) -> Result<Option<Constraint>, ApiError> {
        let mut given: Vec<(&'static str, &Value)> = Vec::new();
        for (name, v) in [
            ("guided_json", &self.guided_json),
            ("guided_regex", &self.guided_regex),
            ("guided_choice", &self.guided_choice),
            ("guided_grammar", &self.guided_grammar),
            ("grammar", &self.grammar),
            ("json_schema", &self.json_schema),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
                given.push((name, v));
            }
        }
        match &self.structured_outputs {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                for (k, v) in o {
                    let name = match k.as_str() {
                        "json" => "structured_outputs.json",
                        "regex" => "structured_outputs.regex",
                        "choice" => "structured_outputs.choice",
                        "grammar" => "structured_outputs.grammar",
                        "json_object" => "structured_outputs.json_object",
                        _ => continue, // backend options and the like
                    };
                    if !v.is_null() && v != &Value::Bool(false) {
                        given.push((name, v));
                    }
                }
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    format!("structured_outputs must be an object, got {v}"),
                    Some("structured_outputs"),
                ));
            }
        }
        let (name, v) = match given.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            more => {
                let names: Vec<&str> = more.iter().map(|(n, _)| *n).collect();
                return Err(ApiError::invalid(
                    format!("send one of {}", names.join(", ")),
                    Some(more[1].0.split('.').next().unwrap_or("guided_json")),
                ));
            }
        };
        let param = name.split('.').next().unwrap_or(name);
        let bad = |e: String| ApiError::invalid(format!("{name}: {e}"), Some(param));
        let kind = match name {
            "json_schema" => "json",
            _ => name.rsplit(['.', '_']).next().unwrap_or(name),
        };
        Ok(Some(match kind {
            "json" => {
                // A schema, or its JSON text.
                let parsed;
                let schema = match v {
                    Value::String(text) => {
                        parsed = serde_json::from_str::<Value>(text)
                            .map_err(|e| bad(format!("not JSON: {e}")))?;
                        &parsed
                    }
                    v => v,
                };
                Constraint::Schema(std::sync::Arc::new(Schema::compile(schema).map_err(bad)?))
            }
            "object" => Constraint::Object,
            "regex" => {
                let re = v
                    .as_str()
                    .ok_or_else(|| bad(format!("must be a string, got {v}")))?;
                Constraint::Regex(std::sync::Arc::new(TextPattern::whole(re).map_err(bad)?))
            }
            "choice" => {
                let choices: Vec<String> = v
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_owned)).collect())
                    .ok_or_else(|| bad(format!("must be a non-empty list of strings, got {v}")))?;
                Constraint::Regex(std::sync::Arc::new(
                    TextPattern::choice(&choices).map_err(bad)?,
                ))
            }
            _ => {
                let text = v
                    .as_str()
                    .ok_or_else(|| bad(format!("must be a GBNF grammar's text, got {v}")))?;
                Constraint::Grammar(std::sync::Arc::new(Grammar::parse(text).map_err(bad)?))
            }
        }))
    }

    /// The request's [`Ending`]: `stop_token_ids` checked against the vocabulary (`vocab`
    /// ids), `min_tokens` against the request's `max_tokens`.
    pub fn ending(&self, max_tokens: usize, vocab: usize) -> Result<Ending, ApiError> {
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(n) if n >= 0 && n as usize <= max_tokens => n as usize,
            Some(n) => {
                return Err(ApiError::invalid(
                    format!("min_tokens must be between 0 and max_tokens ({max_tokens}), got {n}"),
                    Some("min_tokens"),
                ));
            }
        };
        let mut stop_ids = Vec::new();
        for &id in self.stop_token_ids.iter().flatten() {
            if id < 0 || id as usize >= vocab {
                return Err(ApiError::invalid(
                    format!(
                        "stop_token_ids: {id} is not a token id of this model (0 to {})",
                        vocab - 1
                    ),
                    Some("stop_token_ids"),
                ));
            }
            stop_ids.push(id as u32);
        }
        Ok(Ending {
            ignore_eos: self.ignore_eos,
            min_tokens,
            stop_ids,
            include_stop_str: self.include_stop_str_in_output,
            keep_special: self.skip_special_tokens == Some(false),
        })
    }
}

/// Completions fields of OpenAI's API that kandle implements in part (as [`ChatUnsupported`]):
/// `suffix` for models with fill-in-the-middle tokens ([`crate::fim`]), `best_of` 1.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct CompletionUnsupported {
    pub suffix: Option<Value>,
    pub best_of: Option<Value>,
}

fn unsupported(param: &'static str, what: &str) -> ApiError {
    ApiError::invalid(
        format!("{param} is not supported by this server ({what})"),
        Some(param),
    )
}

/// A chat request's tools ([`ChatUnsupported::tool_use`]).
#[derive(Debug, Clone)]
pub struct ToolUse {
    /// The tools as given, for the chat template.
    pub tools: Value,
    /// A call the answer must be.
    pub call: Option<ForcedCall>,
    /// `tool_choice: "auto"`: the model may call, in its own format, a tool of this schema
    /// ([`Schema::tool_calls`]).
    pub auto: Option<AutoCalls>,
}

/// Calls the model may make in its own format ([`crate::tool_calls`]).
#[derive(Debug, Clone)]
pub struct AutoCalls {
    pub parser: ToolCallParser,
    pub shape: CallShape,
    /// The answer ends with its first call (`parallel_tool_calls: false`, or a format of
    /// one call).
    pub once: bool,
}

/// A forced tool call: with `name`, the answer is that tool's arguments; without, it is
/// `{"name": …, "arguments": …}` for one of the tools.
#[derive(Debug, Clone)]
pub struct ForcedCall {
    pub name: Option<String>,
    pub schema: std::sync::Arc<Schema>,
}

impl ChatUnsupported {
    /// Refuses the legacy `functions` and `function_call` set to more than their "off"
    /// values. `tools` and `tool_choice` are read by [`ChatUnsupported::tool_use`],
    /// `response_format` by [`ChatUnsupported::json_constraint`].
    pub fn check(&self) -> Result<(), ApiError> {
        let empty = |v: &Option<Value>| match v {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            _ => false,
        };
        let none = |v: &Option<Value>| {
            matches!(v, None | Some(Value::Null))
                || v.as_ref().and_then(Value::as_str) == Some("none")
        };
        // `tools` and `tool_choice`: [`ChatUnsupported::tool_use`].
        if !empty(&self.functions) {
            return Err(unsupported(
                "functions",
                "the legacy functions field; send tools",
            ));
        }
        if !none(&self.function_call) {
            return Err(unsupported(
                "function_call",
                "no function calling; only \"none\" is accepted",
            ));
        }
        // `response_format`: [`ChatUnsupported::json_constraint`].
        Ok(())
    }

    /// What the request's `tools` ask: none listed (`None`); listed for the template, a call
    /// forced, left to the model, or not made. `"required"` and a named function force a
    /// call whose arguments follow the tool's `parameters` ([`crate::json_schema`]), as
    /// vLLM's guided decoding does. `"auto"`, the default when tools are given, lets the
    /// model answer or call in its own format, read by `parser` ([`crate::tool_calls`]);
    /// with no parser (`--tool-call-parser none`, or a template that shows no format) it is
    /// refused, rather than answering with calls the client would take for text.
    pub fn tool_use(&self, parser: ToolCallParser) -> Result<Option<ToolUse>, ApiError> {
        let tools = match &self.tools {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => &a[..],
            Some(t) => {
                return Err(ApiError::invalid(
                    format!("tools must be a list, got {t}"),
                    Some("tools"),
                ));
            }
        };
        let choice = match &self.tool_choice {
            None | Some(Value::Null) if tools.is_empty() => return Ok(None),
            None | Some(Value::Null) => "auto",
            Some(Value::String(c)) => c.as_str(),
            Some(Value::Object(_)) => "function",
            Some(c) => {
                return Err(ApiError::invalid(
                    format!(
                        "tool_choice must be \"none\", \"auto\", \"required\" or a function, got {c}"
                    ),
                    Some("tool_choice"),
                ));
            }
        };
        let mut listed: Vec<(String, Value)> = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let bad =
                |what: String| ApiError::invalid(format!("tools[{i}]: {what}"), Some("tools"));
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad("only tools of type \"function\" are supported".into()));
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad("function is missing".into()))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(bad(format!(
                    "function.name must be 1 to 64 letters, digits, _ or -, got {:?}",
                    f.get("name")
                )));
            }
            if listed.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("the function name {name:?} is given twice")));
            }
            let params = f
                .get("parameters")
                .filter(|p| !p.is_null())
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            Schema::compile(&params).map_err(|e| bad(format!("function.parameters: {e}")))?;
            listed.push((name.to_owned(), params));
        }
        let forced = |name: &str| -> Result<ForcedCall, ApiError> {
            let (_, params) = listed.iter().find(|(n, _)| n == name).ok_or_else(|| {
                ApiError::invalid(
                    format!("tool_choice names {name:?}, which is not among the tools"),
                    Some("tool_choice"),
                )
            })?;
            let schema = Schema::compile(params).expect("compiled above");
            Ok(ForcedCall {
                name: Some(name.to_owned()),
                schema: std::sync::Arc::new(schema),
            })
        };
        let call = match choice {
            "none" if tools.is_empty() => return Ok(None),
            _ if tools.is_empty() => {
                return Err(ApiError::invalid(
                    format!("tool_choice {choice:?} needs tools"),
                    Some("tool_choice"),
                ));
            }
            "none" => None,
            "auto" if parser != ToolCallParser::None => {
                let parallel = self.parallel_tool_calls != Some(false);
                let shape = (parser.shape(&listed, parallel))
                    .map_err(|e| ApiError::invalid(e, Some("tools")))?;
                return Ok(Some(ToolUse {
                    tools: Value::Array(tools.to_vec()),
                    call: None,
                    auto: Some(AutoCalls {
                        parser,
                        shape,
                        once: parser.once(parallel),
                    }),
                }));
            }
            "auto" => {
                return Err(unsupported(
                    "tool_choice",
                    "\"auto\", the default when tools are given: this model's chat template \
                     shows no tool-call format that kandle reads its calls by, and the server \
                     was not started with --tool-call-parser. Send \"required\" or \
                     {\"type\": \"function\", \"function\": {\"name\": …}} to have the \
                     answer be a call whose arguments follow the tool's parameters, or \
                     \"none\"",
                ));
            }
            "required" if listed.len() == 1 => Some(forced(&listed[0].0)?),
            "required" => Some(ForcedCall {
                name: None,
                schema: std::sync::Arc::new(
                    Schema::tool_call(&listed).map_err(|e| ApiError::invalid(e, Some("tools")))?,
                ),
            }),
            "function" => {
                let name = self
                    .tool_choice
                    .as_ref()
                    .filter(|c| c.get("type").and_then(Value::as_str) == Some("function"))
                    .and_then(|c| c.get("function"))
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                            Some("tool_choice"),
                        )
                    })?;
                Some(forced(name)?)
            }
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "tool_choice must be \"none\", \"auto\", \"required\" or a function, got {other:?}"
                    ),
                    Some("tool_choice"),
                ));
            }
        };
        Ok(Some(ToolUse {
            tools: Value::Array(tools.to_vec()),
            call,
            auto: None,
        }))
    }

    /// What `response_format` constrains the answer to ([`json_constraint`]).
    pub fn json_constraint(&self) -> Result<Option<Constraint>, ApiError> {
        json_constraint(self.response_format.as_ref())
    }
}

/// What a `response_format` constrains the answer to: JSON mode, a compiled schema, or
/// nothing (`text`, or absent). Another type, or a schema kandle does not follow
/// ([`crate::json_schema`]), is refused naming what it holds.
pub fn json_constraint(format: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    let f = match format {
        None | Some(Value::Null) => return Ok(None),
        Some(f) => f,
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::Object)),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema is missing",
                        Some("response_format"),
                    )
                })?;
            let compiled = Schema::compile(schema).map_err(|e| {
                ApiError::invalid(
                    format!("response_format.json_schema: {e}"),
                    Some("response_format"),
                )
            })?;
            Ok(Some(Constraint::Schema(std::sync::Arc::new(compiled))))
        }
        _ => Err(unsupported(
            "response_format",
            &format!(
                "only the types \"text\", \"json_object\" (JSON mode) and \"json_schema\", \
                 got {}",
                f.get("type")
                    .map_or_else(|| f.to_string(), Value::to_string)
            ),
        )),
    }
}

impl CompletionUnsupported {
    /// The insertion's `suffix`: `None` for none or an empty one, a 400 when it is not text.
    pub fn suffix(&self) -> Result<Option<&str>, ApiError> {
        match &self.suffix {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::invalid(
                format!("suffix must be a string, got {v}"),
                Some("suffix"),
            )),
        }
    }

    /// Refuses `best_of` above 1.
    pub fn check(&self) -> Result<(), ApiError> {
        match &self.best_of {
            None | Some(Value::Null) => Ok(()),
            Some(v) if v.as_i64() == Some(1) => Ok(()),
            Some(v) => Err(unsupported("best_of", &format!("only 1, got {v}"))),
        }
    }
}

/// The largest bias `logit_bias` takes either way, as OpenAI's API.
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Validates `logit_bias` (token ids as strings, as JSON object keys must be, each with a bias
/// in [-100, 100]) against a vocabulary of `vocab` tokens; the pairs in id order.
pub fn logit_bias(
    bias: Option<&BTreeMap<String, f32>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(bias.len());
    for (key, &b) in bias {
        let id: u32 = key.trim().parse().map_err(|_| {
            ApiError::invalid(
                format!("logit_bias keys must be token ids (integers), got {key:?}"),
                Some("logit_bias"),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid(
                format!("logit_bias names token {id}, but the vocabulary has {vocab} tokens"),
                Some("logit_bias"),
            ));
        }
        if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b) {
            return Err(ApiError::invalid(
                format!("logit_bias values must be between -100 and 100, got {b} for token {id}"),
                Some("logit_bias"),
            ));
        }
        out.push((id, b));
    }
    out.sort_unstable_by_key(|p| p.0);
    out.dedup_by_key(|p| p.0);
    Ok(out)
}

/// `prompt` of /v1/completions in OpenAI's four forms: a string, token ids, or a list of
/// either. Each prompt of a list is a request of its own (OpenAI's and vLLM's batch of
/// prompts); token ids are fed as given, with no beginning-of-text token added.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "prompt must be a string, a list of strings, a list of token ids (integers \
                 from 0) or a list of such lists"
)]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// One prompt of a [`PromptSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt<'a> {
    Text(&'a str),
    Tokens(&'a [u32]),
}

impl PromptSpec {
    /// The prompts, in order. An empty list is none (`[]` parses as a list of strings).
    pub fn prompts(&self) -> Vec<Prompt<'_>> {
        match self {
            PromptSpec::One(s) => vec![Prompt::Text(s)],
            PromptSpec::Many(v) => v.iter().map(|s| Prompt::Text(s)).collect(),
            PromptSpec::Tokens(t) => vec![Prompt::Tokens(t)],
            PromptSpec::ManyTokens(v) => v.iter().map(|t| Prompt::Tokens(t)).collect(),
        }
    }
}

/// Validates the number of sequences a request of `prompts` prompts of `n` choices each runs:
/// at least one prompt, and no more sequences than `capacity` (the running batch plus the
/// queue), since they are admitted together.
pub fn check_prompts(prompts: usize, n: usize, capacity: usize) -> Result<(), ApiError> {
    if prompts == 0 {
        return Err(ApiError::invalid("prompt is an empty list", Some("prompt")));
    }
    if prompts * n > capacity {
        return Err(ApiError::invalid(
            format!(
                "{prompts} prompts of {n} choices each are {} sequences, more than this server \
                 runs and queues at once ({capacity})",
                prompts * n
            ),
            Some("prompt"),
        ));
    }
    Ok(())
}

/// POST /v1/completions
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptSpec,
    #[serde(default, deserialize_with = "false_if_null")]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StopSpec>,
    /// The legacy API's `logprobs` is the number of alternatives.
    pub logprobs: Option<i64>,
    pub n: Option<i64>,
    #[serde(default, deserialize_with = "false_if_null")]
    pub echo: bool,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// vLLM's: JSON mode or a schema on completions as on chat ([`json_constraint`]).
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub unsupported: CompletionUnsupported,
    #[serde(flatten)]
    pub vllm: VllmFields,
}

/// POST /tokenize (vLLM's route): a prompt as completions tokenises it, or messages as chat
/// renders and tokenises them.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<MessageIn>>,
    /// With `prompt`: the tokenizer's special tokens (completions adds them).
    #[serde(default = "yes", deserialize_with = "true_if_null")]
    pub add_special_tokens: bool,
    /// With `messages`: how they are rendered, as on chat.
    #[serde(flatten)]
    pub template: TemplateFields,
}

fn yes() -> bool {
    true
}

/// A boolean field that OpenAI's API also takes as `null`, meaning its default (clients that
/// serialise every field send `"stream": null`); absent or null is `false`.
fn false_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// As [`false_if_null`], for a field whose default is `true`.
fn true_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

/// POST /detokenize (vLLM's route).
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<u32>,
}

/// `input` of /v1/embeddings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// POST /v1/embeddings
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

/// `input` of /v1/classify: one text or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ClassifyInput {
    One(String),
    Many(Vec<String>),
}

/// POST /v1/classify (kandle's own route, in the spirit of transformers' text-classification
/// pipeline and TEI's /predict): labels with scores per input, best first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub model: String,
    pub input: ClassifyInput,
    /// How many labels to return per input, best first; all when absent.
    pub top_k: Option<i64>,
}

/// Validates `top_k` of /v1/classify against the number of labels; `None` means all.
pub fn classify_top_k(top_k: Option<i64>, num_labels: usize) -> Result<usize, ApiError> {
    match top_k {
        None => Ok(num_labels),
        Some(k) if k >= 1 => Ok((k as u64).min(num_labels as u64) as usize),
        Some(k) => Err(ApiError::invalid(
            format!("top_k must be at least 1, got {k}"),
            Some("top_k"),
        )),
    }
}

/// POST /v1/rerank (and /rerank): the shape of Jina's and Cohere's rerank APIs, which vLLM
/// serves for cross-encoders. Other fields (`max_chunks_per_doc`, `rank_fields`, …) are
/// ignored, as vLLM does.
#[derive(Debug, Clone, Deserialize)]
pub struct RerankRequest {
    pub model: String,
    pub query: String,
    pub documents: Vec<RerankDocument>,
    /// The best `top_n` documents; all when absent or 0.
    pub top_n: Option<i64>,
    /// Whether each result carries its document's text (default: true, as Jina and vLLM).
    pub return_documents: Option<bool>,
}

/// A document to rank: its text, or an object with it (`{"text": …}`, Cohere's and Jina's).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RerankDocument {
    Text(String),
    Object { text: String },
}

impl RerankDocument {
    pub fn text(&self) -> &str {
        match self {
            RerankDocument::Text(t) | RerankDocument::Object { text: t } => t,
        }
    }
}

/// POST /v1/score (and /score), vLLM's: the score of each pair of `text_1` and `text_2`.
#[derive(Debug, Clone, Deserialize)]
pub struct ScoreRequest {
    pub model: String,
    pub text_1: ClassifyInput,
    pub text_2: ClassifyInput,
}

/// vLLM's pairing of a score request's texts: one first text against each second, or the
/// two lists side by side; a 400 naming `text_2` when their lengths differ otherwise, or a
/// list is empty.
pub fn score_pairs<'a>(
    first: &'a ClassifyInput,
    second: &'a ClassifyInput,
) -> Result<Vec<(&'a str, &'a str)>, ApiError> {
    let list = |t: &'a ClassifyInput| -> Vec<&'a str> {
        match t {
            ClassifyInput::One(s) => vec![s.as_str()],
            ClassifyInput::Many(v) => v.iter().map(String::as_str).collect(),
        }
    };
    let (a, b) = (list(first), list(second));
    if a.is_empty() || b.is_empty() {
        let param = if a.is_empty() { "text_1" } else { "text_2" };
        return Err(ApiError::invalid(
            format!("{param} must not be empty"),
            Some(param),
        ));
    }
    match (a.len(), b.len()) {
        (1, _) => Ok(b.iter().map(|&t| (a[0], t)).collect()),
        (n, m) if n == m => Ok(a.into_iter().zip(b).collect()),
        (n, m) => Err(ApiError::invalid(
            format!(
                "text_1 holds {n} texts and text_2 {m}: give one text_1 for every text_2, or a \
                 single text_1"
            ),
            Some("text_2"),
        )),
    }
}

/// The documents' indices, best score first (ties in the order given), cut to `top_n`
/// (`None` or 0: all), or a 400 naming `top_n` when it is negative.
pub fn rerank_order(scores: &[f32], top_n: Option<i64>) -> Result<Vec<usize>, ApiError> {
    let keep = match top_n {
        None | Some(0) => scores.len(),
        Some(n) if n > 0 => (n as u64).min(scores.len() as u64) as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                format!("top_n must be at least 0, got {n}"),
                Some("top_n"),
            ));
        }
    };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order.truncate(keep);
    Ok(order)
}

/// The most top_logprobs OpenAI allows.
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// The most stop sequences OpenAI allows.
pub const MAX_STOPS: usize = 4;

/// Validates the sampling fields.
pub fn sampling_params(
    f: &SamplingFields,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let top_k = f.top_k.unwrap_or(0);
    // vLLM uses -1 for "off"; accept it and 0.
    if top_k < -1 {
        return Err(ApiError::invalid(
            format!("top_k must be >= 0 (or -1 for off), got {top_k}"),
            Some("top_k"),
        ));
    }
    let min_p = f.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            format!("min_p must be between 0 and 1, got {min_p}"),
            Some("min_p"),
        ));
    }
    for (name, v) in [
        ("presence_penalty", f.presence_penalty),
        ("frequency_penalty", f.frequency_penalty),
    ] {
        if let Some(v) = v
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::invalid(
                format!("{name} must be between -2 and 2, got {v}"),
                Some(if name == "presence_penalty" {
                    "presence_penalty"
                } else {
                    "frequency_penalty"
                }),
            ));
        }
    }
    let repetition_penalty = f.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(ApiError::invalid(
            format!("repetition_penalty must be greater than 0 (1: off), got {repetition_penalty}"),
            Some("repetition_penalty"),
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k: top_k.max(0) as usize,
        min_p,
        seed: f.seed.map(|s| s as u64),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        repetition_penalty,
        logprobs,
        logit_bias: Vec::new(),
    })
}

/// Validates `max_tokens` against the server's limit; `None` means the limit.
pub fn max_tokens(
    requested: Option<i64>,
    limit: usize,
    param: &'static str,
) -> Result<usize, ApiError> {
    match requested {
        None => Ok(limit),
        Some(n) if n <= 0 => Err(ApiError::invalid(
            format!("{param} must be at least 1, got {n}"),
            Some(param),
        )),
        Some(n) if n as u64 > limit as u64 => Err(ApiError::invalid(
            format!("{param} is {n}, more than this server's limit of {limit}"),
            Some(param),
        )),
        Some(n) => Ok(n as usize),
    }
}

/// Validates the stop sequences.
pub fn stop_sequences(stop: Option<&StopSpec>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!(
                "at most {MAX_STOPS} stop sequences are allowed, got {}",
                list.len()
            ),
            Some("stop"),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop sequences must not be empty",
            Some("stop"),
        ));
    }
    Ok(list)
}

/// The most choices one request may ask for (`n`), as vLLM's default server caps it low
/// rather than OpenAI's 128: each choice is a sequence in the running batch.
pub const MAX_N: usize = 16;

/// Validates `n`, the number of choices: 1 to [`MAX_N`], and no more than `capacity` (the
/// sequences the server runs and queues at once), which could never all be admitted.
pub fn check_n(n: Option<i64>, capacity: usize) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {MAX_N}, got {n}"),
            Some("n"),
        ));
    }
    if n as usize > capacity {
        return Err(ApiError::invalid(
            format!(
                "n is {n}, more sequences than this server runs and queues at once ({capacity})"
            ),
            Some("n"),
        ));
    }
    Ok(n as usize)
}

/// Validates chat messages into what the template renders.
pub fn chat_messages(messages: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must contain at least one message",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(ApiError::invalid(format!("unknown message role {:?}", m.role), Some("messages")));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("content part type {kind:?} is not supported by this text model"),
                                    Some("messages"),
                                ));
                            }
                        }
                    }
                    s
                }
            };
            // "developer" is the newer name of "system"; templates know only the latter.
            let role = if m.role == "developer" { "system".to_owned() } else { m.role.clone() };
            let tool_calls = m.tool_calls.clone().filter(|v| !v.is_null()).map(template_calls);
            Ok(ChatMessage { role, content, tool_calls, tool_call_id: m.tool_call_id.clone() })
        })
        .collect()
}

/// An assistant turn's calls as chat templates take them (transformers' convention, which
/// vLLM follows): each `function.arguments` that OpenAI's API sends as JSON text becomes
/// that JSON's value, and none or an empty one `{}`, so that Llama 3's
/// `tool_call.arguments | tojson` writes the object rather than a quoted string. Text that
/// is not JSON is left as it is.
fn template_calls(mut calls: Value) -> Value {
    for call in calls.as_array_mut().into_iter().flatten() {
        let Some(function) = call.get_mut("function").and_then(Value::as_object_mut) else {
            continue;
        };
        let parsed = match function.get("arguments") {
            None | Some(Value::Null) => Some(serde_json::json!({})),
            Some(Value::String(s)) if s.trim().is_empty() => Some(serde_json::json!({})),
            Some(Value::String(s)) => serde_json::from_str(s).ok(),
            Some(_) => None,
        };
        if let Some(v) = parsed {
            function.insert("arguments".into(), v);
        }
    }
    calls
}

/// Parses a JSON body, turning serde's error into an OpenAI 400.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; a JSON object is expected",
            None,
        ));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::invalid(
            "the request body is not valid UTF-8",
            None,
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "invalid request",
            _ => "malformed JSON",
        };
        ApiError::invalid(format!("{what}: {e}"), None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_must_be_positive_and_within_the_limit() {
        assert_eq!(max_tokens(None, 100, "max_tokens").unwrap(), 100);
        assert_eq!(max_tokens(Some(5), 100, "max_tokens").unwrap(), 5);
        assert_eq!(
            max_tokens(Some(0), 100, "max_tokens").unwrap_err().status,
            400
        );
        assert_eq!(
            max_tokens(Some(-3), 100, "max_tokens").unwrap_err().status,
            400
        );
        assert!(
            max_tokens(Some(101), 100, "max_tokens")
                .unwrap_err()
                .message
                .contains("limit of 100")
        );
    }

    #[test]
    fn n_is_between_1_and_the_cap_and_within_the_servers_capacity() {
        assert_eq!(check_n(None, 40), Ok(1));
        assert_eq!(check_n(Some(3), 40), Ok(3));
        assert_eq!(check_n(Some(MAX_N as i64), 40), Ok(MAX_N));
        for (n, cap, says) in [
            (0, 40, "between 1 and 16"),
            (-2, 40, "between 1 and 16"),
            (17, 40, "between 1 and 16"),
            (5, 4, "runs and queues at once (4)"),
        ] {
            let e = check_n(Some(n), cap).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some("n")));
            assert!(e.message.contains(says), "{}", e.message);
        }
    }

    #[test]
    fn logit_bias_takes_ids_in_the_vocabulary_and_biases_within_100() {
        let map = |pairs: &[(&str, f32)]| -> BTreeMap<String, f32> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        assert_eq!(logit_bias(None, 10).unwrap(), vec![]);
        assert_eq!(
            logit_bias(Some(&map(&[("9", -100.0), ("2", 100.0), ("3", 0.5)])), 10).unwrap(),
            vec![(2, 100.0), (3, 0.5), (9, -100.0)]
        );
        for (bad, says) in [
            (map(&[("x", 1.0)]), "token ids"),
            (map(&[("-1", 1.0)]), "token ids"),
            (map(&[("10", 1.0)]), "vocabulary has 10 tokens"),
            (map(&[("3", 100.5)]), "between -100 and 100"),
            (map(&[("3", f32::NAN)]), "between -100 and 100"),
        ] {
            let e = logit_bias(Some(&bad), 10).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some("logit_bias")), "{bad:?}");
            assert!(e.message.contains(says), "{bad:?}: {}", e.message);
        }
    }

    #[test]
    fn unimplemented_fields_are_refused_unless_off_and_others_ignored() {
        let chat = |extra: Value| -> Result<(), ApiError> {
            let mut body = serde_json::json!({"model": "m", "messages": []});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r: ChatCompletionRequest = serde_json::from_value(body).unwrap();
            r.unsupported.check()?;
            r.unsupported.json_constraint().map(|_| ())
        };
        use serde_json::json;
        for off in [
            json!({}),
            json!({"tools": [], "tool_choice": "none", "functions": null, "function_call": "none"}),
            json!({"response_format": {"type": "text"}, "user": "u", "metadata": {"a": "b"}}),
            json!({"response_format": {"type": "json_object"}}),
        ] {
            assert_eq!(chat(off.clone()), Ok(()), "{off}");
        }
        for (on, param) in [
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": {"name": "f"}}), "function_call"),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format",
            ),
        ] {
            let e = chat(on.clone()).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some(param)), "{on}");
            assert!(e.message.contains("not supported"), "{}", e.message);
        }
        let completion = |extra: Value| -> Result<(), ApiError> {
            let mut body = serde_json::json!({"model": "m", "prompt": "p"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r: CompletionRequest = serde_json::from_value(body).unwrap();
            r.unsupported.check()
        };
        assert_eq!(completion(json!({"suffix": "", "best_of": 1})), Ok(()));
        let suffix = |v: Value| -> Result<Option<String>, ApiError> {
            let r: CompletionRequest =
                serde_json::from_value(json!({"model": "m", "prompt": "p", "suffix": v})).unwrap();
            r.unsupported.suffix().map(|s| s.map(str::to_owned))
        };
        assert_eq!(suffix(json!(" end")), Ok(Some(" end".into())));
        assert_eq!(suffix(json!("")), Ok(None));
        assert_eq!(suffix(json!(null)), Ok(None));
        assert_eq!(suffix(json!(3)).unwrap_err().param, Some("suffix"));
        assert_eq!(
            completion(json!({"best_of": 3})).unwrap_err().param,
            Some("best_of")
        );
    }

    #[test]
    fn out_of_range_sampling_values_are_refused() {
        let bad = [
            SamplingFields {
                temperature: Some(2.5),
                ..Default::default()
            },
            SamplingFields {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingFields {
                top_k: Some(-2),
                ..Default::default()
            },
            SamplingFields {
                min_p: Some(1.5),
                ..Default::default()
            },
            SamplingFields {
                min_p: Some(-0.1),
                ..Default::default()
            },
            SamplingFields {
                presence_penalty: Some(3.0),
                ..Default::default()
            },
        ];
        for f in bad {
            assert_eq!(sampling_params(&f, None).unwrap_err().status, 400, "{f:?}");
        }
        let ok = sampling_params(
            &SamplingFields {
                temperature: Some(0.0),
                seed: Some(-1),
                ..Default::default()
            },
            Some(2),
        )
        .unwrap();
        assert_eq!(ok.temperature, 0.0);
        assert_eq!(ok.logprobs, Some(2));
    }

    #[test]
    fn empty_messages_and_unknown_roles_are_refused() {
        assert_eq!(chat_messages(&[]).unwrap_err().param, Some("messages"));
        let m = MessageIn {
            role: "wizard".into(),
            content: Some(MessageContent::Text("x".into())),
            tool_calls: None,
            tool_call_id: None,
        };
        assert!(chat_messages(&[m]).unwrap_err().message.contains("wizard"));
    }

    #[test]
    fn score_pairs_one_text_against_each_or_side_by_side() {
        let one = |s: &str| ClassifyInput::One(s.into());
        let many = |v: &[&str]| ClassifyInput::Many(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            score_pairs(&one("q"), &many(&["a", "b"])).unwrap(),
            [("q", "a"), ("q", "b")]
        );
        assert_eq!(score_pairs(&many(&["q"]), &one("a")).unwrap(), [("q", "a")]);
        assert_eq!(
            score_pairs(&many(&["x", "y"]), &many(&["a", "b"])).unwrap(),
            [("x", "a"), ("y", "b")]
        );
        let e = score_pairs(&many(&["x", "y"]), &many(&["a", "b", "c"])).unwrap_err();
        assert_eq!(e.param, Some("text_2"));
        let e = score_pairs(&many(&[]), &one("a")).unwrap_err();
        assert_eq!(e.param, Some("text_1"));
    }

    #[test]
    fn truncate_prompt_tokens_keeps_the_prompt_s_end() {
        let fields = |k: Option<i64>| VllmFields {
            truncate_prompt_tokens: k,
            ..Default::default()
        };
        let p: Vec<u32> = (0..10).collect();
        assert_eq!(fields(None).truncate_prompt(p.clone(), 4).unwrap(), p);
        assert_eq!(
            fields(Some(3)).truncate_prompt(p.clone(), 100).unwrap(),
            [7, 8, 9]
        );
        assert_eq!(fields(Some(30)).truncate_prompt(p.clone(), 100).unwrap(), p);
        assert_eq!(
            fields(Some(-1)).truncate_prompt(p.clone(), 4).unwrap(),
            [6, 7, 8, 9]
        );
        for bad in [0, -2] {
            let e = fields(Some(bad)).truncate_prompt(p.clone(), 4).unwrap_err();
            assert_eq!(e.param, Some("truncate_prompt_tokens"));
        }
    }

    #[test]
    fn rerank_orders_best_first_and_keeps_top_n() {
        let scores = [0.2, 0.9, 0.5, 0.9];
        assert_eq!(rerank_order(&scores, None).unwrap(), [1, 3, 2, 0]);
        assert_eq!(rerank_order(&scores, Some(0)).unwrap(), [1, 3, 2, 0]);
        assert_eq!(rerank_order(&scores, Some(2)).unwrap(), [1, 3]);
        assert_eq!(rerank_order(&scores, Some(99)).unwrap().len(), 4);
        let e = rerank_order(&scores, Some(-1)).unwrap_err();
        assert_eq!(e.param, Some("top_n"));
        let r: RerankRequest = serde_json::from_str(
            r#"{"model": "m", "query": "q", "documents": ["a", {"text": "b"}], "rank_fields": []}"#,
        )
        .unwrap();
        let texts: Vec<&str> = r.documents.iter().map(RerankDocument::text).collect();
        assert_eq!(texts, ["a", "b"]);
    }

    /// vLLM's `_postprocess_messages`: JSON text becomes its value, none or empty `{}`,
    /// anything else stays.
    #[test]
    fn call_arguments_reach_templates_as_values() {
        let calls = serde_json::json!([
            {"function": {"name": "a", "arguments": "{\"zone\": \"UTC\", \"n\": [1]}"}},
            {"function": {"name": "b", "arguments": ""}},
            {"function": {"name": "c"}},
            {"function": {"name": "d", "arguments": "not json"}},
            {"function": {"name": "e", "arguments": {"already": true}}},
        ]);
        let out = template_calls(calls);
        let args: Vec<&Value> = (0..5).map(|i| &out[i]["function"]["arguments"]).collect();
        assert_eq!(*args[0], serde_json::json!({"zone": "UTC", "n": [1]}));
        assert_eq!(*args[1], serde_json::json!({}));
        assert_eq!(*args[2], serde_json::json!({}));
        assert_eq!(*args[3], "not json");
        assert_eq!(*args[4], serde_json::json!({"already": true}));
    }

    #[test]
    fn tool_calls_and_tool_call_ids_reach_the_template_messages() {
        let messages: Vec<MessageIn> = serde_json::from_value(serde_json::json!([
            {"role": "assistant", "content": null,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"},
            {"role": "user", "content": "hi", "tool_calls": null}
        ]))
        .unwrap();
        let out = chat_messages(&messages).unwrap();
        assert_eq!(out[0].tool_calls.as_ref().unwrap()[0]["id"], "c1");
        // Arguments reach the template as the object their text holds.
        assert_eq!(
            out[0].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
            serde_json::json!({})
        );
        assert_eq!(out[0].content, "");
        assert_eq!(out[1].tool_call_id.as_deref(), Some("c1"));
        assert!(out[2].tool_calls.is_none() && out[2].tool_call_id.is_none());
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let m: MessageIn = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(chat_messages(&[m]).unwrap()[0].content, "ab");
        let m: MessageIn =
            serde_json::from_str(r#"{"role":"user","content":[{"type":"image_url"}]}"#).unwrap();
        assert!(chat_messages(&[m]).is_err());
    }

    #[test]
    fn malformed_json_wrong_types_and_bad_utf8_are_400s_with_a_message() {
        let e = parse_body::<ChatCompletionRequest>(b"{not json").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e =
            parse_body::<ChatCompletionRequest>(br#"{"model":"m","messages":"hi"}"#).unwrap_err();
        assert!(e.message.starts_with("invalid request"), "{}", e.message);
        let e = parse_body::<ChatCompletionRequest>(b"{\"model\":\"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
    }

    #[test]
    fn stop_accepts_a_string_or_up_to_four_strings() {
        assert_eq!(
            stop_sequences(Some(&StopSpec::One("x".into()))).unwrap(),
            vec!["x"]
        );
        let five = StopSpec::Many((0..5).map(|i| i.to_string()).collect());
        assert!(stop_sequences(Some(&five)).is_err());
    }

    #[test]
    fn classify_top_k_defaults_to_all_labels_and_is_capped_by_them() {
        assert_eq!(classify_top_k(None, 3).unwrap(), 3);
        assert_eq!(classify_top_k(Some(1), 3).unwrap(), 1);
        assert_eq!(classify_top_k(Some(10), 3).unwrap(), 3);
        assert_eq!(classify_top_k(Some(0), 3).unwrap_err().param, Some("top_k"));
        let r: ClassifyRequest =
            serde_json::from_str(r#"{"model":"m","input":["a","b"],"top_k":1}"#).unwrap();
        assert!(matches!(r.input, ClassifyInput::Many(ref v) if v.len() == 2));
        assert!(parse_body::<ClassifyRequest>(br#"{"model":"m","input":"a","topk":1}"#).is_err());
    }

    #[test]
    fn the_error_body_has_openai_shape() {
        let b = ApiError::invalid("nope", Some("model")).body();
        assert_eq!(b["error"]["message"], "nope");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "model");
        assert!(b["error"]["code"].is_null());
    }

    #[test]
    fn a_prompt_comes_in_openais_four_forms_and_lists_are_bounded() {
        use serde_json::json;
        let prompts = |v: Value| -> Result<Vec<Vec<String>>, String> {
            let spec: PromptSpec = serde_json::from_value(v).map_err(|e| e.to_string())?;
            Ok(spec
                .prompts()
                .into_iter()
                .map(|p| match p {
                    Prompt::Text(t) => vec![t.to_owned()],
                    Prompt::Tokens(ids) => ids.iter().map(u32::to_string).collect(),
                })
                .collect())
        };
        assert_eq!(prompts(json!("hi")).unwrap(), [["hi"]]);
        assert_eq!(prompts(json!(["a", "b"])).unwrap(), [["a"], ["b"]]);
        assert_eq!(prompts(json!([3, 4])).unwrap(), [["3", "4"]]);
        assert_eq!(
            prompts(json!([[3], [4, 5]])).unwrap(),
            [vec!["3"], vec!["4", "5"]]
        );
        assert!(prompts(json!([])).unwrap().is_empty());
        for bad in [json!([1, "a"]), json!([-1]), json!(3), json!({"a": 1})] {
            let e = prompts(bad.clone()).unwrap_err();
            assert!(e.starts_with("prompt must be a string"), "{bad}: {e}");
        }
        assert!(check_prompts(3, 2, 6).is_ok());
        assert_eq!(check_prompts(4, 2, 6).unwrap_err().param, Some("prompt"));
        assert_eq!(check_prompts(0, 1, 6).unwrap_err().param, Some("prompt"));
    }

    #[test]
    fn every_optional_field_may_be_null_and_means_its_default() {
        use serde_json::json;
        let nulls = |base: Value, fields: &[&str]| {
            let mut b = base;
            for f in fields {
                b[*f] = Value::Null;
            }
            b
        };
        let shared = [
            "stream",
            "stream_options",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "stop",
            "logprobs",
            "n",
            "logit_bias",
        ];
        let chat = nulls(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            &[
                &shared[..],
                &[
                    "max_completion_tokens",
                    "top_logprobs",
                    "tools",
                    "tool_choice",
                    "functions",
                    "function_call",
                    "response_format",
                ],
            ]
            .concat(),
        );
        let r: ChatCompletionRequest = serde_json::from_value(chat).unwrap();
        assert!(!r.stream && !r.logprobs && r.n.is_none() && r.temperature.is_none());
        r.unsupported.check().unwrap();
        let comp = nulls(
            json!({"model": "m", "prompt": "hi"}),
            &[&shared[..], &["echo", "suffix", "best_of"]].concat(),
        );
        let r: CompletionRequest = serde_json::from_value(comp).unwrap();
        assert!(!r.stream && !r.echo && r.logprobs.is_none());
        r.unsupported.check().unwrap();
        let so: StreamOptions = serde_json::from_value(json!({"include_usage": null})).unwrap();
        assert!(!so.include_usage);
        let so: StreamOptions =
            serde_json::from_value(json!({"include_usage": true, "continuous_usage_stats": true}))
                .unwrap();
        assert!(so.continuous());
        let so: StreamOptions =
            serde_json::from_value(json!({"continuous_usage_stats": true})).unwrap();
        assert!(!so.continuous(), "vLLM asks include_usage too");
        let t: TokenizeRequest = serde_json::from_value(
            json!({"model": "m", "prompt": "a", "add_special_tokens": null}),
        )
        .unwrap();
        assert!(t.add_special_tokens);
        // A wrong type is still refused.
        assert!(
            serde_json::from_value::<CompletionRequest>(
                json!({"model": "m", "prompt": "a", "stream": 1})
            )
            .is_err()
        );
    }

    #[test]
    fn response_format_gives_json_mode_or_a_compiled_schema_or_a_reason() {
        use serde_json::json;
        let constraint = |rf: Value| {
            let r: ChatCompletionRequest = serde_json::from_value(
                json!({"model": "m", "messages": [], "response_format": rf}),
            )
            .unwrap();
            r.unsupported.check().unwrap();
            r.unsupported.json_constraint()
        };
        assert!(constraint(json!({"type": "text"})).unwrap().is_none());
        assert!(matches!(
            constraint(json!({"type": "json_object"})).unwrap(),
            Some(Constraint::Object)
        ));
        let schema = json!({"type": "json_schema", "json_schema": {"name": "p", "strict": true,
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}});
        assert!(matches!(
            constraint(schema).unwrap(),
            Some(Constraint::Schema(_))
        ));
        for (rf, says) in [
            (
                json!({"type": "json_schema", "json_schema": {"name": "p"}}),
                "missing",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "iri"}}}),
                "format",
            ),
        ] {
            let e = constraint(rf.clone()).unwrap_err();
            assert_eq!(e.param, Some("response_format"), "{rf}");
            assert!(e.message.contains(says), "{rf}: {}", e.message);
        }
    }

    #[test]
    fn vllm_guided_fields_give_one_constraint_or_a_reason() {
        use serde_json::json;
        let guided = |v: Value| serde_json::from_value::<VllmFields>(v).unwrap().guided();
        assert!(guided(json!({})).unwrap().is_none());
        for v in [
            json!({"guided_json": {"type": "object"}}),
            json!({"guided_json": "{\"type\": \"object\"}"}),
            json!({"structured_outputs": {"json": {"type": "integer"}, "backend": "x"}}),
            json!({"json_schema": {"type": "object"}}),
        ] {
            assert!(
                matches!(guided(v.clone()), Ok(Some(Constraint::Schema(_)))),
                "{v}"
            );
        }
        for v in [
            json!({"guided_regex": "[0-9]+"}),
            json!({"guided_choice": ["yes", "no"]}),
            json!({"structured_outputs": {"choice": ["a"]}}),
            json!({"structured_outputs": {"regex": "a+", "json": null}}),
        ] {
            assert!(
                matches!(guided(v.clone()), Ok(Some(Constraint::Regex(_)))),
                "{v}"
            );
        }
        assert!(matches!(
            guided(json!({"structured_outputs": {"json_object": true}})),
            Ok(Some(Constraint::Object))
        ));
        for v in [
            json!({"guided_grammar": "root ::= [0-9]+"}),
            json!({"structured_outputs": {"grammar": "root ::= \"a\" | \"b\""}}),
            json!({"grammar": "root ::= [0-9]+"}),
        ] {
            assert!(
                matches!(guided(v.clone()), Ok(Some(Constraint::Grammar(_)))),
                "{v}"
            );
        }
        for (v, param, says) in [
            (
                json!({"guided_grammar": "root ::= x"}),
                "guided_grammar",
                "guided_grammar: line 1, column 10: rule `x` is used but not defined",
            ),
            (
                json!({"structured_outputs": {"grammar": "?start: x"}}),
                "structured_outputs",
                "structured_outputs.grammar: line 1: rule `x` is used but not defined",
            ),
            (
                json!({"guided_grammar": {"root": "x"}}),
                "guided_grammar",
                "must be a GBNF grammar's text",
            ),
            (
                json!({"grammar": "root ::= ("}),
                "grammar",
                "grammar: line 1",
            ),
            (json!({"guided_choice": []}), "guided_choice", "non-empty"),
            (json!({"guided_choice": [1]}), "guided_choice", "strings"),
            (
                json!({"guided_regex": "(?=a)"}),
                "guided_regex",
                "not supported",
            ),
            (json!({"guided_json": "{"}), "guided_json", "not JSON"),
            (
                json!({"guided_json": {"type": "string", "format": "iri"}}),
                "guided_json",
                "format",
            ),
            (
                json!({"guided_regex": "a", "guided_choice": ["a"]}),
                "guided_choice",
                "one of",
            ),
            (
                json!({"structured_outputs": 3}),
                "structured_outputs",
                "object",
            ),
        ] {
            let e = guided(v.clone()).unwrap_err();
            assert_eq!(e.param, Some(param), "{v}");
            assert!(e.message.contains(says), "{v}: {}", e.message);
        }
    }

    #[test]
    fn vllm_fields_give_the_ending_or_a_reason() {
        let f: VllmFields = serde_json::from_value(serde_json::json!({
            "ignore_eos": null, "min_tokens": 3, "stop_token_ids": [0, 9],
            "include_stop_str_in_output": true, "skip_special_tokens": false}))
        .unwrap();
        assert_eq!(
            f.ending(5, 10).unwrap(),
            Ending {
                ignore_eos: false,
                min_tokens: 3,
                stop_ids: vec![0, 9],
                include_stop_str: true,
                keep_special: true,
            }
        );
        assert_eq!(f.ending(2, 10).unwrap_err().param, Some("min_tokens"));
        assert_eq!(f.ending(5, 9).unwrap_err().param, Some("stop_token_ids"));
        assert_eq!(
            VllmFields::default().ending(0, 1).unwrap(),
            Ending::default()
        );
    }

    #[test]
    fn tools_force_a_call_by_name_or_required_and_refuse_auto_without_a_parser() {
        use serde_json::json;
        let tool_use_with = |extra: &Value, parser| {
            let mut body = json!({"model": "m", "messages": []});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r: ChatCompletionRequest = serde_json::from_value(body).unwrap();
            r.unsupported.check().unwrap();
            r.unsupported.tool_use(parser)
        };
        let tool_use = |extra: Value| tool_use_with(&extra, ToolCallParser::None);
        let add = json!({"type": "function", "function": {"name": "add", "parameters":
            {"type": "object", "properties": {"a": {"type": "integer"}}}}});
        let now = json!({"type": "function", "function": {"name": "now"}});
        assert!(tool_use(json!({})).unwrap().is_none());
        assert!(
            tool_use(json!({"tools": [], "tool_choice": "none"}))
                .unwrap()
                .is_none()
        );
        let listed = tool_use(json!({"tools": [add], "tool_choice": "none"}))
            .unwrap()
            .unwrap();
        assert!(listed.call.is_none() && listed.tools.as_array().unwrap().len() == 1);
        let named = tool_use(json!({"tools": [add, now],
            "tool_choice": {"type": "function", "function": {"name": "now"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(named.call.unwrap().name.as_deref(), Some("now"));
        let one = tool_use(json!({"tools": [add], "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        assert_eq!(one.call.unwrap().name.as_deref(), Some("add"));
        let either = tool_use(json!({"tools": [add, now], "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        assert!(either.call.unwrap().name.is_none());
        assert!(one.auto.is_none() && either.auto.is_none());
        // With a parser, "auto" (the default with tools) leaves the answer to the model; the
        // other choices are as without one.
        for extra in [
            json!({"tools": [add, now]}),
            json!({"tools": [add, now], "tool_choice": "auto"}),
        ] {
            let auto = tool_use_with(&extra, ToolCallParser::Hermes)
                .unwrap()
                .unwrap();
            assert!(auto.call.is_none(), "{extra}");
            assert_eq!(auto.auto.unwrap().parser, ToolCallParser::Hermes);
        }
        let named = tool_use_with(
            &json!({"tools": [add], "tool_choice": "required"}),
            ToolCallParser::Hermes,
        )
        .unwrap()
        .unwrap();
        assert!(named.call.is_some() && named.auto.is_none());
        for (extra, param, says) in [
            (json!({"tools": [add]}), "tool_choice", "--tool-call-parser"),
            (
                json!({"tools": [add], "tool_choice": "auto"}),
                "tool_choice",
                "--tool-call-parser",
            ),
            (
                json!({"tool_choice": "required"}),
                "tool_choice",
                "needs tools",
            ),
            (
                json!({"tools": [add], "tool_choice": {"type": "function", "function": {"name": "x"}}}),
                "tool_choice",
                "not among",
            ),
            (
                json!({"tools": [{"type": "retrieval"}], "tool_choice": "none"}),
                "tools",
                "function",
            ),
            (
                json!({"tools": [add, add], "tool_choice": "none"}),
                "tools",
                "twice",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "none"}),
                "tools",
                "name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters":
                {"type": "object", "properties": {"d": {"type": "string", "format": "iri"}}}}}],
                "tool_choice": "none"}),
                "tools",
                "format",
            ),
        ] {
            let e = tool_use(extra.clone()).unwrap_err();
            assert_eq!(e.param, Some(param), "{extra}");
            assert!(e.message.contains(says), "{extra}: {}", e.message);
        }
    }
}
