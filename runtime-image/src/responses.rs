//! OpenAI's Responses API (`POST /v1/responses`, which vLLM also serves) over the chat
//! pipeline: a request becomes a chat request (the `instructions` a system message, `input` the
//! messages, `max_output_tokens` the `max_tokens`, `text.format` the `response_format`), and
//! the chat answer, whole or streamed, becomes a response object or the Responses API's typed
//! events. Function tools map to chat's: `tools` and `tool_choice`, past `function_call`
//! and `function_call_output` items to an assistant turn's `tool_calls` and `tool` turns, and
//! the answer's calls to `function_call` items. With `--responses-store N` the last N
//! responses are kept in the server's memory ([`ResponseStore`], as vLLM keeps them with
//! `VLLM_ENABLE_RESPONSES_API_STORE`): `previous_response_id` continues one (its input and
//! output before the new input; its `instructions` are not carried over, as OpenAI's are
//! not), and `GET`/`DELETE /v1/responses/{id}` read and forget one. Without it nothing is
//! stored (`store: false`) and `previous_response_id` is refused. `conversation` (OpenAI's
//! Conversations API) is [`crate::conversations`]'. Built-in tools, images and files and
//! `background` are refused, each by name, rather than ignored. `top_logprobs` (or
//! `include: ["message.output_text.logprobs"]`) gives the output text's log-probabilities,
//! chat's in the same shape.
//!
//! Pure JSON functions; the server runs the chat request between them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use crate::api::ApiError;

/// A stored response: the conversation up to and including its answer, as chat messages
/// (without `instructions`), and the response object `GET` returns.
#[derive(Debug, Clone)]
pub struct Stored {
    pub messages: Vec<Value>,
    pub response: Value,
}

/// The last `capacity` stored responses, by id; the oldest is forgotten first. A server's
/// memory only: a replica does not see another's, nor a restarted server its past.
pub struct ResponseStore {
    capacity: usize,
    kept: Mutex<(HashMap<String, Stored>, VecDeque<String>)>,
}

