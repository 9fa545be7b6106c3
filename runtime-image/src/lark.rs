//! Lark grammars, vLLM's other `guided_grammar` format, written out as GBNF for
//! [`crate::grammar::Grammar`].
//!
//! vLLM takes a grammar with no `::=` in it for Lark and converts it to GBNF before xgrammar
//! reads it (`convert_lark_to_gbnf`); kandle tells the two apart the same way
//! ([`is_lark`]). vLLM's conversion renames `:` to `::=` and quotes; this one reads the Lark
//! that grammars are written in:
//! - rules (`name: …`, `?name`, `!name`, `_name`) and terminals (`NAME: …`, a priority
//!   `NAME.2` read and dropped), an alternative `|` at the start of a line continuing the
//!   definition above it; `//` and `#` comments;
//! - `"strings"` (and vLLM's `'strings'`) with Python's escapes, `"text"i` for any case,
//!   `"a".."z"` ranges, `/regex/` with the flags `i`, `m`, `s`, `x` (and `u`), in Rust's
//!   regex syntax, which is Python's less look-around and back-references (refused, as are
//!   anchors and word boundaries: a terminal is matched whole);
//! - groups `( … )`, `[ … ]` (optional), `?`, `*`, `+`, `~n`, `~n..m`; an alias `-> name` is
//!   dropped (it names a tree node; the text is the same);
//! - `%import common.NAME` (`-> ALIAS`) and `%import common (A, B)`, from Lark's
//!   `common.lark` (`NUMBER`, `SIGNED_NUMBER`, `INT`, `ESCAPED_STRING`, `WS`, `CNAME`, …,
//!   each the same language as Lark's, written without look-behind); other modules refused;
//! - `%ignore` terminals (`%ignore WS`): Lark's lexer skips them between tokens, so they may
//!   come before every string, regex or terminal of a rule, and after the answer's last;
//! - the start is `start`, else the first rule (vLLM's choice).
//!
//! The text is followed as a grammar over characters, as GBNF is: Lark's lexer takes the
//! longest match of a terminal and never splits it, so an answer that only another split
//! derives (`WORD WORD` as `ab` then `c`) is one Lark would refuse and kandle may write.
//! `%declare`, `%override`, `%extend` and templates are refused. Errors name Lark's line and
//! column; the GBNF keeps each definition on its own line, so the grammar's own errors (a
//! rule used and not defined, left recursion) name Lark's lines too.

use regex_syntax::hir::{Class, Hir, HirKind};

/// Whether `text` is Lark rather than GBNF: no line has `::=` outside a `#` comment.
pub fn is_lark(text: &str) -> bool {
    !text
        .lines()
        .any(|line| line.split('#').next().unwrap_or("").contains("::="))
}

/// An error from the GBNF written out: its line is the Lark definition's, its column is not.
pub fn without_column(e: String) -> String {
    let Some((place, msg)) = e.split_once(": ") else {
        return e;
    };
    match place.split_once(", column ") {
        Some((line, _)) if line.starts_with("line ") => format!("{line}: {msg}"),
        _ => e,
    }
}

