//! Structured outputs (`response_format: {"type": "json_schema", "json_schema": {"schema":
//! …}}`): the answer is a JSON value that the schema accepts. The schema is compiled into
//! [`Schema`] nodes and followed by [`SchemaState`], a stack of frames that
//! [`crate::json_mode::JsonMode`] masks tokens with as it does for JSON mode.
//!
//! The subset kandle follows, and what it decides where JSON Schema leaves a choice:
//! - `type` (object, array, string, number, integer, boolean, null, or a list of them),
//!   `properties`, `items` (with `minItems`, `maxItems`), `prefixItems` (pydantic's tuples;
//!   then `items`, none where it is `false`), `enum`, `const`, `$ref` to `#/$defs/…` or `#/definitions/…`
//!   (recursive too: pydantic's self-referencing models, a reference back into a schema
//!   being compiled standing for it; one that can stand for itself before any value is
//!   written is refused), and `anyOf` / `oneOf` (pydantic's `Optional[X]`, `Union[A, B]`): the first
//!   character of the value picks an alternative; where several start alike, each is a
//!   reading of its own ([`SchemaState`]) until the text tells them apart. `oneOf`'s
//!   alternatives must start differently, unless pydantic's `discriminator` comes with them
//!   (each then holds its own constant in that property, which is written in each, required
//!   or not, as pydantic needs the tag to tell them apart): a value two of them accept would
//!   break "one of".
//! - `allOf` of one part is that part (pydantic's wrapper of a `$ref` with a description or
//!   default); of several, one object of all their properties in the parts' order, where
//!   each part is an object of properties alone (a schema extending another; two parts
//!   declaring one property, or one closing the object with `additionalProperties: false`,
//!   are refused).
//! - Without `properties`, `additionalProperties` as a schema makes a map (any keys, each
//!   value of that schema; pydantic's `dict[str, X]`), `false` the empty object.
//! - An object is written with the properties of `properties` in the order the schema
//!   declares them (as OpenAI's structured outputs write them), and no other: each
//!   `required` one, and each other one or not, as the model chooses (xgrammar's and
//!   llama.cpp's grammars leave optional properties out too; llama.cpp writes the required
//!   ones first). That satisfies `required` and `additionalProperties: false`. OpenAI's
//!   strict mode asks for every property in `required`, and then every one is written. An
//!   object or array without `properties` or `items` holds any JSON. At most 63 optional
//!   properties may stand in a row ([`MAX_OPTIONAL_RUN`]).
//! - Between tokens, whitespace is none, one space, or a newline and up to 20 spaces or tabs
//!   (llama.cpp's grammars from schemas; JSON mode allows any 32 in a row).
//! - Strings: `minLength` and `maxLength` (in characters, as JSON Schema counts them),
//!   `pattern` (matched anywhere in the string, as JSON Schema's ECMA regexes are, unless
//!   anchored with `^`/`$`; Rust regex syntax, so no look-around or back-references), and
//!   `format` `date-time`, `date`, `time`, `duration`, `uuid`, `email`, `hostname`, `ipv4`,
//!   `ipv6` or `uri` (OpenAI's list of formats, and pydantic's `HttpUrl`; each a regex of its
//!   RFC's form, as Python's and pydantic's parsers take it: dates with each month's days,
//!   times with an offset, no leap seconds; `email` the common `local@domain.tld`; see
//!   [`FORMATS`]). A pattern or format is a dense DFA
//!   over the string's characters ([`StrRule`]): a character that leaves no way to a match is
//!   masked, and the closing quote waits for a match. Inside such a string, escapes are
//!   JSON's, `\u` for characters outside the surrogates, except under a pattern or format,
//!   where a character is written as itself or with a one-letter escape (a `\u` begun could
//!   lead only where the pattern allows nothing), and a backslash only where an escape's
//!   character may follow.
//! - Numbers and integers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`
//!   (pydantic's `ge`, `le`, `gt`, `lt`) and `multipleOf` (`multiple_of`; a whole number
//!   for integers, a whole number of 10^-15 for numbers). A bounded number is written without an exponent,
//!   with at most 15 digits before and 15 after the point, in whole units of 10^-15 ([`NumAt`]
//!   follows exactly which values a prefix can still reach): a digit is masked as soon as no
//!   value in bounds (and a multiple) can follow it, and the number ends only on one. A
//!   bound between units is rounded inward.
//! - String and number keywords apply to values of their type only, as in JSON Schema:
//!   beside another type (`["string", "null"]`) they are read and need nothing; without a
//!   type they are refused.
//! - Annotations (`title`, `description`, `default`, `examples`, `$schema`, `$defs`,
//!   `definitions`, `strict`) are ignored. `required` and `dependentRequired` must name
//!   declared properties; a property `dependentRequired` says another needs is written
//!   always, which satisfies it whether or not that other is written. Any other
//!   keyword (`contains`, `not`, …) is refused with its name rather than ignored, since the answer
//!   could then break it.
//! - `minProperties` and `maxProperties` bound a map's entries (pydantic's `dict` with
//!   `min_length`/`max_length`; an object of any values then becomes a map of them, counted);
//!   beside `properties` they must allow all the declared ones, and a `minProperties` above
//!   the number required makes every declared one written.
//! - Without `properties`, `propertyNames` (a string's `pattern`, `format`, `minLength`,
//!   `maxLength`: pydantic's `dict[constr(pattern=…), X]`) or `patternProperties` of one
//!   pattern make a map whose keys follow that rule (a key's character that leaves no way
//!   to a match is masked), each value of the pattern's schema or `additionalProperties`.
//!   Only keys of the rule are written, which any of these schemas accepts; with
//!   `properties`, several patterns, or both keywords, they are refused.
//! - `uniqueItems` where the items are an enum or a const (pydantic's `set[Literal[…]]` and
//!   `set[SomeEnum]`): each value is written at most once, so an item's mask leaves out the
//!   values written, and `maxItems` is at most the number of values. Where the items are
//!   strings, numbers, integers, booleans or null (`set[str]`, `set[int]`), the array keeps
//!   the values written, and the character that would end an item equal to one of them (a
//!   string's closing quote, what follows a number) is masked, so the model must write
//!   another value; values are compared as JSON Schema compares them (`"\u0061"` is `"a"`,
//!   `1.0` is `1`). A string or number that cannot go on past a written value (its
//!   `maxLength` or bound reached) leaves the model no way on, and the request fails as a
//!   masked answer with no allowed token does. For items of other kinds (objects, arrays,
//!   unions) it is refused.

use std::collections::BTreeSet;

use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use serde_json::Value;

use crate::json_mode::JsonState;

/// Keywords read without constraining anything further.
const ANNOTATIONS: [&str; 11] = [
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$defs",
    "definitions",
    "strict",
    "required",
    "additionalProperties",
    "$id",
];

/// The keywords of strings ([`StrRule`]) and numbers ([`NumRule`]), which apply to values
/// of their type only.
const TYPED_KEYWORDS: [&str; 8] = [
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// Spaces or tabs after a newline between tokens, at most.
const GAP_INDENT: u8 = 20;

/// Enum alternatives at most (a bit each in [`Frame::Lit`]).
const MAX_ALTERNATIVES: usize = 64;
/// How deep `$ref`s and nesting may go while compiling.
const MAX_SCHEMA_DEPTH: usize = 32;

/// What a node's value may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Any JSON value; `Some(c)`: one starting with `c` (an object or array of anything).
    Any(Option<char>),
    String,
    Number,
    Integer,
    Boolean,
    Null,
}

/// A string's `minLength`, `maxLength` and `pattern` or `format`.
#[derive(Debug, Clone)]
struct StrRule {
    min: usize,
    max: Option<usize>,
    /// The pattern as a DFA over the whole string's UTF-8, and its start state.
    dfa: Option<(dense::DFA<Vec<u32>>, StateID)>,
}

/// A pattern's DFA may take this many bytes, its construction twice that: a pattern past it
/// (`.{1000}`, say) is refused.
const DFA_LIMIT: usize = 4 << 20;

/// A calendar date, years 0001 to 9999, each month's days, February's 29th in leap years
/// (RFC 3339's `full-date`, as Python's and pydantic's date parsers take it).
macro_rules! date_re {
    () => {
        r"((000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))|([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29)"
    };
}

/// A time of day with an offset (RFC 3339's `full-time`), without leap seconds and with at
/// most microseconds, which Python's and pydantic's parsers refuse.
macro_rules! time_re {
    () => {
        r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
    };
}

/// A dotted-quad IPv4 address, no leading zeros (RFC 2673's `dotted-quad`).
macro_rules! ipv4_re {
    () => {
        r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    };
}

/// RFC 3986's `h16`, 1 to 4 hex digits of an IPv6 address.
macro_rules! h16 {
    () => {
        "[0-9A-Fa-f]{1,4}"
    };
}

/// RFC 3986's `ls32`: an IPv6 address's last 32 bits, two `h16` or an IPv4 address.
macro_rules! ls32 {
    () => {
        concat!("(", h16!(), ":", h16!(), "|", ipv4_re!(), ")")
    };
}

/// An IPv6 address in RFC 3986's `IPv6address` forms (`::` for a run of zero groups, the
/// last 32 bits as an IPv4 address), without a zone.
#[rustfmt::skip]
macro_rules! ipv6_re {
    () => {
        concat!(
            "((", h16!(), ":){6}", ls32!(),
            "|::(", h16!(), ":){5}", ls32!(),
            "|(", h16!(), ")?::(", h16!(), ":){4}", ls32!(),
            "|((", h16!(), ":){0,1}", h16!(), ")?::(", h16!(), ":){3}", ls32!(),
            "|((", h16!(), ":){0,2}", h16!(), ")?::(", h16!(), ":){2}", ls32!(),
            "|((", h16!(), ":){0,3}", h16!(), ")?::", h16!(), ":", ls32!(),
            "|((", h16!(), ":){0,4}", h16!(), ")?::", ls32!(),
            "|((", h16!(), ":){0,5}", h16!(), ")?::", h16!(),
            "|((", h16!(), ":){0,6}", h16!(), ")?::)"
        )
    };
}

/// RFC 3986's `pchar`: a path segment's character, unreserved, a sub-delimiter, `:`, `@` or
/// percent-encoded.
macro_rules! pchar {
    () => {
        r"([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
    };
}

/// An absolute URI by RFC 3986's grammar: a scheme (of at most 32 characters here), then
/// `//` and an authority (user information, a registered name, IPv4 or a bracketed IPv6
/// host, a port) and a path, or a path alone; a query and a fragment.
#[rustfmt::skip]
macro_rules! uri_re {
    () => {
        concat!(
            "[A-Za-z][A-Za-z0-9+.-]{0,31}:",
            "(//(([A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2})*@)?",
            r"(\[", ipv6_re!(), r"\]|([A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)",
            "(:[0-9]*)?(/", pchar!(), "*)*",
            "|/?(", pchar!(), "+(/", pchar!(), "*)*)?)",
            r"(\?(", pchar!(), r"|[/?])*)?",
            "(#(", pchar!(), r"|[/?])*)?"
        )
    };
}

/// A hostname by RFC 1123: dot-separated labels of letters, digits and inner hyphens, each
/// 1 to 63 long (the whole at most 253, [`FORMATS`]' length).
macro_rules! hostname_re {
    () => {
        r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    };
}

/// A duration by RFC 3339's appendix A (`P1Y2M3D`, `PT4H5M6S`, `P1W`; no unit skipped
/// between two, as ISO 8601 allows; as ISO 8601 and pydantic's `timedelta`, the seconds may
/// have a fraction), each number of at most 9 digits.
#[rustfmt::skip]
macro_rules! duration_re {
    () => {
        concat!(
            "P((", n9!(), "D|", n9!(), "M(", n9!(), "D)?|", n9!(), "Y(", n9!(), "M(", n9!(), "D)?)?)",
            "(T", duration_time!(), ")?|T", duration_time!(), "|", n9!(), "W)"
        )
    };
}

/// RFC 3339's `dur-time` after its `T`.
#[rustfmt::skip]
macro_rules! duration_time {
    () => {
        concat!(
            "(", n9!(), "H(", n9!(), "M(", n9!(), r"(\.", n9!(), ")?S)?)?",
            "|", n9!(), "M(", n9!(), r"(\.", n9!(), ")?S)?",
            "|", n9!(), r"(\.", n9!(), ")?S)"
        )
    };
}

/// A duration's number: 1 to 9 digits (RFC 3339 sets no bound; Python's `timedelta` holds
/// fewer than a billion days, and a model that may write digits without end can loop).
macro_rules! n9 {
    () => {
        "[0-9]{1,9}"
    };
}

/// The regex of each `format` followed ([`StrRule`]), anchored, and the length in
/// characters it implies (beside `maxLength`).
const FORMATS: [(&str, &str, Option<usize>); 10] = [
    (
        "date-time",
        concat!("^", date_re!(), "[Tt]", time_re!(), "$"),
        None,
    ),
    ("date", concat!("^", date_re!(), "$"), None),
    ("time", concat!("^", time_re!(), "$"), None),
    ("duration", concat!("^", duration_re!(), "$"), None),
    (
        "uuid",
        r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        None,
    ),
    (
        "email",
        r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}$",
        None,
    ),
    ("hostname", concat!("^", hostname_re!(), "$"), Some(253)),
    ("ipv4", concat!("^", ipv4_re!(), "$"), None),
    ("ipv6", concat!("^", ipv6_re!(), "$"), None),
    ("uri", concat!("^", uri_re!(), "$"), None),
];

/// Each format's DFA, built when a schema first asks for it (the URI's takes ~10 ms), then
/// copied.
static FORMAT_DFAS: [std::sync::OnceLock<(dense::DFA<Vec<u32>>, StateID)>; FORMATS.len()] =
    [const { std::sync::OnceLock::new() }; FORMATS.len()];

/// A schema's least and greatest count (`minItems`/`maxItems`, `minLength`/`maxLength`).
fn counts(
    obj: &serde_json::Map<String, Value>,
    min_key: &str,
    max_key: &str,
) -> Result<(usize, Option<usize>), String> {
    let count = |k: &str| -> Result<Option<usize>, String> {
        obj.get(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("{k} must be a count, got {v}"))
            })
            .transpose()
    };
    let (min, max) = (count(min_key)?.unwrap_or(0), count(max_key)?);
    if max.is_some_and(|m| m < min) {
        return Err(format!("{max_key} {max:?} is below {min_key} {min}"));
    }
    Ok((min, max))
}

impl StrRule {
    /// The rule of a string schema's keywords (`None`: none of them).
    fn compile(obj: &serde_json::Map<String, Value>) -> Result<Option<StrRule>, String> {
        let (min, mut max) = counts(obj, "minLength", "maxLength")?;
        let dfa = match (obj.get("pattern"), obj.get("format")) {
            (Some(_), Some(_)) => {
                return Err("pattern and format together are not supported".into());
            }
            (Some(Value::String(p)), None) => Some(string_dfa(p)?),
            (Some(p), None) => return Err(format!("pattern must be a string, got {p}")),
            (None, Some(f)) => {
                let name = f.as_str().unwrap_or_default();
                let i = FORMATS
                    .iter()
                    .position(|(n, ..)| *n == name)
                    .ok_or_else(|| {
                        let names: Vec<&str> = FORMATS.iter().map(|(n, ..)| *n).collect();
                        format!("format {f} is not supported (only {})", names.join(", "))
                    })?;
                let (_, re, longest) = FORMATS[i];
                if let Some(longest) = longest {
                    max = Some(max.map_or(longest, |m| m.min(longest)));
                }
                if max.is_some_and(|m| m < min) {
                    return Err(format!("minLength {min} is above what format {f} allows"));
                }
                let dfa = FORMAT_DFAS[i]
                    .get_or_init(|| string_dfa(re).expect("a format's regex compiles"));
                Some(dfa.clone())
            }
            (None, None) => None,
        };
        if min == 0 && max.is_none() && dfa.is_none() {
            return Ok(None);
        }
        Ok(Some(StrRule { min, max, dfa }))
    }
}

/// The declared properties an answer always writes: those `required` names, and those
/// `dependentRequired` names as needed by another (written always, so that whichever
/// property needs them, they are there). A name that is not a declared property (or any,
/// without `properties`) is refused, since the answer would lack it.
fn required_are_declared<'o>(
    obj: &'o serde_json::Map<String, Value>,
    declared: Option<&serde_json::Map<String, Value>>,
) -> Result<BTreeSet<&'o str>, String> {
    let mut names: Vec<(&str, &Value)> = Vec::new();
    match obj.get("required") {
        None => {}
        Some(Value::Array(r)) => names.extend(r.iter().map(|n| ("required", n))),
        Some(r) => return Err(format!("required must be a list of names, got {r}")),
    }
    match obj.get("dependentRequired") {
        None => {}
        Some(Value::Object(deps)) => {
            for (name, needs) in deps {
                let needs = needs.as_array().ok_or_else(|| {
                    format!("dependentRequired {name} must be a list of names, got {needs}")
                })?;
                names.extend(needs.iter().map(|n| ("dependentRequired", n)));
            }
        }
        Some(d) => return Err(format!("dependentRequired must be an object, got {d}")),
    }
    let mut written = BTreeSet::new();
    for (keyword, name) in names {
        match name.as_str() {
            Some(n) if declared.is_some_and(|d| d.contains_key(n)) => written.insert(n),
            _ => {
                return Err(format!(
                    "{keyword} names {name}, which properties does not declare (kandle \
                     writes the declared properties only)"
                ));
            }
        };
    }
    Ok(written)
}

