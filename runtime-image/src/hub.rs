//! Fetching models from a Hugging Face hub into the hub's on-disk cache, and finding them there.
//!
//! Cache layout (the one `huggingface_hub` and `hf-hub` share, so a cache filled by either is
//! usable here and the other way round):
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     blobs/<etag>                 file contents, named by the hub's ETag (sha256 for LFS files)
//!     blobs/<etag>.incomplete      a download in progress; resumed with `Range` on the next try
//!     snapshots/<commit>/<file>    relative symlinks into blobs/
//!     refs/<revision>              the commit a branch or tag pointed at when it was downloaded
//! ```
//!
//! A file is visible in `snapshots/` only once its blob is complete and verified (size, and the
//! sha256 when the ETag is one), so a half-written file is never served; `refs/` is written last.
//!
//! Why not the `hf-hub` crate, which DESIGN.md names: its current release (1.0) depends on
//! `hf-xet`, the Xet storage client, whose large dependency tree is not in the offline registry
//! mirror this workspace builds from and would more than double the runtime image's build; its
//! 0.4 line brings a second `reqwest` major and `ureq`. What kandle needs from it is small — two
//! endpoints (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{commit}/{file}`), the cache
//! layout, `Range` resumption — so it is written here on the workspace's `reqwest`, honouring the
//! same environment: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_CACHE`/`HF_HOME`, `HF_HUB_OFFLINE`.
//!
//! The token is sent as `Authorization: Bearer` to the hub endpoint only (reqwest drops it on a
//! redirect to another host, such as the hub's CDN) and never appears in logs or errors: every
//! message built here passes through [`HubClient::redact`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::DownloadConfig;
use crate::error::{Error, Result};
use crate::source::{HubModel, ModelSource, is_commit};

/// The public hub, when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files of a model directory that the runtime reads (besides the weights).
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    // sentence-transformers: pooling and normalisation of embeddings.
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];
/// Files fetched beside a single GGUF file, when the repo has them.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
/// Transfer attempts per file; each one resumes where the last stopped.
const ATTEMPTS: u32 = 5;
/// How often progress is logged during a transfer.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How to reach the hub and where the cache is.
#[derive(Clone)]
pub struct HubConfig {
    /// Base URL of the hub (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Access token (`HF_TOKEN`); never logged.
    pub token: Option<String>,
    /// The hub cache root (holds `models--*` folders).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: use the cache only, never the network.
    pub offline: bool,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .finish()
    }
}

/// The cache root when `--cache-dir` is absent: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (huggingface_hub's defaults).
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// `models--org--name`: the cache folder of a repo.
pub fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// Finds `model` in the cache without touching the network: the snapshot directory, or the
/// file when one is named. Fails, saying how to fill the cache, when it is not there.
pub fn resolve_cached(cache_dir: &Path, model: &HubModel) -> Result<PathBuf> {
    let root = cache_dir.join(repo_folder(&model.repo));
    let not_cached = |what: String| {
        Error::NotCached(format!(
            "{model} is not in the model cache {}: {what}. Download it first with \
             `kandle-runtime download --model {model} --cache-dir {}` (or unset HF_HUB_OFFLINE)",
            cache_dir.display(),
            cache_dir.display()
        ))
    };
    let commit = if model.revision_is_commit() {
        model.revision.clone()
    } else {
        let r = root.join("refs").join(&model.revision);
        match std::fs::read_to_string(&r) {
            Ok(s) => s.trim().to_owned(),
            Err(_) => return Err(not_cached(format!("no {}", r.display()))),
        }
    };
    let snapshot = root.join("snapshots").join(&commit);
    // A quantisation tag, or a GGUF repo without a config.json: the file as a download
    // would choose it among the snapshot's files.
    let file = match &model.file {
        Some(f) => Some(f.clone()),
        None => resolve_file(&snapshot_files(&snapshot), model).map_err(not_cached)?,
    };
    if let Some(file) = &file {
        let path = snapshot.join(file);
        // exists() follows the symlink: a link to a missing blob does not count.
        if !path.exists() {
            return Err(not_cached(format!("no {}", path.display())));
        }
        return Ok(path);
    }
    if !snapshot.join("config.json").exists() {
        return Err(not_cached(format!(
            "no {}",
            snapshot.join("config.json").display()
        )));
    }
    Ok(snapshot)
}

