//! Traces: `kandle-runtime serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` set sends its spans by
//! OTLP/HTTP to a collector (the local stand-in, `kandle_tests::otlp_collector`, which decodes
//! them with the protocol's own messages), through the real binary, serving SmolLM2 (and MiniLM):
//! - a request's server span continues the caller's W3C `traceparent`, carries its route,
//!   status and request id, and holds a generation span with the GenAI usage the response
//!   reported; a streamed answer's spans last to its end; a timed-out request's spans are
//!   errors, a refused one's not;
//! - an embeddings request (MiniLM) is a span `embeddings {model}` with its tokens, encoding
//!   and width;
//! - spans still queued at SIGTERM are sent before the process exits;
//! - neither the API key nor the prompt appears in what is sent;
//! - a gRPC protocol is refused at start, naming the variable;
//! - spans leave on the batch schedule too, as OTLP's JSON encoding if asked, with the
//!   configured headers, which are never logged;
//! - an `https://` collector that requires a client certificate gets the spans with its CA
//!   and a client certificate and key given by the specification's variables, and nothing
//!   (its handshake refused, the server unharmed) without either;
//! - the server in a pod as the operator builds it (`--runtime-otlp-endpoint`), its env
//!   resolved as the kubelet resolves it, tags its spans with the pod's Kubernetes attributes.
//!
//! The binary is `target/<profile>/kandle-runtime` (`cargo build -p kandle-runtime`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use kandle_tests::models;
use kandle_tests::otlp_collector::{KeyValue, OtlpCollector, Span, int_attribute, string_attribute};
use serde_json::{Value, json};

const API_KEY: &str = "sk-kandle-traces-test-key";
/// A caller's trace context: trace `0af7…319c`, its span `b7ad…3331`, sampled.
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";
/// A word of the prompt, which must not reach the collector.
const PROMPT_WORD: &str = "Zanzibarite";

/// The binary with a clean telemetry environment: nothing from the developer's shell leaks in.
fn runtime() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(kandle_tests::workspace_binary("kandle-runtime"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OTEL_") || var.starts_with("KANDLE_") {
            c.env_remove(var);
        }
    }
    c.env("NO_COLOR", "1").kill_on_drop(true);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one span named `name`.
fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one span named {name:?} among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    found[0]
}

/// The span whose parent is `parent`, named `name`.
fn child_of<'a>(spans: &'a [Span], parent: &Span, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name && s.parent_span_id == parent.span_id).collect();
    assert_eq!(found.len(), 1, "one span named {name:?} under {}", parent.name);
    assert_eq!(found[0].trace_id, parent.trace_id, "{name} is in its parent's trace");
    found[0]
}

/// `serve` of `model` with `args`, sending its spans to `collector`, ready; and its URL.
async fn serve_traced(collector: &OtlpCollector, model: &std::path::Path, args: &[&str]) -> (tokio::process::Child, String) {
    serve_traced_with(collector, model, args, &[]).await
}

/// [`serve_traced`], with `env` set after the test's own variables.
async fn serve_traced_with(collector: &OtlpCollector, model: &std::path::Path, args: &[&str], env: &[(String, String)]) -> (tokio::process::Child, String) {
    let port = free_port();
    let mut c = runtime();
    c.arg("serve").arg("--model").arg(model).args(["--port", &port.to_string()]).args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url())
        // Nothing leaves on the 5-second schedule within the test: what arrives was sent at exit.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        // Traces do not depend on the log's level.
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/ready")).await
            && r.status() == 200
        {
            return (child, url);
        }
        assert!(child.try_wait().unwrap().is_none(), "the server exited before it was ready");
        assert!(t0.elapsed() < Duration::from_secs(180), "not ready after 3 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM: the queued spans leave before the process does. Returns what the collector got.
async fn stop(child: tokio::process::Child, collector: &OtlpCollector) -> Vec<Span> {
    stop_with_resources(child, collector).await.into_iter().map(|(_, s)| s).collect()
}

/// SIGTERM to `child`, and its exit status within a minute.
async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("exits within a minute").unwrap()
}

/// `child`'s stderr, read to its end in the background.
fn read_log(child: &mut tokio::process::Child) -> tokio::task::JoinHandle<String> {
    let mut stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await.unwrap();
        text
    })
}

