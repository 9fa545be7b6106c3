//! Tool calls in Qwen3-Coder's XML-like format (vLLM's `qwen3_coder` and `qwen3_xml`
//! parsers; Qwen3-Coder's template, which Qwen3.5's shares):
//!
//! ```text
//! <tool_call>
//! <function=get_weather>
//! <parameter=city>
//! Rome
//! </parameter>
//! <parameter=days>
//! 3
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! [`XmlCalls`] follows one call after its `<tool_call>` a character at a time and says what
//! JSON the same characters are in [`crate::json_schema`]'s call format
//! (`{"name":"get_weather","arguments":{"city":"Rome","days":3}}`), so that the schema's
//! automaton masks an XML call to the tools as it masks a JSON one
//! ([`crate::json_schema::Schema::xml_call`]), and the answer's calls are read by the same
//! steps ([`crate::json_schema::xml_call_json`]): what the mask lets through is what is read.
//!
//! Decisions, where llama.cpp's grammar for the format and vLLM's parser are the models:
//! - A parameter whose schema takes a string here (`string`, an enum of strings, a union with
//!   a string) is raw text, as the template writes it: everything after `>` and its newline
//!   up to `\n</parameter>`, quotes, backslashes and newlines as they are (llama.cpp's grammar
//!   keeps only the raw text for a union with a string too). Any other parameter is JSON
//!   (numbers, `true`, objects), as vLLM's parser reads the types it converts.
//! - The layout is the template's: `\n<function=name>\n`, each parameter
//!   `<parameter=name>\n…\n</parameter>\n`, then `</function>`; the parameters in the
//!   schema's order, the required ones always and the optional ones or not, as every other
//!   format's arguments here are written ([`crate::json_schema`]; llama.cpp takes required
//!   ones in any order).
//! - Control characters other than tab and carriage return are not written in raw text.

/// The end of a raw parameter value.
const RAW_END: &str = "\n</parameter>";

/// Where an XML call is, character by character ([`XmlCalls::translate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XmlCalls {
    at: At,
}

