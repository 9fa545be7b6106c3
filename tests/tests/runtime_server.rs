//! kandle-runtime's HTTP server, started in-process on a loopback port with real weights
//! (SmolLM2 GGUF for generation, all-MiniLM-L6-v2 for embeddings), driven with a real HTTP client.

use std::time::Duration;

use base64::Engine as _;
use futures::future::join_all;
use kandle_runtime::ServeConfig;
use kandle_runtime::server::{self, Server};
use kandle_runtime::tool_calls::ToolCallParser;
use kandle_tests::{fixtures_dir, models};
use serde_json::{Value, json};

#[path = "support/tekken.rs"]
mod tekken;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1";

async fn serve(configure: impl FnOnce(&mut ServeConfig)) -> (Server, String) {
    let path = tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    serve_model(path, configure).await
}

async fn serve_model(
    path: std::path::PathBuf,
    configure: impl FnOnce(&mut ServeConfig),
) -> (Server, String) {
    let mut cfg = ServeConfig::new(path);
    cfg.max_new_tokens = 64;
    configure(&mut cfg);
    let mut server = server::start(cfg).await.expect("server starts");
    tokio::time::timeout(Duration::from_secs(120), server.wait_loaded())
        .await
        .expect("model loads within 2 minutes")
        .expect("model loads");
    let url = format!("http://{}", server.local_addr());
    (server, url)
}

/// POSTs `body` as JSON and returns the JSON answer, whatever its status.
async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Asserts an OpenAI error body with a message, and returns it.
async fn expect_error(resp: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "{what}: status");
    let body: Value = resp
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: the error body is not JSON: {e}"));
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error.message in {body}"));
    assert!(!msg.is_empty(), "{what}: empty message");
    assert!(
        body["error"]["type"].is_string(),
        "{what}: no error.type in {body}"
    );
    body
}

/// POSTs `body` and asserts a 400 whose OpenAI error names `param`.
async fn expect_refused(http: &reqwest::Client, url: &str, body: &Value, param: &str) {
    let r = http.post(url).json(body).send().await.unwrap();
    let e = expect_error(r, 400, &body.to_string()).await;
    assert_eq!(e["error"]["param"], param, "{e}");
}

fn chat_body(content: &str, extra: Value) -> Value {
    with_fields(
        json!({"model": SMOL, "messages": [{"role": "user", "content": content}]}),
        &extra,
    )
}