/// Lark's `common.lark`, the same languages without its look-behind and lazy repetitions:
/// an escaped string is `"` then characters other than `"`, `\` and newline, or `\` and one
/// that is not a newline, then `"`; a C comment ends at its first `*/`.
const COMMON: &str = r#"
DIGIT: "0".."9"
HEXDIGIT: "a".."f" | "A".."F" | DIGIT
INT: DIGIT+
SIGNED_INT: ["+" | "-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e" | "E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+" | "-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+" | "-"] NUMBER
ESCAPED_STRING: "\"" (/[^"\\\n]/ | "\\" /./)* "\""
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_" | LETTER) ("_" | LETTER | DIGIT)*
WS_INLINE: (" " | /\t/)+
WS: /[ \t\f\r\n]/+
CR: /\r/
LF: /\n/
NEWLINE: (CR? LF)+
SH_COMMENT: /#[^\n]*/
CPP_COMMENT: /\/\/[^\n]*/
C_COMMENT: "/*" (/[^*]/ | "*"+ /[^*\/]/)* "*"+ "/"
SQL_COMMENT: /--[^\n]*/
"#;

/// The GBNF rule of the skipped terminals.
const IGNORE: &str = "ignore-";
/// The GBNF rule of common.lark's `NAME`.
const COMMON_PREFIX: &str = "common-";

/// The GBNF for a Lark grammar; the error names the line and column, and what is wrong.
pub fn to_gbnf(text: &str) -> Result<String, String> {
    let user = Converter::read(text, "")?;
    let mut out = user.lines;
    if !user.imports.is_empty() {
        let common = Converter::read(COMMON, COMMON_PREFIX).expect("common.lark converts");
        out.extend(common.lines.into_iter().filter(|l| !l.is_empty()));
        for (alias, name) in &user.imports {
            out.push(format!("{alias} ::= {COMMON_PREFIX}{name}"));
        }
    }
    let start = user
        .start
        .ok_or("no rule: a Lark grammar's answer is what `start: …` derives")?;
    let ignore = if user.ignored.is_empty() {
        ""
    } else {
        out.push(format!("{IGNORE} ::= ({})*", user.ignored.join(" | ")));
        IGNORE
    };
    // A rule's tokens each take the skipped text before them; a terminal start takes it here.
    let before = if is_terminal(&start) { ignore } else { "" };
    out.push(format!(
        "root ::= {before} {} {ignore}",
        gbnf_name(&start, "")
    ));
    Ok(out.join("\n"))
}

/// A terminal's name is upper case (after any leading `_`); a rule's lower case.
fn is_terminal(name: &str) -> bool {
    name.trim_start_matches('_')
        .starts_with(|c: char| c.is_ascii_uppercase())
}

/// A Lark name in GBNF: as it is, in `prefix`'s namespace; `root` is GBNF's start, so a
/// Lark rule of that name becomes `root-lark` (no Lark name has a `-`).
fn gbnf_name(name: &str, prefix: &str) -> String {
    match (prefix, name) {
        ("", "root") => "root-lark".to_owned(),
        _ => format!("{prefix}{name}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Str { text: String, any_case: bool },
    Regex { pattern: String, flags: String },
    Colon,
    Pipe,
    Open(char),
    Close(char),
    Op(char),
    Tilde,
    DotDot,
    Dot,
    Comma,
    Number(u32),
    Arrow,
    Directive(String),
    Newline,
}

/// A definition's or directive's tokens, with their offsets.
struct Converter<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
    prefix: &'static str,
    /// One per line of the source: each definition on the line it starts on.
    lines: Vec<String>,
    /// `(alias, common name)`.
    imports: Vec<(String, String)>,
    /// What `%ignore` skips, each in GBNF.
    ignored: Vec<String>,
    start: Option<String>,
    /// The rule being written is a rule (not a terminal), with `%ignore`d text to skip.
    skip_before_tokens: bool,
}

fn err_at(src: &str, at: usize, msg: impl std::fmt::Display) -> String {
    let before = &src[..at.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {msg}")
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, String> {
    let mut toks = Vec::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let at = i;
        let rest = &src[i..];
        let c = rest.chars().next().expect("in bounds");
        match c {
            '\n' => {
                toks.push((Tok::Newline, at));
                i += 1;
            }
            c if c.is_whitespace() => i += c.len_utf8(),
            '#' => i += rest.find('\n').unwrap_or(rest.len()),
            '/' if rest.starts_with("//") => i += rest.find('\n').unwrap_or(rest.len()),
            '/' => {
                let mut pattern = String::new();
                let mut chars = rest[1..].char_indices();
                let end = loop {
                    match chars.next() {
                        None | Some((_, '\n')) => {
                            return Err(err_at(src, at, "a `/regex/` without its closing `/`"));
                        }
                        Some((j, '/')) => break j + 2,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '/')) => pattern.push('/'),
                            Some((_, e)) => {
                                pattern.push('\\');
                                pattern.push(e);
                            }
                            None => {
                                return Err(err_at(src, at, "a `/regex/` without its closing `/`"));
                            }
                        },
                        Some((_, c)) => pattern.push(c),
                    }
                };
                let flags_len = rest[end..]
                    .find(|c: char| !c.is_ascii_alphabetic())
                    .unwrap_or(rest.len() - end);
                let flags = rest[end..end + flags_len].to_owned();
                toks.push((Tok::Regex { pattern, flags }, at));
                i += end + flags_len;
            }
            '"' | '\'' => {
                let (text, len) = string(src, at, c)?;
                i += len;
                let any_case = src[i..].starts_with('i')
                    && !src[i + 1..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                if any_case {
                    i += 1;
                }
                toks.push((Tok::Str { text, any_case }, at));
            }
            '%' => {
                let len = rest[1..]
                    .find(|c: char| !c.is_ascii_alphabetic())
                    .unwrap_or(rest.len() - 1);
                toks.push((Tok::Directive(rest[1..1 + len].to_owned()), at));
                i += 1 + len;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                toks.push((Tok::Name(rest[..len].to_owned()), at));
                i += len;
            }
            c if c.is_ascii_digit() => {
                let len = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let n = rest[..len]
                    .parse()
                    .map_err(|_| err_at(src, at, "a number too large"))?;
                toks.push((Tok::Number(n), at));
                i += len;
            }
            _ => {
                let (tok, len) = match c {
                    '-' if rest.starts_with("->") => (Tok::Arrow, 2),
                    '.' if rest.starts_with("..") => (Tok::DotDot, 2),
                    '.' => (Tok::Dot, 1),
                    ':' => (Tok::Colon, 1),
                    '|' => (Tok::Pipe, 1),
                    ',' => (Tok::Comma, 1),
                    '~' => (Tok::Tilde, 1),
                    '(' | '[' | '{' => (Tok::Open(c), 1),
                    ')' | ']' | '}' => (Tok::Close(c), 1),
                    '?' | '*' | '+' | '!' => (Tok::Op(c), 1),
                    _ => return Err(err_at(src, at, format_args!("unexpected `{c}`"))),
                };
                toks.push((tok, at));
                i += len;
            }
        }
    }
    Ok(toks)
}

/// A quoted string at `at` (Python's escapes): its text and its length in the source.
fn string(src: &str, at: usize, quote: char) -> Result<(String, usize), String> {
    let mut out = String::new();
    let mut chars = src[at + 1..].char_indices();
    let unclosed = || {
        err_at(
            src,
            at,
            format_args!("a string without its closing `{quote}`"),
        )
    };
    loop {
        let Some((j, c)) = chars.next() else {
            return Err(unclosed());
        };
        match c {
            '\n' => return Err(unclosed()),
            c if c == quote => return Ok((out, j + 2)),
            '\\' => {
                let Some((k, e)) = chars.next() else {
                    return Err(unclosed());
                };
                let mut hex = |n: usize| -> Result<char, String> {
                    let digits = src.get(at + 1 + k + 1..at + 1 + k + 1 + n).unwrap_or("");
                    let v = (digits.len() == n && digits.chars().all(|c| c.is_ascii_hexdigit()))
                        .then(|| u32::from_str_radix(digits, 16).ok())
                        .flatten()
                        .and_then(char::from_u32)
                        .ok_or_else(|| {
                            err_at(
                                src,
                                at,
                                format_args!("`\\{e}` takes {n} hex digits of a character"),
                            )
                        })?;
                    for _ in 0..n {
                        chars.next();
                    }
                    Ok(v)
                };
                let unescaped = match e {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'f' => '\x0c',
                    'v' => '\x0b',
                    '0' => '\0',
                    'x' => hex(2)?,
                    'u' => hex(4)?,
                    'U' => hex(8)?,
                    '\\' | '"' | '\'' => e,
                    // Python keeps an unknown escape as written.
                    e => {
                        out.push('\\');
                        e
                    }
                };
                out.push(unescaped);
            }
            c => out.push(c),
        }
    }
}

/// `c` in a GBNF string or class: as itself where that is plain, else `\UXXXXXXXX`.
fn gbnf_char(c: char) -> String {
    if c.is_ascii_alphanumeric() || c == ' ' || (!c.is_ascii() && !c.is_control()) {
        c.to_string()
    } else {
        format!("\\U{:08X}", c as u32)
    }
}

fn gbnf_string(text: &str, any_case: bool) -> String {
    if !any_case {
        return format!("\"{}\"", text.chars().map(gbnf_char).collect::<String>());
    }
    let parts: Vec<String> = text
        .chars()
        .map(|c| {
            let (lower, upper): (String, String) =
                (c.to_lowercase().collect(), c.to_uppercase().collect());
            match (lower.chars().count(), upper.chars().count()) {
                (1, 1) if lower != upper => {
                    format!(
                        "[{}{}]",
                        gbnf_char(lower.chars().next().unwrap()),
                        gbnf_char(upper.chars().next().unwrap())
                    )
                }
                _ => format!("\"{}\"", gbnf_char(c)),
            }
        })
        .collect();
    format!("({})", parts.join(" "))
}

/// A regex's syntax tree as a GBNF group.
fn hir_gbnf(h: &Hir, out: &mut String) -> Result<(), String> {
    match h.kind() {
        HirKind::Empty => out.push_str("\"\""),
        HirKind::Literal(lit) => {
            let text = std::str::from_utf8(&lit.0)
                .map_err(|_| "a regex of bytes that are not UTF-8".to_owned())?;
            out.push_str(&gbnf_string(text, false));
        }
        HirKind::Class(Class::Unicode(class)) => {
            if class.ranges().is_empty() {
                out.push_str("[^\\U00000000-\\U0010FFFF]");
            } else {
                out.push('[');
                for r in class.ranges() {
                    out.push_str(&gbnf_char(r.start()));
                    if r.end() != r.start() {
                        out.push('-');
                        out.push_str(&gbnf_char(r.end()));
                    }
                }
                out.push(']');
            }
        }
        HirKind::Class(Class::Bytes(_)) => {
            return Err("a regex class of bytes rather than characters".into());
        }
        HirKind::Look(_) => {
            return Err("anchors and word boundaries (`^`, `$`, `\\b`) are not supported: a terminal's regex matches all of it".into());
        }
        HirKind::Repetition(rep) => {
            out.push('(');
            hir_gbnf(&rep.sub, out)?;
            out.push(')');
            match (rep.min, rep.max) {
                (0, None) => out.push('*'),
                (1, None) => out.push('+'),
                (0, Some(1)) => out.push('?'),
                (m, None) => out.push_str(&format!("{{{m},}}")),
                (m, Some(n)) => out.push_str(&format!("{{{m},{n}}}")),
            }
        }
        HirKind::Capture(cap) => hir_gbnf(&cap.sub, out)?,
        HirKind::Concat(parts) | HirKind::Alternation(parts) => {
            let between = match h.kind() {
                HirKind::Concat(_) => " ",
                _ => " | ",
            };
            out.push('(');
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    out.push_str(between);
                }
                hir_gbnf(p, out)?;
            }
            out.push(')');
        }
    }
    Ok(())
}