impl Default for XmlCalls {
    fn default() -> Self {
        XmlCalls {
            at: At::Fixed {
                text: "\n<function=",
                i: 0,
                then: Then::Name { param: false },
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Fixed text, `text[i..]` still to come, then `then`.
    Fixed {
        text: &'static str,
        i: u8,
        then: Then,
    },
    /// A function's or a parameter's name (`any`: a character of it written).
    Name { param: bool, any: bool },
    /// After the function's `>` or a parameter's end: `<`.
    Next { first: bool },
    /// After that `<`: `parameter=` or `/function>`.
    Tag { first: bool },
    /// A raw value, `held` bytes of [`RAW_END`] written and not yet known to be text.
    Raw { held: u8 },
    /// A JSON value, `depth` lists and objects deep, in a string (after a backslash).
    Json {
        depth: u16,
        string: bool,
        escape: bool,
    },
    /// After `</function>`: only whitespace.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Name { param: bool },
    Next { first: bool },
    Value,
    Done,
}

/// Where the JSON that an XML call stands for goes: the schema's automaton.
pub trait JsonSink {
    /// Takes a JSON character (`false`: refused).
    fn put(&mut self, c: char) -> bool;
    /// Whether `c` may come next, taking nothing.
    fn takes(&self, c: char) -> bool;
}

impl XmlCalls {
    /// Takes `c`, giving `json` what it stands for; `false` where no call written as the
    /// mask allows has `c` here (the state is then unusable: callers try on a copy).
    pub fn translate(&mut self, c: char, json: &mut impl JsonSink) -> bool {
        let put = |json: &mut dyn FnMut(char) -> bool, s: &str| s.chars().all(json);
        match self.at {
            At::Fixed { text, i, then } => {
                if text.as_bytes()[usize::from(i)] as char != c {
                    return false;
                }
                if usize::from(i) + 1 < text.len() {
                    self.at = At::Fixed {
                        text,
                        i: i + 1,
                        then,
                    };
                    return true;
                }
                let (next, open) = match then {
                    // The call's JSON opens once `<function=` is whole.
                    Then::Name { param: false } => (
                        At::Name {
                            param: false,
                            any: false,
                        },
                        "{\"name\":\"",
                    ),
                    Then::Name { param: true } => (
                        At::Name {
                            param: true,
                            any: false,
                        },
                        "",
                    ),
                    Then::Next { first } => (At::Next { first }, ""),
                    // A value is raw text where the schema takes a string here, its quote
                    // given before its first character so that plain text passes as it is
                    // (the mask's fast path for a string's plain tokens); JSON otherwise.
                    Then::Value if json.takes('"') => (At::Raw { held: 0 }, "\""),
                    Then::Value => (
                        At::Json {
                            depth: 0,
                            string: false,
                            escape: false,
                        },
                        "",
                    ),
                    Then::Done => (At::Done, ""),
                };
                self.at = next;
                put(&mut |c| json.put(c), open)
            }
            At::Name { param, any: true } if c == '>' => {
                self.at = At::Fixed {
                    text: "\n",
                    i: 0,
                    then: match param {
                        true => Then::Value,
                        false => Then::Next { first: true },
                    },
                };
                let close = match param {
                    true => "\":",
                    false => "\",\"arguments\":{",
                };
                put(&mut |c| json.put(c), close)
            }
            At::Name { param, .. } => {
                self.at = At::Name { param, any: true };
                name_char(c) && json.put(c)
            }
            At::Next { first } => {
                self.at = At::Tag { first };
                c == '<'
            }
            At::Tag { first } => {
                let (text, then, open) = match (c, first) {
                    ('p', true) => ("arameter=", Then::Name { param: true }, "\""),
                    ('p', false) => ("arameter=", Then::Name { param: true }, ",\""),
                    // The arguments and the call close here, where the schema says whether
                    // they may (required parameters written).
                    ('/', _) => ("function>", Then::Done, "}}"),
                    _ => return false,
                };
                self.at = At::Fixed { text, i: 0, then };
                put(&mut |c| json.put(c), open)
            }
            At::Raw { held } => self.raw(held, c, json),
            At::Json {
                depth,
                string,
                escape,
            } => self.json(depth, string, escape, c, json),
            At::Done => c.is_whitespace() && json.put(c),
        }
    }

    /// A raw value's character: text, or part of its end.
    fn raw(&mut self, held: u8, c: char, json: &mut impl JsonSink) -> bool {
        let end = RAW_END.as_bytes();
        if end[usize::from(held)] as char == c {
            let held = held + 1;
            if usize::from(held) == end.len() {
                self.at = At::Fixed {
                    text: "\n",
                    i: 0,
                    then: Then::Next { first: false },
                };
                return json.put('"');
            }
            self.at = At::Raw { held };
            return true;
        }
        // What was held is text after all (only the end's first byte is a newline, so no
        // later part of it can start the end again).
        let mut ok = RAW_END[..usize::from(held)]
            .chars()
            .all(|c| put_escaped(c, json));
        self.at = match c {
            '\n' => At::Raw { held: 1 },
            _ => {
                ok &= put_escaped(c, json);
                At::Raw { held: 0 }
            }
        };
        ok
    }

    /// A JSON value's character, passed on as it is; `<` outside its strings ends the value
    /// (`</parameter>`), where the value may end.
    fn json(
        &mut self,
        mut depth: u16,
        mut string: bool,
        mut escape: bool,
        c: char,
        json: &mut impl JsonSink,
    ) -> bool {
        if string {
            match (escape, c) {
                (true, _) => escape = false,
                (false, '\\') => escape = true,
                (false, '"') => string = false,
                _ => {}
            }
        } else {
            match c {
                '"' => string = true,
                '{' | '[' => depth += 1,
                '}' | ']' if depth == 0 => return false,
                '}' | ']' => depth -= 1,
                '<' if depth == 0 => {
                    self.at = At::Fixed {
                        text: "/parameter>\n",
                        i: 0,
                        then: Then::Next { first: false },
                    };
                    return json.takes(',') || json.takes('}');
                }
                _ => {}
            }
        }
        self.at = At::Json {
            depth,
            string,
            escape,
        };
        json.put(c)
    }

    /// Whether the call is whole (its `</function>` written).
    pub fn done(&self) -> bool {
        self.at == At::Done
    }

    /// Inside a value whose characters pass on as they are while they are JSON string's
    /// plain ones (a raw value holding nothing back, or a JSON string).
    pub fn passes_plain_text(&self) -> bool {
        matches!(
            self.at,
            At::Raw { held: 0 }
                | At::Json {
                    string: true,
                    escape: false,
                    ..
                }
        )
    }
}

/// Whether `c` may be part of a function's or parameter's name as the format writes it.
pub fn name_char(c: char) -> bool {
    !(c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | '\\'))
}

/// A raw value's character as a JSON string's.
fn put_escaped(c: char, json: &mut impl JsonSink) -> bool {
    match c {
        '"' | '\\' => json.put('\\') && json.put(c),
        '\n' => json.put('\\') && json.put('n'),
        '\r' => json.put('\\') && json.put('r'),
        '\t' => json.put('\\') && json.put('t'),
        c if c.is_control() => false,
        c => json.put(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes and records every character; a string may start where `strings`.
    struct Record {
        out: String,
        strings: bool,
    }

    impl JsonSink for Record {
        fn put(&mut self, c: char) -> bool {
            self.out.push(c);
            true
        }
        fn takes(&self, c: char) -> bool {
            c != '"' || self.strings
        }
    }

    fn translate(text: &str, strings: bool) -> Option<(String, bool)> {
        let mut x = XmlCalls::default();
        let mut r = Record {
            out: String::new(),
            strings,
        };
        text.chars()
            .all(|c| x.translate(c, &mut r))
            .then(|| (r.out, x.done()))
    }

    #[test]
    fn a_call_is_its_json_raw_text_escaped() {
        let call = "\n<function=run>\n<parameter=cmd>\necho \"a\\b\"\n<x>\n\n\
                    </parameter>\n</function>";
        let (json, done) = translate(call, true).unwrap();
        assert!(done);
        assert_eq!(
            json,
            r#"{"name":"run","arguments":{"cmd":"echo \"a\\b\"\n<x>\n"}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["arguments"]["cmd"], "echo \"a\\b\"\n<x>\n");
        // An empty value, and a part of the end that turns out to be text.
        let call = "\n<function=f>\n<parameter=a>\n\n</parameter>\n\
                    <parameter=b>\n\n</param x\n</parameter>\n</function>";
        let (json, _) = translate(call, true).unwrap();
        assert_eq!(
            json,
            r#"{"name":"f","arguments":{"a":"","b":"\n</param x"}}"#
        );
    }

    #[test]
    fn values_that_are_not_strings_are_json() {
        let call = "\n<function=f>\n<parameter=n>\n3\n</parameter>\n\
                    <parameter=o>\n{\"k\": [1, \"</x>\"]}\n</parameter>\n</function>";
        let (json, _) = translate(call, false).unwrap();
        assert_eq!(
            json,
            "{\"name\":\"f\",\"arguments\":{\"n\":3\n,\"o\":{\"k\": [1, \"</x>\"]}\n}}"
        );
        serde_json::from_str::<serde_json::Value>(&json).unwrap();
        // A bracket that closes nothing.
        assert!(translate("\n<function=f>\n<parameter=n>\n]", false).is_none());
    }

    #[test]
    fn the_layout_is_the_template_s() {
        for bad in [
            "<function=f>",
            "\n<fun=",
            "\n<function=>",
            "\n<function=f g>",
            "\n<function=f>\n<param=",
            "\n<function=f>\n<parameter=a>x",
            "\n<function=f>\n<parameter=a>\nx\n</parameter><",
            "\n<function=f>\n<parameter=a>\n\u{1}",
            "\n<function=f>\n</function>x",
        ] {
            assert!(translate(bad, true).is_none(), "{bad:?}");
        }
        // Whole, with whitespace after it; not whole before its `>`.
        assert_eq!(
            translate("\n<function=f>\n</function>\n", true),
            Some(("{\"name\":\"f\",\"arguments\":{}}\n".into(), true))
        );
        assert!(!translate("\n<function=f>\n</function", true).unwrap().1);
    }
}
