//! Grammars (vLLM's `guided_grammar` and `structured_outputs.grammar`): the answer is text
//! that a context-free grammar derives from its `root` rule. The grammar is written in GBNF,
//! llama.cpp's grammar format, which xgrammar (vLLM's default structured-output backend) also
//! reads as its EBNF.
//!
//! [`Grammar::parse`] compiles the text into rules of character elements and rule references;
//! [`GrammarState`] follows the answer as llama.cpp's grammar sampler does: a set of stacks,
//! each one way the text so far can go on, the innermost rule's position on top.
//! [`mask_grammar`] masks every token whose bytes no stack can take, walking the vocabulary in
//! byte order so that tokens sharing a prefix step over it once.
//!
//! What is read, and what kandle decides where the format leaves a choice:
//! - Rules `name ::= alternatives`, names of letters, digits, `-` and `_`; a rule may span
//!   lines, and ends where the next `name ::=` begins (so a line may start with `|`).
//!   `#` starts a comment to the end of the line.
//! - Terminals: `"text"` and character classes `[a-z0-9_]`, `[^"\\]`, with the escapes `\n`,
//!   `\r`, `\t`, `\\`, `\"`, `\[`, `\]`, `\-`, `\^`, `\xHH`, `\uHHHH`, `\UHHHHHHHH`; `.` is any
//!   character. Groups `( … )`, and `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` after a terminal, a
//!   group or a rule (a string's repetition repeats all of it).
//! - The grammar is over characters; a token that holds part of a UTF-8 character is stepped
//!   over by its bytes, and allowed where a character beginning so may come.
//! - Refused with the line and column: left recursion (`a ::= a "x"`, which would never
//!   advance; llama.cpp refuses it too), a rule used and not defined, a missing `root`, token
//!   references (`<[…]>`, `<think>`), and repetitions that would expand past
//!   [`MAX_ELEMENTS`].
//! - A grammar with no `::=` is Lark's syntax (vLLM's other grammar format, told apart as
//!   vLLM does): [`crate::lark`] writes it out as GBNF first.
//! - End-of-text is allowed only where `root` is complete; where the grammar can go no
//!   further, the answer ends (`finish_reason: "stop"`), as with a regex.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::json_mode::JsonVocab;

/// Elements of a compiled grammar at most, repetitions expanded.
pub const MAX_ELEMENTS: usize = 1 << 16;
/// Rules expanded through at once, at most (each a frame of the thread's stack).
const MAX_EXPANSION: u32 = 512;
/// Groups `( … )` nested in one another, at most (each a frame of the parser's stack).
pub const MAX_NESTING: usize = 64;
/// Ways the text may go on at once, at most: past it, a grammar is refused as too ambiguous
/// while it is checked at its start, and a request whose answer reaches it is masked shut.
pub const MAX_STACKS: usize = 1024;

/// One element of an alternative.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    /// A character in (`negated`: not in) these sorted, disjoint, inclusive ranges.
    Chars {
        negated: bool,
        ranges: Box<[(u32, u32)]>,
    },
    /// A rule, by index.
    Rule(u32),
    /// The end of an alternative.
    End,
}

impl Elem {
    fn chars(negated: bool, mut ranges: Vec<(u32, u32)>) -> Elem {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Elem::Chars {
            negated,
            ranges: merged.into(),
        }
    }

    fn char(c: u32) -> Elem {
        Elem::chars(false, vec![(c, c)])
    }

    /// Whether some character in `lo..=hi` matches (a character element).
    fn takes_any_of(&self, lo: u32, hi: u32) -> bool {
        let Elem::Chars { negated, ranges } = self else {
            return false;
        };
        if !negated {
            return ranges.iter().any(|&(a, b)| a <= hi && lo <= b);
        }
        // Negated: some character of lo..=hi lies outside every range.
        let mut next = lo;
        for &(a, b) in ranges.iter() {
            if b < next {
                continue;
            }
            if a > next {
                return true;
            }
            match b.checked_add(1) {
                Some(n) if n <= hi => next = n,
                _ => return false,
            }
        }
        next <= hi
    }
}

/// A compiled grammar.
#[derive(Debug)]
pub struct Grammar {
    /// Every rule's alternatives, one after another, each ending with [`Elem::End`].
    elems: Vec<Elem>,
    /// Per rule, where its alternatives start in `elems`.
    rules: Vec<Vec<u32>>,
    root: u32,
    /// What the masks have found ([`mask_grammar`]).
    transitions: Mutex<Transitions>,
}