/// The schemas of `anyOf`/`oneOf` or `allOf` (`own`, said as `name`): a non-empty list, with
/// nothing but annotations beside it.
fn combined<'v>(
    obj: &serde_json::Map<String, Value>,
    own: &[&str],
    name: &str,
    list: &'v Value,
) -> Result<&'v [Value], String> {
    if let Some(k) = obj
        .keys()
        .find(|k| !own.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
    {
        return Err(format!(
            "the schema keyword {k} beside {name} is not supported"
        ));
    }
    list.as_array()
        .map(Vec::as_slice)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("{name} must be a non-empty list, got {list}"))
}

/// The schema a `$ref` names: an entry of the root's `$defs` (or `definitions`).
fn referenced<'v>(r: &Value, root: &'v Value) -> Result<&'v Value, String> {
    r.as_str()
        .and_then(|r| {
            r.strip_prefix("#/$defs/")
                .map(|n| root.get("$defs").and_then(|d| d.get(n)))
                .or_else(|| {
                    r.strip_prefix("#/definitions/")
                        .map(|n| root.get("definitions").and_then(|d| d.get(n)))
                })
        })
        .flatten()
        .ok_or_else(|| format!("$ref {r} does not name an entry of $defs"))
}

/// A DFA that matches the strings in which `pattern` matches somewhere (its `^` and `$`
/// anchor it to the string's ends), over their UTF-8.
fn string_dfa(pattern: &str) -> Result<(dense::DFA<Vec<u32>>, StateID), String> {
    pattern_dfa(&format!("(?s:.*)(?:{pattern})(?s:.*)"), pattern)
}

/// A text the whole of which matches a regex (vLLM's `guided_regex` and `guided_choice`),
/// as a minimised DFA over its UTF-8 ([`crate::json_mode::Constraint::Regex`]).
#[derive(Debug, Clone)]
pub struct TextPattern {
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
}

impl TextPattern {
    /// Texts that `pattern` matches whole.
    pub fn whole(pattern: &str) -> Result<TextPattern, String> {
        let (dfa, start) = pattern_dfa(&format!("^(?:{pattern})$"), pattern)?;
        Ok(TextPattern { dfa, start })
    }

    /// Texts that are one of `choices`.
    pub fn choice(choices: &[String]) -> Result<TextPattern, String> {
        if choices.is_empty() {
            return Err("no choices".into());
        }
        // Every character but letters, digits and spaces as a hex escape, which means itself
        // in any regex context.
        let literal = |s: &String| -> String {
            s.chars()
                .map(|c| match c.is_ascii_alphanumeric() || c == ' ' {
                    true => c.to_string(),
                    false => format!("\\x{{{:X}}}", c as u32),
                })
                .collect()
        };
        let alternation: Vec<String> = choices.iter().map(literal).collect();
        TextPattern::whole(&alternation.join("|"))
    }

    pub fn start(&self) -> StateID {
        self.start
    }

    /// The state after `text`'s bytes, or `None` where no match can follow them.
    pub fn step(&self, mut state: StateID, text: &[u8]) -> Option<StateID> {
        for &b in text {
            state = self.dfa.next_state(state, b);
            if self.dfa.is_dead_state(state) || self.dfa.is_quit_state(state) {
                return None;
            }
        }
        Some(state)
    }

    /// Whether the text that led to `state` matches whole.
    pub fn matches(&self, state: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(state))
    }

    /// Whether the byte `b` may follow `state`.
    pub fn byte_ok(&self, state: StateID, b: u8) -> bool {
        let s = self.dfa.next_state(state, b);
        !self.dfa.is_dead_state(s) && !self.dfa.is_quit_state(s)
    }

    /// Whether some byte may follow `state`.
    pub fn goes_on(&self, state: StateID) -> bool {
        (0..=255u8).any(|b| self.byte_ok(state, b))
    }
}

/// The minimised DFA of `regex`, anchored at its start (`pattern`: as the request gave it,
/// for errors).
fn pattern_dfa(regex: &str, pattern: &str) -> Result<(dense::DFA<Vec<u32>>, StateID), String> {
    let dfa = dense::Builder::new()
        .configure(
            dense::Config::new()
                .match_kind(MatchKind::All)
                .start_kind(StartKind::Anchored)
                .unicode_word_boundary(true)
                // Minimal, every state that cannot reach a match is the dead state: the
                // mask then refuses a character as soon as no match can follow it.
                .minimize(true)
                .dfa_size_limit(Some(DFA_LIMIT))
                .determinize_size_limit(Some(2 * DFA_LIMIT)),
        )
        .build(regex)
        .map_err(|e| format!("pattern {pattern:?} is not supported: {e}"))?;
    let start = dfa
        .start_state(&start::Config::new().anchored(Anchored::Yes))
        .map_err(|e| format!("pattern {pattern:?} is not supported: {e}"))?;
    Ok((dfa, start))
}

/// Digits a bounded number's integer part and fraction may each have ([`NumRule`]).
const NUM_DIGITS: u32 = 15;
/// A bounded number's unit: its values are whole multiples of 10^-[`NUM_DIGITS`].
const NUM_SCALE: i128 = 10i128.pow(NUM_DIGITS);

/// A number's `minimum`, `maximum`, `exclusiveMinimum` and `exclusiveMaximum`, in whole
/// units (10^-15 for numbers, 1 for integers), inclusive, and its `multipleOf`, in units.
#[derive(Debug, Clone)]
struct NumRule {
    integer: bool,
    lo: Option<i128>,
    hi: Option<i128>,
    step: Option<i128>,
}

impl NumRule {
    /// The rule of a number schema's bounds (`None`: none given).
    fn compile(
        obj: &serde_json::Map<String, Value>,
        integer: bool,
    ) -> Result<Option<NumRule>, String> {
        let unit_digits = if integer { 0 } else { NUM_DIGITS };
        // In units, rounded inward (up for a lower bound); `exclusive`: the next unit in
        // where the bound is a whole unit. Past what 15 digits write, a bound is no bound
        // (beyond it on its own side) or leaves nothing.
        let bound = |k: &str, lower: bool, exclusive: bool| -> Result<Option<i128>, String> {
            let Some(v) = obj.get(k) else {
                return Ok(None);
            };
            if !v.is_number() {
                return Err(format!("{k} must be a number, got {v}"));
            }
            match units(&v.to_string(), unit_digits, lower) {
                Some((r, exact)) => Ok(Some(match (exclusive && exact, lower) {
                    (false, _) => r,
                    (true, true) => r + 1,
                    (true, false) => r - 1,
                })),
                None if v.as_f64().is_some_and(|x| (x < 0.0) == lower) => Ok(None),
                None => Err(format!(
                    "{k} {v} leaves no number of up to {NUM_DIGITS} digits"
                )),
            }
        };
        let tighter = |a: Option<i128>, b: Option<i128>, lower: bool| match (a, b) {
            (Some(a), Some(b)) => Some(if lower { a.max(b) } else { a.min(b) }),
            (a, b) => a.or(b),
        };
        let lo = tighter(
            bound("minimum", true, false)?,
            bound("exclusiveMinimum", true, true)?,
            true,
        );
        let hi = tighter(
            bound("maximum", false, false)?,
            bound("exclusiveMaximum", false, true)?,
            false,
        );
        // A multiple of a whole number of units: 0.01 for numbers, 5 for integers.
        let step = match obj.get("multipleOf") {
            None => None,
            Some(v) if v.as_f64().is_some_and(|x| x > 0.0) => {
                match units(&v.to_string(), unit_digits, true) {
                    Some((n, true)) if n > 0 => Some(n),
                    _ if integer => {
                        return Err(format!(
                            "multipleOf {v} of an integer must be a whole number"
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "multipleOf {v} must be a whole number of 10^-{NUM_DIGITS}"
                        ));
                    }
                }
            }
            Some(v) => return Err(format!("multipleOf must be a positive number, got {v}")),
        };
        let rule = NumRule {
            integer,
            lo,
            hi,
            step,
        };
        match (lo, hi, step) {
            (None, None, None) => Ok(None),
            _ if !rule.meets(lo.unwrap_or(i128::MIN / 4), hi.unwrap_or(i128::MAX / 4)) => {
                Err(format!(
                    "the bounds of {} leave no value",
                    Value::Object(obj.clone())
                ))
            }
            _ => Ok(Some(rule)),
        }
    }

    fn unit(&self) -> i128 {
        if self.integer { 1 } else { NUM_SCALE }
    }

    /// Whether some value in `from..=to` (units) is within the bounds and a multiple of the
    /// step.
    fn meets(&self, from: i128, to: i128) -> bool {
        let from = self.lo.map_or(from, |l| from.max(l));
        let to = self.hi.map_or(to, |h| to.min(h));
        if from > to {
            return false;
        }
        match self.step {
            None => true,
            Some(s) => {
                let below = from.div_euclid(s) * s;
                let first = if below < from { below + s } else { below };
                first <= to
            }
        }
    }
}

/// A JSON number's text in units of 10^-`unit_digits`, rounded up (`up`) or down, and
/// whether that was exact; `None` past 15 integer digits.
fn units(text: &str, unit_digits: u32, up: bool) -> Option<(i128, bool)> {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    // The value is digits × 10^shift units.
    let shift = exp - frac.len() as i32 + unit_digits as i32;
    let max_digits = (NUM_DIGITS + unit_digits) as i32;
    if digits.is_empty() {
        return Some((0, true));
    }
    if digits.len() as i32 + shift > max_digits {
        return None;
    }
    // Only the digits that reach a whole unit count; the rest say whether it was exact.
    let keep = (digits.len() as i32 + shift).max(0) as usize;
    let (whole, dropped) = digits.split_at(keep.min(digits.len()));
    let mut n: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    for _ in 0..shift.max(0) {
        n *= 10;
    }
    let exact = dropped.bytes().all(|b| b == b'0');
    // Rounding away from the magnitude's floor: up for a positive value rounded up, or a
    // negative one rounded down.
    if !exact && (up != neg) {
        n += 1;
    }
    Some((if neg { -n } else { n }, exact))
}

/// A bounded number so far: its sign, integer part and fraction (value, digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NumAt {
    neg: bool,
    int: i128,
    int_digits: u32,
    /// `None`: no point yet.
    frac: Option<(i128, u32)>,
}

impl NumAt {
    /// Whether some number that starts as this one is within the bounds.
    fn can_meet(&self, rule: &NumRule) -> bool {
        let u = rule.unit();
        let fits = |a: i128, b: i128| match self.neg {
            false => rule.meets(a, b),
            true => rule.meets(-b, -a),
        };
        if self.int_digits == 0 {
            return fits(0, i128::MAX / 4); // a sign alone
        }
        if let Some((f, m)) = self.frac {
            let step = 10i128.pow(NUM_DIGITS - m);
            let v = self.int * u + f * step;
            return fits(v, v + step - 1);
        }
        if self.int == 0 {
            return fits(0, u - 1); // a leading zero: no more integer digits
        }
        // With k more integer digits, the integer part is in [int·10^k, (int+1)·10^k).
        let mut p = 1i128;
        for _ in self.int_digits..=NUM_DIGITS {
            if fits(self.int * p * u, (self.int + 1) * p * u - 1) {
                return true;
            }
            p *= 10;
        }
        false
    }

    /// The value written, if the number may end here.
    fn value(&self, rule: &NumRule) -> Option<i128> {
        if self.int_digits == 0 || self.frac.is_some_and(|(_, m)| m == 0) {
            return None;
        }
        let (f, m) = self.frac.unwrap_or((0, NUM_DIGITS));
        let v = self.int * rule.unit() + f * 10i128.pow(NUM_DIGITS - m);
        Some(if self.neg { -v } else { v })
    }

    /// The number after `c`, if it goes on with it.
    fn push(mut self, rule: &NumRule, c: char) -> Option<NumAt> {
        let d = c.to_digit(10).map(i128::from);
        match (c, d) {
            ('-', _) if !self.neg && self.int_digits == 0 => self.neg = true,
            (_, Some(d)) if self.frac.is_none() => {
                if (self.int_digits > 0 && self.int == 0) || self.int_digits == NUM_DIGITS {
                    return None;
                }
                self.int = self.int * 10 + d;
                self.int_digits += 1;
            }
            (_, Some(d)) => {
                let (f, m) = self.frac.expect("in the fraction");
                if m == NUM_DIGITS {
                    return None;
                }
                self.frac = Some((f * 10 + d, m + 1));
            }
            ('.', _) if !rule.integer && self.int_digits > 0 && self.frac.is_none() => {
                self.frac = Some((0, 0));
            }
            _ => return None,
        }
        self.can_meet(rule).then_some(self)
    }
}

/// JSON's one-letter escapes and the characters they stand for.
const ESCAPED: [(char, char); 8] = [
    ('"', '"'),
    ('\\', '\\'),
    ('/', '/'),
    ('b', '\u{8}'),
    ('f', '\u{c}'),
    ('n', '\n'),
    ('r', '\r'),
    ('t', '\t'),
];

/// The state after `ch`'s UTF-8, or `None` where no match can follow it.
fn dfa_step(dfa: &dense::DFA<Vec<u32>>, mut state: StateID, ch: char) -> Option<StateID> {
    for b in ch.encode_utf8(&mut [0; 4]).bytes() {
        state = dfa.next_state(state, b);
    }
    (!dfa.is_dead_state(state) && !dfa.is_quit_state(state)).then_some(state)
}

#[derive(Debug, Clone)]
enum Node {
    Value(Kind),
    /// A string with a length, pattern or format.
    Str(Box<StrRule>),
    /// A number or integer with bounds.
    Num(NumRule),
    /// The declared properties, in the schema's order.
    Object(Vec<Field>),
    /// Items of one node, `min` to `max` of them; `unique`: an enum's values, each at most
    /// once (`uniqueItems`).
    /// An array: item `i` of `prefix` (`prefixItems`, pydantic's tuples), then `items`.
    Array {
        items: usize,
        prefix: Vec<usize>,
        min: usize,
        max: Option<usize>,
        unique: bool,
    },
    /// The JSON texts of the allowed values.
    Enum(Vec<Vec<char>>),
    /// A recursive `$ref`: the node it stands for.
    Ref(usize),
    /// A call of one of several tools: `{"name": <one of the names>, "arguments": <that
    /// tool's parameters>}`; the enum node of the names (in its order) and each one's node.
    Call {
        names: usize,
        params: Vec<usize>,
        /// The arguments' key, as JSON text (quotes included).
        args: Vec<char>,
    },
    /// One of these, told apart by their first character ([`Schema::union`]).
    Union(Vec<usize>),
    /// An object of any keys (or keys of the [`Node::Str`] `keys`: `patternProperties`,
    /// `propertyNames`), each value of node `values` (`additionalProperties` as a schema).
    /// `min` to `max` entries (`minProperties`, `maxProperties`).
    Map {
        values: usize,
        keys: Option<usize>,
        min: usize,
        max: Option<usize>,
    },
}

/// A declared property of an object ([`Node::Object`]).
#[derive(Debug, Clone)]
struct Field {
    /// The key as JSON text, quotes included.
    key: Vec<char>,
    node: usize,
    /// Written always (`required`); else the answer may leave it out.
    required: bool,
}

/// The most optional properties in a row: the keys that may come next are a bit set
/// ([`ObjAt::Key`]), the next required property among them.
const MAX_OPTIONAL_RUN: usize = 63;

/// The properties whose key may come next, from property `i` on: each optional one up to
/// the first required one, which is the last (bit `k` stands for property `i + k`).
fn next_keys(fields: &[Field], i: usize) -> u64 {
    let run = fields[i.min(fields.len())..]
        .iter()
        .position(|f| f.required)
        .map_or(fields.len().saturating_sub(i), |r| r + 1);
    match run {
        64.. => u64::MAX,
        n => (1 << n) - 1,
    }
}

/// The positions of `bits`' set bits, lowest first.
fn set_bits(mut bits: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let k = (bits != 0).then(|| bits.trailing_zeros() as usize)?;
        bits &= bits - 1;
        Some(k)
    })
}

/// Whether an object may close after its properties before `i` (none after is required).
fn may_close(fields: &[Field], i: usize) -> bool {
    fields[i.min(fields.len())..].iter().all(|f| !f.required)
}

/// A compiled schema.
#[derive(Debug, Clone)]
pub struct Schema {
    nodes: Vec<Node>,
    /// The node of the whole value (children are compiled before a union that holds them).
    root: usize,
    /// How the value is written: as JSON, or in a syntax followed as the JSON it stands for.
    syntax: Syntax,
    /// While compiling: the `$ref`s being compiled, each with the node that stands for it
    /// and whether a reference back into it (recursion: pydantic's trees) took that node.
    open_refs: Vec<(String, usize, bool)>,
}

