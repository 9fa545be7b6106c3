//! A local stand-in for the Hugging Face hub, for tests: the two endpoints kandle uses.
//!
//! - `GET /api/models/{org}/{name}[/revision/{revision}]` → `{"id", "sha", "siblings"}`: how
//!   the operator resolves a branch or tag to a commit.
//! - `GET|HEAD /{org}/{name}/resolve/{revision}/{file}` → the file, with the headers `hf-hub`
//!   reads (`x-repo-commit`, `etag`, `x-linked-etag`, `x-linked-size`) and `Range` support
//!   (206 + `Content-Range`), which `hf-hub` uses to probe and resume.
//!
//! Data model: repos hold commits (a full file set each, keyed by a 40-hex sha) and refs
//! (branches and tags naming a commit). Moving a branch is a new commit — what "the hub moved the
//! branch" means for revision drift. A repo may require a token; tokens are compared, never
//! recorded: the request log keeps whether an `Authorization` header came, not its value.
//!
//! Errors follow the hub: 404 with `X-Error-Code: RepoNotFound` or `RevisionNotFound` /
//! `EntryNotFound`, 401 with `X-Error-Code: GatedRepo` for a missing or refused token.
//! It runs on its own thread and runtime, so it outlives any one test's tokio runtime.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// One recorded request: method, path, whether it carried credentials, and its `Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authorized: bool,
    pub range: Option<String>,
}

#[derive(Default)]
struct Repo {
    token: Option<String>,
    refs: BTreeMap<String, String>,
    commits: BTreeMap<String, BTreeMap<String, Arc<Vec<u8>>>>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    requests: Vec<Request>,
    commits_made: u64,
}

/// A running fake hub. Stops when dropped.
pub struct FakeHub {
    server: crate::LocalServer,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// Starts a hub on a free loopback port.
    pub fn start() -> Result<FakeHub> {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
            let state = shared.clone();
            async move { handle(&state, &method, &uri, &headers) }
        });
        Ok(FakeHub { server: crate::LocalServer::start("fake-hub", app)?, state })
    }

    /// The hub's base URL (what `HF_ENDPOINT` is set to).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Creates (or replaces) `repo` with `files` as the first commit on `main`; returns its sha.
    pub fn add_repo<I, N, B>(&self, repo: &str, files: I) -> String
    where
        I: IntoIterator<Item = (N, B)>,
        N: Into<String>,
        B: Into<Vec<u8>>,
    {
        self.state.lock().unwrap().repos.insert(repo.to_string(), Repo::default());
        self.commit(repo, "main", files)
    }

    /// Creates `repo` from the files of a local directory (recursively); returns the sha.
    pub fn add_dir(&self, repo: &str, dir: &Path) -> Result<String> {
        let mut files = Vec::new();
        collect(dir, dir, &mut files)?;
        Ok(self.add_repo(repo, files))
    }

    /// Makes a new commit on `branch` holding the branch's current files updated with `files`,
    /// and moves the branch to it. Returns the new sha.
    pub fn commit<I, N, B>(&self, repo: &str, branch: &str, files: I) -> String
    where
        I: IntoIterator<Item = (N, B)>,
        N: Into<String>,
        B: Into<Vec<u8>>,
    {
        let mut state = self.state.lock().unwrap();
        state.commits_made += 1;
        let n = state.commits_made;
        let r = state.repos.get_mut(repo).unwrap_or_else(|| panic!("no repo {repo} in the fake hub"));
        let mut tree = r.refs.get(branch).and_then(|sha| r.commits.get(sha)).cloned().unwrap_or_default();
        for (name, bytes) in files {
            tree.insert(name.into(), Arc::new(bytes.into()));
        }
        let mut h = Sha256::new();
        h.update(repo.as_bytes());
        h.update(n.to_le_bytes());
        for (name, bytes) in &tree {
            h.update(name.as_bytes());
            h.update(bytes.as_slice());
        }
        let sha = hex::encode(h.finalize())[..40].to_string();
        r.commits.insert(sha.clone(), tree);
        r.refs.insert(branch.to_string(), sha.clone());
        sha
    }

    /// Points tag (or branch) `name` at commit `sha`.
    pub fn set_ref(&self, repo: &str, name: &str, sha: &str) {
        let mut state = self.state.lock().unwrap();
        let r = state.repos.get_mut(repo).unwrap_or_else(|| panic!("no repo {repo} in the fake hub"));
        r.refs.insert(name.to_string(), sha.to_string());
    }

    /// Makes `repo` private: only `Authorization: Bearer <token>` gets in.
    pub fn require_token(&self, repo: &str, token: &str) {
        let mut state = self.state.lock().unwrap();
        let r = state.repos.get_mut(repo).unwrap_or_else(|| panic!("no repo {repo} in the fake hub"));
        r.token = Some(token.to_string());
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else {
            let name = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push((name, std::fs::read(&path)?));
        }
    }
    Ok(())
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, [("x-error-code", code), ("x-error-message", message)], axum::Json(serde_json::json!({ "error": message })))
        .into_response()
}