impl ResponseStore {
    pub fn new(capacity: usize) -> ResponseStore {
        ResponseStore {
            capacity,
            kept: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Whether responses are kept at all (`--responses-store` above 0).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn get(&self, id: &str) -> Option<Stored> {
        self.kept.lock().expect("not poisoned").0.get(id).cloned()
    }

    pub fn put(&self, id: String, stored: Stored) {
        if !self.enabled() {
            return;
        }
        let (map, order) = &mut *self.kept.lock().expect("not poisoned");
        if map.insert(id.clone(), stored).is_none() {
            order.push_back(id);
        }
        while map.len() > self.capacity {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            map.remove(&oldest);
        }
    }

    /// Forgets `id`; false when it was not kept.
    pub fn delete(&self, id: &str) -> bool {
        let (map, order) = &mut *self.kept.lock().expect("not poisoned");
        order.retain(|k| k != id);
        map.remove(id).is_some()
    }
}

/// Whether a request asks for its response to be stored (OpenAI's `store`, true unless
/// `false`).
pub fn wants_store(req: &Value) -> bool {
    req.get("store") != Some(&Value::Bool(false))
}

/// The conversation a stored response continues with: `before` (its conversation up to the
/// request) and the response's output items (its messages and calls; reasoning left out, as
/// for any input).
pub fn conversation_after(before: Vec<Value>, response: &Value) -> Result<Vec<Value>, ApiError> {
    let mut messages = before;
    for item in response["output"].as_array().into_iter().flatten() {
        input_item(item, &mut messages)?;
    }
    Ok(messages)
}

/// The chat messages of Responses input items (a conversation's kept items among them); a
/// 400 naming `input` for an item kandle cannot follow.
pub fn chat_messages(items: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut messages = Vec::new();
    for item in items {
        input_item(item, &mut messages)?;
    }
    Ok(messages)
}

/// The sampling fields passed to the chat request as they are: the Responses API's own
/// (`temperature`, `top_p`) and the vLLM extras its clients send.
const PASSED: [&str; 10] = [
    "model",
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
];

/// The chat request a Responses request asks for, or a 400 naming the field kandle cannot
/// follow.
pub fn to_chat(req: &Value) -> Result<Value, ApiError> {
    to_chat_after(req, Vec::new()).map(|(chat, _)| chat)
}

/// [`to_chat`] continuing `previous` (a stored response's conversation); also the
/// conversation to store with this request's answer (`previous` and the input, without the
/// `instructions`).
pub fn to_chat_after(req: &Value, previous: Vec<Value>) -> Result<(Value, Vec<Value>), ApiError> {
    let Some(fields) = req.as_object() else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    for (field, why) in [("prompt", "stored prompts are not kept")] {
        if fields.get(field).is_some_and(|v| !v.is_null()) {
            return Err(refused(field, why));
        }
    }
    if fields.get("background") == Some(&Value::Bool(true)) {
        return Err(refused(
            "background",
            "responses run in the foreground only",
        ));
    }
    let mut chat = Map::new();
    if wants_logprobs(req) {
        chat.insert("logprobs".into(), json!(true));
        if let Some(n) = fields.get("top_logprobs").filter(|v| !v.is_null()) {
            chat.insert("top_logprobs".into(), n.clone());
        }
    }
    for f in PASSED {
        if let Some(v) = fields.get(f) {
            chat.insert(f.into(), v.clone());
        }
    }
    let instructions = match fields.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(json!({"role": "system", "content": s})),
        Some(_) => {
            return Err(ApiError::invalid(
                "instructions must be a string",
                Some("instructions"),
            ));
        }
    };
    let mut messages = previous;
    match fields.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                input_item(item, &mut messages)?;
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "input must be a string or a list of messages",
                Some("input"),
            ));
        }
    }
    let conversation = messages.clone();
    chat.insert(
        "messages".into(),
        Value::Array(instructions.into_iter().chain(messages).collect()),
    );
    if let Some(n) = fields.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_tokens".into(), n.clone());
    }
    if let Some(tools) = fields.get("tools").and_then(Value::as_array)
        && !tools.is_empty()
    {
        let tools = tools.iter().map(chat_tool).collect::<Result<Vec<_>, _>>()?;
        chat.insert("tools".into(), Value::Array(tools));
    }
    match fields.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            chat.insert("tool_choice".into(), json!(s));
        }
        Some(c) => match (c["type"].as_str(), c["name"].as_str()) {
            (Some("function"), Some(name)) => {
                let named = json!({"type": "function", "function": {"name": name}});
                chat.insert("tool_choice".into(), named);
            }
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \
                     \"function\", \"name\": …}",
                    Some("tool_choice"),
                ));
            }
        },
    }
    if let Some(v) = fields.get("parallel_tool_calls").filter(|v| !v.is_null()) {
        chat.insert("parallel_tool_calls".into(), v.clone());
    }
    if let Some(format) = fields.get("text").and_then(|t| t.get("format")) {
        chat.insert("response_format".into(), response_format(format)?);
    }
    let stream = fields.get("stream") == Some(&Value::Bool(true));
    chat.insert("stream".into(), Value::Bool(stream));
    if stream {
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok((Value::Object(chat), conversation))
}

/// Whether the output text's log-probabilities are asked for: `top_logprobs`, or `include`
/// naming `message.output_text.logprobs`.
fn wants_logprobs(req: &Value) -> bool {
    let included = (req
        .get("include")
        .and_then(Value::as_array)
        .into_iter()
        .flatten())
    .any(|v| v == "message.output_text.logprobs");
    included || req.get("top_logprobs").is_some_and(|v| !v.is_null())
}

fn refused(field: &'static str, why: &str) -> ApiError {
    ApiError::invalid(format!("{field} is not supported: {why}"), Some(field))
}

