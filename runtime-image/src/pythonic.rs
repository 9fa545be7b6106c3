//! Tool calls written as a Python list of calls, `[get_weather(city="Rome"), now()]` (vLLM's
//! `pythonic` parser: Llama 3.2 and Llama 4 with Meta's pythonic templates, ToolACE).
//!
//! Two halves:
//! - [`PyCalls`] follows such a list a character at a time and says what JSON the same
//!   characters are in [`crate::json_schema`]'s call format
//!   (`[{"name":"get_weather","arguments":{"city":"Rome"}}]`), so that the schema's automaton
//!   masks a pythonic call to the tools as it masks a JSON one
//!   ([`crate::json_schema::Schema::pythonic_calls`]). What the mask lets a model write is a
//!   subset of Python: strings in either quote with JSON's escapes but `\/` (and `\'`), `True`, `False`,
//!   `None`, JSON's numbers, lists and dicts, keyword arguments only, the declared parameters
//!   in order (the required ones, the optional ones or not).
//! - [`parse`] reads a whole answer as Python's literals, as vLLM's parser does with `ast`:
//!   either quote, Python's escapes, `True`/`False`/`None`, numbers, lists, tuples and dicts.

use serde_json::{Map, Number, Value};

use crate::tool_calls::ParsedCall;

/// Where a pythonic call list is, character by character ([`PyCalls::translate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PyCalls {
    at: At,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum At {
    /// Before the list's `[`.
    #[default]
    Open,
    /// After `[` or a call's `,`: a function's name.
    CallStart,
    Name,
    /// After `(` or an argument's `,`: a keyword, or `)`.
    KeyStart,
    Key,
    /// An argument's value: `depth` lists and dicts deep, in a string opened by this quote
    /// (after a backslash), or `none` letters into `None`.
    Value {
        depth: u16,
        string: Option<char>,
        escape: bool,
        none: u8,
    },
    /// After a call's `)`: `,` or `]`.
    AfterCall,
    Done,
}

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `name` is a Python identifier (ASCII), as a keyword argument's name must be.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(ident_start) && chars.all(ident)
}

/// Whether a tool's name can be written before `(`: OpenAI's names (`[A-Za-z0-9_-]`) and
/// dotted ones.
fn name_char(c: char) -> bool {
    ident(c) || matches!(c, '-' | '.')
}

impl PyCalls {
    /// The JSON that `c` stands for here: text to write before it, and the character itself
    /// (or what it becomes: `T` → `t`, `None` → `null`), or `None` where no pythonic call list
    /// written as the mask allows has `c` here.
    pub fn translate(&mut self, c: char) -> Option<(&'static str, Option<char>)> {
        let ws = matches!(c, ' ' | '\t' | '\n' | '\r');
        let (next, out) = match (self.at, c) {
            (At::Open, '[') => (At::CallStart, ("", Some(c))),
            (At::CallStart, c) if ident_start(c) => (At::Name, ("{\"name\":\"", Some(c))),
            (At::Name, '(') => (At::KeyStart, ("\",\"arguments\":{", None)),
            (At::Name, c) if name_char(c) => (At::Name, ("", Some(c))),
            (At::KeyStart, ')') => (At::AfterCall, ("}}", None)),
            (At::KeyStart, c) if ident_start(c) => (At::Key, ("\"", Some(c))),
            (At::Key, '=') => (
                At::Value {
                    depth: 0,
                    string: None,
                    escape: false,
                    none: 0,
                },
                ("\":", None),
            ),
            (At::Key, c) if ident(c) => (At::Key, ("", Some(c))),
            (
                At::Value {
                    depth,
                    string,
                    escape,
                    none,
                },
                c,
            ) => {
                return self.value(depth, string, escape, none, c);
            }
            (At::AfterCall, ',') => (At::CallStart, ("", Some(c))),
            (At::AfterCall, ']') => (At::Done, ("", Some(c))),
            (At::CallStart | At::KeyStart | At::AfterCall | At::Done | At::Open, _) if ws => {
                (self.at, ("", Some(c)))
            }
            _ => return None,
        };
        self.at = next;
        Some(out)
    }

