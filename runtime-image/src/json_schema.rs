//! Structured outputs (`response_format: {"type": "json_schema", "json_schema": {"schema":
//! …}}`): the answer is a JSON value that the schema accepts. The schema is compiled into
//! [`Schema`] nodes and followed by [`SchemaState`], a stack of frames that
//! [`crate::json_mode::JsonMode`] masks tokens with as it does for JSON mode.
//!
//! The subset kandle follows, and what it decides where JSON Schema leaves a choice:
//! - `type` (object, array, string, number, integer, boolean, null, or a list of them),
//!   `properties`, `items` (with `minItems`, `maxItems`), `enum`, `const`, `$ref` to `#/$defs/…` or `#/definitions/…` (not
//!   recursive), and `anyOf` / `oneOf` of alternatives that start with different characters
//!   (pydantic's `Optional[X]`: X or null); the first character of the value picks one.
//! - Without `properties`, `additionalProperties` as a schema makes a map (any keys, each
//!   value of that schema; pydantic's `dict[str, X]`), `false` the empty object.
//! - An object is written with every property of `properties`, in the order the server reads
//!   them (alphabetical), and no other: that satisfies `required` and `additionalProperties:
//!   false`, which are therefore read but need nothing more. An object or array without
//!   `properties` or `items` holds any JSON.
//! - Between tokens, whitespace is none, one space, or a newline and up to 20 spaces or tabs
//!   (llama.cpp's grammars from schemas; JSON mode allows any 32 in a row).
//! - Annotations (`title`, `description`, `default`, `examples`, `$schema`, `$defs`,
//!   `definitions`, `strict`) are ignored. Any other keyword (`pattern`, `minimum`,
//!   `format`, …) is refused with its name rather than ignored, since the answer could then
//!   break it.

use std::collections::BTreeSet;

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

#[derive(Debug, Clone)]
enum Node {
    Value(Kind),
    /// Each property's key (as JSON text, quotes included) and node.
    Object(Vec<(Vec<char>, usize)>),
    /// Items of one node, `min` to `max` of them.
    Array {
        items: usize,
        min: usize,
        max: Option<usize>,
    },
    /// The JSON texts of the allowed values.
    Enum(Vec<Vec<char>>),
    /// A call of one of several tools: `{"name": <one of the names>, "arguments": <that
    /// tool's parameters>}`; the enum node of the names (in its order) and each one's node.
    Call {
        names: usize,
        params: Vec<usize>,
    },
    /// One of these, told apart by their first character ([`Schema::union`]).
    Union(Vec<usize>),
    /// An object of any keys, each value of this node (`additionalProperties` as a schema).
    Map(usize),
}

/// A compiled schema.
#[derive(Debug, Clone)]
pub struct Schema {
    nodes: Vec<Node>,
    /// The node of the whole value (children are compiled before a union that holds them).
    root: usize,
}

