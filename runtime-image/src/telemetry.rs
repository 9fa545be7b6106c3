//! The runtime's trace spans; the log and the exporter are `kandle_telemetry`'s (which says
//! which `OTEL_*` variables apply).
//!
//! What is exported: the spans made here only (target [`TARGET`]), whatever `RUST_LOG` says:
//! - one server span per HTTP request (not the probes and scrapes, `/health`, `/ready` and
//!   `/metrics`), `{method} {route}`, a child of the caller's span when
//!   the request carries a W3C `traceparent` header, with the route, the status and the
//!   request id; a 5xx marks it an error. A streamed answer's span ends with its last event,
//!   not with its headers;
//! - inside it, for chat, completions and the Responses API, one span per generation,
//!   `{operation} {model}`, with OpenTelemetry's GenAI attributes (`gen_ai.operation.name`,
//!   `gen_ai.request.model`, `gen_ai.request.max_tokens`, `gen_ai.request.temperature`,
//!   `gen_ai.request.top_p`, `gen_ai.request.choice.count`, `gen_ai.response.id`,
//!   `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//!   `gen_ai.response.finish_reasons`) and vLLM's `gen_ai.latency.time_to_first_token`
//!   (seconds from admission to the first text the client gets).
//!
//! - for `/v1/embeddings`, a span `embeddings {model}` with the inputs' tokens
//!   (`gen_ai.usage.input_tokens`), `gen_ai.request.encoding_formats` and
//!   `gen_ai.embeddings.dimension.count`.
//!
//! Never exported: headers, bodies, prompts, answers, keys.

use std::time::Instant;

use opentelemetry::trace::Status;
use opentelemetry::{KeyValue, Value};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the spans that are exported; the log leaves them out.
pub const TARGET: &str = "kandle::otel";

/// Routes that are not traced: probes and scrapes, which would bury the requests' traces.
const UNTRACED: [&str; 3] = ["/health", "/ready", "/metrics"];

/// The server span of one HTTP request (see the module documentation): a child of the
/// caller's span when `headers` carry its W3C trace context. Disabled, and free, when
/// nothing exports, and for [`UNTRACED`] routes.
pub fn request_span(
    method: &axum::http::Method,
    route: &str,
    request_id: &str,
    headers: &axum::http::HeaderMap,
) -> Span {
    if UNTRACED.contains(&route) {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        kandle.request_id = %request_id,
    );
    if !span.is_disabled() {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&opentelemetry_http::HeaderExtractor(headers))
        });
        // Without a `traceparent` the context is empty and the span starts a trace.
        let _ = span.set_parent(parent);
    }
    span
}

/// Records the response's status on a [`request_span`]; a 5xx is an error.
pub fn record_status(span: &Span, status: u16) {
    // As an integer: tracing-opentelemetry writes unsigned fields as text.
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of an embeddings request, `embeddings {model}`, a child of the current span,
/// with OpenTelemetry's GenAI attributes: the model, the inputs' tokens, the encoding and the
/// embeddings' width. Disabled, and free, when nothing exports.
pub fn embeddings_span(model: &str, input_tokens: usize, base64: bool, dimensions: usize) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "embeddings",
        otel.name = %format_args!("embeddings {model}"),
    );
    if !span.is_disabled() {
        let format = Value::Array(opentelemetry::Array::String(vec![
            if base64 { "base64" } else { "float" }.into(),
        ]));
        for (key, value) in [
            ("gen_ai.operation.name", Value::from("embeddings")),
            ("gen_ai.request.model", Value::from(model.to_owned())),
            ("gen_ai.response.model", Value::from(model.to_owned())),
            ("gen_ai.usage.input_tokens", Value::I64(input_tokens as i64)),
            ("gen_ai.request.encoding_formats", format),
            (
                "gen_ai.embeddings.dimension.count",
                Value::I64(dimensions as i64),
            ),
        ] {
            span.set_attribute(key, value);
        }
    }
    span
}

/// Marks `span` failed with `message`.
pub fn failed(span: &Span, message: &str) {
    if !span.is_disabled() {
        span.set_status(Status::error(message.to_owned()));
    }
}

/// One generation (a chat, completions or Responses API request, all its choices): a span
/// with OpenTelemetry's GenAI attributes, a child of the current span. It ends when dropped;
/// a streamed answer holds it, and with it its request's span, to its last event.
pub struct Generation {
    span: Span,
    /// The request's span, the current one at the start.
    request: Span,
    started: Instant,
    first_text: std::sync::atomic::AtomicBool,
}

/// What a [`Generation`] records of its request.
pub struct GenerationRequest<'a> {
    /// `chat` or `text_completion`.
    pub operation: &'static str,
    pub model: &'a str,
    pub response_id: &'a str,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Choices of every prompt.
    pub choices: usize,
}

impl Generation {
    /// Starts the span, under the current one (the request's), just before admission.
    pub fn start(r: &GenerationRequest<'_>) -> Self {
        let span = tracing::info_span!(
            target: TARGET,
            "generation",
            otel.name = %format_args!("{} {}", r.operation, r.model),
        );
        if !span.is_disabled() {
            for (key, value) in [
                ("gen_ai.operation.name", Value::from(r.operation)),
                ("gen_ai.request.model", Value::from(r.model.to_owned())),
                ("gen_ai.response.model", Value::from(r.model.to_owned())),
                ("gen_ai.response.id", Value::from(r.response_id.to_owned())),
                ("gen_ai.request.max_tokens", Value::I64(r.max_tokens as i64)),
                (
                    "gen_ai.request.temperature",
                    Value::F64(r.temperature as f64),
                ),
                ("gen_ai.request.top_p", Value::F64(r.top_p as f64)),
                ("gen_ai.request.choice.count", Value::I64(r.choices as i64)),
            ] {
                span.set_attribute(key, value);
            }
        }
        Generation {
            span,
            request: Span::current(),
            started: Instant::now(),
            first_text: false.into(),
        }
    }

    /// Marks the first text of any choice (later calls do nothing).
    pub fn text(&self) {
        use std::sync::atomic::Ordering;
        if !self.span.is_disabled() && !self.first_text.swap(true, Ordering::Relaxed) {
            let seconds = self.started.elapsed().as_secs_f64();
            self.span
                .set_attribute("gen_ai.latency.time_to_first_token", seconds);
            self.span.add_event(
                "first text",
                vec![KeyValue::new("gen_ai.latency.time_to_first_token", seconds)],
            );
        }
    }

    /// The answer's counts (each prompt once, every choice's tokens) and each choice's
    /// finish reason.
    pub fn finished(&self, input_tokens: usize, output_tokens: usize, reasons: Vec<&'static str>) {
        if self.span.is_disabled() {
            return;
        }
        self.span
            .set_attribute("gen_ai.usage.input_tokens", input_tokens as i64);
        self.span
            .set_attribute("gen_ai.usage.output_tokens", output_tokens as i64);
        let reasons = reasons.into_iter().map(Into::into).collect::<Vec<_>>();
        self.span.set_attribute(
            "gen_ai.response.finish_reasons",
            Value::Array(opentelemetry::Array::String(reasons)),
        );
    }

    /// The generation failed (the model thread's error, or it stopped).
    pub fn failed(&self, message: &str) {
        failed(&self.span, message);
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // The generation's span ends here (never entered, it ends when closed). Then, as
        // tracing-opentelemetry ends a span where it was last exited, entering the request's
        // once more moves its end past the generation's (a stream's last event), later than
        // the handler's return, when only the response's headers were sent.
        drop(std::mem::replace(&mut self.span, Span::none()));
        self.request.in_scope(|| {});
    }
}