    /// Inside a string in single quotes, whose characters are not JSON's as they are (a `'`
    /// ends it, a `"` is escaped): a token's text must pass through [`PyCalls::translate`].
    pub fn in_single_quotes(&self) -> bool {
        matches!(
            self.at,
            At::Value {
                string: Some('\''),
                ..
            }
        )
    }

    fn value(
        &mut self,
        mut depth: u16,
        mut string: Option<char>,
        mut escape: bool,
        mut none: u8,
        c: char,
    ) -> Option<(&'static str, Option<char>)> {
        let mut out = c;
        let mut before = "";
        if let Some(quote) = string {
            match (escape, c) {
                // JSON's `\/` is a backslash and a slash in Python.
                (true, '/') => return None,
                // `\'` in single quotes is a quote, which JSON writes bare.
                (true, '\'') if quote == '\'' => escape = false,
                (true, _) if quote == '\'' => {
                    escape = false;
                    before = "\\";
                }
                (true, _) => escape = false,
                // In single quotes the backslash waits for what it escapes.
                (false, '\\') if quote == '\'' => {
                    self.at = At::Value {
                        depth,
                        string,
                        escape: true,
                        none,
                    };
                    return Some(("", None));
                }
                (false, '\\') => escape = true,
                (false, c) if c == quote => {
                    string = None;
                    out = '"';
                }
                (false, '"') => before = "\\",
                _ => {}
            }
        } else if none > 0 {
            // `None` is `null`, letter for letter.
            let at = usize::from(none - 1);
            if "one".as_bytes()[at] != c as u8 || !c.is_ascii() {
                return None;
            }
            out = "ull".as_bytes()[at] as char;
            none = (none + 1) % 4;
        } else {
            match c {
                '"' | '\'' => {
                    string = Some(c);
                    out = '"';
                }
                '{' | '[' => depth += 1,
                '}' | ']' if depth > 0 => depth -= 1,
                ',' if depth == 0 => {
                    self.at = At::KeyStart;
                    return Some(("", Some(c)));
                }
                ')' if depth == 0 => {
                    self.at = At::AfterCall;
                    return Some(("}}", None));
                }
                'T' => out = 't',
                'F' => out = 'f',
                'N' => {
                    out = 'n';
                    none = 1;
                }
                // JSON's spellings, and what only ends a value or a call, are not Python's.
                't' | 'f' | 'n' | '}' | ']' | ')' => return None,
                _ => {}
            }
        }
        self.at = At::Value {
            depth,
            string,
            escape,
            none,
        };
        Some((before, Some(out)))
    }
}

/// The calls of an answer that is a Python list of calls with keyword arguments of literal
/// values (whitespace around it allowed, nothing else); `None` otherwise, as vLLM's parser
/// then answers with the text.
pub fn parse(text: &str) -> Option<Vec<ParsedCall>> {
    let mut r = Reader {
        s: text.as_bytes(),
        text,
        at: 0,
    };
    r.ws();
    r.eat(b'[')?;
    let mut calls = Vec::new();
    loop {
        r.ws();
        if !calls.is_empty() && r.eat(b']').is_some() {
            break;
        }
        calls.push(r.call()?);
        r.ws();
        if r.eat(b',').is_none() {
            r.ws();
            r.eat(b']')?;
            break;
        }
    }
    r.ws();
    (r.at == r.s.len()).then_some(calls)
}