/// Chat's function tool for a Responses one (`{"type": "function", "name", "parameters", …}`,
/// flat where chat nests it under `function`).
fn chat_tool(tool: &Value) -> Result<Value, ApiError> {
    if tool["type"] != "function" {
        return Err(ApiError::invalid(
            format!(
                "tools of type {} are not supported: only function tools (the built-in tools \
                 are OpenAI's services)",
                tool["type"]
            ),
            Some("tools"),
        ));
    }
    let mut function = Map::new();
    for f in ["name", "description", "parameters", "strict"] {
        if let Some(v) = tool.get(f) {
            function.insert(f.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// Adds an input item to the chat messages: a message; a past `function_call` (an assistant
/// turn's call, calls in a row joining one turn); a `function_call_output` (a `tool` turn).
/// `reasoning` items from an earlier response are left out, as chat templates drop past
/// thoughts.
fn input_item(item: &Value, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let text = |field: &str| -> Result<String, ApiError> {
        match item.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ApiError::invalid(
                format!(
                    "a {} input item needs its {field} as a string",
                    item["type"]
                ),
                Some("input"),
            )),
        }
    };
    match item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
    {
        "message" => messages.push(input_message(item)?),
        "function_call" => {
            let call = json!({"id": text("call_id")?, "type": "function",
                              "function": {"name": text("name")?, "arguments": text("arguments")?}});
            match messages.last_mut() {
                Some(m) if m["role"] == "assistant" && m["tool_calls"].is_array() => {
                    m["tool_calls"].as_array_mut().expect("an array").push(call);
                }
                _ => messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => messages.push(
            json!({"role": "tool", "tool_call_id": text("call_id")?, "content": text("output")?}),
        ),
        "reasoning" => {}
        kind => {
            return Err(ApiError::invalid(
                format!(
                    "input items of type {kind:?} are not supported (messages, function_call, \
                     function_call_output and reasoning are)"
                ),
                Some("input"),
            ));
        }
    }
    Ok(())
}

/// A chat message from a message item: `{"role", "content"}`, the content a string or a list
/// of text parts; a `developer` message is a system message.
fn input_message(item: &Value) -> Result<Value, ApiError> {
    let role = match item.get("role").and_then(Value::as_str) {
        Some("developer") => "system",
        Some(r @ ("system" | "user" | "assistant")) => r,
        other => {
            return Err(ApiError::invalid(
                format!(
                    "an input message's role must be user, assistant, system or developer, got {other:?}"
                ),
                Some("input"),
            ));
        }
    };
    let content = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("input_text" | "output_text"), Some(Value::String(t))) => {
                        text.push_str(t)
                    }
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!(
                                "content parts of type {kind:?} are not supported (text only: \
                                 input_text, output_text)"
                            ),
                            Some("input"),
                        ));
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                "an input message's content must be a string or a list of text parts",
                Some("input"),
            ));
        }
    };
    Ok(json!({"role": role, "content": content}))
}

/// Chat's `response_format` for a Responses `text.format`.
fn response_format(format: &Value) -> Result<Value, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(json!({"type": "text"})),
        Some("json_object") => Ok(json!({"type": "json_object"})),
        Some("json_schema") => {
            let mut schema = Map::new();
            for f in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(f) {
                    schema.insert(f.into(), v.clone());
                }
            }
            Ok(json!({"type": "json_schema", "json_schema": schema}))
        }
        other => Err(ApiError::invalid(
            format!("text.format's type must be text, json_object or json_schema, got {other:?}"),
            Some("text"),
        )),
    }
}