impl Schema {
    /// Compiles `schema`, or says which part of it kandle does not follow.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        let mut s = Schema {
            nodes: Vec::new(),
            root: 0,
            syntax: Syntax::Json,
            open_refs: Vec::new(),
        };
        s.root = s.node(schema, schema, 0)?;
        Ok(s)
    }

    /// Adds the node of `v` (and its children), returning its index; the root is 0.
    fn node(&mut self, v: &Value, root: &Value, depth: usize) -> Result<usize, String> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!(
                "the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
            ));
        }
        let obj = match v {
            Value::Object(o) => o,
            Value::Bool(true) => return Ok(self.push(Node::Value(Kind::Any(None)))),
            _ => return Err(format!("a schema must be an object, got {v}")),
        };
        if let Some(r) = obj.get("$ref") {
            return self.reference(r, root, depth);
        }
        if let Some(parts) = obj.get("allOf") {
            return self.all_of(obj, parts, root, depth);
        }
        if let Some(alts) = obj.get("anyOf").or_else(|| obj.get("oneOf")) {
            // Alternatives are read side by side until the text tells them apart. `oneOf`
            // asks that one alone accept the value: its alternatives must start differently
            // (pydantic's `Optional[X]`), or come with pydantic's `discriminator`, whose
            // property holds each alternative's own constant.
            let alts = combined(
                obj,
                &["anyOf", "oneOf", "discriminator"],
                "anyOf/oneOf",
                alts,
            )?;
            let nodes = alts
                .iter()
                .map(|a| self.node(a, root, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            match obj.get("discriminator") {
                Some(d) => self.discriminated(d, &nodes)?,
                None if !obj.contains_key("anyOf") => self.disjoint(&nodes)?,
                None => {}
            }
            return self.union(nodes);
        }
        for key in obj.keys() {
            let known = matches!(
                key.as_str(),
                "type"
                    | "properties"
                    | "items"
                    | "prefixItems"
                    | "enum"
                    | "const"
                    | "minItems"
                    | "maxItems"
                    | "uniqueItems"
                    | "patternProperties"
                    | "propertyNames"
                    | "minProperties"
                    | "maxProperties"
                    | "dependentRequired"
                    | "minLength"
                    | "maxLength"
                    | "pattern"
                    | "format"
                    | "minimum"
                    | "maximum"
                    | "exclusiveMinimum"
                    | "exclusiveMaximum"
                    | "multipleOf"
            ) || ANNOTATIONS.contains(&key.as_str());
            if !known {
                return Err(format!("the schema keyword {key} is not supported"));
            }
        }
        let literals = match (obj.get("enum"), obj.get("const")) {
            (Some(Value::Array(vs)), _) => Some(vs.clone()),
            (Some(e), _) => return Err(format!("enum must be a list, got {e}")),
            (None, Some(c)) => Some(vec![c.clone()]),
            (None, None) => None,
        };
        if let Some(vs) = literals {
            if vs.is_empty() || vs.len() > MAX_ALTERNATIVES {
                return Err(format!(
                    "enum must hold 1 to {MAX_ALTERNATIVES} values, got {}",
                    vs.len()
                ));
            }
            let texts: BTreeSet<String> = vs.iter().map(Value::to_string).collect();
            return Ok(self.push(Node::Enum(
                texts.into_iter().map(|t| t.chars().collect()).collect(),
            )));
        }
        let kind = match obj.get("type") {
            None => None,
            Some(Value::String(t)) => Some(t.as_str()),
            Some(Value::Array(ts)) if !ts.is_empty() => {
                // A list of types: each as a schema of its own, the first character choosing.
                let mut nodes = Vec::with_capacity(ts.len());
                for t in ts {
                    let mut one = obj.clone();
                    one.insert("type".into(), t.clone());
                    nodes.push(self.node(&Value::Object(one), root, depth + 1)?);
                }
                return self.union(nodes);
            }
            Some(t) => {
                return Err(format!(
                    "type must be a type name or a list of them, got {t}"
                ));
            }
        };
        Ok(match kind {
            None if obj.contains_key("properties")
                || obj.contains_key("patternProperties")
                || obj.contains_key("propertyNames")
                || obj.contains_key("minProperties")
                || obj.contains_key("maxProperties")
                || obj
                    .get("additionalProperties")
                    .is_some_and(Value::is_object) =>
            {
                self.object(obj, root, depth)?
            }
            None if obj.contains_key("items") || obj.contains_key("prefixItems") => {
                self.array(obj, root, depth)?
            }
            None if TYPED_KEYWORDS.iter().any(|k| obj.contains_key(*k)) => {
                return Err(format!(
                    "{} without a type: give the type it bounds",
                    TYPED_KEYWORDS
                        .iter()
                        .find(|k| obj.contains_key(**k))
                        .unwrap()
                ));
            }
            None => self.push(Node::Value(Kind::Any(None))),
            Some("object") => self.object(obj, root, depth)?,
            Some("array") => self.array(obj, root, depth)?,
            Some("string") => match StrRule::compile(obj)? {
                Some(rule) => self.push(Node::Str(Box::new(rule))),
                None => self.push(Node::Value(Kind::String)),
            },
            Some(t @ ("number" | "integer")) => match NumRule::compile(obj, t == "integer")? {
                Some(rule) => self.push(Node::Num(rule)),
                None if t == "integer" => self.push(Node::Value(Kind::Integer)),
                None => self.push(Node::Value(Kind::Number)),
            },
            Some("boolean") => self.push(Node::Value(Kind::Boolean)),
            Some("null") => self.push(Node::Value(Kind::Null)),
            Some(t) => return Err(format!("unknown type {t:?}")),
        })
    }

    fn object(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        root: &Value,
        depth: usize,
    ) -> Result<usize, String> {
        let pattern = match obj.get("patternProperties") {
            None => None,
            Some(Value::Object(m)) if m.is_empty() => None,
            Some(Value::Object(m)) if m.len() == 1 => m.iter().next(),
            Some(_) => {
                return Err(
                    "patternProperties is followed with one pattern (an object of one key)".into(),
                );
            }
        };
        let names = obj.get("propertyNames");
        let (min, max) = counts(obj, "minProperties", "maxProperties")?;
        let counted = min > 0 || max.is_some();
        let declared = obj.get("properties").and_then(Value::as_object);
        let mut required = required_are_declared(obj, declared)?;
        let Some(props) = obj.get("properties") else {
            // A map: keys of the one pattern (`patternProperties`) or of `propertyNames`, each
            // value of the pattern's schema or of `additionalProperties`.
            let keys = match (pattern, names) {
                (Some(_), Some(_)) => {
                    return Err(
                        "patternProperties and propertyNames together are not supported".into(),
                    );
                }
                (Some((p, _)), None) => {
                    let rule =
                        serde_json::Map::from_iter([("pattern".to_owned(), p.clone().into())]);
                    Some(StrRule::compile(&rule)?)
                }
                (None, Some(n)) => Some(Self::key_rule(n)?),
                (None, None) => None,
            }
            .flatten()
            .map(|rule| self.push(Node::Str(Box::new(rule))));
            let values = match (pattern, obj.get("additionalProperties")) {
                (Some((_, v)), _) => Some(v),
                (None, Some(v @ Value::Object(_))) => Some(v),
                (None, Some(Value::Bool(false))) if min > 0 => {
                    return Err(format!(
                        "minProperties {min} where additionalProperties false allows none"
                    ));
                }
                (None, Some(Value::Bool(false))) => {
                    return Ok(self.push(Node::Object(Vec::new())));
                }
                (None, _) if keys.is_some() || counted => Some(&Value::Bool(true)),
                (None, _) => None,
            };
            let Some(values) = values else {
                return Ok(self.push(Node::Value(Kind::Any(Some('{')))));
            };
            let at = self.push(Node::Map {
                values: 0,
                keys,
                min,
                max,
            });
            let values = self.node(values, root, depth + 1)?;
            self.nodes[at] = Node::Map {
                values,
                keys,
                min,
                max,
            };
            return Ok(at);
        };
        if pattern.is_some() || names.is_some() {
            return Err(
                "patternProperties and propertyNames are followed without properties only".into(),
            );
        }
        let props = props
            .as_object()
            .ok_or_else(|| format!("properties must be an object, got {props}"))?;
        // kandle writes the required properties, the optional ones or not, and no other; with
        // more than the required ones as minProperties, every one.
        let n = props.len();
        if min > n || max.is_some_and(|m| m < n) {
            return Err(format!(
                "minProperties/maxProperties must allow the {n} declared properties, which \
                 kandle may all write (and no others)"
            ));
        }
        if min > required.len() {
            required = props.keys().map(String::as_str).collect();
        }
        let mut run = 0;
        for k in props.keys() {
            run = if required.contains(k.as_str()) {
                0
            } else {
                run + 1
            };
            if run > MAX_OPTIONAL_RUN {
                return Err(format!(
                    "more than {MAX_OPTIONAL_RUN} optional properties in a row (not in \
                     required) are not supported"
                ));
            }
        }
        let at = self.push(Node::Object(Vec::new()));
        let mut fields = Vec::with_capacity(props.len());
        for (k, v) in props {
            fields.push(Field {
                key: Value::String(k.clone()).to_string().chars().collect(),
                node: self.node(v, root, depth + 1)?,
                required: required.contains(k.as_str()),
            });
        }
        self.nodes[at] = Node::Object(fields);
        Ok(at)
    }

    /// `allOf`: one part is that part (pydantic's `{"allOf": [{"$ref": …}], "description": …}`
    /// for a model field with a description or default); several are one object of all their
    /// properties, in the parts' order, where each part (after its `$ref`) is an object of
    /// properties and nothing else constrains it (a schema extending another).
    fn all_of(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        parts: &Value,
        root: &Value,
        depth: usize,
    ) -> Result<usize, String> {
        let parts = combined(obj, &["allOf"], "allOf", parts)?;
        if let [one] = parts {
            return self.node(one, root, depth + 1);
        }
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        for part in parts {
            let mut part = part;
            for _ in 0..MAX_SCHEMA_DEPTH {
                match part.get("$ref") {
                    Some(r) => part = referenced(r, root)?,
                    None => break,
                }
            }
            let fields = part
                .as_object()
                .ok_or_else(|| format!("an allOf part must be a schema object, got {part}"))?;
            for (k, v) in fields {
                match k.as_str() {
                    "properties" => {
                        let props = v
                            .as_object()
                            .ok_or_else(|| format!("properties must be an object, got {v}"))?;
                        for (name, schema) in props {
                            if properties.insert(name.clone(), schema.clone()).is_some() {
                                return Err(format!(
                                    "property {name} is declared by two allOf parts"
                                ));
                            }
                        }
                    }
                    "type" if v == "object" => {}
                    "required" => required.push(v.clone()),
                    // Each part would refuse the others' properties.
                    "additionalProperties" if v == &Value::Bool(false) => {
                        return Err(
                            "additionalProperties false in one of several allOf parts refuses \
                             the other parts' properties"
                                .into(),
                        );
                    }
                    k if ANNOTATIONS.contains(&k) => {}
                    k => {
                        return Err(format!(
                            "allOf of several parts is followed where each is an object of \
                             properties; {k}: {v} is not supported there"
                        ));
                    }
                }
            }
        }
        let required: Vec<Value> = (required.iter())
            .flat_map(|r| r.as_array().cloned().unwrap_or_else(|| vec![r.clone()]))
            .collect();
        let merged = serde_json::Map::from_iter([
            ("type".to_owned(), Value::from("object")),
            ("properties".to_owned(), Value::Object(properties)),
            ("required".to_owned(), Value::Array(required)),
        ]);
        self.object(&merged, root, depth)
    }

    /// The keys' rule of `propertyNames`: a string schema's length, pattern or format
    /// (`None`: any key).
    fn key_rule(names: &Value) -> Result<Option<StrRule>, String> {
        let obj = names
            .as_object()
            .ok_or_else(|| format!("propertyNames must be a schema object, got {names}"))?;
        for (k, v) in obj {
            let string_keyword =
                matches!(k.as_str(), "minLength" | "maxLength" | "pattern" | "format")
                    || (k == "type" && v == "string")
                    || ANNOTATIONS.contains(&k.as_str());
            if !string_keyword {
                return Err(format!(
                    "propertyNames is followed with a string's minLength, maxLength, pattern \
                     or format; {k} is not supported there"
                ));
            }
        }
        StrRule::compile(obj)
    }

    fn array(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        root: &Value,
        depth: usize,
    ) -> Result<usize, String> {
        let unique = match obj.get("uniqueItems") {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(v) => return Err(format!("uniqueItems must be a boolean, got {v}")),
        };
        const UNIQUE_ENUMS_ONLY: &str = "uniqueItems is followed for items that are an enum, \
            a const, or strings, numbers, integers, booleans or null, and not supported for \
            other items (objects, arrays, unions)";
        if let Some(prefix) = obj.get("prefixItems") {
            return self.tuple(obj, prefix, root, depth, unique);
        }
        match obj.get("items") {
            None if unique => Err(UNIQUE_ENUMS_ONLY.into()),
            None => Ok(self.push(Node::Value(Kind::Any(Some('['))))),
            Some(items) => {
                let (min, mut max) = counts(obj, "minItems", "maxItems")?;
                let at = self.push(Node::Array {
                    items: 0,
                    prefix: Vec::new(),
                    min,
                    max,
                    unique,
                });
                let child = self.node(items, root, depth + 1)?;
                if unique {
                    // How many distinct values the items have (`None`: unbounded).
                    let distinct = match &self.nodes[child] {
                        Node::Enum(values) => Some(values.len()),
                        Node::Value(Kind::Boolean) => Some(2),
                        Node::Value(Kind::Null) => Some(1),
                        Node::Str(_)
                        | Node::Num(_)
                        | Node::Value(Kind::String | Kind::Number | Kind::Integer) => None,
                        _ => return Err(UNIQUE_ENUMS_ONLY.into()),
                    };
                    if let Some(n) = distinct {
                        if min > n {
                            return Err(format!(
                                "minItems {min} with uniqueItems asks for more distinct items \
                                 than the {n} values the items allow"
                            ));
                        }
                        // Past every value once, no item can follow.
                        max = Some(max.map_or(n, |m| m.min(n)));
                    }
                }
                self.nodes[at] = Node::Array {
                    items: child,
                    prefix: Vec::new(),
                    min,
                    max,
                    unique,
                };
                Ok(at)
            }
        }
    }

    /// An array of `prefixItems` (pydantic's `tuple[int, str]`: `minItems` and `maxItems` its
    /// length), then items of `items` (`false`: none; absent: any JSON).
    fn tuple(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        prefix: &Value,
        root: &Value,
        depth: usize,
        unique: bool,
    ) -> Result<usize, String> {
        if unique {
            return Err("uniqueItems is not supported beside prefixItems".into());
        }
        let prefix = prefix
            .as_array()
            .ok_or_else(|| format!("prefixItems must be a list of schemas, got {prefix}"))?;
        let (min, mut max) = counts(obj, "minItems", "maxItems")?;
        let at = self.push(Node::Value(Kind::Null)); // the tuple's place, filled in below
        let nodes = (prefix.iter())
            .map(|p| self.node(p, root, depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let items = match obj.get("items") {
            Some(Value::Bool(false)) => {
                max = Some(max.map_or(nodes.len(), |m| m.min(nodes.len())));
                if min > nodes.len() {
                    return Err(format!(
                        "minItems {min} asks for more items than the {} of prefixItems, and \
                         items is false",
                        nodes.len()
                    ));
                }
                at // never reached: max stops at the prefix
            }
            Some(items) => self.node(items, root, depth + 1)?,
            None => self.push(Node::Value(Kind::Any(None))),
        };
        self.nodes[at] = Node::Array {
            items,
            prefix: nodes,
            min,
            max,
            unique: false,
        };
        Ok(at)
    }

    /// The schema of a call of one of `tools` (name, parameters schema; names distinct):
    /// `{"name": …, "arguments": …}` with the arguments of the tool named.
    pub fn tool_call(tools: &[(String, Value)]) -> Result<Schema, String> {
        Schema::tool_call_keyed(tools, "arguments")
    }

    /// [`Schema::tool_call`] with the arguments under `args_key` (Llama 3's `parameters`).
    pub fn tool_call_keyed(tools: &[(String, Value)], args_key: &str) -> Result<Schema, String> {
        let mut s = Schema {
            nodes: Vec::new(),
            root: 0,
            syntax: Syntax::Json,
            open_refs: Vec::new(),
        };
        let args: Vec<char> = Value::String(args_key.into()).to_string().chars().collect();
        let at = s.push(Node::Call {
            names: 0,
            params: Vec::new(),
            args: args.clone(),
        });
        let mut sorted: Vec<(String, &Value)> = tools
            .iter()
            .map(|(n, p)| (Value::String(n.clone()).to_string(), p))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        if sorted.is_empty() || sorted.len() > MAX_ALTERNATIVES {
            return Err(format!("1 to {MAX_ALTERNATIVES} tools"));
        }
        let names = s.push(Node::Enum(
            sorted.iter().map(|(n, _)| n.chars().collect()).collect(),
        ));
        let mut params = Vec::with_capacity(sorted.len());
        for (_, p) in &sorted {
            params.push(s.node(p, p, 0)?);
        }
        s.nodes[at] = Node::Call {
            names,
            params,
            args,
        };
        s.root = at;
        Ok(s)
    }

    /// What a model's own tool-call block may hold ([`crate::tool_calls`]): a call of one of
    /// `tools` ([`Schema::tool_call`]), or a list of one or more.
    pub fn tool_calls(tools: &[(String, Value)]) -> Result<Schema, String> {
        Schema::tool_calls_upto(tools, None)
    }

    /// [`Schema::tool_calls`] with at most `max` calls in the list.
    pub fn tool_calls_upto(
        tools: &[(String, Value)],
        max: Option<usize>,
    ) -> Result<Schema, String> {
        let mut s = Schema::tool_call_list(tools, max)?;
        let Node::Array { items: call, .. } = s.nodes[s.root] else {
            unreachable!("tool_call_list's root is its list")
        };
        s.root = s.union(vec![call, s.root])?;
        Ok(s)
    }

    /// A list of one to `max` calls of [`Schema::tool_call`] (Granite's and Phi-4-mini's
    /// format, which write no lone call).
    pub fn tool_call_list(tools: &[(String, Value)], max: Option<usize>) -> Result<Schema, String> {
        let mut s = Schema::tool_call(tools)?;
        s.root = s.push(Node::Array {
            items: s.root,
            prefix: Vec::new(),
            min: 1,
            max,
            unique: false,
        });
        Ok(s)
    }

    /// [`Schema::tool_call_list`] written as Python calls, `[name(key=value, …), …]`
    /// ([`crate::pythonic`]); each tool's `parameters` must be an object whose properties
    /// are Python identifiers, as keyword arguments are.
    pub fn pythonic_calls(tools: &[(String, Value)], max: Option<usize>) -> Result<Schema, String> {
        for (name, params) in tools {
            let props = params.get("properties").and_then(Value::as_object);
            if let Some(bad) =
                props.and_then(|p| p.keys().find(|k| !crate::pythonic::is_identifier(k)))
            {
                return Err(format!(
                    "tool {name:?}: parameter {bad:?} is not a Python identifier, so a pythonic \
                     call cannot name it"
                ));
            }
        }
        let mut s = Schema::tool_call_list(tools, max)?;
        s.syntax = Syntax::Python;
        Ok(s)
    }

    /// [`Schema::tool_call`] written in Qwen3-Coder's XML-like format ([`crate::xml_calls`]):
    /// `<function=name>`, then each argument as `<parameter=key>`, its value raw text where
    /// the parameter takes a string, JSON otherwise. Parameters' names must be writable
    /// between `=` and `>`.
    pub fn xml_call(tools: &[(String, Value)]) -> Result<Schema, String> {
        for (name, params) in tools {
            let props = params.get("properties").and_then(Value::as_object);
            if let Some(bad) = props.and_then(|p| {
                p.keys()
                    .find(|k| k.is_empty() || !k.chars().all(crate::xml_calls::name_char))
            }) {
                return Err(format!(
                    "tool {name:?}: parameter {bad:?} cannot be written as <parameter={bad}> \
                     (whitespace, quotes, backslashes, < and > are not allowed there)"
                ));
            }
        }
        let mut s = Schema::tool_call(tools)?;
        s.syntax = Syntax::Xml;
        Ok(s)
    }

    /// pydantic's `discriminator` of alternatives `alts`: its property, which holds each
    /// alternative's own constant, is written in each (required there or not), so that no
    /// value two of them accept is written. Each alternative must be an object declaring it.
    /// (A `$ref`'s node is shared: its other uses write the property too, which its schema
    /// allows.)
    fn discriminated(&mut self, d: &Value, alts: &[usize]) -> Result<(), String> {
        let name = (d.get("propertyName").and_then(Value::as_str))
            .ok_or_else(|| format!("discriminator must name its propertyName, got {d}"))?;
        let key: Vec<char> = Value::String(name.into()).to_string().chars().collect();
        for &alt in alts {
            let mut n = alt;
            while let Node::Ref(to) = self.nodes[n] {
                n = to;
            }
            let field = match &mut self.nodes[n] {
                Node::Object(fields) => fields.iter_mut().find(|f| f.key == key),
                _ => None,
            };
            field
                .ok_or_else(|| {
                    format!(
                        "discriminator {name:?}: each alternative must be an object declaring it"
                    )
                })?
                .required = true;
        }
        Ok(())
    }

    /// The node of `$ref` `r`: its schema compiled, or, inside that compilation, a node that
    /// stands for it (recursion), which is pointed at the compiled node once there is one.
    fn reference(&mut self, r: &Value, root: &Value, depth: usize) -> Result<usize, String> {
        let target = referenced(r, root)?;
        let name = r.as_str().unwrap_or_default();
        if let Some((_, at, used)) = self.open_refs.iter_mut().find(|(n, ..)| n == name) {
            *used = true;
            return Ok(*at);
        }
        let at = self.push(Node::Ref(usize::MAX));
        self.open_refs.push((name.to_owned(), at, false));
        let compiled = self.node(target, root, depth + 1);
        let (.., recursive) = self.open_refs.pop().expect("pushed above");
        let node = compiled?;
        self.nodes[at] = Node::Ref(node);
        // Only a schema that referred back to itself can stand for itself.
        if recursive && self.stands_for_itself(node, at) {
            return Err(format!(
                "$ref {r} can stand for itself before any value is written (a $ref to itself, \
                 or a union with itself as an alternative)"
            ));
        }
        Ok(node)
    }

    /// Whether node `n`, through references and union alternatives alone (no value written
    /// on the way), can reach `target`.
    fn stands_for_itself(&self, n: usize, target: usize) -> bool {
        let mut seen = vec![false; self.nodes.len()];
        let mut todo = vec![n];
        while let Some(n) = todo.pop() {
            if n == target {
                return true;
            }
            // (A reference still being compiled stands for nothing yet.)
            if n >= seen.len() || std::mem::replace(&mut seen[n], true) {
                continue;
            }
            match &self.nodes[n] {
                Node::Ref(t) => todo.push(*t),
                Node::Union(alts) => todo.extend(alts),
                _ => {}
            }
        }
        false
    }

    /// Refuses `oneOf` alternatives that can start alike: a value two of them accept would
    /// break it.
    fn disjoint(&self, alts: &[usize]) -> Result<(), String> {
        let mut seen = 0u128;
        for &a in alts {
            let first = self.first_chars(a);
            if first & seen != 0 {
                return Err(
                    "oneOf alternatives that can start with the same character (two objects, a \
                     number and an integer, ...) are not supported without a discriminator: a \
                     value two of them accept would break oneOf; use anyOf"
                        .into(),
                );
            }
            seen |= first;
        }
        Ok(())
    }

    /// A node of alternatives (those that start alike are read side by side:
    /// [`SchemaState`]'s readings).
    fn union(&mut self, alts: Vec<usize>) -> Result<usize, String> {
        Ok(match alts.len() {
            1 => alts[0],
            _ => self.push(Node::Union(alts)),
        })
    }

    /// The characters a value of node `n` may start with (ASCII, one bit each).
    fn first_chars(&self, n: usize) -> u128 {
        let bits = |cs: &str| cs.bytes().fold(0u128, |m, b| m | 1 << b);
        let number = bits("-0123456789");
        match &self.nodes[n] {
            Node::Value(Kind::Any(None)) => bits("{[\"tfn") | number,
            Node::Value(Kind::Any(Some(c))) => 1 << (*c as u8),
            Node::Value(Kind::String) | Node::Str(_) => bits("\""),
            Node::Value(Kind::Number | Kind::Integer) | Node::Num(_) => number,
            Node::Value(Kind::Boolean) => bits("tf"),
            Node::Value(Kind::Null) => bits("n"),
            Node::Object(_) | Node::Call { .. } | Node::Map { .. } => bits("{"),
            Node::Array { .. } => bits("["),
            Node::Enum(alts) => alts
                .iter()
                .filter_map(|a| a.first())
                .fold(0, |m, &c| m | if c.is_ascii() { 1 << (c as u8) } else { 0 }),
            Node::Union(alts) => alts.iter().fold(0, |m, &a| m | self.first_chars(a)),
            // A reference still being compiled (a `oneOf` alternative, say): any character.
            Node::Ref(usize::MAX) => u128::MAX,
            Node::Ref(n) => self.first_chars(*n),
        }
    }

    fn push(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }
}

/// Where an object frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjAt {
    /// Before `{`.
    Open,
    /// After `{`: a key from property `i` on ([`next_keys`]), or `}` where none is required.
    KeyOrEnd,
    /// Inside a key, `pos` characters in; bit `k` of `alive`: property `i + k`'s key still
    /// matches.
    Key { pos: usize, alive: u64 },
    /// After property `i`'s key.
    Colon,
    /// After a property's value (`i` the next property): `,` and a key, or `}` where no
    /// property from `i` on is required.
    After,
}

/// Where a map object's frame is ([`Node::Map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapAt {
    Open,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,`: a key.
    Key,
    /// Inside a key (its string frame above this one).
    InKey,
    Colon,
    /// Inside a value (its frame above this one).
    InValue,
    /// After a value: `,` or `}`.
    After,
}

/// Where a tool call's frame is ([`Node::Call`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallAt {
    Open,
    NameKey(usize),
    NameColon,
    Name,
    AfterName,
    ArgsKey(usize),
    ArgsColon,
    Args,
    Close,
}

const NAME_KEY: [char; 6] = ['"', 'n', 'a', 'm', 'e', '"'];

/// Where a string frame with a rule is ([`Node::Str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrAt {
    /// Before the opening quote.
    Open,
    Chars,
    /// After a backslash.
    Escape,
    /// In a `\u` escape: `n` hex digits read, making `code`.
    Hex {
        n: u8,
        code: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrAt {
    Open,
    /// After `[`: an item or `]`.
    FirstOrEnd,
    /// After `,`: an item.
    Item,
    /// After an item: `,` or `]`.
    After,
}

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Obj {
        node: usize,
        i: usize,
        at: ObjAt,
    },
    /// An array, `n` items begun; `used`: for unique items, the enum's values written;
    /// `written`: for unique items of other scalars, the values written.
    Arr {
        node: usize,
        n: usize,
        at: ArrAt,
        used: u64,
        written: Option<Box<Written>>,
    },
    /// An enum: `pos` characters in, `alive` the alternatives still matching.
    Lit {
        node: usize,
        pos: usize,
        alive: u64,
    },
    Val {
        kind: Kind,
        json: JsonState,
    },
    /// A string with a rule: `len` characters read, `dfa` its pattern's state.
    Str {
        node: usize,
        at: StrAt,
        len: usize,
        dfa: StateID,
    },
    /// A number with bounds.
    Num {
        node: usize,
        at: NumAt,
    },
    /// Alternatives, before the first character picks one.
    Union {
        node: usize,
    },
    /// A map object, `n` entries begun.
    Map {
        node: usize,
        at: MapAt,
        n: usize,
    },
    /// A tool call; `which`: the tool named, once its name is read.
    Call {
        node: usize,
        at: CallAt,
        which: usize,
    },
}

/// The values an array of unique scalar items has written, as JSON Schema compares them, and
/// the text of the item being written.
#[derive(Debug, Clone, Default, PartialEq)]
struct Written {
    values: std::sync::Arc<BTreeSet<String>>,
    item: String,
}

impl Written {
    /// The item ends (with `last`, where its frame took that character): `false` where its
    /// value was written before.
    fn item_ends(&mut self, last: Option<char>) -> bool {
        self.item.extend(last);
        let value = canonical(&std::mem::take(&mut self.item));
        if self.values.contains(&value) {
            return false;
        }
        std::sync::Arc::make_mut(&mut self.values).insert(value);
        true
    }
}

/// A scalar's JSON text as JSON Schema compares values: strings by their characters, numbers
/// by their value (`1.0` is `1`).
fn canonical(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Number(n)) if n.is_f64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            Some(f) => format!("{f:e}"),
            None => n.to_string(),
        },
        Ok(v) => v.to_string(),
        Err(_) => text.to_owned(),
    }
}