/// `base` with the fields of `extra` set (added or replaced).
fn with_fields(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// The server's `kandle_prompt_tokens_cached_total`.
async fn cached_prompt_tokens(http: &reqwest::Client, url: &str) -> f64 {
    gauge(http, url, "kandle_prompt_tokens_cached_total").await
}

/// The token ids the server feeds for `input`: `{"prompt": …}` or `{"messages": […]}`.
async fn token_ids(http: &reqwest::Client, url: &str, input: Value) -> Vec<u32> {
    model_token_ids(http, url, SMOL, input).await
}

/// [`token_ids`] for the server of model `model`.
async fn model_token_ids(http: &reqwest::Client, url: &str, model: &str, input: Value) -> Vec<u32> {
    let mut body = input;
    body["model"] = json!(model);
    let t = post_json(http, &format!("{url}/tokenize"), &body).await;
    t["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("{t}"))
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// A chat answer's content, which ended by itself (`finish_reason: "stop"`).
fn stopped_content(r: &Value) -> String {
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{r}");
    c["message"]["content"].as_str().unwrap().to_owned()
}

/// The content a streamed chat answer's chunks carry, joined.
fn streamed_content(chunks: &[Value]) -> String {
    streamed_field(chunks, "content")
}

/// The text a streamed chat answer's chunks carry in their deltas' `key`, joined.
fn streamed_field(chunks: &[Value], key: &str) -> String {
    (chunks.iter())
        .filter_map(|ch| ch["choices"][0]["delta"][key].as_str())
        .collect()
}

/// The one tool call a streamed chat answer's chunks carry (at index 0).
fn only_streamed_call(chunks: &[Value]) -> &Value {
    let calls = streamed_tool_calls(chunks);
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0]["index"], 0, "{chunks:?}");
    calls[0]
}

/// The tool calls a streamed chat answer's chunks carry.
fn streamed_tool_calls(chunks: &[Value]) -> Vec<&Value> {
    (chunks.iter())
        .filter_map(|ch| ch["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect()
}

/// The one tool call a chat answer made (`finish_reason: "tool_calls"`, no content): its
/// function, and its arguments parsed.
fn only_call(r: &Value) -> (&Value, Value) {
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{r}");
    assert_eq!(c["message"]["content"], Value::Null, "{r}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{r}");
    let f = &calls[0]["function"];
    let args = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    (f, args)
}

/// How many tokens `a` and `b` start with in common.
fn shared_start(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// POSTs `body` (a streamed request) and returns its SSE payloads, checking the status is 200
/// and the stream ends with [DONE].
async fn post_stream(http: &reqwest::Client, url: &str, body: &Value) -> Vec<Value> {
    let r = http.post(url).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{body}");
    sse_payloads(&r.text().await.unwrap())
}

/// Parses an SSE body into its JSON payloads, checking that it ends with [DONE].
fn sse_payloads(text: &str) -> Vec<Value> {
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        data.last().copied(),
        Some("[DONE]"),
        "stream does not end with [DONE]: {text}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "sk-right\n").unwrap();
    let (server, url) = serve(|c| c.api_key_file = Some(key_file.clone())).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let post = |body: Vec<u8>| {
        http.post(&chat)
            .bearer_auth("sk-right")
            .header("content-type", "application/json")
            .body(body)
    };
    let ok = || async {
        let r = http
            .get(format!("{url}/v1/models"))
            .bearer_auth("sk-right")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the server stopped serving");
        let models: Value = r.json().await.unwrap();
        assert_eq!(models["data"][0]["id"], SMOL);
    };

    let r = http
        .post(&chat)
        .json(&chat_body("hi", json!({})))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "missing API key").await;
    ok().await;
    let r = http
        .post(&chat)
        .bearer_auth("sk-wrong")
        .json(&chat_body("hi", json!({})))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "wrong API key").await;
    ok().await;

    let long = "hello ".repeat(9000);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"model\": ".to_vec(), 400),
        ("messages of the wrong type", br#"{"model":"SmolLM2-135M-Instruct.Q4_1","messages":"hi"}"#.to_vec(), 400),
        ("max_tokens of the wrong type", chat_body("hi", json!({"max_tokens": "ten"})).to_string().into_bytes(), 400),
        ("unknown model", json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}).to_string().into_bytes(), 404),
        ("empty messages", json!({"model": SMOL, "messages": []}).to_string().into_bytes(), 400),
        ("max_tokens 0", chat_body("hi", json!({"max_tokens": 0})).to_string().into_bytes(), 400),
        ("max_tokens -5", chat_body("hi", json!({"max_tokens": -5})).to_string().into_bytes(), 400),
        ("max_tokens over the limit", chat_body("hi", json!({"max_tokens": 100000})).to_string().into_bytes(), 400),
        ("temperature out of range", chat_body("hi", json!({"temperature": 9})).to_string().into_bytes(), 400),
        ("prompt longer than the context", chat_body(&long, json!({})).to_string().into_bytes(), 400),
        ("invalid UTF-8", b"{\"model\":\"SmolLM2-135M-Instruct.Q4_1\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(), 400),
    ];
    for (what, body, status) in cases {
        let r = post(body).send().await.unwrap();
        let b = expect_error(r, status, what).await;
        if what == "prompt longer than the context" {
            assert_eq!(b["error"]["code"], "context_length_exceeded");
        }
        ok().await;
    }
    // 10 MB: refused from its Content-Length, before the body is read. Sent by hand: an HTTP
    // client streaming the body races the early 413 (the server may close while it writes).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer sk-right\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            10 * 1024 * 1024
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
                .await
                .expect("an answer before the body is sent")
                .unwrap();
            assert!(n > 0, "connection closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(text.starts_with("HTTP/1.1 413"), "10 MB body: {text}");
        let (head, _) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a Content-Length on the 413");
        while answer.len() < head.len() + 4 + length {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed mid-body");
            answer.extend_from_slice(&buf[..n]);
        }
        let body: Value = serde_json::from_slice(&answer[head.len() + 4..]).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    ok().await;
    // Embeddings from a generation model.
    let r = http
        .post(format!("{url}/v1/embeddings"))
        .bearer_auth("sk-right")
        .json(&json!({"model": SMOL, "input": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "embeddings from a generation model").await;

    // And a valid request still works.
    let r = http
        .post(&chat)
        .bearer_auth("sk-right")
        .json(&chat_body(
            "Say hi",
            json!({"max_tokens": 4, "temperature": 0}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["usage"]["completion_tokens"], 4);
    assert_eq!(b["choices"][0]["finish_reason"], "length");
    // /health, /ready and /metrics need no key.
    assert_eq!(
        http.get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{url}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "kandle_requests_total",
        "kandle_request_duration_seconds",
        "kandle_time_to_first_token_seconds",
        "kandle_inter_token_latency_seconds",
        "kandle_generated_tokens_total",
        "kandle_prompt_tokens_total",
        "kandle_queue_depth",
        "kandle_inflight_requests",
        "kandle_batch_size",
        "kandle_model_load_seconds",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert!(metrics.contains("status=\"401\""), "401s are counted");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_repeats_and_streamed_output_equals_non_streamed() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let params = json!({"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 1234,
                        "frequency_penalty": 0.3, "logprobs": true, "top_logprobs": 3});
    let body = chat_body("Tell me a story about a dragon.", params.clone());
    let once = || async {
        http.post(&chat)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let a = once().await;
    let b = once().await;
    let text_a = a["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!text_a.is_empty());
    assert_eq!(
        a["choices"][0]["message"], b["choices"][0]["message"],
        "the same seed gave different text"
    );
    assert_eq!(a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]);
    let lp = a["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        a["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 3);

    let mut other = body.clone();
    other["seed"] = json!(999);
    let c = http
        .post(&chat)
        .json(&other)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_ne!(
        c["choices"][0]["message"]["content"], a["choices"][0]["message"]["content"],
        "another seed gave the same text"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = http.post(&chat).json(&streamed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let chunks = sse_payloads(&r.text().await.unwrap());
    let mut text = String::new();
    let mut finish = None;
    let mut n_logprobs = 0;
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        if let Some(choice) = ch["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(l) = choice["logprobs"]["content"].as_array() {
                n_logprobs += l.len();
            }
            if !choice["finish_reason"].is_null() {
                finish = Some(choice["finish_reason"].clone());
            }
        }
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(text, text_a, "streamed text differs from non-streamed");
    assert_eq!(finish.unwrap(), a["choices"][0]["finish_reason"]);
    assert_eq!(n_logprobs, lp.len());
    assert_eq!(chunks.last().unwrap()["usage"], a["usage"]);

    // The legacy completions endpoint, greedy: streamed == non-streamed as well.
    let comp = format!("{url}/v1/completions");
    let cbody = json!({"model": SMOL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2});
    let full: Value = post_json(&http, &comp, &cbody).await;
    assert_eq!(full["object"], "text_completion");
    assert_eq!(full["usage"]["prompt_tokens"], 4);
    let mut sbody = cbody.clone();
    sbody["stream"] = json!(true);
    let chunks = sse_payloads(
        &http
            .post(&comp)
            .json(&sbody)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let stext: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(stext, full["choices"][0]["text"].as_str().unwrap());
    assert_eq!(
        full["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `n` choices: choice `i` is what one request with the seed plus `i` gives; streamed, the
/// chunks carry their choice's index and add up to the non-streamed choices; usage counts the
/// prompt once and every choice's tokens; an `n` out of range is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_the_requests_with_successive_seeds_streamed_or_not() {
    let (server, url) = serve(|c| {
        c.max_batch_size = 4;
        c.max_queue = 2;
    })
    .await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let params = json!({"max_tokens": 10, "temperature": 1.0, "top_p": 0.95, "seed": 40,
                        "logprobs": true, "top_logprobs": 2});
    let body = |extra: Value| {
        with_fields(
            chat_body("Write a line about the sea.", params.clone()),
            &extra,
        )
    };
    let cached = || cached_prompt_tokens(&http, &url);
    let before = cached().await;
    let three = post_json(&http, &chat, &body(json!({"n": 3}))).await;
    // The prompt was computed once: the two other choices copied it.
    assert_eq!(
        cached().await - before,
        2.0 * three["usage"]["prompt_tokens"].as_f64().unwrap(),
        "{three}"
    );
    let choices = three["choices"]
        .as_array()
        .unwrap_or_else(|| panic!("{three}"));
    assert_eq!(choices.len(), 3);
    let mut completion_tokens = 0;
    let mut texts = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let alone = post_json(&http, &chat, &body(json!({"seed": 40 + i}))).await;
        assert_eq!(c["message"], alone["choices"][0]["message"], "choice {i}");
        assert_eq!(c["logprobs"], alone["choices"][0]["logprobs"], "choice {i}");
        assert_eq!(c["finish_reason"], alone["choices"][0]["finish_reason"]);
        assert_eq!(
            three["usage"]["prompt_tokens"],
            alone["usage"]["prompt_tokens"]
        );
        completion_tokens += alone["usage"]["completion_tokens"].as_u64().unwrap();
        texts.push(c["message"]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(three["usage"]["completion_tokens"], completion_tokens);
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "three seeds, one text: {texts:?}"
    );

    let r = http
        .post(&chat)
        .json(&body(
            json!({"n": 3, "stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let chunks = sse_payloads(&r.text().await.unwrap());
    let mut streamed = vec![String::new(); 3];
    let mut finishes = vec![Vec::new(); 3];
    let mut roles = vec![0; 3];
    for ch in &chunks[..chunks.len() - 1] {
        let c = &ch["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        streamed[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        roles[i] += (c["delta"]["role"] == "assistant") as usize;
        if !c["finish_reason"].is_null() {
            finishes[i].push(c["finish_reason"].clone());
        }
    }
    assert_eq!(streamed, texts, "streamed choices differ from non-streamed");
    assert_eq!(roles, vec![1, 1, 1]);
    for (i, f) in finishes.iter().enumerate() {
        assert_eq!(f, &vec![choices[i]["finish_reason"].clone()], "choice {i}");
    }
    assert_eq!(chunks.last().unwrap()["usage"], three["usage"]);

    // Completions, greedy: every choice is the greedy text.
    let comp = format!("{url}/v1/completions");
    let cbody =
        json!({"model": SMOL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0});
    let one = post_json(&http, &comp, &cbody).await;
    let mut two = cbody.clone();
    two["n"] = json!(2);
    let two = post_json(&http, &comp, &two).await;
    for i in 0..2 {
        assert_eq!(two["choices"][i]["index"], i);
        assert_eq!(two["choices"][i]["text"], one["choices"][0]["text"]);
    }
    assert_eq!(two["usage"]["completion_tokens"], 12);

    for n in [0, 17, 7] {
        let r = http
            .post(&chat)
            .json(&body(json!({"n": n})))
            .send()
            .await
            .unwrap();
        let e = expect_error(r, 400, &format!("n = {n}")).await;
        assert_eq!(e["error"]["param"], "n", "{e}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A completions request may hold several prompts (OpenAI's batch of prompts), as strings or
/// as token ids: choice `j` of prompt `i` has the index `i · n + j` and is exactly what that
/// prompt alone gives with the same fields; usage counts each prompt once. Streamed, the same
/// texts come under the same indices. Bad lists are refused naming `prompt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completions_request_of_several_prompts_answers_each_as_alone() {
    let (server, url) = serve(|c| {
        c.max_batch_size = 4;
        c.max_queue = 2;
    })
    .await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let texts = [
        "Once upon a time",
        "The capital of Japan",
        "def fibonacci(n):",
    ];
    let body = |prompt: Value, extra: Value| {
        with_fields(
            json!({"model": SMOL, "prompt": prompt, "max_tokens": 8, "temperature": 1.0,
                   "seed": 7, "logprobs": 2, "n": 2}),
            &extra,
        )
    };
    let batch = post_json(&http, &comp, &body(json!(texts), json!({}))).await;
    let choices = batch["choices"]
        .as_array()
        .unwrap_or_else(|| panic!("{batch}"));
    assert_eq!(choices.len(), 6, "{batch}");
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut by_index = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let alone = post_json(&http, &comp, &body(json!(text), json!({}))).await;
        for j in 0..2 {
            let (b, a) = (&choices[2 * i + j], &alone["choices"][j]);
            assert_eq!(b["index"], 2 * i + j, "{batch}");
            for field in ["text", "logprobs", "finish_reason"] {
                assert_eq!(b[field], a[field], "prompt {i}, choice {j}: {field}");
            }
            by_index.push(b["text"].as_str().unwrap().to_owned());
        }
        prompt_tokens += alone["usage"]["prompt_tokens"].as_u64().unwrap();
        completion_tokens += alone["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(batch["usage"]["prompt_tokens"], prompt_tokens, "{batch}");
    assert_eq!(batch["usage"]["completion_tokens"], completion_tokens);
    assert_ne!(
        by_index[0], by_index[2],
        "two prompts, one text: {by_index:?}"
    );

    // Token ids: the ids each text is tokenised to give its choices; one list of ids is
    // one prompt.
    let mut ids = Vec::new();
    for text in texts {
        ids.push(token_ids(&http, &url, json!({"prompt": text})).await);
    }
    let as_ids = post_json(&http, &comp, &body(json!(ids), json!({}))).await;
    assert_eq!(as_ids["choices"], batch["choices"], "{as_ids}");
    assert_eq!(as_ids["usage"], batch["usage"]);
    let one = post_json(&http, &comp, &body(json!(ids[1]), json!({}))).await;
    assert_eq!(one["choices"][1]["text"], json!(by_index[3]), "{one}");

    let streamed_body = body(
        json!(texts),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let chunks = post_stream(&http, &comp, &streamed_body).await;
    let mut streamed = vec![String::new(); 6];
    for ch in &chunks[..chunks.len() - 1] {
        let c = &ch["choices"][0];
        streamed[c["index"].as_u64().unwrap() as usize].push_str(c["text"].as_str().unwrap());
    }
    assert_eq!(
        streamed, by_index,
        "streamed choices differ from non-streamed"
    );
    assert_eq!(chunks.last().unwrap()["usage"], batch["usage"]);

    // Refused whole: more sequences than the batch and queue hold (4 × 2 > 6), an empty
    // list, an empty prompt, an id outside the vocabulary, a list of mixed kinds.
    let bad = [
        (json!(["a", "b", "c", "d"]), "6"),
        (json!([]), "empty"),
        (json!([[]]), "empty"),
        (
            json!([ids[0].clone(), vec![49152]]),
            "outside the vocabulary",
        ),
        (json!([1, "a"]), "list of token ids"),
    ];
    for (prompt, says) in bad {
        let r = http
            .post(&comp)
            .json(&body(prompt.clone(), json!({})))
            .send()
            .await
            .unwrap();
        let e = expect_error(r, 400, &format!("prompt {prompt}")).await;
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(says) && msg.contains("prompt"),
            "{prompt}: {e}"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `echo` puts each prompt before its choices. With `logprobs`, the prompt's tokens open the
/// legacy logprobs object: the first with `null`, each other with the log-probability and
/// alternatives that a request ending just before it reports for its next token, bit for bit
/// (what lm-eval-harness's loglikelihood tasks read). Streamed, the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_puts_the_prompt_and_its_log_probabilities_before_the_completion() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let text = "The capital of France is Paris, and the capital of Japan is";
    let ids = token_ids(&http, &url, json!({"prompt": text})).await;
    let body = |prompt: Value, extra: Value| {
        with_fields(
            json!({"model": SMOL, "prompt": prompt, "max_tokens": 3, "temperature": 0}),
            &extra,
        )
    };
    let plain = post_json(&http, &comp, &body(json!(text), json!({"logprobs": 4}))).await;
    let echoed = post_json(
        &http,
        &comp,
        &body(json!(text), json!({"logprobs": 4, "echo": true})),
    )
    .await;
    let (p, e) = (&plain["choices"][0], &echoed["choices"][0]);
    assert_eq!(
        e["text"].as_str().unwrap(),
        format!("{text}{}", p["text"].as_str().unwrap()),
        "{echoed}"
    );
    assert_eq!(echoed["usage"], plain["usage"]);
    let (lp, plp) = (&e["logprobs"], &p["logprobs"]);
    let m = ids.len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), m + 3, "{lp}");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    let prompt_tokens: Vec<&str> = lp["tokens"].as_array().unwrap()[..m]
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        prompt_tokens.concat(),
        text,
        "the prompt's tokens, in order"
    );
    for k in 1..m {
        let alone = post_json(
            &http,
            &comp,
            &body(json!(ids[..k]), json!({"max_tokens": 1, "logprobs": 4})),
        )
        .await;
        let top = &alone["choices"][0]["logprobs"]["top_logprobs"][0];
        assert_eq!(
            &lp["top_logprobs"][k], top,
            "prompt token {k}: alternatives"
        );
        let (token, logprob) = (&lp["tokens"][k], lp["token_logprobs"][k].as_f64().unwrap());
        match top.get(token.as_str().unwrap()) {
            Some(v) => assert_eq!(v.as_f64().unwrap(), logprob, "prompt token {k}"),
            None => assert!(
                top.as_object()
                    .unwrap()
                    .values()
                    .all(|v| v.as_f64().unwrap() >= logprob),
                "prompt token {k} ({token}) at {logprob} is missing from {top}"
            ),
        }
    }
    // The completion's part is the plain request's, its offsets after the prompt's text.
    for field in ["tokens", "token_logprobs", "top_logprobs"] {
        assert_eq!(
            lp[field].as_array().unwrap()[m..],
            plp[field].as_array().unwrap()[..],
            "{field}"
        );
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets[..m].windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert_eq!(offsets[m], text.len() as u64, "{offsets:?}");

    // Streamed: the prompt first, then the same tokens.
    let streamed_body = body(
        json!(text),
        json!({"logprobs": 4, "echo": true, "stream": true}),
    );
    let chunks = post_stream(&http, &comp, &streamed_body).await;
    let (mut streamed, mut tokens) = (String::new(), Vec::new());
    for ch in &chunks {
        let c = &ch["choices"][0];
        streamed.push_str(c["text"].as_str().unwrap());
        if let Some(t) = c["logprobs"]["tokens"].as_array() {
            tokens.extend(t.iter().cloned());
        }
    }
    assert_eq!(chunks[0]["choices"][0]["text"], text);
    assert_eq!(streamed, e["text"].as_str().unwrap());
    assert_eq!(Value::Array(tokens), lp["tokens"]);

    // Each prompt of a list before each of its choices; token ids decoded.
    let two = post_json(
        &http,
        &comp,
        &body(
            json!([ids.clone(), ids[..4].to_vec()]),
            json!({"echo": true, "n": 2}),
        ),
    )
    .await;
    let short = post_json(
        &http,
        &format!("{url}/detokenize"),
        &json!({"model": SMOL, "tokens": ids[..4]}),
    )
    .await;
    for (i, c) in two["choices"].as_array().unwrap().iter().enumerate() {
        let before = if i < 2 {
            text
        } else {
            short["prompt"].as_str().unwrap()
        };
        assert!(
            c["text"].as_str().unwrap().starts_with(before),
            "choice {i}: {two}"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `/tokenize` counts what completions and chat feed the model (their `usage.prompt_tokens`),
/// `/detokenize` gives the text back, and bad input is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_counts_what_the_endpoints_feed_and_detokenize_inverts_it() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let tok = format!("{url}/tokenize");
    let detok = format!("{url}/detokenize");
    let text = "Once upon a time, in a kingdom by the sea";
    let t = post_json(&http, &tok, &json!({"model": SMOL, "prompt": text})).await;
    let comp = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &json!({"model": SMOL, "prompt": text, "max_tokens": 1}),
    )
    .await;
    assert_eq!(t["count"], comp["usage"]["prompt_tokens"], "{t}");
    assert_eq!(
        t["tokens"].as_array().unwrap().len() as u64,
        t["count"].as_u64().unwrap()
    );
    assert!(
        t["max_model_len"].as_u64().unwrap() > t["count"].as_u64().unwrap(),
        "{t}"
    );
    let models: Value = http
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["max_model_len"], t["max_model_len"]);
    // OpenAI's retrieve-model: the same object, or a 404 naming the served model.
    let one = http
        .get(format!("{url}/v1/models/{SMOL}"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.unwrap(), models["data"][0]);
    let r = http
        .get(format!("{url}/v1/models/org/other"))
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 404, "an unknown model").await;
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("org/other"),
        "{e}"
    );
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]);
    let t = post_json(&http, &tok, &json!({"model": SMOL, "messages": messages})).await;
    let chat = post_json(
        &http,
        &format!("{url}/v1/chat/completions"),
        &json!({"model": SMOL, "messages": messages, "max_tokens": 1}),
    )
    .await;
    assert_eq!(t["count"], chat["usage"]["prompt_tokens"], "{t}");
    let back = post_json(
        &http,
        &detok,
        &json!({"model": SMOL, "tokens": t["tokens"]}),
    )
    .await;
    let rendered = back["prompt"].as_str().unwrap();
    assert!(
        rendered.starts_with("<|im_start|>system\nBe brief.<|im_end|>")
            && rendered.ends_with("<|im_start|>assistant\n"),
        "{rendered:?}"
    );
    let plain = post_json(
        &http,
        &tok,
        &json!({"model": SMOL, "prompt": text, "add_special_tokens": false}),
    )
    .await;
    let back = post_json(
        &http,
        &detok,
        &json!({"model": SMOL, "tokens": plain["tokens"]}),
    )
    .await;
    assert_eq!(back["prompt"], text);
    let empty = post_json(&http, &detok, &json!({"model": SMOL, "tokens": []})).await;
    assert_eq!(empty["prompt"], "");
    for (at, body, status, param) in [
        (&tok, json!({"model": SMOL}), 400, "prompt"),
        (
            &tok,
            json!({"model": SMOL, "prompt": "a", "messages": messages}),
            400,
            "prompt",
        ),
        (
            &tok,
            json!({"model": SMOL, "messages": []}),
            400,
            "messages",
        ),
        (&tok, json!({"model": "other", "prompt": "a"}), 404, "model"),
        (
            &detok,
            json!({"model": SMOL, "tokens": [1, 49152]}),
            400,
            "tokens",
        ),
        (&detok, json!({"model": SMOL, "tokens": [-1]}), 400, ""),
    ] {
        let r = http.post(at).json(&body).send().await.unwrap();
        let e = expect_error(r, status, &body.to_string()).await;
        if !param.is_empty() {
            assert_eq!(e["error"]["param"], param, "{body}: {e}");
        }
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The prefix cache: a conversation's next turn continues the kept keys and values of the
/// turn before, and another question after the same system prompt continues the start it
/// shares with a kept prompt (`kandle_prompt_tokens_cached_total` counts them); every answer
/// is the one a server without the cache gives, logprobs to the last bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_next_turn_continues_the_cached_prompt_with_the_same_answers() {
    let (cached_server, cached_url) = serve(|c| c.prefix_cache_tokens = Some(4096)).await;
    let (plain_server, plain_url) = serve(|c| c.prefix_cache_tokens = Some(0)).await;
    let http = client();
    let turn1 = json!([{"role": "system", "content": "You answer in one sentence."},
                       {"role": "user", "content": "What is the capital of France?"}]);
    let mut turn2 = turn1.as_array().unwrap().clone();
    turn2.push(json!({"role": "assistant", "content": "Paris."}));
    turn2.push(json!({"role": "user", "content": "And of Italy?"}));
    let mut turn3 = turn2.clone();
    turn3.push(json!({"role": "assistant", "content": "Rome."}));
    turn3.push(json!({"role": "user", "content": "And of Spain?"}));
    let other = json!([{"role": "system", "content": "You answer in one sentence."},
                       {"role": "user", "content": "What is the capital of Peru?"}]);
    let ask = |url: &str, messages: &Value| {
        let http = http.clone();
        let url = format!("{url}/v1/chat/completions");
        let body = json!({"model": SMOL, "messages": messages, "max_tokens": 8, "temperature": 0,
                          "logprobs": true, "top_logprobs": 3});
        async move { post_json(&http, &url, &body).await }
    };
    let tokens = |messages: &Value| {
        let http = http.clone();
        let url = format!("{cached_url}/tokenize");
        let body = json!({"model": SMOL, "messages": messages});
        async move { post_json(&http, &url, &body).await["tokens"].clone() }
    };
    let cached = || cached_prompt_tokens(&http, &cached_url);
    let start = cached().await;
    let mut seen = Vec::new();
    for (what, messages) in [
        ("turn 2", &json!(turn2)),
        ("turn 2 again", &json!(turn2)),
        ("turn 1", &turn1),
        ("turn 3", &json!(turn3)),
        ("another question", &other),
    ] {
        let before = cached().await;
        let a = ask(&cached_url, messages).await;
        let b = ask(&plain_url, messages).await;
        assert_eq!(
            a["choices"], b["choices"],
            "{what}: the cache changed the answer"
        );
        assert_eq!(a["usage"], b["usage"], "{what}");
        seen.push((what, cached().await - before));
    }
    let turn1_ids = tokens(&turn1).await;
    let turn2_len = tokens(&json!(turn2)).await.as_array().unwrap().len() as f64;
    let turn1_len = turn1_ids.as_array().unwrap().len() as f64;
    let other_ids = tokens(&other).await;
    let shared = turn1_ids
        .as_array()
        .unwrap()
        .iter()
        .zip(other_ids.as_array().unwrap())
        .take_while(|(a, b)| a == b)
        .count() as f64;
    assert!(
        shared >= 16.0,
        "system prompt and template: {shared} tokens"
    );
    // Turn 2 again is turn 2's prompt whole; turn 1 is the start of turn 2, all of it but
    // the last token (whose logits it needs); turn 3 continues turn 2; the other question
    // shares the system prompt and "What is the capital of" with them.
    assert_eq!(
        seen,
        vec![
            ("turn 2", 0.0),
            ("turn 2 again", turn2_len),
            ("turn 1", turn1_len - 1.0),
            ("turn 3", turn2_len),
            ("another question", shared)
        ],
        "cached tokens per request (from {start})"
    );
    cached_server
        .shutdown(Duration::from_secs(5))
        .await
        .unwrap();
    plain_server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The prefix cache's budget counts the keys and values its prompts hold, a start they share
/// once: three questions after one long system prompt share its first chunks of the GGUF
/// cache (128 positions each) and each hold one of their own, 5 × 128 = 640 positions, which a
/// budget of 700 keeps, though their lengths add up to more than 800. All three are then
/// continued whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_sharing_a_system_prompt_count_it_once_against_the_prefix_cache_budget() {
    let (server, url) = serve(|c| c.prefix_cache_tokens = Some(700)).await;
    let http = client();
    let system = "You are a careful assistant for a travel agency. ".repeat(26);
    let messages = |q: &str| {
        json!([{"role": "system", "content": system},
               {"role": "user", "content": format!("What is the capital of {q}?")}])
    };
    let countries = ["France", "Peru", "Japan"];
    let mut prompts = Vec::new();
    for q in countries {
        prompts.push(token_ids(&http, &url, json!({"messages": messages(q)})).await);
    }
    let shared = shared_start(&prompts[0], &prompts[1]);
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(
        shared > 256 && lens.iter().all(|&l| l <= 384) && lens.iter().sum::<usize>() > 800,
        "the prompts must share more than two chunks, fit in three, and pass 800 tokens \
         together: shared {shared}, lengths {lens:?}"
    );
    let ask = |q: &str| {
        let (http, url) = (http.clone(), format!("{url}/v1/chat/completions"));
        let body = json!({"model": SMOL, "messages": messages(q), "max_tokens": 2,
                          "temperature": 0});
        async move { post_json(&http, &url, &body).await }
    };
    for q in countries {
        let a = ask(q).await;
        assert_eq!(a["usage"]["completion_tokens"], 2, "{q}: {a}");
    }
    assert_eq!(
        gauge(&http, &url, "kandle_prefix_cache_positions").await,
        640.0,
        "three prompts on two shared chunks and one of their own each"
    );
    for (q, len) in countries.iter().zip(&lens) {
        let before = cached_prompt_tokens(&http, &url).await;
        ask(q).await;
        let cached = cached_prompt_tokens(&http, &url).await - before;
        assert_eq!(cached, *len as f64, "{q}: its whole prompt, kept");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Requests that share a long start and arrive together (queued while the model is busy)
/// compute that start once: the first computes it, the others wait a round and continue from
/// its kept copy (`kandle_prompt_tokens_cached_total` grows by the start each shares with it),
/// and every answer is the one a server without the cache gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_with_one_long_start_compute_it_once() {
    let (server, url) = serve(|c| c.prefix_cache_tokens = Some(4096)).await;
    let (plain, plain_url) = serve(|c| c.prefix_cache_tokens = Some(0)).await;
    let http = client();
    let system = "You are a careful assistant for a travel agency. ".repeat(8);
    let prompts: Vec<String> = ["France", "Peru", "Japan"]
        .iter()
        .map(|c| format!("{system}Question: what is the capital of {c}? Answer:"))
        .collect();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(token_ids(&http, &url, json!({"prompt": p})).await);
    }
    let (s2, s3) = (
        shared_start(&ids[0], &ids[1]),
        shared_start(&ids[0], &ids[2]),
    );
    assert!(s2 >= 16 && s3 >= 16, "shared starts {s2}, {s3}");
    let complete = |url: String, prompt: String, max_tokens: u32| {
        let http = http.clone();
        async move {
            let body = json!({"model": SMOL, "prompt": prompt, "max_tokens": max_tokens,
                              "temperature": 0, "logprobs": 2});
            post_json(&http, &format!("{url}/v1/completions"), &body).await
        }
    };
    // A long prompt of its own keeps the model busy while the three arrive.
    let busy = tokio::spawn(complete(
        url.clone(),
        "Tell me a long story about a dragon and a knight. ".repeat(40),
        1,
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cached_prompt_tokens(&http, &url).await;
    let answers = join_all(prompts.iter().map(|p| complete(url.clone(), p.clone(), 4))).await;
    let cached = cached_prompt_tokens(&http, &url).await - before;
    busy.await.unwrap();
    assert_eq!(
        cached,
        (s2 + s3) as f64,
        "the second and third continue the first's start"
    );
    for (p, a) in prompts.iter().zip(&answers) {
        let b = complete(plain_url.clone(), p.clone(), 4).await;
        assert_eq!(
            a["choices"], b["choices"],
            "{p}: the cache changed the answer"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    plain.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A prompt longer than a round's part is computed over several rounds (512 tokens each,
/// `kandle_step_tokens` counts them), and its answer has the bits of the prompt fed at once
/// in process: the logprob of the greedy first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_computed_in_parts_with_the_bits_of_one_pass() {
    let (server, url) = serve(|c| c.prefix_cache_tokens = Some(0)).await;
    let http = client();
    let prompt = "The history of the Roman Empire spans many centuries. ".repeat(110);
    let ids = token_ids(&http, &url, json!({"prompt": prompt})).await;
    assert!(ids.len() > 2 * 512, "{} tokens", ids.len());
    let (count, sum) = (
        gauge(&http, &url, "kandle_step_tokens_count").await,
        gauge(&http, &url, "kandle_step_tokens_sum").await,
    );
    let body = json!({"model": SMOL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                      "logprobs": 1});
    let answer = post_json(&http, &format!("{url}/v1/completions"), &body).await;
    assert_eq!(
        gauge(&http, &url, "kandle_step_tokens_count").await - count,
        ids.len().div_ceil(512) as f64,
        "steps"
    );
    assert_eq!(
        gauge(&http, &url, "kandle_step_tokens_sum").await - sum,
        ids.len() as f64,
        "tokens"
    );
    let got = answer["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap_or_else(|| panic!("{answer}")) as f32;
    let g = match kandle_runtime::backend::load(&kandle_runtime::backend::LoadOptions {
        path: models::smollm2_gguf(),
        ..Default::default()
    })
    .unwrap()
    {
        kandle_runtime::model::LoadedModel::Generation(g) => g,
        _ => unreachable!("SmolLM2 generates"),
    };
    let logits = g.lm.new_sequence().unwrap().feed(&ids).unwrap();
    let want = kandle_runtime::sampling::log_softmax(&logits);
    let best = kandle_runtime::sampling::argmax(&logits) as usize;
    assert_eq!(
        got.to_bits(),
        want[best].to_bits(),
        "{got} against {}",
        want[best]
    );
    // Two choices of it: computed once (the second waits for the first and copies it).
    let sum = gauge(&http, &url, "kandle_step_tokens_sum").await;
    let mut body = body;
    body["n"] = json!(2);
    let answer = post_json(&http, &format!("{url}/v1/completions"), &body).await;
    assert_eq!(
        gauge(&http, &url, "kandle_step_tokens_sum").await - sum,
        ids.len() as f64,
        "two choices, one prompt computed"
    );
    for c in answer["choices"].as_array().unwrap() {
        let lp = c["logprobs"]["token_logprobs"][0].as_f64().unwrap() as f32;
        assert_eq!(lp.to_bits(), got.to_bits(), "{c}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The server's warm-up request (run before `/ready`) is not counted: a fresh server's
/// token counters, step and latency histograms and prefix cache are empty, and the first
/// request is the first counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_up_is_not_counted_in_the_metrics() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let names = [
        "kandle_prompt_tokens_total",
        "kandle_generated_tokens_total",
        "kandle_time_to_first_token_seconds_count",
        "kandle_step_tokens_count",
        "kandle_prefix_cache_positions",
    ];
    for name in names {
        assert_eq!(
            gauge(&http, &url, name).await,
            0.0,
            "{name} after the warm-up"
        );
    }
    let body = json!({"model": SMOL, "prompt": "Once upon a time", "max_tokens": 3,
                      "temperature": 0});
    let a = post_json(&http, &format!("{url}/v1/completions"), &body).await;
    let generated = a["usage"]["completion_tokens"].as_f64().unwrap();
    assert_eq!(
        gauge(&http, &url, "kandle_generated_tokens_total").await,
        generated
    );
    assert_eq!(
        gauge(&http, &url, "kandle_prompt_tokens_total").await,
        a["usage"]["prompt_tokens"].as_f64().unwrap()
    );
    for name in &names[2..] {
        assert!(
            gauge(&http, &url, name).await > 0.0,
            "{name} after a request"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Every answer carries an `X-Request-Id`: the client's when it sent a plausible one, else a
/// new one per request, errors and streams included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_request_id_given_or_a_new_one() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let body = chat_body("hi", json!({"max_tokens": 2, "temperature": 0}));
    let r = http
        .post(&chat)
        .header("x-request-id", "client-7f3a")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), id_of(&r)),
        (200, Some("client-7f3a".to_string()))
    );
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = http
        .post(&chat)
        .header("x-request-id", "s-1")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&r).as_deref(), Some("s-1"));
    r.text().await.unwrap();
    let r = http
        .post(&chat)
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let a = id_of(&r).expect("an id on an error");
    let r = http.get(format!("{url}/health")).send().await.unwrap();
    let b = id_of(&r).expect("an id on /health");
    assert!(a != b && !a.is_empty(), "{a} {b}");
    // Not plausible as an id: replaced.
    for bad in ["x".repeat(129), "has space".to_string()] {
        let r = http
            .post(&chat)
            .header("x-request-id", &bad)
            .json(&body)
            .send()
            .await
            .unwrap();
        let got = id_of(&r).unwrap();
        assert!(got != bad && !got.is_empty(), "{got:?}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `logit_bias` over HTTP with SmolLM2: banning the greedy first token (taken from the model
/// itself) makes the runner-up come first; +100 on a token makes every sampled token that
/// one; `min_p` 1 samples greedily; a bias naming a token outside the vocabulary, and the fields kandle does not implement
/// (tools, JSON mode, insertion), are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_and_min_p_shape_the_draw_and_unimplemented_fields_are_refused() {
    use kandle_runtime::backend::{self, LoadOptions, WeightDtype};
    use kandle_runtime::model::LoadedModel;
    let path = tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    let g = match backend::load(&LoadOptions {
        path: path.clone(),
        task: None,
        dtype: WeightDtype::Auto,
        ..Default::default()
    })
    .unwrap()
    {
        LoadedModel::Generation(g) => g,
        other => panic!("SmolLM2 loaded as a {:?} model", other.task()),
    };
    let prompt = "Once upon a time";
    let ids = g.tokenizer.encode(prompt, true).unwrap();
    let logits = g.lm.new_sequence().unwrap().feed(&ids).unwrap();
    let mut ranked: Vec<u32> = (0..logits.len() as u32).collect();
    ranked.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let (first, second) = (ranked[0], ranked[1]);
    let dragon = g.tokenizer.encode(" dragon", false).unwrap()[0];

    let (server, url) = serve_model(path, |_| {}).await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let text = |v: &Value| {
        v["choices"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned()
    };
    let body = |extra: Value| {
        with_fields(
            json!({"model": SMOL, "prompt": prompt, "max_tokens": 3, "temperature": 0}),
            &extra,
        )
    };
    let plain = text(&post_json(&http, &comp, &body(json!({}))).await);
    // min_p 1 keeps only the most likely token: sampling at any temperature is greedy.
    let narrow = post_json(
        &http,
        &comp,
        &body(json!({"temperature": 1.5, "min_p": 1.0, "seed": 3})),
    )
    .await;
    assert_eq!(text(&narrow), plain, "min_p 1 at temperature 1.5");
    let first_text = g.tokenizer.decode(&[first], false).unwrap();
    assert!(
        plain.starts_with(&first_text),
        "{plain:?} does not start with the model's greedy {first_text:?}"
    );
    let banned = text(
        &post_json(
            &http,
            &comp,
            &body(json!({"logit_bias": {first.to_string(): -100}})),
        )
        .await,
    );
    let second_text = g.tokenizer.decode(&[second], false).unwrap();
    assert!(
        banned.starts_with(&second_text),
        "with the greedy token banned: {banned:?}, want {second_text:?} first"
    );
    for temperature in [0.0, 1.0] {
        let forced = post_json(
            &http,
            &comp,
            &body(json!({"logit_bias": {dragon.to_string(): 100}, "temperature": temperature, "seed": 5})),
        )
        .await;
        assert_eq!(
            text(&forced),
            g.tokenizer.decode(&[dragon; 3], false).unwrap(),
            "temperature {temperature}"
        );
    }
    // Chat takes it too.
    let chat = format!("{url}/v1/chat/completions");
    let forced = post_json(
        &http,
        &chat,
        &chat_body(
            "hi",
            json!({"max_tokens": 2, "logit_bias": {dragon.to_string(): 100}}),
        ),
    )
    .await;
    assert_eq!(
        forced["choices"][0]["message"]["content"],
        g.tokenizer.decode(&[dragon; 2], false).unwrap()
    );

    let vocab = g.tokenizer.vocab_size();
    let refused: Vec<(&str, Value, &str)> = vec![
        (
            &comp,
            body(json!({"logit_bias": {vocab.to_string(): 1}})),
            "logit_bias",
        ),
        (
            &comp,
            body(json!({"logit_bias": {"dragon": 1}})),
            "logit_bias",
        ),
        (&comp, body(json!({"logit_bias": {"5": 101}})), "logit_bias"),
        (&comp, body(json!({"suffix": "The end."})), "suffix"),
        (&comp, body(json!({"min_p": 1.5})), "min_p"),
        (
            &chat,
            chat_body(
                "hi",
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            ),
            "tool_choice",
        ),
        (
            &chat,
            chat_body(
                "hi",
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            ),
            "response_format",
        ),
    ];
    for (at, b, param) in refused {
        let r = http.post(at).json(&b).send().await.unwrap();
        let e = expect_error(r, 400, param).await;
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    // Their "off" values pass.
    let r = http
        .post(&chat)
        .json(&chat_body("hi", json!({"max_tokens": 1, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// JSON mode (`response_format: {"type": "json_object"}`): every answer that ends by itself
/// is one JSON object, ending at its closing brace, greedy or sampled, streamed the same;
/// the same question without it is not JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_answers_with_one_json_object() {
    let (server, url) = serve(|c| c.max_new_tokens = 200).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let question = "Give the name, birth year and field of three famous scientists.";
    let json_mode = json!({"response_format": {"type": "json_object"}, "max_tokens": 200});
    let plain = post_json(
        &http,
        &chat,
        &chat_body(question, json!({"temperature": 0})),
    )
    .await;
    let plain = plain["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(plain.trim()).is_err(),
        "the question alone already gives JSON: {plain}"
    );
    let mut stopped = 0;
    for (i, sampling) in [
        json!({"temperature": 0}),
        json!({"temperature": 1.0, "seed": 1}),
        json!({"temperature": 1.0, "seed": 2}),
        json!({"temperature": 0.7, "top_p": 0.9, "seed": 3}),
        json!({"temperature": 1.0, "seed": 4, "logprobs": true, "top_logprobs": 3}),
    ]
    .into_iter()
    .enumerate()
    {
        let body = with_fields(chat_body(question, sampling), &json_mode);
        let r = post_json(&http, &chat, &body).await;
        let c = &r["choices"][0];
        let content = c["message"]["content"].as_str().unwrap();
        assert!(
            content.trim_start().starts_with('{'),
            "answer {i}: {content}"
        );
        if c["finish_reason"] == "stop" {
            stopped += 1;
            let v: serde_json::Map<String, Value> = serde_json::from_str(content)
                .unwrap_or_else(|e| panic!("answer {i} is not a JSON object ({e}): {content}"));
            assert!(content.trim_end().ends_with('}'), "answer {i}: {content}");
            eprintln!("answer {i}: {} keys", v.len());
        } else {
            assert_eq!(c["finish_reason"], "length", "answer {i}: {r}");
        }
        if let Some(lps) = c["logprobs"]["content"].as_array() {
            for t in lps {
                assert!(t["logprob"].is_number(), "answer {i}: {t}");
                for alt in t["top_logprobs"].as_array().unwrap() {
                    assert!(alt["logprob"].is_number(), "answer {i}: {alt}");
                }
            }
        }
        if i == 1 {
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            let chunks = post_stream(&http, &chat, &streamed).await;
            let s: String = streamed_content(&chunks);
            assert_eq!(s, content, "streamed");
        }
    }
    // Completions take it too (vLLM's extension of the legacy API).
    let comp = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &json!({"model": SMOL, "prompt": "A person as JSON:", "temperature": 0,
                "max_tokens": 120, "response_format": {"type": "json_object"}}),
    )
    .await;
    let c = &comp["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{comp}");
    let text = c["text"].as_str().unwrap();
    serde_json::from_str::<serde_json::Map<String, Value>>(text)
        .unwrap_or_else(|e| panic!("the completion is not a JSON object ({e}): {text}"));
    assert!(
        stopped >= 3,
        "only {stopped} of 5 answers closed their object in 200 tokens"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// SmolLM2's answer to `question` under `schema` (structured outputs, 200 tokens at most),
/// parsed, and its text; `None` where it was cut by the token limit.
async fn structured(
    http: &reqwest::Client,
    chat: &str,
    question: &str,
    sampling: &Value,
    schema: &Value,
) -> Option<(Value, String)> {
    let messages = json!([{"role": "user", "content": question}]);
    structured_chat(http, chat, messages, sampling, schema).await
}

/// [`structured`] after `messages`.
async fn structured_chat(
    http: &reqwest::Client,
    chat: &str,
    messages: Value,
    sampling: &Value,
    schema: &Value,
) -> Option<(Value, String)> {
    let body = with_fields(
        json!({"model": SMOL, "messages": messages}),
        &with_fields(sampling.clone(), &json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "answer", "strict": true, "schema": schema}},
                "max_tokens": 200})),
    );
    let r = post_json(http, chat, &body).await;
    let c = &r["choices"][0];
    if c["finish_reason"] != "stop" {
        assert_eq!(c["finish_reason"], "length", "{sampling}: {r}");
        return None;
    }
    let content = c["message"]["content"].as_str().unwrap().to_owned();
    let v = serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content}"));
    Some((v, content))
}

/// Unions whose alternatives start alike, read side by side until the text tells them apart:
/// pydantic's `Union[Cat, Dog]` of two objects (`anyOf`, and `oneOf` with its
/// `discriminator`) and an integer-or-number. Each pet SmolLM2 writes is one shape whole, the
/// one its `pet_type` names: a cat with `lives`, a dog with `good_boy`; greedy and sampled,
/// the answers hold both kinds. Flattened into one object of all the fields, SmolLM2 gives
/// every pet both (`{"pet_type": "dog", "name": "Max", "lives": 10, "good_boy": true}`, seen
/// against the server), which a union of the two models refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unions_whose_alternatives_start_alike_give_one_alternative_whole() {
    let (server, url) = serve(|c| c.max_new_tokens = 200).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let pet = |kind: &str, field: &str, ty: &str| {
        json!({"type": "object",
               "properties": {"pet_type": {"const": kind}, "name": {"type": "string", "maxLength": 20},
                              field: {"type": ty}},
               "required": ["pet_type", "name", field]})
    };
    let alternatives = json!([pet("cat", "lives", "integer"), pet("dog", "good_boy", "boolean")]);
    let unions = [
        json!({"anyOf": alternatives}),
        json!({"oneOf": alternatives, "discriminator": {"propertyName": "pet_type"}}),
    ];
    let mut kinds = std::collections::BTreeSet::new();
    let mut stopped = 0;
    for (union, sampling) in [
        (&unions[0], json!({"temperature": 0})),
        (&unions[0], json!({"temperature": 1.0, "seed": 3})),
        (&unions[1], json!({"temperature": 0.7, "seed": 1})),
    ] {
        let schema = json!({"type": "object",
            "properties": {"pets": {"type": "array", "items": union, "minItems": 2, "maxItems": 3},
                           "weight": {"type": ["integer", "number"]}},
            "required": ["pets", "weight"]});
        let question = "List our cats and dogs, and the weight of the food bag.";
        let Some((v, content)) = structured(&http, &chat, question, &sampling, &schema).await else {
            continue;
        };
        stopped += 1;
        assert!(v["weight"].is_number(), "{sampling}: {content}");
        for p in v["pets"].as_array().unwrap() {
            let keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
            match p["pet_type"].as_str().unwrap() {
                "cat" => assert!(keys == ["pet_type", "name", "lives"] && p["lives"].is_i64(), "{content}"),
                "dog" => assert!(keys == ["pet_type", "name", "good_boy"] && p["good_boy"].is_boolean(), "{content}"),
                other => panic!("{other}: {content}"),
            }
            kinds.insert(p["pet_type"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(stopped, 3, "every answer ended by itself");
    assert_eq!(kinds.len(), 2, "both alternatives were written: {kinds:?}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A recursive `$ref` (pydantic's self-referencing model: a person whose children are
/// persons): every node at every depth is a person of the schema, and a sampled answer nests
/// three deep. Taught the shape by one example turn; without it SmolLM2 nests children
/// until the token limit, as a schema allows (seen against the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_schema_shapes_every_level_of_the_answer() {
    let (server, url) = serve(|c| c.max_new_tokens = 200).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let schema = json!({"$ref": "#/$defs/Person", "$defs": {"Person": {"type": "object",
        "properties": {"name": {"type": "string", "maxLength": 15},
                       "children": {"type": "array", "items": {"$ref": "#/$defs/Person"}, "maxItems": 2}},
        "required": ["name", "children"]}}});
    let example = r#"{"name": "Ann", "children": [{"name": "Bob", "children": []}, {"name": "Cy", "children": [{"name": "Di", "children": []}]}]}"#;
    // The depth of a person, checking it and every descendant against the schema.
    fn depth(p: &Value, content: &str) -> usize {
        let keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["name", "children"], "{content}");
        assert!(p["name"].as_str().unwrap().chars().count() <= 15, "{content}");
        let children = p["children"].as_array().unwrap();
        assert!(children.len() <= 2, "{content}");
        1 + children.iter().map(|c| depth(c, content)).max().unwrap_or(0)
    }
    let mut deepest = 0;
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 1.0, "seed": 3}),
        json!({"temperature": 0.7, "seed": 1}),
    ] {
        let messages = json!([
            {"role": "user", "content": "The family tree of the Smiths, as JSON."},
            {"role": "assistant", "content": example},
            {"role": "user", "content": "The family tree of the Lees, as JSON."}]);
        let (v, content) = structured_chat(&http, &chat, messages, &sampling, &schema)
            .await
            .unwrap_or_else(|| panic!("{sampling}: cut"));
        deepest = deepest.max(depth(&v, &content));
    }
    assert!(deepest >= 3, "grandchildren somewhere: depth {deepest}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `prefixItems` (pydantic's `tuple[str, float, float]`): a city as its name, latitude and
/// longitude, each position of its own schema and bounds, greedy and sampled. As a list of
/// any items, SmolLM2 writes objects of its own keys and lists that run past the token limit
/// (seen against the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tuple_gives_each_position_its_schema() {
    let (server, url) = serve(|c| c.max_new_tokens = 200).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let schema = json!({"type": "object", "properties": {"city": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 20},
                        {"type": "number", "minimum": -90, "maximum": 90},
                        {"type": "number", "minimum": -180, "maximum": 180}],
        "minItems": 3, "maxItems": 3}}, "required": ["city"]});
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 1.0, "seed": 3}),
        json!({"temperature": 0.7, "seed": 1}),
    ] {
        let question = "Give a city with its latitude and longitude.";
        let (v, content) = structured(&http, &chat, question, &sampling, &schema)
            .await
            .unwrap_or_else(|| panic!("{sampling}: cut"));
        let city = v["city"].as_array().unwrap();
        assert_eq!(city.len(), 3, "{content}");
        assert!(city[0].as_str().is_some_and(|n| n.chars().count() <= 20), "{content}");
        let (lat, lon) = (city[1].as_f64().unwrap(), city[2].as_f64().unwrap());
        assert!((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon), "{content}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The string formats beyond dates that OpenAI's structured outputs list (`uri` too, which
/// pydantic's `HttpUrl` writes): what SmolLM2 writes under each, greedy and sampled, is a
/// value a parser of its own takes (Rust's `Ipv6Addr`, the `url` crate's, and RFC 1123's
/// labels and RFC 3339's durations read here by hand). Unmasked (the same schema without
/// formats), SmolLM2 writes the host as a URL, the address as a URL, a host name or
/// `0.0.0.0`, and the timeout as `434m,`, a host name or digits without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_formats_give_values_their_own_parsers_take() {
    let (server, url) = serve(|c| c.max_new_tokens = 200).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let schema = json!({
        "type": "object",
        "properties": {
            "website": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083},
            "host": {"type": "string", "format": "hostname"},
            "address": {"type": "string", "format": "ipv6"},
            "timeout": {"type": "string", "format": "duration"}
        },
        "required": ["website", "host", "address", "timeout"],
        "additionalProperties": false
    });
    let hostname = |h: &str| {
        h.len() <= 253
            && h.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    };
    // RFC 3339's duration: P, then date units in order Y, M, D (or W alone), then T and time
    // units H, M, S; each a number, none skipped between two written.
    let duration = |d: &str| {
        let Some(rest) = d.strip_prefix('P') else {
            return false;
        };
        let (date, time) = match rest.split_once('T') {
            Some((date, time)) => (date, Some(time)),
            None => (rest, None),
        };
        let units = |s: &str, order: &[char], fraction: bool| -> Option<Vec<usize>> {
            let mut at = Vec::new();
            let mut n = String::new();
            for c in s.chars() {
                if c.is_ascii_digit() || (fraction && c == '.' && !n.is_empty()) {
                    n.push(c);
                } else {
                    let i = order.iter().position(|&u| u == c)?;
                    let frac = n.contains('.');
                    if n.is_empty() || n.ends_with('.') || (frac && c != 'S') {
                        return None;
                    }
                    at.push(i);
                    n.clear();
                }
            }
            let consecutive = at.windows(2).all(|w| w[1] == w[0] + 1);
            (n.is_empty() && consecutive).then_some(at)
        };
        if let Some(w) = date.strip_suffix('W') {
            return time.is_none() && !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
        }
        let Some(d) = units(date, &['Y', 'M', 'D'], false) else {
            return false;
        };
        match time {
            None => !d.is_empty(),
            Some(t) => units(t, &['H', 'M', 'S'], true).is_some_and(|u| !u.is_empty()),
        }
    };
    for ok in ["P1Y2M3DT4H5M6S", "PT30M", "P2W", "PT0.5S", "P1M", "P3D"] {
        assert!(duration(ok), "{ok}");
    }
    for bad in ["P", "PT", "P1Y2D", "PT1H30S", "10 seconds", "P1.5D", "P1D2M"] {
        assert!(!duration(bad), "{bad}");
    }
    let mut stopped = 0;
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 1.0, "seed": 3}),
        json!({"temperature": 0.7, "seed": 1}),
    ] {
        let question = "Describe our mirror server: its website, host name, IPv6 address and \
                        request timeout.";
        let Some((v, content)) = structured(&http, &chat, question, &sampling, &schema).await else {
            continue;
        };
        stopped += 1;
        let site = v["website"].as_str().unwrap();
        assert!(reqwest::Url::parse(site).is_ok(), "{sampling}: {content}");
        assert!(hostname(v["host"].as_str().unwrap()), "{sampling}: {content}");
        let address = v["address"].as_str().unwrap();
        assert!(address.parse::<std::net::Ipv6Addr>().is_ok(), "{sampling}: {content}");
        assert!(duration(v["timeout"].as_str().unwrap()), "{sampling}: {content}");
    }
    assert!(stopped >= 2, "{stopped} of 3 answers ended by themselves");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Structured outputs (`response_format: {"type": "json_schema", …}`): an answer that ends
/// by itself is a value the schema accepts, every (required) property present in the schema's order
/// with its type, an enum's
/// value one of its list, numbers within their bounds, strings of their pattern and format
/// (the bounds are ones SmolLM2 does not keep unmasked: it writes births in the 1800s and
/// 1900s, and positive latitudes); `uniqueItems` over an enum gives each value once, and
/// over strings distinct strings;
/// `propertyNames` keys of its pattern; a schema kandle cannot follow is refused naming the
/// keyword.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_shapes_the_answer() {
    let (server, url) = serve(|c| c.max_new_tokens = 300).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let fields = ["physics", "chemistry", "biology", "mathematics"];
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 40},
            "born": {"type": "integer", "minimum": 1500, "maximum": 1599},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "since": {"type": "string", "format": "date"},
            "field": {"enum": fields},
            "nobel": {"type": "boolean"},
            "works": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            // pydantic's wrapper of a described model field.
            "home": {"allOf": [{"$ref": "#/$defs/Place"}], "description": "Where they lived"},
            "died": {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        },
        // As OpenAI's strict mode asks: every property required.
        "required": ["name", "born", "code", "since", "field", "nobel", "works", "home", "died"],
        "additionalProperties": false,
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"},
                                                            "lat": {"type": "number", "minimum": -90, "maximum": -45}},
                            "required": ["city", "lat"]}}
    });
    let format = |schema: Value| {
        json!({"response_format": {"type": "json_schema",
               "json_schema": {"name": "scientist", "strict": true, "schema": schema}},
               "max_tokens": 300})
    };
    let mut stopped = 0;
    for (i, sampling) in [
        json!({"temperature": 0}),
        json!({"temperature": 1.0, "seed": 2}),
        json!({"temperature": 0.7, "seed": 7}),
        json!({"temperature": 0.5, "seed": 9, "logprobs": true, "top_logprobs": 20}),
    ]
    .into_iter()
    .enumerate()
    {
        let body = with_fields(
            chat_body("Describe a famous scientist.", sampling),
            &format(schema.clone()),
        );
        let r = post_json(&http, &chat, &body).await;
        let c = &r["choices"][0];
        let content = c["message"]["content"].as_str().unwrap();
        // Alternatives the schema masked out are left out, not given as null.
        for t in c["logprobs"]["content"].as_array().into_iter().flatten() {
            for alt in t["top_logprobs"].as_array().unwrap() {
                assert!(alt["logprob"].is_number(), "answer {i}: {alt}");
            }
        }
        if c["finish_reason"] != "stop" {
            assert_eq!(c["finish_reason"], "length", "answer {i}: {r}");
            continue;
        }
        stopped += 1;
        let v: Value = serde_json::from_str(content)
            .unwrap_or_else(|e| panic!("answer {i} is not JSON ({e}): {content}"));
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("answer {i}: {content}"));
        // Every property, in the order the schema declares them (as OpenAI writes them).
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "name", "born", "code", "since", "field", "nobel", "works", "home", "died"
            ],
            "{content}"
        );
        assert!(o["name"].is_string() && o["born"].is_i64() && o["nobel"].is_boolean());
        let name = o["name"].as_str().unwrap().chars().count();
        assert!((2..=40).contains(&name), "{content}");
        assert!(
            (1500..=1599).contains(&o["born"].as_i64().unwrap()),
            "{content}"
        );
        let lat = o["home"]["lat"].as_f64().unwrap();
        assert!((-90.0..=-45.0).contains(&lat), "{content}");
        let code = o["code"].as_str().unwrap().as_bytes();
        assert!(
            code.len() == 6
                && code[..2].iter().all(u8::is_ascii_uppercase)
                && code[2] == b'-'
                && code[3..].iter().all(u8::is_ascii_digit),
            "{content}"
        );
        // A calendar date: the month's days, February's 29th only in a leap year.
        let since: Vec<u32> = (o["since"].as_str().unwrap().split('-'))
            .map(|p| p.parse().unwrap())
            .collect();
        let (y, m, d) = (since[0], since[1], since[2]);
        let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let days = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        assert!(
            (1..=12).contains(&m) && (1..=days[m as usize - 1]).contains(&d),
            "{content}"
        );
        assert!(fields.contains(&o["field"].as_str().unwrap()), "{content}");
        assert!(o["died"].is_i64() || o["died"].is_null(), "{content}");
        assert!(
            (o["works"].as_array().unwrap().iter()).all(Value::is_string)
                && o["works"].as_array().unwrap().len() <= 3,
            "{content}"
        );
        assert!(
            o["home"]["city"].is_string() && o["home"]["lat"].is_number(),
            "{content}"
        );
    }
    assert!(
        stopped >= 2,
        "{stopped} of 4 answers closed their object in 300 tokens"
    );

    // pydantic's `set[Literal[...]]`: every value once, here all four (SmolLM2 left alone
    // repeats one).
    let set = json!({"type": "object", "properties": {"studied": {"type": "array",
        "uniqueItems": true, "minItems": 4, "items": {"enum": fields}}}, "required": ["studied"]});
    for sampling in [json!({"temperature": 0}), json!({"temperature": 1.0, "seed": 5})] {
        let body = with_fields(
            chat_body("Which fields did Marie Curie study?", sampling),
            &format(set.clone()),
        );
        let r = post_json(&http, &chat, &body).await;
        let content = r["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(content)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {content}"));
        let mut studied: Vec<&str> = (v["studied"].as_array().unwrap().iter())
            .map(|f| f.as_str().unwrap())
            .collect();
        studied.sort_unstable();
        let mut all = fields.to_vec();
        all.sort_unstable();
        assert_eq!(studied, all, "{content}");
    }

    // pydantic's `set[str]`: six distinct strings (SmolLM2 left alone repeats "Barcelona"
    // greedily and "Paris" at this seed; masked, a repeat must go on into another value).
    let cities = json!({"type": "object", "properties": {"cities": {"type": "array",
        "uniqueItems": true, "minItems": 6, "maxItems": 6, "items": {"type": "string"}}},
        "required": ["cities"]});
    for sampling in [json!({"temperature": 0}), json!({"temperature": 1.0, "seed": 5})] {
        let body = with_fields(chat_body("Name six cities in France.", sampling), &format(cities.clone()));
        let r = post_json(&http, &chat, &with_fields(body, &json!({"max_tokens": 200}))).await;
        let content = r["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("not JSON ({e}): {content}"));
        let names: Vec<&str> = (v["cities"].as_array().unwrap().iter()).map(|c| c.as_str().unwrap()).collect();
        let distinct: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!((names.len(), distinct.len()), (6, 6), "{content}");
    }

    // pydantic's dict[constr(pattern=...), int] with min_length=1: every key follows the
    // pattern, and there is one at least.
    let ids = json!({"type": "object", "propertyNames": {"pattern": "^[a-z]+_age$"},
                     "minProperties": 1,
                     "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 120}});
    let body = with_fields(
        chat_body("Give the ages of Alice, Bob and Carol.", json!({"temperature": 0})),
        &format(ids),
    );
    let r = post_json(&http, &chat, &with_fields(body, &json!({"max_tokens": 60}))).await;
    let content = r["choices"][0]["message"]["content"].as_str().unwrap();
    // The values are numbers: every quoted string is a key, also in an answer cut short
    // (SmolLM2 repeats its first key until the tokens run out).
    let closed = content.matches('"').count() / 2;
    let keys: Vec<&str> = content.split('"').skip(1).step_by(2).take(closed).collect();
    assert!(!keys.is_empty(), "{content}");
    for key in keys {
        let name = key.strip_suffix("_age").unwrap_or_else(|| panic!("{key}: {content}"));
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase()), "{content}");
    }

    for (bad, says) in [
        (
            json!({"type": "object", "patternProperties": {"^a": {}, "^b": {}}}),
            "one pattern",
        ),
        (
            json!({"type": "array", "uniqueItems": true, "items": {"type": "object"}}),
            "uniqueItems is followed for items that are an enum",
        ),
        (json!({"type": "string", "pattern": "a(?=b)"}), "pattern"),
        (json!({"type": "string", "format": "iri"}), "format"),
        (
            json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
            "same character",
        ),
    ] {
        let r = http
            .post(&chat)
            .json(&with_fields(
                chat_body("hi", json!({})),
                &format(bad.clone()),
            ))
            .send()
            .await
            .unwrap();
        let e = expect_error(r, 400, says).await;
        assert_eq!(e["error"]["param"], "response_format", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Tools: a named function (or "required" with one tool) makes the answer a call of it
/// whose arguments follow its parameters; "required" with several makes it a call of one of
/// them. Streamed, a named call's arguments come in pieces after a chunk naming it, and join
/// to the non-streamed arguments. "auto", the default, is refused: SmolLM2's template shows
/// no tool-call format and no `--tool-call-parser` is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_tool_call_answers_with_arguments_its_parameters_accept() {
    let (server, url) = serve(|c| c.max_new_tokens = 120).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}}});
    let add = json!({"type": "function", "function": {"name": "add",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}});
    let question = "What is the weather in Paris?";
    let named = chat_body(
        question,
        json!({"temperature": 0, "tools": [weather, add], "max_tokens": 120,
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    );
    let r = post_json(&http, &chat, &named).await;
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{r}");
    assert!(c["message"]["content"].is_null(), "{r}");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{call}"
    );
    let arguments = call["function"]["arguments"].as_str().unwrap();
    let args: serde_json::Map<String, Value> = serde_json::from_str(arguments)
        .unwrap_or_else(|e| panic!("the arguments are not an object ({e}): {arguments}"));
    assert!(args["city"].is_string(), "{arguments}");
    assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
    assert_eq!(args.len(), 2, "{arguments}");

    let mut streamed = named.clone();
    streamed["stream"] = json!(true);
    let chunks = post_stream(&http, &chat, &streamed).await;
    let mut joined = String::new();
    let mut names = Vec::new();
    for ch in &chunks {
        if let Some(calls) = ch["choices"][0]["delta"]["tool_calls"].as_array() {
            let f = &calls[0]["function"];
            if let Some(name) = f["name"].as_str() {
                names.push(name.to_owned());
                assert!(calls[0]["id"].is_string(), "{ch}");
            }
            joined.push_str(f["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(names, ["get_weather"], "one chunk names the call");
    assert_eq!(joined, arguments, "streamed arguments");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // "required" with several tools: a call of one of them, its arguments its own.
    for seed in [1, 2, 3] {
        let body = chat_body(
            "Add 2 and 3.",
            json!({"temperature": 1.0, "seed": seed, "tools": [weather, add],
                   "tool_choice": "required", "max_tokens": 120}),
        );
        let r = post_json(&http, &chat, &body).await;
        let c = &r["choices"][0];
        if c["finish_reason"] == "length" {
            continue;
        }
        assert_eq!(c["finish_reason"], "tool_calls", "{r}");
        let f = &c["message"]["tool_calls"][0]["function"];
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        match f["name"].as_str().unwrap() {
            "add" => assert!(args["a"].is_i64() && args["b"].is_i64(), "{r}"),
            "get_weather" => assert!(args["city"].is_string(), "{r}"),
            other => panic!("a call of {other}: {r}"),
        }
    }

    // "none": the tools reach the template, and the answer is text.
    let none = chat_body(
        question,
        json!({"temperature": 0, "max_tokens": 8, "tools": [weather], "tool_choice": "none"}),
    );
    let r = post_json(&http, &chat, &none).await;
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    assert!(r["choices"][0]["message"]["tool_calls"].is_null(), "{r}");

    for (extra, param) in [
        (json!({"tools": [weather]}), "tool_choice"),
        (
            json!({"tools": [weather], "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            json!({"tools": [weather], "tool_choice": "required",
                   "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        expect_refused(&http, &chat, &chat_body(question, extra.clone()), param).await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A conversation in which the assistant called `get_weather(city)` for three earlier
/// questions in `parser`'s format, then `question`: SmolLM2-135M, greedy, calls again for a
/// weather question and answers others in text.
fn weather_shots(parser: ToolCallParser, question: &str) -> Value {
    let (system, call): (&str, fn(&str) -> String) = match parser {
        ToolCallParser::Hermes => (
            "You have access to the following tools:\n<tools>[{\"name\": \"get_weather\", \
             \"description\": \"Get the current weather in a city\", \"parameters\": {\"type\": \
             \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}]</tools>\nTo call \
             a tool, answer <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.",
            |city| {
                format!(
                    "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \
                     \"{city}\"}}}}\n</tool_call>"
                )
            },
        ),
        ToolCallParser::Phi4MiniJson => (
            "You are a helpful assistant. In addition to plain text responses, you can \
             choose to call get_weather(city) for the weather in a city. If you decide to call \
             it, prefix function calls with the functools marker, formatted as \
             functools[{\"name\": [function name], \"arguments\": [function arguments as \
             JSON]}, ...]",
            |city| {
                format!(
                    "functools[{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \
                     \"{city}\"}}}}]"
                )
            },
        ),
        ToolCallParser::Qwen3Coder => (
            "You have access to get_weather(city). If you choose to call it, reply in the \
             format:\n<tool_call>\n<function=example_function_name>\n\
             <parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>",
            |city| {
                format!(
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n\
                     </parameter>\n</function>\n</tool_call>"
                )
            },
        ),
        ToolCallParser::Pythonic => (
            "You have access to get_weather(city). If you decide to invoke it, you MUST put it \
             in the format of [func_name1(params_name1=params_value1, \
             params_name2=params_value2...), func_name2(params)]",
            // In single quotes, as vLLM's examples of the format write them.
            |city| format!("[get_weather(city='{city}')]"),
        ),
        _ => (
            "You have access to get_weather(city). To call it, respond in the format \
             {\"name\": function name, \"parameters\": dictionary of argument name and its \
             value}.",
            |city| {
                format!("{{\"name\": \"get_weather\", \"parameters\": {{\"city\": \"{city}\"}}}}")
            },
        ),
    };
    let mut messages = vec![json!({"role": "system", "content": system})];
    for city in ["Paris", "London", "Madrid"] {
        messages
            .push(json!({"role": "user", "content": format!("What is the weather in {city}?")}));
        messages.push(json!({"role": "assistant", "content": call(city)}));
    }
    messages.push(json!({"role": "user", "content": question}));
    json!({"model": SMOL, "messages": messages, "temperature": 0, "max_tokens": 60})
}

/// The tools of [`auto_calls_are_read_and_masked`]'s requests.
fn weather_now() -> Value {
    json!([{"type": "function", "function": {"name": "weather_now",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["location", "unit"]}}}])
}

/// `tool_choice: "auto"` against a server reading `parser`'s format: the model answers in
/// text or calls in that format, and a call it starts is masked to the request's tools. The
/// conversation taught it `get_weather(city)`; the request lists only
/// `weather_now(location, unit)`, so unmasked (`"none"`) it writes the call it was shown
/// (whose text starts with `shown`), and with "auto" the one the request allows. Streamed:
/// content as it comes, the call whole at the end, every token's log-probability sent.
/// Returns the call's answer.
async fn auto_calls_are_read_and_masked(url: &str, parser: ToolCallParser, shown: &str) -> Value {
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let tools = weather_now();
    let rome = with_fields(
        weather_shots(parser, "What is the weather in Rome?"),
        &json!({"tools": tools}),
    );

    // Unmasked, the model writes the call it was shown, as text.
    let none = post_json(
        &http,
        &chat,
        &with_fields(rome.clone(), &json!({"tool_choice": "none"})),
    )
    .await;
    let text = none["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with(shown) && text.contains("get_weather"),
        "{none}"
    );

    let r = post_json(&http, &chat, &rome).await;
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{r}");
    assert!(c["message"]["content"].is_null(), "{r}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{r}");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    let f = &calls[0]["function"];
    assert_eq!(f["name"], "weather_now", "{r}");
    let args: serde_json::Map<String, Value> =
        serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    assert!(args["location"].is_string(), "{r}");
    assert!(
        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{r}"
    );
    assert_eq!(args.len(), 2, "{r}");

    let chunks = post_stream(
        &http,
        &chat,
        &with_fields(rome.clone(), &json!({"stream": true})),
    )
    .await;
    assert_eq!(only_streamed_call(&chunks)["function"], *f, "streamed call");
    let content: String = streamed_content(&chunks);
    assert_eq!(content, "", "no content before the call");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // A question the tool does not answer: text, streamed the same, with every token's
    // log-probability (none held back with text that might have started a call).
    let sum = with_fields(
        weather_shots(parser, "Tell me a joke."),
        &json!({"tools": tools}),
    );
    let r = post_json(&http, &chat, &sum).await;
    let c = &r["choices"][0];
    assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()), "{r}");
    assert!(c["message"]["tool_calls"].is_null(), "{r}");
    let answer = c["message"]["content"].as_str().unwrap();
    assert!(!answer.is_empty() && !answer.contains("get_weather"), "{r}");
    let chunks = post_stream(
        &http,
        &chat,
        &with_fields(
            sum,
            &json!({"stream": true, "logprobs": true,
                                  "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let content: String = streamed_content(&chunks);
    assert_eq!(content, answer);
    let lps: usize = (chunks.iter())
        .filter_map(|ch| ch["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        lps as u64,
        usage["completion_tokens"].as_u64().unwrap(),
        "{usage}"
    );
    r
}

/// The weather question of [`weather_shots`] with `get_weather(city, unit?, days?)` as the
/// request's tool, `city` alone required: the call SmolLM2 writes, greedy, is the one it was
/// shown, `city` alone, for the mask lets an object end after its required properties (with
/// every declared property written, it went on to `unit`).
async fn optional_parameters_are_left_out_as_shown(url: &str, parser: ToolCallParser) {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"}},
            "required": ["city"]}}}]);
    let body = with_fields(
        weather_shots(parser, "What is the weather in Rome?"),
        &json!({"tools": tools}),
    );
    let r = post_json(&client(), &format!("{url}/v1/chat/completions"), &body).await;
    let (f, args) = only_call(&r);
    assert_eq!(f["name"], "get_weather", "{r}");
    assert_eq!(args, json!({"city": "Rome"}), "{parser:?}: {r}");
}

/// `tool_choice: "auto"` with `--tool-call-parser hermes` ([`auto_calls_are_read_and_masked`]);
/// `parallel_tool_calls: false` ends the answer with the call's closing brace, before the
/// `</tool_call>` the model writes otherwise. A chat template that mentions `<tool_call>`
/// chooses the parser without the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tool_choice_reads_hermes_calls_masked_to_the_tools() {
    let (server, url) = serve(|c| c.tool_call_parser = Some(ToolCallParser::Hermes)).await;
    auto_calls_are_read_and_masked(&url, ToolCallParser::Hermes, "<tool_call>").await;
    optional_parameters_are_left_out_as_shown(&url, ToolCallParser::Hermes).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let rome = with_fields(
        weather_shots(ToolCallParser::Hermes, "What is the weather in Rome?"),
        &json!({"tools": weather_now()}),
    );
    let parallel = post_json(&http, &chat, &rome).await;
    let single = post_json(
        &http,
        &chat,
        &with_fields(rome.clone(), &json!({"parallel_tool_calls": false})),
    )
    .await;
    assert_eq!(
        single["choices"][0]["finish_reason"], "tool_calls",
        "{single}"
    );
    assert_eq!(
        single["choices"][0]["message"]["tool_calls"][0]["function"],
        parallel["choices"][0]["message"]["tool_calls"][0]["function"]
    );
    let tokens = |r: &Value| r["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens(&single) < tokens(&parallel), "{single} {parallel}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    // No flag: a template that writes `<tool_call>` into the prompt chooses Hermes.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if tools %}<|im_start|>system\nCall tools as <tool_call>{...}</tool_call><|im_end|>\n\
         {% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let (server, url) = serve(move |c| c.chat_template = Some(file)).await;
    let r = post_json(&http, &format!("{url}/v1/chat/completions"), &rome).await;
    assert!(
        r["choices"][0]["message"].is_object(),
        "\"auto\" accepted: {r}"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `tool_choice: "auto"` with `--tool-call-parser llama3_json`
/// ([`auto_calls_are_read_and_masked`]): an answer that starts with `{` is
/// `{"name": …, "parameters": …}`, which ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tool_choice_reads_llama3_json_calls_masked_to_the_tools() {
    let (server, url) = serve(|c| c.tool_call_parser = Some(ToolCallParser::Llama3Json)).await;
    auto_calls_are_read_and_masked(&url, ToolCallParser::Llama3Json, "{\"name\"").await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `tool_choice: "auto"` with `--tool-call-parser phi4_mini_json`
/// ([`auto_calls_are_read_and_masked`]): `functools` opens a list of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tool_choice_reads_phi4_mini_calls_masked_to_the_tools() {
    let (server, url) = serve(|c| c.tool_call_parser = Some(ToolCallParser::Phi4MiniJson)).await;
    auto_calls_are_read_and_masked(&url, ToolCallParser::Phi4MiniJson, "functools[").await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The weather question of [`auto_calls_are_read_and_masked`] asked again with `logprobs`:
/// the answer as the model wrote it, token by token, and the arguments of the call read from
/// it (`weather_now`'s).
async fn written_weather_call(url: &str, parser: ToolCallParser) -> (String, Value) {
    let rome = with_fields(
        weather_shots(parser, "What is the weather in Rome?"),
        &json!({"tools": weather_now(), "logprobs": true}),
    );
    let again = post_json(&client(), &format!("{url}/v1/chat/completions"), &rome).await;
    let written: String = (again["choices"][0]["logprobs"]["content"].as_array())
        .unwrap_or_else(|| panic!("{again}"))
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    let f = &again["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(f["name"], "weather_now", "{again}");
    (written, serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap())
}

/// `tool_choice: "auto"` with `--tool-call-parser pythonic`
/// ([`auto_calls_are_read_and_masked`]): an answer that starts with `[` is a Python list of
/// calls, masked through its JSON, which ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tool_choice_reads_pythonic_calls_masked_to_the_tools() {
    let (server, url) = serve(|c| c.tool_call_parser = Some(ToolCallParser::Pythonic)).await;
    auto_calls_are_read_and_masked(&url, ToolCallParser::Pythonic, "[get_weather(").await;
    optional_parameters_are_left_out_as_shown(&url, ToolCallParser::Pythonic).await;
    // The answer as the model wrote it, token by token: Python, not JSON.
    let (written, args) = written_weather_call(&url, ToolCallParser::Pythonic).await;
    let written = written.trim();
    let unit = args["unit"].as_str().unwrap();
    // In single quotes, as the examples taught it (greedy, so always so).
    assert!(
        written.starts_with("[weather_now(location='") && written.ends_with(&format!("unit='{unit}')]")),
        "{written:?}"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `tool_choice: "auto"` with `--tool-call-parser qwen3_coder`
/// ([`auto_calls_are_read_and_masked`]): `<tool_call>` opens a call in Qwen3-Coder's XML-like
/// format, masked through the JSON it stands for. The answer as the model wrote it is that
/// format, a string parameter's value raw text, and the call read from it is its JSON. A
/// model shown calls without `<tool_call>` opens its call with `<function=`, read the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tool_choice_reads_qwen3_coder_calls_masked_to_the_tools() {
    let (server, url) = serve(|c| c.tool_call_parser = Some(ToolCallParser::Qwen3Coder)).await;
    let shown = "<tool_call>\n<function=";
    auto_calls_are_read_and_masked(&url, ToolCallParser::Qwen3Coder, shown).await;
    optional_parameters_are_left_out_as_shown(&url, ToolCallParser::Qwen3Coder).await;
    let (written, args) = written_weather_call(&url, ToolCallParser::Qwen3Coder).await;
    let (location, unit) = (args["location"].as_str().unwrap(), args["unit"].as_str().unwrap());
    let xml = format!(
        "<tool_call>\n<function=weather_now>\n<parameter=location>\n{location}\n</parameter>\n\
         <parameter=unit>\n{unit}\n</parameter>\n</function>"
    );
    assert!(written.trim_start().starts_with(&xml), "{written:?}");

    // Shown calls without their `<tool_call>`: the answer opens with `<function=`, which
    // is masked and read as a call's start too (vLLM's and llama.cpp's fallback).
    let mut bare = weather_shots(ToolCallParser::Qwen3Coder, "What is the weather in Rome?");
    for m in bare["messages"].as_array_mut().unwrap() {
        let text = m["content"].as_str().unwrap();
        m["content"] = json!(text.replace("<tool_call>\n", "").replace("\n</tool_call>", ""));
    }
    let bare = with_fields(bare, &json!({"tools": weather_now()}));
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let none = with_fields(bare.clone(), &json!({"tool_choice": "none"}));
    let none = post_json(&http, &chat, &none).await;
    let text = none["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("<function=get_weather>"), "{none}");
    let r = post_json(&http, &chat, &bare).await;
    let (f, args) = only_call(&r);
    assert_eq!(f["name"], "weather_now", "{r}");
    assert!(args["location"].is_string(), "{r}");
    assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()), "{r}");
    let chunks = post_stream(&http, &chat, &with_fields(bare, &json!({"stream": true}))).await;
    assert_eq!(only_streamed_call(&chunks)["function"], *f, "streamed call");
    assert_eq!(streamed_content(&chunks), "", "no content before the call");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// vLLM's `stream_options.continuous_usage_stats`: with `include_usage`, every chunk of a
/// choice carries that choice's usage so far (the prompt's tokens, the choice's tokens),
/// growing to the final usage; each of `n` choices counts its own; without either field no
/// choice's chunk carries usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_usage_stats_put_the_usage_so_far_in_every_chunk() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let both = json!({"include_usage": true, "continuous_usage_stats": true});
    // A choice's chunk, not the usage chunk at the end.
    let of_a_choice = |c: &Value| c["choices"].as_array().is_some_and(|a| !a.is_empty());
    let ask = |so: &Value| {
        with_fields(
            chat_body("Name three colours.", json!({"temperature": 0, "max_tokens": 20, "logprobs": true})),
            &json!({"stream": true, "stream_options": so}),
        )
    };
    let chunks = post_stream(&http, &chat, &ask(&both)).await;
    let total = chunks.last().unwrap()["usage"].clone();
    let prompt = total["prompt_tokens"].as_u64().unwrap();
    let of_choices: Vec<&Value> = (chunks.iter()).filter(|c| of_a_choice(c)).collect();
    assert!(of_choices.len() >= 4, "{chunks:?}");
    let (mut sofar, mut sent) = (0, 0);
    for c in &of_choices {
        let u = &c["usage"];
        assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{c}");
        let n = u["completion_tokens"].as_u64().unwrap();
        assert!(n >= sofar, "{c}");
        assert_eq!(u["total_tokens"].as_u64(), Some(prompt + n), "{c}");
        sofar = n;
        // A chunk's count covers at least the tokens whose log-probabilities were sent.
        sent += c["choices"][0]["logprobs"]["content"].as_array().map_or(0, Vec::len) as u64;
        assert!(n >= sent, "{n} < {sent}: {c}");
    }
    assert_eq!(of_choices[0]["usage"]["completion_tokens"], 0, "the role's chunk: none yet");
    assert_eq!(Some(sofar), total["completion_tokens"].as_u64());
    for so in [json!({"continuous_usage_stats": true}), json!({"include_usage": true}), json!({"include_usage": true, "continuous_usage_stats": null})] {
        let chunks = post_stream(&http, &chat, &ask(&so)).await;
        assert!(
            chunks.iter().filter(|c| of_a_choice(c)).all(|c| c["usage"].is_null()),
            "{so}: {chunks:?}"
        );
    }

    // Completions with two choices at temperature 1: each counts its own tokens.
    let body = json!({"model": SMOL, "prompt": "Once upon a time", "max_tokens": 12, "n": 2, "temperature": 1.0,
                      "seed": 3, "stream": true, "stream_options": both});
    let chunks = post_stream(&http, &format!("{url}/v1/completions"), &body).await;
    let total = chunks.last().unwrap()["usage"].clone();
    let mut last = [0u64; 2];
    for c in chunks.iter().filter(|c| of_a_choice(c)) {
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        assert_eq!(c["usage"]["prompt_tokens"], total["prompt_tokens"], "one prompt: {c}");
        last[i] = c["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(Some(last[0] + last[1]), total["completion_tokens"].as_u64(), "{chunks:?}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// vLLM's extra sampling fields, which its clients and load generators send: `ignore_eos`
/// and `min_tokens` run the answer past its end-of-text (the same greedy start, then on to
/// the limit), `min_tokens` holds a stop sequence back until it is reached,
/// `stop_token_ids` ends the answer (that token's text left out, or kept with
/// `include_stop_str_in_output`, as a stop sequence is; `skip_special_tokens: false` keeps
/// the end-of-turn token's), `repetition_penalty` changes a
/// greedy answer; bad values are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_fields_bound_where_an_answer_ends() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let ask = |extra: Value| {
        with_fields(
            chat_body("What is 2+2?", json!({"temperature": 0, "max_tokens": 40})),
            &extra,
        )
    };
    let answer = |r: &Value| {
        let c = &r["choices"][0];
        (
            c["message"]["content"]
                .as_str()
                .unwrap_or_else(|| panic!("{r}"))
                .to_owned(),
            c["finish_reason"].as_str().unwrap().to_owned(),
            r["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    let (plain, why, n) = answer(&post_json(&http, &chat, &ask(json!({}))).await);
    assert_eq!(why, "stop");
    assert!(
        n < 20,
        "the greedy answer ends early: {n} tokens, {plain:?}"
    );
    for extra in [json!({"ignore_eos": true}), json!({"min_tokens": 20})] {
        let (text, why, n) = answer(&post_json(&http, &chat, &ask(extra.clone())).await);
        assert!(
            text.starts_with(&plain) && text.len() > plain.len(),
            "{extra}: {text:?}"
        );
        assert_eq!((why.as_str(), n), ("length", 40), "{extra}");
    }
    // The plain answer's words: a stop sequence inside it, and the token that ends its
    // fifth.
    let word = plain.split(' ').nth(5).unwrap().to_owned();
    let (text, _, _) = answer(&post_json(&http, &chat, &ask(json!({"stop": [word]}))).await);
    assert!(!text.contains(&word), "{text:?}");
    let (text, _, _) = answer(
        &post_json(
            &http,
            &chat,
            &ask(json!({"stop": [word], "min_tokens": 10})),
        )
        .await,
    );
    assert!(
        text.contains(&word),
        "the stop counts from min_tokens on: {text:?}"
    );
    let ids = token_ids(
        &http,
        &url,
        json!({"messages": [{"role": "user", "content": "What is 2+2?"}]}),
    )
    .await;
    let all = token_ids(
        &http,
        &url,
        json!({"messages": [{"role": "user", "content": "What is 2+2?"},
                            {"role": "assistant", "content": plain}]}),
    )
    .await;
    let generated = &all[ids.len()..];
    let (text, why, n) = answer(
        &post_json(
            &http,
            &chat,
            &ask(json!({"stop_token_ids": [generated[4]]})),
        )
        .await,
    );
    assert_eq!((why.as_str(), n), ("stop", 5), "{text:?}");
    assert!(
        plain.starts_with(&text) && text.len() < plain.len(),
        "{text:?}"
    );
    let detok = |ids: &[u32]| {
        let (http, url) = (&http, &url);
        let body = json!({"model": SMOL, "tokens": ids});
        async move {
            post_json(http, &format!("{url}/detokenize"), &body).await["prompt"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    // The ending token's text is left out (vLLM's reading), or kept on request.
    assert_eq!(text, detok(&generated[..4]).await);
    let (kept, why, n) = answer(
        &post_json(
            &http,
            &chat,
            &ask(json!({"stop_token_ids": [generated[4]], "include_stop_str_in_output": true})),
        )
        .await,
    );
    assert_eq!((why.as_str(), n), ("stop", 5));
    assert_eq!(kept, detok(&generated[..5]).await);
    // A stop sequence kept at the end.
    let (text, why, _) = answer(
        &post_json(
            &http,
            &chat,
            &ask(json!({"stop": [word], "include_stop_str_in_output": true})),
        )
        .await,
    );
    assert_eq!(why, "stop");
    assert!(
        text.ends_with(&word) && plain.starts_with(&text),
        "{text:?} {word:?}"
    );
    // Special tokens' text kept: the end-of-turn token that ends the answer, when included.
    let (text, why, _) = answer(
        &post_json(
            &http,
            &chat,
            &ask(json!({"skip_special_tokens": false, "include_stop_str_in_output": true})),
        )
        .await,
    );
    assert_eq!((text, why.as_str()), (format!("{plain}<|im_end|>"), "stop"));
    let (text, _, _) =
        answer(&post_json(&http, &chat, &ask(json!({"skip_special_tokens": false}))).await);
    assert_eq!(text, plain);
    let long = |extra: Value| {
        with_fields(
            chat_body(
                "Tell me a joke.",
                json!({"temperature": 0, "max_tokens": 40}),
            ),
            &extra,
        )
    };
    let (once, _, _) = answer(&post_json(&http, &chat, &long(json!({}))).await);
    let (penalised, _, _) =
        answer(&post_json(&http, &chat, &long(json!({"repetition_penalty": 1.3}))).await);
    assert_ne!(once, penalised);
    for (extra, param) in [
        (json!({"min_tokens": 41}), "min_tokens"),
        (json!({"min_tokens": -1}), "min_tokens"),
        (json!({"stop_token_ids": [49152]}), "stop_token_ids"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
    ] {
        expect_refused(&http, &chat, &ask(extra.clone()), param).await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// vLLM's guided decoding fields: `guided_choice` (and `structured_outputs.choice`) makes
/// the answer one of its texts, on chat and completions, non-ASCII ones too; `guided_regex` one the regex
/// matches whole (streamed the same); `guided_json` (or llama.cpp's `json_schema`) a value of
/// its schema; two of them are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_guided_decoding_shapes_the_answer() {
    let (server, url) = serve(|c| c.max_new_tokens = 160).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let ask = |q: &str, extra: Value| {
        with_fields(
            chat_body(q, json!({"temperature": 0, "max_tokens": 40})),
            &extra,
        )
    };
    let question = "Is 'I love this movie' positive or negative?";
    let free = post_json(&http, &chat, &ask(question, json!({}))).await;
    let free = free["choices"][0]["message"]["content"].as_str().unwrap();
    let moods = ["positive", "negative", "neutral"];
    assert!(
        !moods.contains(&free),
        "unguided, the answer is a sentence: {free:?}"
    );
    for extra in [
        json!({"guided_choice": moods}),
        json!({"structured_outputs": {"choice": moods}}),
        json!({"guided_choice": moods, "temperature": 1.0, "seed": 5}),
    ] {
        let r = post_json(&http, &chat, &ask(question, extra.clone())).await;
        assert!(
            moods.contains(&stopped_content(&r).as_str()),
            "{extra}: {r}"
        );
    }
    // Characters SmolLM2 writes in pieces of their UTF-8 (東 is two tokens, neither whole):
    // the choice is matched over the tokens' bytes.
    let cities = ["東京", "大阪"];
    for seed in [1, 2, 3] {
        let extra = json!({"guided_choice": cities, "temperature": 1.0, "seed": seed});
        let r = post_json(&http, &chat, &ask("Which city?", extra)).await;
        assert!(cities.contains(&stopped_content(&r).as_str()), "{r}");
    }
    // The same inside JSON: an enum of them, and a string in Japanese with no character
    // left half-written at its closing quote.
    for seed in [1, 2, 3] {
        let extra = json!({"guided_json": {"type": "object", "properties": {
                               "city": {"enum": cities}, "note": {"type": "string", "maxLength": 4}},
                               "required": ["city", "note"]},
                           "temperature": 1.0, "seed": seed, "max_tokens": 120});
        let r = post_json(&http, &chat, &ask("東京について日本語で。", extra)).await;
        let v: Value = serde_json::from_str(&stopped_content(&r)).unwrap();
        assert!(cities.contains(&v["city"].as_str().unwrap()), "{r}");
        let note = v["note"].as_str().unwrap();
        assert!(
            note.chars().count() <= 4 && !note.contains('\u{FFFD}'),
            "{r}"
        );
    }
    let r = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &json!({"model": SMOL, "prompt": "Is the sky green? Answer:", "max_tokens": 5,
                "temperature": 0, "guided_choice": ["yes", "no"]}),
    )
    .await;
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(["yes", "no"].contains(&text), "{r}");

    let phone = ask(
        "Give me a US phone number.",
        json!({"guided_regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}),
    );
    let number = stopped_content(&post_json(&http, &chat, &phone).await);
    let b = number.as_bytes();
    assert!(
        b.len() == 14
            && b[0] == b'('
            && b[4..6] == *b") "
            && b[9] == b'-'
            && [&b[1..4], &b[6..9], &b[10..]]
                .iter()
                .all(|d| d.iter().all(u8::is_ascii_digit)),
        "{number:?}"
    );
    let chunks = post_stream(&http, &chat, &with_fields(phone, &json!({"stream": true}))).await;
    let streamed: String = streamed_content(&chunks);
    assert_eq!(streamed, number);

    let cat = stopped_content(
        &post_json(
            &http,
            &chat,
            &ask(
                "Describe a cat as JSON.",
                // llama.cpp's name for it.
                json!({"json_schema": {"type": "object", "properties": {
                    "age": {"type": "integer", "minimum": 0, "maximum": 30}}, "required": ["age"]}}),
            ),
        )
        .await,
    );
    let v: Value = serde_json::from_str(&cat).unwrap();
    assert!((0..=30).contains(&v["age"].as_i64().unwrap()), "{cat}");

    for (extra, param) in [
        (
            json!({"guided_grammar": "root ::= \"a\"", "guided_regex": "a"}),
            "guided_grammar",
        ),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
        ),
        (
            json!({"guided_regex": "a", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        expect_refused(&http, &chat, &ask("hi", extra.clone()), param).await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Whether `text` is one bracketed list of the grammar below, whole: lower-case words or
/// lists, `, ` between them (written apart from the grammar's code, as the check).
fn is_word_list(text: &str) -> bool {
    fn list(b: &[u8], mut i: usize) -> Option<usize> {
        if b.get(i) != Some(&b'[') {
            return None;
        }
        i += 1;
        loop {
            i = match b.get(i) {
                Some(b'[') => list(b, i)?,
                Some(c) if c.is_ascii_lowercase() => {
                    let n = b[i..].iter().take_while(|c| c.is_ascii_lowercase()).count();
                    (n <= 12).then_some(i + n)?
                }
                _ => return None,
            };
            match b.get(i..i + 2) {
                Some(b", ") => i += 2,
                _ if b.get(i) == Some(&b']') => return Some(i + 1),
                _ => return None,
            }
        }
    }
    list(text.as_bytes(), 0) == Some(text.len())
}

/// vLLM's `guided_grammar` (and `structured_outputs.grammar`, and llama.cpp's `grammar`,
/// here on completions): the answer is text a GBNF grammar (or the same in Lark) derives
/// whole, recursive rules included, on chat and completions, streamed the same; characters SmolLM2 writes in pieces of their UTF-8 are taken where the grammar
/// allows them; a grammar that does not compile is refused naming the field, the line and
/// the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gbnf_grammar_shapes_the_answer() {
    let (server, url) = serve(|c| c.max_new_tokens = 160).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let ask = |q: &str, extra: Value| {
        with_fields(
            chat_body(q, json!({"temperature": 0, "max_tokens": 120})),
            &extra,
        )
    };
    let lists = "root ::= list\n\
                 list ::= \"[\" item (\", \" item)* \"]\"  # nested lists too\n\
                 item ::= word | list\n\
                 word ::= [a-z]{1,12}\n";
    // The same language in Lark, as vLLM also takes it.
    let lark_lists = "?start: list\n\
                      list: \"[\" item (\", \" item)* \"]\"  // nested lists too\n\
                      item: WORD\n    | list\n\
                      WORD: /[a-z]{1,12}/\n";
    let question = "Name three fruits.";
    let free = post_json(&http, &chat, &ask(question, json!({}))).await;
    let free = free["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        !is_word_list(free),
        "unguided, the answer is a sentence: {free:?}"
    );
    for extra in [
        json!({"guided_grammar": lists}),
        json!({"structured_outputs": {"grammar": lists}}),
        json!({"guided_grammar": lists, "temperature": 1.0, "seed": 3}),
        json!({"guided_grammar": lists, "temperature": 1.0, "seed": 4}),
        json!({"guided_grammar": lark_lists, "temperature": 1.0, "seed": 3}),
        json!({"structured_outputs": {"grammar": lark_lists}}),
    ] {
        let r = post_json(&http, &chat, &ask(question, extra.clone())).await;
        let text = stopped_content(&r);
        assert!(is_word_list(&text), "{extra}: {text:?}");
    }
    let body = ask(
        question,
        json!({"guided_grammar": lists, "temperature": 1.0, "seed": 3}),
    );
    let whole = stopped_content(&post_json(&http, &chat, &body).await);
    let chunks = post_stream(&http, &chat, &with_fields(body, &json!({"stream": true}))).await;
    let streamed: String = streamed_content(&chunks);
    assert_eq!(streamed, whole);

    let r = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &json!({"model": SMOL, "prompt": "Is the sky green? Answer:", "max_tokens": 8,
                "temperature": 0, "grammar": "root ::= \" \" (\"Yes\" | \"No\") \".\""}),
    )
    .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!([" Yes.", " No."].contains(&text), "{r}");

    // Kanji, hiragana and katakana (SmolLM2 writes most of them as two byte tokens), then "。".
    let japanese = "root ::= [\\u4e00-\\u9fff\\u3041-\\u3096\\u30a1-\\u30fa]{1,8} \"\\u3002\"";
    for seed in [1, 2, 3] {
        let extra = json!({"guided_grammar": japanese, "temperature": 1.0, "seed": seed});
        let text =
            stopped_content(&post_json(&http, &chat, &ask("東京について日本語で。", extra)).await);
        let chars: Vec<char> = text.chars().collect();
        assert!(
            (2..=9).contains(&chars.len())
                && chars.last() == Some(&'\u{3002}')
                && chars[..chars.len() - 1].iter().all(|&c| matches!(c,
                    '\u{4e00}'..='\u{9fff}' | '\u{3041}'..='\u{3096}' | '\u{30a1}'..='\u{30fa}')),
            "{text:?}"
        );
    }

    for (grammar, says) in [
        (
            "root ::= item\n",
            "line 1, column 10: rule `item` is used but not defined",
        ),
        (
            "root ::= root \"a\" | \"b\"",
            "rule `root` is left-recursive",
        ),
        ("start: /a(?=b)/", "line 1, column 8: the regex /a(?=b)/ is not one kandle reads"),
        ("start: \"a\" b", "line 1: rule `b` is used but not defined"),
    ] {
        let body = ask("hi", json!({"guided_grammar": grammar}));
        let r = http.post(&chat).json(&body).send().await.unwrap();
        let e = expect_error(r, 400, grammar).await;
        assert_eq!(e["error"]["param"], "guided_grammar", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{grammar:?}: {message}");
    }
    // Still serving.
    let r = post_json(
        &http,
        &chat,
        &ask(question, json!({"guided_grammar": lists})),
    )
    .await;
    assert!(is_word_list(&stopped_content(&r)));
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `--chat-template` replaces the model's template: chat renders the file's (with the
/// model's special tokens), and a template that does not compile stops the start, naming
/// the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_file_replaces_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.jinja");
    std::fs::write(
        &file,
        "{{ bos_token }}{% for m in messages %}<<{{ m.role }}|{{ m.content }}>>{{ eos_token }}\
         {% endfor %}{% if add_generation_prompt %}<<assistant|{% endif %}",
    )
    .unwrap();
    // The model's own special tokens, as its GGUF template sees them.
    let (bos, eos) = {
        let path = tokio::task::spawn_blocking(models::smollm2_gguf)
            .await
            .unwrap();
        let model = kandle_runtime::backend::load(&kandle_runtime::backend::LoadOptions {
            path,
            ..Default::default()
        })
        .unwrap();
        let kandle_runtime::model::LoadedModel::Generation(g) = model else {
            unreachable!("SmolLM2 generates")
        };
        let (b, e) = g.chat_template.as_ref().unwrap().special_tokens();
        (b.to_owned(), e.to_owned())
    };
    assert!(!bos.is_empty() && !eos.is_empty(), "{bos:?} {eos:?}");
    let f = file.clone();
    let (server, url) = serve(move |c| c.chat_template = Some(f)).await;
    let http = client();
    let rendered = token_ids(
        &http,
        &url,
        json!({"messages": [{"role": "user", "content": "Hi there"}]}),
    )
    .await;
    let expected = token_ids(
        &http,
        &url,
        json!({"prompt": format!("{bos}<<user|Hi there>>{eos}<<assistant|"),
               "add_special_tokens": false}),
    )
    .await;
    assert_eq!(rendered, expected);
    let r = post_json(
        &http,
        &format!("{url}/v1/chat/completions"),
        &chat_body("Hi there", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], expected.len(), "{r}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    std::fs::write(&file, "{% for m in messages %}").unwrap();
    let path = tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    let mut cfg = ServeConfig::new(path);
    cfg.chat_template = Some(file.clone());
    let mut server = server::start(cfg).await.expect("the server starts");
    let err = tokio::time::timeout(Duration::from_secs(120), server.wait_loaded())
        .await
        .expect("the load ends")
        .expect_err("a template that does not compile stops the load")
        .to_string();
    assert!(err.contains("--chat-template"), "{err}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A server of [`tiny_spm_llama_with`]`(tools)`, its file in a directory kept with it.
async fn serve_tiny_spm_llama(tools: ControlTools) -> (tempfile::TempDir, Server, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let path = tokio::task::spawn_blocking(move || tiny_spm_llama_with(&d, tools))
        .await
        .unwrap();
    let (server, url) = serve_model(path, |_| {}).await;
    (dir, server, url)
}

/// Which tool-call format that opens with a control token [`tiny_spm_llama_with`] writes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum ControlTools {
    None,
    /// Mistral 7B v0.3's: `[TOOL_CALLS]` (id 32000) then a JSON list.
    V3,
    /// The v11 tokenizers': `[TOOL_CALLS]` (32000), then the name, `[ARGS]` (32001) and the
    /// arguments, per call.
    V11,
    /// Granite 3's: `<|tool_call|>` (32000) then a JSON list.
    Granite,
    /// DeepSeek-R1's, on DeepSeek LLM's byte-level BPE vocabulary (a SentencePiece decoder
    /// would turn the tokens' `▁` into spaces, as Hugging Face's does): a block
    /// (`<｜tool▁calls▁begin｜>`, `<｜tool▁calls▁end｜>`, the first two ids past the vocabulary's
    /// own) of calls (`<｜tool▁call▁begin｜>`, `<｜tool▁sep｜>`, `<｜tool▁call▁end｜>`, the next
    /// three), each `function`, the name and the arguments in a JSON fence.
    DeepSeekV3,
    /// DeepSeek-V3.1's: the same tokens, each call the name and the arguments.
    DeepSeekV31,
}

/// The llama.cpp vocabulary a [`tiny_spm_llama_with`] of `tools` is built on.
fn base_vocab(tools: ControlTools) -> candle_core::quantized::gguf_file::Content {
    let name = match tools {
        ControlTools::DeepSeekV3 | ControlTools::DeepSeekV31 => "ggml-vocab-deepseek-llm.gguf",
        _ => "ggml-vocab-llama-spm.gguf",
    };
    let mut f = std::fs::File::open(models::llama_cpp_vocabs().join(name)).unwrap();
    candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()
}

/// The id of the first control token [`tiny_spm_llama_with`] appends for `tools`: the base
/// vocabulary's size (32000 for SentencePiece's).
fn first_added_id(tools: ControlTools) -> u32 {
    match base_vocab(tools).metadata.get("tokenizer.ggml.tokens") {
        Some(candle_core::quantized::gguf_file::Value::Array(a)) => a.len() as u32,
        other => panic!("no tokens: {other:?}"),
    }
}

/// DeepSeek's control tokens, in [`ControlTools::DeepSeekV3`]'s order of ids.
const DEEPSEEK_TOKENS: [&str; 5] = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
];

/// A Llama 2 / Mistral-style GGUF without a tokenizer.json: llama.cpp's SentencePiece
/// vocabulary (`ggml-vocab-llama-spm.gguf`, 32000 tokens, `add_bos_token`; DeepSeek LLM's for
/// DeepSeek's formats), a Mistral-style chat template, and a tiny llama of random weights in
/// Q4_0 and Q8_0, written into `dir`; with `tools`, the format's control tokens appended to
/// the vocabulary (from [`first_added_id`] on) and a template that offers tools and writes
/// calls as that format's models do.
fn tiny_spm_llama_with(dir: &std::path::Path, tools: ControlTools) -> std::path::PathBuf {
    use candle_core::quantized::{QTensor, gguf_file};
    let vocab = base_vocab(tools);
    let base = first_added_id(tools) as usize;
    let mut meta: Vec<(String, gguf_file::Value)> = vocab
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.ggml."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let added: &[&str] = match tools {
        ControlTools::None => &[],
        ControlTools::V3 => &["[TOOL_CALLS]"],
        ControlTools::V11 => &["[TOOL_CALLS]", "[ARGS]"],
        ControlTools::Granite => &["<|tool_call|>"],
        ControlTools::DeepSeekV3 | ControlTools::DeepSeekV31 => &DEEPSEEK_TOKENS,
    };
    let n_vocab = base + added.len();
    for (k, v) in meta.iter_mut() {
        if let gguf_file::Value::Array(a) = v {
            for token in added {
                match k.as_str() {
                    "tokenizer.ggml.tokens" => a.push(gguf_file::Value::String(token.to_string())),
                    "tokenizer.ggml.scores" => a.push(gguf_file::Value::F32(0.0)),
                    "tokenizer.ggml.token_type" => a.push(gguf_file::Value::I32(3)),
                    _ => {}
                }
            }
        }
    }
    let template = match tools {
        ControlTools::None => {
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}\
                  {{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}\
                  {{ m['content'] + eos_token }}{% endif %}{% endfor %}"
        }
        ControlTools::V3 => {
            "{{ bos_token }}{% if tools %}{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + \
                 '[/AVAILABLE_TOOLS]' }}{% endif %}{% for m in messages %}\
                 {% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}\
                 {% elif m.tool_calls %}{{ '[TOOL_CALLS] ' + (m.tool_calls | tojson) + eos_token }}\
                 {% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
        }
        // Mistral Small 3.2's way of writing calls.
        ControlTools::V11 => {
            "{{ bos_token }}{% if tools %}{{ '[AVAILABLE_TOOLS]' + (tools | tojson) + \
                 '[/AVAILABLE_TOOLS]' }}{% endif %}{% for m in messages %}\
                 {% if m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}\
                 {% elif m.tool_calls %}{% for tool in m.tool_calls %}\
                 {% set arguments = tool['function']['arguments'] %}\
                 {% if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}\
                 {{ '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}\
                 {% endfor %}{{ eos_token }}\
                 {% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
        }
        // Granite 3's way of offering tools and writing calls.
        ControlTools::Granite => {
            "{% if tools %}{{ '<|start_of_role|>available_tools<|end_of_role|>' + \
                 (tools | tojson) + eos_token }}{% endif %}{% for m in messages %}\
                 {% if m.tool_calls %}{{ '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' \
                 + (m.tool_calls | tojson) + eos_token }}{% else %}\
                 {{ '<|start_of_role|>' + m['role'] + '<|end_of_role|>' + m['content'] + eos_token }}\
                 {% endif %}{% endfor %}{% if add_generation_prompt %}\
                 {{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}"
        }
        // DeepSeek-R1's way of writing calls (its template offers no tools), arguments written
        // as JSON where they come as a map, as vLLM's own DeepSeek templates do.
        ControlTools::DeepSeekV3 => {
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}\
                 {{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m.tool_calls %}\
                 {{ '<｜tool▁calls▁begin｜>' }}{% for tool in m.tool_calls %}\
                 {% set arguments = tool['function']['arguments'] %}\
                 {% if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}\
                 {{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + \
                 tool['function']['name'] + '\\n' + '```json' + '\\n' + \
                 arguments + '\\n' + '```' + '<｜tool▁call▁end｜>' }}\
                 {% endfor %}{{ '<｜tool▁calls▁end｜>' + eos_token }}\
                 {% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
        }
        // DeepSeek-V3.1's.
        ControlTools::DeepSeekV31 => {
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}\
                 {{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m.tool_calls %}\
                 {{ '<｜tool▁calls▁begin｜>' }}{% for tool in m.tool_calls %}\
                 {% set arguments = tool['function']['arguments'] %}\
                 {% if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}\
                 {{ '<｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + \
                 arguments + '<｜tool▁call▁end｜>' }}\
                 {% endfor %}{{ '<｜tool▁calls▁end｜>' + eos_token }}\
                 {% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
        }
    };
    let u32v = gguf_file::Value::U32;
    for (k, v) in [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", u32v(2)),
        ("llama.embedding_length", u32v(64)),
        ("llama.feed_forward_length", u32v(128)),
        ("llama.attention.head_count", u32v(2)),
        ("llama.attention.head_count_kv", u32v(1)),
        ("llama.rope.dimension_count", u32v(32)),
        ("llama.context_length", u32v(512)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
        (
            "tokenizer.chat_template",
            gguf_file::Value::String(template.into()),
        ),
    ] {
        meta.push((k.into(), v));
    }
    let tensors = random_llama_tensors(n_vocab, 2, 1, 32);
    let out = dir.join("tiny-spm-llama.gguf");
    let mut w = std::fs::File::create(&out).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut w, &meta, &tensors).unwrap();
    out
}

/// The tensors of a two-layer llama GGUF with random weights (hidden 64, MLP 128; embeddings
/// and values in Q8_0, the other matrices in Q4_0): `heads` query heads on `kv_heads`, each
/// `head_dim` wide, and `n_vocab` tokens (the head tied to the embeddings).
fn random_llama_tensors(
    n_vocab: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Vec<(String, candle_core::quantized::QTensor)> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let mut seed = 7u64;
    let mut tensor = |n: usize, k: usize, dtype: GgmlDType, scale: f32| {
        let x: Vec<f32> = (0..n * k)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        let shape: Vec<usize> = if n == 1 { vec![k] } else { vec![n, k] };
        let t = candle_core::Tensor::from_vec(x, shape, &candle_core::Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    let mut tensors = vec![
        (
            "token_embd.weight".to_owned(),
            tensor(n_vocab, 64, GgmlDType::Q8_0, 2.0),
        ),
        (
            "output_norm.weight".to_owned(),
            tensor(1, 64, GgmlDType::F32, 0.2),
        ),
    ];
    for i in 0..2 {
        for (name, n, k, dtype) in [
            ("attn_q", q, 64, GgmlDType::Q4_0),
            ("attn_k", kv, 64, GgmlDType::Q4_0),
            ("attn_v", kv, 64, GgmlDType::Q8_0),
            ("attn_output", 64, q, GgmlDType::Q4_0),
            ("ffn_gate", 128, 64, GgmlDType::Q4_0),
            ("ffn_up", 128, 64, GgmlDType::Q4_0),
            ("ffn_down", 64, 128, GgmlDType::Q8_0),
        ] {
            tensors.push((format!("blk.{i}.{name}.weight"), tensor(n, k, dtype, 0.5)));
        }
        for name in ["attn_norm", "ffn_norm"] {
            let mut t = tensor(1, 64, GgmlDType::F32, 0.2);
            // Norm weights near one.
            let ones =
                candle_core::Tensor::ones(64, candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap();
            t = QTensor::quantize(
                &(t.dequantize(&candle_core::Device::Cpu).unwrap() + ones).unwrap(),
                GgmlDType::F32,
            )
            .unwrap();
            tensors.push((format!("blk.{i}.{name}.weight"), t));
        }
    }
    tensors
}

/// Mistral Small 3.1's way of writing a conversation (its template, shortened): today's date
/// in the default system prompt, `[SYSTEM_PROMPT]`, the tools as JSON, `[INST]` turns, calls
/// after `[TOOL_CALLS]`.
const MISTRAL_SMALL_TEMPLATE: &str = "{%- set today = strftime_now('%Y-%m-%d') %}\
    {%- set default_system_message = 'You are Mistral Small 3. Today is ' + today + '.' %}\
    {{- bos_token }}\
    {%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}\
    {%- set loop_messages = messages[1:] %}{%- else %}\
    {%- set system_message = default_system_message %}{%- set loop_messages = messages %}\
    {%- endif %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\
    {%- if tools %}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}\
    {%- for message in loop_messages %}{%- if message['role'] == 'user' %}\
    {{- '[INST]' + message['content'] + '[/INST]' }}{%- elif message.tool_calls %}\
    {{- '[TOOL_CALLS]' + (message.tool_calls | tojson) + eos_token }}{%- else %}\
    {{- message['content'] + eos_token }}{%- endif %}{%- endfor %}";

/// A GGUF shaped as Mistral Small 3 and Mistral NeMo are: llama architecture, heads narrower
/// than the hidden size over the heads (24 where 64 / 4 is 16, `key_length`), Mistral NeMo's
/// Tekken vocabulary (control tokens 34 and 35 named `[THINK]` and `[/THINK]`, as
/// Magistral's are) and no tokenizer.json, a 32,768-token context, the template above;
/// random weights. Returns the file.
fn mistral_small_shaped_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    use candle_core::quantized::{
        QTensor,
        gguf_file::{self, Value as V},
    };
    let mut meta = tekken::tekken().meta;
    let n_vocab = match &mut meta[2].1 {
        V::Array(tokens) => {
            // Magistral's names for two of NeMo's unnamed control tokens.
            tokens[THINK as usize] = V::String("[THINK]".into());
            tokens[END_THINK as usize] = V::String("[/THINK]".into());
            tokens.len()
        }
        other => panic!("tokens: {other:?}"),
    };
    for (k, v) in [
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(2)),
        ("llama.embedding_length", V::U32(64)),
        ("llama.feed_forward_length", V::U32(128)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.attention.key_length", V::U32(24)),
        ("llama.attention.value_length", V::U32(24)),
        ("llama.rope.dimension_count", V::U32(24)),
        ("llama.rope.freq_base", V::F32(1e9)),
        ("llama.context_length", V::U32(32768)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        (
            "tokenizer.chat_template",
            V::String(MISTRAL_SMALL_TEMPLATE.into()),
        ),
    ] {
        meta.push((k.into(), v));
    }
    let tensors = random_llama_tensors(n_vocab, 4, 2, 24);
    let out = dir.join("mistral-small-shaped.gguf");
    let meta: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(&out).unwrap(), &meta, &tensors).unwrap();
    out
}

/// [`mistral_small_shaped_gguf`] written off the async executor: the directory (removed when
/// dropped) and the file.
async fn mistral_small_shaped() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || mistral_small_shaped_gguf(&dir)
    })
    .await
    .unwrap();
    (dir, path)
}

/// Qwen2.5-7B-Instruct's chat template, as llama.cpp keeps it
/// (`models/templates/Qwen-Qwen2.5-7B-Instruct.jinja` in llama-cpp-python 0.3.36's source).
const QWEN2_5_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// A GGUF shaped as Qwen2.5's are: `qwen2` (Q, K and V biases; no `rope.dimension_count`, as
/// Qwen files leave it out), Qwen's vocabulary as llama.cpp's `ggml-vocab-qwen2.gguf` holds it
/// (151,936 tokens, `<|im_start|>` and `<|im_end|>` control tokens, no tokenizer.json beside
/// it), Qwen2.5-7B-Instruct's own template, a 32,768-token context; random weights.
fn qwen2_5_shaped_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    use candle_core::quantized::gguf_file::{self, Value as V};
    use candle_core::quantized::{GgmlDType, QTensor};
    let mut f =
        std::fs::File::open(models::llama_cpp_vocabs().join("ggml-vocab-qwen2.gguf")).unwrap();
    let vocab = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, V)> = (vocab.metadata.iter())
        .filter(|(k, _)| k.starts_with("tokenizer.ggml."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let n_vocab = match &vocab.metadata["tokenizer.ggml.tokens"] {
        V::Array(a) => a.len(),
        other => panic!("tokens: {other:?}"),
    };
    for (k, v) in [
        ("general.architecture", V::String("qwen2".into())),
        ("qwen2.block_count", V::U32(2)),
        ("qwen2.embedding_length", V::U32(64)),
        ("qwen2.feed_forward_length", V::U32(128)),
        ("qwen2.attention.head_count", V::U32(4)),
        ("qwen2.attention.head_count_kv", V::U32(2)),
        ("qwen2.rope.freq_base", V::F32(1e6)),
        ("qwen2.context_length", V::U32(32768)),
        ("qwen2.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        (
            "tokenizer.chat_template",
            V::String(QWEN2_5_TEMPLATE.into()),
        ),
    ] {
        meta.push((k.into(), v));
    }
    let mut tensors = random_llama_tensors(n_vocab, 4, 2, 16);
    for i in 0..2 {
        for (name, n) in [("attn_q", 64), ("attn_k", 32), ("attn_v", 32)] {
            let b: Vec<f32> = (0..n)
                .map(|j| ((j * 11 + i * 5) % 13) as f32 / 13.0 - 0.5)
                .collect();
            let t = candle_core::Tensor::new(b.as_slice(), &candle_core::Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
            tensors.push((format!("blk.{i}.{name}.bias"), q));
        }
    }
    let out = dir.join("qwen2.5-shaped.gguf");
    let meta: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(&out).unwrap(), &meta, &tensors).unwrap();
    out
}

/// A Qwen2.5-shaped GGUF ([`qwen2_5_shaped_gguf`]) served end to end: the chat prompt is
/// Qwen's ChatML with its default system prompt, `<|im_start|>` and `<|im_end|>` as the
/// control tokens between the texts' own tokens and no beginning-of-text token (nor for a
/// completion prompt); a past tool call renders in Hermes' `<tool_call>` with its arguments as
/// JSON; a forced call gives arguments its tool's parameters accept; streamed answers equal
/// whole ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_5_shaped_gguf_serves_chatml_and_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let path = tokio::task::spawn_blocking(move || qwen2_5_shaped_gguf(&d))
        .await
        .unwrap();
    let (server, url) = serve_model(path, |c| c.max_new_tokens = 40).await;
    let http = client();
    let model = "qwen2.5-shaped";
    let tokenize = |body: Value| model_token_ids(&http, &url, model, body);
    let text = |t: &'static str| tokenize(json!({"prompt": t, "add_special_tokens": false}));
    let (start, end) = (151644, 151645);
    let chat_ids = tokenize(json!({"messages": [{"role": "user", "content": "Hi"}]})).await;
    let want = [
        &[start][..],
        &text("system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.").await,
        &[end],
        &text("\n").await,
        &[start],
        &text("user\nHi").await,
        &[end],
        &text("\n").await,
        &[start],
        &text("assistant\n").await,
    ]
    .concat();
    assert_eq!(chat_ids, want);
    let r = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &json!({"model": model, "prompt": "Hello world", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(
        r["usage"]["prompt_tokens"],
        text("Hello world").await.len(),
        "{r}"
    );

    // A past call and its result, as the template writes them.
    let history = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]});
    let ids = tokenize(history).await;
    let rendered = post_json(
        &http,
        &format!("{url}/detokenize"),
        &json!({"model": model, "tokens": ids}),
    )
    .await;
    let rendered = rendered["prompt"].as_str().unwrap();
    let call = "<|im_start|>assistant\n<tool_call>\n\
        {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
        <|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>";
    assert!(rendered.contains(call), "{rendered}");

    let chat = format!("{url}/v1/chat/completions");
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"], "additionalProperties": false}}});
    let body = json!({"model": model,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [weather], "temperature": 0, "max_tokens": 40,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let r = post_json(&http, &chat, &body).await;
    let call = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{r}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(
        args["city"].is_string() && args.as_object().unwrap().len() == 1,
        "{args}"
    );

    let plain = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 1.0, "seed": 5, "max_tokens": 24});
    let whole = post_json(&http, &chat, &plain).await;
    let content = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!content.is_empty(), "{whole}");
    let chunks = post_stream(&http, &chat, &with_fields(plain, &json!({"stream": true}))).await;
    assert_eq!(streamed_content(&chunks), content);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Magistral's control tokens that open and close its thoughts.
const THINK: u32 = 34;
const END_THINK: u32 = 35;

/// `--reasoning-parser mistral` (Magistral, vLLM's parser of that name) on a Mistral
/// Small-shaped GGUF whose vocabulary has `[THINK]` and `[/THINK]`. Its random weights are
/// steered with `logit_bias`: an answer that does not think is all content, with no
/// reasoning; a constrained answer may open with `[THINK]`, its thoughts then free until
/// `[/THINK]` and the constraint holding after them, or go straight to what the constraint
/// allows; streamed answers carry the same parts. A vocabulary without the tokens stops the
/// start, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistral_s_thoughts_lie_between_its_control_tokens() {
    use kandle_runtime::reasoning::ReasoningParser;
    let (_dir, path) = mistral_small_shaped().await;
    let (server, url) = serve_model(path, |c| {
        c.reasoning_parser = Some(ReasoningParser::Mistral);
        c.max_new_tokens = 40;
    })
    .await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let body = |extra: Value| {
        with_fields(
            json!({"model": "mistral-small-shaped", "temperature": 0, "max_tokens": 12,
                   "messages": [{"role": "user", "content": "Is it raining in Paris?"}]}),
            &extra,
        )
    };
    let bias = |think: i32, end: i32| json!({THINK.to_string(): think, END_THINK.to_string(): end});
    // Whole, then streamed: (reasoning, content) of each, which must agree.
    let answer = |b: Value| {
        let (http, chat) = (&http, &chat);
        async move {
            let whole = post_json(http, chat, &b).await;
            let m = &whole["choices"][0]["message"];
            assert_eq!(m["reasoning"], m["reasoning_content"], "{whole}");
            let chunks = post_stream(http, chat, &with_fields(b, &json!({"stream": true}))).await;
            let streamed = streamed_field(&chunks, "reasoning");
            assert_eq!(streamed, streamed_field(&chunks, "reasoning_content"));
            assert_eq!(streamed, m["reasoning"].as_str().unwrap_or(""), "{whole}");
            assert_eq!(
                streamed_content(&chunks),
                m["content"].as_str().unwrap_or("")
            );
            (m["reasoning"].clone(), m["content"].clone())
        }
    };

    // No thoughts: all content, no reasoning.
    let (reasoning, content) = answer(body(json!({"logit_bias": bias(-100, -100)}))).await;
    assert_eq!(reasoning, Value::Null);
    assert!(content.as_str().is_some_and(|c| !c.is_empty()), "{content}");

    // Constrained: [THINK] may open the answer; [/THINK] closes the thoughts (empty here),
    // then the constraint holds.
    let choice = json!({"guided_choice": ["yes", "no"]});
    let thinking = with_fields(body(choice.clone()), &json!({"logit_bias": bias(50, 100)}));
    let (reasoning, content) = answer(thinking).await;
    assert_eq!(reasoning, "");
    assert!(
        ["yes", "no"].contains(&content.as_str().unwrap()),
        "{content}"
    );
    // Or the answer goes straight to the choice, without thoughts.
    let straight = with_fields(body(choice), &json!({"logit_bias": bias(-100, 100)}));
    let (reasoning, content) = answer(straight).await;
    assert_eq!(reasoning, Value::Null);
    assert!(
        ["yes", "no"].contains(&content.as_str().unwrap()),
        "{content}"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    // SmolLM2's vocabulary has no [THINK].
    let mut cfg = kandle_runtime::ServeConfig::new(
        tokio::task::spawn_blocking(models::smollm2_gguf)
            .await
            .unwrap(),
    );
    cfg.reasoning_parser = Some(ReasoningParser::Mistral);
    let mut server = server::start(cfg).await.expect("server starts");
    let e = server
        .wait_loaded()
        .await
        .expect_err("a vocabulary without [THINK]");
    assert!(
        e.to_string()
            .contains("--reasoning-parser mistral: the vocabulary has no [THINK] and [/THINK]"),
        "{e}"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A Mistral Small 3-shaped GGUF ([`mistral_small_shaped_gguf`]) served end to end: its
/// context is its own; a chat prompt is the template's one beginning-of-text token, its
/// control tokens by id, today's date in the default system prompt and the user's text in
/// Tekken's tokens; a completion prompt gets the beginning-of-text token llama.cpp gives a
/// Tekken vocabulary; a `suffix` fills the middle as mistral-common lays it out; answers
/// stream as the same text they answer whole; the template's `[TOOL_CALLS]` chooses
/// Mistral's call format, and a forced call's arguments follow the tool's parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistral_small_shaped_gguf_serves_with_its_own_vocabulary() {
    let (_dir, path) = mistral_small_shaped().await;
    let (server, url) = serve_model(path, |c| c.max_new_tokens = 40).await;
    let http = client();
    let model = "mistral-small-shaped";
    let models = http
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 32768, "{models}");
    let tokenize = |body: Value| model_token_ids(&http, &url, model, body);
    let question = "What is the weather in Paris?";
    let chat_ids = tokenize(json!({"messages": [{"role": "user", "content": question}]})).await;
    let text_ids = tokenize(json!({"prompt": question, "add_special_tokens": false})).await;
    // <s> [SYSTEM_PROMPT] … [/SYSTEM_PROMPT] [INST] question [/INST]
    assert_eq!(chat_ids[..2], [1, 17], "{chat_ids:?}");
    assert_eq!(
        chat_ids.iter().filter(|&&t| t == 1).count(),
        1,
        "{chat_ids:?}"
    );
    let inst = chat_ids.iter().position(|&t| t == 3).expect("[INST]");
    assert_eq!(chat_ids[inst + 1..], [&text_ids[..], &[4]].concat()[..]);
    let prompt = post_json(
        &http,
        &format!("{url}/detokenize"),
        &json!({"model": model, "tokens": chat_ids}),
    )
    .await;
    let today = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .unwrap();
    let today = String::from_utf8(today.stdout).unwrap();
    let prompt = prompt["prompt"].as_str().unwrap();
    assert!(
        prompt.contains(&format!("Today is {}.", today.trim())),
        "{prompt}"
    );
    // A completion prompt: the beginning-of-text token, then the text's tokens.
    let r = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &json!({"model": model, "prompt": question, "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], text_ids.len() + 1, "{r}");

    // Fill in the middle (`suffix`), as mistral-common's encode_fim lays it out:
    // <s>[SUFFIX] suffix [PREFIX] prompt, the suffix's tokens those of "☺" + suffix less two.
    let (code, after) = ("def add(a, b):\n    return", "\n\nprint(add(1, 2))");
    let lead = tokenize(json!({"prompt": format!("☺{after}"), "add_special_tokens": false})).await;
    let before = tokenize(json!({"prompt": code, "add_special_tokens": false})).await;
    let control = |name: &str| tokenize(json!({"prompt": name, "add_special_tokens": false}));
    let (suffix_id, prefix_id) = (control("[SUFFIX]").await, control("[PREFIX]").await);
    assert_eq!((&suffix_id[..], &prefix_id[..]), (&[16][..], &[14][..]));
    let laid_out = [&[1][..], &suffix_id, &lead[2..], &prefix_id, &before].concat();
    let completions = format!("{url}/v1/completions");
    let by_ids = post_json(
        &http,
        &completions,
        &json!({"model": model, "prompt": laid_out, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    let fim = post_json(
        &http,
        &completions,
        &json!({"model": model, "prompt": code, "suffix": after, "max_tokens": 6,
                "temperature": 0}),
    )
    .await;
    assert_eq!(
        fim["choices"][0]["text"], by_ids["choices"][0]["text"],
        "{fim}"
    );
    assert_eq!(fim["usage"], by_ids["usage"], "{fim}");
    let r = http
        .post(&completions)
        .json(&json!({"model": model, "prompt": code, "suffix": after, "echo": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        expect_error(r, 400, "echo with suffix").await["error"]["param"],
        "echo"
    );

    let chat = format!("{url}/v1/chat/completions");
    let body = json!({"model": model, "messages": [{"role": "user", "content": question}],
                      "temperature": 0, "max_tokens": 12});
    let whole = post_json(&http, &chat, &body).await;
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let chunks = post_stream(
        &http,
        &chat,
        &with_fields(body.clone(), &json!({"stream": true})),
    )
    .await;
    assert_eq!(streamed_content(&chunks), text);

    let tools = json!([{"type": "function", "function": {"name": "weather_now",
        "parameters": {"type": "object", "properties": {
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]}}}]);
    let forced = with_fields(
        body.clone(),
        &json!({"tools": tools, "tool_choice": "required", "max_tokens": 40}),
    );
    let r = post_json(&http, &chat, &forced).await;
    let (f, args) = only_call(&r);
    assert_eq!(f["name"], "weather_now", "{r}");
    assert!(
        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{r}"
    );
    // "auto" is read in Mistral's format, which the template shows.
    let auto = with_fields(body, &json!({"tools": tools, "max_tokens": 8}));
    let r = post_json(&http, &chat, &auto).await;
    assert!(
        r["choices"][0]["message"].is_object(),
        "\"auto\" accepted: {r}"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A SentencePiece GGUF served end to end: the beginning-of-text token once (the template's
/// `bos_token` for chat, `add_bos_token` for a completion prompt), the SentencePiece pieces
/// of the text after it, and random answers (byte-fallback pieces among them) that stream
/// as the same text they answer whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentencepiece_gguf_without_a_tokenizer_json_serves_chat_and_completions() {
    let (_dir, server, url) = serve_tiny_spm_llama(ControlTools::None).await;
    let http = client();
    let model = "tiny-spm-llama";
    let tokenize = |body: Value| model_token_ids(&http, &url, model, body);
    // Chat: "<s>" from the template, then "▁[INST] ▁Hi ▁[/INST]"'s pieces; no second BOS.
    let chat_ids = tokenize(json!({"messages": [{"role": "user", "content": "Hi"}]})).await;
    let text_ids =
        tokenize(json!({"prompt": "[INST] Hi [/INST]", "add_special_tokens": false})).await;
    assert_eq!(chat_ids[0], 1, "{chat_ids:?}");
    assert_eq!(chat_ids[1..], text_ids[..], "{chat_ids:?}");
    assert_ne!(text_ids[0], 1);
    // A completion prompt gets the BOS the vocabulary asks for.
    let prompt_ids = tokenize(json!({"prompt": "Hello world"})).await;
    assert_eq!(prompt_ids[0], 1);
    assert_eq!(
        prompt_ids[1..],
        tokenize(json!({"prompt": "Hello world", "add_special_tokens": false})).await[..]
    );
    for (route, body) in [
        (
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "Hello world"}),
        ),
    ] {
        let url = format!("{url}{route}");
        let body = with_fields(
            body,
            &json!({"temperature": 1.0, "seed": 11, "max_tokens": 48}),
        );
        let whole = post_json(&http, &url, &body).await;
        let choice = &whole["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or_else(|| panic!("{whole}"))
            .to_owned();
        assert!(!text.is_empty(), "{whole}");
        let chunks = post_stream(&http, &url, &with_fields(body, &json!({"stream": true}))).await;
        let streamed: String = chunks
            .iter()
            .filter_map(|c| {
                let c = &c["choices"][0];
                c["delta"]["content"].as_str().or(c["text"].as_str())
            })
            .collect();
        assert_eq!(streamed, text, "{route}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Mistral's tool calls (`--tool-call-parser mistral`) and Granite 3's (`granite`), each chosen
/// here by the template: once the model samples the format's control token (`[TOOL_CALLS]` or
/// `<|tool_call|>`, forced with `logit_bias`, as a tiny random model would never choose it),
/// the rest is masked to a list of calls of the request's tools, read back as `tool_calls`,
/// streamed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_tool_calls_open_with_their_control_token() {
    for tools in [ControlTools::V3, ControlTools::Granite] {
        list_calls_open_with_their_control_token(tools).await;
    }
}

async fn list_calls_open_with_their_control_token(tools: ControlTools) {
    let (_dir, server, url) = serve_tiny_spm_llama(tools).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let body = json!({
        "model": "tiny-spm-llama",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"]}}}],
        "parallel_tool_calls": false,
        "logit_bias": {"32000": 100},
        "temperature": 0,
        "max_tokens": 64,
    });
    let r = post_json(&http, &chat, &body).await;
    let (f, args) = only_call(&r);
    assert_eq!(f["name"], "get_weather", "{tools:?}");
    assert!(
        ["Paris", "Rome"].contains(&args["city"].as_str().unwrap()),
        "{args}"
    );

    let chunks = post_stream(
        &http,
        &chat,
        &with_fields(body.clone(), &json!({"stream": true})),
    )
    .await;
    assert_eq!(&only_streamed_call(&chunks)["function"], f);
    assert!(
        chunks.iter().all(|c| c["choices"][0]["delta"]["content"]
            .as_str()
            .is_none_or(|t| t.is_empty())),
        "{chunks:?}"
    );
    // Without the token the answer is text.
    let mut plain = body;
    plain.as_object_mut().unwrap().remove("logit_bias");
    let r = post_json(&http, &chat, &plain).await;
    assert!(r["choices"][0]["message"]["tool_calls"].is_null(), "{tools:?}: {r}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Mistral's v11 tool calls (`[TOOL_CALLS]name[ARGS]{…}`) and DeepSeek's two formats
/// (`<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>`, `function`, `<｜tool▁sep｜>`,
/// the name and fenced arguments for R1; the name, `<｜tool▁sep｜>` and the arguments for V3.1;
/// then `<｜tool▁call▁end｜>`, and `<｜tool▁calls▁end｜>`), each chosen here by the template: once
/// the model samples the format's first token (forced with `logit_bias`), the name is masked
/// to the tools' names among the format's tokens and text, and the arguments to that tool's
/// parameters; read back as `tool_calls`, streamed or not, and a past call in the history
/// renders in the format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tool_calls_are_masked_part_by_part() {
    for tools in [
        ControlTools::V11,
        ControlTools::DeepSeekV3,
        ControlTools::DeepSeekV31,
    ] {
        named_calls_are_masked_part_by_part(tools).await;
    }
}

/// The text a call of `name` with `args` is written as in `tools`' format, and the control
/// tokens a past call in the prompt holds (offsets from [`first_added_id`]).
fn named_call_text(tools: ControlTools, name: &str, args: &str) -> (String, Vec<u32>) {
    match tools {
        ControlTools::V11 => (format!("[TOOL_CALLS]{name}[ARGS]{args}"), vec![0, 1]),
        ControlTools::DeepSeekV3 => (
            format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n\
                 {args}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            ),
            vec![0, 2, 3, 4, 1],
        ),
        ControlTools::DeepSeekV31 => (
            format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{args}\
                 <｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            ),
            vec![0, 2, 3, 4, 1],
        ),
        other => panic!("not a named format: {other:?}"),
    }
}

async fn named_calls_are_masked_part_by_part(kind: ControlTools) {
    let (_dir, server, url) = serve_tiny_spm_llama(kind).await;
    let first = first_added_id(kind);
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let tool = |name: &str, params: Value| json!({"type": "function", "function": {"name": name, "parameters": params}});
    let body = json!({
        "model": "tiny-spm-llama",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [
            tool("get_weather", json!({"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                       "required": ["city"]})),
            tool("get_time", json!({"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                    "required": ["zone"]})),
        ],
        "parallel_tool_calls": false,
        "logit_bias": {first.to_string(): 100},
        "temperature": 0,
        "max_tokens": 64,
    });
    let mut names = Vec::new();
    for seed in 0..6 {
        let body = with_fields(body.clone(), &json!({"temperature": 1.0, "seed": seed}));
        let r = post_json(&http, &chat, &body).await;
        let (f, args) = only_call(&r);
        let name = f["name"].as_str().unwrap().to_owned();
        let allowed: &[&str] = match name.as_str() {
            "get_weather" => &["Paris", "Rome"],
            "get_time" => &["UTC", "CET"],
            other => panic!("{kind:?}: not a tool: {other:?}"),
        };
        let key = if name == "get_weather" {
            "city"
        } else {
            "zone"
        };
        assert!(allowed.contains(&args[key].as_str().unwrap()), "{args}");
        names.push(name);
    }
    assert!(
        names.iter().any(|n| n == "get_weather") && names.iter().any(|n| n == "get_time"),
        "{kind:?}: {names:?}"
    );

    // The answer as the model wrote it, token by token: the format's parts (v11's, not
    // v0.3's list).
    let r = post_json(
        &http,
        &chat,
        &with_fields(body.clone(), &json!({"logprobs": true})),
    )
    .await;
    let written: String = (r["choices"][0]["logprobs"]["content"].as_array())
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    let whole = &r["choices"][0]["message"]["tool_calls"][0]["function"];
    let (name, args) = (whole["name"].as_str().unwrap(), whole["arguments"].as_str().unwrap());
    // The arguments as written (the answer's are compacted): what lies between the parts.
    let (model, _) = named_call_text(kind, name, "\u{0}");
    let (head, tail) = model.split_once('\u{0}').unwrap();
    assert!(written.starts_with(head) && written.ends_with(tail), "{kind:?}: {written:?}");
    let written_args: Value = serde_json::from_str(&written[head.len()..written.len() - tail.len()])
        .unwrap_or_else(|e| panic!("{kind:?}: {written:?}: {e}"));
    assert_eq!(written_args.to_string(), args);
    let chunks = post_stream(
        &http,
        &chat,
        &with_fields(body.clone(), &json!({"stream": true})),
    )
    .await;
    assert_eq!(&only_streamed_call(&chunks)["function"], whole);

    // A past call renders as the model writes one.
    let history = json!({"messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function",
            "function": {"name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}]},
    ]});
    let mut history = history;
    history["model"] = json!("tiny-spm-llama");
    let r = post_json(&http, &format!("{url}/tokenize"), &history).await;
    let ids: Vec<u32> =
        serde_json::from_value(r["tokens"].clone()).unwrap_or_else(|_| panic!("{r}"));
    let control: Vec<u32> = ids.iter().filter_map(|&t| t.checked_sub(first)).collect();
    assert_eq!(control, named_call_text(kind, "", "").1, "{kind:?}: {ids:?}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// With `--reasoning-parser deepseek_r1` a chat answer's thoughts (up to `</think>`) come in
/// `reasoning_content` (and vLLM's `reasoning`) and the rest in `content`, streamed or not,
/// with every log-probability; an answer cut before it closes its thoughts is all reasoning;
/// a constrained answer thinks freely, then the constraint applies; a prompt that closes the
/// thoughts makes it all content. SmolLM2, taught the format by example, writes
/// `…</think>answer` greedily; what it writes is read from `/v1/completions` of the same
/// prompt, which no parser touches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_parser_puts_the_thoughts_apart_from_the_answer() {
    let (server, url) = serve(|c| {
        c.reasoning_parser = Some(kandle_runtime::reasoning::ReasoningParser::DeepSeekR1)
    })
    .await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let mut messages = vec![json!({"role": "system",
        "content": "Think first, then close your thoughts with </think> and answer."})];
    for (q, a) in [
        ("What is 2+3?", "2 plus 3 makes 5.</think>The answer is 5."),
        ("What is 4+4?", "4 plus 4 makes 8.</think>The answer is 8."),
        ("What is 6+1?", "6 plus 1 makes 7.</think>The answer is 7."),
    ] {
        messages.push(json!({"role": "user", "content": q}));
        messages.push(json!({"role": "assistant", "content": a}));
    }
    messages.push(json!({"role": "user", "content": "What is 3+5?"}));
    let ids = token_ids(&http, &url, json!({"messages": messages})).await;
    let raw = |max: u32| {
        let (http, url, ids) = (&http, &url, &ids);
        async move {
            let r = post_json(
                http,
                &format!("{url}/v1/completions"),
                &json!({"model": SMOL, "prompt": ids, "temperature": 0, "max_tokens": max}),
            )
            .await;
            r["choices"][0]["text"].as_str().unwrap().to_owned()
        }
    };
    let whole = raw(40).await;
    let (thought, answer) = whole
        .split_once("</think>")
        .unwrap_or_else(|| panic!("SmolLM2 did not close its thoughts: {whole:?}"));
    assert!(
        !thought.is_empty() && !answer.trim().is_empty(),
        "{whole:?}"
    );

    let body = json!({"model": SMOL, "messages": messages, "temperature": 0, "max_tokens": 40});
    let r = post_json(&http, &chat, &body).await;
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], thought, "{r}");
    // vLLM's field too, with the same text.
    assert_eq!(m["reasoning"], thought, "{r}");
    assert_eq!(m["content"], answer, "{r}");

    let streamed = with_fields(
        body.clone(),
        &json!({"stream": true, "logprobs": true, "stream_options": {"include_usage": true}}),
    );
    let chunks = post_stream(&http, &chat, &streamed).await;
    assert_eq!(streamed_field(&chunks, "reasoning_content"), thought);
    assert_eq!(streamed_field(&chunks, "reasoning"), thought);
    assert_eq!(streamed_field(&chunks, "content"), answer);
    let lps: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        lps as u64,
        usage["completion_tokens"].as_u64().unwrap(),
        "{usage}"
    );

    // Cut before the thoughts close: all reasoning, no content.
    let cut = raw(3).await;
    assert!(!cut.contains("</think>"), "{cut:?}");
    let r = post_json(
        &http,
        &chat,
        &with_fields(body.clone(), &json!({"max_tokens": 3})),
    )
    .await;
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], cut.as_str(), "{r}");
    assert_eq!(m["content"], Value::Null, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length");

    // A constrained answer thinks first: the mask applies after the thoughts close.
    let choices = ["7", "8", "9"];
    let guided = with_fields(body.clone(), &json!({"guided_choice": choices}));
    let r = post_json(&http, &chat, &guided).await;
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], thought, "{r}");
    assert!(choices.contains(&m["content"].as_str().unwrap()), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let chunks = post_stream(&http, &chat, &with_fields(guided, &json!({"stream": true}))).await;
    assert_eq!(streamed_field(&chunks, "reasoning_content"), thought);
    assert_eq!(
        streamed_field(&chunks, "content"),
        m["content"].as_str().unwrap()
    );
    let json_mode = json!({"response_format": {"type": "json_object"}, "max_tokens": 60});
    let r = post_json(&http, &chat, &with_fields(body.clone(), &json_mode)).await;
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], thought, "{r}");
    let answer: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
    assert!(answer.is_object(), "{r}");

    // A prompt that closes the thoughts itself (here a prefilled answer; Qwen3's template
    // with `enable_thinking: false`): the answer is all content, constrained from its start.
    let mut prefilled = messages.clone();
    prefilled.push(json!({"role": "assistant", "content": "3 plus 5 makes 8.</think>"}));
    let cont = json!({"messages": prefilled, "continue_final_message": true,
                      "add_generation_prompt": false, "guided_choice": choices});
    let r = post_json(&http, &chat, &with_fields(body, &cont)).await;
    let m = &r["choices"][0]["message"];
    assert!(
        m.get("reasoning_content").is_none() && m.get("reasoning").is_none(),
        "{r}"
    );
    assert!(choices.contains(&m["content"].as_str().unwrap()), "{r}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A reasoning model's tool calls: the thoughts go to `reasoning_content` and the calls are
/// read from what follows them, masked to the request's tools from `</think>` on, whether
/// chosen by the model (`auto`, Hermes) or forced (a named tool). SmolLM2, shown three
/// answers that think then call `get_weather(city)`, thinks the same way unmasked
/// (`"none"`) and masked, then calls the tool the request lists. Cut before the thoughts
/// close, an answer holds no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_model_s_tool_calls_follow_its_thoughts() {
    let (server, url) = serve(|c| {
        c.reasoning_parser = Some(kandle_runtime::reasoning::ReasoningParser::DeepSeekR1);
        c.tool_call_parser = Some(ToolCallParser::Hermes);
        c.max_new_tokens = 120;
    })
    .await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let mut rome = weather_shots(ToolCallParser::Hermes, "What is the weather in Rome?");
    for m in rome["messages"].as_array_mut().unwrap() {
        if m["role"] == "assistant" {
            let call = m["content"].as_str().unwrap();
            let city = call.split('"').rev().nth(1).unwrap();
            m["content"] = json!(format!(
                "The user asks for the weather in {city}, so I call get_weather.</think>{call}"
            ));
        }
    }
    let rome = with_fields(rome, &json!({"tools": weather_now(), "max_tokens": 120}));
    let thoughts = |r: &Value| {
        let m = &r["choices"][0]["message"];
        assert_eq!(m["reasoning"], m["reasoning_content"], "{r}");
        m["reasoning_content"].clone()
    };

    // Unmasked: thoughts, then the call it was shown, as text.
    let none = post_json(
        &http,
        &chat,
        &with_fields(rome.clone(), &json!({"tool_choice": "none"})),
    )
    .await;
    let thought = thoughts(&none);
    assert!(
        thought.as_str().is_some_and(|t| t.contains("Rome")),
        "{none}"
    );
    let text = none["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.contains("<tool_call>") && text.contains("\"get_weather\""),
        "{none}"
    );

    // "auto": the same thoughts, then a call of the tool the request lists.
    let r = post_json(&http, &chat, &rome).await;
    assert_eq!(thoughts(&r), thought, "{r}");
    let (f, args) = only_call(&r);
    assert_eq!(f["name"], "weather_now", "{r}");
    assert!(args["location"].is_string(), "{r}");
    let chunks = post_stream(
        &http,
        &chat,
        &with_fields(
            rome.clone(),
            &json!({"stream": true, "logprobs": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(streamed_field(&chunks, "reasoning_content"), thought);
    assert_eq!(streamed_content(&chunks), "");
    assert_eq!(only_streamed_call(&chunks)["function"], *f);
    let last = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(last["finish_reason"], "tool_calls", "{chunks:?}");
    let lps: usize = (chunks.iter())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(lps as u64, usage["completion_tokens"].as_u64().unwrap());

    // Forced: the same thoughts, then the named tool's arguments; streamed, the arguments
    // after the thoughts, joining to the same.
    let named = with_fields(
        rome.clone(),
        &json!({"tool_choice": {"type": "function", "function": {"name": "weather_now"}}}),
    );
    let r = post_json(&http, &chat, &named).await;
    assert_eq!(thoughts(&r), thought, "{r}");
    let (f, args) = only_call(&r);
    assert_eq!(f["name"], "weather_now", "{r}");
    assert!(
        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{r}"
    );
    let chunks = post_stream(&http, &chat, &with_fields(named, &json!({"stream": true}))).await;
    assert_eq!(streamed_field(&chunks, "reasoning_content"), thought);
    let calls = streamed_tool_calls(&chunks);
    assert_eq!(calls[0]["function"]["name"], "weather_now", "{chunks:?}");
    let joined: String = (calls.iter())
        .map(|c| c["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(joined, f["arguments"].as_str().unwrap());
    let first_call = (chunks.iter())
        .position(|c| c["choices"][0]["delta"]["tool_calls"].is_array())
        .unwrap();
    assert!(
        chunks[first_call..]
            .iter()
            .all(|c| c["choices"][0]["delta"]["reasoning_content"].is_null()),
        "the call after the thoughts: {chunks:?}"
    );

    // Cut before the thoughts close: thoughts only, no call, not even a forced one.
    for choice in [json!("auto"), json!("required")] {
        let cut = with_fields(
            rome.clone(),
            &json!({"max_tokens": 4, "tool_choice": choice}),
        );
        let r = post_json(&http, &chat, &cut).await;
        let c = &r["choices"][0];
        assert_eq!(c["finish_reason"], "length", "{r}");
        assert!(c["message"]["tool_calls"].is_null(), "{r}");
        assert!(c["message"]["content"].is_null(), "{r}");
        let begun = thoughts(&r);
        assert!(
            thought
                .as_str()
                .unwrap()
                .starts_with(begun.as_str().unwrap()),
            "{r}"
        );
        let chunks = post_stream(&http, &chat, &with_fields(cut, &json!({"stream": true}))).await;
        assert!(streamed_tool_calls(&chunks).is_empty(), "{chunks:?}");
        assert_eq!(streamed_field(&chunks, "reasoning_content"), begun);
        let last = &chunks.last().unwrap()["choices"][0];
        assert_eq!(last["finish_reason"], "length", "{chunks:?}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// vLLM's template fields: `continue_final_message` continues a prefilled answer (the prompt
/// ends where its text does, and the model goes on from there), `add_generation_prompt:
/// false` leaves the assistant's turn unopened, `chat_template_kwargs` reach the template,
/// and what cannot be rendered is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_fields_continue_a_prefilled_answer_and_shape_the_prompt() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let question = json!({"role": "user", "content": "What is the capital of France?"});
    let prefill = "The capital of France is";
    let continued = json!([question, {"role": "assistant", "content": prefill}]);
    let cont = json!({"continue_final_message": true, "add_generation_prompt": false});

    // The prompt: the question's rendering with the assistant's turn opened, then the prefill.
    let opened = token_ids(&http, &url, json!({"messages": [question]})).await;
    let opened_text = post_json(
        &http,
        &format!("{url}/detokenize"),
        &json!({"model": SMOL, "tokens": opened}),
    )
    .await["prompt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(opened_text.ends_with("assistant\n"), "{opened_text:?}");
    let expected = token_ids(
        &http,
        &url,
        json!({"prompt": format!("{opened_text}{prefill}"), "add_special_tokens": false}),
    )
    .await;
    let ids = token_ids(
        &http,
        &url,
        with_fields(json!({"messages": continued}), &cont),
    )
    .await;
    assert_eq!(ids, expected);

    // The answer goes on from the prefill: what a completion of exactly those tokens gives.
    let greedy = json!({"temperature": 0, "max_tokens": 8});
    let body = with_fields(
        with_fields(json!({"model": SMOL, "messages": continued}), &cont),
        &greedy,
    );
    let r = post_json(&http, &chat, &body).await;
    assert_eq!(r["usage"]["prompt_tokens"], ids.len(), "{r}");
    let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
    let plain = post_json(
        &http,
        &format!("{url}/v1/completions"),
        &with_fields(json!({"model": SMOL, "prompt": ids}), &greedy),
    )
    .await;
    assert_eq!(answer, plain["choices"][0]["text"], "{r} {plain}");
    assert!(!answer.trim().is_empty(), "{r}");
    // Streamed, the same text.
    let chunks = post_stream(&http, &chat, &with_fields(body, &json!({"stream": true}))).await;
    let streamed: String = streamed_content(&chunks);
    assert_eq!(streamed, answer);

    // Without the generation prompt the rendering stops before the assistant's turn.
    let unopened = token_ids(
        &http,
        &url,
        json!({"messages": [question], "add_generation_prompt": false}),
    )
    .await;
    assert!(unopened.len() < opened.len(), "{unopened:?} {opened:?}");
    assert_eq!(opened[..unopened.len()], unopened[..]);
    let r = post_json(
        &http,
        &chat,
        &json!({"model": SMOL, "messages": [question], "add_generation_prompt": false,
                "max_tokens": 2}),
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], unopened.len(), "{r}");

    // Variables for the template: SmolLM2's uses none, so the prompt is unchanged.
    let r = post_json(
        &http,
        &chat,
        &json!({"model": SMOL, "messages": [question], "max_tokens": 2,
                "chat_template_kwargs": {"enable_thinking": false}}),
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], opened.len(), "{r}");

    // Refused, naming the field.
    let one = json!({"model": SMOL, "messages": continued});
    for (extra, param) in [
        (
            json!({"continue_final_message": true}),
            "continue_final_message",
        ),
        (
            json!({"add_generation_prompt": false, "continue_final_message": true,
                "messages": [question, {"role": "assistant", "content": " "}]}),
            "continue_final_message",
        ),
        (
            json!({"chat_template_kwargs": "thinking"}),
            "chat_template_kwargs",
        ),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs",
        ),
        (
            json!({"chat_template_kwargs": {"add_generation_prompt": false}}),
            "chat_template_kwargs",
        ),
    ] {
        expect_refused(&http, &chat, &with_fields(one.clone(), &extra), param).await;
        expect_refused(
            &http,
            &format!("{url}/tokenize"),
            &with_fields(one.clone(), &extra),
            param,
        )
        .await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_sequence_cuts_the_output_before_it() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let body =
        json!({"model": SMOL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0});
    let full: Value = post_json(&http, &comp, &body).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    // Stop at the second word of the greedy continuation.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 3, "continuation too short: {text:?}");
    let stop = format!(" {}", words[2]);
    let cut = &text[..text.find(&stop).unwrap()];
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop, "\u{2603}never"]);
    let r: Value = post_json(&http, &comp, &with_stop).await;
    assert_eq!(r["choices"][0]["text"], cut);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    with_stop["stream"] = json!(true);
    let chunks = sse_payloads(
        &http
            .post(&comp)
            .json(&with_stop)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let stext: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(stext, cut);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_429_with_retry_after_while_admitted_requests_complete() {
    let (server, url) = serve(|c| {
        c.max_batch_size = 1;
        c.max_queue = 1;
    })
    .await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let body = chat_body(
        "Write a long poem about the sea.",
        json!({"max_tokens": 10, "temperature": 0}),
    );
    let responses = join_all((0..6).map(|_| http.post(&chat).json(&body).send())).await;
    let mut ok = 0;
    let mut refused = 0;
    for r in responses {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => {
                let b: Value = r.json().await.unwrap();
                assert_eq!(b["usage"]["completion_tokens"], 10);
                ok += 1;
            }
            429 => {
                assert_eq!(r.headers()["retry-after"], "1");
                expect_error(r, 429, "overload").await;
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!((1..=2).contains(&ok), "{ok} admitted with room for 2");
    assert_eq!(ok + refused, 6);
    // Once the load is gone, requests are admitted again.
    assert_eq!(
        http.post(&chat).json(&body).send().await.unwrap().status(),
        200
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_decode_in_one_batch_and_match_requests_alone() {
    let (server, url) = serve(|c| c.max_batch_size = 8).await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    // Different prompt lengths and different max_tokens: sequences join the running batch at
    // different lengths and leave it at different rounds.
    let bodies: Vec<Value> = [
        ("Once upon a time", 24),
        ("The three primary colours are", 16),
        ("def add(a, b):", 20),
        (
            "The capital of France is Paris. The capital of Germany is",
            12,
        ),
        ("Water boils at", 24),
        ("My favourite food is", 8),
    ]
    .iter()
    .map(|(p, n)| json!({"model": SMOL, "prompt": p, "max_tokens": n, "temperature": 0}))
    .collect();
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
    let mut alone = Vec::new();
    for b in &bodies {
        let r: Value = post_json(&http, &comp, b).await;
        alone.push((text(&r), r["usage"]["completion_tokens"].clone()));
    }
    let all = join_all(bodies.iter().map(|b| {
        let http = http.clone();
        let comp = comp.clone();
        async move {
            let r = http.post(&comp).json(b).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    }));
    let (together, most) = tokio::join!(all, most_gauge(&http, &url, "kandle_batch_size", 3.0));
    assert!(
        most >= 3.0,
        "the running batch never held 3 sequences (at most {most})"
    );
    for (i, r) in together.iter().enumerate() {
        assert_eq!(text(r), alone[i].0, "request {i}");
        assert_eq!(r["usage"]["completion_tokens"], alone[i].1, "request {i}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// vLLM's `truncate_prompt_tokens`: a prompt past the context is served from its last tokens,
/// the answer that of those tokens alone, for completions and for chat (the rendered prompt's
/// end); a value that is neither -1 nor positive is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_prompt_tokens_serves_a_long_prompt_from_its_end() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let long = "The sky is blue and the grass is green. ".repeat(1000);
    let ids = token_ids(&http, &url, json!({"prompt": long})).await;
    assert!(ids.len() > 8192, "{} tokens", ids.len());
    let body = json!({"model": SMOL, "prompt": long, "max_tokens": 4, "temperature": 0});
    expect_refused(&http, &comp, &body, "prompt").await;
    let cut = post_json(
        &http,
        &comp,
        &with_fields(body.clone(), &json!({"truncate_prompt_tokens": 64})),
    )
    .await;
    assert_eq!(cut["usage"]["prompt_tokens"], 64, "{cut}");
    let tail = post_json(
        &http,
        &comp,
        &with_fields(body.clone(), &json!({"prompt": ids[ids.len() - 64..]})),
    )
    .await;
    assert_eq!(cut["choices"][0]["text"], tail["choices"][0]["text"]);
    // -1: the model's whole context, which leaves no room for an answer.
    let whole = with_fields(body.clone(), &json!({"truncate_prompt_tokens": -1}));
    expect_refused(&http, &comp, &whole, "prompt").await;
    let chat = post_json(
        &http,
        &format!("{url}/v1/chat/completions"),
        &chat_body(
            &long,
            json!({"max_tokens": 4, "truncate_prompt_tokens": 64}),
        ),
    )
    .await;
    assert_eq!(chat["usage"]["prompt_tokens"], 64, "{chat}");
    let bad = with_fields(body, &json!({"truncate_prompt_tokens": 0}));
    expect_refused(&http, &comp, &bad, "truncate_prompt_tokens").await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// POSTs `body` to `url` with `stream: true` and returns the Responses API's events: each
/// frame's `event:` name and its `data:` JSON.
async fn post_events(http: &reqwest::Client, url: &str, body: &Value) -> Vec<(String, Value)> {
    let r = http
        .post(url)
        .json(&with_fields(body.clone(), &json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{body}");
    let sse = r.text().await.unwrap();
    (sse.split("\n\n").filter(|f| !f.trim().is_empty()))
        .map(|f| {
            let field = |name: &str| {
                f.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {f:?}"))
                    .to_owned()
            };
            (
                field("event: "),
                serde_json::from_str(&field("data: ")).unwrap(),
            )
        })
        .collect()
}

/// OpenAI's Responses API (`/v1/responses`) runs as the chat request it asks for: the same
/// answer as chat's for `instructions` plus `input` (a string, or messages of text parts),
/// its usage, and streamed as typed events (each `event:` its data's `type`, numbered in
/// order) whose text deltas add up to that answer and whose last event holds the whole
/// response. What it cannot follow is refused naming the Responses field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_runs_as_the_chat_request_it_asks_for() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let question = "What is the capital of France?";
    let chat = post_json(
        &http,
        &format!("{url}/v1/chat/completions"),
        &json!({"model": SMOL, "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "system", "content": "You are brief."},
                             {"role": "user", "content": question}]}),
    )
    .await;
    let text = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let status = match chat["choices"][0]["finish_reason"].as_str() {
        Some("length") => "incomplete",
        _ => "completed",
    };
    let responses = format!("{url}/v1/responses");
    let body = json!({"model": SMOL, "instructions": "You are brief.", "input": question,
                      "temperature": 0, "max_output_tokens": 24});
    let r = post_json(&http, &responses, &body).await;
    assert_eq!(r["object"], "response", "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"), "{r}");
    assert_eq!(r["status"], status, "{r}");
    assert_eq!(r["output"][0]["type"], "message", "{r}");
    assert_eq!(r["output"][0]["content"][0]["text"], text, "{r}");
    assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(
        r["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    assert_eq!(r["max_output_tokens"], 24);

    // Messages of text parts, a developer message as the system's: the same answer.
    let parts = json!({"model": SMOL, "temperature": 0, "max_output_tokens": 24, "input": [
        {"role": "developer", "content": "You are brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}]});
    let r = post_json(&http, &responses, &parts).await;
    assert_eq!(r["output"][0]["content"][0]["text"], text, "{r}");

    // Streamed: typed events in order, adding up to the same answer.
    let events = post_events(&http, &responses, &body).await;
    for (i, (kind, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], kind.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    assert_eq!(*kinds.last().unwrap(), format!("response.{status}"));
    let deltas: String = (events.iter())
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    let last = &events.last().unwrap().1["response"];
    assert_eq!(last["output"][0]["content"][0]["text"], text);
    assert_eq!(
        last["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );

    // Log-probabilities: chat's, in the output text and in its streamed deltas.
    let chat_lp = post_json(
        &http,
        &format!("{url}/v1/chat/completions"),
        &json!({"model": SMOL, "temperature": 0, "max_tokens": 24, "logprobs": true,
                "top_logprobs": 2,
                "messages": [{"role": "system", "content": "You are brief."},
                             {"role": "user", "content": question}]}),
    )
    .await;
    let want = &chat_lp["choices"][0]["logprobs"]["content"];
    assert!(want.as_array().is_some_and(|a| !a.is_empty()), "{chat_lp}");
    let with_lp = with_fields(body.clone(), &json!({"top_logprobs": 2}));
    let r = post_json(&http, &responses, &with_lp).await;
    assert_eq!(&r["output"][0]["content"][0]["logprobs"], want, "{r}");
    let streamed: Vec<Value> = (post_events(&http, &responses, &with_lp).await.into_iter())
        .filter(|(kind, _)| kind == "response.output_text.delta")
        .flat_map(|(_, e)| e["logprobs"].as_array().unwrap().clone())
        .collect();
    assert_eq!(&Value::Array(streamed), want);

    // Function tools: a forced call is a function_call item, whole and streamed; its result
    // goes back as a function_call_output item.
    let tools = json!([{"type": "function", "name": "weather_now", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"]}}]);
    let forced = json!({"model": SMOL, "temperature": 0, "input": "Weather in Paris?",
        "tools": tools, "tool_choice": {"type": "function", "name": "weather_now"}});
    let r = post_json(&http, &responses, &forced).await;
    let call = &r["output"][0];
    assert_eq!(call["type"], "function_call", "{r}");
    assert_eq!(call["name"], "weather_now", "{r}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(
        ["Paris", "Rome"].contains(&args["city"].as_str().unwrap()),
        "{r}"
    );
    let events = post_events(&http, &responses, &forced).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let done = &events.last().unwrap().1;
    assert_eq!(done["type"], "response.completed", "{kinds:?}");
    assert_eq!(
        done["response"]["output"][0]["arguments"],
        call["arguments"]
    );
    assert!(
        kinds.contains(&"response.function_call_arguments.delta"),
        "{kinds:?}"
    );
    let answer = json!({"model": SMOL, "temperature": 0, "max_output_tokens": 16,
        "tools": tools, "tool_choice": "none", "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call["call_id"], "name": "weather_now",
             "arguments": call["arguments"]},
            {"type": "function_call_output", "call_id": call["call_id"],
             "output": "{\"temperature\": 21}"}]});
    let r = post_json(&http, &responses, &answer).await;
    assert_eq!(r["output"][0]["type"], "message", "{r}");
    // The same as chat's answer to the conversation with that call and its result.
    let chat_tools = json!([{"type": "function", "function": tools[0].clone()}]);
    let as_chat = post_json(
        &http,
        &format!("{url}/v1/chat/completions"),
        &json!({"model": SMOL, "temperature": 0, "max_tokens": 16, "tools": chat_tools,
                "tool_choice": "none", "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": call["call_id"],
             "type": "function", "function": {"name": "weather_now",
                                              "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["call_id"],
             "content": "{\"temperature\": 21}"}]}),
    )
    .await;
    assert_eq!(
        r["usage"]["input_tokens"],
        as_chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        r["output"][0]["content"][0]["text"],
        as_chat["choices"][0]["message"]["content"]
    );

    for (extra, param) in [
        (json!({"tools": [{"type": "web_search"}]}), "tools"),
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input",
        ),
    ] {
        let r = http
            .post(&responses)
            .json(&with_fields(body.clone(), &extra))
            .send()
            .await
            .unwrap();
        let e = expect_error(r, 400, &extra.to_string()).await;
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `--responses-store`: a response is kept (`store: true`) and `GET` returns it as it was
/// answered, whole or streamed; `previous_response_id` continues it (the answer chat gives to
/// the whole conversation, with the new `instructions`); `store: false` keeps nothing;
/// `DELETE` forgets one, after which it is a 404 and continuing it a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_continue_a_conversation_and_can_be_read_and_deleted() {
    let (server, url) = serve(|c| c.responses_store = 4).await;
    let http = client();
    let responses = format!("{url}/v1/responses");
    let first_q = "My name is Ada. Say hello to me.";
    let first = post_json(&http, &responses, &json!({"model": SMOL, "instructions": "You are brief.",
        "input": first_q, "temperature": 0, "max_output_tokens": 24})).await;
    assert_eq!(first["store"], true, "{first}");
    let id1 = first["id"].as_str().unwrap().to_owned();
    let got = get_json(&http, &format!("{responses}/{id1}"), 200).await;
    assert_eq!(got, first);

    let second_q = "What is my name?";
    let second = post_json(&http, &responses, &json!({"model": SMOL, "instructions": "Answer in one line.",
        "previous_response_id": id1, "input": second_q, "temperature": 0, "max_output_tokens": 24})).await;
    assert_eq!(second["previous_response_id"], id1.as_str(), "{second}");
    let first_text = first["output"][0]["content"][0]["text"].as_str().unwrap();
    let as_chat = post_json(&http, &format!("{url}/v1/chat/completions"), &json!({"model": SMOL,
        "temperature": 0, "max_tokens": 24, "messages": [
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": first_q},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": second_q}]})).await;
    assert_eq!(second["usage"]["input_tokens"], as_chat["usage"]["prompt_tokens"], "{second}");
    assert_eq!(second["output"][0]["content"][0]["text"], as_chat["choices"][0]["message"]["content"]);

    // Streamed, the response is kept at its last event.
    let id2 = second["id"].as_str().unwrap();
    let events = post_events(&http, &responses, &json!({"model": SMOL, "previous_response_id": id2,
        "input": "Thanks.", "temperature": 0, "max_output_tokens": 8, "stream": true})).await;
    let last = &events.last().unwrap().1["response"];
    assert_eq!(last["store"], true, "{last}");
    let got = get_json(&http, &format!("{responses}/{}", last["id"].as_str().unwrap()), 200).await;
    assert_eq!(&got, last);

    // A stream whose client leaves before its end is not kept: only a last event stores.
    let mut r = http.post(&responses).json(&json!({"model": SMOL, "input": "Count to one hundred.",
        "temperature": 0, "max_output_tokens": 64, "stream": true})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    while !text.contains("response.output_text.delta") {
        text.push_str(std::str::from_utf8(&r.chunk().await.unwrap().expect("more events")).unwrap());
    }
    let created = (text.lines().filter_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "response.created")
        .unwrap_or_else(|| panic!("response.created in {text}"));
    let left = created["response"]["id"].as_str().unwrap().to_owned();
    drop(r);
    // Time for the whole answer, had it gone on (64 tokens take well under a second here).
    tokio::time::sleep(Duration::from_secs(2)).await;
    get_json(&http, &format!("{responses}/{left}"), 404).await;

    let unstored = post_json(&http, &responses, &json!({"model": SMOL, "input": "Hi", "store": false,
        "max_output_tokens": 4})).await;
    assert_eq!(unstored["store"], false);
    get_json(&http, &format!("{responses}/{}", unstored["id"].as_str().unwrap()), 404).await;

    let deleted: Value = http.delete(format!("{responses}/{id1}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(deleted, json!({"id": id1, "object": "response", "deleted": true}));
    let e = get_json(&http, &format!("{responses}/{id1}"), 404).await;
    assert!(e["error"]["message"].as_str().unwrap().contains(&id1), "{e}");
    let r = http.post(&responses).json(&json!({"model": SMOL, "previous_response_id": id1, "input": "Again?"}))
        .send().await.unwrap();
    let e = expect_error(r, 400, "a forgotten previous_response_id").await;
    assert_eq!(e["error"]["param"], "previous_response_id", "{e}");
    assert_eq!(e["error"]["code"], "previous_response_not_found", "{e}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// OpenAI's Conversations API (`--responses-store`): a conversation created with an item and
/// metadata; responses in it answer after its items (the second gives the chat answer of the
/// whole conversation) and add their input and output to it, streamed ones at their last
/// event; its items listed oldest or newest first and by pages, read, added and deleted;
/// metadata replaced; `conversation` beside `previous_response_id` refused, an unknown one a
/// 404 naming the field; a deleted conversation is a 404. Without the flag, a 400 that says
/// how to keep conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_keep_the_items_of_their_responses() {
    let (server, url) = serve(|c| c.responses_store = 4).await;
    let http = client();
    let convs = format!("{url}/v1/conversations");
    let responses = format!("{url}/v1/responses");
    let conv = post_json(&http, &convs, &json!({"metadata": {"topic": "names"},
        "items": [{"role": "system", "content": "You are brief."}]})).await;
    let id = conv["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("conv_"), "{conv}");
    assert_eq!(conv["object"], "conversation");
    assert_eq!(conv["metadata"], json!({"topic": "names"}));
    assert_eq!(get_json(&http, &format!("{convs}/{id}"), 200).await, conv);

    let first_q = "My name is Ada. Say hello to me.";
    let first = post_json(&http, &responses, &json!({"model": SMOL, "conversation": id,
        "input": first_q, "temperature": 0, "max_output_tokens": 24})).await;
    assert_eq!(first["conversation"], json!({"id": id}), "{first}");
    let second_q = "What is my name?";
    let second = post_json(&http, &responses, &json!({"model": SMOL, "conversation": {"id": id},
        "input": [{"role": "user", "content": second_q}], "temperature": 0,
        "max_output_tokens": 24})).await;
    let first_text = first["output"][0]["content"][0]["text"].as_str().unwrap();
    let as_chat = post_json(&http, &format!("{url}/v1/chat/completions"), &json!({"model": SMOL,
        "temperature": 0, "max_tokens": 24, "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": first_q},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": second_q}]})).await;
    assert_eq!(second["usage"]["input_tokens"], as_chat["usage"]["prompt_tokens"], "{second}");
    let second_text = &second["output"][0]["content"][0]["text"];
    assert_eq!(*second_text, as_chat["choices"][0]["message"]["content"]);

    let items = get_json(&http, &format!("{convs}/{id}/items?order=asc"), 200).await;
    let roles: Vec<&str> = (items["data"].as_array().unwrap().iter())
        .map(|i| i["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"], "{items}");
    assert_eq!(items["data"][1]["content"], json!([{"type": "input_text", "text": first_q}]));
    assert_eq!(items["data"][2], first["output"][0], "the output item as answered");
    let page = get_json(&http, &format!("{convs}/{id}/items?limit=2"), 200).await;
    assert_eq!(page["data"][0], second["output"][0], "newest first");
    assert_eq!(page["has_more"], true);
    let after = page["last_id"].as_str().unwrap();
    let next = get_json(&http, &format!("{convs}/{id}/items?limit=2&after={after}"), 200).await;
    assert_eq!(next["data"][0], items["data"][2]);

    // Streamed: added at the last event.
    post_events(&http, &responses, &json!({"model": SMOL, "conversation": id, "input": "Thanks.",
        "temperature": 0, "max_output_tokens": 8})).await;
    let all = get_json(&http, &format!("{convs}/{id}/items?limit=100"), 200).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 7, "{all}");

    // One item read, deleted, added.
    let item = &items["data"][1];
    let item_url = format!("{convs}/{id}/items/{}", item["id"].as_str().unwrap());
    assert_eq!(get_json(&http, &item_url, 200).await, *item);
    let r: Value = http.delete(&item_url).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["id"], id.as_str(), "the conversation: {r}");
    get_json(&http, &item_url, 404).await;
    let added = post_json(&http, &format!("{convs}/{id}/items"),
        &json!({"items": [{"role": "user", "content": "More."}]})).await;
    assert!(added["data"][0]["id"].as_str().unwrap().starts_with("msg_"), "{added}");
    let all = get_json(&http, &format!("{convs}/{id}/items?limit=100"), 200).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 7, "{all}");
    assert_eq!(all["data"][0], added["data"][0]);

    let meta = json!({"metadata": {"k": "v"}});
    let updated = post_json(&http, &format!("{convs}/{id}"), &meta).await;
    assert_eq!(updated["metadata"], json!({"k": "v"}), "{updated}");

    // Refused: beside previous_response_id; an item input would refuse; a bad limit.
    let both = json!({"model": SMOL, "conversation": id, "input": "Hi",
        "previous_response_id": second["id"]});
    let r = http.post(&responses).json(&both).send().await.unwrap();
    assert_eq!(expect_error(r, 400, "both").await["error"]["param"], "conversation");
    let robot = json!({"items": [{"role": "robot", "content": "x"}]});
    let r = http.post(format!("{convs}/{id}/items")).json(&robot).send().await.unwrap();
    assert_eq!(expect_error(r, 400, "a robot").await["error"]["param"], "items");
    let r = http.get(format!("{convs}/{id}/items?limit=0")).send().await.unwrap();
    assert_eq!(expect_error(r, 400, "limit 0").await["error"]["param"], "limit");

    let r = http.delete(format!("{convs}/{id}")).send().await.unwrap();
    let deleted: Value = r.json().await.unwrap();
    assert_eq!(deleted, json!({"id": id, "object": "conversation.deleted", "deleted": true}));
    let e = get_json(&http, &format!("{convs}/{id}"), 404).await;
    assert!(e["error"]["message"].as_str().unwrap().contains(&id), "{e}");
    let r = http.post(&responses).json(&json!({"model": SMOL, "conversation": id, "input": "Hi"}))
        .send().await.unwrap();
    let e = expect_error(r, 404, "a deleted conversation").await;
    assert_eq!(e["error"]["param"], "conversation");
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    let (server, url) = serve(|_| {}).await;
    let r = http.post(format!("{url}/v1/conversations")).json(&json!({})).send().await.unwrap();
    let e = expect_error(r, 400, "no store").await;
    assert!(e["error"]["message"].as_str().unwrap().contains("--responses-store"), "{e}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `GET url`, expecting `status`; its JSON body.
async fn get_json(http: &reqwest::Client, url: &str, status: u16) -> Value {
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), status, "GET {url}");
    r.json().await.unwrap()
}

/// `--max-batch-tokens` (TGI's `--max-batch-total-tokens`): each sequence is counted at its
/// prompt plus its max_tokens; a request that does not fit beside the running ones waits for
/// them and then gives the answer it gives alone, requests that fit run together, a
/// max_tokens past the budget is cut to it, and a prompt that does not fit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_token_budget_holds_requests_back_until_they_fit() {
    const BUDGET: usize = 100;
    let (server, url) = serve(|c| {
        c.max_batch_size = 8;
        c.max_batch_tokens = Some(BUDGET as u64);
        c.max_new_tokens = 500;
    })
    .await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let prompt = "The three primary colours are red, yellow and blue. Mixing them gives";
    let p = token_ids(&http, &url, json!({"prompt": prompt}))
        .await
        .len();
    assert!((12..30).contains(&p), "{p} prompt tokens");
    let body = |max_tokens: usize, extra: Value| {
        with_fields(
            json!({"model": SMOL, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": true}),
            &extra,
        )
    };

    // Two requests of 45 output tokens need more than the budget together: the second waits
    // for the first to finish, so it has its first token only once the first has (nearly)
    // all of its own; run together, each would have its first within a step of the other's.
    let big = body(45, json!({"stream": true}));
    assert!(2 * (p + 45) > BUDGET && p + 45 <= BUDGET);
    let timed = |b: Value| {
        let http = http.clone();
        let comp = comp.clone();
        async move {
            let mut r = http.post(&comp).json(&b).send().await.unwrap();
            assert_eq!(r.status(), 200);
            // When each token's chunk arrived.
            let (mut text, mut arrivals) = (String::new(), Vec::new());
            while let Some(c) = r.chunk().await.unwrap() {
                let c = std::str::from_utf8(&c).unwrap();
                let now = std::time::Instant::now();
                arrivals.extend(c.matches("\"text\"").map(|_| now));
                text.push_str(c);
            }
            let joined: String = (sse_payloads(&text).iter())
                .filter_map(|c| c["choices"][0]["text"].as_str())
                .collect();
            (joined, arrivals)
        }
    };
    let (a, b) = tokio::join!(timed(big.clone()), timed(big.clone()));
    assert_eq!(a.0, b.0, "the held request answers as the first");
    let (early, late) = if a.1[0] < b.1[0] { (&a, &b) } else { (&b, &a) };
    let before = early.1.iter().filter(|t| **t <= late.1[0]).count();
    assert!(
        before >= 40,
        "the second stream's first token came when the first had {before} of its {}",
        early.1.len()
    );
    let alone = post_json(&http, &comp, &body(45, json!({}))).await;
    assert_eq!(alone["choices"][0]["text"], a.0.as_str());

    // Two of 30 fit together: they share the running batch.
    let small = body(30, json!({}));
    assert!(2 * (p + 30) <= BUDGET);
    let pair = join_all((0..2).map(|_| {
        let http = http.clone();
        let comp = comp.clone();
        let small = small.clone();
        async move { post_json(&http, &comp, &small).await }
    }));
    let both = (2 * (p + 30)) as f64;
    let (pair, most, reserved) = tokio::join!(
        pair,
        most_gauge(&http, &url, "kandle_batch_size", 2.0),
        most_gauge(&http, &url, "kandle_batch_tokens", both)
    );
    assert!(most >= 2.0, "two requests that fit never ran together");
    assert_eq!(reserved, both, "the batch's reserved positions");
    // The gauges: the budget, and nothing reserved once the batch is empty.
    assert_eq!(
        gauge(&http, &url, "kandle_batch_tokens_limit").await,
        BUDGET as f64
    );
    let mut reserved = f64::NAN;
    for _ in 0..50 {
        reserved = gauge(&http, &url, "kandle_batch_tokens").await;
        if reserved == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        reserved, 0.0,
        "positions still reserved after the batch emptied"
    );
    for r in &pair {
        assert_eq!(r["usage"]["completion_tokens"], 30, "{r}");
    }

    // max_tokens past the budget is cut to it, as past the context: each of n choices gets
    // its share.
    let r = post_json(&http, &comp, &body(400, json!({}))).await;
    assert_eq!(r["usage"]["completion_tokens"], BUDGET - p, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let r = post_json(&http, &comp, &body(400, json!({"n": 2, "seed": 1}))).await;
    assert_eq!(r["usage"]["completion_tokens"], 2 * (BUDGET / 2 - p), "{r}");

    // A prompt that does not fit, or whose choices do not, is refused naming the budget.
    let long = json!({"model": SMOL, "prompt": "hello ".repeat(120), "max_tokens": 1});
    for (b, param, what) in [
        (long, "prompt", "(--max-batch-tokens)"),
        (body(1, json!({"n": 8})), "prompt", "each of its 8 choices"),
        (
            chat_body(&"hello ".repeat(120), json!({"max_tokens": 1})),
            "messages",
            "(--max-batch-tokens)",
        ),
    ] {
        let url = match param {
            "messages" => format!("{url}/v1/chat/completions"),
            _ => comp.clone(),
        };
        let r = http.post(&url).json(&b).send().await.unwrap();
        let e = expect_error(r, 400, what).await;
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(what) && msg.contains("100 tokens"), "{msg}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The largest value of gauge `name` seen while polling, until it reaches `enough` or 200
/// polls 20 ms apart have passed.
async fn most_gauge(http: &reqwest::Client, url: &str, name: &str, enough: f64) -> f64 {
    let mut most = 0f64;
    for _ in 0..200 {
        most = most.max(gauge(http, url, name).await);
        if most >= enough {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    most
}

async fn gauge(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_stops_its_generation() {
    let (server, url) = serve(|c| c.max_new_tokens = 2000).await;
    let http = client();
    let body = chat_body(
        "Count from one to a thousand.",
        json!({"max_tokens": 2000, "temperature": 0, "stream": true}),
    );
    let mut r = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.chunk().await.unwrap().expect("a first chunk");
    assert_eq!(gauge(&http, &url, "kandle_inflight_requests").await, 1.0);
    let generated_then = gauge(&http, &url, "kandle_generated_tokens_total").await;
    drop(r);
    // 2000 tokens would take over a minute; a cancelled request leaves within a step or two.
    let t0 = std::time::Instant::now();
    while gauge(&http, &url, "kandle_inflight_requests").await != 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "generation still running 10 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let generated = gauge(&http, &url, "kandle_generated_tokens_total").await;
    assert!(
        generated - generated_then < 500.0,
        "{} tokens generated after the disconnect",
        generated - generated_then
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_stream_finish_and_refuses_new_requests() {
    let (server, url) = serve(|_| {}).await;
    let http = client();
    let chat = format!("{url}/v1/chat/completions");
    let body = chat_body(
        "Tell me about rivers.",
        json!({"max_tokens": 16, "temperature": 0, "stream": true}),
    );
    let mut r = http.post(&chat).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let drain = tokio::spawn(server.shutdown(Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New requests are refused: the listener is closed (or, on a kept-alive connection, 503).
    let fresh = reqwest::Client::new();
    match fresh
        .post(&chat)
        .json(&chat_body("hi", json!({"max_tokens": 2})))
        .send()
        .await
    {
        Err(e) => assert!(e.is_connect() || e.is_request(), "unexpected error {e}"),
        Ok(resp) => assert_eq!(resp.status(), 503),
    }
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&c).unwrap());
    }
    let chunks = sse_payloads(&text);
    let finish = chunks
        .iter()
        .rev()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned));
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "the in-flight stream was cut short"
    );
    tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .expect("drain finishes")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_come_as_floats_or_base64_and_match_sentence_transformers() {
    let dir = tokio::task::spawn_blocking(models::minilm_dir)
        .await
        .unwrap();
    let model = ServeConfig::new(&dir).served_model_name();
    let model = model.as_str();
    let (server, url) = serve_model(dir, |_| {}).await;
    let http = client();
    let reference: Value = serde_json::from_slice(
        &std::fs::read(fixtures_dir().join("minilm_reference.json")).unwrap(),
    )
    .unwrap();
    let sentences = reference["sentences"].clone();
    let emb = format!("{url}/v1/embeddings");
    let floats: Value = post_json(&http, &emb, &json!({"model": model, "input": sentences})).await;
    let b64: Value = post_json(
        &http,
        &emb,
        &json!({"model": model, "input": sentences, "encoding_format": "base64"}),
    )
    .await;
    let n = sentences.as_array().unwrap().len();
    assert_eq!(floats["data"].as_array().unwrap().len(), n);
    for i in 0..n {
        let v: Vec<f32> = floats["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(
            v, decoded,
            "base64 and float embeddings differ for input {i}"
        );
        let r: Vec<f64> = reference["embeddings"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let dot: f64 = v.iter().zip(&r).map(|(a, b)| *a as f64 * b).sum();
        let norm: f64 = r.iter().map(|x| x * x).sum::<f64>().sqrt()
            * v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(dot / norm >= 0.9999, "input {i}: cosine {}", dot / norm);
    }
    assert!(floats["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let r = http
        .post(&emb)
        .json(&json!({"model": model, "input": ""}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "empty input").await;
    let r = http
        .post(&emb)
        .json(&json!({"model": model, "input": "x", "encoding_format": "hex"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "unknown encoding_format").await;
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "chat with an embedding model").await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_request_past_its_time_limit_gets_504_and_the_server_keeps_serving() {
    let (server, url) = serve(|c| {
        c.request_timeout = Duration::from_millis(1500);
        c.max_new_tokens = 400;
    })
    .await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    // Counting goes on for far longer than 1.5 s at this model's speed.
    let long = json!({"model": SMOL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0});
    let started = std::time::Instant::now();
    let resp = http.post(&comp).json(&long).send().await.unwrap();
    let body = expect_error(resp, 504, "a request past --request-timeout").await;
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it gave up near its limit, not at the end"
    );

    let short = json!({"model": SMOL, "prompt": "Hi", "max_tokens": 1, "temperature": 0});
    let ok: Value = post_json(&http, &comp, &short).await;
    assert_eq!(ok["usage"]["completion_tokens"], 1, "{ok}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A directory holding the real Gemma 3 270M GGUF (linked) and a tokenizer_config.json whose
/// chat template is `template` (the GGUF, a base model, has none), as a fine-tune's files lie.
fn gemma3_270m_with_template(template: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma.gguf");
    std::os::unix::fs::symlink(models::gemma3_270m_gguf(), &path).unwrap();
    let config = json!({"chat_template": template, "bos_token": "<bos>",
        "eos_token": "<end_of_turn>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    (dir, path)
}

/// `--max-batch-tokens` with the real Gemma 3 270M, whose windowed layers (15 of 18, a
/// window of 512) let go of what no position to come sees: a sequence counts at what its
/// cache holds, the 3 full layers' share of its length and the windowed layers' share of at
/// most 768 positions, so a budget of 1,200 takes a prompt of about 2,000 tokens (counted
/// at 1,000; every layer's cost would refuse it, as it did before) and refuses one past
/// (1,200 · 18 − 15 · 768) / 3 = 3,360.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_model_s_sequence_counts_at_what_its_cache_holds() {
    let gemma3 = include_str!("../../runtime-image/tests/templates/gemma3.jinja");
    let (_dir, path) = tokio::task::spawn_blocking(move || gemma3_270m_with_template(gemma3))
        .await
        .unwrap();
    let (server, url) = serve_model(path, |c| {
        c.max_new_tokens = 4;
        c.max_batch_tokens = Some(1200);
    })
    .await;
    let http = client();
    let comp = format!("{url}/v1/completions");
    let prompt = |reps: usize| "The quick brown fox jumps over the lazy dog. ".repeat(reps);
    let long = prompt(200);
    let n = model_token_ids(&http, &url, "gemma", json!({"prompt": long})).await.len();
    assert!((1800..2400).contains(&n), "{n} prompt tokens");
    let body = |text: &str| json!({"model": "gemma", "prompt": text, "max_tokens": 4,
                                  "temperature": 0, "ignore_eos": true});
    let r = post_json(&http, &comp, &body(&long)).await;
    assert_eq!(r["usage"]["prompt_tokens"], n, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 4, "{r}");
    let longer = prompt(400);
    let r = http.post(&comp).json(&body(&longer)).send().await.unwrap();
    let e = expect_error(r, 400, "a prompt past what the budget holds").await;
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("holds 1200 tokens") && msg.contains("up to 3360 tokens"), "{e}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The real Gemma 3 270M served with Gemma's own chat templates: with Gemma 3's, a system
/// message goes at the head of the first user turn, the prompt holds one beginning-of-text
/// token (the template writes it, and the GGUF's `add_bos_token` adds none more),
/// `<start_of_turn>` and `<end_of_turn>` are single control tokens, and the chat answers; with
/// Gemma 2's, which refuses a system message, the request gets a 400 in the template's own
/// words, and the server answers the next request.
#[tokio::test]
async fn the_real_gemma_3_chats_with_gemma_s_own_templates() {
    let gemma3 = include_str!("../../runtime-image/tests/templates/gemma3.jinja");
    let (_dir, path) = tokio::task::spawn_blocking(move || gemma3_270m_with_template(gemma3))
        .await
        .unwrap();
    let (server, url) = serve_model(path, |c| c.max_new_tokens = 8).await;
    let http = client();
    let model = "gemma";
    let system = json!({"messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}]});
    let ids = model_token_ids(&http, &url, model, system.clone()).await;
    assert_eq!(
        ids.iter().filter(|t| **t == 2).count(),
        1,
        "one <bos>: {ids:?}"
    );
    let control = model_token_ids(
        &http,
        &url,
        model,
        json!({"prompt": "<start_of_turn><end_of_turn>",
        "add_special_tokens": false}),
    )
    .await;
    assert_eq!(control.len(), 2, "each is one control token: {control:?}");
    assert!(control.iter().all(|t| ids.contains(t)), "{ids:?}");
    let text = post_json(
        &http,
        &format!("{url}/detokenize"),
        &json!({"model": model, "tokens": ids}),
    )
    .await;
    assert_eq!(
        text["prompt"],
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
        "{text}"
    );
    let chat = format!("{url}/v1/chat/completions");
    let r = post_json(
        &http,
        &chat,
        &with_fields(system, &json!({"model": model, "temperature": 0})),
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], ids.len(), "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    let gemma2 = include_str!("../../runtime-image/tests/templates/gemma2.jinja");
    let (_dir, path) = tokio::task::spawn_blocking(move || gemma3_270m_with_template(gemma2))
        .await
        .unwrap();
    let (server, url) = serve_model(path, |c| c.max_new_tokens = 8).await;
    let refused = json!({"model": model, "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}]});
    let chat = format!("{url}/v1/chat/completions");
    let r = http.post(&chat).json(&refused).send().await.unwrap();
    let e = expect_error(r, 400, "a system message to Gemma 2's template").await;
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("System role not supported"), "{e}");
    assert_eq!(e["error"]["param"], "messages", "{e}");
    let ok =
        json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let r = post_json(&http, &chat, &ok).await;
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
