//! OpenAI's Conversations API (`/v1/conversations` and its items), kept in the server's memory
//! beside the stored responses ([`crate::responses::ResponseStore`]), and `/v1/responses`'
//! `conversation`: a response in a conversation answers after the conversation's items, and
//! its input and output items are added to the conversation once it is over (`completed` or
//! `incomplete`), as OpenAI's are.
//!
//! Decisions:
//! - With `--responses-store N`, the last N conversations created or used are kept (the one
//!   least recently used is forgotten first); with 0, none, and the endpoints and the field
//!   answer a 400 saying how to turn them on. Each replica keeps its own, as for responses.
//! - Items are kept as the Responses API writes them: an input message with an id, `type:
//!   "message"`, `status: "completed"` and its content as parts (`input_text`, or
//!   `output_text` for an assistant's); calls and their outputs as given, with an id. What
//!   `input` refuses, a conversation refuses too, when it is given.
//! - OpenAI's limits: 20 items per request that adds them; `metadata` up to 16 string
//!   values, keys of up to 64 characters and values of up to 512.
//! - `conversation` and `previous_response_id` together are refused, as OpenAI refuses them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use crate::api::ApiError;

/// A conversation: when it was created, its metadata and its items, oldest first.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub created_at: u64,
    pub metadata: Value,
    pub items: Vec<Value>,
}

/// The last `capacity` conversations created or used, by id.
pub struct ConversationStore {
    capacity: usize,
    kept: Mutex<(HashMap<String, Conversation>, VecDeque<String>)>,
}

impl ConversationStore {
    pub fn new(capacity: usize) -> ConversationStore {
        ConversationStore {
            capacity,
            kept: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// A 400 unless conversations are kept (`--responses-store` above 0); each method that
    /// reaches one answers it first.
    fn enabled(&self) -> Result<(), ApiError> {
        match self.capacity {
            0 => Err(ApiError::invalid(
                "conversations are not stored by this server (start it with --responses-store \
                 N to keep the last N)",
                None,
            )),
            _ => Ok(()),
        }
    }

    /// Keeps `c` as `id`, forgetting the least recently used past the capacity.
    pub fn create(&self, id: String, c: Conversation) -> Result<(), ApiError> {
        self.enabled()?;
        let (map, order) = &mut *self.kept.lock().expect("not poisoned");
        map.insert(id.clone(), c);
        order.push_back(id);
        while map.len() > self.capacity {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            map.remove(&oldest);
        }
        Ok(())
    }

    /// `f` of conversation `id`, which becomes the most recently used; a 404 where it is not
    /// kept.
    pub fn with<R>(&self, id: &str, f: impl FnOnce(&mut Conversation) -> R) -> Result<R, ApiError> {
        self.enabled()?;
        let (map, order) = &mut *self.kept.lock().expect("not poisoned");
        let c = map
            .get_mut(id)
            .ok_or_else(|| not_found("Conversation", id))?;
        let r = f(c);
        if order.back().map(String::as_str) != Some(id) {
            order.retain(|k| k != id);
            order.push_back(id.to_owned());
        }
        Ok(r)
    }

    /// Forgets `id`; a 404 where it was not kept.
    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        self.enabled()?;
        let (map, order) = &mut *self.kept.lock().expect("not poisoned");
        map.remove(id)
            .ok_or_else(|| not_found("Conversation", id))?;
        order.retain(|k| k != id);
        Ok(())
    }
}

/// OpenAI's 404 for a missing conversation or item.
pub fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::with_status(
        404,
        "invalid_request_error",
        None,
        format!("{what} with id '{id}' not found."),
    )
}

/// The conversation object.
pub fn object(id: &str, c: &Conversation) -> Value {
    json!({"id": id, "object": "conversation", "created_at": c.created_at,
           "metadata": c.metadata})
}

