//! The HTTP server: OpenAI-compatible routes over the [`Engine`], health/readiness, metrics,
//! API keys, and graceful drain. Knows nothing of candle.
//!
//! Life cycle: `start` binds the port and serves `/health` at once, loads and warms the model
//! on a blocking thread, and only then answers `/ready` with 200. `Server::shutdown` (SIGTERM in
//! the binary) marks the server draining (`/ready` 503, new requests 503), stops accepting
//! connections, lets in-flight requests — streams included — finish within the grace period,
//! then stops the model thread.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::StreamExt;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument as _;

use crate::api::{self, ApiError};
use crate::config::ServeConfig;
use crate::engine::{
    BatchTokens, Engine, EngineConfig, EngineError, FinishReason, Frontend, GenerateEvent,
    GenerateRequest, PromptLogprobs, TokenLogprob,
};
use crate::error::{Error, Result};
use crate::json_mode::Constraint;
use crate::metrics::Metrics;
use crate::model::Task;
use crate::reasoning::{ReasoningParser, Stream};
use crate::telemetry::{self, Generation, GenerationRequest};
use crate::tool_calls::{self, ToolCallParser};

/// Where model loading stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

struct AppState {
    config: ServeConfig,
    model_id: String,
    api_keys: Vec<String>,
    engine: OnceLock<Engine>,
    /// How `tool_choice: "auto"` reads the model's calls (`--tool-call-parser`, else what the
    /// chat template shows), set with the engine.
    tool_parser: OnceLock<ToolCallParser>,
    draining: AtomicBool,
    metrics: Metrics,
    registry: Registry,
    next_id: AtomicU64,
    created: u64,
    /// `/v1/responses` kept for `previous_response_id` (`--responses-store`).
    responses: crate::responses::ResponseStore,
    /// OpenAI's conversations (`--responses-store`).
    conversations: crate::conversations::ConversationStore,
}

impl AppState {
    fn engine(&self) -> Result<&Engine, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::with_status(
                503,
                "server_error",
                Some("shutting_down"),
                "the server is shutting down",
            ));
        }
        self.engine.get().ok_or_else(|| {
            ApiError::with_status(
                503,
                "server_error",
                Some("model_loading"),
                "the model is still loading",
            )
        })
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_id {
            Ok(())
        } else {
            Err(ApiError {
                status: 404,
                message: format!(
                    "the model {model:?} does not exist; this server serves {:?}",
                    self.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            })
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.unique())
    }

    /// Hex digits no other answer of this server has: its start time and a counter.
    fn unique(&self) -> String {
        format!(
            "{:016x}{:08x}",
            self.created,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.body())).into_response();
        if self.status == 429 || self.status == 503 {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Overloaded => {
            ApiError::with_status(429, "rate_limit_error", Some("overloaded"), e.to_string())
        }
        EngineError::Timeout => {
            ApiError::with_status(504, "server_error", Some("timeout"), e.to_string())
        }
        EngineError::ShuttingDown => {
            ApiError::with_status(503, "server_error", Some("shutting_down"), e.to_string())
        }
        EngineError::WrongTask(_) => ApiError::invalid(e.to_string(), Some("model")),
        EngineError::Internal(_) => ApiError::with_status(500, "server_error", None, e.to_string()),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status().as_u16();
        if status == 413 {
            ApiError::with_status(
                413,
                "invalid_request_error",
                Some("request_too_large"),
                "the request body is larger than this server accepts",
            )
        } else {
            ApiError::with_status(status, "invalid_request_error", None, r.body_text())
        }
    })
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    load: watch::Receiver<LoadState>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds the port, starts serving and starts loading the model in the background.
pub async fn start(config: ServeConfig) -> Result<Server> {
    let mut api_keys: Vec<String> = match &config.api_key_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| Error::io(p, e))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    if config.api_key_file.is_some() && api_keys.is_empty() {
        return Err(Error::Server("the API key file holds no key".into()));
    }
    if let Some(key) = &config.api_key {
        api_keys.push(key.0.clone());
    }
    // A malformed source fails at once; a missing model fails the load (the port answers).
    let source = config.source().map_err(Error::Model)?;
    let model_id = config.served_model_name();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let state = Arc::new(AppState {
        model_id,
        api_keys,
        engine: OnceLock::new(),
        tool_parser: OnceLock::new(),
        draining: AtomicBool::new(false),
        metrics,
        registry,
        next_id: AtomicU64::new(0),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        responses: crate::responses::ResponseStore::new(config.responses_store),
        conversations: crate::conversations::ConversationStore::new(config.responses_store),
        config: config.clone(),
    });

    let listener = tokio::net::TcpListener::bind((config.host, config.port))
        .await
        .map_err(|e| {
            Error::Server(format!(
                "cannot listen on {}:{}: {e}",
                config.host, config.port
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Server(e.to_string()))?;

    let (load_tx, load) = watch::channel(LoadState::Loading);
    let st = state.clone();
    tokio::spawn(async move {
        // A hub model is found in (or fetched into) the cache first; /health answers meanwhile.
        let outcome = match crate::hub::local_path(&source, &st.config.hub.hub_config()).await {
            Ok(path) => {
                let st = st.clone();
                tokio::task::spawn_blocking(move || load_and_warm(&st, &path))
                    .await
                    .unwrap_or_else(|e| Err(Error::Server(format!("the model loader failed: {e}"))))
            }
            Err(e) => Err(e),
        };
        let _ = load_tx.send(match outcome {
            Ok(()) => LoadState::Ready,
            Err(e) => {
                tracing::error!(error = %e, "model load failed");
                LoadState::Failed(e.to_string())
            }
        });
    });

    let (stop, stop_rx) = oneshot::channel::<()>();
    let st = state.clone();
    let app = router(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
                st.draining.store(true, Ordering::SeqCst);
            })
            .await
    });
    tracing::info!(%addr, "listening");
    Ok(Server {
        addr,
        state,
        load,
        stop: Some(stop),
        task,
    })
}

/// `--chat-template`: the file's template in place of the model's, with the model's
/// beginning- and end-of-text tokens (from its own template, else its tokenizer's).
fn replace_chat_template(
    model: &mut crate::model::LoadedModel,
    file: &std::path::Path,
) -> Result<()> {
    let crate::model::LoadedModel::Generation(g) = model else {
        return Err(Error::Server(format!(
            "--chat-template {}: this model does not chat (it is not a text-generation model)",
            file.display()
        )));
    };
    let source = std::fs::read_to_string(file)
        .map_err(|e| Error::Server(format!("--chat-template {}: {e}", file.display())))?;
    let (bos, eos) = match &g.chat_template {
        Some(t) => {
            let (b, e) = t.special_tokens();
            (b.to_owned(), e.to_owned())
        }
        None => (
            g.bos_to_prepend
                .map(|id| g.tokenizer.token_text(id))
                .unwrap_or_default(),
            g.eos_ids
                .first()
                .map(|&id| g.tokenizer.token_text(id))
                .unwrap_or_default(),
        ),
    };
    let template = crate::chat::ChatTemplate::new(source, bos, eos)
        .map_err(|e| Error::Server(format!("--chat-template {}: {e}", file.display())))?;
    g.chat_template = Some(template);
    Ok(())
}