/// One `/v1/embeddings` request of `input` to the server at `url`, answered 200; the model's id.
async fn embed_one(url: &str, input: &str) -> String {
    let models: Value = reqwest::get(format!("{url}/v1/models")).await.unwrap().json().await.unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();
    let r = reqwest::Client::new().post(format!("{url}/v1/embeddings")).json(&json!({"model": model, "input": input})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    model
}

/// [`stop`], each span with its resource's attributes.
async fn stop_with_resources(mut child: tokio::process::Child, collector: &OtlpCollector) -> Vec<(Vec<KeyValue>, Span)> {
    assert!(collector.spans().is_empty(), "nothing was sent before exit: {:?}", collector.spans());
    let status = terminate(&mut child).await;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).await.unwrap();
    assert!(status.success(), "the server exited with {status}:\n{stderr}");
    assert_eq!(collector.refused(), Vec::<String>::new());
    let received: Vec<(Vec<KeyValue>, Span)> =
        collector.spans().into_iter().map(|(resource, span)| (resource.expect("a resource").attributes, span)).collect();
    for (resource, span) in &received {
        assert_eq!(string_attribute(resource, "service.name"), Some("kandle-runtime"), "{}", span.name);
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_continue_the_callers_trace() {
    let collector = OtlpCollector::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, format!("{API_KEY}\n")).unwrap();
    let key_file = key_file.to_str().unwrap();
    // Long enough for the short requests, not for the counting one that is to time out.
    let args = ["--api-key-file", key_file, "--request-timeout", "3s", "--max-new-tokens", "8000"];
    let (child, url) = serve_traced(&collector, &models::smollm2_gguf(), &args).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let models: Value = http.get(format!("{url}/v1/models")).bearer_auth(API_KEY).send().await.unwrap().json().await.unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();

    // A chat request inside the caller's trace.
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .header("x-request-id", "traces-test-chat")
        .json(&json!({"model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": format!("Tell me about {PROMPT_WORD}.")}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let chat: Value = r.json().await.unwrap();

    // A streamed completion of two choices, in a trace of its own.
    let r = http
        .post(format!("{url}/v1/completions"))
        .bearer_auth(API_KEY)
        .json(&json!({"model": model, "max_tokens": 6, "n": 2, "seed": 7, "stream": true,
            "stream_options": {"include_usage": true}, "prompt": format!("{PROMPT_WORD} is")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sse = r.text().await.unwrap();
    let chunks: Vec<Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed_usage = chunks.iter().find(|c| c["usage"].is_object()).expect("a usage chunk")["usage"].clone();
    let mut stream_reasons: Vec<String> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["finish_reason"].as_str().map(str::to_owned))
        .collect();
    stream_reasons.sort();

    // Past the time limit: a 504, the server's error.
    let r = http
        .post(format!("{url}/v1/completions"))
        .bearer_auth(API_KEY)
        .json(&json!({"model": model, "max_tokens": 8000, "ignore_eos": true, "temperature": 0, "prompt": "1, 2, 3, 4,"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let timed_out: Value = r.json().await.unwrap();

    // Refused without a key: a client error, not a server one.
    let r = http.post(format!("{url}/v1/completions")).json(&json!({"model": model, "prompt": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let spans = stop(child, &collector).await;
    for raw in collector.bodies() {
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains(API_KEY), "the API key was exported");
        assert!(!text.contains(PROMPT_WORD), "the prompt was exported");
    }

    // The chat request: the server span continues the caller's trace.
    let server = one(&spans, "POST /v1/chat/completions");
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), PARENT_SPAN);
    assert_eq!(server.kind, 2, "a server span");
    assert_eq!(string_attribute(&server.attributes, "http.route"), Some("/v1/chat/completions"));
    assert_eq!(string_attribute(&server.attributes, "http.request.method"), Some("POST"));
    assert_eq!(int_attribute(&server.attributes, "http.response.status_code"), Some(200));
    assert_eq!(string_attribute(&server.attributes, "kandle.request_id"), Some("traces-test-chat"));
    assert_ne!(server.status.as_ref().map_or(0, |s| s.code), 2, "not an error");
    let generation = child_of(&spans, server, &format!("chat {model}"));
    let a = &generation.attributes;
    assert_eq!(string_attribute(a, "gen_ai.operation.name"), Some("chat"));
    assert_eq!(string_attribute(a, "gen_ai.request.model"), Some(model.as_str()));
    assert_eq!(string_attribute(a, "gen_ai.response.id"), chat["id"].as_str());
    assert_eq!(int_attribute(a, "gen_ai.request.max_tokens"), Some(8));
    assert_eq!(int_attribute(a, "gen_ai.usage.input_tokens"), chat["usage"]["prompt_tokens"].as_i64());
    assert_eq!(int_attribute(a, "gen_ai.usage.output_tokens"), chat["usage"]["completion_tokens"].as_i64());
    let reasons = |s: &Span| -> Vec<String> {
        match kandle_tests::otlp_collector::attribute(&s.attributes, "gen_ai.response.finish_reasons") {
            Some(kandle_tests::otlp_collector::any_value::Value::ArrayValue(a)) => a
                .values
                .iter()
                .filter_map(|v| match &v.value {
                    Some(kandle_tests::otlp_collector::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            other => panic!("finish reasons of {}: {other:?}", s.name),
        }
    };
    assert_eq!(reasons(generation), vec![chat["choices"][0]["finish_reason"].as_str().unwrap().to_owned()]);
    let first = generation.events.iter().find(|e| e.name == "first text").expect("a first-text event");
    assert!(first.time_unix_nano >= generation.start_time_unix_nano && first.time_unix_nano <= generation.end_time_unix_nano);
    assert!(generation.start_time_unix_nano >= server.start_time_unix_nano && generation.end_time_unix_nano <= server.end_time_unix_nano);

    // The streamed completion: a trace of its own, whose spans last to the stream's end (the
    // usage is only known there).
    let completions: Vec<&Span> = spans.iter().filter(|s| s.name == "POST /v1/completions").collect();
    assert_eq!(completions.len(), 3, "the streamed request, the one timed out and the refused one");
    let with_status = |code| {
        *completions.iter().find(|s| int_attribute(&s.attributes, "http.response.status_code") == Some(code)).unwrap()
    };
    let (server, timed_out_span, refused) = (with_status(200), with_status(504), with_status(401));
    assert_ne!(hex(&server.trace_id), TRACE_ID);
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(int_attribute(&server.attributes, "http.response.status_code"), Some(200));
    let generation = child_of(&spans, server, &format!("text_completion {model}"));
    assert_eq!(int_attribute(&generation.attributes, "gen_ai.request.choice.count"), Some(2));
    assert_eq!(int_attribute(&generation.attributes, "gen_ai.usage.input_tokens"), streamed_usage["prompt_tokens"].as_i64());
    assert_eq!(int_attribute(&generation.attributes, "gen_ai.usage.output_tokens"), streamed_usage["completion_tokens"].as_i64());
    let mut got = reasons(generation);
    got.sort();
    assert_eq!(got, stream_reasons);
    assert!(generation.end_time_unix_nano <= server.end_time_unix_nano, "the request's span outlasts its generation");

    // The request past its time limit: both spans are errors, the generation's with the cause.
    assert_eq!(timed_out_span.status.as_ref().map(|s| s.code), Some(2), "a 504 is an error");
    let generation = child_of(&spans, timed_out_span, &format!("text_completion {model}"));
    let status = generation.status.as_ref().expect("a status");
    assert_eq!((status.code, status.message.as_str()), (2, timed_out["error"]["message"].as_str().unwrap()));

    // The refused request: a span with its 401, not an error, and no generation.
    assert_eq!(int_attribute(&refused.attributes, "http.response.status_code"), Some(401));
    assert_ne!(refused.status.as_ref().map_or(0, |s| s.code), 2, "a client's error is not the server's");
    assert!(!spans.iter().any(|s| s.parent_span_id == refused.span_id), "no child under a refused request");

    // Probes are not traced: the readiness polls above left no span.
    assert!(!spans.iter().any(|s| s.name.contains("/ready")), "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let names: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions", &format!("chat {model}"), &format!("text_completion {model}")]
            .into_iter()
            .collect()
    );
}

#[tokio::test]
async fn a_grpc_protocol_is_refused_at_start_naming_the_variable() {
    let mut c = runtime();
    c.arg("serve").arg("--model").arg(models::smollm2_gguf())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(60), c.output()).await.expect("exits at once").unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {text}");
    assert!(text.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported"), "{text}");
    assert!(text.contains("http/protobuf"), "{text}");
}

#[tokio::test]
async fn an_embeddings_request_is_an_embeddings_span() {
    let collector = OtlpCollector::start().unwrap();
    let (child, url) = serve_traced(&collector, &models::minilm_dir(), &[]).await;
    let models: Value = reqwest::get(format!("{url}/v1/models")).await.unwrap().json().await.unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .json(&json!({"model": model, "input": ["A first sentence.", format!("{PROMPT_WORD} is a second one.")], "encoding_format": "base64"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let spans = stop(child, &collector).await;
    for raw in collector.bodies() {
        assert!(!String::from_utf8_lossy(&raw).contains(PROMPT_WORD), "the input was exported");
    }
    let server = one(&spans, "POST /v1/embeddings");
    let span = child_of(&spans, server, &format!("embeddings {model}"));
    let a = &span.attributes;
    assert_eq!(string_attribute(a, "gen_ai.operation.name"), Some("embeddings"));
    assert_eq!(string_attribute(a, "gen_ai.request.model"), Some(model.as_str()));
    assert_eq!(int_attribute(a, "gen_ai.usage.input_tokens"), answer["usage"]["prompt_tokens"].as_i64());
    assert_eq!(int_attribute(a, "gen_ai.embeddings.dimension.count"), Some(384));
    match kandle_tests::otlp_collector::attribute(a, "gen_ai.request.encoding_formats") {
        Some(kandle_tests::otlp_collector::any_value::Value::ArrayValue(v)) => {
            assert_eq!(v.values.len(), 1);
            assert_eq!(v.values[0].value, Some(kandle_tests::otlp_collector::any_value::Value::StringValue("base64".into())));
        }
        other => panic!("encoding formats: {other:?}"),
    }
    assert!(span.start_time_unix_nano >= server.start_time_unix_nano && span.end_time_unix_nano <= server.end_time_unix_nano);
}

/// Spans leave on the batch processor's schedule while the server runs, not only at exit;
/// OTLP's JSON encoding (`http/json`) and `OTEL_EXPORTER_OTLP_HEADERS` reach the collector, and
/// the headers' values (a collector's credentials) are not logged, even at `debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_leave_on_schedule_as_json_with_the_configured_headers() {
    let collector = OtlpCollector::start().unwrap();
    let secret = "collector-token-5f1c9a";
    let env: Vec<(String, String)> = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
        ("OTEL_EXPORTER_OTLP_HEADERS", format!("authorization=Bearer {secret},x-scope-orgid=kandle")),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ("RUST_LOG", "debug".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let (mut child, url) = serve_traced_with(&collector, &models::minilm_dir(), &[], &env).await;
    let log = read_log(&mut child);
    let model = embed_one(&url, "On schedule.").await;

    let t0 = Instant::now();
    while collector.spans().len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the spans were not sent on the schedule: {:?}", collector.spans());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "sent while the server runs");
    let spans: Vec<Span> = collector.spans().into_iter().map(|(_, s)| s).collect();
    let server = one(&spans, "POST /v1/embeddings");
    child_of(&spans, server, &format!("embeddings {model}"));
    let exports = collector.exports();
    assert!(!exports.is_empty());
    for e in &exports {
        assert_eq!(e.content_type, "application/json");
        let header = |name: &str| e.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(header("authorization"), Some(format!("Bearer {secret}").as_str()));
        assert_eq!(header("x-scope-orgid"), Some("kandle"));
    }

    let status = terminate(&mut child).await;
    let log = log.await.unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("DEBUG"), "the log was at debug: {log}");
    assert!(!log.contains(secret), "the collector's credentials were logged:\n{log}");
    assert_eq!(collector.refused(), Vec::<String>::new());
}

/// Mutual TLS to a collector (`OtlpCollector::start_tls`): with its CA in
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` and a client certificate and key in
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` / `OTEL_EXPORTER_OTLP_CLIENT_KEY`, the spans arrive;
/// without the client certificate, or without the CA, the collector refuses the handshake and
/// nothing arrives, while the server answers and exits as usual; a file that cannot be read
/// stops the start naming its variable; the key's text is never logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_collector_over_mutual_tls_with_the_configured_certificates() {
    let (collector, pki) = OtlpCollector::start_tls().unwrap();
    assert!(collector.url().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (ca, cert, key) = (file("ca.pem", &pki.ca), file("client.pem", &pki.cert), file("client.key", &pki.key));
    let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let key_text: String = pki.key.lines().nth(1).unwrap().to_owned();
    // The refused first: nothing may have arrived before the run that is let in.
    let runs = [
        ("the CA alone", vec![var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", &ca)], false),
        ("no CA", vec![var("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert), var("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key)], false),
        (
            "the CA and a client certificate",
            vec![var("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca), var("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert), var("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key)],
            true,
        ),
    ];
    for (what, mut env, let_in) in runs {
        env.push(var("RUST_LOG", "debug"));
        let refused_before = collector.refused().len();
        let (mut child, url) = serve_traced_with(&collector, &models::minilm_dir(), &[], &env).await;
        let log = read_log(&mut child);
        let model = embed_one(&url, "Over TLS.").await;
        let status = terminate(&mut child).await;
        let log = log.await.unwrap();
        assert!(status.success(), "{what}: {status}\n{log}");
        assert!(!log.contains(&key_text), "{what}: the client key was logged");
        let spans: Vec<Span> = collector.spans().into_iter().map(|(_, s)| s).collect();
        let refused = collector.refused()[refused_before..].to_vec();
        if let_in {
            assert_eq!(refused, Vec::<String>::new(), "{what}");
            let server = one(&spans, "POST /v1/embeddings");
            child_of(&spans, server, &format!("embeddings {model}"));
        } else {
            assert!(spans.is_empty(), "{what}: {spans:?}");
            assert!(!refused.is_empty() && refused.iter().all(|r| r.starts_with("TLS handshake")), "{what}: the exporter tried and was refused: {refused:?}");
        }
    }

    // A file that cannot be read stops the start, naming its variable.
    let mut c = runtime();
    c.arg("serve").arg("--model").arg(models::minilm_dir())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url())
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", dir.path().join("missing.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(60), c.output()).await.expect("exits at once").unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {text}");
    assert!(text.contains("OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read"), "{text}");
}

#[tokio::test]
async fn a_model_pod_built_by_the_operator_tags_its_spans_with_its_kubernetes_attributes() {
    use kandle_operator::LanguageModel;
    use kandle_operator::builders::{BuilderConfig, Resolution, deployment};

    let collector = OtlpCollector::start().unwrap();
    let lm: LanguageModel = serde_json::from_value(json!({
        "apiVersion": "kandle.dev/v1alpha1",
        "kind": "LanguageModel",
        "metadata": {"name": "minilm", "namespace": "search", "uid": "0b5e5c8e-1b1e-4c59-9d3e-6d7a3f0e2a12"},
        "spec": {
            "model": {"pvc": {"claimName": "models", "path": "all-MiniLM-L6-v2"}, "task": "Embedding"},
            "runtime": {"env": [{"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "team=search,k8s.container.name=server"}]}
        }
    }))
    .unwrap();
    let config = BuilderConfig { runtime_otlp_endpoint: Some(collector.url()), ..BuilderConfig::default() };
    let d = deployment(&lm, &config, &Resolution::default()).unwrap();
    let serve = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let fields = [("metadata.name", "minilm-6f7d9c-x2kqp"), ("metadata.uid", "7c1e2b44-5d3a-4f0e-9b6e-2a8f1c3d4e5f"), ("spec.nodeName", "cpu-node-3")];
    let env = kandle_tests::kubelet_env(serve.env.as_deref().unwrap(), |_, from| {
        let path = &from.field_ref.as_ref().expect("only downward-API fields here").field_path;
        fields.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("no value for {path}")).1.to_owned()
    });
    assert!(env.iter().any(|(k, v)| k == "OTEL_EXPORTER_OTLP_ENDPOINT" && *v == collector.url()), "{env:?}");

    let (child, url) = serve_traced_with(&collector, &models::minilm_dir(), &[], &env).await;
    let models: Value = reqwest::get(format!("{url}/v1/models")).await.unwrap().json().await.unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();
    let r = reqwest::Client::new().post(format!("{url}/v1/embeddings")).json(&json!({"model": model, "input": "Where am I?"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let received = stop_with_resources(child, &collector).await;
    assert!(!received.is_empty());
    for (resource, span) in &received {
        let attribute = |key: &str| string_attribute(resource, key);
        assert_eq!(attribute("k8s.namespace.name"), Some("search"), "{}", span.name);
        assert_eq!(attribute("k8s.deployment.name"), Some("minilm"));
        assert_eq!(attribute("k8s.pod.name"), Some("minilm-6f7d9c-x2kqp"));
        assert_eq!(attribute("k8s.pod.uid"), Some("7c1e2b44-5d3a-4f0e-9b6e-2a8f1c3d4e5f"));
        assert_eq!(attribute("k8s.node.name"), Some("cpu-node-3"));
        assert_eq!(attribute("team"), Some("search"), "the user's own attributes are kept");
        assert_eq!(attribute("k8s.container.name"), Some("server"), "a key the user gives wins");
    }
}