fn regex_gbnf(pattern: &str, flags: &str) -> Result<String, String> {
    let mut p = regex_syntax::ParserBuilder::new();
    p.unicode(true).utf8(true);
    for f in flags.chars() {
        match f {
            'i' => p.case_insensitive(true),
            'm' => p.multi_line(true),
            's' => p.dot_matches_new_line(true),
            'x' => p.ignore_whitespace(true),
            'u' => &mut p,
            f => {
                return Err(format!(
                    "the regex flag `{f}` is not supported (`i`, `m`, `s`, `x`, `u` are)"
                ));
            }
        };
    }
    let hir = p.build().parse(pattern).map_err(|e| {
        let e = e.to_string();
        let why = e
            .lines()
            .last()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_owned();
        format!("the regex /{pattern}/ is not one kandle reads: {why}")
    })?;
    let mut out = String::new();
    hir_gbnf(&hir, &mut out)?;
    Ok(out)
}

impl<'a> Converter<'a> {
    fn read(src: &'a str, prefix: &'static str) -> Result<Converter<'a>, String> {
        let mut c = Converter {
            src,
            toks: lex(src)?,
            pos: 0,
            prefix,
            lines: vec![String::new(); src.lines().count().max(1)],
            imports: Vec::new(),
            ignored: Vec::new(),
            start: None,
            skip_before_tokens: false,
        };
        c.statements()?;
        Ok(c)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn at(&self) -> usize {
        self.toks
            .get(self.pos)
            .map_or(self.src.len(), |(_, at)| *at)
    }