fn load_and_warm(st: &AppState, path: &std::path::Path) -> Result<()> {
    let t0 = Instant::now();
    let cfg = &st.config;
    crate::backend::check_architecture(path, cfg.architecture.as_deref())?;
    let mut model = crate::backend::load(&crate::backend::LoadOptions {
        path: path.to_path_buf(),
        task: cfg.task,
        dtype: cfg.dtype.parse()?,
        device: cfg.device,
    })?;
    if let Some(file) = &cfg.chat_template {
        replace_chat_template(&mut model, file)?;
    }
    let (max_batch_size, max_queue) = cfg.admission_limits();
    let engine = Engine::start(
        model,
        EngineConfig {
            max_batch_size,
            max_queue,
            max_sequence_length: cfg
                .max_sequence_length
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            prefix_cache_tokens: cfg.prefix_cache_tokens,
            // Measured now, with the weights loaded and the cache not yet grown.
            batch_tokens: match cfg.max_batch_tokens {
                Some(n) => BatchTokens::Limit(usize::try_from(n).unwrap_or(usize::MAX)),
                None => BatchTokens::Memory {
                    free: cfg.device.free_memory(),
                },
            },
        },
        st.metrics.clone(),
    );
    // Warm-up: one real request through the engine, so that the first user request does not
    // pay for lazy initialisation (thread pools, allocations).
    // A plain executor: this runs on a blocking thread, outside the async runtime's workers.
    match engine.frontend().task {
        Task::TextGeneration | Task::Text2Text => {
            let prompt = engine.frontend().encode_prompt("Hello", true)?;
            let mut rx = engine
                .generate(GenerateRequest {
                    prompt,
                    max_tokens: 1,
                    sampling: crate::sampling::SamplingParams {
                        temperature: 0.0,
                        ..Default::default()
                    },
                    stop: Vec::new(),
                    deadline: Instant::now() + Duration::from_secs(600),
                    warmup: true,
                    json: None,
                    ending: Default::default(),
                })
                .map_err(|e| Error::Server(format!("warm-up: {e}")))?;
            futures::executor::block_on(async {
                while let Some(ev) = rx.recv().await {
                    if let GenerateEvent::Failed(e) = ev {
                        return Err(Error::Server(format!("warm-up: {e}")));
                    }
                }
                Ok(())
            })?;
        }
        Task::Embedding => {
            let ids = engine.frontend().tokenizer.encode("Hello", true)?;
            futures::executor::block_on(engine.embed(vec![ids]))
                .map_err(|e| Error::Server(format!("warm-up: {e}")))?;
        }
        Task::Classification => {
            let ids = engine.frontend().tokenizer.encode("Hello", true)?;
            futures::executor::block_on(engine.classify(vec![ids]))
                .map_err(|e| Error::Server(format!("warm-up: {e}")))?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    st.metrics.model_load_seconds.set(secs);
    let thp = crate::backend::thp_setting();
    let template = engine.frontend().chat_template.as_ref();
    let template = template.map(|t| t.source()).unwrap_or_default();
    let mut tool_parser = match cfg.tool_call_parser {
        Some(p) => p.refine(&template),
        None => ToolCallParser::detect(&template),
    };
    let tokenizer = &engine.frontend().tokenizer;
    if tool_parser.opening(|t| tokenizer.token_to_id(t)).is_none()
        && tool_parser != ToolCallParser::None
    {
        tracing::warn!(
            parser = ?tool_parser,
            "the vocabulary has no token that opens this format's calls: tool_choice \"auto\" is refused"
        );
        tool_parser = ToolCallParser::None;
    }
    let _ = st.tool_parser.set(tool_parser);
    if let Some(parser) = cfg.reasoning_parser
        && parser.thoughts(|t| tokenizer.token_to_id(t)).is_none()
    {
        let (start, end) = parser.tags();
        return Err(Error::Server(format!(
            "--reasoning-parser {}: the vocabulary has no {start} and {end} control tokens",
            parser.name()
        )));
    }
    tracing::info!(
        seconds = secs,
        model = %st.model_id,
        device = %cfg.device,
        dtype = %cfg.dtype,
        kernels = %crate::backend::kernels(),
        transparent_hugepages = %thp,
        tool_call_parser = ?tool_parser,
        "model loaded and warmed"
    );
    if let Some(w) = crate::backend::thp_warning(&thp, crate::backend::huge_page_weight_bytes()) {
        tracing::warn!("{w}");
    }
    let _ = st.engine.set(engine);
    Ok(())
}

impl Server {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the model is loaded and warmed, or its loading failed.
    pub async fn wait_loaded(&mut self) -> Result<()> {
        loop {
            match self.load.borrow_and_update().clone() {
                LoadState::Ready => return Ok(()),
                LoadState::Failed(e) => {
                    return Err(Error::Server(format!("model load failed: {e}")));
                }
                LoadState::Loading => {}
            }
            if self.load.changed().await.is_err() {
                return Err(Error::Server("the loader stopped".into()));
            }
        }
    }

    /// Stops admission and connections, waits up to `grace` for in-flight requests (streams
    /// included), then stops the model thread.
    pub async fn shutdown(mut self, grace: Duration) -> Result<()> {
        self.state.draining.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let abort = self.task.abort_handle();
        let served = match tokio::time::timeout(grace, &mut self.task).await {
            Ok(Ok(r)) => r.map_err(|e| Error::Server(e.to_string())),
            Ok(Err(e)) => Err(Error::Server(format!("server task: {e}"))),
            Err(_) => {
                tracing::warn!("grace period over; dropping the remaining requests");
                abort.abort();
                Ok(())
            }
        };
        if let Some(engine) = self.state.engine.get().cloned() {
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        }
        served
    }
}

/// Serves until SIGTERM or Ctrl-C, then drains. Fails if the model cannot be loaded.
pub async fn run(config: ServeConfig) -> Result<()> {
    let grace = config.shutdown_grace;
    let mut server = start(config).await?;
    let mut load = server.load.clone();
    let load_failed = async move {
        loop {
            if let LoadState::Failed(e) = load.borrow_and_update().clone() {
                return e;
            }
            if load.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        e = load_failed => {
            let _ = server.wait_loaded().await;
            return Err(Error::Server(format!("model load failed: {e}")));
        }
        _ = shutdown_signal() => {}
    }
    tracing::info!(
        grace_seconds = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    server.shutdown(grace).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route(
            "/v1/responses/{id}",
            get(retrieve_response).delete(delete_response),
        )
        .route("/v1/conversations", post(create_conversation))
        .route(
            "/v1/conversations/{id}",
            get(retrieve_conversation)
                .post(update_conversation)
                .delete(delete_conversation),
        )
        .route(
            "/v1/conversations/{id}/items",
            get(list_items).post(add_items),
        )
        .route(
            "/v1/conversations/{id}/items/{item}",
            get(retrieve_item).delete(delete_item),
        )
        .route("/v1/classify", post(classify))
        .route("/v1/rerank", post(rerank))
        .route("/rerank", post(rerank))
        .route("/v1/score", post(score))
        .route("/score", post(score))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(retrieve_model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::with_status(
                404,
                "invalid_request_error",
                Some("not_found"),
                "no such route",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::with_status(
                405,
                "invalid_request_error",
                Some("method_not_allowed"),
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_oversized,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), request_id))
        .layer(DefaultBodyLimit::max(state.config.max_request_bytes))
        .with_state(state)
}

/// A client's `X-Request-Id` when it is a plausible id (1–128 visible ASCII characters),
/// else a new one.
fn request_id_of(headers: &HeaderMap, st: &AppState) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| st.new_id("req"))
}

/// Tags every request with an id, as vLLM and TGI do: the client's `X-Request-Id` (else a new
/// one) comes back in the response's `X-Request-Id` and names the request in the log line
/// written when its answer starts (route, status, seconds: for a stream, to its headers;
/// never headers or bodies, which may carry keys), so that a client's report can be found in
/// the server's log. The request runs in its trace span ([`telemetry::request_span`]), which
/// carries the same id.
async fn request_id(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let id = request_id_of(req.headers(), &st);
    let route = matched_route(&req).unwrap_or_else(|| req.uri().path().chars().take(64).collect());
    let method = req.method().clone();
    let span = telemetry::request_span(&method, &route, &id, req.headers());
    let t0 = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    telemetry::record_status(&span, status);
    let seconds = t0.elapsed().as_secs_f64();
    if route.starts_with("/v1/") {
        tracing::info!(request_id = %id, %method, %route, status, seconds, "request");
    } else {
        tracing::debug!(request_id = %id, %method, %route, status, seconds, "request");
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Refuses a body whose declared length is over the limit before reading any of it (bodies
/// without a Content-Length are cut by `DefaultBodyLimit` while being read).
async fn refuse_oversized(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared
        && n > st.config.max_request_bytes as u64
    {
        return ApiError::with_status(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            format!(
                "the request body is {n} bytes; this server accepts at most {}",
                st.config.max_request_bytes
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// The route pattern the request matched (`/v1/completions`), if any.
fn matched_route(req: &Request) -> Option<String> {
    req.extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
}

async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // A bounded label set: an unmatched path is not a label of its own.
    let endpoint = matched_route(&req).unwrap_or_else(|| "unmatched".to_owned());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    st.metrics.observe_request(
        &endpoint,
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_api_key(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if st.api_keys.is_empty() {
        return next.run(req).await;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => ApiError::with_status(
            401,
            "invalid_request_error",
            Some("missing_api_key"),
            "an API key is required: send Authorization: Bearer <key>",
        )
        .into_response(),
        Some(k)
            if st
                .api_keys
                .iter()
                .any(|key| constant_time_eq(key.as_bytes(), k.as_bytes())) =>
        {
            next.run(req).await
        }
        Some(_) => ApiError::with_status(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "the API key is not valid",
        )
        .into_response(),
    }
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if st.draining.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response()
    } else if st.engine.get().is_some() {
        axum::Json(json!({"status": "ready", "model": st.model_id})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let body = crate::metrics::render(&st.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The served model as OpenAI's model object.
fn model_object(st: &AppState) -> Value {
    // vLLM's `max_model_len` (prompt plus output), which clients such as LiteLLM read; absent
    // while the model loads.
    let max_model_len = st.engine.get().map(|e| e.frontend().context_length);
    json!({"id": st.model_id, "object": "model", "created": st.created, "owned_by": "kandle",
           "max_model_len": max_model_len})
}

async fn list_models(State(st): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [model_object(&st)]}))
}

/// `GET /v1/models/{model}`: OpenAI's retrieve-model (`client.models.retrieve`), the model
/// object, or a 404 naming the served model. The id may hold slashes (`org/name`).
async fn retrieve_model(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    st.check_model(&model)?;
    Ok(axum::Json(model_object(&st)))
}

/// `POST /tokenize`: the ids the server would feed the model for a completions `prompt` or
/// chat `messages` (exactly one of the two), their count, and the model's context, so that a
/// client can fit a request before sending it.
async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::TokenizeRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    let frontend = engine.frontend();
    let ids = match (&r.prompt, &r.messages) {
        (Some(prompt), None) => frontend
            .encode_prompt(prompt, r.add_special_tokens)
            .map_err(|e| {
                ApiError::invalid(format!("cannot tokenise the prompt: {e}"), Some("prompt"))
            })?,
        (None, Some(messages)) => {
            if !matches!(frontend.task, Task::TextGeneration) {
                return Err(ApiError::invalid(
                    "this model has no chat format: send a prompt",
                    Some("messages"),
                ));
            }
            let messages = api::chat_messages(messages)?;
            let opts = r.template.options(&messages)?;
            frontend
                .encode_chat(&messages, None, &opts)
                .map_err(|e| {
                    ApiError::invalid(
                        format!("cannot apply the chat template: {e}"),
                        Some("messages"),
                    )
                })?
                .1
        }
        _ => {
            return Err(ApiError::invalid(
                "send exactly one of prompt and messages",
                Some("prompt"),
            ));
        }
    };
    Ok(axum::Json(json!({
        "tokens": ids,
        "count": ids.len(),
        "max_model_len": frontend.context_length,
    }))
    .into_response())
}

/// `POST /detokenize`: the text of token ids (special tokens kept), as the tokenizer decodes
/// them.
async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::DetokenizeRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    let frontend = engine.frontend();
    let vocab = frontend.tokenizer_vocab_size();
    if let Some(bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token {bad} is outside the vocabulary ({vocab} tokens)"),
            Some("tokens"),
        ));
    }
    // Not an empty list to the decoder: Blenderbot's BPE decoder panics on one.
    let text = match r.tokens.is_empty() {
        true => String::new(),
        false => frontend.tokenizer.decode(&r.tokens, false).map_err(|e| {
            ApiError::invalid(format!("cannot decode the tokens: {e}"), Some("tokens"))
        })?,
    };
    Ok(axum::Json(json!({ "prompt": text })).into_response())
}

/// What chat and completions share once validated.
struct Prepared {
    /// One per prompt (chat and most completions: one).
    reqs: Vec<GenerateRequest>,
    /// Completions' `echo`: per prompt, what comes before each of its choices.
    echo: Option<Vec<Echo>>,
    /// Chat: a forced tool call, which the answer is.
    tool: Option<ToolOut>,
    /// Choices per prompt: each of `reqs` run `n` times, choice `j` with the seed plus `j`
    /// when a seed is set; choice `j` of prompt `i` has the index `i · n + j`, as OpenAI's.
    n: usize,
    stream: bool,
    include_usage: bool,
    /// vLLM's `continuous_usage_stats`: every chunk of a choice carries its usage so far.
    continuous_usage: bool,
    logprobs: bool,
    /// Chat: the answer's thoughts go to `reasoning` and `reasoning_content`, as this parser
    /// tells them ([`crate::reasoning`]).
    reasoning: Option<ReasoningParser>,
}

/// The field of a chat answer's thoughts: vLLM's (since 0.11, which OpenAI's guidance for
/// chain of thought in Chat Completions names), and DeepSeek's API's, which many clients
/// still read. Both are sent, with the same text.
const REASONING: &str = "reasoning";
const REASONING_CONTENT: &str = "reasoning_content";

/// How a chat answer is read for tool calls: a forced call's ([`api::ForcedCall`]) is the
/// arguments of the tool named, or `{"name", "arguments"}` of the tool the model chose; with
/// `tool_choice: "auto"` ([`api::AutoCalls`]) the answer is text with calls in the model's
/// own format.
#[derive(Clone)]
enum ToolOut {
    Named(String),
    Chosen,
    Parsed(ToolCallParser, tool_calls::CallShape),
}

/// A `tool_calls` entry.
fn call_entry(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

impl ToolOut {
    /// The `tool_calls` entry of a forced call's answer `text` (`None`: a chosen call cut
    /// short, which is no call), its arguments as the JSON text the model wrote or, for a
    /// chosen call, the arguments written again compactly.
    fn call(&self, id: &str, text: &str) -> Option<Value> {
        match self {
            ToolOut::Named(name) => Some(call_entry(id, name, text)),
            ToolOut::Chosen => {
                let c = tool_calls::call_of(&serde_json::from_str(text).ok()?)?;
                Some(call_entry(id, &c.name, &c.arguments))
            }
            ToolOut::Parsed(..) => None,
        }
    }

    /// An answer's `message`, and whether it holds calls.
    fn message(&self, st: &AppState, text: &str) -> (Value, bool) {
        let parsed = match self {
            ToolOut::Parsed(p, shape) => p.parse(text, shape).map(|a| {
                let calls: Vec<Value> = (a.calls.iter())
                    .map(|c| call_entry(&st.new_id("call"), &c.name, &c.arguments))
                    .collect();
                (a.content, calls)
            }),
            _ => self.call(&st.new_id("call"), text).map(|c| (None, vec![c])),
        };
        match parsed {
            Some((content, calls)) => (
                json!({"role": "assistant", "content": content, "tool_calls": calls}),
                true,
            ),
            None => (json!({"role": "assistant", "content": text}), false),
        }
    }

    /// The finish reason of a call: `tool_calls` once it is whole, as OpenAI's.
    fn finish(reason: FinishReason) -> &'static str {
        match reason {
            FinishReason::Stop => "tool_calls",
            FinishReason::Length => "length",
        }
    }
}

/// A prompt echoed before its choices: its text as given (token ids decoded) and, when
/// `logprobs` is asked, its tokens' log-probabilities.
struct Echo {
    text: String,
    logprobs: Option<PromptLogprobs>,
}

/// The room for output after a prompt of `prompt_len` tokens: what the context leaves, and
/// what each of the request's `n` choices' share of the batch token budget leaves
/// ([`BatchTokens`]; a request's sequences must fit in it together, each counted at what its
/// cache holds, [`Frontend::cache_cost`]). A prompt that fills either is refused naming
/// `param`, the field the prompt came from; a `max_tokens` past the room is cut to it, the
/// answer ending with `length`.
fn check_context(
    prompt_len: usize,
    frontend: &Frontend,
    n: usize,
    param: &'static str,
) -> Result<usize, ApiError> {
    let context = frontend.context_length;
    if prompt_len == 0 {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let too_long = |message: String| ApiError {
        status: 400,
        message,
        kind: "invalid_request_error",
        param: Some(param),
        code: Some("context_length_exceeded"),
    };
    if prompt_len >= context {
        return Err(too_long(format!(
            "the prompt is {prompt_len} tokens, but this model's context is {context} tokens (prompt plus output)"
        )));
    }
    let room = context - prompt_len;
    let Some(budget) = frontend.batch_tokens else {
        return Ok(room);
    };
    let share = budget / n.max(1);
    let most = frontend.cache_cost.most_positions(share);
    if prompt_len >= most {
        let each = match n > 1 {
            true => format!(", {share} for each of its {n} choices"),
            false => String::new(),
        };
        let windowed = match most != share {
            true => format!(
                " (this model's windowed layers keep their last positions only, so a sequence of up to {most} tokens fits {share})"
            ),
            false => String::new(),
        };
        return Err(too_long(format!(
            "the prompt is {prompt_len} tokens, but this server's running batch holds {budget} tokens of prompts and outputs together (--max-batch-tokens){each}{windowed}"
        )));
    }
    Ok(room.min(most - prompt_len))
}

/// The constraint of `response_format` (`format`) or vLLM's guided decoding fields, which
/// may not both be given.
fn guided_or_format(
    format: Option<Constraint>,
    vllm: &api::VllmFields,
) -> Result<Option<Constraint>, ApiError> {
    match (format, vllm.guided()?) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "response_format and vLLM's guided decoding both shape the answer; send one of them",
            Some("response_format"),
        )),
        (f, g) => Ok(f.or(g)),
    }
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::ChatCompletionRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    if engine.frontend().task == Task::Text2Text {
        // An encoder-decoder has no chat format to render messages with; guessing one would
        // silently change what the model sees.
        return Err(ApiError::invalid(
            "this is a text-to-text (encoder-decoder) model with no chat format: send the input \
             text as the prompt of /v1/completions",
            Some("messages"),
        ));
    }
    let n = api::check_n(r.n, st.config.max_batch_size + st.config.max_queue)?;
    r.unsupported.check()?;
    let mut json = guided_or_format(r.unsupported.json_constraint()?, &r.vllm)?;
    let parser = st
        .tool_parser
        .get()
        .copied()
        .unwrap_or(ToolCallParser::None);
    let tool_use = r.unsupported.tool_use(parser)?;
    let (call, auto) = match &tool_use {
        Some(t) => (t.call.as_ref(), t.auto.as_ref()),
        None => (None, None),
    };
    let tool = match (call, auto) {
        (Some(_), _) | (_, Some(_)) if json.is_some() => {
            return Err(ApiError::invalid(
                "response_format and tool calls both shape the answer; send one of them, or \
                 tool_choice \"none\"",
                Some("response_format"),
            ));
        }
        (Some(call), _) => {
            json = Some(Constraint::Schema(call.schema.clone()));
            Some(match &call.name {
                Some(name) => ToolOut::Named(name.clone()),
                None => ToolOut::Chosen,
            })
        }
        (None, Some(auto)) => {
            json = Some(
                auto.parser
                    .constraint(&auto.shape, auto.once, |t| {
                        engine.frontend().tokenizer.token_to_id(t)
                    })
                    .expect("a parser whose control tokens the vocabulary has (checked at start)"),
            );
            Some(ToolOut::Parsed(auto.parser, auto.shape.clone()))
        }
        (None, None) => None,
    };
    let messages = api::chat_messages(&r.messages)?;
    let template = r.template.options(&messages)?;
    let logprobs = match (r.logprobs, r.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs requires logprobs: true",
                Some("top_logprobs"),
            ));
        }
        (false, None) => None,
        (true, n) => {
            let n = n.unwrap_or(0);
            if !(0..=api::MAX_TOP_LOGPROBS).contains(&n) {
                return Err(ApiError::invalid(
                    format!(
                        "top_logprobs must be between 0 and {}",
                        api::MAX_TOP_LOGPROBS
                    ),
                    Some("top_logprobs"),
                ));
            }
            Some(n as usize)
        }
    };
    let fields = api::SamplingFields {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        min_p: r.min_p,
        seed: r.seed,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        repetition_penalty: r.vllm.repetition_penalty,
    };
    let mut sampling = api::sampling_params(&fields, logprobs)?;
    sampling.logit_bias = api::logit_bias(
        r.logit_bias.as_ref(),
        engine.frontend().tokenizer_vocab_size(),
    )?;
    let (param, requested) = match r.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", r.max_tokens),
    };
    let max_tokens = api::max_tokens(requested, st.config.max_new_tokens, param)?;
    let stop = api::stop_sequences(r.stop.as_ref())?;
    let mut ending = r.vllm.ending(max_tokens, engine.frontend().vocab_limit)?;
    // A format whose calls open with a control token is read from the text with it.
    if let Some(ToolOut::Parsed(p, _)) = &tool {
        ending.keep_special |= p.keeps_special_tokens();
    }
    let frontend = engine.frontend();
    let tools = tool_use.as_ref().map(|t| &t.tools);
    let (prompt_text, prompt) = frontend
        .encode_chat(&messages, tools, &template)
        .map_err(|e| {
            ApiError::invalid(
                format!("cannot apply the chat template: {e}"),
                Some("messages"),
            )
        })?;
    let prompt = r.vllm.truncate_prompt(prompt, frontend.context_length)?;
    let room = check_context(prompt.len(), frontend, n, "messages")?;
    // Thoughts are split from the answer, a constraint (tool calls' too) applying after them.
    let reasoning = (st.config.reasoning_parser).filter(|p| !p.thoughts_closed(&prompt_text));
    let json = match (json, reasoning) {
        (Some(c), Some(parser)) => {
            let thoughts = parser
                .thoughts(|t| frontend.tokenizer.token_to_id(t))
                .expect("a parser whose control tokens the vocabulary has (checked at start)");
            Some(Constraint::AfterThoughts(Box::new(c), thoughts))
        }
        (json, _) => json,
    };
    // Mistral's thoughts open and close with control tokens, read from the text with them.
    if reasoning == Some(ReasoningParser::Mistral) {
        ending.keep_special = true;
    }
    let prepared = Prepared {
        echo: None,
        tool,
        reqs: vec![GenerateRequest {
            prompt,
            max_tokens: max_tokens.min(room),
            sampling,
            stop,
            deadline: Instant::now() + st.config.request_timeout,
            warmup: false,
            json,
            ending,
        }],
        n,
        stream: r.stream,
        include_usage: r.stream_options.as_ref().is_some_and(|o| o.include_usage),
        continuous_usage: r
            .stream_options
            .as_ref()
            .is_some_and(api::StreamOptions::continuous),
        logprobs: logprobs.is_some(),
        reasoning,
    };
    respond(st, engine, prepared, Flavor::Chat).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::CompletionRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    let n = api::check_n(r.n, st.config.max_batch_size + st.config.max_queue)?;
    r.unsupported.check()?;
    if r.echo && engine.frontend().task == Task::Text2Text {
        return Err(ApiError::invalid(
            "echo is not supported by a text-to-text (encoder-decoder) model: its prompt is the \
             encoder's input, not the start of its output",
            Some("echo"),
        ));
    }
    let json = guided_or_format(api::json_constraint(r.response_format.as_ref())?, &r.vllm)?;
    // `suffix`: fill in the middle, in the format the vocabulary has (crate::fim).
    let fim = match r.unsupported.suffix()? {
        None => None,
        Some(_) if r.echo => {
            return Err(ApiError::invalid(
                "echo and suffix cannot be combined: the prompt is not the start of the text",
                Some("echo"),
            ));
        }
        Some(suffix) => {
            let tokenizer = &engine.frontend().tokenizer;
            let fim = crate::fim::Fim::detect(|t| tokenizer.token_to_id(t)).ok_or_else(|| {
                ApiError::invalid(
                    "suffix (fill in the middle) needs a model whose vocabulary has \
                     fill-in-the-middle tokens: Mistral's [SUFFIX] and [PREFIX], or \
                     <|fim_prefix|>, <fim_prefix> or <｜fim▁begin｜> and theirs; this one has none",
                    Some("suffix"),
                )
            })?;
            Some((fim, suffix))
        }
    };
    let prompts = r.prompt.prompts();
    api::check_prompts(
        prompts.len(),
        n,
        st.config.max_batch_size + st.config.max_queue,
    )?;
    let logprobs = match r.logprobs {
        None => None,
        Some(n) if (0..=5).contains(&n) => Some(n as usize),
        Some(_) => {
            return Err(ApiError::invalid(
                "logprobs must be between 0 and 5",
                Some("logprobs"),
            ));
        }
    };
    let fields = api::SamplingFields {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        min_p: r.min_p,
        seed: r.seed,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        repetition_penalty: r.vllm.repetition_penalty,
    };
    let mut sampling = api::sampling_params(&fields, logprobs)?;
    sampling.logit_bias = api::logit_bias(
        r.logit_bias.as_ref(),
        engine.frontend().tokenizer_vocab_size(),
    )?;
    // The legacy API defaults to 16 tokens.
    let max_tokens = api::max_tokens(
        Some(r.max_tokens.unwrap_or(16)),
        st.config.max_new_tokens,
        "max_tokens",
    )?;
    let stop = api::stop_sequences(r.stop.as_ref())?;
    let ending = r.vllm.ending(max_tokens, engine.frontend().vocab_limit)?;
    let frontend = engine.frontend();
    let deadline = Instant::now() + st.config.request_timeout;
    let mut reqs = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::new();
    for p in prompts {
        if r.echo {
            echoes.push(match p {
                api::Prompt::Text(text) => text.to_owned(),
                api::Prompt::Tokens(ids) => frontend.tokenizer.decode(ids, false).map_err(|e| {
                    ApiError::invalid(format!("cannot decode the prompt: {e}"), Some("prompt"))
                })?,
            });
        }
        let cannot = |e: crate::Error| {
            ApiError::invalid(format!("cannot tokenise the prompt: {e}"), Some("prompt"))
        };
        let prompt = match (p, fim) {
            (api::Prompt::Text(text), None) => {
                frontend.encode_prompt(text, true).map_err(cannot)?
            }
            (api::Prompt::Text(text), Some((fim, suffix))) => {
                let bos = frontend.encode_prompt("", true).map_err(cannot)?;
                fim.prompt(&bos, text, suffix, |t| frontend.tokenizer.encode(t, false))
                    .map_err(cannot)?
            }
            (api::Prompt::Tokens(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "suffix needs the prompt as text, not token ids",
                    Some("suffix"),
                ));
            }
            (api::Prompt::Tokens(ids), None) => {
                let limit = frontend.vocab_limit;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= limit) {
                    return Err(ApiError::invalid(
                        format!(
                            "prompt holds token {bad}, outside the vocabulary ({limit} tokens)"
                        ),
                        Some("prompt"),
                    ));
                }
                ids.to_vec()
            }
        };
        let prompt = r.vllm.truncate_prompt(prompt, frontend.context_length)?;
        let room = check_context(prompt.len(), frontend, n, "prompt")?;
        reqs.push(GenerateRequest {
            prompt,
            max_tokens: max_tokens.min(room),
            sampling: sampling.clone(),
            stop: stop.clone(),
            deadline,
            warmup: false,
            json: json.clone(),
            ending: ending.clone(),
        });
    }
    // `echo`: each prompt's text before its choices' and, with `logprobs`, its tokens'.
    let echo = match (r.echo, logprobs) {
        (false, _) => None,
        (true, None) => Some(
            echoes
                .into_iter()
                .map(|text| Echo {
                    text,
                    logprobs: None,
                })
                .collect(),
        ),
        (true, Some(top)) => {
            let prompts = reqs.iter().map(|q| q.prompt.clone()).collect();
            let scored = engine
                .prompt_logprobs(prompts, top)
                .await
                .map_err(engine_error)?;
            Some(
                echoes
                    .into_iter()
                    .zip(scored)
                    .map(|(text, lp)| Echo {
                        text,
                        logprobs: Some(lp),
                    })
                    .collect(),
            )
        }
    };
    let prepared = Prepared {
        reqs,
        echo,
        tool: None,
        n,
        stream: r.stream,
        include_usage: r.stream_options.as_ref().is_some_and(|o| o.include_usage),
        continuous_usage: r
            .stream_options
            .as_ref()
            .is_some_and(api::StreamOptions::continuous),
        logprobs: logprobs.is_some(),
        reasoning: None,
    };
    respond(st, engine, prepared, Flavor::Completion).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Completion,
}

fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry =
        |token: &str, lp: f32| json!({"token": token, "logprob": lp, "bytes": token.as_bytes()});
    json!({
        "content": lps.iter().map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = Value::Array(t.top.iter().map(|(tok, lp)| entry(tok, *lp)).collect());
            e
        }).collect::<Vec<_>>()
    })
}

fn completion_logprobs(lps: &[TokenLogprob], text_offset_start: usize) -> Value {
    completion_logprobs_after(None, lps, text_offset_start)
}

/// The legacy `logprobs` object of `lps` from `text_offset_start`, after (`echo`) a prompt's
/// tokens from offset 0: the prompt's first token, with nothing before it, has `null` for
/// its log-probability and alternatives, as in OpenAI's API.
fn completion_logprobs_after(
    prompt: Option<&PromptLogprobs>,
    lps: &[TokenLogprob],
    text_offset_start: usize,
) -> Value {
    let (mut tokens, mut logprobs, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let top_of = |t: &TokenLogprob| -> Value {
        Value::Object(
            t.top
                .iter()
                .map(|(tok, lp)| (tok.clone(), json!(lp)))
                .collect(),
        )
    };
    if let Some(p) = prompt {
        let mut offset = 0;
        offsets.push(offset);
        offset += p.first.len();
        tokens.push(p.first.clone());
        logprobs.push(Value::Null);
        tops.push(Value::Null);
        for t in &p.rest {
            offsets.push(offset);
            offset += t.token.len();
            tokens.push(t.token.clone());
            logprobs.push(json!(t.logprob));
            tops.push(top_of(t));
        }
    }
    let mut offset = text_offset_start;
    for t in lps {
        offsets.push(offset);
        offset += t.token.len();
        tokens.push(t.token.clone());
        logprobs.push(json!(t.logprob));
        tops.push(top_of(t));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn respond(
    st: Arc<AppState>,
    engine: Engine,
    mut p: Prepared,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    let id = st.new_id(if flavor == Flavor::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let (max_tokens, temperature, top_p) = p.reqs.first().map_or((0, 1.0, 1.0), |r| {
        (r.max_tokens, r.sampling.temperature, r.sampling.top_p)
    });
    let gen_span = Generation::start(&GenerationRequest {
        operation: match flavor {
            Flavor::Chat => "chat",
            Flavor::Completion => "text_completion",
        },
        model: &st.model_id,
        response_id: &id,
        max_tokens,
        temperature,
        top_p,
        choices: p.reqs.len() * p.n,
    });
    let prompt_tokens =
        (p.stream && p.continuous_usage).then(|| p.reqs.iter().map(|r| r.prompt.len()).collect());
    // One sequence per choice of every prompt, admitted together or refused together.
    let rxs = (engine.generate_each(std::mem::take(&mut p.reqs), p.n)).map_err(engine_error)?;
    if p.stream {
        Ok(stream_response(st, rxs, p, prompt_tokens, id, flavor, gen_span).into_response())
    } else {
        collect_response(st, rxs, p, id, flavor, gen_span).await
    }
}

/// One choice, generated to its end.
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish_reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect_choice(
    mut rx: mpsc::UnboundedReceiver<GenerateEvent>,
    gen_span: &Generation,
) -> Result<Choice, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        match rx.recv().await {
            Some(GenerateEvent::Delta {
                text: t,
                logprobs: l,
                ..
            }) => {
                gen_span.text();
                text.push_str(&t);
                logprobs.extend(l);
            }
            Some(GenerateEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                return Ok(Choice {
                    text,
                    logprobs,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                });
            }
            Some(GenerateEvent::Failed(e)) => return Err(engine_error(e)),
            None => {
                return Err(ApiError::with_status(
                    500,
                    "server_error",
                    None,
                    "the model thread stopped",
                ));
            }
        }
    }
}

/// The answer of `rxs`, the choices of one prompt after another, `n` per prompt, shaped as
/// `p` says (its requests already sent).
async fn collect_response(
    st: Arc<AppState>,
    rxs: Vec<mpsc::UnboundedReceiver<GenerateEvent>>,
    p: Prepared,
    id: String,
    flavor: Flavor,
    gen_span: Generation,
) -> Result<Response, ApiError> {
    let Prepared {
        n,
        echo,
        tool,
        logprobs: want_logprobs,
        reasoning,
        ..
    } = p;
    let choices: Vec<Choice> =
        futures::future::try_join_all(rxs.into_iter().map(|rx| collect_choice(rx, &gen_span)))
            .await
            .inspect_err(|e| gen_span.failed(&e.message))?;
    // Each prompt is counted once, as OpenAI does; the completions of every choice.
    let prompt_tokens: usize = choices
        .iter()
        .step_by(n.max(1))
        .map(|c| c.prompt_tokens)
        .sum();
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    gen_span.finished(
        prompt_tokens,
        completion_tokens,
        choices.iter().map(|c| c.finish_reason.as_str()).collect(),
    );
    let body_of = |(i, c): (usize, &Choice)| match flavor {
        Flavor::Chat => {
            // The thoughts apart; the calls, if any, read from the content after them.
            let (thoughts, content) = match reasoning {
                Some(parser) => {
                    let parts = parser.split(&c.text, true);
                    (parts.reasoning, parts.content)
                }
                None => (None, Some(Cow::Borrowed(c.text.as_str()))),
            };
            let content = content.as_deref();
            let (mut message, called) = match (&tool, content) {
                (Some(tool), Some(content)) => tool.message(&st, content),
                _ => (json!({"role": "assistant", "content": content}), false),
            };
            if let Some(thoughts) = thoughts {
                // After thoughts, no content is `null`, as vLLM's.
                if message["content"] == "" {
                    message["content"] = Value::Null;
                }
                message[REASONING] = json!(thoughts);
                message[REASONING_CONTENT] = json!(thoughts);
            }
            let finish = match called {
                true => ToolOut::finish(c.finish_reason),
                false => c.finish_reason.as_str(),
            };
            json!({
                "index": i,
                "message": message,
                "logprobs": if want_logprobs { chat_logprobs(&c.logprobs) } else { Value::Null },
                "finish_reason": finish,
            })
        }
        Flavor::Completion => {
            let echo = echo.as_ref().map(|e| &e[i / n.max(1)]);
            let before = echo.map_or("", |e| e.text.as_str());
            json!({
                "index": i,
                "text": format!("{before}{}", c.text),
                "logprobs": if want_logprobs {
                    completion_logprobs_after(echo.and_then(|e| e.logprobs.as_ref()), &c.logprobs, before.len())
                } else { Value::Null },
                "finish_reason": c.finish_reason.as_str(),
            })
        }
    };
    let object = match flavor {
        Flavor::Chat => "chat.completion",
        Flavor::Completion => "text_completion",
    };
    let body = json!({
        "id": id, "object": object, "created": now_secs(), "model": st.model_id,
        "choices": choices.iter().enumerate().map(body_of).collect::<Vec<_>>(),
        "usage": usage(prompt_tokens, completion_tokens),
    });
    Ok(axum::Json(body).into_response())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct StreamState {
    /// Every choice's events, tagged with its index, as they come.
    events: futures::stream::SelectAll<
        futures::stream::BoxStream<'static, (usize, Option<GenerateEvent>)>,
    >,
    st: Arc<AppState>,
    id: String,
    flavor: Flavor,
    include_usage: bool,
    want_logprobs: bool,
    /// Choices per prompt.
    per_prompt: usize,
    /// Completions' `echo` per prompt, sent first for each of its choices.
    echo: Option<Vec<Echo>>,
    /// Chat: a forced tool call, and per choice where its streaming is.
    tool: Option<ToolOut>,
    calls: Vec<CallStream>,
    /// Chat with a reasoning parser: per choice, its split, and log-probabilities whose
    /// text is held back.
    reasoning: Option<Vec<(Stream, Vec<TokenLogprob>)>>,
    sent_roles: bool,
    /// Per choice: bytes of text sent (completions' logprob offsets).
    text_offset: Vec<usize>,
    /// Per choice: why it ended, once it has; and how many have not.
    finished: Vec<Option<FinishReason>>,
    left: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// `continuous_usage_stats`: each prompt's tokens, and each choice's tokens so far.
    continuous: Option<(Vec<usize>, Vec<usize>)>,
    done: bool,
    /// The generation's trace span, which (holding its request's) ends with the stream.
    gen_span: Generation,
}

/// One choice's tool call as it streams: its id, whether the chunk naming the tool is sent,
/// and (a chosen tool, known only at the end; the calls of an answer read for them) the text
/// and the log-probabilities not yet sent, and how much of the text is sent as content.
#[derive(Default)]
struct CallStream {
    id: String,
    named: bool,
    text: String,
    logprobs: Vec<TokenLogprob>,
    sent: usize,
}

impl StreamState {
    /// A chat chunk of choice `index` with `delta` as given.
    fn delta_chunk(
        &self,
        index: usize,
        delta: Value,
        lps: &[TokenLogprob],
        finish: Option<&str>,
    ) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": now_secs(), "model": self.st.model_id,
            "choices": [{
                "index": index, "delta": delta,
                "logprobs": if self.want_logprobs && !lps.is_empty() { chat_logprobs(lps) } else { Value::Null },
                "finish_reason": finish,
            }],
        })
    }

    /// The chunks of a forced tool call for choice `i`'s new `text` (`done`: and its end).
    /// A named tool's arguments stream as they come, after a first chunk with the call's id
    /// and name (as OpenAI's); a chosen tool's call is sent whole at the end, once its name
    /// is known.
    fn tool_chunks(
        &mut self,
        i: usize,
        text: &str,
        lps: &[TokenLogprob],
        done: Option<FinishReason>,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let tool = self.tool.clone().expect("a tool call");
        match &tool {
            ToolOut::Named(name) => {
                if !self.calls[i].named || !text.is_empty() || !lps.is_empty() {
                    let function = match self.calls[i].named {
                        true => json!({"arguments": text}),
                        false => json!({"name": name, "arguments": text}),
                    };
                    let mut call = json!({"index": 0, "function": function});
                    if !self.calls[i].named {
                        call["id"] = json!(self.calls[i].id);
                        call["type"] = json!("function");
                        self.calls[i].named = true;
                    }
                    out.push(self.delta_chunk(i, json!({"tool_calls": [call]}), lps, None));
                }
                if let Some(reason) = done {
                    out.push(self.delta_chunk(i, json!({}), &[], Some(ToolOut::finish(reason))));
                }
            }
            ToolOut::Chosen => {
                self.calls[i].text.push_str(text);
                self.calls[i].logprobs.extend_from_slice(lps);
                if let Some(reason) = done {
                    let c = &self.calls[i];
                    let (delta, finish) = match tool.call(&c.id, &c.text) {
                        Some(mut call) => {
                            call["index"] = json!(0);
                            (json!({"tool_calls": [call]}), ToolOut::finish(reason))
                        }
                        None => (json!({"content": c.text}), reason.as_str()),
                    };
                    out.push(self.delta_chunk(i, delta, &c.logprobs, None));
                    out.push(self.delta_chunk(i, json!({}), &[], Some(finish)));
                }
            }
            ToolOut::Parsed(parser, shape) => {
                let c = &mut self.calls[i];
                c.text.push_str(text);
                c.logprobs.extend_from_slice(lps);
                // Content streams as it comes, but for what may be a call, which waits for
                // the end, where the calls are read: the content is then what came before
                // them, or (no whole call) the whole text.
                let parsed = done.and_then(|_| parser.parse(&c.text, shape));
                let upto = match (done, &parsed) {
                    (Some(_), None) => c.text.len(),
                    _ => parser.content_so_far(&c.text),
                }
                .max(c.sent);
                // At the end of a text answer, log-probabilities of tokens without text
                // (the end-of-text token's) go with an empty piece, as without tools.
                let last_lps = done.is_some() && parsed.is_none() && !c.logprobs.is_empty();
                if upto > c.sent || last_lps {
                    let piece = c.text[c.sent..upto].to_owned();
                    let lps = std::mem::take(&mut c.logprobs);
                    c.sent = upto;
                    out.push(self.delta_chunk(i, json!({"content": piece}), &lps, None));
                }
                if let Some(reason) = done {
                    let finish = match parsed {
                        Some(answer) => {
                            let calls: Vec<Value> = (answer.calls.iter().enumerate())
                                .map(|(k, call)| {
                                    let mut v = call_entry(
                                        &self.st.new_id("call"),
                                        &call.name,
                                        &call.arguments,
                                    );
                                    v["index"] = json!(k);
                                    v
                                })
                                .collect();
                            let lps = std::mem::take(&mut self.calls[i].logprobs);
                            out.push(self.delta_chunk(i, json!({"tool_calls": calls}), &lps, None));
                            ToolOut::finish(reason)
                        }
                        None => reason.as_str(),
                    };
                    out.push(self.delta_chunk(i, json!({}), &[], Some(finish)));
                }
            }
        }
        out
    }

    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        lps: &[TokenLogprob],
        finish: Option<FinishReason>,
        role: bool,
    ) -> Value {
        let finish = finish.map(|f| f.as_str());
        match self.flavor {
            Flavor::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                self.delta_chunk(index, Value::Object(delta), lps, finish)
            }
            Flavor::Completion => json!({
                "id": self.id, "object": "text_completion", "created": now_secs(), "model": self.st.model_id,
                "choices": [{
                    "index": index, "text": text.unwrap_or(""),
                    "logprobs": if self.want_logprobs && !lps.is_empty() { completion_logprobs(lps, self.text_offset[index]) } else { Value::Null },
                    "finish_reason": finish,
                }],
            }),
        }
    }

    /// The chunks of choice `i`'s next `text` with a reasoning parser (`done`: and its
    /// end): `reasoning_content` and/or `content`, as the split releases them (none while
    /// all of it is held back, its log-probabilities then waiting for the text). With tools,
    /// what follows the thoughts goes to [`Self::tool_chunks`].
    fn reasoning_chunks(
        &mut self,
        i: usize,
        text: &str,
        lps: Vec<TokenLogprob>,
        done: Option<FinishReason>,
    ) -> Vec<Value> {
        let tool = self.tool.is_some();
        let (thought, answer, closed, mut lps) = {
            let (split, held) = &mut self.reasoning.as_mut().expect("a reasoning parser")[i];
            let (thought, answer) = split.push(text, done.is_some());
            held.extend(lps);
            let closed = split.closed();
            let release =
                !thought.is_empty() || !answer.is_empty() || done.is_some() || (tool && closed);
            let lps = match release {
                true => std::mem::take(held),
                false => Vec::new(),
            };
            (thought, answer, closed, lps)
        };
        let mut out = Vec::new();
        if tool && closed {
            if !thought.is_empty() {
                let lps = std::mem::take(&mut lps);
                let delta = json!({REASONING: thought, REASONING_CONTENT: thought});
                out.push(self.delta_chunk(i, delta, &lps, None));
            }
            out.extend(self.tool_chunks(i, &answer, &lps, done));
            return out;
        }
        let mut delta = serde_json::Map::new();
        if !thought.is_empty() {
            delta.insert(REASONING.into(), json!(thought));
            delta.insert(REASONING_CONTENT.into(), json!(thought));
        }
        if !answer.is_empty() {
            delta.insert("content".into(), json!(answer));
        }
        if !delta.is_empty() || !lps.is_empty() {
            out.push(self.delta_chunk(i, Value::Object(delta), &lps, None));
        }
        if let Some(reason) = done {
            out.push(self.chunk(i, None, &[], Some(reason), false));
        }
        out
    }

    fn usage_chunk(&self) -> Value {
        let object = if self.flavor == Flavor::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": now_secs(), "model": self.st.model_id,
               "choices": [], "usage": usage(self.prompt_tokens, self.completion_tokens)})
    }
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl StreamState {
    /// A choice's chunk as an event, with the usage of its choice so far where
    /// `continuous_usage_stats` asks (vLLM's: the prompt's tokens and the choice's).
    fn event(&self, mut chunk: Value) -> Event {
        if let Some((prompts, sofar)) = &self.continuous
            && let Some(i) = chunk["choices"][0]["index"].as_u64()
        {
            let i = i as usize;
            chunk["usage"] = usage(prompts[i / self.per_prompt], sofar[i]);
        }
        data(&chunk)
    }
}