/// The Responses field a chat field's error is about.
pub fn param(chat_param: &'static str) -> &'static str {
    match chat_param {
        "max_tokens" | "max_completion_tokens" => "max_output_tokens",
        "messages" => "input",
        "response_format" => "text",
        p => p,
    }
}

/// What a response object carries of its request, the output and status aside.
fn echoed(req: &Value) -> Map<String, Value> {
    let field = |f: &str| req.get(f).cloned().unwrap_or(Value::Null);
    let mut m = Map::new();
    m.insert("instructions".into(), field("instructions"));
    m.insert("max_output_tokens".into(), field("max_output_tokens"));
    m.insert("temperature".into(), field("temperature"));
    m.insert("top_p".into(), field("top_p"));
    m.insert(
        "text".into(),
        req.get("text")
            .cloned()
            .unwrap_or(json!({"format": {"type": "text"}})),
    );
    m.insert(
        "tools".into(),
        req.get("tools").cloned().unwrap_or(json!([])),
    );
    m.insert(
        "tool_choice".into(),
        req.get("tool_choice").cloned().unwrap_or(json!("auto")),
    );
    m.insert(
        "parallel_tool_calls".into(),
        req.get("parallel_tool_calls")
            .cloned()
            .unwrap_or(json!(true)),
    );
    m.insert("previous_response_id".into(), field("previous_response_id"));
    // The server sets it to `{"id": …}` where the response is in a conversation.
    m.insert("conversation".into(), field("conversation"));
    // The server sets `store` to whether it keeps this response.
    m.insert(
        "store".into(),
        json!(req.get("store") == Some(&Value::Bool(true))),
    );
    m.insert(
        "metadata".into(),
        req.get("metadata").cloned().unwrap_or(json!({})),
    );
    m
}

/// A response object: `status` `in_progress`, `completed` or `incomplete` (with the reason).
fn response(
    id: &str,
    created: u64,
    model: &Value,
    req: &Value,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let mut r = Map::new();
    r.insert("id".into(), json!(id));
    r.insert("object".into(), json!("response"));
    r.insert("created_at".into(), json!(created));
    r.insert("status".into(), json!(status));
    r.insert("error".into(), Value::Null);
    r.insert(
        "incomplete_details".into(),
        match status {
            "incomplete" => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        },
    );
    r.insert("model".into(), model.clone());
    r.insert("output".into(), Value::Array(output));
    r.insert("usage".into(), usage);
    r.extend(echoed(req));
    Value::Object(r)
}

/// The Responses usage of a chat usage.
fn usage(chat: &Value) -> Value {
    let n = |f: &str| chat.get(f).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (n("prompt_tokens"), n("completion_tokens"));
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

fn status(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "incomplete",
        _ => "completed",
    }
}

fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "reasoning", "id": id, "status": status, "summary": [],
           "content": [{"type": "reasoning_text", "text": text}]})
}

/// A message item; `logprobs` (chat's `logprobs.content`, the same shape) where asked for.
fn message_item(id: &str, text: &str, status: &str, logprobs: Option<&Value>) -> Value {
    let mut part = json!({"type": "output_text", "text": text, "annotations": []});
    if let Some(lp) = logprobs {
        part["logprobs"] = lp.clone();
    }
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [part]})
}

fn call_item(id: &str, call_id: &Value, name: &Value, arguments: &str) -> Value {
    json!({"type": "function_call", "id": id, "status": "completed", "call_id": call_id,
           "name": name, "arguments": arguments})
}

/// The response object for a whole chat answer (its first choice): the thoughts (with a
/// reasoning parser) as a `reasoning` item, the content as a `message` item.
pub fn from_chat(chat: &Value, req: &Value, id: &str) -> Value {
    let choice = &chat["choices"][0];
    let message = &choice["message"];
    let finish = choice["finish_reason"].as_str();
    let mut output = Vec::new();
    if let Some(thoughts) = message.get("reasoning_content").and_then(Value::as_str) {
        output.push(reasoning_item(&format!("rs_{id}"), thoughts, "completed"));
    }
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        let logprobs = choice["logprobs"].get("content");
        output.push(message_item(
            &format!("msg_{id}"),
            text,
            status(finish),
            logprobs,
        ));
    }
    for (i, call) in message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = &call["function"];
        output.push(call_item(
            &format!("fc_{id}_{i}"),
            &call["id"],
            &f["name"],
            f["arguments"].as_str().unwrap_or(""),
        ));
    }
    let created = chat["created"].as_u64().unwrap_or(0);
    response(
        &format!("resp_{id}"),
        created,
        &chat["model"],
        req,
        status(finish),
        output,
        usage(&chat["usage"]),
    )
}

