//! The runtime's Prometheus metrics (names from DESIGN.md), in one `prometheus-client` registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of `kandle_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

/// Label of per-endpoint histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

/// Every metric the runtime exports. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<EndpointLabel, Histogram>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub generated_tokens: Counter,
    pub prompt_tokens: Counter,
    /// Prompt tokens not computed again: continued from the prefix cache, or copied from a
    /// sequence that computed the same prompt in the same step (the choices of one request).
    pub prompt_tokens_cached: Counter,
    /// Positions of keys and values the prefix cache holds, as its budget counts them.
    pub prefix_cache_positions: Gauge,
    /// Tokens each step of the model computed: decode steps and prompt parts together.
    pub step_tokens: Histogram,
    pub queue_depth: Gauge,
    pub inflight: Gauge,
    pub batch_size: Gauge,
    /// Positions of keys and values the running batch may reach: each sequence's prompt plus
    /// its `max_tokens`, what the batch token budget bounds.
    pub batch_tokens: Gauge,
    /// The batch token budget (`--max-batch-tokens` or its default); 0: none.
    pub batch_tokens_limit: Gauge,
    pub model_load_seconds: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            inter_token_latency: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            generated_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            prompt_tokens_cached: Counter::default(),
            prefix_cache_positions: Gauge::default(),
            step_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            queue_depth: Gauge::default(),
            inflight: Gauge::default(),
            batch_size: Gauge::default(),
            batch_tokens: Gauge::default(),
            batch_tokens_limit: Gauge::default(),
            model_load_seconds: Gauge::default(),
        };
        // Counters get their `_total` suffix from prometheus-client.
        registry.register(
            "kandle_requests",
            "HTTP requests by endpoint and status",
            m.requests.clone(),
        );
        registry.register(
            "kandle_request_duration_seconds",
            "Request latency, admission to last byte produced",
            m.request_duration.clone(),
        );
        registry.register(
            "kandle_time_to_first_token_seconds",
            "Time from admission to the first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "kandle_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "kandle_generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        registry.register(
            "kandle_prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "kandle_prompt_tokens_cached",
            "Prompt tokens not computed again: continued from the prefix cache's keys and values, or copied from a sequence that computed the same prompt in the same step (the choices of one request)",
            m.prompt_tokens_cached.clone(),
        );
        registry.register(
            "kandle_prefix_cache_positions",
            "Positions of keys and values the prefix cache holds (what --prefix-cache-tokens bounds; a chunk that several kept prompts share counted once)",
            m.prefix_cache_positions.clone(),
        );
        registry.register(
            "kandle_step_tokens",
            "Tokens each step of the model computed: the running sequences' decode steps and the parts of new prompts, together",
            m.step_tokens.clone(),
        );
        registry.register(
            "kandle_queue_depth",
            "Requests admitted but not yet running",
            m.queue_depth.clone(),
        );
        registry.register(
            "kandle_inflight_requests",
            "Requests being served",
            m.inflight.clone(),
        );
        registry.register(
            "kandle_batch_size",
            "Sequences in the running batch",
            m.batch_size.clone(),
        );
        registry.register(
            "kandle_batch_tokens",
            "Positions of keys and values the running batch may reach: each sequence's prompt plus its max_tokens",
            m.batch_tokens.clone(),
        );
        registry.register(
            "kandle_batch_tokens_limit",
            "The batch token budget that bounds kandle_batch_tokens (--max-batch-tokens or what the memory left after loading holds); 0: none",
            m.batch_tokens_limit.clone(),
        );
        registry.register(
            "kandle_model_load_seconds",
            "Seconds spent loading the model",
            m.model_load_seconds.clone(),
        );
        m
    }

    /// Counts one finished HTTP request.
    pub fn observe_request(&self, endpoint: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.to_owned(),
            })
            .observe(seconds);
    }
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