/// The SSE answer: each choice's chunks as its tokens come (tagged with its `index`), then,
/// when every choice is done, the usage chunk if asked and `[DONE]`.
fn stream_response(
    st: Arc<AppState>,
    rxs: Vec<mpsc::UnboundedReceiver<GenerateEvent>>,
    p: Prepared,
    prompt_tokens: Option<Vec<usize>>,
    id: String,
    flavor: Flavor,
    gen_span: Generation,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let Prepared {
        n: per_prompt,
        echo,
        tool,
        include_usage,
        logprobs: want_logprobs,
        reasoning,
        ..
    } = p;
    let n = rxs.len();
    // A choice's stream ends with `None` once its channel closes, so that a model thread
    // that stops mid-answer is reported rather than waited on.
    let events = futures::stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        futures::stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(ev) => Some(((i, Some(ev)), Some(rx))),
                None => Some(((i, None), None)),
            }
        })
        .boxed()
    }));
    let calls = (0..n)
        .map(|_| CallStream {
            id: st.new_id("call"),
            ..Default::default()
        })
        .collect();
    let state = StreamState {
        events,
        st,
        id,
        flavor,
        include_usage,
        want_logprobs,
        per_prompt: per_prompt.max(1),
        echo,
        calls,
        tool,
        reasoning: reasoning.map(|p| (0..n).map(|_| (Stream::new(p), Vec::new())).collect()),
        sent_roles: false,
        text_offset: vec![0; n],
        finished: vec![None; n],
        left: n,
        prompt_tokens: 0,
        completion_tokens: 0,
        continuous: prompt_tokens.map(|p| (p, vec![0; n])),
        done: false,
        gen_span,
    };
    // Dropping this stream (the client left) drops the receivers, which the model thread
    // notices at its next step and abandons the sequences.
    let events = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut out = Vec::new();
        if s.flavor == Flavor::Chat && !s.sent_roles {
            s.sent_roles = true;
            for i in 0..s.text_offset.len() {
                out.push(s.event(s.chunk(i, Some(""), &[], None, true)));
            }
        }
        if let Some(echo) = s.echo.take() {
            // Each choice starts with its prompt (and the prompt's log-probabilities).
            for i in 0..s.text_offset.len() {
                let e = &echo[i / s.per_prompt];
                let mut chunk = s.chunk(i, Some(&e.text), &[], None, false);
                if s.want_logprobs {
                    chunk["choices"][0]["logprobs"] =
                        completion_logprobs_after(e.logprobs.as_ref(), &[], e.text.len());
                }
                out.push(s.event(chunk));
                s.text_offset[i] = e.text.len();
            }
        }
        let Some((i, event)) = s.events.next().await else {
            // Every choice ended without finishing: cannot happen (each ends with `None`
            // at the latest, which is answered below), but never hang on it.
            s.done = true;
            return Some((futures::stream::iter(out.into_iter().map(Ok)), s));
        };
        if let Some(GenerateEvent::Delta { .. }) = &event {
            s.gen_span.text();
        }
        // The choice's tokens so far, for `continuous_usage_stats`.
        if let (
            Some(
                GenerateEvent::Delta {
                    completion_tokens, ..
                }
                | GenerateEvent::Done {
                    completion_tokens, ..
                },
            ),
            Some((_, sofar)),
        ) = (&event, &mut s.continuous)
        {
            sofar[i] = *completion_tokens;
        }
        match event {
            Some(GenerateEvent::Delta { text, logprobs, .. }) if s.reasoning.is_some() => {
                for c in s.reasoning_chunks(i, &text, logprobs, None) {
                    out.push(s.event(c));
                }
            }
            Some(GenerateEvent::Delta { text, logprobs, .. }) if s.tool.is_some() => {
                for c in s.tool_chunks(i, &text, &logprobs, None) {
                    out.push(s.event(c));
                }
            }
            Some(GenerateEvent::Delta { text, logprobs, .. }) => {
                out.push(s.event(s.chunk(i, Some(&text), &logprobs, None, false)));
                s.text_offset[i] += text.len();
            }
            Some(GenerateEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                if s.reasoning.is_some() {
                    for c in s.reasoning_chunks(i, "", Vec::new(), Some(finish_reason)) {
                        out.push(s.event(c));
                    }
                } else if s.tool.is_some() {
                    for c in s.tool_chunks(i, "", &[], Some(finish_reason)) {
                        out.push(s.event(c));
                    }
                } else {
                    let last = match s.flavor {
                        Flavor::Chat => s.chunk(i, None, &[], Some(finish_reason), false),
                        Flavor::Completion => s.chunk(i, Some(""), &[], Some(finish_reason), false),
                    };
                    out.push(s.event(last));
                }
                // Each prompt once: with its first choice.
                if i % s.per_prompt == 0 {
                    s.prompt_tokens += prompt_tokens;
                }
                s.completion_tokens += completion_tokens;
                s.finished[i] = Some(finish_reason);
                s.left -= 1;
                if s.left == 0 {
                    s.gen_span.finished(
                        s.prompt_tokens,
                        s.completion_tokens,
                        s.finished
                            .iter()
                            .flatten()
                            .map(FinishReason::as_str)
                            .collect(),
                    );
                    if s.include_usage {
                        out.push(data(&s.usage_chunk()));
                    }
                    out.push(Event::default().data("[DONE]"));
                    s.done = true;
                }
            }
            // After `Done` a choice's channel closes: nothing more to say for it.
            None if s.finished[i].is_some() => {}
            Some(GenerateEvent::Failed(e)) => {
                let e = engine_error(e);
                s.gen_span.failed(&e.message);
                out.push(data(&e.body()));
                out.push(Event::default().data("[DONE]"));
                s.done = true;
            }
            None => {
                let e =
                    ApiError::with_status(500, "server_error", None, "the model thread stopped");
                s.gen_span.failed(&e.message);
                out.push(data(&e.body()));
                s.done = true;
            }
        }
        Some((futures::stream::iter(out.into_iter().map(Ok)), s))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn embeddings(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::EmbeddingRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
                Some("encoding_format"),
            ));
        }
    };
    let frontend = engine.frontend();
    if frontend.task != Task::Embedding {
        return Err(ApiError::invalid(
            format!("the model {:?} does not serve embeddings", st.model_id),
            Some("model"),
        ));
    }
    if let Some(d) = r.dimensions
        && d as usize != frontend.embedding_dim
    {
        return Err(ApiError::invalid(
            format!(
                "this model's embeddings have {} dimensions and cannot be shortened to {d}",
                frontend.embedding_dim
            ),
            Some("dimensions"),
        ));
    }
    let max = frontend.context_length;
    let encode = |s: &str| -> Result<Vec<u32>, ApiError> {
        if s.is_empty() {
            return Err(ApiError::invalid(
                "input must not contain empty strings",
                Some("input"),
            ));
        }
        frontend.tokenizer.encode(s, true).map_err(|e| {
            ApiError::invalid(format!("cannot tokenise the input: {e}"), Some("input"))
        })
    };
    let inputs: Vec<Vec<u32>> = match &r.input {
        api::EmbeddingInput::One(s) => vec![encode(s)?],
        api::EmbeddingInput::Many(v) => v.iter().map(|s| encode(s)).collect::<Result<_, _>>()?,
        api::EmbeddingInput::Tokens(t) => vec![t.clone()],
        api::EmbeddingInput::ManyTokens(v) => v.clone(),
    };
    if inputs.is_empty() || inputs.len() > st.config.max_embedding_inputs {
        return Err(ApiError::invalid(
            format!(
                "input must hold between 1 and {} items, got {}",
                st.config.max_embedding_inputs,
                inputs.len()
            ),
            Some("input"),
        ));
    }
    let vocab = frontend.vocab_limit;
    for t in &inputs {
        if t.is_empty() {
            return Err(ApiError::invalid(
                "input must not contain empty token lists",
                Some("input"),
            ));
        }
        if t.len() > max {
            return Err(ApiError::invalid(
                format!(
                    "an input is {} tokens; this model takes at most {max}",
                    t.len()
                ),
                Some("input"),
            ));
        }
        if t.iter().any(|&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                "input holds a token id outside the vocabulary",
                Some("input"),
            ));
        }
    }
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let span = telemetry::embeddings_span(
        &st.model_id,
        prompt_tokens,
        base64,
        engine.frontend().embedding_dim,
    );
    let vectors = engine
        .embed(inputs)
        .instrument(span.clone())
        .await
        .map_err(engine_error)
        .inspect_err(|e| telemetry::failed(&span, &e.message))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": st.model_id,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}