/// The files of a snapshot directory, as repo paths (its folders a few levels down).
fn snapshot_files(snapshot: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{prefix}{name}");
            // is_dir() follows links: the files are links into blobs/.
            if e.path().is_dir() {
                if depth > 0 {
                    walk(&e.path(), &format!("{path}/"), depth - 1, out);
                }
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(snapshot, "", 3, &mut out);
    out.sort();
    out
}

/// What the hub says about a repo at a revision.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RepoInfo {
    /// The commit the revision resolved to.
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

/// One file of a repo.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sibling {
    pub rfilename: String,
}

/// The quantisation a repo of GGUF files is served in when none is named: llama.cpp's
/// default for `-hf org/repo`.
pub const DEFAULT_QUANT: &str = "Q4_K_M";

/// The one file of `files` that `model` names: its `file`; else the GGUF of its quantisation
/// tag; else, in a repo of GGUF files without a config.json, the [`DEFAULT_QUANT`] one (as
/// llama.cpp and Ollama pick); else none (a model directory). A tag matches a file whose
/// name ends in it after a `-`, `.` or `_`, case aside (`Llama-3.2-1B-Instruct-Q4_K_M.gguf`,
/// `model.q4_k_m.gguf`; not `-Q4_K_M-00001-of-00002.gguf`, a split file, nor `Q4_K_S` for
/// `Q4_K`). Pure: decided from the repo's file list.
pub fn resolve_file(
    files: &[String],
    model: &HubModel,
) -> std::result::Result<Option<String>, String> {
    if let Some(f) = &model.file {
        return Ok(Some(f.clone()));
    }
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    let quant = match &model.quant {
        Some(q) => q.as_str(),
        None if ggufs.is_empty() || files.iter().any(|f| f == "config.json") => return Ok(None),
        None => DEFAULT_QUANT,
    };
    let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    let matching: Vec<&String> = ggufs
        .iter()
        .copied()
        .filter(|f| quant_matches(f, quant))
        .collect();
    match matching.as_slice() {
        [one] => Ok(Some((*one).clone())),
        [] if ggufs.is_empty() => Err(format!(
            "the quantisation {quant:?} was asked for, but the repository holds no GGUF files \
             (it has: {})",
            summary(files)
        )),
        [] => Err(format!(
            "no GGUF file of the repository is {quant:?}{}: name one with --file, or pick \
             another quantisation with hf://<repo>:<quant> (its GGUF files: {})",
            if model.quant.is_none() {
                " (the quantisation chosen when none is named)"
            } else {
                ""
            },
            list(&ggufs)
        )),
        more => Err(format!(
            "{} GGUF files of the repository are {quant:?}: name one with --file ({})",
            more.len(),
            list(more)
        )),
    }
}

/// Whether the GGUF file `path`'s name ends in the quantisation `tag` ([`resolve_file`]).
fn quant_matches(path: &str, tag: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let tag = tag.to_ascii_lowercase();
    stem == tag
        || stem
            .strip_suffix(&tag)
            .is_some_and(|rest| rest.ends_with(['-', '.', '_']))
}

