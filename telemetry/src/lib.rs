//! Logs and traces for kandle's binaries, the operator and the runtime.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines. Traces
//! (DESIGN.md: "tracing spans, exported by OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set") go
//! to an OpenTelemetry collector by OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//! traces-only `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with the standard variables read
//! by the SDK: `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `http/json`),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME` (default:
//! the binary's name), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*` (the batch processor: spans
//! leave every 5 s by default, and the rest at exit), `OTEL_TRACES_EXPORTER=none` and
//! `OTEL_SDK_DISABLED=true` (off). An `https://` endpoint is verified against the system's
//! roots and, as the OpenTelemetry specification names them (the SDK's HTTP exporter does not
//! read them), the PEM files in `OTEL_EXPORTER_OTLP_CERTIFICATE` (a collector's own CA) and
//! `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` with `OTEL_EXPORTER_OTLP_CLIENT_KEY` (mutual TLS),
//! each also as its `_TRACES_` variable, which wins. `grpc` is refused at start, naming the variable: kandle
//! speaks OTLP/HTTP only (a collector's port 4318), and sending HTTP to a gRPC port would lose
//! every span without a word.
//!
//! Only the binary's own spans are exported ([`Options::exported`]), at `info` and above,
//! whatever `RUST_LOG` says; never headers, bodies, prompts or keys (the binaries put none in
//! their spans). The OTLP variables' values are never logged: the endpoint and the headers
//! may carry credentials.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What a binary asks of [`init`].
pub struct Options {
    /// Names the process where `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` do not.
    pub service: &'static str,
    /// Spans and events whose target starts with this are exported, and only they.
    pub exported: &'static str,
    /// The exported spans are made for traces alone and stay out of the log.
    pub exported_not_logged: bool,
    /// The log as JSON lines (else text).
    pub json: bool,
}

/// The trace exporter, shut down (its last spans sent) when dropped. Hold it for the
/// process's life, outside any async runtime: the exporter's blocking HTTP client may be
/// neither built nor dropped inside one.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!("sending the last spans failed: {e}");
        }
    }
}

/// How OTLP traces are to be sent, as the environment asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Otlp {
    Off,
    Protobuf,
    Json,
}

/// What the `OTEL_*` variables (read through `var`) ask of the trace exporter: off without
/// an endpoint, with `OTEL_SDK_DISABLED=true` or with `OTEL_TRACES_EXPORTER=none`; an error
/// naming the variable for gRPC or a value kandle does not know.
pub fn otlp_requested(var: impl Fn(&str) -> Option<String>) -> Result<Otlp, String> {
    let set = |name: &str| {
        var(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(Otlp::Off);
    }
    match set("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
        None => {}
        Some(v) if v == "otlp" => {}
        Some(v) if v == "none" => return Ok(Otlp::Off),
        Some(v) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={v} is not supported: kandle exports traces by \"otlp\" (or \"none\")"
            ));
        }
    }
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
    {
        return Ok(Otlp::Off);
    }
    let (name, protocol) = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|n| set(n).map(|v| (n, v)))
    .unwrap_or(("", "http/protobuf".to_owned()));
    match protocol.to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(Otlp::Protobuf),
        "http/json" => Ok(Otlp::Json),
        "grpc" => Err(format!(
            "{name}=grpc is not supported: kandle sends traces by OTLP over HTTP; set it to \
             http/protobuf (or http/json) and the endpoint to the collector's OTLP/HTTP port \
             (4318 by default)"
        )),
        other => Err(format!(
            "{name}={other} is not a protocol kandle knows: use http/protobuf or http/json"
        )),
    }
}

/// The PEM files the exporter's TLS is configured with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    /// CA certificates trusted beside the system's roots.
    pub ca: Option<(&'static str, String)>,
    /// A client certificate and its key (mutual TLS).
    pub client: Option<[(&'static str, String); 2]>,
}

/// The TLS files the `OTEL_*` variables (read through `var`) name, each with the variable that
/// named it (the `_TRACES_` one wins); `None` where none is set, and an error naming the
/// variables for a client certificate without its key or a key without its certificate.
pub fn tls_requested(var: impl Fn(&str) -> Option<String>) -> Result<Option<TlsFiles>, String> {
    let pick = |names: [&'static str; 2]| {
        names.into_iter().find_map(|n| {
            var(n)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .map(|v| (n, v))
        })
    };
    let ca = pick([
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ]);
    let cert = pick([
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ]);
    let key = pick([
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ]);
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some([cert, key]),
        (None, None) => None,
        _ => {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY \
                        (or their _TRACES_ forms) go together: set both for mutual TLS, or neither"
                    .into(),
            );
        }
    };
    Ok((ca.is_some() || client.is_some()).then_some(TlsFiles { ca, client }))
}

/// The exporter's HTTP client with `tls`'s files: reqwest's blocking client, as the SDK builds
/// it, with the SDK's timeout (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
/// in milliseconds; 10 s). Errors name the variable and its file, never a file's content.
fn tls_client(tls: TlsFiles) -> anyhow::Result<reqwest::blocking::Client> {
    let read = |(var, path): &(&'static str, String)| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{var}: cannot read {path}: {e}"))
    };
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|n| std::env::var(n).ok()?.trim().parse::<u64>().ok())
    .map_or(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis,
    );
    let mut builder = reqwest::blocking::Client::builder().timeout(timeout);
    if let Some(ca) = &tls.ca {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{}: {} holds no PEM certificate", ca.0, ca.1))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some([cert, key]) = &tls.client {
        let pem = [read(cert)?, b"\n".to_vec(), read(key)?].concat();
        let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
            anyhow::anyhow!(
                "{} and {}: {} and {} are not a PEM certificate and its private key",
                cert.0,
                key.0,
                cert.1,
                key.1
            )
        })?;
        builder = builder.identity(identity);
    }
    // A blocking client may not be built inside an async runtime: on a thread of its own, as
    // the SDK builds its own.
    std::thread::spawn(move || builder.build())
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP exporter's HTTP client panicked"))?
        .map_err(|_| anyhow::anyhow!("the OTLP exporter's HTTP client could not be built"))
}