/// Splits `org/name/rest...` (or `name/rest...` for a repo without an org) against the known
/// repos; the longest known prefix wins.
fn split_repo<'a>(state: &State, path: &'a str) -> Option<(&'a str, &'a str)> {
    let mut candidates = Vec::new();
    for (i, c) in path.char_indices() {
        if c == '/' {
            candidates.push((&path[..i], &path[i + 1..]));
        }
    }
    candidates.push((path, ""));
    candidates.into_iter().rev().find(|(repo, _)| state.repos.contains_key(*repo))
}

fn handle(state: &Mutex<State>, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
    let mut state = state.lock().unwrap();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let path = uri.path().to_string();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    state.requests.push(Request {
        method: method.to_string(),
        path: path.clone(),
        authorized: bearer.is_some(),
        range,
    });
    let path = path.trim_start_matches('/');

    let (api, rest) = match path.strip_prefix("api/models/") {
        Some(rest) => (true, rest),
        None => (false, path),
    };
    let Some((repo_id, rest)) = split_repo(&state, rest) else {
        return error(StatusCode::NOT_FOUND, "RepoNotFound", "Repository not found");
    };
    let repo = &state.repos[repo_id];
    if let Some(token) = &repo.token
        && bearer.as_deref() != Some(token.as_str())
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "GatedRepo",
            "Invalid credentials in Authorization header: access to this repository is restricted",
        );
    }
    let resolve = |rev: &str| -> Option<String> {
        if let Some(sha) = repo.refs.get(rev) {
            return Some(sha.clone());
        }
        repo.commits.contains_key(rev).then(|| rev.to_string())
    };

    if api {
        let revision = if rest.is_empty() { "main" } else { rest.strip_prefix("revision/").unwrap_or(rest) };
        let revision = percent_decode(revision);
        let Some(sha) = resolve(&revision) else {
            return error(StatusCode::NOT_FOUND, "RevisionNotFound", &format!("Invalid rev id: {revision}"));
        };
        let siblings: Vec<_> =
            repo.commits[&sha].keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        return axum::Json(serde_json::json!({ "id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings }))
            .into_response();
    }

    let Some(rest) = rest.strip_prefix("resolve/") else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "unknown endpoint");
    };
    let Some((revision, file)) = rest.split_once('/') else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "no file named");
    };
    let revision = percent_decode(revision);
    let Some(sha) = resolve(&revision) else {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound", &format!("Invalid rev id: {revision}"));
    };
    let Some(bytes) = repo.commits[&sha].get(file).cloned() else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", &format!("{file} does not exist at {sha}"));
    };
    let total = bytes.len();
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(bytes.as_slice())));
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|r| parse_range(r, total));
    let mut builder = Response::builder()
        .header("x-repo-commit", &sha)
        .header(header::ETAG, &etag)
        .header("x-linked-etag", &etag)
        .header("x-linked-size", total.to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    let (status, body) = match range {
        Some((start, end)) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{total}"));
            (StatusCode::PARTIAL_CONTENT, bytes[start..=end].to_vec())
        }
        None => (StatusCode::OK, bytes.to_vec()),
    };
    builder = builder.header(header::CONTENT_LENGTH, body.len().to_string());
    let body = if method == Method::HEAD { Body::empty() } else { Body::from(body) };
    builder.status(status).body(body).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `bytes=a-b`, `bytes=a-` → an inclusive range within `total` bytes.
fn parse_range(value: &str, total: usize) -> Option<(usize, usize)> {
    let spec = value.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end = if b.is_empty() { total.checked_sub(1)? } else { b.parse::<usize>().ok()?.min(total.checked_sub(1)?) };
    (start <= end).then_some((start, end))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_clamped_to_the_file() {
        assert_eq!(parse_range("bytes=0-0", 10), Some((0, 0)));
        assert_eq!(parse_range("bytes=2-", 10), Some((2, 9)));
        assert_eq!(parse_range("bytes=5-100", 10), Some((5, 9)));
        assert_eq!(parse_range("bytes=9-3", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }

    #[test]
    fn revisions_with_slashes_are_percent_decoded() {
        assert_eq!(percent_decode("refs%2Fpr%2F1"), "refs/pr/1");
        assert_eq!(percent_decode("main"), "main");
    }
}