/// POST /v1/responses: OpenAI's Responses API, run as the chat request it asks for
/// ([`crate::responses`]); a chat error's field is named as the Responses API names it.
/// Streamed, the chat chunks become the Responses API's typed events as they come; the client
/// leaving drops the chat stream, and with it the generation.
///
/// With `--responses-store`, `previous_response_id` continues a kept response, and the answer
/// is kept (unless `store: false`) once it is over, `completed` or `incomplete` (cut at
/// `max_output_tokens`, as OpenAI keeps it too): at once, or at its last event; a failed
/// request, or a stream whose client left, is not.
async fn responses(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let mut req: Value = api::parse_body(&body)?;
    let previous = match req.get("previous_response_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(_) if !st.responses.enabled() => {
            return Err(ApiError::invalid(
                "previous_response_id: responses are not stored by this server (start it with \
                 --responses-store N to keep the last N)",
                Some("previous_response_id"),
            ));
        }
        Some(Value::String(prev)) => match st.responses.get(prev) {
            Some(kept) => kept.messages,
            None => {
                return Err(ApiError {
                    status: 400,
                    kind: "invalid_request_error",
                    param: Some("previous_response_id"),
                    code: Some("previous_response_not_found"),
                    message: format!("Previous response with id '{prev}' not found."),
                });
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "previous_response_id must be a string",
                Some("previous_response_id"),
            ));
        }
    };
    // In a conversation: its items come first, and the input and output are added to it.
    let in_conversation = match req.get("conversation") {
        None | Some(Value::Null) => None,
        Some(c) => {
            let param = Some("conversation");
            if req
                .get("previous_response_id")
                .is_some_and(|p| !p.is_null())
            {
                return Err(ApiError::invalid(
                    "conversation and previous_response_id cannot be used together",
                    param,
                ));
            }
            let Some(id) = c.as_str().or_else(|| c["id"].as_str()).map(str::to_owned) else {
                return Err(ApiError::invalid(
                    "conversation must be an id or {\"id\": …}",
                    param,
                ));
            };
            let input = crate::conversations::input_items(&req["input"]);
            let added = crate::conversations::stored_items(&input, "input", |p| {
                format!("{p}_{}", st.unique())
            })?;
            let before = (st.conversations)
                .with(&id, |c| c.items.clone())
                .map_err(|mut e| {
                    e.param = param;
                    e
                })?;
            req["conversation"] = json!({"id": id});
            Some((id, before, added))
        }
    };
    let previous = match &in_conversation {
        Some((_, before, _)) => crate::responses::chat_messages(before)?,
        None => previous,
    };
    let (chat, conversation) = crate::responses::to_chat_after(&req, previous)?;
    let store = st.responses.enabled() && crate::responses::wants_store(&req);
    // What the response objects echo.
    req["store"] = Value::Bool(store);
    let keep = move |st: &AppState, response: &Value| {
        let over = matches!(
            response["status"].as_str(),
            Some("completed" | "incomplete")
        );
        if let (true, Some((id, _, added))) = (over, &in_conversation) {
            let output = response["output"].as_array().into_iter().flatten().cloned();
            // Forgotten meanwhile: the answer has nowhere to go, and is still given.
            let _ = st.conversations.with(id, |c| {
                c.items.extend(added.iter().cloned().chain(output));
            });
        }
        if !store
            || !matches!(
                response["status"].as_str(),
                Some("completed" | "incomplete")
            )
        {
            return;
        }
        let (Some(id), Ok(messages)) = (
            response["id"].as_str(),
            crate::responses::conversation_after(conversation.clone(), response),
        ) else {
            return;
        };
        let response = response.clone();
        st.responses.put(
            id.to_owned(),
            crate::responses::Stored { messages, response },
        );
    };
    let stream = chat["stream"] == Value::Bool(true);
    let answer = chat_completions(State(st.clone()), Ok(Bytes::from(chat.to_string())))
        .await
        .map_err(|mut e| {
            e.param = e.param.map(crate::responses::param);
            e
        })?;
    let id = st.unique();
    let body = answer.into_body();
    if !stream {
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|e| ApiError::with_status(500, "server_error", None, e.to_string()))?;
        let chat: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::with_status(500, "server_error", None, e.to_string()))?;
        let response = crate::responses::from_chat(&chat, &req, &id);
        keep(&st, &response);
        return Ok(axum::Json(response).into_response());
    }
    let events = crate::responses::Events::new(req, &id, now_secs());
    let state = (body.into_data_stream(), String::new(), events, false);
    let events = futures::stream::unfold(
        state,
        |(mut body, mut buf, mut events, started)| async move {
            if !started {
                let out = events.start();
                return Some((out, (body, buf, events, true)));
            }
            let bytes = body.next().await?.ok()?;
            buf.push_str(&String::from_utf8_lossy(&bytes));
            let mut out = Vec::new();
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                for payload in frame.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    if let Ok(chunk) = serde_json::from_str::<Value>(payload) {
                        out.extend(events.chunk(&chunk));
                    }
                }
            }
            Some((out, (body, buf, events, true)))
        },
    )
    .flat_map(move |out| {
        for e in &out {
            if matches!(
                e["type"].as_str(),
                Some("response.completed" | "response.incomplete")
            ) {
                keep(&st, &e["response"]);
            }
        }
        futures::stream::iter(out.into_iter().map(|e| {
            let kind = e["type"].as_str().unwrap_or("message").to_owned();
            Ok::<_, Infallible>(Event::default().event(kind).data(e.to_string()))
        }))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `POST /v1/conversations`: a new conversation, with `items` (up to 20) and `metadata`
/// ([`crate::conversations`]).
async fn create_conversation(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = api::parse_body(&body_bytes(body)?)?;
    let metadata = crate::conversations::metadata(&req)?;
    let items = match req.get("items") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            crate::conversations::stored_items(items, "items", |p| format!("{p}_{}", st.unique()))?
        }
        Some(_) => return Err(ApiError::invalid("items must be a list", Some("items"))),
    };
    let id = format!("conv_{}", st.unique());
    let c = crate::conversations::Conversation {
        created_at: now_secs(),
        metadata,
        items,
    };
    let object = crate::conversations::object(&id, &c);
    st.conversations.create(id, c)?;
    Ok(axum::Json(object))
}

