//! The operator's Prometheus metrics, one registry for the process (DESIGN.md's names).
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`crate::Error::metric_label`].
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// `config`, `revision` or `behaviour`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `Ready`, `Progressing` or `Degraded`.
    pub phase: String,
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub drift_detected: Family<DriftLabels, Counter>,
    pub drift_corrections: Counter,
    pub models: Family<PhaseLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    /// Kubernetes write requests made by reconciles (applies, status patches, deletes):
    /// what "a no-op reconcile writes nothing" is checked against.
    pub writes: Counter<u64, AtomicU64>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let drift_detected = Family::<DriftLabels, Counter>::default();
        let drift_corrections = Counter::default();
        let models = Family::default();
        let writes = Counter::default();
        registry.register("kandle_reconcile_duration_seconds", "Time one reconcile took", reconcile_duration.clone());
        registry.register("kandle_reconcile_errors", "Reconciles that failed, by error kind", reconcile_errors.clone());
        registry.register("kandle_drift_detected", "Drift found, by kind", drift_detected.clone());
        registry.register("kandle_drift_corrections", "Drifted children re-applied", drift_corrections.clone());
        registry.register("kandle_models", "LanguageModels by phase", models.clone());
        registry.register("kandle_api_writes", "Write requests the operator made to the API server", writes.clone());
        Metrics { reconcile_duration, reconcile_errors, drift_detected, drift_corrections, models, writes, registry }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn count_error(&self, label: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { error: label.to_owned() }).inc();
    }

    pub fn count_drift(&self, kind: &str) {
        self.drift_detected.get_or_create(&DriftLabels { kind: kind.to_owned() }).inc();
    }
}

/// Serves `/metrics` (Prometheus text), `/healthz` and `/readyz` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_the_design_names() {
        let m = Metrics::default();
        m.count_error("kube");
        m.count_drift("config");
        m.drift_corrections.inc();
        let text = m.encode();
        for name in [
            "kandle_reconcile_duration_seconds",
            "kandle_reconcile_errors_total{error=\"kube\"} 1",
            "kandle_drift_detected_total{kind=\"config\"} 1",
            "kandle_drift_corrections_total 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