/// The grammar's text as it is read: rules of alternatives of elements, by name.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    ids: HashMap<String, u32>,
    names: Vec<String>,
    /// Per rule, its alternatives (`None`: used, not yet defined).
    bodies: Vec<Option<Vec<Vec<Elem>>>>,
    /// Per rule, the named rule it was written in (itself, for a named one): a group or a
    /// repetition becomes a rule of its own.
    owner: Vec<u32>,
    /// Where each named rule was first used, for the error when it is never defined.
    used_at: Vec<usize>,
    size: usize,
    /// Groups open at the position read.
    nesting: usize,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn err_at(&self, at: usize, msg: impl std::fmt::Display) -> String {
        let before = &self.src[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        format!("line {line}, column {column}: {msg}")
    }

    fn err(&self, msg: impl std::fmt::Display) -> String {
        self.err_at(self.pos, msg)
    }

    /// Skips whitespace, newlines and `#` comments.
    fn skip_space(&mut self) {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start();
            self.pos += rest.len() - trimmed.len();
            if !trimmed.starts_with('#') {
                return;
            }
            self.pos += trimmed.find('\n').unwrap_or(trimmed.len());
        }
    }

    fn name(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let len = rest.find(|c| !is_name_char(c)).unwrap_or(rest.len());
        (len > 0).then(|| {
            self.pos += len;
            &rest[..len]
        })
    }

    /// Whether a rule's definition (`name ::=`) starts here.
    fn at_definition(&self) -> bool {
        let rest = self.rest();
        let len = rest.find(|c| !is_name_char(c)).unwrap_or(rest.len());
        len > 0 && rest[len..].trim_start().starts_with("::=")
    }

    fn rule_id(&mut self, name: &str, at: usize) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(name.to_owned(), id);
        self.names.push(name.to_owned());
        self.bodies.push(None);
        self.owner.push(id);
        self.used_at.push(at);
        id
    }

    /// A rule for a group or repetition inside rule `owner`.
    fn new_rule(&mut self, owner: u32, alts: Vec<Vec<Elem>>) -> Result<u32, String> {
        self.grow(alts.iter().map(|a| a.len() + 1).sum())?;
        let id = self.names.len() as u32;
        let name = format!("{}_{id}", self.names[owner as usize]);
        self.names.push(name);
        self.bodies.push(Some(alts));
        self.owner.push(owner);
        self.used_at.push(self.pos);
        Ok(id)
    }

    fn grow(&mut self, n: usize) -> Result<(), String> {
        self.size += n;
        if self.size > MAX_ELEMENTS {
            return Err(self.err(format_args!(
                "the grammar expands to more than {MAX_ELEMENTS} elements (its repetitions \
                 are written out)"
            )));
        }
        Ok(())
    }

    fn parse(mut self) -> Result<Grammar, String> {
        loop {
            self.skip_space();
            if self.pos == self.src.len() {
                break;
            }
            let at = self.pos;
            let Some(name) = self.name() else {
                return Err(self.err("expected a rule's name (`name ::= …`)"));
            };
            self.skip_space();
            if !self.rest().starts_with("::=") {
                return Err(self.err(format_args!("expected `::=` after rule name `{name}`")));
            }
            self.pos += 3;
            let id = self.rule_id(name, at);
            let alts = self.alternatives(id, false)?;
            if self.peek() == Some(')') {
                return Err(self.err("`)` without its `(`"));
            }
            if self.bodies[id as usize].is_some() {
                return Err(self.err_at(at, format_args!("rule `{name}` is defined twice")));
            }
            self.grow(alts.iter().map(|a| a.len() + 1).sum())?;
            self.bodies[id as usize] = Some(alts);
        }
        let Some(&root) = self.ids.get("root") else {
            return Err("no `root` rule: the answer is what `root ::= …` derives".into());
        };
        if let Some(id) = self.bodies.iter().position(Option::is_none) {
            return Err(self.err_at(
                self.used_at[id],
                format_args!("rule `{}` is used but not defined", self.names[id]),
            ));
        }
        let bodies: Vec<Vec<Vec<Elem>>> = self.bodies.into_iter().flatten().collect();
        check_left_recursion(&bodies, &self.names, &self.owner)?;
        let mut elems = Vec::with_capacity(self.size);
        let mut rules = Vec::with_capacity(bodies.len());
        for alts in bodies {
            let mut starts = Vec::with_capacity(alts.len());
            for alt in alts {
                starts.push(elems.len() as u32);
                elems.extend(alt);
                elems.push(Elem::End);
            }
            rules.push(starts);
        }
        let g = Grammar {
            elems,
            rules,
            root,
            transitions: Default::default(),
        };
        let mut start = GrammarState::default();
        if !g.start_into(&mut start) {
            return Err(format!(
                "the grammar is too ambiguous (more than {MAX_STACKS} ways to begin) or its \
                 rules begin with a chain of more than {MAX_EXPANSION} rules"
            ));
        }
        Ok(g)
    }

    /// Alternatives separated by `|`, up to the end, a `)` (`nested`) or the next rule.
    fn alternatives(&mut self, owner: u32, nested: bool) -> Result<Vec<Vec<Elem>>, String> {
        let mut alts = vec![self.sequence(owner, nested)?];
        while self.peek() == Some('|') {
            self.bump();
            alts.push(self.sequence(owner, nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, owner: u32, nested: bool) -> Result<Vec<Elem>, String> {
        let mut seq = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None | Some('|') | Some(')') => return Ok(seq),
                Some(_) if self.at_definition() => {
                    if nested {
                        return Err(self.err("expected `)` before the next rule"));
                    }
                    return Ok(seq);
                }
                Some(_) => {}
            }
            let atom = self.atom(owner)?;
            self.skip_space();
            let (min, max) = match self.peek() {
                Some('{') => self.braces()?,
                Some(op @ ('*' | '+' | '?')) => {
                    self.bump();
                    match op {
                        '*' => (0, None),
                        '+' => (1, None),
                        _ => (0, Some(1)),
                    }
                }
                _ => {
                    seq.extend(atom);
                    continue;
                }
            };
            let repeated = self.repeat(owner, atom, min, max)?;
            seq.extend(repeated);
        }
    }

    /// `{m}`, `{m,}` or `{m,n}` (the braces taken).
    fn braces(&mut self) -> Result<(u32, Option<u32>), String> {
        let at = self.pos;
        let end = self
            .rest()
            .find('}')
            .ok_or_else(|| self.err("`{` without its `}`"))?;
        let inner = &self.rest()[1..end];
        let num = |s: &str| -> Result<u32, String> {
            s.trim().parse::<u32>().map_err(|_| {
                self.err_at(
                    at,
                    format_args!("expected `{{m}}`, `{{m,}}` or `{{m,n}}`, got `{{{inner}}}`"),
                )
            })
        };
        let (min, max) = match inner.split_once(',') {
            None => {
                let n = num(inner)?;
                (n, Some(n))
            }
            Some((m, n)) if n.trim().is_empty() => (num(m)?, None),
            Some((m, n)) => (num(m)?, Some(num(n)?)),
        };
        if max.is_some_and(|n| n < min) {
            return Err(self.err_at(
                at,
                format_args!("`{{{inner}}}`: the most is below the least"),
            ));
        }
        self.pos += end + 1;
        Ok((min, max))
    }

    /// `atom` `min` to `max` times: `min` copies, then `max − min` nested optional rules (or
    /// one that repeats itself, unbounded), as llama.cpp writes them out.
    fn repeat(
        &mut self,
        owner: u32,
        atom: Vec<Elem>,
        min: u32,
        max: Option<u32>,
    ) -> Result<Vec<Elem>, String> {
        if atom.is_empty() {
            return Ok(atom);
        }
        let copies = max.unwrap_or(min).max(min) as usize;
        self.grow(atom.len().saturating_mul(copies))?;
        let mut out = Vec::new();
        for _ in 0..min {
            out.extend(atom.iter().cloned());
        }
        match max {
            None => {
                // r ::= atom r | ε
                let id = self.names.len() as u32;
                let mut again = atom;
                again.push(Elem::Rule(id));
                let r = self.new_rule(owner, vec![again, Vec::new()])?;
                out.push(Elem::Rule(r));
            }
            Some(max) => {
                let mut tail: Option<u32> = None;
                for _ in min..max {
                    let mut seq = atom.clone();
                    seq.extend(tail.map(Elem::Rule));
                    tail = Some(self.new_rule(owner, vec![seq, Vec::new()])?);
                }
                out.extend(tail.map(Elem::Rule));
            }
        }
        Ok(out)
    }

    /// A terminal, a group or a rule: its elements (a string's, one per character).
    fn atom(&mut self, owner: u32) -> Result<Vec<Elem>, String> {
        let at = self.pos;
        match self.peek() {
            Some('"') => {
                self.bump();
                let mut out = Vec::new();
                loop {
                    match self.peek() {
                        None => return Err(self.err_at(at, "a string without its closing `\"`")),
                        Some('"') => {
                            self.bump();
                            return Ok(out);
                        }
                        Some(_) => out.push(Elem::char(self.char_in(at)?)),
                    }
                }
            }
            Some('[') => {
                self.bump();
                let negated = self.peek() == Some('^');
                if negated {
                    self.bump();
                }
                let mut ranges = Vec::new();
                loop {
                    match self.peek() {
                        None => return Err(self.err_at(at, "a `[` class without its `]`")),
                        Some(']') => {
                            self.bump();
                            break;
                        }
                        Some(_) => {
                            let lo = self.char_in(at)?;
                            let hi = match self.rest().strip_prefix('-') {
                                Some(r) if !r.starts_with(']') && !r.is_empty() => {
                                    self.bump();
                                    self.char_in(at)?
                                }
                                _ => lo,
                            };
                            if hi < lo {
                                return Err(
                                    self.err_at(at, "a class range whose end is below its start")
                                );
                            }
                            ranges.push((lo, hi));
                        }
                    }
                }
                if ranges.is_empty() && !negated {
                    return Err(self.err_at(at, "`[]` matches no character"));
                }
                Ok(vec![Elem::chars(negated, ranges)])
            }
            Some('.') => {
                self.bump();
                Ok(vec![Elem::chars(true, Vec::new())])
            }
            Some('(') => {
                self.bump();
                self.nesting += 1;
                if self.nesting > MAX_NESTING {
                    return Err(self.err_at(
                        at,
                        format_args!("groups nested more than {MAX_NESTING} deep"),
                    ));
                }
                let alts = self.alternatives(owner, true)?;
                self.nesting -= 1;
                if self.bump() != Some(')') {
                    return Err(self.err_at(at, "`(` without its `)`"));
                }
                Ok(vec![Elem::Rule(self.new_rule(owner, alts)?)])
            }
            Some('<') => {
                Err(self.err("token references (`<…>`) are not supported; write the token's text"))
            }
            Some(c) if is_name_char(c) => {
                let name = self.name().expect("a name character");
                Ok(vec![Elem::Rule(self.rule_id(name, at))])
            }
            Some(c) => Err(self.err(format_args!("unexpected `{c}`"))),
            None => Err(self.err("unexpected end")),
        }
    }

    /// One character of a string or class, escapes read.
    fn char_in(&mut self, at: usize) -> Result<u32, String> {
        let c = self.bump().ok_or_else(|| self.err_at(at, "unfinished"))?;
        if c != '\\' {
            return Ok(c as u32);
        }
        let e = self
            .bump()
            .ok_or_else(|| self.err("an escape without its character"))?;
        let hex = |p: &mut Self, n: usize| -> Result<u32, String> {
            let digits = p
                .rest()
                .get(..n)
                .filter(|d| d.chars().all(|c| c.is_ascii_hexdigit()));
            let Some(digits) = digits else {
                return Err(p.err(format_args!("`\\{e}` takes {n} hex digits")));
            };
            p.pos += n;
            let v = u32::from_str_radix(digits, 16).expect("hex digits");
            char::from_u32(v)
                .map(|c| c as u32)
                .ok_or_else(|| p.err(format_args!("`\\{e}{digits}` is not a character")))
        };
        Ok(match e {
            'n' => '\n' as u32,
            'r' => '\r' as u32,
            't' => '\t' as u32,
            '\\' | '"' | '[' | ']' | '-' | '^' | '/' => e as u32,
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            _ => return Err(self.err(format_args!("unknown escape `\\{e}`"))),
        })
    }
}