/// `GET /v1/conversations/{id}`.
async fn retrieve_conversation(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let object = st
        .conversations
        .with(&id, |c| crate::conversations::object(&id, c))?;
    Ok(axum::Json(object))
}

/// `POST /v1/conversations/{id}`: replaces its `metadata`.
async fn update_conversation(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = api::parse_body(&body_bytes(body)?)?;
    if req.get("metadata").is_none() {
        return Err(ApiError::invalid("metadata is required", Some("metadata")));
    }
    let metadata = crate::conversations::metadata(&req)?;
    let object = st.conversations.with(&id, |c| {
        c.metadata = metadata;
        crate::conversations::object(&id, c)
    })?;
    Ok(axum::Json(object))
}

/// `DELETE /v1/conversations/{id}`: forgets it and its items.
async fn delete_conversation(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    st.conversations.delete(&id)?;
    Ok(axum::Json(
        json!({"id": id, "object": "conversation.deleted", "deleted": true}),
    ))
}

/// `GET /v1/conversations/{id}/items`: a page of its items (`limit`, `order`, `after`).
async fn list_items(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    let page = st
        .conversations
        .with(&id, |c| crate::conversations::list(&c.items, &query))??;
    Ok(axum::Json(page))
}

/// `POST /v1/conversations/{id}/items`: adds `items` (up to 20) at its end; the list added.
async fn add_items(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = api::parse_body(&body_bytes(body)?)?;
    let Some(items) = req.get("items").and_then(Value::as_array) else {
        return Err(ApiError::invalid("items must be a list", Some("items")));
    };
    let items =
        crate::conversations::stored_items(items, "items", |p| format!("{p}_{}", st.unique()))?;
    st.conversations
        .with(&id, |c| c.items.extend(items.iter().cloned()))?;
    Ok(axum::Json(json!({
        "object": "list",
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": false,
        "data": items,
    })))
}