struct Reader<'a> {
    s: &'a [u8],
    text: &'a str,
    at: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.at += 1)
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn word(&mut self, more: fn(char) -> bool) -> Option<&str> {
        let start = self.at;
        while self.peek().is_some_and(|b| more(b as char)) {
            self.at += 1;
        }
        (self.at > start && ident_start(self.s[start] as char)).then(|| &self.text[start..self.at])
    }

    /// `name(keyword=value, …)`.
    fn call(&mut self) -> Option<ParsedCall> {
        let name = self.word(name_char)?.to_owned();
        self.ws();
        self.eat(b'(')?;
        let mut args = Map::new();
        loop {
            self.ws();
            if self.eat(b')').is_some() {
                break;
            }
            let key = self.word(ident)?.to_owned();
            self.ws();
            self.eat(b'=')?;
            self.ws();
            let v = self.value()?;
            args.insert(key, v);
            self.ws();
            if self.eat(b',').is_none() {
                self.ws();
                self.eat(b')')?;
                break;
            }
        }
        Some(ParsedCall {
            name,
            arguments: Value::Object(args).to_string(),
        })
    }

    /// Items up to `close`, separated by commas (a trailing one allowed).
    fn items(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        loop {
            self.ws();
            if self.eat(close).is_some() {
                return Some(());
            }
            item(self)?;
            self.ws();
            if self.eat(b',').is_none() {
                self.ws();
                return self.eat(close);
            }
        }
    }

    fn value(&mut self) -> Option<Value> {
        match self.peek()? {
            b'"' | b'\'' => self.string().map(Value::String),
            b'[' | b'(' => {
                let close = if self.peek() == Some(b'[') {
                    b']'
                } else {
                    b')'
                };
                self.at += 1;
                let mut list = Vec::new();
                self.items(close, |r| {
                    list.push(r.value()?);
                    Some(())
                })?;
                Some(Value::Array(list))
            }
            b'{' => {
                self.at += 1;
                let mut map = Map::new();
                self.items(b'}', |r| {
                    let key = match r.peek()? {
                        b'"' | b'\'' => r.string()?,
                        _ => return None,
                    };
                    r.ws();
                    r.eat(b':')?;
                    r.ws();
                    let v = r.value()?;
                    map.insert(key, v);
                    Some(())
                })?;
                Some(Value::Object(map))
            }
            b'-' | b'+' | b'.' | b'0'..=b'9' => self.number(),
            _ => match self.word(ident)? {
                "True" => Some(Value::Bool(true)),
                "False" => Some(Value::Bool(false)),
                "None" => Some(Value::Null),
                _ => None,
            },
        }
    }

    /// A number as Python writes one (no underscores, hex or complex).
    fn number(&mut self) -> Option<Value> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            self.at += 1;
        }
        let t = self.text[start..self.at].trim_start_matches('+');
        if let Ok(i) = t.parse::<i64>() {
            return Some(Value::Number(i.into()));
        }
        let f = t.parse::<f64>().ok()?;
        Number::from_f64(f).map(Value::Number)
    }

    /// A string in either quote, with Python's escapes (an unknown one keeps its backslash,
    /// as Python does).
    fn string(&mut self) -> Option<String> {
        let quote = self.peek()?;
        self.at += 1;
        let mut out = String::new();
        let rest = &self.text[self.at..];
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c as u32 == u32::from(quote) => {
                    self.at += i + 1;
                    return Some(out);
                }
                '\n' => return None,
                '\\' => {
                    let (_, e) = chars.next()?;
                    let hex = |chars: &mut std::str::CharIndices, n: usize| {
                        let digits: String = chars.by_ref().take(n).map(|(_, c)| c).collect();
                        u32::from_str_radix(&digits, 16)
                            .ok()
                            .filter(|_| digits.len() == n)
                    };
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        'a' => out.push('\u{7}'),
                        '0' => out.push('\0'),
                        '\n' => {}
                        '\\' | '\'' | '"' => out.push(e),
                        'x' => out.push(char::from_u32(hex(&mut chars, 2)?)?),
                        'u' => out.push(char::from_u32(hex(&mut chars, 4)?)?),
                        'U' => out.push(char::from_u32(hex(&mut chars, 8)?)?),
                        e => {
                            out.push('\\');
                            out.push(e);
                        }
                    }
                }
                c => out.push(c),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool_calls::tests::call;

    /// The JSON [`PyCalls`] makes of `text`, or the byte at which it refused.
    fn json_of(text: &str) -> Result<String, usize> {
        let mut py = PyCalls::default();
        let mut out = String::new();
        for (i, c) in text.char_indices() {
            let (pre, c) = py.translate(c).ok_or(i)?;
            out.push_str(pre);
            out.extend(c);
        }
        Ok(out)
    }

    #[test]
    fn a_call_list_is_read_as_vllm_reads_it() {
        assert_eq!(
            parse("[get_weather(city=\"Rome\", unit='celsius'), now()]"),
            Some(vec![
                call("get_weather", "{\"city\":\"Rome\",\"unit\":\"celsius\"}"),
                call("now", "{}")
            ])
        );
        assert_eq!(
            parse(
                " [f(a=True, b=None, c=-1.5, d=[1, 'x\\'y'], e={'k': (1, 2)}, g=1e3, h=\"\\u00e9\\n\",)]\n"
            ),
            Some(vec![call(
                "f",
                "{\"a\":true,\"b\":null,\"c\":-1.5,\"d\":[1,\"x'y\"],\"e\":{\"k\":[1,2]},\
                 \"g\":1000.0,\"h\":\"é\\n\"}"
            )])
        );
        for not in [
            "[]",
            "Sure: [f(a=1)]",
            "[f(a=1)] and more",
            "[f(1)]",
            "[f(a=x)]",
            "[f(a=1)",
            "[f(a='x)]",
            "f(a=1)",
            "[f(a=1) g(b=2)]",
        ] {
            assert_eq!(parse(not), None, "{not}");
        }
    }

    #[test]
    fn a_pythonic_list_is_followed_as_its_json() {
        assert_eq!(
            json_of("[get_weather(city=\"Rome\", unit=\"celsius\"), now()]").unwrap(),
            "[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Rome\", \"unit\":\"celsius\"}}, \
             {\"name\":\"now\",\"arguments\":{}}]"
        );
        assert_eq!(
            json_of("[f(a=True, b=[False, None], c={\"k\": \"x, y) \\\" ]\"}, d=-2)]").unwrap(),
            "[{\"name\":\"f\",\"arguments\":{\"a\":true, \"b\":[false, null], \
             \"c\":{\"k\": \"x, y) \\\" ]\"}, \"d\":-2}}]"
        );
        // Single quotes, as vLLM's examples write them: the quote Python escapes, JSON's bare;
        // a double quote inside, JSON's escaped.
        let mut py = PyCalls::default();
        let single = "[f(a='it\\'s \"x\" \\n', b={'k': 'v'})]";
        let mut out = String::new();
        for c in single.chars() {
            let (pre, c) = py.translate(c).unwrap();
            out.push_str(pre);
            out.extend(c);
            if out.ends_with("\"it") {
                assert!(
                    py.in_single_quotes(),
                    "plain tokens are not taken as they are"
                );
            }
        }
        assert_eq!(
            out,
            "[{\"name\":\"f\",\"arguments\":{\"a\":\"it's \\\"x\\\" \\n\", \
             \"b\":{\"k\": \"v\"}}}]"
        );
        assert!(!py.in_single_quotes());
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap()[0]["arguments"]["a"],
            "it's \"x\" \n"
        );
        assert_eq!(
            parse(single).unwrap()[0].arguments,
            "{\"a\":\"it's \\\"x\\\" \\n\",\"b\":{\"k\":\"v\"}}"
        );
        // JSON's spellings, positional arguments, `\/` (in either quote).
        for (text, at) in [
            ("[f(a=true)]", 5),
            ("[f(a=null)]", 5),
            ("[f(1)]", 3),
            ("[f(a=Nul)]", 6),
            ("[f(a=\"\\/\")]", 7),
            ("[f(a='\\/')]", 7),
            ("[f(a=1]", 6),
            ("[(a=1)]", 1),
            ("[f (a=1)]", 2),
            ("[f(a =1)]", 4),
        ] {
            assert_eq!(json_of(text), Err(at), "{text}");
        }
        assert!(is_identifier("city_2") && !is_identifier("2city") && !is_identifier("a-b"));
        assert!(!is_identifier(""));
    }
}