/// Which files of a repo a model needs: with `file`, that file and the tokenizer files beside
/// it; otherwise the configs, tokenizer, safetensors weights and sentence-transformers files.
/// Pure: decided from the repo's file list.
pub fn select_files(
    files: &[String],
    file: Option<&str>,
) -> std::result::Result<Vec<String>, String> {
    let has = |f: &str| files.iter().any(|x| x == f);
    if let Some(file) = file {
        if !has(file) {
            return Err(format!(
                "the repository has no file {file:?} (it has: {})",
                summary(files)
            ));
        }
        let dir = match file.rsplit_once('/') {
            Some((d, _)) => format!("{d}/"),
            None => String::new(),
        };
        let mut out = vec![file.to_owned()];
        for t in TOKENIZER_FILES {
            let p = format!("{dir}{t}");
            if has(&p) {
                out.push(p);
            }
        }
        return Ok(out);
    }
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| {
            MODEL_FILES.contains(&f.as_str())
                || (!f.contains('/') && f.ends_with(".safetensors"))
                || is_pooling_config(f)
        })
        .cloned()
        .collect();
    out.sort();
    if !has("config.json") {
        let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
        return Err(if ggufs.is_empty() {
            format!(
                "the repository has no config.json, so it is not a model this runtime can load \
                 (it has: {})",
                summary(files)
            )
        } else {
            format!(
                "the repository holds GGUF files and no config.json: name one with --file \
                 (one of: {})",
                ggufs
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    if !out.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(format!(
            "the repository has no *.safetensors weights (only safetensors are supported; it \
             has: {})",
            summary(files)
        ));
    }
    Ok(out)
}

/// `1_Pooling/config.json` and the like: sentence-transformers module configs.
fn is_pooling_config(f: &str) -> bool {
    match f.split_once('/') {
        Some((dir, "config.json")) => dir
            .split_once('_')
            .is_some_and(|(n, kind)| n.parse::<u32>().is_ok() && kind == "Pooling"),
        _ => false,
    }
}

fn summary(files: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = files
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if files.len() > SHOWN {
        s.push_str(&format!(", … {} more", files.len() - SHOWN));
    }
    if s.is_empty() {
        s.push_str("no files");
    }
    s
}

/// A client of one hub.
pub struct HubClient {
    config: HubConfig,
    /// Does not follow redirects: the headers of the hub's own answer (ETag, size) matter.
    api: reqwest::Client,
    /// Follows redirects (LFS files live on a CDN); drops the token on another host.
    files: reqwest::Client,
}

/// Where a file is written.
enum Target<'a> {
    /// The hub cache: a blob named by ETag and a snapshot link.
    Cache { root: &'a Path, commit: &'a str },
    /// A plain directory: the file at its repo path.
    Dir(&'a Path),
}

impl HubClient {
    /// A client for `config`.
    pub fn new(config: HubConfig) -> Result<HubClient> {
        let build = |redirects: reqwest::redirect::Policy| {
            reqwest::Client::builder()
                .user_agent(concat!("kandle-runtime/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(30))
                // A stalled transfer fails and is resumed rather than hanging forever.
                .read_timeout(Duration::from_secs(60))
                .redirect(redirects)
                .build()
                .map_err(|e| Error::Hub(format!("cannot create an HTTP client: {e}")))
        };
        Ok(HubClient {
            api: build(reqwest::redirect::Policy::none())?,
            files: build(reqwest::redirect::Policy::limited(10))?,
            config,
        })
    }

    /// Removes the token from a message (defence in depth: nothing here puts it in one).
    pub fn redact(&self, message: String) -> String {
        match &self.config.token {
            Some(t) if !t.is_empty() => message.replace(t.as_str(), "<redacted>"),
            _ => message,
        }
    }

    fn hub_error(&self, message: String) -> Error {
        Error::Hub(self.redact(message))
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(t) if !t.is_empty() => match HeaderValue::from_str(&format!("Bearer {t}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    req.header(header::AUTHORIZATION, v)
                }
                Err(_) => req,
            },
            _ => req,
        }
    }

    fn endpoint(&self) -> &str {
        self.config.endpoint.trim_end_matches('/')
    }

    /// The error for a refused request, in words a user can act on.
    fn status_error(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        what: &str,
        repo: &str,
    ) -> Error {
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let hub_says = headers
            .get("x-error-message")
            .and_then(|v| v.to_str().ok())
            .map(|m| format!(" (the hub says: {m})"))
            .unwrap_or_default();
        let endpoint = self.endpoint();
        let message = match (status, code) {
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                if self.config.token.as_deref().is_some_and(|t| !t.is_empty()) {
                    format!(
                        "{what}: the hub at {endpoint} refused the token in HF_TOKEN for {repo} \
                         (HTTP {status}){hub_says}; check that the token is valid and grants read \
                         access to the repository"
                    )
                } else {
                    format!(
                        "{what}: {repo} on {endpoint} needs a token (HTTP {status}){hub_says}; set \
                         HF_TOKEN (a LanguageModel's huggingFace.tokenSecretRef), or check that \
                         the repository exists"
                    )
                }
            }
            (StatusCode::NOT_FOUND, "RepoNotFound") => {
                format!("{what}: repository {repo} not found on {endpoint}")
            }
            (StatusCode::NOT_FOUND, "RevisionNotFound") => {
                format!("{what}: the revision does not exist in {repo}{hub_says}")
            }
            (StatusCode::NOT_FOUND, "EntryNotFound") => {
                format!("{what}: no such file in {repo}{hub_says}")
            }
            _ => format!("{what}: the hub at {endpoint} answered HTTP {status}{hub_says}"),
        };
        self.hub_error(message)
    }

    /// Resolves `revision` to a commit and lists the repo's files.
    pub async fn repo_info(&self, repo: &str, revision: &str) -> Result<RepoInfo> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint(),
            revision.replace('/', "%2F")
        );
        let what = format!("resolving {repo}@{revision}");
        let resp = self
            .auth(self.api.get(&url))
            .send()
            .await
            .map_err(|e| self.transfer_error(&what, e))?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp.status(), resp.headers(), &what, repo));
        }
        let info: RepoInfo = resp
            .json()
            .await
            .map_err(|e| self.transfer_error(&what, e))?;
        if !is_commit(&info.sha) {
            return Err(self.hub_error(format!(
                "{what}: the hub answered with {:?}, which is not a commit id",
                info.sha
            )));
        }
        Ok(info)
    }

    fn transfer_error(&self, what: &str, e: reqwest::Error) -> Error {
        // reqwest's message carries the URL, which holds no secret; redact anyway.
        self.hub_error(format!("{what}: {}", with_causes(&e)))
    }

    /// Downloads `model` into the cache (only what is missing) and returns its local path: the
    /// snapshot directory, or the named file. Offline, only looks in the cache.
    pub async fn download(&self, model: &HubModel) -> Result<PathBuf> {
        if self.config.offline {
            return resolve_cached(&self.config.cache_dir, model);
        }
        let root = self.config.cache_dir.join(repo_folder(&model.repo));
        let (info, files, file) = self.plan(model).await?;
        let commit = info.sha.as_str();
        for file in &files {
            self.fetch(
                &model.repo,
                commit,
                file,
                Target::Cache {
                    root: &root,
                    commit,
                },
            )
            .await?;
        }
        if !model.revision_is_commit() {
            let r = root.join("refs").join(&model.revision);
            write_file(&r, commit.as_bytes())?;
        }
        let snapshot = root.join("snapshots").join(commit);
        tracing::info!(model = %model, commit, path = %snapshot.display(), files = files.len(), "model in cache");
        Ok(match &file {
            Some(f) => snapshot.join(f),
            None => snapshot,
        })
    }

    /// Downloads `model` into a plain directory (files at their repo paths, no cache layout).
    pub async fn download_to(&self, model: &HubModel, dir: &Path) -> Result<PathBuf> {
        if self.config.offline {
            return Err(self.hub_error(format!(
                "cannot download {model} to {}: HF_HUB_OFFLINE is set",
                dir.display()
            )));
        }
        let (info, files, file) = self.plan(model).await?;
        for f in &files {
            self.fetch(&model.repo, &info.sha, f, Target::Dir(dir))
                .await?;
        }
        tracing::info!(model = %model, commit = %info.sha, path = %dir.display(), files = files.len(), "model downloaded");
        Ok(match &file {
            Some(f) => dir.join(f),
            None => dir.to_path_buf(),
        })
    }

    /// The commit, the files to fetch, and the one file the model is (a GGUF), if any.
    async fn plan(&self, model: &HubModel) -> Result<(RepoInfo, Vec<String>, Option<String>)> {
        let info = self.repo_info(&model.repo, &model.revision).await?;
        let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let file =
            resolve_file(&names, model).map_err(|e| self.hub_error(format!("{model}: {e}")))?;
        let files = select_files(&names, file.as_deref())
            .map_err(|e| self.hub_error(format!("{model}: {e}")))?;
        tracing::info!(model = %model, commit = %info.sha, files = ?files, "resolved");
        Ok((info, files, file))
    }

    /// Fetches one file unless it is already there.
    async fn fetch(&self, repo: &str, commit: &str, file: &str, target: Target<'_>) -> Result<()> {
        let url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint(),
            encode_path(file)
        );
        let what = format!("downloading {file} of {repo}@{commit}");
        // The hub's own answer (not the CDN's) names the blob: x-linked-etag for LFS files.
        let head = self
            .auth(self.api.head(&url))
            .send()
            .await
            .map_err(|e| self.transfer_error(&what, e))?;
        if !(head.status().is_success() || head.status().is_redirection()) {
            return Err(self.status_error(head.status(), head.headers(), &what, repo));
        }
        let h = head.headers();
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let etag = text("x-linked-etag")
            .or_else(|| text(header::ETAG.as_str()))
            .map(|e| normalize_etag(&e))
            .filter(|e| !e.is_empty() && !e.contains('/') && !e.contains(".."))
            .ok_or_else(|| self.hub_error(format!("{what}: the hub sent no ETag")))?;
        let size = text("x-linked-size")
            .or_else(|| text(header::CONTENT_LENGTH.as_str()))
            .and_then(|s| s.parse::<u64>().ok());

        let (dest, link) = match target {
            Target::Cache { root, commit } => (
                root.join("blobs").join(&etag),
                Some(root.join("snapshots").join(commit).join(file)),
            ),
            Target::Dir(dir) => (dir.join(file), None),
        };
        let have = std::fs::metadata(&dest).ok().map(|m| m.len());
        if have.is_some() && (size.is_none() || have == size) {
            tracing::info!(file, bytes = have, "already downloaded");
        } else {
            self.transfer(&url, &what, &dest, size, &etag).await?;
        }
        if let Some(link) = link {
            link_blob(&link, &dest)?;
        }
        Ok(())
    }

    /// Streams `url` into `dest` via `dest.incomplete`, resuming a partial file with `Range`,
    /// retrying interrupted transfers, then checks the size and (for a sha256 ETag) the digest.
    async fn transfer(
        &self,
        url: &str,
        what: &str,
        dest: &Path,
        size: Option<u64>,
        etag: &str,
    ) -> Result<()> {
        let partial = PathBuf::from(format!("{}.incomplete", dest.display()));
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transfer_once(url, what, &partial, size).await {
                Ok(()) => break,
                Err(Transfer::Retry(message)) if attempt < ATTEMPTS => {
                    let wait = Duration::from_secs(1 << attempt.min(5));
                    tracing::warn!(
                        attempt,
                        wait_seconds = wait.as_secs(),
                        error = %self.redact(message),
                        "{what}: transfer interrupted; resuming"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(Transfer::Retry(message) | Transfer::Fatal(message)) => {
                    return Err(self.hub_error(format!("{what}: {message}")));
                }
                Err(Transfer::Refused(e)) => return Err(e),
            }
        }
        let len = std::fs::metadata(&partial)
            .map_err(|e| Error::io(&partial, e))?
            .len();
        if let Some(size) = size
            && len != size
        {
            let _ = std::fs::remove_file(&partial);
            return Err(self.hub_error(format!(
                "{what}: got {len} bytes, the hub announced {size}; the partial file was removed"
            )));
        }
        if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            let path = partial.clone();
            let digest = tokio::task::spawn_blocking(move || sha256_file(&path))
                .await
                .map_err(|e| Error::Hub(format!("{what}: hashing failed: {e}")))??;
            if !digest.eq_ignore_ascii_case(etag) {
                let _ = std::fs::remove_file(&partial);
                return Err(self.hub_error(format!(
                    "{what}: the file's sha256 is {digest}, the hub announced {etag}; the \
                     corrupt file was removed"
                )));
            }
        }
        std::fs::rename(&partial, dest).map_err(|e| Error::io(dest, e))?;
        Ok(())
    }

    async fn transfer_once(
        &self,
        url: &str,
        what: &str,
        partial: &Path,
        size: Option<u64>,
    ) -> std::result::Result<(), Transfer> {
        let mut start = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|s| start > s) {
            start = 0;
        }
        if size.is_some_and(|s| s == start) && start > 0 {
            return Ok(());
        }
        let mut req = self.auth(self.files.get(url));
        if start > 0 {
            req = req.header(header::RANGE, format!("bytes={start}-"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Transfer::Retry(with_causes(&e)))?;
        let status = resp.status();
        let append = match status {
            StatusCode::PARTIAL_CONTENT => {
                let from = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if from != Some(start) {
                    // Not the range asked for: start over rather than splice wrong bytes.
                    let _ = std::fs::remove_file(partial);
                    return Err(Transfer::Retry(format!(
                        "the hub sent a range other than bytes={start}-"
                    )));
                }
                true
            }
            StatusCode::OK => false,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let _ = std::fs::remove_file(partial);
                return Err(Transfer::Retry("the partial file was not resumable".into()));
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                return Err(Transfer::Retry(format!("HTTP {s}")));
            }
            s => {
                return Err(Transfer::Refused(self.status_error(
                    s,
                    resp.headers(),
                    what,
                    url,
                )));
            }
        };
        if start > 0 {
            if append {
                tracing::info!(bytes = start, "resuming a partial download");
            } else {
                tracing::info!("the hub ignored the range; downloading from the start");
            }
        }
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(partial)
            .await
            .map_err(|e| Transfer::Fatal(format!("cannot write {}: {e}", partial.display())))?;
        let mut done = if append { start } else { 0 };
        let t0 = Instant::now();
        let from = done;
        let mut last_log = Instant::now();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Transfer::Retry(with_causes(&e)))?;
            out.write_all(&chunk)
                .await
                .map_err(|e| Transfer::Fatal(format!("cannot write {}: {e}", partial.display())))?;
            done += chunk.len() as u64;
            if last_log.elapsed() >= PROGRESS_EVERY {
                last_log = Instant::now();
                log_progress(what, done, from, size, t0);
            }
        }
        out.flush()
            .await
            .map_err(|e| Transfer::Fatal(format!("cannot write {}: {e}", partial.display())))?;
        out.sync_all()
            .await
            .map_err(|e| Transfer::Fatal(format!("cannot write {}: {e}", partial.display())))?;
        log_progress(what, done, from, size, t0);
        if size.is_some_and(|s| done < s) {
            return Err(Transfer::Retry(format!(
                "the connection closed after {done} bytes"
            )));
        }
        Ok(())
    }
}