/// `GET /v1/conversations/{id}/items/{item}`.
async fn retrieve_item(
    State(st): State<Arc<AppState>>,
    axum::extract::Path((id, item)): axum::extract::Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let found = st.conversations.with(&id, |c| {
        c.items.iter().find(|i| i["id"] == item.as_str()).cloned()
    })?;
    found
        .map(axum::Json)
        .ok_or_else(|| crate::conversations::not_found("Item", &item))
}

/// `DELETE /v1/conversations/{id}/items/{item}`: the conversation, without the item.
async fn delete_item(
    State(st): State<Arc<AppState>>,
    axum::extract::Path((id, item)): axum::extract::Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let object = st.conversations.with(&id, |c| {
        let before = c.items.len();
        c.items.retain(|i| i["id"] != item.as_str());
        (c.items.len() < before).then(|| crate::conversations::object(&id, c))
    })?;
    object
        .map(axum::Json)
        .ok_or_else(|| crate::conversations::not_found("Item", &item))
}

/// `GET /v1/responses/{id}`: a kept response (`--responses-store`), as it was answered.
async fn retrieve_response(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    st.responses
        .get(&id)
        .map(|kept| axum::Json(kept.response))
        .ok_or_else(|| response_not_found(&id))
}

/// `DELETE /v1/responses/{id}`: forgets a kept response.
async fn delete_response(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    if !st.responses.delete(&id) {
        return Err(response_not_found(&id));
    }
    Ok(axum::Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

fn response_not_found(id: &str) -> ApiError {
    ApiError {
        status: 404,
        kind: "invalid_request_error",
        param: None,
        code: None,
        message: format!("Response with id '{id}' not found."),
    }
}

/// The scores of (first, second) text pairs, as vLLM's score and rerank APIs give them: a
/// cross-encoder (a classifier with one label, as sentence-transformers' `CrossEncoder` models
/// and BGE rerankers are) reads each pair as one input through the tokenizer's pair template,
/// the longer text cut first where the pair passes the model's length, and scores it with the
/// sigmoid of its logit (sentence-transformers' and vLLM's default); an embedding model embeds
/// each distinct text once and scores a pair with the cosine of its two embeddings. Returns the
/// scores and the tokens read. An empty text is refused naming `param`.
async fn pair_scores<'p>(
    st: &AppState,
    engine: &Engine,
    pairs: &[(&'p str, &'p str)],
    param: &'static str,
) -> Result<(Vec<f32>, usize), ApiError> {
    let frontend = engine.frontend();
    if pairs.len() > st.config.max_embedding_inputs {
        return Err(ApiError::invalid(
            format!(
                "at most {} pairs are scored at once, got {}",
                st.config.max_embedding_inputs,
                pairs.len()
            ),
            Some(param),
        ));
    }
    if pairs.iter().any(|(a, b)| a.is_empty() || b.is_empty()) {
        return Err(ApiError::invalid("texts must not be empty", Some(param)));
    }
    let cannot =
        |e: crate::Error| ApiError::invalid(format!("cannot tokenise the texts: {e}"), Some(param));
    match frontend.task {
        Task::Classification if frontend.labels.len() == 1 => {
            let mut inputs = Vec::with_capacity(pairs.len());
            let mut second = Vec::with_capacity(pairs.len());
            for (a, b) in pairs {
                let (ids, at) = frontend.tokenizer.encode_pair(a, b).map_err(cannot)?;
                inputs.push(ids);
                second.push(at);
            }
            let tokens = inputs.iter().map(Vec::len).sum();
            let logits = engine
                .classify_pairs(inputs, second)
                .await
                .map_err(engine_error)?;
            let scores = logits.iter().map(|row| 1.0 / (1.0 + (-row[0]).exp()));
            Ok((scores.collect(), tokens))
        }
        Task::Embedding => {
            // Each distinct text once, by its first place (a rerank's query is every pair's).
            let mut texts: Vec<&'p str> = Vec::new();
            let mut seen: std::collections::HashMap<&'p str, usize> = Default::default();
            let mut at = |t: &'p str| {
                *seen.entry(t).or_insert_with(|| {
                    texts.push(t);
                    texts.len() - 1
                })
            };
            let which: Vec<(usize, usize)> = pairs.iter().map(|(a, b)| (at(a), at(b))).collect();
            let inputs = (texts.iter())
                .map(|t| frontend.tokenizer.encode(t, true).map_err(cannot))
                .collect::<Result<Vec<_>, _>>()?;
            let tokens = inputs.iter().map(Vec::len).sum();
            let vectors = engine.embed(inputs).await.map_err(engine_error)?;
            let scores = which
                .iter()
                .map(|&(a, b)| crate::model::cosine(&vectors[a], &vectors[b]));
            Ok((scores.collect(), tokens))
        }
        _ => Err(ApiError::invalid(
            format!(
                "the model {:?} scores no text pairs: that takes a cross-encoder (a classifier \
                 with one label) or an embedding model",
                st.model_id
            ),
            Some("model"),
        )),
    }
}