/// What a frame made of a character.
enum Step {
    Took,
    Refused,
    /// The frame's value ended; `took`: with this character (else it belongs to the parent).
    Done {
        took: bool,
    },
    /// The frame is the alternative this character starts, which takes it.
    Become(Frame),
    /// The frame is any of these alternatives, which this character starts alike: each is a
    /// reading of its own.
    Fork(Vec<Frame>),
    /// A child's value starts: after this character (`took`), or with it.
    Child {
        frame: Frame,
        took: bool,
    },
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The automaton of a [`Schema`] after the text so far: the readings of the text that the
/// schema still allows. There is one, but where alternatives of a union start alike (two
/// objects, an integer and a number): each is then a reading until the text tells them
/// apart, and the text is taken where any reading takes it.
#[derive(Debug, Clone)]
pub struct SchemaState {
    /// The first reading, and any others: a mask copies the state for every token it tries,
    /// and an empty list costs nothing to copy.
    reading: Reading,
    others: Vec<Reading>,
    /// The first bytes of a character not yet whole ([`SchemaState::push_bytes`]).
    pending: Vec<u8>,
    /// A pythonic or XML schema's characters, turned into the JSON its frames follow.
    written: Writing,
}

/// How a [`Schema`]'s value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Json,
    /// A Python list of calls ([`Schema::pythonic_calls`]).
    Python,
    /// A call in Qwen3-Coder's XML-like format ([`Schema::xml_call`]).
    Xml,
}

/// Where a [`SchemaState`] is in the syntax its value is written in.
#[derive(Debug, Clone, Copy)]
enum Writing {
    Json,
    Python(crate::pythonic::PyCalls),
    Xml(crate::xml_calls::XmlCalls),
}

/// An XML call's JSON, given to the automaton (and, reading an answer, kept).
struct Feed<'a> {
    st: &'a mut SchemaState,
    schema: &'a Schema,
    kept: Option<&'a mut String>,
}

impl crate::xml_calls::JsonSink for Feed<'_> {
    fn put(&mut self, c: char) -> bool {
        if let Some(kept) = &mut self.kept {
            kept.push(c);
        }
        self.st.push_json_char(self.schema, c)
    }

    fn takes(&self, c: char) -> bool {
        self.st.clone().push_json_char(self.schema, c)
    }
}

/// The JSON call (`{"name": …, "arguments": …}`) that `given` and then `text`, the start of
/// an answer's XML call after its `<tool_call>` (`given` empty) or after a bare `<function=`
/// (`given` the call's start up to it), stand for by [`Schema::xml_call`] `schema`, and the
/// bytes of `text` it takes; `None` where they do not start with a whole call the schema
/// accepts.
pub fn xml_call_json(schema: &Schema, given: &str, text: &str) -> Option<(String, usize)> {
    let mut st = SchemaState::new(schema);
    let mut json = String::new();
    if !given
        .chars()
        .all(|c| st.push_xml_char(schema, c, Some(&mut json)))
    {
        return None;
    }
    for (at, c) in text.char_indices() {
        if !st.push_xml_char(schema, c, Some(&mut json)) {
            return None;
        }
        if st.complete() {
            return Some((json, at + c.len_utf8()));
        }
    }
    None
}

/// Readings kept at once, at most; past it the later ones are dropped (what is written stays
/// a value the schema accepts, by the readings kept).
const MAX_READINGS: usize = 32;

/// One reading of the text so far: the frames of the values open in it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Reading {
    stack: Vec<Frame>,
    /// Whitespace characters of the gap so far, and whether it began with a newline.
    ws: u8,
    newline: bool,
    done: bool,
}

impl SchemaState {
    pub fn new(schema: &Schema) -> SchemaState {
        SchemaState {
            reading: Reading {
                stack: vec![Reading::frame(schema, schema.root)],
                ws: 0,
                newline: false,
                done: false,
            },
            others: Vec::new(),
            pending: Vec::new(),
            written: match schema.syntax {
                Syntax::Json => Writing::Json,
                Syntax::Python => Writing::Python(Default::default()),
                Syntax::Xml => Writing::Xml(Default::default()),
            },
        }
    }

    /// Part of a character written (a token of bytes ended inside it).
    pub fn in_partial_char(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes a token's bytes, which may begin or end inside a character (byte-level BPE):
    /// whole characters as [`SchemaState::push`] does, a character's first bytes only where
    /// some character that starts so may come next.
    pub fn push_bytes(&mut self, schema: &Schema, bytes: &[u8]) -> bool {
        let mut trial = self.clone();
        let mut buf = std::mem::take(&mut trial.pending);
        buf.extend_from_slice(bytes);
        let Some((text, tail)) = crate::json_mode::split_utf8(&buf) else {
            return false;
        };
        if !text.chars().all(|c| trial.push_char(schema, c))
            || !(tail.is_empty() || trial.takes_partial(schema, tail))
        {
            return false;
        }
        trial.pending = tail.to_vec();
        *self = trial;
        true
    }

    /// Whether a character whose UTF-8 starts with `lead` may come next.
    fn takes_partial(&self, schema: &Schema, lead: &[u8]) -> bool {
        self.readings().any(|r| r.takes_partial(schema, lead))
    }

    /// Whether the value is complete (by some reading).
    pub fn complete(&self) -> bool {
        let written = match self.written {
            Writing::Xml(xml) => xml.done(),
            _ => true,
        };
        written && self.readings().any(|r| r.done)
    }

    /// Inside a string's plain characters (of some reading).
    pub fn in_plain_string(&self) -> bool {
        self.readings().any(Reading::in_plain_string)
            && match self.written {
                Writing::Json => true,
                Writing::Python(py) => !py.in_single_quotes(),
                Writing::Xml(xml) => xml.passes_plain_text(),
            }
    }

    /// Takes `c`; `false` (the state then unusable: callers try on a copy) if refused.
    pub fn push_char(&mut self, schema: &Schema, c: char) -> bool {
        match &mut self.written {
            Writing::Json => self.push_json_char(schema, c),
            Writing::Python(py) => {
                let Some((before, c)) = py.translate(c) else {
                    return false;
                };
                before
                    .chars()
                    .chain(c)
                    .all(|c| self.push_json_char(schema, c))
            }
            Writing::Xml(_) => self.push_xml_char(schema, c, None),
        }
    }

    /// [`SchemaState::push_char`] of an XML call's character, the JSON it stands for also
    /// written to `kept`; `false` for a schema not written in XML.
    fn push_xml_char(&mut self, schema: &Schema, c: char, kept: Option<&mut String>) -> bool {
        let Writing::Xml(mut xml) = self.written else {
            return false;
        };
        let ok = xml.translate(
            c,
            &mut Feed {
                st: self,
                schema,
                kept,
            },
        );
        self.written = Writing::Xml(xml);
        ok
    }

    /// [`SchemaState::push_char`] of a JSON character: each reading that takes it goes on.
    fn push_json_char(&mut self, schema: &Schema, c: char) -> bool {
        // In place; a reading that forks puts its other readings, past `c`, in `forks`.
        let mut forks = Vec::new();
        let took = self.reading.take(schema, c, &mut forks);
        if forks.is_empty() && self.others.is_empty() {
            return took;
        }
        self.others.retain_mut(|r| r.take(schema, c, &mut forks));
        let mut all = Vec::with_capacity(1 + self.others.len() + forks.len());
        if took {
            all.push(std::mem::take(&mut self.reading));
        }
        for r in self.others.drain(..).chain(forks) {
            if all.len() < MAX_READINGS && !all.contains(&r) {
                all.push(r);
            }
        }
        let mut all = all.into_iter();
        let Some(first) = all.next() else {
            return false;
        };
        self.reading = first;
        self.others = all.collect();
        true
    }

    /// The readings of the text so far.
    fn readings(&self) -> impl Iterator<Item = &Reading> {
        std::iter::once(&self.reading).chain(&self.others)
    }
}

impl Reading {
    /// Whether a character whose UTF-8 starts with `lead` may come next.
    fn takes_partial(&self, schema: &Schema, lead: &[u8]) -> bool {
        let starts = |c: &char| c.encode_utf8(&mut [0; 4]).as_bytes().starts_with(lead);
        match self.stack.last() {
            Some(Frame::Val { json, .. }) => json.in_plain_string(),
            Some(Frame::Str {
                node,
                at: StrAt::Chars,
                len,
                dfa,
            }) => {
                let Node::Str(rule) = &schema.nodes[*node] else {
                    return false;
                };
                let room = rule.max.is_none_or(|m| *len < m);
                room && rule.dfa.as_ref().is_none_or(|(d, _)| {
                    let mut state = *dfa;
                    lead.iter().all(|&b| {
                        state = d.next_state(state, b);
                        !d.is_dead_state(state) && !d.is_quit_state(state)
                    })
                })
            }
            Some(Frame::Lit { node, pos, alive }) => {
                let Node::Enum(alts) = &schema.nodes[*node] else {
                    return false;
                };
                (alts.iter().enumerate())
                    .any(|(k, alt)| alive & (1 << k) != 0 && alt.get(*pos).is_some_and(starts))
            }
            Some(Frame::Obj {
                node,
                i,
                at: ObjAt::Key { pos, alive },
            }) => {
                let Node::Object(fields) = &schema.nodes[*node] else {
                    return false;
                };
                set_bits(*alive).any(|k| fields[*i + k].key.get(*pos).is_some_and(starts))
            }
            _ => false,
        }
    }

