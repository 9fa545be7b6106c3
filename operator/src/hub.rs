//! Resolving a hub revision (branch, tag or commit) to the commit sha the pods are pinned to.
//!
//! One `GET {endpoint}/api/models/{repo}/revision/{revision}` (the hub's model-info API), with
//! `Authorization: Bearer <token>` when the model names a token Secret. The answer's `sha` is the
//! commit. Failures map onto condition reasons a user can act on ([`classify`], a pure function):
//! unknown repository or revision, a refused token, an unreachable hub.
//!
//! The token is only ever put in the request header: error messages are built from the status
//! code and the hub's error code, never from the request, so it cannot leak into status, events
//! or logs.
use std::time::Duration;

use serde::Deserialize;

use crate::consts::reason;

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Why a revision did not resolve: a condition reason and a message safe to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveError {
    /// One of [`crate::consts::reason`].
    pub reason: &'static str,
    pub message: String,
    /// Whether retrying soon can help (an unreachable hub) or the user must act first.
    pub transient: bool,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// A client for the hub's revision API.
#[derive(Clone, Debug)]
pub struct Hub {
    endpoint: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ModelInfo {
    sha: Option<String>,
}

impl Hub {
    /// A hub client for `endpoint` (the public hub when `None`).
    pub fn new(endpoint: Option<&str>) -> Hub {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap_or_default();
        Hub { endpoint: endpoint.unwrap_or(DEFAULT_ENDPOINT).trim_end_matches('/').to_owned(), http }
    }

    /// The commit `revision` of `repo` points at.
    pub async fn resolve(&self, repo: &str, revision: &str, token: Option<&str>) -> Result<String, ResolveError> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode_revision(revision));
        let mut request = self.http.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Err(unreachable(&self.endpoint, &e)),
        };
        let status = response.status().as_u16();
        let code = response.headers().get("x-error-code").and_then(|v| v.to_str().ok()).map(str::to_owned);
        if !(200..300).contains(&status) {
            return Err(classify(status, code.as_deref(), repo, revision, token.is_some()));
        }
        let info: ModelInfo = response.json().await.map_err(|e| ResolveError {
            reason: reason::HUB_UNREACHABLE,
            message: format!("the hub's answer for {repo}@{revision} was not model info JSON: {e}"),
            transient: true,
        })?;
        match info.sha {
            Some(sha) if is_commit(&sha) => Ok(sha),
            _ => Err(ResolveError {
                reason: reason::HUB_UNREACHABLE,
                message: format!("the hub's answer for {repo}@{revision} has no commit sha"),
                transient: true,
            }),
        }
    }
}

/// Whether `s` is a full 40-hex commit sha (which needs no resolution).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Branch names may hold `/` (`refs/pr/1`); the hub wants it percent-encoded in the path.
fn encode_revision(revision: &str) -> String {
    revision.replace('%', "%25").replace('/', "%2F")
}

fn unreachable(endpoint: &str, e: &reqwest::Error) -> ResolveError {
    let what = if e.is_timeout() { "timed out" } else if e.is_connect() { "refused or unreachable" } else { "failed" };
    ResolveError {
        reason: reason::HUB_UNREACHABLE,
        message: format!("the hub at {endpoint} could not be asked ({what}); kandle retries with backoff"),
        transient: true,
    }
}

/// Maps a hub error answer onto a condition reason and message.
pub fn classify(status: u16, code: Option<&str>, repo: &str, revision: &str, had_token: bool) -> ResolveError {
    let permanent = |reason, message: String| ResolveError { reason, message, transient: false };
    match (status, code) {
        (404, Some("RevisionNotFound")) => permanent(
            reason::REPOSITORY_NOT_FOUND,
            format!("revision {revision:?} does not exist in {repo}: check spec.model.huggingFace.revision"),
        ),
        (404, _) => permanent(
            reason::REPOSITORY_NOT_FOUND,
            format!("the hub has no repository {repo} (or it is private): check spec.model.huggingFace.repo"),
        ),
        (401 | 403, _) if had_token => permanent(
            reason::HUB_UNAUTHORIZED,
            format!("the hub refused the token from spec.model.huggingFace.tokenSecretRef for {repo} (HTTP {status}): check the token and its access to the repository"),
        ),
        (401 | 403, _) => permanent(
            reason::HUB_UNAUTHORIZED,
            format!("{repo} needs a hub token (HTTP {status}): set spec.model.huggingFace.tokenSecretRef"),
        ),
        (429, _) | (500..=599, _) => ResolveError {
            reason: reason::HUB_UNREACHABLE,
            message: format!("the hub answered HTTP {status} for {repo}; kandle retries with backoff"),
            transient: true,
        },
        _ => permanent(reason::HUB_UNREACHABLE, format!("the hub answered HTTP {status} for {repo}@{revision}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_hex_sha_is_a_commit_and_a_branch_is_not() {
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
        assert!(!is_commit("0123456789abcdef"));
    }

    #[test]
    fn slashes_in_branch_names_are_encoded() {
        assert_eq!(encode_revision("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn hub_errors_map_to_reasons_the_user_can_act_on() {
        let e = classify(404, Some("RepoNotFound"), "org/m", "main", false);
        assert_eq!(e.reason, reason::REPOSITORY_NOT_FOUND);
        assert!(e.message.contains("spec.model.huggingFace.repo"));
        assert!(!e.transient);
        let e = classify(404, Some("RevisionNotFound"), "org/m", "v2", false);
        assert!(e.message.contains("spec.model.huggingFace.revision"), "{e}");
        let e = classify(401, Some("GatedRepo"), "org/m", "main", true);
        assert_eq!(e.reason, reason::HUB_UNAUTHORIZED);
        assert!(e.message.contains("refused the token"));
        let e = classify(401, None, "org/m", "main", false);
        assert!(e.message.contains("tokenSecretRef"));
        let e = classify(503, None, "org/m", "main", false);
        assert_eq!(e.reason, reason::HUB_UNREACHABLE);
        assert!(e.transient);
    }
}