/// Starts the log, and the trace exporter when the environment asks for it (see the crate
/// documentation).
pub fn init(options: Options) -> anyhow::Result<Telemetry> {
    let Options {
        service,
        exported,
        exported_not_logged,
        json,
    } = options;
    let otlp = otlp_requested(|n| std::env::var(n).ok()).map_err(anyhow::Error::msg)?;
    let provider = match otlp {
        Otlp::Off => None,
        Otlp::Protobuf | Otlp::Json => Some(provider(service, otlp)?),
    };
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if exported_not_logged {
        filter = filter.add_directive(format!("{exported}=off").parse()?);
    }
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = if json {
        log.json().with_filter(filter).boxed()
    } else {
        log.with_filter(filter).boxed()
    };
    let traces = provider.as_ref().map(|p| {
        // Spans carry what their code gives them, not the source location, thread, target
        // or busy and idle times tracing-opentelemetry adds by default.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(exported, tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(log)
        .with(traces)
        .try_init()?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing::info!(
            "exporting traces by OTLP/HTTP ({})",
            if otlp == Otlp::Json {
                "JSON"
            } else {
                "protobuf"
            }
        );
    }
    Ok(Telemetry { provider })
}

fn provider(service: &'static str, otlp: Otlp) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithHttpConfig;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(match otlp {
            Otlp::Json => Protocol::HttpJson,
            _ => Protocol::HttpBinary,
        });
    if let Some(tls) = tls_requested(|n| std::env::var(n).ok()).map_err(anyhow::Error::msg)? {
        exporter = exporter.with_http_client(tls_client(tls)?);
    }
    let exporter = exporter
        .build()
        // The error may quote the endpoint, which may hold credentials.
        .map_err(|_| {
            anyhow::anyhow!(
                "the OTLP trace exporter could not be built: check that \
                 OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is an \
                 http:// or https:// URL and OTEL_EXPORTER_OTLP_HEADERS is key=value,…"
            )
        })?;
    // The environment's name wins (`OTEL_SERVICE_NAME`, `service.name` in
    // `OTEL_RESOURCE_ATTRIBUTES`); the SDK's default is `unknown_service`.
    let from_env = Resource::builder().build();
    let named = from_env
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let resource = if named {
        from_env
    } else {
        Resource::builder().with_service_name(service).build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requested(vars: &[(&str, &str)]) -> Result<Otlp, String> {
        otlp_requested(|n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn traces_are_sent_only_where_an_endpoint_is_set() {
        assert_eq!(requested(&[]), Ok(Otlp::Off));
        assert_eq!(
            requested(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]),
            Ok(Otlp::Off)
        );
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(requested(&[endpoint]), Ok(Otlp::Protobuf));
        assert_eq!(
            requested(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )]),
            Ok(Otlp::Protobuf)
        );
        assert_eq!(
            requested(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]),
            Ok(Otlp::Off)
        );
        assert_eq!(
            requested(&[endpoint, ("OTEL_SDK_DISABLED", "false")]),
            Ok(Otlp::Protobuf)
        );
        assert_eq!(
            requested(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            Ok(Otlp::Off)
        );
        assert_eq!(
            requested(&[endpoint, ("OTEL_TRACES_EXPORTER", "otlp")]),
            Ok(Otlp::Protobuf)
        );
        let e = requested(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(e.contains("OTEL_TRACES_EXPORTER=zipkin"), "{e}");
    }

    #[test]
    fn tls_files_come_from_the_certificate_variables_the_traces_ones_first() {
        let tls = |vars: &[(&str, &str)]| {
            tls_requested(|n| {
                vars.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        assert_eq!(tls(&[]), Ok(None));
        assert_eq!(tls(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", " ")]), Ok(None));
        assert_eq!(
            tls(&[
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/all/ca.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces/ca.pem"),
            ]),
            Ok(Some(TlsFiles {
                ca: Some((
                    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                    "/traces/ca.pem".into()
                )),
                client: None,
            }))
        );
        assert_eq!(
            tls(&[
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/k.pem"),
            ]),
            Ok(Some(TlsFiles {
                ca: None,
                client: Some([
                    ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem".into()),
                    ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/k.pem".into()),
                ]),
            }))
        );
        let e = tls(&[("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")]).unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"), "{e}");
    }

    #[test]
    fn the_protocol_is_http_and_the_traces_variable_wins() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            requested(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Ok(Otlp::Json)
        );
        assert_eq!(
            requested(&[
                endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "HTTP/protobuf"),
            ]),
            Ok(Otlp::Protobuf)
        );
        let e = requested(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported"),
            "{e}"
        );
        assert!(e.contains("4318"), "{e}");
        let e =
            requested(&[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")]).unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=thrift"),
            "{e}"
        );
        // Without an endpoint nothing is sent, so a protocol is not looked at.
        assert_eq!(
            requested(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Ok(Otlp::Off)
        );
    }
}