    fn frame(schema: &Schema, node: usize) -> Frame {
        match &schema.nodes[node] {
            Node::Value(kind) => Frame::Val {
                kind: *kind,
                json: JsonState::value(),
            },
            Node::Object(_) => Frame::Obj {
                node,
                i: 0,
                at: ObjAt::Open,
            },
            Node::Array { items, unique, .. } => Frame::Arr {
                node,
                n: 0,
                at: ArrAt::Open,
                used: 0,
                written: (*unique && !matches!(schema.nodes[*items], Node::Enum(_)))
                    .then(Default::default),
            },
            Node::Union(_) => Frame::Union { node },
            Node::Ref(n) => Self::frame(schema, *n),
            Node::Num(_) => Frame::Num {
                node,
                at: NumAt {
                    neg: false,
                    int: 0,
                    int_digits: 0,
                    frac: None,
                },
            },
            Node::Str(rule) => Frame::Str {
                node,
                at: StrAt::Open,
                len: 0,
                dfa: rule.dfa.as_ref().map_or(StateID::ZERO, |(_, s)| *s),
            },
            Node::Map { .. } => Frame::Map {
                node,
                at: MapAt::Open,
                n: 0,
            },
            Node::Call { .. } => Frame::Call {
                node,
                at: CallAt::Open,
                which: 0,
            },
            Node::Enum(alts) => Frame::Lit {
                node,
                pos: 0,
                alive: if alts.len() == 64 {
                    u64::MAX
                } else {
                    (1 << alts.len()) - 1
                },
            },
        }
    }

    /// Inside a string's plain characters.
    fn in_plain_string(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Val { json, .. }) if json.in_plain_string())
    }

    /// Takes JSON character `c`: this reading, gone on, into `out` where it takes it (and
    /// the readings it forks into).
    fn push(mut self, schema: &Schema, c: char, out: &mut Vec<Reading>) {
        if self.take(schema, c, out) {
            out.push(self);
        }
    }

    /// [`Reading::push`] of this reading itself: whether it takes `c` (the readings it forks
    /// into are pushed to `out` themselves).
    fn take(&mut self, schema: &Schema, c: char, out: &mut Vec<Reading>) -> bool {
        if is_ws(c) && self.between_tokens() {
            return self.gap(c);
        }
        self.ws = 0;
        loop {
            let Some(top) = self.stack.last_mut() else {
                return false; // done: only whitespace
            };
            match Self::step(schema, top, c) {
                Step::Took => {
                    self.note_item_char(c);
                    return true;
                }
                Step::Refused => return false,
                Step::Become(frame) => {
                    *self.stack.last_mut().expect("a frame") = frame;
                }
                Step::Fork(mut frames) => {
                    // This reading goes on as the first alternative, a copy as each other.
                    let first = frames.remove(0);
                    for frame in frames {
                        let mut other = self.clone();
                        *other.stack.last_mut().expect("a frame") = frame;
                        other.push(schema, c, out);
                    }
                    *self.stack.last_mut().expect("a frame") = first;
                }
                Step::Child { frame, took } => {
                    self.stack.push(frame);
                    if took {
                        return true;
                    }
                    // Else the child takes this character as its first.
                }
                Step::Done { took } => {
                    let ended = self.stack.pop();
                    match self.stack.last_mut() {
                        None => self.done = true,
                        Some(Frame::Obj { at, i, .. }) => {
                            *at = ObjAt::After;
                            *i += 1;
                        }
                        Some(Frame::Arr {
                            at,
                            node,
                            used,
                            written,
                            ..
                        }) => {
                            *at = ArrAt::After;
                            if let Some(k) = Self::unique_value(schema, *node, ended.as_ref()) {
                                *used |= 1 << k;
                            }
                            if let Some(w) = written
                                && !w.item_ends(took.then_some(c))
                            {
                                return false;
                            }
                        }
                        Some(Frame::Map { at, .. }) => {
                            *at = match *at {
                                MapAt::InKey => MapAt::Colon,
                                _ => MapAt::After,
                            }
                        }
                        Some(Frame::Call { at, which, .. }) => {
                            *at = match *at {
                                CallAt::Name => {
                                    if let Some(Frame::Lit { alive, .. }) = ended {
                                        *which = alive.trailing_zeros() as usize;
                                    }
                                    CallAt::AfterName
                                }
                                _ => CallAt::Close,
                            }
                        }
                        Some(_) => unreachable!("only containers have children"),
                    }
                    if took {
                        return true;
                    }
                    if is_ws(c) {
                        // Whitespace after a number, between tokens now.
                        return self.gap(c);
                    }
                    if self.done {
                        return false;
                    }
                }
            }
        }
    }

    /// `c`, taken by the frame on top: part of an item of an array that keeps its items'
    /// values ([`Written`]) where that array is just below.
    fn note_item_char(&mut self, c: char) {
        if let [
            ..,
            Frame::Arr {
                written: Some(w), ..
            },
            _,
        ] = self.stack.as_mut_slice()
        {
            w.item.push(c);
        }
    }

    /// The enum value an item `ended` as, in an array of unique items (`node`).
    fn unique_value(schema: &Schema, node: usize, ended: Option<&Frame>) -> Option<usize> {
        let (Node::Array { unique: true, .. }, Some(Frame::Lit { node, pos, alive })) =
            (&schema.nodes[node], ended)
        else {
            return None;
        };
        let Node::Enum(values) = &schema.nodes[*node] else {
            return None;
        };
        // The values are distinct: one alive value is whole where the item ended.
        (0..values.len()).find(|&k| alive & (1 << k) != 0 && values[k].len() == *pos)
    }

    /// Whitespace between tokens, as llama.cpp's grammars from JSON schemas allow it: none,
    /// one space, or a newline and at most [`GAP_INDENT`] spaces or tabs (a small model
    /// otherwise fills its answer with blank lines).
    fn gap(&mut self, c: char) -> bool {
        let ok = match (self.ws, c) {
            (0, ' ') => {
                self.newline = false;
                true
            }
            (0, '\n') => {
                self.newline = true;
                true
            }
            (n, ' ' | '\t') => self.newline && n <= GAP_INDENT,
            _ => false,
        };
        if ok {
            self.ws += 1;
        }
        ok
    }

    /// Whether whitespace here is between tokens (not inside a string, key or literal),
    /// taken by this state rather than a frame.
    fn between_tokens(&self) -> bool {
        match self.stack.last() {
            None => true,
            Some(Frame::Obj { at, .. }) => !matches!(at, ObjAt::Key { pos, .. } if *pos > 0),
            Some(Frame::Arr { .. } | Frame::Union { .. } | Frame::Map { .. }) => true,
            Some(Frame::Lit { pos, .. }) => *pos == 0,
            Some(Frame::Val { json, .. }) => json.at_value_start(),
            Some(Frame::Str { at, .. }) => *at == StrAt::Open,
            Some(Frame::Num { at, .. }) => !at.neg && at.int_digits == 0,
            Some(Frame::Call { at, .. }) => {
                !matches!(at, CallAt::NameKey(p) | CallAt::ArgsKey(p) if *p > 0)
            }
        }
    }

    fn step(schema: &Schema, top: &mut Frame, c: char) -> Step {
        match top {
            Frame::Obj { node, i, at } => {
                let Node::Object(fields) = &schema.nodes[*node] else {
                    unreachable!("an object frame's node is an object")
                };
                let from = *i;
                let key_at = |pos: usize, alive: u64| {
                    let mut still = 0;
                    let mut whole = None;
                    for k in set_bits(alive) {
                        let key = &fields[from + k].key;
                        if key.get(pos) == Some(&c) {
                            still |= 1 << k;
                            // A key's JSON text is no other's prefix: one ends here at most.
                            if key.len() == pos + 1 {
                                whole = Some(k);
                            }
                        }
                    }
                    (still != 0).then_some((still, whole))
                };
                match (*at, c) {
                    (ObjAt::Open, '{') => *at = ObjAt::KeyOrEnd,
                    (ObjAt::KeyOrEnd | ObjAt::After, '}') if may_close(fields, *i) => {
                        return Step::Done { took: true };
                    }
                    (ObjAt::After, ',') if *i < fields.len() => {
                        *at = ObjAt::Key {
                            pos: 0,
                            alive: next_keys(fields, *i),
                        };
                    }
                    (ObjAt::KeyOrEnd, _) => match key_at(0, next_keys(fields, *i)) {
                        Some((alive, _)) => *at = ObjAt::Key { pos: 1, alive },
                        None => return Step::Refused,
                    },
                    (ObjAt::Key { pos, alive }, _) => match key_at(pos, alive) {
                        Some((_, Some(k))) => {
                            *i += k;
                            *at = ObjAt::Colon;
                        }
                        Some((alive, None)) => {
                            *at = ObjAt::Key {
                                pos: pos + 1,
                                alive,
                            }
                        }
                        None => return Step::Refused,
                    },
                    (ObjAt::Colon, ':') => {
                        return Step::Child {
                            frame: Self::frame(schema, fields[*i].node),
                            took: true,
                        };
                    }
                    _ => return Step::Refused,
                }
                // A value's first character comes after the colon, as a child's.
                Step::Took
            }
            Frame::Map { node, at, n } => {
                let Node::Map {
                    values,
                    keys,
                    min,
                    max,
                } = &schema.nodes[*node]
                else {
                    unreachable!("a map frame's node is a map")
                };
                let room = max.is_none_or(|m| *n < m);
                match (*at, c) {
                    (MapAt::Open, '{') => *at = MapAt::KeyOrEnd,
                    (MapAt::KeyOrEnd | MapAt::After, '}') if *n >= *min => {
                        return Step::Done { took: true };
                    }
                    (MapAt::KeyOrEnd | MapAt::Key, '"') if room => {
                        *n += 1;
                        *at = MapAt::InKey;
                        return Step::Child {
                            frame: match keys {
                                Some(rule) => Self::frame(schema, *rule),
                                None => Frame::Val {
                                    kind: Kind::String,
                                    json: JsonState::value(),
                                },
                            },
                            took: false,
                        };
                    }
                    (MapAt::Colon, ':') => {
                        *at = MapAt::InValue;
                        return Step::Child {
                            frame: Self::frame(schema, *values),
                            took: true,
                        };
                    }
                    (MapAt::After, ',') if room => *at = MapAt::Key,
                    _ => return Step::Refused,
                }
                Step::Took
            }
            Frame::Union { node } => {
                let Node::Union(alts) = &schema.nodes[*node] else {
                    unreachable!("a union frame's node is a union")
                };
                let mut picked: Vec<Frame> = (alts.iter())
                    .filter(|&&a| c.is_ascii() && schema.first_chars(a) & (1 << (c as u8)) != 0)
                    .map(|&a| Self::frame(schema, a))
                    .collect();
                match picked.len() {
                    0 => Step::Refused,
                    1 => Step::Become(picked.remove(0)),
                    _ => Step::Fork(picked),
                }
            }
            Frame::Call { node, at, which } => {
                let Node::Call {
                    names,
                    params,
                    args,
                } = &schema.nodes[*node]
                else {
                    unreachable!("a call frame's node is a call")
                };
                // One character of a fixed key: the position after it, or `then` at its end.
                let key =
                    |p: usize, key: &[char], then: CallAt, more: fn(usize) -> CallAt| match key
                        .get(p)
                    {
                        Some(&k) if k == c => Some(match p + 1 == key.len() {
                            true => then,
                            false => more(p + 1),
                        }),
                        _ => None,
                    };
                let next = match (*at, c) {
                    (CallAt::Open, '{') => Some(CallAt::NameKey(0)),
                    (CallAt::NameKey(p), _) => {
                        key(p, &NAME_KEY, CallAt::NameColon, CallAt::NameKey)
                    }
                    (CallAt::NameColon, ':') => {
                        *at = CallAt::Name;
                        return Step::Child {
                            frame: Self::frame(schema, *names),
                            took: true,
                        };
                    }
                    (CallAt::AfterName, ',') => Some(CallAt::ArgsKey(0)),
                    (CallAt::ArgsKey(p), _) => key(p, args, CallAt::ArgsColon, CallAt::ArgsKey),
                    (CallAt::ArgsColon, ':') => {
                        *at = CallAt::Args;
                        return Step::Child {
                            frame: Self::frame(schema, params[*which]),
                            took: true,
                        };
                    }
                    (CallAt::Close, '}') => return Step::Done { took: true },
                    _ => None,
                };
                match next {
                    Some(next) => {
                        *at = next;
                        Step::Took
                    }
                    None => Step::Refused,
                }
            }
            Frame::Arr {
                node, n, at, used, ..
            } => {
                let Node::Array {
                    items,
                    prefix,
                    min,
                    max,
                    unique,
                } = &schema.nodes[*node]
                else {
                    unreachable!("an array frame's node is an array")
                };
                let room = max.is_none_or(|m| *n < m);
                match (*at, c) {
                    (ArrAt::Open, '[') => {
                        *at = ArrAt::FirstOrEnd;
                        Step::Took
                    }
                    (ArrAt::FirstOrEnd | ArrAt::After, ']') if *n >= *min => {
                        Step::Done { took: true }
                    }
                    (ArrAt::After, ',') if room => {
                        *at = ArrAt::Item;
                        Step::Took
                    }
                    (ArrAt::FirstOrEnd | ArrAt::Item, c) if room && c != ']' => {
                        // An item starts with this character; a unique one is a value not
                        // written yet (`max` allows no more items than there are values).
                        let item = prefix.get(*n).copied().unwrap_or(*items);
                        *n += 1;
                        *at = ArrAt::After;
                        let mut frame = Self::frame(schema, item);
                        if let (true, Frame::Lit { alive, .. }) = (*unique, &mut frame) {
                            *alive &= !*used;
                        }
                        Step::Child { frame, took: false }
                    }
                    _ => Step::Refused,
                }
            }
            Frame::Lit { node, pos, alive } => {
                let Node::Enum(alts) = &schema.nodes[*node] else {
                    unreachable!("a literal frame's node is an enum")
                };
                let mut next = 0u64;
                let mut ended = false;
                for (k, alt) in alts.iter().enumerate() {
                    if *alive & (1 << k) == 0 {
                        continue;
                    }
                    match alt.get(*pos) {
                        Some(&a) if a == c => next |= 1 << k,
                        None => ended = true,
                        _ => {}
                    }
                }
                if next != 0 {
                    *pos += 1;
                    *alive = next;
                    // Done at once when one alternative is whole and no other goes on.
                    let whole = alts
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| next & (1 << k) != 0)
                        .all(|(_, a)| a.len() == *pos);
                    return match whole {
                        true => Step::Done { took: true },
                        false => Step::Took,
                    };
                }
                match ended {
                    // A whole alternative (a number, say, "1" of "1" and "10") ends here.
                    true => Step::Done { took: false },
                    false => Step::Refused,
                }
            }
            Frame::Num { node, at } => {
                let Node::Num(rule) = &schema.nodes[*node] else {
                    unreachable!("a number frame's node is a number rule")
                };
                if let Some(next) = at.push(rule, c) {
                    *at = next;
                    return Step::Took;
                }
                // Not part of the number: it ends before this character, if it may.
                match at.value(rule) {
                    Some(v) if rule.meets(v, v) => Step::Done { took: false },
                    _ => Step::Refused,
                }
            }
            Frame::Str { node, at, len, dfa } => {
                let Node::Str(rule) = &schema.nodes[*node] else {
                    unreachable!("a string frame's node is a string rule")
                };
                let ch = match (*at, c) {
                    (StrAt::Open, '"') => {
                        *at = StrAt::Chars;
                        return Step::Took;
                    }
                    (StrAt::Chars, '"') => {
                        let matched = rule
                            .dfa
                            .as_ref()
                            .is_none_or(|(d, _)| d.is_match_state(d.next_eoi_state(*dfa)));
                        return match *len >= rule.min && matched {
                            true => Step::Done { took: true },
                            false => Step::Refused,
                        };
                    }
                    (StrAt::Chars, '\\') => {
                        // Only where some escape's character may come next: a backslash
                        // must not lead where nothing can follow.
                        let room = rule.max.is_none_or(|m| *len < m);
                        let some = rule.dfa.as_ref().is_none_or(|(d, _)| {
                            ESCAPED.iter().any(|&(_, e)| dfa_step(d, *dfa, e).is_some())
                        });
                        if !(room && some) {
                            return Step::Refused;
                        }
                        *at = StrAt::Escape;
                        return Step::Took;
                    }
                    (StrAt::Chars, c) if (c as u32) >= 0x20 => c,
                    // Under a pattern, `\u` escapes are not written (the character is): one
                    // begun could lead only to characters the pattern refuses.
                    (StrAt::Escape, 'u') if rule.dfa.is_none() => {
                        *at = StrAt::Hex { n: 0, code: 0 };
                        return Step::Took;
                    }
                    (StrAt::Escape, c) => match ESCAPED.iter().find(|&&(e, _)| e == c) {
                        Some(&(_, ch)) => ch,
                        None => return Step::Refused,
                    },
                    (StrAt::Hex { n, code }, c) if c.is_ascii_hexdigit() => {
                        let code = code * 16 + c.to_digit(16).expect("a hex digit");
                        if n == 1 && (0xd8..=0xdf).contains(&code) {
                            return Step::Refused; // a surrogate begun: no character ahead
                        }
                        if n < 3 {
                            *at = StrAt::Hex { n: n + 1, code };
                            return Step::Took;
                        }
                        match char::from_u32(code) {
                            Some(ch) => ch,
                            None => return Step::Refused, // a surrogate
                        }
                    }
                    _ => return Step::Refused,
                };
                // One more character of the string's value.
                if rule.max.is_some_and(|m| *len >= m) {
                    return Step::Refused;
                }
                if let Some((d, _)) = &rule.dfa {
                    match dfa_step(d, *dfa, ch) {
                        Some(state) => *dfa = state,
                        None => return Step::Refused,
                    }
                }
                *len += 1;
                *at = StrAt::Chars;
                Step::Took
            }
            Frame::Val { kind, json } => {
                if let Some(may_end) = json.in_number() {
                    let grows = match kind {
                        Kind::Integer => c.is_ascii_digit(),
                        _ => true,
                    } && json.push_char(c);
                    return match (grows, may_end) {
                        // Whitespace ends it inside `json`.
                        (true, _) if json.complete() => Step::Done { took: true },
                        (true, _) => Step::Took,
                        (false, true) => Step::Done { took: false },
                        (false, false) => Step::Refused,
                    };
                }
                if json.at_value_start() {
                    let first_ok = match kind {
                        Kind::Any(None) => true,
                        Kind::Any(Some(f)) => c == *f,
                        Kind::String => c == '"',
                        Kind::Number | Kind::Integer => c == '-' || c.is_ascii_digit(),
                        Kind::Boolean => c == 't' || c == 'f',
                        Kind::Null => c == 'n',
                    };
                    if !first_ok {
                        return Step::Refused;
                    }
                }
                if !json.push_char(c) {
                    return Step::Refused;
                }
                match json.complete() {
                    true => Step::Done { took: true },
                    false => Step::Took,
                }
            }
        }
    }
}

