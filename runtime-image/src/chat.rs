//! Chat templates: the model's Jinja `chat_template` rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).

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

    /// Renders the conversation; with `add_generation_prompt` the assistant turn is opened.
    /// `tools` (the request's, as given) is the template's `tools`, as transformers passes
    /// it; templates that know no tools ignore it.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template(NAME)?;
        Ok(tmpl.render(context! {
            messages => messages,
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
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
        let out = t.render(&[user("Hi")], None, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t.render(&[user("Hi")], None, false).unwrap();
        assert!(!no_gen.ends_with("assistant\n"));
    }

    #[test]
    fn trim_and_lstrip_blocks_remove_template_whitespace() {
        let src = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[user("a"), user("b")], None, false).unwrap(),
            "    a\n    b\n"
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
        let err = t.render(&[sys], None, true).unwrap_err().to_string();
        assert!(err.contains("first must be user"), "{err}");
        assert_eq!(t.render(&[user("x")], None, true).unwrap(), "ok");
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
            t.render(&[user("hi"), call, answer], Some(&tools), false)
                .unwrap(),
            "[add;]user:hi|assistant:add|tool:3#c1|"
        );
        assert_eq!(t.render(&[user("hi")], None, false).unwrap(), "user:hi|");
    }

    #[test]
    fn bad_template_syntax_is_refused_at_load() {
        assert!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()).is_err());
    }
}