impl Schema {
    /// Compiles `schema`, or says which part of it kandle does not follow.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        let mut s = Schema {
            nodes: Vec::new(),
            root: 0,
        };
        s.root = s.node(schema, schema, 0)?;
        Ok(s)
    }

    /// Adds the node of `v` (and its children), returning its index; the root is 0.
    fn node(&mut self, v: &Value, root: &Value, depth: usize) -> Result<usize, String> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!(
                "the schema nests deeper than {MAX_SCHEMA_DEPTH} levels (a recursive $ref?)"
            ));
        }
        let obj = match v {
            Value::Object(o) => o,
            Value::Bool(true) => return Ok(self.push(Node::Value(Kind::Any(None)))),
            _ => return Err(format!("a schema must be an object, got {v}")),
        };
        if let Some(r) = obj.get("$ref") {
            let target = r
                .as_str()
                .and_then(|r| {
                    r.strip_prefix("#/$defs/")
                        .map(|n| root.get("$defs").and_then(|d| d.get(n)))
                        .or_else(|| {
                            r.strip_prefix("#/definitions/")
                                .map(|n| root.get("definitions").and_then(|d| d.get(n)))
                        })
                })
                .flatten()
                .ok_or_else(|| format!("$ref {r} does not name an entry of $defs"))?;
            return self.node(target, root, depth + 1);
        }
        if let Some(alts) = obj.get("anyOf").or_else(|| obj.get("oneOf")) {
            // Alternatives that start differently (pydantic's `Optional[X]`, say): the first
            // character picks one, so that "one of" and "any of" are the same here.
            if let Some(k) = obj.keys().find(|k| {
                !matches!(k.as_str(), "anyOf" | "oneOf") && !ANNOTATIONS.contains(&k.as_str())
            }) {
                return Err(format!(
                    "the schema keyword {k} beside anyOf/oneOf is not supported"
                ));
            }
            let alts = alts
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("anyOf/oneOf must be a non-empty list, got {alts}"))?;
            let nodes = alts
                .iter()
                .map(|a| self.node(a, root, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            return self.union(nodes);
        }
        for key in obj.keys() {
            let known = matches!(
                key.as_str(),
                "type" | "properties" | "items" | "enum" | "const" | "minItems" | "maxItems"
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
                || obj
                    .get("additionalProperties")
                    .is_some_and(Value::is_object) =>
            {
                self.object(obj, root, depth)?
            }
            None if obj.contains_key("items") => self.array(obj, root, depth)?,
            None => self.push(Node::Value(Kind::Any(None))),
            Some("object") => self.object(obj, root, depth)?,
            Some("array") => self.array(obj, root, depth)?,
            Some("string") => self.push(Node::Value(Kind::String)),
            Some("number") => self.push(Node::Value(Kind::Number)),
            Some("integer") => self.push(Node::Value(Kind::Integer)),
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
        let Some(props) = obj.get("properties") else {
            // No properties: a map of values of one schema, the empty object, or any object.
            return Ok(match obj.get("additionalProperties") {
                Some(v @ Value::Object(_)) => {
                    let at = self.push(Node::Map(0));
                    let child = self.node(v, root, depth + 1)?;
                    self.nodes[at] = Node::Map(child);
                    at
                }
                Some(Value::Bool(false)) => self.push(Node::Object(Vec::new())),
                _ => self.push(Node::Value(Kind::Any(Some('{')))),
            });
        };
        let props = props
            .as_object()
            .ok_or_else(|| format!("properties must be an object, got {props}"))?;
        let at = self.push(Node::Object(Vec::new()));
        let mut fields = Vec::with_capacity(props.len());
        for (k, v) in props {
            let key = Value::String(k.clone()).to_string().chars().collect();
            fields.push((key, self.node(v, root, depth + 1)?));
        }
        self.nodes[at] = Node::Object(fields);
        Ok(at)
    }

    fn array(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        root: &Value,
        depth: usize,
    ) -> Result<usize, String> {
        match obj.get("items") {
            None => Ok(self.push(Node::Value(Kind::Any(Some('['))))),
            Some(items) => {
                let count = |k: &str| -> Result<Option<usize>, String> {
                    obj.get(k)
                        .map(|v| {
                            v.as_u64()
                                .map(|n| n as usize)
                                .ok_or_else(|| format!("{k} must be a count, got {v}"))
                        })
                        .transpose()
                };
                let (min, max) = (count("minItems")?.unwrap_or(0), count("maxItems")?);
                if max.is_some_and(|m| m < min) {
                    return Err(format!("maxItems {max:?} is below minItems {min}"));
                }
                let at = self.push(Node::Array { items: 0, min, max });
                let child = self.node(items, root, depth + 1)?;
                self.nodes[at] = Node::Array {
                    items: child,
                    min,
                    max,
                };
                Ok(at)
            }
        }
    }

    /// The schema of a call of one of `tools` (name, parameters schema; names distinct):
    /// `{"name": …, "arguments": …}` with the arguments of the tool named.
    pub fn tool_call(tools: &[(String, Value)]) -> Result<Schema, String> {
        let mut s = Schema {
            nodes: Vec::new(),
            root: 0,
        };
        let at = s.push(Node::Call {
            names: 0,
            params: Vec::new(),
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
        s.nodes[at] = Node::Call { names, params };
        s.root = at;
        Ok(s)
    }

    /// What a model's own tool-call block may hold ([`crate::tool_calls`]): a call of one of
    /// `tools` ([`Schema::tool_call`]), or a list of one or more.
    pub fn tool_calls(tools: &[(String, Value)]) -> Result<Schema, String> {
        let mut s = Schema::tool_call(tools)?;
        let call = s.root;
        let list = s.push(Node::Array {
            items: call,
            min: 1,
            max: None,
        });
        s.root = s.union(vec![call, list])?;
        Ok(s)
    }

    /// A node of alternatives, which must start with different characters.
    fn union(&mut self, alts: Vec<usize>) -> Result<usize, String> {
        let mut seen = 0u128;
        for &a in &alts {
            let first = self.first_chars(a);
            if first & seen != 0 {
                return Err(
                    "anyOf/oneOf or type-list alternatives that can start with the same \
                     character (two objects, a number and an integer, ...) are not supported"
                        .into(),
                );
            }
            seen |= first;
        }
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
            Node::Value(Kind::String) => bits("\""),
            Node::Value(Kind::Number | Kind::Integer) => number,
            Node::Value(Kind::Boolean) => bits("tf"),
            Node::Value(Kind::Null) => bits("n"),
            Node::Object(_) | Node::Call { .. } | Node::Map(_) => bits("{"),
            Node::Array { .. } => bits("["),
            Node::Enum(alts) => alts
                .iter()
                .filter_map(|a| a.first())
                .fold(0, |m, &c| m | if c.is_ascii() { 1 << (c as u8) } else { 0 }),
            Node::Union(alts) => alts.iter().fold(0, |m, &a| m | self.first_chars(a)),
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
    /// Inside property `i`'s key, `pos` characters in.
    Key(usize),
    Colon,
    /// After a property's value: `,` and the next key, or `}` after the last.
    After,
    /// After `{` of an object with no properties: `}`.
    Close,
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
const ARGS_KEY: [char; 11] = ['"', 'a', 'r', 'g', 'u', 'm', 'e', 'n', 't', 's', '"'];

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

#[derive(Debug, Clone)]
enum Frame {
    Obj {
        node: usize,
        i: usize,
        at: ObjAt,
    },
    /// An array, `n` items begun.
    Arr {
        node: usize,
        n: usize,
        at: ArrAt,
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
    /// Alternatives, before the first character picks one.
    Union {
        node: usize,
    },
    /// A map object.
    Map {
        node: usize,
        at: MapAt,
    },
    /// A tool call; `which`: the tool named, once its name is read.
    Call {
        node: usize,
        at: CallAt,
        which: usize,
    },
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
    /// A child's value starts: after this character (`took`), or with it.
    Child {
        frame: Frame,
        took: bool,
    },
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The automaton of a [`Schema`] after the text so far.
#[derive(Debug, Clone)]
pub struct SchemaState {
    stack: Vec<Frame>,
    /// Whitespace characters of the gap so far, and whether it began with a newline.
    ws: u8,
    newline: bool,
    done: bool,
}

impl SchemaState {
    pub fn new(schema: &Schema) -> SchemaState {
        SchemaState {
            stack: vec![Self::frame(schema, schema.root)],
            ws: 0,
            newline: false,
            done: false,
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
            Node::Array { .. } => Frame::Arr {
                node,
                n: 0,
                at: ArrAt::Open,
            },
            Node::Union(_) => Frame::Union { node },
            Node::Map(_) => Frame::Map {
                node,
                at: MapAt::Open,
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

    /// Whether the value is complete.
    pub fn complete(&self) -> bool {
        self.done
    }

    /// Inside a string's plain characters.
    pub fn in_plain_string(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Val { json, .. }) if json.in_plain_string())
    }

    /// Takes `c`; `false` (the state then unusable: callers try on a copy) if refused.
    pub fn push_char(&mut self, schema: &Schema, c: char) -> bool {
        if is_ws(c) && self.between_tokens() {
            return self.gap(c);
        }
        self.ws = 0;
        loop {
            let Some(top) = self.stack.last_mut() else {
                return false; // done: only whitespace
            };
            match Self::step(schema, top, c) {
                Step::Took => return true,
                Step::Refused => return false,
                Step::Become(frame) => {
                    *self.stack.last_mut().expect("a frame") = frame;
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
                        Some(Frame::Obj { at, .. }) => *at = ObjAt::After,
                        Some(Frame::Arr { at, .. }) => *at = ArrAt::After,
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
            Some(Frame::Obj { at, .. }) => !matches!(at, ObjAt::Key(p) if *p > 0),
            Some(Frame::Arr { .. } | Frame::Union { .. } | Frame::Map { .. }) => true,
            Some(Frame::Lit { pos, .. }) => *pos == 0,
            Some(Frame::Val { json, .. }) => json.at_value_start(),
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
                match (*at, c) {
                    (ObjAt::Open, '{') if fields.is_empty() => *at = ObjAt::Close,
                    (ObjAt::Open, '{') => *at = ObjAt::Key(0),
                    (ObjAt::Close, '}') => return Step::Done { took: true },
                    (ObjAt::Key(p), c) if fields[*i].0.get(p) == Some(&c) => {
                        *at = match p + 1 == fields[*i].0.len() {
                            true => ObjAt::Colon,
                            false => ObjAt::Key(p + 1),
                        };
                    }
                    (ObjAt::Colon, ':') => {
                        return Step::Child {
                            frame: Self::frame(schema, fields[*i].1),
                            took: true,
                        };
                    }
                    (ObjAt::After, ',') if *i + 1 < fields.len() => {
                        *i += 1;
                        *at = ObjAt::Key(0);
                    }
                    (ObjAt::After, '}') if *i + 1 == fields.len() => {
                        return Step::Done { took: true };
                    }
                    _ => return Step::Refused,
                }
                // A value's first character comes after the colon, as a child's.
                Step::Took
            }
            Frame::Map { node, at } => {
                let Node::Map(values) = &schema.nodes[*node] else {
                    unreachable!("a map frame's node is a map")
                };
                match (*at, c) {
                    (MapAt::Open, '{') => *at = MapAt::KeyOrEnd,
                    (MapAt::KeyOrEnd | MapAt::After, '}') => return Step::Done { took: true },
                    (MapAt::KeyOrEnd | MapAt::Key, '"') => {
                        *at = MapAt::InKey;
                        return Step::Child {
                            frame: Frame::Val {
                                kind: Kind::String,
                                json: JsonState::value(),
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
                    (MapAt::After, ',') => *at = MapAt::Key,
                    _ => return Step::Refused,
                }
                Step::Took
            }
            Frame::Union { node } => {
                let Node::Union(alts) = &schema.nodes[*node] else {
                    unreachable!("a union frame's node is a union")
                };
                let picked = c
                    .is_ascii()
                    .then(|| {
                        alts.iter()
                            .find(|&&a| schema.first_chars(a) & (1 << (c as u8)) != 0)
                    })
                    .flatten();
                match picked {
                    Some(&a) => Step::Become(Self::frame(schema, a)),
                    None => Step::Refused,
                }
            }
            Frame::Call { node, at, which } => {
                let Node::Call { names, params } = &schema.nodes[*node] else {
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
                    (CallAt::ArgsKey(p), _) => {
                        key(p, &ARGS_KEY, CallAt::ArgsColon, CallAt::ArgsKey)
                    }
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
            Frame::Arr { node, n, at } => {
                let Node::Array { items, min, max } = &schema.nodes[*node] else {
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
                        // An item starts with this character.
                        *n += 1;
                        *at = ArrAt::After;
                        Step::Child {
                            frame: Self::frame(schema, *items),
                            took: false,
                        }
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

    /// Whether `text` may come next.
    pub fn accepts(&self, schema: &Schema, text: &str) -> bool {
        if text.is_empty() {
            return false;
        }
        let mut trial = self.clone();
        text.chars().all(|c| trial.push_char(schema, c))
    }

    /// Takes `text` if it may come next.
    pub fn push(&mut self, schema: &Schema, text: &str) -> bool {
        let mut trial = self.clone();
        if text.is_empty() || !text.chars().all(|c| trial.push_char(schema, c)) {
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
        // Properties in the order the server reads them (alphabetical).
        for doc in [
            r#"{"address": {"city": "Oslo"}, "age": 41, "extra": [1, {"a": null}], "height": -1.5e3, "name": "Ann \"A\"", "none": null, "ok": true, "role": "admin", "tags": ["x", "y"]}"#,
            r#"{"address":{"city":""},"age":0,"extra":"s","height":2,"name":"","none":null,"ok":false,"role":10,"tags":[]}"#,
            "{\n  \"address\": {\"city\": \"é\"},\n  \"age\": -7,\n  \"extra\": {},\n  \"height\": 0.5,\n  \"name\": \"B\",\n  \"none\": null,\n  \"ok\": true,\n  \"role\": 1 ,\n  \"tags\": [ \"z\" ]\n}",
        ] {
            assert_eq!(run(&person(), doc), (true, true), "{doc}");
        }
    }

    #[test]
    fn what_the_schema_does_not_describe_is_refused() {
        let ok = r#"{"address": {"city": "Oslo"}, "age": 41, "extra": 1, "height": 1, "name": "A", "none": null, "ok": true, "role": null, "tags": []}"#;
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
            ("\"none\": null,", ""),
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
    fn a_schema_kandle_cannot_follow_is_refused_naming_the_keyword() {
        for (schema, says) in [
            (
                json!({"anyOf": [{"type": "object"}, {"type": "object", "properties": {}}]}),
                "same character",
            ),
            (json!({"type": ["number", "integer"]}), "same character"),
            (
                json!({"anyOf": [{"type": "string"}], "type": "string"}),
                "beside anyOf",
            ),
            (json!({"type": "string", "pattern": "a+"}), "pattern"),
            (json!({"$ref": "#/$defs/Missing"}), "$defs"),
            (json!({"type": "widget"}), "widget"),
            (json!({"enum": []}), "enum"),
            (
                json!({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}),
                "recursive",
            ),
        ] {
            let e = Schema::compile(&schema).unwrap_err();
            assert!(e.contains(says), "{schema}: {e}");
        }
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