/// Which output item a stream is writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Reasoning,
    Message,
}

/// One streamed answer's events: fed the chat chunks in order, it gives the Responses API's
/// events (`response.created`, `response.output_item.added`, `response.output_text.delta`, …,
/// `response.completed`), each with its `sequence_number`.
pub struct Events {
    id: String,
    created: u64,
    model: Value,
    req: Value,
    seq: u64,
    open: Open,
    output: Vec<Value>,
    text: String,
    /// The function calls so far, by their chat index: their `function_call` items, whose
    /// arguments grow as they stream, and their output indices.
    calls: Vec<(u64, usize, Value)>,
    /// The message's token log-probabilities so far, where asked for (`None`: not asked).
    logprobs: Option<Vec<Value>>,
    finish: Option<String>,
}

impl Events {
    pub fn new(req: Value, id: &str, created: u64) -> Events {
        let logprobs = wants_logprobs(&req).then(Vec::new);
        Events {
            id: id.to_owned(),
            created,
            model: req.get("model").cloned().unwrap_or(Value::Null),
            req,
            seq: 0,
            open: Open::None,
            output: Vec::new(),
            text: String::new(),
            calls: Vec::new(),
            logprobs,
            finish: None,
        }
    }

    fn event(&mut self, kind: &str, mut body: Value) -> Value {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        body
    }

    fn snapshot(&self, status: &str, usage: Value) -> Value {
        response(
            &format!("resp_{}", self.id),
            self.created,
            &self.model,
            &self.req,
            status,
            self.output.clone(),
            usage,
        )
    }