/// The local path of a model source, for `serve`: a local path as given (it must exist); a hub
/// model's snapshot in the cache (or its named file), fetching what is missing unless offline,
/// and falling back to the cached copy when the hub fails.
pub async fn local_path(source: &ModelSource, hub: &HubConfig) -> Result<PathBuf> {
    match source {
        ModelSource::Local(path) => {
            if !path.exists() {
                return Err(Error::Model(format!("{} does not exist", path.display())));
            }
            Ok(path.clone())
        }
        ModelSource::Hub(model) => match HubClient::new(hub.clone())?.download(model).await {
            Ok(path) => Ok(path),
            // As huggingface_hub does: a hub that cannot be reached (or refuses) does not stop
            // a server whose model is already cached.
            Err(e) if !hub.offline => match resolve_cached(&hub.cache_dir, model) {
                Ok(path) => {
                    tracing::warn!(error = %e, path = %path.display(), "the hub failed; serving the cached copy");
                    Ok(path)
                }
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        },
    }
}

/// `kandle-runtime download`: fetches a hub model into the cache (or `--to` a directory) and
/// returns where it is. A local source has nothing to fetch: it is checked, or copied with
/// `--to`.
pub async fn download(config: &DownloadConfig) -> Result<PathBuf> {
    let source = ModelSource::parse(&config.model, config.file.as_deref()).map_err(Error::Model)?;
    let hub = config.hub.hub_config();
    match (&source, &config.to) {
        (ModelSource::Hub(model), Some(dir)) => HubClient::new(hub)?.download_to(model, dir).await,
        (ModelSource::Local(_), Some(dir)) => {
            let path = local_path(&source, &hub).await?;
            copy_tree(
                &path,
                &dir.join(path.file_name().unwrap_or(path.as_os_str())),
            )?;
            Ok(dir.join(path.file_name().unwrap_or(path.as_os_str())))
        }
        // Strict: unlike `serve`, a download that fails is a failure even if a copy is cached.
        (ModelSource::Hub(model), None) => HubClient::new(hub)?.download(model).await,
        (ModelSource::Local(_), None) => local_path(&source, &hub).await,
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let entry = entry.map_err(|e| Error::io(from, e))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| Error::io(from, e))
    }
}