    fn err(&self, msg: impl std::fmt::Display) -> String {
        err_at(self.src, self.at(), msg)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|(t, _)| t.clone());
        self.pos += 1;
        t
    }

    fn line_of(&self, at: usize) -> usize {
        self.src[..at].matches('\n').count()
    }

    fn statements(&mut self) -> Result<(), String> {
        let ignores: Vec<usize> = self
            .toks
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| *t == Tok::Directive("ignore".into()))
            .map(|(i, _)| i)
            .collect();
        // `%ignore` applies to the whole grammar, wherever it is written.
        for i in ignores {
            self.pos = i + 1;
            let item = self.expansions(0)?;
            self.end_of_statement()?;
            self.ignored.push(item);
        }
        self.pos = 0;
        while let Some(tok) = self.peek().cloned() {
            let at = self.at();
            match tok {
                Tok::Newline => {
                    self.pos += 1;
                }
                Tok::Directive(d) => {
                    self.pos += 1;
                    match d.as_str() {
                        "import" => self.import(at)?,
                        "ignore" => {
                            while !matches!(self.peek(), None | Some(Tok::Newline)) {
                                self.pos += 1;
                            }
                        }
                        other => {
                            return Err(err_at(
                                self.src,
                                at,
                                format_args!(
                                    "`%{other}` is not supported (`%import common` and `%ignore` are)"
                                ),
                            ));
                        }
                    }
                }
                Tok::Op('?') | Tok::Op('!') | Tok::Name(_) => self.definition(at)?,
                _ => return Err(self.err("expected a rule's or terminal's definition (`name: …`)")),
            }
        }
        Ok(())
    }

    fn end_of_statement(&mut self) -> Result<(), String> {
        match self.peek() {
            None | Some(Tok::Newline) => Ok(()),
            Some(Tok::Close(c)) => Err(self.err(format_args!("`{c}` without its opening bracket"))),
            Some(_) => Err(self.err("unexpected text at the end of the definition")),
        }
    }

    fn import(&mut self, at: usize) -> Result<(), String> {
        let module = match self.next() {
            Some(Tok::Name(m)) => m,
            _ => return Err(err_at(self.src, at, "expected `%import common.NAME`")),
        };
        if module != "common" {
            return Err(err_at(
                self.src,
                at,
                format_args!("`%import {module}`: only Lark's `common` terminals can be imported"),
            ));
        }
        let mut names = Vec::new();
        match self.next() {
            Some(Tok::Dot) => match self.next() {
                Some(Tok::Name(n)) => {
                    let alias = match self.peek() {
                        Some(Tok::Arrow) => {
                            self.pos += 1;
                            match self.next() {
                                Some(Tok::Name(a)) => a,
                                _ => return Err(self.err("expected a name after `->`")),
                            }
                        }
                        _ => n.clone(),
                    };
                    names.push((alias, n));
                }
                _ => return Err(err_at(self.src, at, "expected `%import common.NAME`")),
            },
            Some(Tok::Open('(')) => loop {
                match self.next() {
                    Some(Tok::Name(n)) => names.push((n.clone(), n)),
                    _ => return Err(err_at(self.src, at, "expected `%import common (A, B)`")),
                }
                match self.next() {
                    Some(Tok::Comma) => {}
                    Some(Tok::Close(')')) => break,
                    _ => return Err(err_at(self.src, at, "expected `%import common (A, B)`")),
                }
            },
            _ => return Err(err_at(self.src, at, "expected `%import common.NAME`")),
        }
        self.end_of_statement()?;
        for (alias, name) in names {
            if !COMMON
                .lines()
                .any(|l| l.split(':').next() == Some(name.as_str()))
                || name.starts_with('_')
            {
                return Err(err_at(
                    self.src,
                    at,
                    format_args!("`common.{name}` is not one of Lark's common terminals"),
                ));
            }
            self.imports.push((alias, name));
        }
        Ok(())
    }

    fn definition(&mut self, at: usize) -> Result<(), String> {
        if matches!(self.peek(), Some(Tok::Op(_))) {
            self.pos += 1;
        }
        let Some(Tok::Name(name)) = self.next() else {
            return Err(err_at(self.src, at, "expected a rule's or terminal's name"));
        };
        match self.peek() {
            Some(Tok::Open('{')) => return Err(self.err("templates (`name{…}`) are not supported")),
            Some(Tok::Dot) => {
                // A priority: `NAME.2:`.
                self.pos += 1;
                if !matches!(self.next(), Some(Tok::Number(_))) {
                    return Err(self.err("expected a priority's number after `.`"));
                }
            }
            _ => {}
        }
        if self.next() != Some(Tok::Colon) {
            return Err(err_at(
                self.src,
                at,
                format_args!("expected `:` after `{name}`"),
            ));
        }
        if name == "start" || self.start.is_none() {
            self.start = Some(name.clone());
        }
        self.skip_before_tokens = !is_terminal(&name) && self.prefix.is_empty();
        let body = self.expansions(0)?;
        self.end_of_statement()?;
        let line = self.line_of(at);
        self.lines[line] = format!("{} ::= {body}", gbnf_name(&name, self.prefix));
        Ok(())
    }

    /// Whether a `|` on a following line continues the definition (`depth` 0), skipping the
    /// lines between; inside brackets lines never end it.
    fn continues(&mut self, depth: usize) -> bool {
        let mut p = self.pos;
        while self.toks.get(p).map(|(t, _)| t) == Some(&Tok::Newline) {
            p += 1;
        }
        let goes_on = depth > 0 || self.toks.get(p).map(|(t, _)| t) == Some(&Tok::Pipe);
        if goes_on {
            self.pos = p;
        }
        goes_on
    }

    /// `alias (| alias)*` up to the end of the definition or a closing bracket.
    fn expansions(&mut self, depth: usize) -> Result<String, String> {
        let mut alts = vec![self.expansion(depth)?];
        loop {
            if self.peek() == Some(&Tok::Newline) && !self.continues(depth) {
                break;
            }
            if self.peek() != Some(&Tok::Pipe) {
                break;
            }
            self.pos += 1;
            alts.push(self.expansion(depth)?);
        }
        Ok(alts.join(" | "))
    }

    fn expansion(&mut self, depth: usize) -> Result<String, String> {
        let mut items = Vec::new();
        loop {
            if depth > 0 {
                while self.peek() == Some(&Tok::Newline) {
                    self.pos += 1;
                }
            }
            match self.peek() {
                None | Some(Tok::Newline) | Some(Tok::Pipe) | Some(Tok::Close(_)) => break,
                Some(Tok::Arrow) => {
                    self.pos += 1;
                    if !matches!(self.next(), Some(Tok::Name(_))) {
                        return Err(self.err("expected an alias's name after `->`"));
                    }
                    break;
                }
                _ => items.push(self.item(depth)?),
            }
        }
        // An empty alternative derives nothing, as `""` does.
        Ok(if items.is_empty() {
            "\"\"".to_owned()
        } else {
            items.join(" ")
        })
    }

    fn item(&mut self, depth: usize) -> Result<String, String> {
        let atom = self.atom(depth)?;
        match self.peek() {
            Some(Tok::Op(op @ ('?' | '*' | '+'))) => {
                let op = *op;
                self.pos += 1;
                Ok(format!("({atom}){op}"))
            }
            Some(Tok::Tilde) => {
                self.pos += 1;
                let Some(Tok::Number(min)) = self.next() else {
                    return Err(self.err("expected a count after `~`"));
                };
                if self.peek() == Some(&Tok::DotDot) {
                    self.pos += 1;
                    let Some(Tok::Number(max)) = self.next() else {
                        return Err(self.err("expected `~n..m`"));
                    };
                    Ok(format!("({atom}){{{min},{max}}}"))
                } else {
                    Ok(format!("({atom}){{{min}}}"))
                }
            }
            _ => Ok(atom),
        }
    }

    fn atom(&mut self, depth: usize) -> Result<String, String> {
        let at = self.at();
        // Text a rule takes from the answer may follow skipped text, as Lark's lexer allows.
        let token = |c: &Self, gbnf: String| {
            if c.skip_before_tokens && !c.ignored.is_empty() {
                format!("{IGNORE} {gbnf}")
            } else {
                gbnf
            }
        };
        match self.next() {
            Some(Tok::Open(open @ ('(' | '['))) => {
                let inner = self.expansions(depth + 1)?;
                let close = if open == '(' { ')' } else { ']' };
                if self.next() != Some(Tok::Close(close)) {
                    return Err(err_at(
                        self.src,
                        at,
                        format_args!("`{open}` without its `{close}`"),
                    ));
                }
                Ok(if open == '(' {
                    format!("({inner})")
                } else {
                    format!("({inner})?")
                })
            }
            Some(Tok::Str { text, any_case }) => {
                if self.peek() == Some(&Tok::DotDot) {
                    self.pos += 1;
                    let Some(Tok::Str { text: hi, .. }) = self.next() else {
                        return Err(err_at(self.src, at, "expected `\"a\"..\"z\"`"));
                    };
                    let (mut l, mut h) = (text.chars(), hi.chars());
                    let (Some(lo), None, Some(hi), None) = (l.next(), l.next(), h.next(), h.next())
                    else {
                        return Err(err_at(
                            self.src,
                            at,
                            "a range's ends are one character each",
                        ));
                    };
                    if hi < lo {
                        return Err(err_at(self.src, at, "a range whose end is below its start"));
                    }
                    return Ok(token(
                        self,
                        format!("[{}-{}]", gbnf_char(lo), gbnf_char(hi)),
                    ));
                }
                Ok(token(self, gbnf_string(&text, any_case)))
            }
            Some(Tok::Regex { pattern, flags }) => {
                let gbnf = regex_gbnf(&pattern, &flags).map_err(|e| err_at(self.src, at, e))?;
                Ok(token(self, gbnf))
            }
            Some(Tok::Name(name)) => {
                let gbnf = gbnf_name(&name, self.prefix);
                Ok(if is_terminal(&name) {
                    token(self, gbnf)
                } else {
                    gbnf
                })
            }
            Some(Tok::Directive(d)) => Err(err_at(
                self.src,
                at,
                format_args!("`%{d}` must start its own line"),
            )),
            Some(Tok::Close(c)) => Err(err_at(
                self.src,
                at,
                format_args!("`{c}` without its opening bracket"),
            )),
            Some(Tok::Open('{')) => Err(err_at(
                self.src,
                at,
                "templates and `{…}` are not supported (write `~n..m`)",
            )),
            _ => Err(err_at(
                self.src,
                at,
                "expected a string, a `/regex/`, a name or a group",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::{Grammar, GrammarState};

    fn grammar(lark: &str) -> Grammar {
        assert!(is_lark(lark));
        let gbnf = to_gbnf(lark).unwrap_or_else(|e| panic!("{lark}: {e}"));
        Grammar::parse(&gbnf).unwrap_or_else(|e| panic!("{gbnf}: {e}"))
    }

    /// Whether `g` derives `text` whole.
    fn derives(g: &Grammar, text: &str) -> bool {
        let mut s = GrammarState::new(g);
        s.push_bytes(g, text.as_bytes()) && s.matched()
    }

    #[test]
    fn gbnf_is_told_from_lark_as_vllm_tells_them() {
        assert!(!is_lark("root ::= \"a\"  # a: b"));
        assert!(is_lark("start: \"a\" # root ::= b"));
        assert!(is_lark("?start: value\nvalue: \"a\""));
    }

    /// Lark's own JSON example (lark-parser's docs), as vLLM's docs show it, with `%ignore WS`.
    const JSON: &str = r#"
        ?start: value

        ?value: object
              | array
              | string
              | SIGNED_NUMBER      -> number
              | "true"             -> true
              | "false"            -> false
              | "null"             -> null

        array  : "[" [value ("," value)*] "]"
        object : "{" [pair ("," pair)*] "}"
        pair   : string ":" value

        string : ESCAPED_STRING

        %import common.ESCAPED_STRING
        %import common.SIGNED_NUMBER
        %import common.WS
        %ignore WS
    "#;

    #[test]
    fn lark_s_json_grammar_derives_json_with_whitespace_between_tokens_only() {
        let g = grammar(JSON);
        for ok in [
            r#"{"a": [1, -2.5e3, true, null], "b\"c": {}}"#,
            "  [ 1 ,2 ]\n",
            "\"x\\\\\"",
            "[]",
            "-0.5",
        ] {
            assert!(derives(&g, ok), "{ok}");
        }
        for bad in [
            "[1,]",
            "{\"a\" 1}",
            "tr ue",
            "1 2",
            "\"a\nb\"",
            "[1] x",
            "- 1",
            "1.e",
        ] {
            assert!(!derives(&g, bad), "{bad}");
        }
    }

    #[test]
    fn strings_ranges_regexes_and_repetitions_derive_what_lark_says() {
        let g = grammar(
            r#"
            start: greeting ("," name)~1..2 "!"?   // a comment
            greeting: "hello"i | 'hi'
            name: CAPITAL LOWER+ | /[0-9]{2}-x/
            CAPITAL: "A".."Z"
            LOWER.2: /[a-z]/
            "#,
        );
        for ok in ["hello,Ann", "HeLLo,Ann,Bo!", "hi,42-x"] {
            assert!(derives(&g, ok), "{ok}");
        }
        for bad in [
            "Hi,Ann",
            "hello",
            "hello,ann",
            "hello,A,B,C",
            "hello,4-x",
            "hello, Ann",
        ] {
            assert!(!derives(&g, bad), "{bad}");
        }
        let g = grammar("start: \"a\" [\"b\"] \"c\"~3\nstart2: start");
        assert!(derives(&g, "accc") && derives(&g, "abccc") && !derives(&g, "acc"));
        let g = grammar("start: /x(?i:ab)+y/s | /./s");
        assert!(derives(&g, "xAbaBy") && derives(&g, "\n") && !derives(&g, "xy"));
    }

    #[test]
    fn ignored_text_may_come_between_a_rule_s_tokens_and_never_inside_a_terminal() {
        let g = grammar(
            "start: WORD (\",\" WORD)*\nWORD: /[a-z]+/\n%ignore \" \"\n%ignore /#[^\\n]*\\n/",
        );
        for ok in ["ab,cd", "  ab , cd  ", "ab,# note\ncd"] {
            assert!(derives(&g, ok), "{ok:?}");
        }
        assert!(!derives(&g, "a b,cd"), "inside a terminal");
        // A terminal start takes it too.
        let g = grammar("START: \"x\"+\n%ignore \" \"");
        assert!(derives(&g, " xx ") && !derives(&g, "x x"));
    }

    #[test]
    fn common_terminals_are_the_languages_lark_gives_them() {
        let g = grammar(
            "%import common (NUMBER, CNAME)\n%import common.ESCAPED_STRING -> S\nstart: NUMBER | CNAME | S",
        );
        for ok in [
            "12",
            "1.5",
            "1.",
            ".5",
            "1e-3",
            "2.E4",
            "_x9",
            r#""a\"b""#,
            r#""\\""#,
        ] {
            assert!(derives(&g, ok), "{ok}");
        }
        for bad in ["-1", ".", "9x", r#""a"b""#, r#""\""#, "\"a\nb\""] {
            assert!(!derives(&g, bad), "{bad}");
        }
        let g = grammar("%import common.C_COMMENT\nstart: C_COMMENT");
        assert!(derives(&g, "/* a * b **/") && !derives(&g, "/* a */ b */"));
    }

    #[test]
    fn the_start_is_start_else_the_first_rule_and_a_rule_named_root_is_kept_apart() {
        let g = grammar("a: \"a\"\nstart: \"s\"");
        assert!(derives(&g, "s") && !derives(&g, "a"));
        let g = grammar("root: \"r\" other\nother: \"o\"");
        assert!(derives(&g, "ro"));
        // `!` and `?` shape Lark's tree, not the text.
        let g = grammar("!start: \"a\" _b\n?_b: \"b\"");
        assert!(derives(&g, "ab"));
    }

    #[test]
    fn errors_name_the_line_and_what_is_wrong() {
        for (text, says) in [
            (
                "start: a\n\na: \"x\"\n  | c",
                "line 3: rule `c` is used but not defined",
            ),
            (
                "start: \"a\n",
                "line 1, column 8: a string without its closing `\"`",
            ),
            (
                "start: /a(?=b)/",
                "line 1, column 8: the regex /a(?=b)/ is not one kandle reads",
            ),
            ("start: /^a$/", "anchors"),
            ("start: /a/q", "the regex flag `q`"),
            ("start: (\"a\"", "`(` without its `)`"),
            ("start: \"a\")", "`)` without its opening bracket"),
            (
                "%import python.NAME\nstart: NAME",
                "only Lark's `common` terminals",
            ),
            (
                "%import common.NOPE\nstart: NOPE",
                "`common.NOPE` is not one of Lark's common",
            ),
            ("%declare X\nstart: X", "`%declare` is not supported"),
            ("start{a}: a", "templates"),
            ("start: \"b\"..\"a\"", "end is below its start"),
            ("start: \"ab\"..\"z\"", "one character each"),
            ("start: \"a\" ; \"b\"", "unexpected `;`"),
            ("// nothing", "no rule"),
            ("start: start \"a\"", "left-recursive"),
        ] {
            let e = Grammar::parse(text).map(|_| ()).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