/// Refuses a rule that can reach itself before taking a character: expanding it would never
/// end.
fn check_left_recursion(
    bodies: &[Vec<Vec<Elem>>],
    names: &[String],
    owner: &[u32],
) -> Result<(), String> {
    let mut nullable = vec![false; bodies.len()];
    loop {
        let mut changed = false;
        for (r, alts) in bodies.iter().enumerate() {
            if nullable[r] {
                continue;
            }
            let null = |e: &Elem| matches!(e, Elem::Rule(s) if nullable[*s as usize]);
            if alts.iter().any(|alt| alt.iter().all(null)) {
                nullable[r] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    // The rules each may begin with.
    let firsts: Vec<Vec<u32>> = bodies
        .iter()
        .map(|alts| {
            let mut f = Vec::new();
            for alt in alts {
                for e in alt {
                    match e {
                        Elem::Rule(s) => {
                            f.push(*s);
                            if !nullable[*s as usize] {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
            }
            f
        })
        .collect();
    // Depth-first, iteratively: 0 unseen, 1 on the path, 2 done.
    let mut mark = vec![0u8; bodies.len()];
    for start in 0..bodies.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = 1;
        while let Some(top) = path.last_mut() {
            let (r, i) = *top;
            top.1 += 1;
            match firsts[r].get(i) {
                Some(&s) => {
                    let s = s as usize;
                    match mark[s] {
                        0 => {
                            mark[s] = 1;
                            path.push((s, 0));
                        }
                        1 => {
                            let named = names[owner[s] as usize].as_str();
                            return Err(format!(
                                "rule `{named}` is left-recursive: it can reach itself before \
                                 taking a character (write the repetition with `*` or `+`)"
                            ));
                        }
                        _ => {}
                    }
                }
                None => {
                    mark[r] = 2;
                    path.pop();
                }
            }
        }
    }
    Ok(())
}

impl Grammar {
    /// Compiles a GBNF grammar, or a Lark one (one with no `::=`, as vLLM tells them apart;
    /// [`crate::lark`] writes it out as GBNF); the error names the line and column, and what
    /// is wrong.
    pub fn parse(text: &str) -> Result<Grammar, String> {
        if crate::lark::is_lark(text) {
            let gbnf = crate::lark::to_gbnf(text)?;
            return Grammar::parse_gbnf(&gbnf).map_err(crate::lark::without_column);
        }
        Grammar::parse_gbnf(text)
    }

    fn parse_gbnf(text: &str) -> Result<Grammar, String> {
        Parser {
            src: text,
            pos: 0,
            ids: HashMap::new(),
            names: Vec::new(),
            bodies: Vec::new(),
            owner: Vec::new(),
            used_at: Vec::new(),
            size: 0,
            nesting: 0,
        }
        .parse()
    }

    /// The state before any text: `root`'s alternatives expanded. False where too ambiguous.
    fn start_into(&self, out: &mut GrammarState) -> bool {
        out.clear();
        let mut work = Vec::new();
        for &a in &self.rules[self.root as usize] {
            if self.elems[a as usize] != Elem::End {
                work.push(a);
            }
            self.expand(&mut work, out);
            work.clear();
        }
        !out.overflow
    }

    /// Adds to `out` every stack that `work` leads to with a character element (or nothing)
    /// on top: rules on top are replaced by their alternatives. `work` is as it was after.
    fn expand(&self, work: &mut Vec<u32>, out: &mut GrammarState) {
        self.expand_within(work, out, MAX_EXPANSION);
    }

    /// [`Grammar::expand`] through at most `depth` rules at once (past it, `out` overflows:
    /// a chain of rules that deep would take the thread's stack).
    fn expand_within(&self, work: &mut Vec<u32>, out: &mut GrammarState, depth: u32) {
        if depth == 0 {
            out.overflow = true;
            return;
        }
        let Some(&p) = work.last() else {
            out.add(work);
            return;
        };
        let Elem::Rule(r) = self.elems[p as usize] else {
            out.add(work);
            return;
        };
        work.pop();
        let after = p + 1;
        let goes_on = self.elems[after as usize] != Elem::End;
        if goes_on {
            work.push(after);
        }
        for &a in &self.rules[r as usize] {
            if self.elems[a as usize] == Elem::End {
                self.expand_within(work, out, depth - 1);
            } else {
                work.push(a);
                self.expand_within(work, out, depth - 1);
                work.pop();
            }
        }
        if goes_on {
            work.pop();
        }
        work.push(p);
    }
}

/// Where an answer stands in a grammar: the ways it can go on, and the bytes of a character
/// begun.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct GrammarState {
    /// The stacks, one after another; each holds positions in [`Grammar::elems`], the
    /// innermost last, the last at a character element. An empty one: `root` is complete.
    data: Vec<u32>,
    /// Where each stack ends in `data`.
    ends: Vec<u32>,
    /// More than [`MAX_STACKS`] were added: nothing can follow.
    overflow: bool,
    partial: [u8; 4],
    partial_len: u8,
}

/// The bytes a UTF-8 character starting with `b` takes (0: `b` cannot start one).
fn utf8_len(b: u8) -> usize {
    match b {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl GrammarState {
    pub fn new(g: &Grammar) -> GrammarState {
        let mut s = GrammarState::default();
        g.start_into(&mut s);
        s
    }

    fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
        self.overflow = false;
        self.partial_len = 0;
    }

    fn stacks(&self) -> impl Iterator<Item = &[u32]> {
        let mut start = 0;
        self.ends.iter().map(move |&e| {
            let s = &self.data[start as usize..e as usize];
            start = e;
            s
        })
    }

    fn add(&mut self, stack: &[u32]) {
        if self.stacks().any(|s| s == stack) {
            return;
        }
        if self.ends.len() == MAX_STACKS {
            self.overflow = true;
            return;
        }
        self.data.extend_from_slice(stack);
        self.ends.push(self.data.len() as u32);
    }

    /// The text so far is one `root` derives, whole.
    pub fn matched(&self) -> bool {
        self.partial_len == 0 && self.stacks().any(<[u32]>::is_empty)
    }

    /// More text may follow.
    pub fn goes_on(&self) -> bool {
        self.partial_len > 0 || self.stacks().any(|s| !s.is_empty())
    }

    /// Writes into `out` the state after character `c`; false where nothing can take it.
    fn step_char(&self, g: &Grammar, c: u32, out: &mut GrammarState, work: &mut Vec<u32>) -> bool {
        out.clear();
        for s in self.stacks() {
            let Some((&p, below)) = s.split_last() else {
                continue;
            };
            if !g.elems[p as usize].takes_any_of(c, c) {
                continue;
            }
            work.clear();
            work.extend_from_slice(below);
            if g.elems[p as usize + 1] != Elem::End {
                work.push(p + 1);
            }
            g.expand(work, out);
        }
        !out.ends.is_empty() && !out.overflow
    }

    /// Writes into `out` the state after byte `b`; false where it cannot come next.
    fn step_byte(&self, g: &Grammar, b: u8, out: &mut GrammarState, work: &mut Vec<u32>) -> bool {
        let n = self.partial_len as usize;
        if n == 0 && b < 0x80 {
            return self.step_char(g, b as u32, out, work);
        }
        let mut buf = self.partial;
        buf[n] = b;
        let len = n + 1;
        let need = utf8_len(buf[0]);
        if need < 2 || (n > 0 && b & 0xc0 != 0x80) {
            return false;
        }
        if len == need {
            let Some(c) = std::str::from_utf8(&buf[..len])
                .ok()
                .and_then(|s| s.chars().next())
            else {
                return false;
            };
            return self.step_char(g, c as u32, out, work);
        }
        // A character begun: some stack must take one that starts so.
        let mut lo = (buf[0] & (0x7f >> need)) as u32;
        for &c in &buf[1..len] {
            lo = lo << 6 | (c & 0x3f) as u32;
        }
        let bits = 6 * (need - len) as u32;
        lo <<= bits;
        let hi = (lo | ((1 << bits) - 1)).min(0x10ffff);
        // The least character of its length (shorter forms are not UTF-8).
        let lo = lo.max([0, 0, 0x80, 0x800, 0x10000][need]);
        if lo > hi || (0xd800..=0xdfff).contains(&lo) && hi <= 0xdfff {
            return false;
        }
        let ok = self.stacks().any(|s| {
            s.last()
                .is_some_and(|&p| g.elems[p as usize].takes_any_of(lo, hi))
        });
        if ok {
            out.data.clear();
            out.data.extend_from_slice(&self.data);
            out.ends.clear();
            out.ends.extend_from_slice(&self.ends);
            out.overflow = false;
            out.partial = buf;
            out.partial_len = len as u8;
        }
        ok
    }

    /// Steps over `bytes` in place; false (the state then spent) where they cannot come next.
    pub fn push_bytes(&mut self, g: &Grammar, bytes: &[u8]) -> bool {
        let mut work = Vec::new();
        let mut next = GrammarState::default();
        for &b in bytes {
            if !self.step_byte(g, b, &mut next, &mut work) {
                return false;
            }
            std::mem::swap(self, &mut next);
        }
        true
    }
}

/// [`crate::json_mode::JsonMode::mask`] for a grammar at `state`: each token whose bytes the
/// grammar cannot take next is masked, and the end-of-text tokens unless the text so far is
/// whole. Returns whether any token is left.
pub fn mask_grammar(
    g: &Grammar,
    state: &GrammarState,
    vocab: &JsonVocab,
    logits: &mut [f32],
) -> bool {
    let mut allowed = vec![false; logits.len()];
    {
        let mut t = g.transitions.lock().unwrap_or_else(|e| e.into_inner());
        if t.states.len() > MAX_CACHED {
            *t = Transitions::default();
        }
        let start = t.intern(state);
        walk(g, &mut t, start, vocab.trie(), 0, &mut allowed);
    }
    if state.matched() {
        for &id in vocab.eos() {
            if let Some(a) = allowed.get_mut(id as usize) {
                *a = true;
            }
        }
    }
    let mut any = false;
    for (l, ok) in logits.iter_mut().zip(allowed) {
        if ok {
            any |= *l > f32::NEG_INFINITY;
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    any
}

/// Marks the tokens below `node` of the trie that state `from` takes: `node`'s bytes led to
/// `from`, and each byte after them is stepped over once for all the tokens that hold it
/// there.
fn walk(
    g: &Grammar,
    t: &mut Transitions,
    from: u32,
    trie: &ByteTrie,
    node: usize,
    allowed: &mut [bool],
) {
    let (start, end) = trie.nodes[node].children;
    for child in start as usize..end as usize {
        let n = &trie.nodes[child];
        let to = t.step(g, from, n.byte);
        if to == DEAD {
            continue;
        }
        for &id in &trie.tokens[n.tokens.0 as usize..n.tokens.1 as usize] {
            if let Some(a) = allowed.get_mut(id as usize) {
                *a = true;
            }
        }
        walk(g, t, to, trie, child, allowed);
    }
}

/// The vocabulary's tokens as a trie over their bytes, built once per model
/// ([`JsonVocab::trie`]): a grammar's mask steps over a prefix once for all the tokens that
/// share it.
#[derive(Debug, Default)]
pub struct ByteTrie {
    /// The root first; each node's children are neighbours.
    nodes: Vec<TrieNode>,
    /// The tokens that end at each node, node by node.
    tokens: Vec<u32>,
}

#[derive(Debug, Default, Clone, Copy)]
struct TrieNode {
    byte: u8,
    /// Where its children lie in `nodes`.
    children: (u32, u32),
    /// Where the tokens that end here lie in `tokens`.
    tokens: (u32, u32),
}

impl ByteTrie {
    /// The trie of the tokens that have any bytes.
    pub fn new(vocab: &JsonVocab) -> ByteTrie {
        let mut ids: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&id| !vocab.bytes(id).is_empty())
            .collect();
        ids.sort_unstable_by(|&a, &b| vocab.bytes(a).cmp(vocab.bytes(b)));
        let mut trie = ByteTrie {
            nodes: vec![TrieNode::default()],
            tokens: Vec::with_capacity(ids.len()),
        };
        trie.fill(0, &ids, 0, vocab);
        trie
    }

    /// Fills in `node`, reached by the first `depth` bytes of `ids` (in byte order).
    fn fill(&mut self, node: usize, ids: &[u32], depth: usize, vocab: &JsonVocab) {
        let ends = ids.partition_point(|&id| vocab.bytes(id).len() == depth);
        let t0 = self.tokens.len() as u32;
        self.tokens.extend_from_slice(&ids[..ends]);
        self.nodes[node].tokens = (t0, self.tokens.len() as u32);
        let mut groups = Vec::new();
        let mut i = ends;
        while i < ids.len() {
            let b = vocab.bytes(ids[i])[depth];
            let end = i + ids[i..].partition_point(|&id| vocab.bytes(id)[depth] == b);
            groups.push((b, i, end));
            i = end;
        }
        let c0 = self.nodes.len();
        self.nodes.extend(groups.iter().map(|&(byte, ..)| TrieNode {
            byte,
            ..TrieNode::default()
        }));
        self.nodes[node].children = (c0 as u32, self.nodes.len() as u32);
        for (k, &(_, i, end)) in groups.iter().enumerate() {
            self.fill(c0 + k, &ids[i..end], depth + 1, vocab);
        }
    }
}

/// A transition not yet found.
const UNKNOWN: u32 = u32::MAX;
/// A byte that cannot come next.
const DEAD: u32 = u32::MAX - 1;
/// States kept at most (1 KiB of transitions each); past it they are dropped at the next mask
/// and found again.
const MAX_CACHED: usize = 4096;

/// The states a grammar's answers have reached and the transitions found between them, shared
/// by the masks of its sequences: inside a word or a string most bytes lead back to the same
/// few states, so a walk over the vocabulary is mostly look-ups.
#[derive(Debug, Default)]
struct Transitions {
    ids: HashMap<GrammarState, u32>,
    states: Vec<GrammarState>,
    /// Per state and byte: the next state, [`UNKNOWN`] or [`DEAD`].
    next: Vec<[u32; 256]>,
    work: Vec<u32>,
}

impl Transitions {
    fn intern(&mut self, s: &GrammarState) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.states.len() as u32;
        self.ids.insert(s.clone(), id);
        self.states.push(s.clone());
        self.next.push([UNKNOWN; 256]);
        id
    }

    fn step(&mut self, g: &Grammar, from: u32, b: u8) -> u32 {
        let known = self.next[from as usize][b as usize];
        if known != UNKNOWN {
            return known;
        }
        let mut out = GrammarState::default();
        let to = match self.states[from as usize].step_byte(g, b, &mut out, &mut self.work) {
            true => self.intern(&out),
            false => DEAD,
        };
        self.next[from as usize][b as usize] = to;
        to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `g` takes `text`, and whether the text is then whole.
    fn run(g: &Grammar, text: &str) -> (bool, bool) {
        let mut s = GrammarState::new(g);
        let ok = s.push_bytes(g, text.as_bytes());
        (ok, ok && s.matched())
    }

    fn grammar(text: &str) -> Grammar {
        Grammar::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn terminals_classes_groups_and_repetitions_derive_what_they_say() {
        let g = grammar(
            r#"
            # a list of signed numbers
            root ::= item ("," " "? item)*   # at least one
            item ::= sign? [1-9] [0-9]{0,2} | "zero"
            sign ::= [-+]
            "#,
        );
        for ok in ["1", "-12, +305,7", "zero,zero", "999"] {
            assert_eq!(run(&g, ok), (true, true), "{ok}");
        }
        for prefix in ["-", "1, ", "ze"] {
            assert_eq!(run(&g, prefix), (true, false), "{prefix}");
        }
        for bad in ["0", "1000", "1,,2", "+-1", "zeros", " 1"] {
            assert!(!run(&g, bad).0, "{bad}");
        }
        // {m}, {m,}, +, negated classes, escapes and any character.
        let g =
            grammar("root ::= \"\\x41\"{2} [^\\n\\\\\"]+ \"\\u00e9\" .{1,} line\nline ::= \"\\n\"");
        assert_eq!(run(&g, "AAxyzé東\n"), (true, true));
        assert_eq!(run(&g, "AAxé?!\n"), (true, true));
        assert!(!run(&g, "Ax").0);
        assert!(!run(&g, "AA\"").0);
        assert_eq!(
            run(&g, "AAxé\n"),
            (true, false),
            "`.{{1,}}` took the newline"
        );
    }

    #[test]
    fn rules_may_span_lines_nest_and_recurse_on_the_right() {
        let g =
            grammar("root ::= value\nvalue ::= \"[\" ( value (\",\" value)* )? \"]\"\n   | [a-z]+");
        for ok in ["[]", "[a,[b,[]],cd]", "xyz"] {
            assert_eq!(run(&g, ok), (true, true), "{ok}");
        }
        assert_eq!(run(&g, "[a,[b"), (true, false));
        assert!(!run(&g, "[a]]").0);
        // A definition ends where the next begins, and may continue on lines with `|`.
        let g = grammar("root ::= a\n  | b\na ::= \"a\"\nb ::=\n  \"b\"");
        assert_eq!(run(&g, "b"), (true, true));
        // An empty rule and an empty string.
        let g = grammar("root ::= \"\" opt \"x\"\nopt ::= \"y\" | ");
        assert_eq!(run(&g, "x"), (true, true));
        assert_eq!(run(&g, "yx"), (true, true));
    }

    #[test]
    fn bad_grammars_are_refused_naming_where_and_what() {
        // root ::= r0, r0 ::= r1, …: each rule begins with the next.
        let chain: String = (0..600)
            .map(|i| format!("r{i} ::= r{}\n", i + 1))
            .chain(["root ::= r0\nr600 ::= \"x\"\n".to_string()])
            .collect();
        for (text, says) in [
            (
                "root ::= \"a",
                "line 1, column 10: a string without its closing `\"`",
            ),
            ("root ::= a", "rule `a` is used but not defined"),
            ("a ::= \"x\"", "no `root` rule"),
            (
                "root ::= \"a\"\nroot ::= \"b\"",
                "line 2, column 1: rule `root` is defined twice",
            ),
            (
                "root ::= root \"x\" | \"y\"",
                "rule `root` is left-recursive",
            ),
            (
                "root ::= a\na ::= b? a \"x\"\nb ::= \"b\"",
                "rule `a` is left-recursive",
            ),
            (
                "root ::= (\"x\" | root)* \"y\"",
                "rule `root` is left-recursive",
            ),
            ("root ::= [z-a]", "below its start"),
            ("root ::= []", "matches no character"),
            ("root ::= \"\\q\"", "unknown escape `\\q`"),
            ("root ::= \"\\ud800\"", "is not a character"),
            ("root ::= (\"a\"", "`(` without its `)`"),
            ("root ::= \"a\")", "`)` without its `(`"),
            ("root ::= \"a\"{3,1}", "the most is below the least"),
            ("root ::= \"a\"{x}", "expected `{m}`"),
            ("root ::= <[1000]>", "token references"),
            ("root ::= \"a\"{100000}", "more than 65536 elements"),
            (
                "root \"a\"\nx ::= \"b\"",
                "expected `::=` after rule name `root`",
            ),
            (
                &format!(
                    "root ::= {}\"a\"{}",
                    "(".repeat(100_000),
                    ")".repeat(100_000)
                ),
                "nested more than 64 deep",
            ),
            (&chain, "a chain of more than 512 rules"),
            (
                "?root ::= \"a\"",
                "line 1, column 1: expected a rule's name",
            ),
        ] {
            let e = Grammar::parse(text).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn an_answer_with_too_many_ways_to_go_on_is_stopped_not_followed() {
        // After n `a`s, each of the 2^n sequences of `b`/`c` may close them, under each of
        // x's three beginnings: 3 * 2^n ways.
        let g = grammar("root ::= x\nx ::= \"a\" x \"b\" | \"a\" x \"c\" | \"d\"");
        let mut s = GrammarState::new(&g);
        assert!(s.push_bytes(&g, b"aaaaaaaa"), "768 ways");
        assert!(
            !s.clone().push_bytes(&g, b"a"),
            "1536: more than MAX_STACKS"
        );
        assert!(s.push_bytes(&g, b"dbcbcbcbc"));
        assert!(s.matched());
    }

    #[test]
    fn characters_in_pieces_are_taken_where_one_starting_so_may_come() {
        let g = grammar("root ::= [一-龥]+ \"!\"");
        let mut s = GrammarState::new(&g);
        let kanji = "東".as_bytes();
        assert!(s.push_bytes(&g, &kanji[..1]));
        assert!(!s.matched() && s.goes_on());
        assert!(s.push_bytes(&g, &kanji[1..]));
        assert!(s.push_bytes(&g, "!".as_bytes()));
        assert!(s.matched() && !s.goes_on());
        // é's lead byte starts no CJK character; a stray continuation byte starts nothing;
        // nor do the lead bytes of 3 and 4 bytes start an ASCII character (they would be
        // overlong), nor a surrogate's.
        let g2 = grammar("root ::= [\\x00-\\x7f] | [\\ud7ff]");
        for lead in [[0xe0u8, 0x80], [0xf0, 0x80], [0xed, 0xa0]] {
            let mut s = GrammarState::new(&g2);
            assert!(
                !(s.push_bytes(&g2, &lead[..1]) && s.push_bytes(&g2, &lead[1..])),
                "{lead:x?}"
            );
        }
        assert!(GrammarState::new(&g2).push_bytes(&g2, &[0xed, 0x9f]));
        assert!(!GrammarState::new(&g).push_bytes(&g, &"é".as_bytes()[..1]));
        assert!(!GrammarState::new(&g).push_bytes(&g, &kanji[1..2]));
        // Negated classes: a lead byte is taken where some character after it is outside.
        let g = grammar("root ::= [^\\u0080-\\u07ff]");
        assert!(!GrammarState::new(&g).push_bytes(&g, &"é".as_bytes()[..1]));
        assert!(GrammarState::new(&g).push_bytes(&g, &kanji[..1]));
    }

    #[test]
    fn the_mask_allows_exactly_the_tokens_the_grammar_takes() {
        let texts: Vec<String> = [
            "yes", "no", "y", "es", "", " ", "yes!", "n", "\u{FFFD}", "o",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let raw = [(8u32, vec![0xe6u8])];
        let vocab = JsonVocab::new(texts)
            .with_eos(&[4])
            .with_bytes(|id| raw.iter().find(|r| r.0 == id).map(|r| r.1.clone()));
        let allowed = |g: &Grammar, s: &GrammarState| {
            let mut logits = vec![0.0f32; 10];
            mask_grammar(g, s, &vocab, &mut logits);
            (0..10).filter(|&i| logits[i] == 0.0).collect::<Vec<_>>()
        };
        let g = grammar("root ::= (\"yes\" | \"no\") \" \"?");
        let mut s = GrammarState::new(&g);
        assert_eq!(allowed(&g, &s), [0, 1, 2, 7]);
        assert!(s.push_bytes(&g, b"y"));
        assert_eq!(allowed(&g, &s), [3]);
        assert!(s.push_bytes(&g, b"es"));
        assert_eq!(allowed(&g, &s), [4, 5], "end of text, or the space");
        // Every token agrees with a trial of its own bytes, the byte token included.
        let g = grammar("root ::= [a-z東]* \"!\"?");
        let s = GrammarState::new(&g);
        let got = allowed(&g, &s);
        for id in 0..10u32 {
            let bytes = vocab.bytes(id);
            let alone = match bytes.is_empty() {
                true => id == 4 && s.matched(),
                false => s.clone().push_bytes(&g, bytes),
            };
            assert_eq!(got.contains(&(id as usize)), alone, "token {id}");
        }
    }
}