/// How one transfer attempt failed.
enum Transfer {
    /// Worth another attempt (network, 5xx, 429); the partial file is kept.
    Retry(String),
    /// A local failure (disk); retrying would not help.
    Fatal(String),
    /// The hub refused (401, 404, ...).
    Refused(Error),
}

fn log_progress(what: &str, done: u64, from: u64, size: Option<u64>, t0: Instant) {
    const MIB: f64 = 1024.0 * 1024.0;
    let tenths = |x: f64| (x * 10.0).round() / 10.0;
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    let mib_per_s = tenths((done - from) as f64 / MIB / secs);
    let mib = tenths(done as f64 / MIB);
    match size {
        Some(total) if total > 0 => tracing::info!(
            mib,
            total_mib = tenths(total as f64 / MIB),
            percent = done * 100 / total,
            mib_per_s,
            "{what}"
        ),
        _ => tracing::info!(mib, mib_per_s, "{what}"),
    }
}

/// An error and its sources ("error sending request: ... : Connection refused"): reqwest's own
/// message alone does not say what failed.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

/// Percent-encodes a repo file path for a URL, keeping its `/` separators.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `"abc"`, `W/"abc"` → `abc`.
fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_owned()
}

/// `bytes 100-199/200` → 100.
fn content_range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?.split('-').next()?.parse().ok()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Points `link` (in a snapshot) at `blob` with a relative symlink, as huggingface_hub does, so
/// that the cache stays valid when mounted elsewhere.
fn link_blob(link: &Path, blob: &Path) -> Result<()> {
    let parent = link
        .parent()
        .ok_or_else(|| Error::Hub(format!("bad snapshot path {}", link.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let target = relative_to(blob, parent);
    if let Ok(existing) = std::fs::read_link(link) {
        if existing == target {
            return Ok(());
        }
        std::fs::remove_file(link).map_err(|e| Error::io(link, e))?;
    } else if link.exists() {
        std::fs::remove_file(link).map_err(|e| Error::io(link, e))?;
    }
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(&target, link);
    #[cfg(not(unix))]
    let linked = std::fs::copy(blob, link).map(|_| ());
    linked.map_err(|e| Error::io(link, e))
}

/// `path` relative to `base`, both under a common root (`../../blobs/x` from a snapshot dir).
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<_> = path.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_directory_model_takes_configs_tokenizer_weights_and_pooling() {
        let repo = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            "model.safetensors",
            "pytorch_model.bin",
            "onnx/model.onnx",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "2_Dense/config.json",
        ]);
        let got = select_files(&repo, None).unwrap();
        assert_eq!(
            got,
            names(&[
                "1_Pooling/config.json",
                "config.json",
                "model.safetensors",
                "modules.json",
                "sentence_bert_config.json",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json",
            ])
        );
    }

    #[test]
    fn sharded_weights_come_with_their_index() {
        let repo = names(&[
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "generation_config.json",
        ]);
        assert_eq!(select_files(&repo, None).unwrap().len(), 5);
    }

    #[test]
    fn a_gguf_file_comes_with_the_tokenizer_files_beside_it() {
        let repo = names(&[
            "config.json",
            "a.Q4_1.gguf",
            "b.Q8_0.gguf",
            "tokenizer.json",
            "sub/c.gguf",
            "sub/tokenizer_config.json",
        ]);
        assert_eq!(
            select_files(&repo, Some("a.Q4_1.gguf")).unwrap(),
            names(&["a.Q4_1.gguf", "tokenizer.json"])
        );
        assert_eq!(
            select_files(&repo, Some("sub/c.gguf")).unwrap(),
            names(&["sub/c.gguf", "sub/tokenizer_config.json"])
        );
        let err = select_files(&repo, Some("missing.gguf")).unwrap_err();
        assert!(
            err.contains("missing.gguf") && err.contains("a.Q4_1.gguf"),
            "{err}"
        );
    }

    #[test]
    fn a_repo_of_ggufs_without_a_file_asks_for_one() {
        let err = select_files(&names(&["a.gguf", "b.gguf"]), None).unwrap_err();
        assert!(err.contains("--file") && err.contains("a.gguf"), "{err}");
        let m = HubModel {
            repo: "org/r".into(),
            revision: "main".into(),
            file: None,
            quant: None,
        };
        let err = resolve_file(&names(&["a.gguf", "b.gguf"]), &m).unwrap_err();
        assert!(
            err.contains("--file") && err.contains("a.gguf") && err.contains("Q4_K_M"),
            "{err}"
        );
        let err = select_files(&names(&["config.json", "pytorch_model.bin"]), None).unwrap_err();
        assert!(err.contains("safetensors"), "{err}");
    }

    #[test]
    fn a_quantisation_tag_or_the_default_picks_one_gguf() {
        let repo = names(&[
            "README.md",
            "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
            "Llama-3.2-1B-Instruct-Q4_K_S.gguf",
            "Llama-3.2-1B-Instruct-Q8_0.gguf",
            "Llama-3.2-1B-Instruct-IQ4_XS.gguf",
            "split/Big-Q4_K-00001-of-00002.gguf",
        ]);
        let model = |quant: Option<&str>, file: Option<&str>| HubModel {
            repo: "org/r".into(),
            revision: "main".into(),
            file: file.map(Into::into),
            quant: quant.map(Into::into),
        };
        let pick = |q: Option<&str>| resolve_file(&repo, &model(q, None));
        assert_eq!(
            pick(None).unwrap().as_deref(),
            Some("Llama-3.2-1B-Instruct-Q4_K_M.gguf")
        );
        assert_eq!(
            pick(Some("q8_0")).unwrap().as_deref(),
            Some("Llama-3.2-1B-Instruct-Q8_0.gguf")
        );
        assert_eq!(
            pick(Some("IQ4_XS")).unwrap().as_deref(),
            Some("Llama-3.2-1B-Instruct-IQ4_XS.gguf")
        );
        // A tag is the end of the name: Q4_K is neither Q4_K_M nor a split file's part.
        let err = pick(Some("Q4_K")).unwrap_err();
        assert!(
            err.contains("\"Q4_K\"") && err.contains("Q4_K_S.gguf"),
            "{err}"
        );
        // A named file wins; a directory model has none.
        assert_eq!(
            resolve_file(&repo, &model(None, Some("x.gguf")))
                .unwrap()
                .as_deref(),
            Some("x.gguf")
        );
        let dir = names(&["config.json", "model.safetensors", "model-Q4_K_M.gguf"]);
        assert_eq!(resolve_file(&dir, &model(None, None)).unwrap(), None);
        assert_eq!(
            resolve_file(&dir, &model(Some("Q4_K_M"), None))
                .unwrap()
                .as_deref(),
            Some("model-Q4_K_M.gguf")
        );
        let two = names(&["a/m-Q4_K_M.gguf", "b/m.Q4_K_M.gguf"]);
        let err = resolve_file(&two, &model(None, None)).unwrap_err();
        assert!(
            err.contains("2 GGUF files") && err.contains("--file"),
            "{err}"
        );
        let err = resolve_file(&names(&["config.json"]), &model(Some("Q4_K_M"), None)).unwrap_err();
        assert!(err.contains("no GGUF files"), "{err}");
    }

    #[test]
    fn file_paths_are_percent_encoded_except_their_slashes() {
        assert_eq!(
            encode_path("1_Pooling/config.json"),
            "1_Pooling/config.json"
        );
        assert_eq!(encode_path("a b/c#d?.gguf"), "a%20b/c%23d%3F.gguf");
    }

    #[test]
    fn etags_and_ranges_parse_as_the_hub_sends_them() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn snapshot_links_are_relative_to_the_blobs() {
        let root = Path::new("/c/models--o--r");
        assert_eq!(
            relative_to(&root.join("blobs/e"), &root.join("snapshots/abc")),
            PathBuf::from("../../blobs/e")
        );
        assert_eq!(
            relative_to(&root.join("blobs/e"), &root.join("snapshots/abc/1_Pooling")),
            PathBuf::from("../../../blobs/e")
        );
    }

    #[test]
    fn the_cache_folder_follows_huggingface_hub() {
        assert_eq!(repo_folder("org/name"), "models--org--name");
        assert_eq!(repo_folder("gpt2"), "models--gpt2");
    }

    #[test]
    fn an_uncached_model_is_refused_offline_with_the_command_that_fills_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let m = HubModel {
            repo: "org/r".into(),
            revision: "main".into(),
            file: None,
            quant: None,
        };
        let err = resolve_cached(dir.path(), &m).unwrap_err().to_string();
        assert!(
            err.contains("kandle-runtime download --model hf://org/r@main"),
            "{err}"
        );
    }

    #[test]
    fn a_cached_snapshot_is_found_by_branch_or_commit() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "a".repeat(40);
        let root = dir.path().join("models--org--r");
        write_file(&root.join("blobs/e1"), b"{}").unwrap();
        link_blob(
            &root.join(format!("snapshots/{sha}/config.json")),
            &root.join("blobs/e1"),
        )
        .unwrap();
        write_file(&root.join("refs/main"), sha.as_bytes()).unwrap();
        let m = |rev: &str, file: Option<&str>| HubModel {
            repo: "org/r".into(),
            revision: rev.into(),
            file: file.map(Into::into),
            quant: None,
        };
        let snap = root.join("snapshots").join(&sha);
        assert_eq!(resolve_cached(dir.path(), &m("main", None)).unwrap(), snap);
        assert_eq!(resolve_cached(dir.path(), &m(&sha, None)).unwrap(), snap);
        assert_eq!(
            std::fs::read(resolve_cached(dir.path(), &m(&sha, Some("config.json"))).unwrap())
                .unwrap(),
            b"{}"
        );
        assert!(resolve_cached(dir.path(), &m(&sha, Some("x.gguf"))).is_err());
        assert!(resolve_cached(dir.path(), &m("dev", None)).is_err());
    }

    #[test]
    fn the_token_is_redacted_from_messages_and_debug_output() {
        let config = HubConfig {
            endpoint: DEFAULT_ENDPOINT.into(),
            token: Some("hf_secret123".into()),
            cache_dir: "/c".into(),
            offline: false,
        };
        assert!(!format!("{config:?}").contains("hf_secret123"));
        let c = HubClient::new(config).unwrap();
        assert_eq!(c.redact("bad hf_secret123!".into()), "bad <redacted>!");
    }
}