    /// The events that open the stream.
    pub fn start(&mut self) -> Vec<Value> {
        let r = self.snapshot("in_progress", Value::Null);
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    fn item_id(&self, open: Open) -> String {
        match open {
            Open::Reasoning => format!("rs_{}", self.id),
            _ => format!("msg_{}", self.id),
        }
    }

    /// Closes the item being written, if any.
    fn close(&mut self, status: &str) -> Vec<Value> {
        let open = std::mem::replace(&mut self.open, Open::None);
        let text = std::mem::take(&mut self.text);
        let (id, index) = (self.item_id(open), self.output.len());
        let mut out = Vec::new();
        match open {
            Open::None => return out,
            Open::Reasoning => {
                let item = reasoning_item(&id, &text, "completed");
                out.push(self.event(
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                ));
                out.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.output.push(item);
            }
            Open::Message => {
                let logprobs = self.logprobs.take().map(Value::Array);
                let item = message_item(&id, &text, status, logprobs.as_ref());
                let part = &item["content"][0];
                out.push(self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                ));
                out.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                ));
                out.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.output.push(item);
            }
        }
        out
    }

    /// Opens an item of kind `open`, closing the one before.
    fn open(&mut self, open: Open) -> Vec<Value> {
        let mut out = self.close("completed");
        self.open = open;
        let (id, index) = (self.item_id(open), self.output.len());
        let item = match open {
            Open::Reasoning => json!({"type": "reasoning", "id": id, "status": "in_progress",
                                      "summary": [], "content": []}),
            _ => json!({"type": "message", "id": id, "status": "in_progress",
                        "role": "assistant", "content": []}),
        };
        out.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        if open == Open::Message {
            out.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}}),
            ));
        }
        out
    }

    /// The events of a streamed call's piece (`{"index", "id"?, "function": {"name"?,
    /// "arguments"?}}`): its item added the first time, then its arguments' deltas.
    fn call_delta(&mut self, call: &Value) -> Vec<Value> {
        let index = call["index"].as_u64().unwrap_or(0);
        let mut out = Vec::new();
        if !self.calls.iter().any(|(i, _, _)| *i == index) {
            out.extend(self.close("completed"));
            let at = self.output.len() + self.calls.len();
            let item = json!({"type": "function_call", "id": format!("fc_{}_{}", self.id, self.calls.len()),
                              "status": "in_progress", "call_id": call["id"],
                              "name": call["function"]["name"], "arguments": ""});
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": at, "item": item}),
            ));
            self.calls.push((index, at, item));
        }
        let piece = call["function"]["arguments"].as_str().unwrap_or("");
        if !piece.is_empty() {
            let (_, at, item) = (self.calls.iter_mut())
                .find(|(i, _, _)| *i == index)
                .expect("added above");
            let (at, id) = (*at, item["id"].clone());
            let args = format!("{}{piece}", item["arguments"].as_str().unwrap_or(""));
            item["arguments"] = json!(args);
            out.push(self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": at, "delta": piece}),
            ));
        }
        out
    }

    /// The events of one chat chunk (the usage chunk ends the stream).
    pub fn chunk(&mut self, chunk: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(err) = chunk.get("error") {
            let e = json!({"code": err["code"], "message": err["message"], "param": err["param"]});
            out.push(self.event("error", e));
            return out;
        }
        if let Some(choice) = chunk["choices"].get(0) {
            let delta = &choice["delta"];
            for (field, kind, event) in [
                (
                    "reasoning_content",
                    Open::Reasoning,
                    "response.reasoning_text.delta",
                ),
                ("content", Open::Message, "response.output_text.delta"),
            ] {
                let Some(text) = delta.get(field).and_then(Value::as_str) else {
                    continue;
                };
                if text.is_empty() {
                    continue;
                }
                if self.open != kind {
                    out.extend(self.open(kind));
                }
                self.text.push_str(text);
                let (id, index) = (self.item_id(kind), self.output.len());
                let mut body = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text});
                if kind == Open::Message
                    && let Some(kept) = &mut self.logprobs
                {
                    let lps = choice["logprobs"]["content"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    kept.extend(lps.iter().cloned());
                    body["logprobs"] = Value::Array(lps);
                }
                out.push(self.event(event, body));
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                out.extend(self.call_delta(call));
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                self.finish = Some(f.to_owned());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            let status = status(self.finish.as_deref());
            out.extend(self.close(status));
            for (_, index, mut item) in std::mem::take(&mut self.calls) {
                item["status"] = json!("completed");
                out.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": item["id"], "output_index": index,
                           "arguments": item["arguments"]}),
                ));
                out.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.output.push(item);
            }
            let r = self.snapshot(status, usage(u));
            let kind = match status {
                "incomplete" => "response.incomplete",
                _ => "response.completed",
            };
            out.push(self.event(kind, json!({"response": r})));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_the_chat_request_it_asks_for() {
        let req = json!({"model": "m", "instructions": "Be brief.", "input": "Hi",
                         "max_output_tokens": 20, "temperature": 0.5, "store": true,
                         "text": {"format": {"type": "json_schema", "name": "a",
                                             "schema": {"type": "object"}, "strict": true}}});
        let chat = to_chat(&req).unwrap();
        assert_eq!(
            chat,
            json!({"model": "m", "temperature": 0.5, "max_tokens": 20, "stream": false,
                   "messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}],
                   "response_format": {"type": "json_schema", "json_schema":
                       {"name": "a", "schema": {"type": "object"}, "strict": true}}})
        );
        let req = json!({"model": "m", "stream": true, "input": [
            {"role": "developer", "content": "Rules."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]}]});
        let chat = to_chat(&req).unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "system", "content": "Rules."}, {"role": "user", "content": "ab"},
                   {"role": "assistant", "content": "c"}])
        );
        assert_eq!(chat["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn function_tools_and_past_calls_become_chat_s() {
        let req = json!({"model": "m", "tool_choice": {"type": "function", "name": "f"},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\":1}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "summary": []}]});
        let chat = to_chat(&req).unwrap();
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
        );
        assert_eq!(
            chat["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(
            chat["messages"],
            json!([{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": null, "tool_calls": [
                       {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                       {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
        );
        let e = to_chat(&json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}));
        assert_eq!(e.unwrap_err().param, Some("tools"));
    }

    #[test]
    fn calls_become_function_call_items_whole_and_streamed() {
        let chat = json!({"created": 1, "model": "m",
            "choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2}});
        let whole = from_chat(&chat, &json!({"model": "m"}), "x");
        assert_eq!(whole["status"], "completed");
        assert_eq!(
            whole["output"],
            json!([{"type": "function_call", "id": "fc_x_0", "status": "completed",
                    "call_id": "call_1", "name": "f", "arguments": "{\"a\": 1}"}])
        );
        let mut ev = Events::new(json!({"model": "m"}), "x", 1);
        let mut all = ev.start();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1",
                "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
        ] {
            all.extend(ev.chunk(&c));
        }
        let kinds: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds[2..],
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(all.last().unwrap()["response"]["output"], whole["output"]);
    }

    #[test]
    fn log_probabilities_come_with_the_output_text_when_asked() {
        let chat = to_chat(&json!({"model": "m", "input": "Hi", "top_logprobs": 2})).unwrap();
        assert_eq!(
            (&chat["logprobs"], &chat["top_logprobs"]),
            (&json!(true), &json!(2))
        );
        let include = json!({"model": "m", "input": "Hi",
                             "include": ["message.output_text.logprobs"]});
        assert_eq!(to_chat(&include).unwrap()["logprobs"], true);
        assert!(
            to_chat(&json!({"model": "m", "input": "Hi"}))
                .unwrap()
                .get("logprobs")
                .is_none()
        );
        let lp = json!([{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]);
        let answer = json!({"created": 1, "model": "m", "usage": {},
            "choices": [{"finish_reason": "stop", "logprobs": {"content": lp},
                         "message": {"role": "assistant", "content": "Hi"}}]});
        let whole = from_chat(&answer, &include, "x");
        assert_eq!(whole["output"][0]["content"][0]["logprobs"], lp);
        let mut ev = Events::new(include, "x", 1);
        let mut all = ev.start();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"content": "Hi"},
                                "logprobs": {"content": lp}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {}}),
        ] {
            all.extend(ev.chunk(&c));
        }
        let delta = all
            .iter()
            .find(|e| e["type"] == "response.output_text.delta")
            .unwrap();
        assert_eq!(delta["logprobs"], lp);
        assert_eq!(all.last().unwrap()["response"]["output"], whole["output"]);
    }

    #[test]
    fn a_stored_conversation_goes_on_after_new_instructions_and_before_the_new_input() {
        let first = json!({"model": "m", "instructions": "Be brief.", "input": "My name is Ada."});
        let (_, before) = to_chat_after(&first, Vec::new()).unwrap();
        assert_eq!(
            before,
            [json!({"role": "user", "content": "My name is Ada."})]
        );
        let response = json!({"output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello Ada.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "wave",
             "arguments": "{}", "status": "completed"}]});
        let kept = conversation_after(before, &response).unwrap();
        let next = json!({"model": "m", "instructions": "Be kind.",
                          "input": [{"type": "function_call_output", "call_id": "call_1", "output": "waved"}]});
        let (chat, after) = to_chat_after(&next, kept).unwrap();
        let roles: Vec<&str> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        // The old instructions are not carried over; the new ones come first.
        assert_eq!(roles, ["system", "user", "assistant", "assistant", "tool"]);
        assert_eq!(chat["messages"][0]["content"], "Be kind.");
        assert_eq!(chat["messages"][2]["content"], "Hello Ada.");
        assert_eq!(
            chat["messages"][3]["tool_calls"][0]["function"]["name"],
            "wave"
        );
        assert_eq!(
            after.len(),
            4,
            "what is stored next leaves the instructions out"
        );
    }

    #[test]
    fn the_store_keeps_the_last_n_and_forgets_on_delete() {
        let stored = |n: i64| Stored {
            messages: Vec::new(),
            response: json!({"n": n}),
        };
        let store = ResponseStore::new(2);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            store.put(id.into(), stored(i as i64));
        }
        assert!(store.get("a").is_none(), "the oldest went first");
        assert_eq!(store.get("c").unwrap().response["n"], 2);
        assert!(store.delete("b") && !store.delete("b"));
        store.put("d".into(), stored(3));
        assert!(store.get("c").is_some() && store.get("d").is_some());
        let off = ResponseStore::new(0);
        off.put("a".into(), stored(0));
        assert!(!off.enabled() && off.get("a").is_none());
        assert!(wants_store(&json!({})) && !wants_store(&json!({"store": false})));
    }

    #[test]
    fn what_cannot_be_followed_is_refused_by_name() {
        for (extra, param) in [
            (json!({"tools": [{"type": "file_search"}]}), "tools"),
            (json!({"tool_choice": {"type": "mcp"}}), "tool_choice"),
            (json!({"background": true}), "background"),
            (
                json!({"input": [{"type": "function_call_output", "output": "x"}]}),
                "input",
            ),
            (
                json!({"input": [{"type": "computer_call", "call_id": "x"}]}),
                "input",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input",
            ),
            (json!({"input": 5}), "input"),
            (json!({"text": {"format": {"type": "grammar"}}}), "text"),
        ] {
            let mut req = json!({"model": "m", "input": "Hi"});
            for (k, v) in extra.as_object().unwrap() {
                req[k] = v.clone();
            }
            let e = to_chat(&req).unwrap_err();
            assert_eq!(e.param, Some(param), "{req}");
        }
        // Empty tools and a null id are no request for them.
        assert!(
            to_chat(&json!({"model": "m", "input": "Hi", "tools": [],
                                "previous_response_id": null}))
            .is_ok()
        );
    }

    #[test]
    fn a_whole_chat_answer_becomes_a_response() {
        let chat = json!({"id": "chatcmpl-1", "created": 7, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "Hello",
                                     "reasoning_content": "hmm"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}});
        let req = json!({"model": "m", "input": "Hi", "max_output_tokens": 4});
        let r = from_chat(&chat, &req, "x");
        assert_eq!(r["id"], "resp_x");
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["output"][0]["type"], "reasoning");
        assert_eq!(r["output"][0]["content"][0]["text"], "hmm");
        assert_eq!(r["output"][1]["content"][0]["text"], "Hello");
        assert_eq!(r["usage"]["total_tokens"], 7);
        assert_eq!(r["max_output_tokens"], 4);
    }

    #[test]
    fn streamed_chunks_become_typed_events_that_add_up_to_the_response() {
        let mut ev = Events::new(json!({"model": "m", "input": "Hi"}), "x", 7);
        let mut all = ev.start();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
            json!({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}),
        ] {
            all.extend(ev.chunk(&c));
        }
        let kinds: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let seqs: Vec<u64> = all
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..all.len() as u64).collect::<Vec<_>>());
        let done = &all.last().unwrap()["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "hm");
        assert_eq!(done["output"][1]["content"][0]["text"], "Hello");
        assert_eq!(all[8]["output_index"], 1);
        assert_eq!(done["usage"]["total_tokens"], 6);
    }
}