/// A request's `metadata` (absent: `{}`), checked against OpenAI's limits.
pub fn metadata(req: &Value) -> Result<Value, ApiError> {
    let bad = |why: String| ApiError::invalid(why, Some("metadata"));
    let m = match req.get("metadata") {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("metadata must be an object of strings".into())),
    };
    if m.len() > 16 {
        return Err(bad(format!("metadata holds {} keys; at most 16", m.len())));
    }
    for (k, v) in m {
        match v.as_str() {
            _ if k.chars().count() > 64 => {
                return Err(bad(format!("metadata key {k:?} is over 64 characters")));
            }
            Some(s) if s.chars().count() > 512 => {
                return Err(bad(format!("metadata[{k:?}] is over 512 characters")));
            }
            Some(_) => {}
            None => return Err(bad(format!("metadata[{k:?}] must be a string"))),
        }
    }
    Ok(Value::Object(m.clone()))
}

/// A Responses request's `input` as items (a string is one user message).
pub fn input_items(input: &Value) -> Vec<Value> {
    match input {
        Value::String(s) => vec![json!({"role": "user", "content": s})],
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    }
}

/// `items` (at most 20) as a conversation keeps them, each given an id by `new_id` (of its
/// kind's prefix: `msg`, `fc`, …); a 400 naming `param` for one `input` would refuse.
pub fn stored_items(
    items: &[Value],
    param: &'static str,
    mut new_id: impl FnMut(&str) -> String,
) -> Result<Vec<Value>, ApiError> {
    if items.len() > 20 {
        return Err(ApiError::invalid(
            format!("{} items; at most 20 are added at once", items.len()),
            Some(param),
        ));
    }
    items
        .iter()
        .map(|item| {
            crate::responses::chat_messages(std::slice::from_ref(item)).map_err(|mut e| {
                e.param = Some(param);
                e
            })?;
            let mut kept = item.as_object().cloned().unwrap_or_default();
            let kind = (kept.get("type").and_then(Value::as_str))
                .unwrap_or("message")
                .to_owned();
            if kind == "message" {
                let role = kept["role"].as_str().unwrap_or("user").to_owned();
                let part = match role.as_str() {
                    "assistant" => "output_text",
                    _ => "input_text",
                };
                if let Some(Value::String(text)) = kept.get("content") {
                    let parts = json!([{"type": part, "text": text}]);
                    kept.insert("content".into(), parts);
                }
                kept.entry("status").or_insert(json!("completed"));
            }
            let prefix = match kind.as_str() {
                "message" => "msg",
                "function_call" => "fc",
                "function_call_output" => "fco",
                "reasoning" => "rs",
                _ => "item",
            };
            kept.entry("id").or_insert_with(|| json!(new_id(prefix)));
            kept.insert("type".into(), json!(kind));
            Ok(Value::Object(kept))
        })
        .collect()
}