/// POST /v1/rerank (and /rerank, vLLM's alias): `{"model", "query", "documents": [text |
/// {"text"}], "top_n"?, "return_documents"?}` → `{"id", "model", "results": [{"index",
/// "relevance_score", "document": {"text"}}], "usage": {"total_tokens"}}`, best first, as
/// Jina's and Cohere's APIs and vLLM's; scored by [`pair_scores`].
async fn rerank(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::RerankRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    if r.query.is_empty() {
        return Err(ApiError::invalid("query must not be empty", Some("query")));
    }
    if r.documents.is_empty() {
        return Err(ApiError::invalid(
            "documents must hold at least one text",
            Some("documents"),
        ));
    }
    let pairs: Vec<(&str, &str)> = (r.documents.iter())
        .map(|d| (r.query.as_str(), d.text()))
        .collect();
    let (scores, tokens) = pair_scores(&st, &engine, &pairs, "documents").await?;
    let with_text = r.return_documents.unwrap_or(true);
    let results: Vec<Value> = api::rerank_order(&scores, r.top_n)?
        .into_iter()
        .map(|i| {
            let mut v = json!({"index": i, "relevance_score": scores[i]});
            if with_text {
                v["document"] = json!({"text": r.documents[i].text()});
            }
            v
        })
        .collect();
    Ok(axum::Json(json!({
        "id": st.new_id("rerank"),
        "model": st.model_id,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// POST /v1/score (and /score), vLLM's: `{"model", "text_1": text | [texts], "text_2": text |
/// [texts]}` → `{"id", "object": "list", "model", "data": [{"index", "object": "score",
/// "score"}], "usage"}`, one score per pair ([`api::score_pairs`], [`pair_scores`]).
async fn score(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::ScoreRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    let pairs = api::score_pairs(&r.text_1, &r.text_2)?;
    let (scores, tokens) = pair_scores(&st, &engine, &pairs, "text_2").await?;
    let data: Vec<Value> = (scores.iter().enumerate())
        .map(|(i, s)| json!({"index": i, "object": "score", "score": s}))
        .collect();
    Ok(axum::Json(json!({
        "id": st.new_id("score"),
        "object": "list",
        "created": now_secs(),
        "model": st.model_id,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// POST /v1/classify: `{"model", "input": "text" | ["t1", ...], "top_k"?}` →
/// `{"object": "list", "model", "data": [{"object": "classification", "index", "labels":
/// [{"index", "label", "score", "logit"}, ...]}], "usage"}`. Labels are best first; `score` is
/// the softmax over labels (a sigmoid per label for one-label and multi-label heads, as
/// transformers' pipeline does). All inputs run as right-padded batches of at most
/// `--max-batch-size`; each is truncated to the model's maximum input length.
async fn classify(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    let r: api::ClassifyRequest = api::parse_body(&body)?;
    st.check_model(&r.model)?;
    let frontend = engine.frontend();
    if frontend.task != Task::Classification {
        return Err(ApiError::invalid(
            format!("the model {:?} does not serve classification", st.model_id),
            Some("model"),
        ));
    }
    let top_k = api::classify_top_k(r.top_k, frontend.labels.len())?;
    let texts: Vec<&str> = match &r.input {
        api::ClassifyInput::One(s) => vec![s.as_str()],
        api::ClassifyInput::Many(v) => v.iter().map(String::as_str).collect(),
    };
    if texts.is_empty() || texts.len() > st.config.max_embedding_inputs {
        return Err(ApiError::invalid(
            format!(
                "input must hold between 1 and {} items, got {}",
                st.config.max_embedding_inputs,
                texts.len()
            ),
            Some("input"),
        ));
    }
    let inputs = texts
        .iter()
        .map(|s| {
            if s.is_empty() {
                return Err(ApiError::invalid(
                    "input must not contain empty strings",
                    Some("input"),
                ));
            }
            frontend.tokenizer.encode(s, true).map_err(|e| {
                ApiError::invalid(format!("cannot tokenise the input: {e}"), Some("input"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let logits = engine.classify(inputs).await.map_err(engine_error)?;
    let data: Vec<Value> = logits
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let labels: Vec<Value> = crate::model::rank_labels(
                &frontend.labels,
                frontend.scoring,
                row,
                Some(top_k),
            )
            .into_iter()
            .map(
                |l| json!({"index": l.index, "label": l.label, "score": l.score, "logit": l.logit}),
            )
            .collect();
            json!({"object": "classification", "index": i, "labels": labels})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "model": st.model_id,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}
