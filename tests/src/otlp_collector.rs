//! A local stand-in for an OpenTelemetry collector, for tests: the OTLP/HTTP traces endpoint.
//!
//! `POST /v1/traces` with `Content-Type: application/x-protobuf` (or `application/json`, OTLP's
//! JSON encoding) is decoded as the protocol's own `ExportTraceServiceRequest` (the
//! `opentelemetry-proto` messages, as a collector decodes them) and answered `200` with an
//! empty `ExportTraceServiceResponse`; any other path or content type gets `404` / `415` and is
//! recorded as refused. The raw bodies are kept too, so that a test can check what never
//! appears in them (keys, prompts), and each export's content type and headers.
//! It runs on its own thread and runtime ([`crate::LocalServer`]). [`OtlpCollector::start_tls`]
//! serves it over TLS with a CA of its own, asking every client for a certificate that CA
//! signed (mutual TLS); a refused handshake is recorded as refused.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
pub use opentelemetry_proto::tonic::resource::v1::Resource;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// One accepted export's request: its content type and headers.
#[derive(Clone, Debug)]
pub struct Export {
    pub content_type: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    bodies: Vec<Vec<u8>>,
    exports: Vec<Export>,
    spans: Vec<(Option<Resource>, Span)>,
    refused: Vec<String>,
}

/// A running collector; stopped when dropped.
pub struct OtlpCollector {
    server: crate::LocalServer,
    state: Arc<Mutex<State>>,
}

/// PEM texts for a client of [`OtlpCollector::start_tls`]: the CA that signed the collector's
/// certificate (for 127.0.0.1), and a client certificate and key it signed too.
pub struct ClientPki {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

fn app(state: &Arc<Mutex<State>>) -> axum::Router {
    let shared = state.clone();
    axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let state = shared.clone();
        async move { receive(&state, &uri, &headers, &body) }
    })
}

impl OtlpCollector {
    /// Starts a collector on a free loopback port.
    pub fn start() -> Result<OtlpCollector> {
        let state = Arc::new(Mutex::new(State::default()));
        Ok(OtlpCollector { server: crate::LocalServer::start("otlp-collector", app(&state))?, state })
    }

    /// Starts a collector that speaks TLS only and requires a client certificate; returns what
    /// a client needs to be let in.
    pub fn start_tls() -> Result<(OtlpCollector, ClientPki)> {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        crate::init_crypto();
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer)?;
        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer)?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca_cert.der().to_vec()))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )?;
        let state = Arc::new(Mutex::new(State::default()));
        let refused = state.clone();
        let server = crate::LocalServer::start_tls("otlp-collector-tls", app(&state), Arc::new(config), move |why| {
            refused.lock().unwrap().refused.push(why);
        })?;
        let pki = ClientPki { ca: ca_cert.pem(), cert: client_cert.pem(), key: client_key.serialize_pem() };
        Ok((OtlpCollector { server, state }, pki))
    }

    /// The base URL (what `OTEL_EXPORTER_OTLP_ENDPOINT` is set to).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every span received so far, with its resource.
    pub fn spans(&self) -> Vec<(Option<Resource>, Span)> {
        self.state.lock().unwrap().spans.clone()
    }

    /// The raw bodies of the exports received.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().bodies.clone()
    }

    /// Each accepted export's content type and headers, in order.
    pub fn exports(&self) -> Vec<Export> {
        self.state.lock().unwrap().exports.clone()
    }

    /// What was refused: `{path} {content type}` per request, `TLS handshake: {why}` per
    /// connection refused.
    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }
}

fn receive(state: &Mutex<State>, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut state = state.lock().unwrap();
    let refuse = |state: &mut State, status| {
        state.refused.push(format!("{} {content_type}", uri.path()));
        (status, [(header::CONTENT_TYPE, "text/plain")], Vec::new())
    };
    if uri.path() != "/v1/traces" {
        return refuse(&mut state, StatusCode::NOT_FOUND);
    }
    let decoded = match content_type {
        "application/x-protobuf" => ExportTraceServiceRequest::decode(body).ok(),
        "application/json" => serde_json::from_slice::<ExportTraceServiceRequest>(body).ok(),
        _ => return refuse(&mut state, StatusCode::UNSUPPORTED_MEDIA_TYPE),
    };
    let Some(export) = decoded else {
        return refuse(&mut state, StatusCode::BAD_REQUEST);
    };
    state.bodies.push(body.to_vec());
    let headers = headers.iter().map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
    state.exports.push(Export { content_type: content_type.to_owned(), headers });
    for rs in export.resource_spans {
        for ss in rs.scope_spans {
            for span in ss.spans {
                state.spans.push((rs.resource.clone(), span));
            }
        }
    }
    // An empty ExportTraceServiceResponse, in the request's encoding: all accepted.
    match content_type {
        "application/json" => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], b"{}".to_vec()),
        _ => (StatusCode::OK, [(header::CONTENT_TYPE, "application/x-protobuf")], Vec::new()),
    }
}

/// The value of attribute `key`, if the attributes have it.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

/// A string attribute's value.
pub fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// An integer attribute's value.
pub fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}