impl SchemaState {
    /// Whether `text` may come next.
    pub fn accepts(&self, schema: &Schema, text: &str) -> bool {
        if text.is_empty() || self.in_partial_char() {
            return false;
        }
        if self.others.is_empty() && matches!(self.written, Writing::Json) {
            // The mask's trial of every token: a copy of the one reading, while it stays one.
            let mut trial = self.reading.clone();
            let mut forks = Vec::new();
            let one = text.chars().all(|c| {
                let took = trial.take(schema, c, &mut forks);
                took && forks.is_empty()
            });
            if one || forks.is_empty() {
                return one;
            }
        }
        let mut trial = self.clone();
        text.chars().all(|c| trial.push_char(schema, c))
    }

    /// Takes `text` if it may come next.
    pub fn push(&mut self, schema: &Schema, text: &str) -> bool {
        let mut trial = self.clone();
        if text.is_empty()
            || self.in_partial_char()
            || !text.chars().all(|c| trial.push_char(schema, c))
        {
            return false;
        }
        *self = trial;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(schema: &Value) -> (Schema, SchemaState) {
        let s = Schema::compile(schema).unwrap();
        let st = SchemaState::new(&s);
        (s, st)
    }

    /// Whether `text`, a character at a time, is taken throughout, and complete at its end.
    fn run(schema: &Value, text: &str) -> (bool, bool) {
        let (s, mut st) = state(schema);
        for c in text.chars() {
            if !st.push_char(&s, c) {
                return (false, false);
            }
        }
        (true, st.complete())
    }

    /// Each schema is refused, the error saying its words.
    fn refused(cases: &[(Value, &str)]) {
        for (schema, says) in cases {
            let e = Schema::compile(schema).unwrap_err();
            assert!(e.contains(says), "{schema}: {e}");
        }
    }

    fn person() -> Value {
        json!({
            "type": "object",
            "title": "Person",
            "properties": {
                "name": {"type": "string", "description": "full name"},
                "age": {"type": "integer"},
                "height": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "role": {"enum": ["admin", "user", 1, 10, null]},
                "address": {"$ref": "#/$defs/Address"},
                "extra": {},
                "ok": {"type": "boolean"},
                "none": {"type": "null"}
            },
            "required": ["name"],
            "additionalProperties": false,
            "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}}}
        })
    }

    #[test]
    fn values_the_schema_describes_are_taken_to_completion() {
        // Properties in the order the schema declares them.
        for doc in [
            r#"{"name": "Ann \"A\"", "age": 41, "height": -1.5e3, "tags": ["x", "y"], "role": "admin", "address": {"city": "Oslo"}, "extra": [1, {"a": null}], "ok": true, "none": null}"#,
            r#"{"name":"","age":0,"height":2,"tags":[],"role":10,"address":{"city":""},"extra":"s","ok":false,"none":null}"#,
            "{\n  \"name\": \"B\",\n  \"age\": -7,\n  \"height\": 0.5,\n  \"tags\": [ \"z\" ],\n  \"role\": 1 ,\n  \"address\": {\"city\": \"é\"},\n  \"extra\": {},\n  \"ok\": true,\n  \"none\": null\n}",
        ] {
            assert_eq!(run(&person(), doc), (true, true), "{doc}");
        }
    }

    #[test]
    fn what_the_schema_does_not_describe_is_refused() {
        let ok = r#"{"name": "A", "age": 41, "height": 1, "tags": [], "role": null, "address": {"city": "Oslo"}, "extra": 1, "ok": true, "none": null}"#;
        assert_eq!(run(&person(), ok), (true, true));
        for (from, to) in [
            ("\"age\": 41", "\"age\": 4.1"),
            ("\"age\": 41", "\"age\": \"41\""),
            ("\"name\": \"A\"", "\"name\": 1"),
            ("\"role\": null", "\"role\": \"root\""),
            ("\"role\": null", "\"role\": 2"),
            ("\"ok\": true", "\"ok\": 1"),
            ("\"tags\": []", "\"tags\": [1]"),
            ("\"tags\": []", "\"tags\": [\"a\",]"),
            ("\"tags\": []", "\"tags\": [,]"),
            ("\"city\": \"Oslo\"", "\"town\": \"Oslo\""),
            // `name` is required.
            ("\"name\": \"A\", ", ""),
            // Another order than the schema's (here the alphabetical one).
            (
                "\"name\": \"A\", \"age\": 41",
                "\"age\": 41, \"name\": \"A\"",
            ),
            ("\"extra\": 1", "\"extra\": 1, \"more\": 2"),
        ] {
            let bad = ok.replace(from, to);
            assert_ne!(run(&person(), &bad), (true, true), "{bad}");
        }
        assert_eq!(run(&person(), "[]"), (false, false));
    }

    #[test]
    fn an_enum_of_numbers_ends_where_the_number_does() {
        let schema = json!({"type": "object", "properties": {"n": {"enum": [1, 10, 100]}}});
        for (doc, whole) in [
            (r#"{"n": 1}"#, true),
            (r#"{"n": 10 }"#, true),
            (r#"{"n": 100}"#, true),
            (r#"{"n": 1000}"#, false),
            (r#"{"n": 11}"#, false),
        ] {
            assert_eq!(run(&schema, doc).1, whole, "{doc}");
        }
    }

    #[test]
    fn string_lengths_count_characters_escapes_as_one() {
        let schema = json!({"type": "string", "minLength": 2, "maxLength": 3});
        for good in [
            r#""ab""#,
            r#""abc""#,
            r#""é\u00e9""#,
            r#""a\n""#,
            r#""\"\\""#,
        ] {
            assert_eq!(run(&schema, good), (true, true), "{good}");
        }
        for bad in [
            r#""a""#,
            r#""abcd""#,
            r#""ab\ud800""#,
            r#""a\x""#,
            "\"a\nb\"",
        ] {
            assert_ne!(run(&schema, bad), (true, true), "{bad}");
        }
        let (s, st) = state(&schema);
        assert!(
            st.accepts(&s, r#""\ud7"#) && !st.accepts(&s, r#""\ud8"#),
            "no dead end"
        );
        // A type list takes each type's keywords: null is not a string.
        let optional = json!({"type": ["string", "null"], "maxLength": 1});
        assert_eq!(run(&optional, "null"), (true, true));
        assert_eq!(run(&optional, r#""a""#), (true, true));
        assert_ne!(run(&optional, r#""ab""#), (true, true));
    }

    #[test]
    fn a_pattern_masks_what_cannot_match_and_holds_the_closing_quote() {
        let code = json!({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"});
        assert_eq!(run(&code, r#""AB-123""#), (true, true));
        let (s, mut st) = state(&code);
        assert!(st.push(&s, r#""AB-12"#));
        assert!(!st.accepts(&s, "\""), "no match yet");
        assert!(!st.accepts(&s, "x") && !st.accepts(&s, "34"));
        assert!(st.accepts(&s, "3\""));
        assert_ne!(run(&code, r#""ab-123""#), (true, true));
        // Unanchored, as JSON Schema's: a match anywhere.
        let digit = json!({"type": "string", "pattern": "[0-9]"});
        assert_eq!(run(&digit, r#""no. 7 of them""#), (true, true));
        assert_ne!(run(&digit, r#""none""#), (true, true));
        // Escapes are matched as the characters they stand for.
        let quoted = json!({"type": "string", "pattern": "^say \"(hi|é)\"$"});
        assert_eq!(run(&quoted, r#""say \"hi\"""#), (true, true));
        assert_ne!(run(&quoted, r#""say \"\u00e9\"""#), (true, true), "no \\u");
        assert_eq!(run(&quoted, r#""say \"é\"""#), (true, true));
        assert_ne!(run(&quoted, r#""say \"ho\"""#), (true, true));
        // No backslash where no escape's character may follow: none is a capital, and the
        // string is full.
        let (s, st) = state(&json!({"type": "string", "pattern": "^[A-Z]+$"}));
        assert!(st.accepts(&s, "\"A") && !st.accepts(&s, "\"A\\"));
        let (s, st) = state(&json!({"type": "string", "maxLength": 1}));
        assert!(st.accepts(&s, "\"\\n") && !st.accepts(&s, "\"a\\"));
    }

    #[test]
    fn formats_take_their_rfc_forms() {
        let cases: [(&str, &[&str], &[&str]); 10] = [
            (
                "date-time",
                &["2024-02-29T13:05:09Z", "1999-12-31t23:59:59.123456+05:30"],
                &[
                    "2024-02-29 13:05:09Z",
                    "2024-13-01T00:00:00Z",
                    "2024-01-01T00:00:00",
                    "1999-12-31T23:59:60Z",
                    "2024-01-01T00:00:00.1234567Z",
                ],
            ),
            (
                "date",
                &[
                    "2024-01-31",
                    "2000-02-29",
                    "2024-02-29",
                    "0004-02-29",
                    "2023-04-30",
                ],
                &[
                    "2024-1-31",
                    "2024-01-32",
                    "24-01-01",
                    "2023-02-29",
                    "1900-02-29",
                    "2023-04-31",
                    "0000-01-01",
                ],
            ),
            (
                "time",
                &["08:30:00Z", "23:59:59.5-01:00"],
                &["24:00:00Z", "8:30:00Z"],
            ),
            (
                "uuid",
                &["123e4567-e89b-12d3-a456-426614174000"],
                &[
                    "123e4567e89b12d3a456426614174000",
                    "123e4567-e89b-12d3-a456-42661417400g",
                ],
            ),
            (
                "email",
                &["ann.lee+x@mail.example.org"],
                &["ann@localhost", "@example.com", "a b@c.de"],
            ),
            (
                "ipv4",
                &["192.168.0.1", "8.8.8.8"],
                &["256.1.1.1", "1.2.3", "01.2.3.4"],
            ),
            (
                "duration",
                &[
                    "P1Y2M3DT4H5M6S",
                    "PT30M",
                    "P3D",
                    "P2W",
                    "PT0.5S",
                    "P1M",
                    "PT1H0M30S",
                ],
                // RFC 3339 skips no unit between two (`P1Y2D`, `PT1H30S`), as ISO 8601 may.
                &[
                    "P",
                    "PT",
                    "P1D2M",
                    "P1Y2D",
                    "PT1H30S",
                    "1D",
                    "P1W2D",
                    "PT1H2S3M",
                    "P-1D",
                    "P1.5D",
                    "P1234567890D",
                ],
            ),
            (
                "hostname",
                &[
                    "example.com",
                    "a-b.c0",
                    "localhost",
                    "xn--bcher-kva.example",
                ],
                &["-a.com", "a-.com", "a..b", "a_b.com", "example.com.", ""],
            ),
            (
                "ipv6",
                &[
                    "2001:db8::1",
                    "::",
                    "::1",
                    "fe80::1:2:3:4",
                    "1:2:3:4:5:6:7:8",
                    "::ffff:192.0.2.1",
                    "64:ff9b::192.0.2.33",
                    "1::",
                ],
                &[
                    "1:2:3:4:5:6:7:8:9",
                    "1::2::3",
                    "12345::",
                    "1:2:3:4:5:6:7",
                    "::ffff:256.0.0.1",
                    "fe80::1%eth0",
                ],
            ),
            (
                "uri",
                &[
                    "https://example.com/a/b?x=1&y=%20#top",
                    "http://user:pw@[2001:db8::1]:8080/",
                    "mailto:ann@example.org",
                    "urn:isbn:0451450523",
                    "file:///etc/hosts",
                    "http://192.168.0.1",
                ],
                &[
                    "example.com",
                    "/relative/path",
                    "http://a b",
                    "http://x/%zz",
                    "1http://x",
                    "http://x/#a#b",
                    "http://[::1/",
                    "abcdefghijklmnopqrstuvwxyzabcdefg://x",
                ],
            ),
        ];
        for (format, good, bad) in cases {
            let schema = json!({"type": "string", "format": format});
            for g in good {
                let text = format!("\"{g}\"");
                assert_eq!(run(&schema, &text), (true, true), "{format} {g}");
            }
            for b in bad {
                let text = format!("\"{b}\"");
                assert_ne!(run(&schema, &text), (true, true), "{format} {b}");
            }
        }
    }

    #[test]
    fn number_texts_convert_to_units_exactly_and_round_inward() {
        assert_eq!(units("0.3", 15, true), Some((300_000_000_000_000, true)));
        assert_eq!(units("-2.5", 0, true), Some((-2, false)));
        assert_eq!(units("-2.5", 0, false), Some((-3, false)));
        assert_eq!(units("2.5", 0, true), Some((3, false)));
        assert_eq!(units("1e-7", 15, false), Some((100_000_000, true)));
        assert_eq!(units("1e-16", 15, true), Some((1, false)));
        assert_eq!(units("12E2", 0, true), Some((1200, true)));
        assert_eq!(units("0", 15, true), Some((0, true)));
        assert_eq!(units("1e15", 0, true), None);
        assert_eq!(
            units("999999999999999", 0, true),
            Some((999_999_999_999_999, true))
        );
    }

    #[test]
    fn bounded_integers_are_masked_to_their_range() {
        let s = json!({"type": "integer", "minimum": 10, "maximum": 250});
        for good in ["10", "99", "250", "123"] {
            assert_eq!(
                run(&json!({"type": "array", "items": s}), &format!("[{good}]")),
                (true, true),
                "{good}"
            );
        }
        let (sc, mut st) = state(&json!({"type": "array", "items": s}));
        assert!(st.push(&sc, "["));
        assert!(!st.accepts(&sc, "-") && !st.accepts(&sc, "0"));
        assert!(st.accepts(&sc, "1") && st.accepts(&sc, "3") && st.accepts(&sc, "9"));
        assert!(!st.accepts(&sc, "9]"), "9 is below 10");
        assert!(st.accepts(&sc, "30]") && !st.accepts(&sc, "300"));
        assert!(st.accepts(&sc, "26]") && !st.accepts(&sc, "260"));
        assert!(st.accepts(&sc, "25") && !st.accepts(&sc, "251") && !st.accepts(&sc, "2500"));
        assert!(!st.accepts(&sc, "1.5"), "an integer");
        assert!(!st.accepts(&sc, "1e2"), "no exponent");
        // Exclusive bounds, pydantic's gt/lt; negative ranges.
        let gt = json!({"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}});
        assert_eq!(run(&gt, "[1,2]"), (true, true));
        assert_ne!(run(&gt, "[0]"), (true, true));
        assert_ne!(run(&gt, "[3]"), (true, true));
        let neg =
            json!({"type": "array", "items": {"type": "integer", "minimum": -20, "maximum": -5}});
        assert_eq!(run(&neg, "[-5, -20, -13]"), (true, true));
        assert_ne!(run(&neg, "[-4]"), (true, true));
        assert_ne!(run(&neg, "[-21]"), (true, true));
        assert_ne!(run(&neg, "[-0]"), (true, true));
        assert_ne!(run(&neg, "[5]"), (true, true));
    }

    /// `multipleOf`: an integer or number ends only on a multiple, within its bounds, and a
    /// digit is masked where no multiple can follow it.
    #[test]
    fn multiples_are_the_only_values_written() {
        let list = |item: Value| json!({"type": "array", "items": item});
        let fives = list(json!({"type": "integer", "multipleOf": 5, "minimum": 7, "maximum": 23}));
        assert_eq!(run(&fives, "[10,15,20]"), (true, true));
        for bad in ["[5]", "[25]", "[12]", "[7]"] {
            assert_ne!(run(&fives, bad), (true, true), "{bad}");
        }
        let (sc, mut st) = state(&fives);
        assert!(st.push(&sc, "["));
        assert!(st.accepts(&sc, "1") && st.accepts(&sc, "2") && !st.accepts(&sc, "3"));
        assert!(st.accepts(&sc, "15") && !st.accepts(&sc, "16") && !st.accepts(&sc, "25"));
        let threes = list(json!({"type": "integer", "multipleOf": 3}));
        assert_eq!(run(&threes, "[0,-3,9,123456]"), (true, true));
        assert_ne!(run(&threes, "[10]"), (true, true));
        let quarters = list(json!({"type": "number", "multipleOf": 0.25, "maximum": 2}));
        assert_eq!(run(&quarters, "[1.75,-0.5,2,0.25,1.0]"), (true, true));
        for bad in ["[1.7]", "[2.25]", "[0.3]"] {
            assert_ne!(run(&quarters, bad), (true, true), "{bad}");
        }
        let (sc, mut st) = state(&quarters);
        assert!(st.push(&sc, "[1.7"));
        assert!(st.accepts(&sc, "5") && !st.accepts(&sc, "1") && !st.accepts(&sc, "]"));
    }

    #[test]
    fn bounded_numbers_reach_only_values_in_range() {
        let unit =
            json!({"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}});
        for good in ["[0]", "[1]", "[0.5, 0.999, 1.0, 1.000, 0.000001, -0, -0.0]"] {
            assert_eq!(run(&unit, good), (true, true), "{good}");
        }
        for bad in ["[1.5]", "[-0.1]", "[1.01]", "[2]", "[1e0]", "[10]"] {
            assert_ne!(run(&unit, bad), (true, true), "{bad}");
        }
        let (sc, mut st) = state(&unit);
        assert!(st.push(&sc, "[1."));
        assert!(st.accepts(&sc, "0") && !st.accepts(&sc, "1") && !st.accepts(&sc, "]"));
        let open = json!({"type": "array", "items": {"type": "number", "exclusiveMinimum": 0.3, "exclusiveMaximum": 0.5}});
        assert_eq!(run(&open, "[0.31, 0.4999]"), (true, true));
        assert_ne!(run(&open, "[0.3]"), (true, true));
        assert_ne!(run(&open, "[0.5]"), (true, true));
        let below = json!({"type": "array", "items": {"type": "number", "maximum": -1.5}});
        assert_eq!(run(&below, "[-1.5, -1.6, -200]"), (true, true));
        assert_ne!(run(&below, "[-1.4]"), (true, true));
    }

    #[test]
    fn enum_keys_and_patterns_take_characters_in_byte_tokens() {
        // 東 is E6 9D B1, 大 E5 A4 A7.
        let cities = json!({"enum": ["東京", "大阪"]});
        let (s, mut st) = state(&cities);
        assert!(st.push(&s, "\""));
        assert!(st.clone().push_bytes(&s, &[0xe5]) && !st.clone().push_bytes(&s, &[0xe7]));
        assert!(st.push_bytes(&s, &[0xe6]));
        assert!(!st.accepts(&s, "京\""), "the first character is not whole");
        assert!(
            !st.clone().push_bytes(&s, &[0xa4, 0xa7]),
            "the rest of 大, not of 東"
        );
        assert!(st.push_bytes(&s, &[0x9d, 0xb1]));
        assert!(st.push(&s, "京\"") && st.complete());
        let key = json!({"type": "object", "properties": {"東": {"type": "integer"}}});
        let (s, mut st) = state(&key);
        assert!(st.push(&s, "{\"") && st.push_bytes(&s, &[0xe6, 0x9d]));
        assert!(st.push_bytes(&s, &[0xb1]) && st.push(&s, "\": 1}") && st.complete());
        let pattern = json!({"type": "string", "pattern": "^東", "maxLength": 1});
        let (s, mut st) = state(&pattern);
        assert!(st.push(&s, "\"") && !st.clone().push_bytes(&s, &[0xe5]));
        assert!(st.push_bytes(&s, &[0xe6]) && st.push_bytes(&s, &[0x9d, 0xb1]));
        assert!(!st.clone().push_bytes(&s, &[0xe6]), "maxLength");
        assert!(st.push(&s, "\"") && st.complete());
    }

    #[test]
    fn a_recursive_ref_follows_the_value_as_deep_as_it_goes() {
        // pydantic's tree: a node's children are nodes, its parent an optional node.
        let tree = json!({"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object",
            "properties": {"name": {"type": "string"},
                           "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                           "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
            "required": ["name", "children", "next"]}}});
        let leaf = |n: &str| format!(r#"{{"name": "{n}", "children": [], "next": null}}"#);
        let deep = format!(
            r#"{{"name": "a", "children": [{{"name": "b", "children": [{}], "next": {}}}], "next": null}}"#,
            leaf("c"),
            leaf("d")
        );
        assert_eq!(run(&tree, &leaf("x")), (true, true));
        assert_eq!(run(&tree, &deep), (true, true));
        assert_eq!(
            run(
                &tree,
                r#"{"name": "a", "children": [{"name": "b", "children": 1"#
            ),
            (false, false),
            "a child is a node all the way down"
        );
        // Mutual recursion; each $ref still compiles once per use outside its own schema.
        let mutual = json!({"$ref": "#/$defs/A", "$defs": {
            "A": {"type": "object", "properties": {"b": {"anyOf": [{"$ref": "#/$defs/B"}, {"type": "null"}]}}},
            "B": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}}});
        assert_eq!(
            run(&mutual, r#"{"b": {"a": {"b": {"a": {"b": null}}}}}"#),
            (true, true)
        );
        // A oneOf whose alternative is the reference being compiled can start with anything.
        let one_of = json!({"$ref": "#/$defs/L", "$defs": {"L": {"type": "object", "properties": {
            "next": {"oneOf": [{"$ref": "#/$defs/L"}, {"type": "null"}]}}}}});
        refused(&[(one_of, "same character")]);
    }

    #[test]
    fn prefix_items_give_each_position_its_schema() {
        // pydantic's `tuple[float, float]`.
        let pair = json!({"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}],
                          "minItems": 2, "maxItems": 2});
        assert_eq!(run(&pair, "[41.9, 12.5]"), (true, true));
        for bad in ["[41.9]", "[1, 2, 3]", "[\"a\", 2]"] {
            assert_ne!(run(&pair, bad), (true, true), "{bad}");
        }
        // Then `items`; `items: false` ends the array with its prefix.
        let rest = json!({"prefixItems": [{"type": "string"}, {"type": "integer"}],
                          "items": {"type": "boolean"}});
        assert_eq!(run(&rest, r#"["a", 1, true, false]"#), (true, true));
        assert_eq!(
            run(&rest, r#"["a"]"#),
            (true, true),
            "no minItems: a shorter array"
        );
        assert_eq!(run(&rest, r#"["a", 1, 2]"#), (false, false));
        let closed = json!({"type": "array", "prefixItems": [{"const": "x"}], "items": false});
        assert_eq!(run(&closed, r#"["x"]"#), (true, true));
        assert_eq!(run(&closed, "[]"), (true, true));
        assert_eq!(run(&closed, r#"["x", "x"]"#), (false, false));
        refused(&[
            (
                json!({"type": "array", "prefixItems": [{}], "items": false, "minItems": 2}),
                "more items than",
            ),
            (
                json!({"type": "array", "prefixItems": [{}], "uniqueItems": true}),
                "beside prefixItems",
            ),
            (
                json!({"type": "array", "prefixItems": {}}),
                "list of schemas",
            ),
        ]);
    }

    #[test]
    fn alternatives_that_start_alike_are_read_side_by_side_until_the_text_tells_them_apart() {
        // pydantic's `Union[Cat, Dog]`, and the same with its discriminator.
        let pet = |kind: &str, field: &str, ty: &str| {
            json!({"type": "object",
                   "properties": {"pet_type": {"const": kind}, field: {"type": ty}},
                   "required": ["pet_type", field]})
        };
        let union =
            json!({"anyOf": [pet("cat", "meows", "integer"), pet("dog", "barks", "boolean")]});
        let discriminated = json!({
            "oneOf": [pet("cat", "meows", "integer"), pet("dog", "barks", "boolean")],
            "discriminator": {"propertyName": "pet_type"}});
        for schema in [&union, &discriminated] {
            assert_eq!(
                run(schema, r#"{"pet_type": "cat", "meows": 3}"#),
                (true, true)
            );
            assert_eq!(
                run(schema, r#"{"pet_type": "dog", "barks": true}"#),
                (true, true)
            );
            assert_eq!(
                run(schema, r#"{"pet_type": "cat", "barks": true}"#),
                (false, false)
            );
            assert_eq!(run(schema, r#"{"pet_type": "cow""#), (false, false));
            let (s, mut st) = state(schema);
            assert!(st.push(&s, r#"{"pet_type": ""#));
            assert_eq!(
                st.readings().count(),
                2,
                "both alive until the value differs"
            );
            assert!(st.accepts(&s, "c") && st.accepts(&s, "d") && !st.accepts(&s, "e"));
            assert!(st.push(&s, "d"));
            assert_eq!(st.readings().count(), 1, "the cat is gone");
        }
        // The discriminator's property is written, required or not.
        let optional = |kind: &str| json!({"type": "object", "properties": {"pet_type": {"const": kind}, "n": {"type": "integer"}}});
        let tagged = json!({"oneOf": [optional("cat"), optional("dog")],
                            "discriminator": {"propertyName": "pet_type"}});
        assert_eq!(run(&tagged, r#"{"pet_type": "dog", "n": 1}"#), (true, true));
        assert_eq!(run(&tagged, r#"{"pet_type": "cat"}"#), (true, true));
        assert_eq!(run(&tagged, r#"{"n": 1}"#), (false, false));
        assert_eq!(run(&tagged, "{}"), (false, false));
        refused(&[(
            json!({"oneOf": [optional("cat"), {"type": "integer"}],
                   "discriminator": {"propertyName": "pet_type"}}),
            "each alternative must be an object declaring it",
        )]);
        // An integer or a number; a constant or any short string.
        let num = json!({"type": ["integer", "number"]});
        for ok in ["1", "-2.5", "3e2"] {
            let (s, mut st) = state(&num);
            assert!(st.push(&s, ok) && st.push(&s, " "), "{ok}");
            assert!(st.complete(), "{ok}");
        }
        let text = json!({"anyOf": [{"const": "ab"}, {"type": "string", "maxLength": 3}]});
        assert_eq!(run(&text, "\"abc\""), (true, true));
        assert_eq!(run(&text, "\"ab\""), (true, true));
        assert_eq!(run(&text, "\"abcd\""), (false, false));
        // Readings that come back together are one again: a long list keeps two at most.
        let list =
            json!({"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "number"}]}});
        let (s, mut st) = state(&list);
        assert!(st.push(&s, "["));
        for _ in 0..50 {
            assert!(st.push(&s, "1, "));
            assert!(st.readings().count() <= 2, "{}", st.readings().count());
        }
        assert!(st.push(&s, "2.5]") && st.complete());
    }

    #[test]
    fn a_schema_kandle_cannot_follow_is_refused_naming_the_keyword() {
        refused(&[
            (
                json!({"oneOf": [{"type": "object"}, {"type": "object", "properties": {}}]}),
                "same character",
            ),
            (
                json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
                "without a discriminator",
            ),
            (
                json!({"anyOf": [{"type": "string"}], "type": "string"}),
                "beside anyOf",
            ),
            (json!({"type": "string", "pattern": "a(?=b)"}), "pattern"),
            (json!({"type": "string", "pattern": "(a)\\1"}), "pattern"),
            (json!({"type": "string", "pattern": "x{5000}"}), "pattern"),
            (json!({"type": "string", "format": "iri"}), "format"),
            (
                json!({"type": "string", "format": "hostname", "minLength": 254}),
                "above what format",
            ),
            (
                json!({"type": "string", "format": "date", "pattern": "a"}),
                "together",
            ),
            (json!({"maxLength": 3}), "maxLength without a type"),
            (
                json!({"type": "string", "minLength": 4, "maxLength": 3}),
                "below",
            ),
            (
                json!({"type": "integer", "multipleOf": 0.5}),
                "of an integer must be a whole number",
            ),
            (
                json!({"type": "number", "multipleOf": 1e-20}),
                "whole number of 10^-15",
            ),
            (
                json!({"type": "number", "multipleOf": -2}),
                "positive number",
            ),
            (
                json!({"type": "integer", "multipleOf": 10, "minimum": 1, "maximum": 9}),
                "leave no value",
            ),
            (json!({"minimum": 3}), "minimum without a type"),
            (
                json!({"type": "integer", "minimum": 5, "maximum": 4}),
                "leave no value",
            ),
            (
                json!({"type": "number", "exclusiveMinimum": true}),
                "must be a number",
            ),
            (
                json!({"type": "integer", "minimum": 1e20}),
                "leaves no number",
            ),
            (json!({"$ref": "#/$defs/Missing"}), "$defs"),
            (json!({"type": "widget"}), "widget"),
            (json!({"enum": []}), "enum"),
            (
                json!({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}),
                "stand for itself",
            ),
            (
                json!({"$ref": "#/$defs/A",
                       "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}),
                "stand for itself",
            ),
        ]);
    }

    #[test]
    fn tokens_are_tried_whole_and_whitespace_is_bounded() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let (s, mut st) = state(&schema);
        assert!(st.accepts(&s, " {\"a\""));
        assert!(!st.accepts(&s, "{\"b"));
        assert!(st.push(&s, "{\"a\": 1"));
        assert!(st.accepts(&s, "2}") && st.accepts(&s, "}") && !st.accepts(&s, ".5}"));
        assert!(st.accepts(&s, " }") && !st.accepts(&s, "  }") && !st.accepts(&s, "\t}"));
        assert!(!st.accepts(&s, "\n\n}") && !st.accepts(&s, " \n}"));
        let indent = " ".repeat(GAP_INDENT as usize);
        assert!(st.accepts(&s, &format!("\n{indent}}}")));
        assert!(!st.accepts(&s, &format!("\n{indent} }}")));
        assert!(st.push(&s, "\n\t"));
        assert!(st.push(&s, "}"));
        assert!(st.complete());
        assert!(!st.accepts(&s, "}"));
    }

    #[test]
    fn a_tool_call_names_a_tool_then_gives_its_arguments() {
        let tools = [
            (
                "get_weather".to_string(),
                json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            ),
            (
                "add".to_string(),
                json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}),
            ),
        ];
        let s = Schema::tool_call(&tools).unwrap();
        let run = |text: &str| {
            let mut st = SchemaState::new(&s);
            let taken = text.chars().all(|c| st.push_char(&s, c));
            (taken, taken && st.complete())
        };
        assert_eq!(
            run(r#"{"name": "add", "arguments": {"a": 1, "b": 2}}"#),
            (true, true)
        );
        assert_eq!(
            run(r#"{"name":"get_weather","arguments":{"city":"Oslo"}}"#),
            (true, true)
        );
        for bad in [
            r#"{"name": "add", "arguments": {"city": "Oslo"}}"#,
            r#"{"name": "get_weather", "arguments": {"a": 1, "b": 2}}"#,
            r#"{"name": "sub", "arguments": {}}"#,
            r#"{"arguments": {}, "name": "add"}"#,
        ] {
            assert_ne!(run(bad), (true, true), "{bad}");
        }
    }

    #[test]
    fn a_tool_call_block_holds_a_call_or_a_list_of_calls() {
        let tools = [(
            "now".to_string(),
            json!({"type": "object", "properties": {"tz": {"type": "string"}}}),
        )];
        let s = Schema::tool_calls(&tools).unwrap();
        let run = |text: &str| {
            let mut st = SchemaState::new(&s);
            let taken = text.chars().all(|c| st.push_char(&s, c));
            (taken, taken && st.complete())
        };
        for good in [
            "\n{\"name\": \"now\", \"arguments\": {\"tz\": \"UTC\"}}",
            "[{\"name\": \"now\", \"arguments\": {\"tz\": \"a\"}}, {\"name\": \"now\", \"arguments\": {\"tz\": \"b\"}}]",
        ] {
            assert_eq!(run(good), (true, true), "{good}");
        }
        for bad in [
            "[]",
            "[{\"name\": \"later\", \"arguments\": {}}]",
            "{\"name\": \"now\", \"arguments\": {\"tz\": 1}}",
            "\"now\"",
        ] {
            assert_ne!(run(bad), (true, true), "{bad}");
        }
    }

    #[test]
    fn alternatives_that_start_differently_are_picked_by_their_first_character() {
        for schema in [
            json!({"type": "object", "properties": {"age": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}),
            json!({"type": "object", "properties": {"age": {"type": ["integer", "null"]}}}),
            json!({"type": "object", "properties": {"age": {"oneOf": [{"type": "integer"}, {"const": null}]}}}),
        ] {
            assert_eq!(run(&schema, r#"{"age": 41}"#), (true, true), "{schema}");
            assert_eq!(run(&schema, r#"{"age": null}"#), (true, true), "{schema}");
            assert_ne!(run(&schema, r#"{"age": "41"}"#), (true, true), "{schema}");
            assert_ne!(run(&schema, r#"{"age": 4.5}"#), (true, true), "{schema}");
        }
        let nested =
            json!({"anyOf": [{"type": "array", "items": {"type": "boolean"}}, {"type": "string"}]});
        assert_eq!(run(&nested, "[true, false]"), (true, true));
        assert_eq!(run(&nested, "\"x\""), (true, true));
        assert_ne!(run(&nested, "[1]"), (true, true));
    }

    #[test]
    fn min_and_max_items_bound_an_array() {
        let schema =
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2});
        assert_eq!(run(&schema, "[1]"), (true, true));
        assert_eq!(run(&schema, "[1, 2]"), (true, true));
        assert_ne!(run(&schema, "[]"), (true, true));
        assert_ne!(run(&schema, "[1, 2, 3]"), (true, true));
        let (s, st) = state(&schema);
        assert!(!st.accepts(&s, "[]"));
        assert!(st.accepts(&s, "[1,2]") && !st.accepts(&s, "[1,2,"));
        assert!(
            Schema::compile(&json!({"type": "array", "items": {}, "minItems": 3, "maxItems": 2}))
                .is_err()
        );
    }

    #[test]
    fn unique_items_of_an_enum_write_each_value_at_most_once() {
        // pydantic's `set[Literal["red", "green", "blue"]]`, through a `$ref` as it writes an
        // Enum class; and numbers where one value starts another.
        let colours = json!({"type": "array", "uniqueItems": true, "items": {"$ref": "#/$defs/C"},
                             "$defs": {"C": {"enum": ["red", "green", "blue"], "type": "string"}}});
        for ok in ["[]", r#"["red"]"#, r#"["blue", "red", "green"]"#] {
            assert_eq!(run(&colours, ok), (true, true), "{ok}");
        }
        assert_eq!(run(&colours, r#"["red", "red""#), (false, false));
        assert_eq!(run(&colours, r#"["red", "green", "red"#), (false, false));
        let (s, st) = state(&colours);
        assert!(
            !st.accepts(&s, r#"["red","green","blue","#),
            "no fourth item: every value is written"
        );
        let numbers = json!({"type": "array", "uniqueItems": true, "items": {"enum": [1, 10]}});
        assert_eq!(run(&numbers, "[10, 1]"), (true, true));
        assert_eq!(run(&numbers, "[1, 1"), (true, false), "a 1 may yet be 10");
        assert_eq!(run(&numbers, "[1, 1]"), (false, false));
        assert_eq!(run(&numbers, "[1, 10, 1"), (false, false));
        // uniqueItems false asks nothing; an array of any items says so where it was refused.
        assert_eq!(
            run(
                &json!({"type": "array", "uniqueItems": false, "items": {"const": 1}}),
                "[1,1]"
            ),
            (true, true)
        );
        refused(&[
            (
                json!({"type": "array", "uniqueItems": true, "items": {"type": "object"}}),
                "not supported for other items",
            ),
            (
                json!({"type": "array", "uniqueItems": true, "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}),
                "not supported for other items",
            ),
            (
                json!({"type": "array", "uniqueItems": true}),
                "not supported for other items",
            ),
            (
                json!({"type": "array", "uniqueItems": true, "minItems": 3, "items": {"type": "boolean"}}),
                "more distinct items",
            ),
            (
                json!({"type": "array", "uniqueItems": true, "minItems": 3, "items": {"enum": [1, 2]}}),
                "more distinct items",
            ),
            (
                json!({"type": "array", "uniqueItems": "yes", "items": {"enum": [1]}}),
                "must be a boolean",
            ),
        ]);
    }

    /// pydantic's `set[str]`, `set[int]`, `set[float]`: an item equal to one written cannot
    /// end, as JSON Schema compares values.
    #[test]
    fn unique_scalar_items_cannot_repeat_a_value() {
        let strings = json!({"type": "array", "uniqueItems": true, "items": {"type": "string"}});
        for ok in ["[]", r#"["a", "b"]"#, r#"["a", "ab", "b a"]"#] {
            assert_eq!(run(&strings, ok), (true, true), "{ok}");
        }
        assert_eq!(run(&strings, r#"["a", "a"#), (true, false), "may yet go on");
        for dup in [
            r#"["a", "a""#,
            r#"["a", "b", "\u0061""#,
            r#"["x", "\"", "\"""#,
        ] {
            assert_eq!(run(&strings, dup), (false, false), "{dup}");
        }
        // With a pattern (a string frame of its own), through a `$ref`.
        let words = json!({"type": "array", "uniqueItems": true, "items": {"$ref": "#/$defs/W"},
                           "$defs": {"W": {"type": "string", "pattern": "^[a-z]+$"}}});
        assert_eq!(run(&words, r#"["ab", "a"]"#), (true, true));
        assert_eq!(run(&words, r#"["ab", "ab""#), (false, false));
        for numbers in [
            json!({"type": "array", "uniqueItems": true, "items": {"type": "integer"}}),
            json!({"type": "array", "uniqueItems": true, "items": {"type": "number"}}),
            json!({"type": "array", "uniqueItems": true, "items": {"type": "integer", "minimum": 0}}),
        ] {
            assert_eq!(run(&numbers, "[1, 10, 2]"), (true, true), "{numbers}");
            assert_eq!(run(&numbers, "[1, 1"), (true, false), "a 1 may yet be 10");
            for dup in ["[1, 1]", "[1, 1,", "[1, 1 ", "[1, 2, 1]"] {
                assert_eq!(run(&numbers, dup), (false, false), "{numbers} {dup}");
            }
        }
        let floats = json!({"type": "array", "uniqueItems": true, "items": {"type": "number"}});
        assert_eq!(run(&floats, "[1.5, 15]"), (true, true));
        for dup in ["[1, 1.0]", "[1.5, 1.50]", "[100, 1e2]"] {
            assert_eq!(run(&floats, dup), (false, false), "{dup}");
        }
        let flags = json!({"type": "array", "uniqueItems": true, "items": {"type": "boolean"}});
        assert_eq!(run(&flags, "[true, false]"), (true, true));
        assert_eq!(run(&flags, "[true, true"), (false, false));
        // The values are the array's own: a nested array starts afresh.
        let nested = json!({"type": "array", "items": strings});
        assert_eq!(run(&nested, r#"[["a"], ["a"]]"#), (true, true));
    }

    #[test]
    fn pattern_properties_and_property_names_are_maps_whose_keys_follow_them() {
        // pydantic's dict[constr(pattern=...), int], and one patternProperties.
        for schema in [
            json!({"type": "object", "additionalProperties": {"type": "integer"},
                   "propertyNames": {"pattern": "^[a-z]+_id$"}}),
            json!({"type": "object", "patternProperties": {"^[a-z]+_id$": {"type": "integer"}},
                   "additionalProperties": false}),
        ] {
            assert_eq!(
                run(&schema, r#"{"user_id": 7, "team_id": 2}"#),
                (true, true),
                "{schema}"
            );
            assert_eq!(run(&schema, "{}"), (true, true), "{schema}");
            assert_eq!(run(&schema, r#"{"User_id""#), (false, false), "{schema}");
            assert_eq!(
                run(&schema, r#"{"user""#),
                (false, false),
                "{schema}: the key must end in _id"
            );
            assert_eq!(
                run(&schema, r#"{"user_id": "7""#),
                (false, false),
                "{schema}"
            );
        }
        // Keys of a length, values anything.
        let short = json!({"type": "object", "propertyNames": {"type": "string", "maxLength": 2}});
        assert_eq!(run(&short, r#"{"ab": [1, {"x": null}]}"#), (true, true));
        assert_eq!(run(&short, r#"{"abc""#), (false, false));
        refused(&[
            (
                json!({"type": "object", "patternProperties": {"a": {}, "b": {}}}),
                "one pattern",
            ),
            (
                json!({"type": "object", "properties": {"a": {}}, "propertyNames": {"maxLength": 2}}),
                "without properties",
            ),
            (
                json!({"type": "object", "propertyNames": {"enum": ["a"]}}),
                "enum is not supported there",
            ),
            (
                json!({"type": "object", "propertyNames": {"pattern": "a"}, "patternProperties": {"b": {}}}),
                "together",
            ),
        ]);
    }

    #[test]
    fn all_of_one_part_is_that_part_and_of_several_objects_their_properties() {
        // pydantic's wrapper of a described model field.
        let wrapped = json!({"type": "object", "properties": {
            "home": {"allOf": [{"$ref": "#/$defs/P"}], "description": "Where", "default": null}},
            "$defs": {"P": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        assert_eq!(run(&wrapped, r#"{"home": {"city": "Oslo"}}"#), (true, true));
        assert_eq!(run(&wrapped, r#"{"home": {"town""#), (false, false));
        // A schema extending another: the base's properties, then its own.
        let extended = json!({"allOf": [{"$ref": "#/$defs/Base"},
                                        {"type": "object", "properties": {"age": {"type": "integer"}},
                                         "required": ["age"]}],
                              "$defs": {"Base": {"type": "object", "title": "Base",
                                                 "properties": {"name": {"type": "string"}},
                                                 "required": ["name"]}}});
        assert_eq!(
            run(&extended, r#"{"name": "Ada", "age": 36}"#),
            (true, true)
        );
        assert_eq!(
            run(&extended, r#"{"age""#),
            (false, false),
            "the base's first"
        );
        refused(&[
            (json!({"allOf": []}), "non-empty"),
            (
                json!({"allOf": [{"type": "string"}, {"type": "string"}]}),
                "type: \"string\" is not supported there",
            ),
            (
                json!({"allOf": [{"properties": {"a": {}}}, {"properties": {"a": {}}}]}),
                "declared by two",
            ),
            (
                json!({"allOf": [{"properties": {"a": {}}, "additionalProperties": false},
                              {"properties": {"b": {}}}]}),
                "refuses the other parts",
            ),
            (
                json!({"allOf": [{"type": "object"}], "minProperties": 1}),
                "beside allOf",
            ),
            (
                json!({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}, "required": ["c"]}]}),
                "required names \"c\"",
            ),
        ]);
    }

    #[test]
    fn min_and_max_properties_bound_a_map_and_must_allow_the_declared_properties() {
        // pydantic's dict[str, int] with min_length=1, max_length=2.
        let map = json!({"type": "object", "additionalProperties": {"type": "integer"},
                         "minProperties": 1, "maxProperties": 2});
        assert_eq!(run(&map, r#"{"a": 1}"#), (true, true));
        assert_eq!(run(&map, r#"{"a": 1, "b": 2}"#), (true, true));
        assert_eq!(run(&map, "{}"), (false, false), "at least one");
        assert_eq!(
            run(&map, r#"{"a": 1, "b": 2,"#),
            (false, false),
            "at most two"
        );
        // An object of any values, counted.
        let any = json!({"type": "object", "minProperties": 1});
        assert_eq!(run(&any, r#"{"x": [null]}"#), (true, true));
        assert_eq!(run(&any, "{}"), (false, false));
        // Declared properties: bounds that allow them all are read; a minimum above the
        // required ones makes every one written.
        let declared = json!({"type": "object", "properties": {"a": {"type": "integer"}},
                              "minProperties": 1, "maxProperties": 1});
        assert_eq!(run(&declared, r#"{"a": 1}"#), (true, true));
        assert_eq!(run(&declared, "{}"), (false, false));
        refused(&[
            (
                json!({"type": "object", "properties": {"a": {}, "b": {}}, "maxProperties": 1}),
                "must allow the 2 declared properties",
            ),
            (
                json!({"type": "object", "additionalProperties": false, "minProperties": 1}),
                "allows none",
            ),
            (
                json!({"type": "object", "minProperties": 3, "maxProperties": 2}),
                "below minProperties",
            ),
        ]);
    }

    #[test]
    fn required_names_must_be_declared_properties_and_are_written() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                            "required": ["a"], "dependentRequired": {"a": ["b"]}});
        assert_eq!(run(&schema, r#"{"a": 1, "b": 2}"#), (true, true));
        assert_eq!(run(&schema, r#"{"a": 1}"#), (false, false));
        // A name another needs is written always, whether or not that other is.
        let needed = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                            "dependentRequired": {"a": ["b"]}});
        assert_eq!(run(&needed, r#"{"b": 2}"#), (true, true));
        assert_eq!(run(&needed, r#"{"a": 1, "b": 2}"#), (true, true));
        assert_eq!(run(&needed, r#"{"a": 1}"#), (false, false));
        assert_eq!(run(&needed, "{}"), (false, false));
        refused(&[
            (
                json!({"type": "object", "properties": {"a": {}}, "required": ["z"]}),
                "required names \"z\"",
            ),
            (
                json!({"type": "object", "required": ["a"]}),
                "which properties does not declare",
            ),
            (
                json!({"type": "object", "properties": {"a": {}}, "dependentRequired": {"a": ["z"]}}),
                "dependentRequired names \"z\"",
            ),
        ]);
    }

    #[test]
    fn optional_properties_may_be_left_out_the_rest_in_the_schema_s_order() {
        let int = json!({"type": "integer"});
        let schema = json!({"type": "object", "required": ["b"],
                            "properties": {"a": int, "b": int, "c": int, "d": int}});
        for ok in [
            r#"{"b":1}"#,
            r#"{"a":0,"b":1}"#,
            r#"{"b":1,"d":3}"#,
            r#"{ "a": 0 , "b": 1, "c": 2,
                "d": 3 }"#,
        ] {
            assert_eq!(run(&schema, ok), (true, true), "{ok}");
        }
        for bad in [
            "{}",
            r#"{"a":0}"#,
            r#"{"b":1,}"#,
            r#"{"c":2,"b":1}"#,
            r#"{"a":0,"a":1,"b":1}"#,
            r#"{"b":1,"d":3,"c":2}"#,
            r#"{"b":1,"e":3}"#,
        ] {
            assert_ne!(run(&schema, bad), (true, true), "{bad}");
        }
        // Keys that start alike are told apart where they differ, or at the closing quote.
        let alike = json!({"type": "object", "required": ["abc"],
                           "properties": {"ab": int, "a": int, "abc": int, "é": int}});
        for ok in [
            r#"{"abc":1}"#,
            r#"{"a":0,"abc":1}"#,
            r#"{"ab":0,"a":1,"abc":2,"é":3}"#,
        ] {
            assert_eq!(run(&alike, ok), (true, true), "{ok}");
        }
        assert_ne!(run(&alike, r#"{"abc":1,"a":0}"#), (true, true));
        assert_ne!(run(&alike, r#"{"a":0,"ab":1,"abc":1}"#), (true, true));
        // A key's character split across tokens: its first byte is taken where a key can
        // still go on with it.
        let (s, mut st) = state(&alike);
        assert!(st.push(&s, r#"{"abc":1,""#));
        assert!(st.push_bytes(&s, &"é".as_bytes()[..1]));
        assert!(st.push_bytes(&s, &"é".as_bytes()[1..]));
        assert!(st.push(&s, r#"":3}"#) && st.complete());
        let (s, mut st) = state(&alike);
        assert!(st.push(&s, r#"{""#));
        assert!(
            !st.push_bytes(&s, &"é".as_bytes()[..1]),
            "é comes after abc"
        );
        // No property required: the empty object.
        let none = json!({"type": "object", "properties": {"a": int}});
        assert_eq!(run(&none, "{}"), (true, true));
        assert_eq!(run(&none, r#"{"a": 1}"#), (true, true));
        // Up to 63 optional properties in a row.
        let row = |n: usize| {
            let mut props: serde_json::Map<String, Value> =
                (0..n).map(|k| (format!("p{k}"), int.clone())).collect();
            props.insert("z".into(), int.clone());
            json!({"type": "object", "properties": props, "required": ["z"]})
        };
        assert_eq!(run(&row(63), r#"{"z":1}"#), (true, true));
        assert_eq!(run(&row(63), r#"{"p62":0,"z":1}"#), (true, true));
        assert_eq!(run(&row(63), r#"{"p0":0,"p62":0,"z":1}"#), (true, true));
        refused(&[(row(64), "more than 63 optional properties in a row")]);
    }

    #[test]
    fn additional_properties_as_a_schema_is_a_map() {
        for schema in [
            json!({"type": "object", "additionalProperties": {"type": "integer"}}),
            json!({"additionalProperties": {"type": "integer"}}),
        ] {
            assert_eq!(run(&schema, "{}"), (true, true), "{schema}");
            assert_eq!(
                run(&schema, r#"{"a": 1, "b c": -2 ,"é":3}"#),
                (true, true),
                "{schema}"
            );
            for bad in [
                r#"{"a": "x"}"#,
                r#"{"a": 1,}"#,
                "{a: 1}",
                r#"{"a" 1}"#,
                r#"{"a": 1.5}"#,
            ] {
                assert_ne!(run(&schema, bad), (true, true), "{schema}: {bad}");
            }
        }
        let none = json!({"type": "object", "additionalProperties": false});
        assert_eq!(run(&none, "{ }"), (true, true));
        assert_ne!(run(&none, r#"{"a": 1}"#), (true, true));
        let any = json!({"type": "object", "additionalProperties": true});
        assert_eq!(run(&any, r#"{"a": [1, "x"]}"#), (true, true));
    }
}