/// A page of `items` as `GET …/items` lists them: `limit` (1–100, default 20) items in
/// `order` (`desc`, the default, newest first; or `asc`) after the item `after`.
pub fn list(items: &[Value], query: &HashMap<String, String>) -> Result<Value, ApiError> {
    let limit = match query.get("limit") {
        None => 20,
        Some(l) => match l.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => {
                return Err(ApiError::invalid(
                    format!("limit must be 1 to 100, got {l:?}"),
                    Some("limit"),
                ));
            }
        },
    };
    let ordered: Vec<&Value> = match query.get("order").map(String::as_str) {
        None | Some("desc") => items.iter().rev().collect(),
        Some("asc") => items.iter().collect(),
        Some(o) => {
            return Err(ApiError::invalid(
                format!("order must be \"asc\" or \"desc\", got {o:?}"),
                Some("order"),
            ));
        }
    };
    let start = match query.get("after") {
        None => 0,
        Some(after) => match ordered.iter().position(|i| i["id"] == after.as_str()) {
            Some(at) => at + 1,
            None => return Err(not_found("Item", after)),
        },
    };
    let page: Vec<Value> = ordered[start..]
        .iter()
        .take(limit)
        .map(|&i| i.clone())
        .collect();
    let mut out = Map::new();
    out.insert("object".into(), json!("list"));
    out.insert(
        "first_id".into(),
        page.first().map_or(Value::Null, |i| i["id"].clone()),
    );
    out.insert(
        "last_id".into(),
        page.last().map_or(Value::Null, |i| i["id"].clone()),
    );
    out.insert("has_more".into(), json!(start + page.len() < ordered.len()));
    out.insert("data".into(), Value::Array(page));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut(&str) -> String {
        let mut n = 0;
        move |p: &str| {
            n += 1;
            format!("{p}_{n}")
        }
    }

    #[test]
    fn items_are_kept_as_the_responses_api_writes_them() {
        let given = [
            json!({"role": "user", "content": "Hi"}),
            json!({"type": "message", "role": "assistant", "content": "Hello"}),
            json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c1", "output": "3", "id": "mine"}),
        ];
        let kept = stored_items(&given, "items", ids()).unwrap();
        assert_eq!(
            kept,
            [
                json!({"role": "user", "content": [{"type": "input_text", "text": "Hi"}],
                       "status": "completed", "id": "msg_1", "type": "message"}),
                json!({"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": "Hello"}],
                       "status": "completed", "id": "msg_2"}),
                json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}",
                       "id": "fc_3"}),
                json!({"type": "function_call_output", "call_id": "c1", "output": "3",
                       "id": "mine"}),
            ]
        );
        // As input again, they are the conversation they were.
        assert_eq!(
            crate::responses::chat_messages(&kept).unwrap(),
            crate::responses::chat_messages(&given).unwrap()
        );
        let e = stored_items(&[json!({"role": "robot", "content": "x"})], "items", ids());
        assert_eq!(e.unwrap_err().param, Some("items"));
        let many = vec![json!({"role": "user", "content": "x"}); 21];
        assert!(stored_items(&many, "items", ids()).is_err());
    }

    #[test]
    fn items_are_listed_a_page_at_a_time_newest_first() {
        let items: Vec<Value> = (1..=5).map(|i| json!({"id": format!("i{i}")})).collect();
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ids = |v: &Value| -> Vec<String> {
            let data = v["data"].as_array().unwrap();
            data.iter()
                .map(|i| i["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let page = list(&items, &q(&[("limit", "2")])).unwrap();
        assert_eq!(ids(&page), ["i5", "i4"]);
        assert_eq!(
            (page["first_id"].as_str(), page["last_id"].as_str()),
            (Some("i5"), Some("i4"))
        );
        assert_eq!(page["has_more"], true);
        let next = list(&items, &q(&[("limit", "2"), ("after", "i4")])).unwrap();
        assert_eq!(ids(&next), ["i3", "i2"]);
        let asc = list(&items, &q(&[("order", "asc"), ("after", "i3")])).unwrap();
        assert_eq!(ids(&asc), ["i4", "i5"]);
        assert_eq!(asc["has_more"], false);
        assert_eq!(list(&[], &q(&[])).unwrap()["first_id"], Value::Null);
        for bad in [
            &[("limit", "0")][..],
            &[("order", "up")],
            &[("after", "i9")],
        ] {
            assert!(list(&items, &q(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_store_forgets_the_least_recently_used_and_metadata_has_limits() {
        let s = ConversationStore::new(2);
        let c = || Conversation {
            created_at: 0,
            metadata: json!({}),
            items: Vec::new(),
        };
        s.create("a".into(), c()).unwrap();
        s.create("b".into(), c()).unwrap();
        s.with("a", |_| ()).unwrap();
        s.create("c".into(), c()).unwrap();
        assert!(
            s.with("b", |_| ()).is_err(),
            "b was the least recently used"
        );
        assert!(s.with("a", |_| ()).is_ok());
        s.delete("a").unwrap();
        assert_eq!(s.delete("a").unwrap_err().status, 404);
        let none = ConversationStore::new(0);
        assert_eq!(none.create("a".into(), c()).unwrap_err().status, 400);
        assert_eq!(none.with("a", |_| ()).unwrap_err().status, 400, "not a 404");

        assert_eq!(metadata(&json!({})).unwrap(), json!({}));
        assert_eq!(
            metadata(&json!({"metadata": {"k": "v"}})).unwrap(),
            json!({"k": "v"})
        );
        for bad in [json!({"k": 1}), json!({"k": "v".repeat(513)}), json!("x")] {
            assert!(metadata(&json!({"metadata": bad})).is_err(), "{bad}");
        }
    }
}
