//! The crate's one error type. Every variant has a stable `metric_label()` so that metrics and
//! logs can count failures by kind without parsing messages.

/// Errors of the runtime library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model files could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A model file is malformed or describes something this runtime does not support.
    #[error("unsupported or invalid model: {0}")]
    Model(String),
    /// A JSON model file (config.json, tokenizer_config.json, ...) is malformed.
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The tensor library failed (loading weights or running the model).
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The tokenizer failed to load or to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
    /// The request is invalid for this model (too long, wrong task, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The server could not bind or serve.
    #[error("server: {0}")]
    Server(String),
    /// The model hub refused a request or a download failed. Never holds the token.
    #[error("model hub: {0}")]
    Hub(String),
    /// The model is not in the cache, and the network may not be used (`HF_HUB_OFFLINE`).
    #[error("{0}")]
    NotCached(String),
}

impl Error {
    /// A short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Model(_) => "model",
            Error::Json { .. } => "json",
            Error::Candle(_) => "candle",
            Error::Tokenizer(_) => "tokenizer",
            Error::Template(_) => "template",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Server(_) => "server",
            Error::Hub(_) => "hub",
            Error::NotCached(_) => "not_cached",
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn tokenizer(e: impl std::fmt::Display) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads and parses a JSON file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })
}
