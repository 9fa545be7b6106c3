//! The crate's one error type. Each variant keeps its cause and has a stable
//! [`Error::metric_label`], the `error` label of `kandle_reconcile_errors_total`.

/// Errors of the kandle operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),

    /// An object could not be turned into JSON (for hashing, diffing or applying).
    #[error("could not serialize {what}: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// The CRD could not be rendered as YAML.
    #[error("could not render the CRD as YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),

    /// A `LanguageModel` lacks a field the API server always sets (name, namespace, uid):
    /// it was not read from the cluster.
    #[error("LanguageModel has no {0}; it must come from the API server")]
    MissingObjectKey(&'static str),

    /// Writing the CRD or other output failed.
    #[error("could not write {what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The hub revision did not resolve (reported in the `ModelResolved` condition too).
    #[error("hub revision not resolved: {0}")]
    Resolve(crate::hub::ResolveError),

    /// The finalizer machinery failed (adding or removing kandle's finalizer).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// The Kubernetes client could not be configured (kubeconfig, in-cluster settings).
    #[error("Kubernetes client configuration: {0}")]
    Config(String),

    /// This replica stopped being the leader; it exits so that it never reconciles alongside
    /// the new one.
    #[error("lost the leader lease")]
    LostLeadership,

    /// A command the binary offers whose implementation has not landed yet.
    #[error("`kandle-operator {0}` is not implemented yet")]
    NotImplemented(&'static str),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable name for the variant, used as a metric label (never the message, which
    /// would make label cardinality unbounded).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize { .. } => "serialize",
            Error::Yaml(_) => "yaml",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Io { .. } => "io",
            Error::NotImplemented(_) => "not_implemented",
            Error::Resolve(_) => "resolve",
            Error::Config(_) => "config",
            Error::LostLeadership => "lost_leadership",
            Error::Finalizer(_) => "finalizer",
        }
    }

    /// Whether the user must act before a retry can succeed (an unknown repository, a refused
    /// token, a missing Secret): such errors are retried slowly, the rest with quick backoff.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Resolve(e) if !e.transient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_short_snake_case_names_not_messages() {
        let errors = [
            Error::MissingObjectKey("uid"),
            Error::NotImplemented("run"),
            Error::Io { what: "x".into(), source: std::io::Error::other("boom") },
            Error::Serialize { what: "deployment", source: serde_json::from_str::<u8>("x").unwrap_err() },
        ];
        for e in &errors {
            let label = e.metric_label();
            assert!(label.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{label}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn errors_keep_their_cause() {
        let e = Error::Io { what: "crds/x.yaml".into(), source: std::io::Error::other("disk full") };
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "disk full");
    }
}

/// A short description of a Kubernetes API error for status messages: the API server's own
/// message when there is one.
pub fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}
