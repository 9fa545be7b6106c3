//! `kandle-runtime download` and `serve --model hf://...`, through the real binary against the
//! local fake hub, with real weights (SmolLM2 GGUF, all-MiniLM-L6-v2):
//! - a private GGUF repo and a directory repo download into the hub cache and are served
//!   offline (`HF_HUB_OFFLINE=1`, unreachable endpoint) from it;
//! - the contract with the operator: the init and serve containers' arguments of a Deployment
//!   built by `kandle_operator::builders`, run verbatim, bring the server to `/ready`;
//! - failures say what went wrong (wrong token — without printing it —, unknown repo or
//!   revision, offline with an empty cache); a partial download is resumed with `Range`, and a
//!   corrupt one is caught by its sha256.
//!
//! The binary is `target/<profile>/kandle-runtime` (`cargo build -p kandle-runtime`).

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use kandle_tests::fake_hub::FakeHub;
use kandle_tests::models;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_kandleTestSecret0123456789";
const API_KEY: &str = "sk-kandle-contract-test";
const SMOL_REPO: &str = "kandle-test/SmolLM2-135M-Instruct-GGUF";
const SMOL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MINILM_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// The binary with a clean hub environment: nothing from the developer's shell leaks in.
fn runtime() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(kandle_tests::workspace_binary("kandle-runtime"));
    for var in [
        "HF_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_HOME",
        "KANDLE_MODEL",
        "KANDLE_FILE",
        "KANDLE_CACHE_DIR",
        "KANDLE_PORT",
        "KANDLE_TASK",
    ] {
        c.env_remove(var);
    }
    c.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    c
}

async fn output(mut c: tokio::process::Command) -> (Output, String) {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(300), c.output())
        .await
        .expect("kandle-runtime finished within 5 minutes")
        .expect("kandle-runtime runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Runs `download` against `hub` with `token` into `cache`; returns (success, all output).
async fn download(
    hub: &FakeHub,
    token: Option<&str>,
    cache: &Path,
    model: &str,
    file: Option<&str>,
) -> (bool, String) {
    let mut c = runtime();
    c.args(["download", "--model", model, "--cache-dir"])
        .arg(cache)
        .env("HF_ENDPOINT", hub.url());
    if let Some(f) = file {
        c.args(["--file", f]);
    }
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    let (out, text) = output(c).await;
    (out.status.success(), text)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A started `serve` process, killed when dropped.
struct Served {
    /// Killed on drop (`kill_on_drop`).
    _child: tokio::process::Child,
    url: String,
}

/// Waits for `/ready`; fails with the server's output if it exits or takes over 3 minutes.
async fn wait_ready(mut child: tokio::process::Child, port: u16) -> Served {
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client().get(format!("{url}/ready")).send().await
            && r.status() == 200
        {
            return Served { _child: child, url };
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "the server exited with {status} before it was ready:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "not ready after 3 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves `model` from `cache` offline: HF_HUB_OFFLINE=1 and a hub endpoint nothing listens on.
async fn serve_offline(
    cache: &Path,
    model: &str,
    file: Option<&str>,
    name: Option<&str>,
) -> Served {
    serve_from_cache(cache, model, file, name, true).await
}

/// Serves `model` from `cache` with a hub endpoint nothing listens on, offline or not, under
/// `name` (`None`: the name the server gives it).
async fn serve_from_cache(
    cache: &Path,
    model: &str,
    file: Option<&str>,
    name: Option<&str>,
    offline: bool,
) -> Served {
    let port = free_port();
    let mut c = runtime();
    c.args(["serve", "--model", model, "--cache-dir"])
        .arg(cache)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--threads",
            "2",
        ])
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(n) = name {
        c.args(["--served-model-name", n]);
    }
    if let Some(f) = file {
        c.args(["--file", f]);
    }
    wait_ready(c.spawn().unwrap(), port).await
}

/// The served models' list (`GET /v1/models`).
async fn models_of(served: &Served) -> Value {
    let r = client()
        .get(format!("{}/v1/models", served.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn sha256_of(path: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut h).unwrap();
    hex::encode(h.finalize())
}

fn smol_hub(hub: &FakeHub) -> (String, Vec<u8>) {
    let gguf = std::fs::read(models::smollm2_gguf()).unwrap();
    let sha = hub.add_repo(
        SMOL_REPO,
        [
            (SMOL_FILE, gguf.clone()),
            ("README.md", b"# SmolLM2 GGUF\n".to_vec()),
            (
                "SmolLM2-135M-Instruct.Q8_0.gguf",
                b"another quantisation, not asked for".to_vec(),
            ),
        ],
    );
    hub.require_token(SMOL_REPO, TOKEN);
    (sha, gguf)
}

fn minilm_hub(hub: &FakeHub) -> String {
    hub.add_dir(MINILM_REPO, &models::minilm_dir()).unwrap();
    // Files a directory download must leave alone.
    let sha = hub.commit(
        MINILM_REPO,
        "main",
        [
            ("pytorch_model.bin", b"pickled weights".to_vec()),
            ("onnx/model.onnx", b"onnx".to_vec()),
        ],
    );
    hub.require_token(MINILM_REPO, TOKEN);
    sha
}

fn resolve_paths(hub: &FakeHub) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter(|r| r.path.contains("/resolve/"))
        .map(|r| r.path)
        .collect()
}

/// A repo of GGUF files named with a quantisation tag (`hf://org/repo:Q4_1`, llama.cpp's
/// and Ollama's form) downloads that file alone, serves it offline from the cache by the
/// same tag under the name `repo:tag`, and a tag no file has (here the default, Q4_K_M, when
/// none is named) fails naming the files there are.
#[tokio::test]
async fn a_quantisation_tag_picks_the_gguf_file_online_and_offline() {
    let hub = FakeHub::start().unwrap();
    tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    let (_, gguf) = smol_hub(&hub);
    let cache = tempfile::tempdir().unwrap();
    let model = format!("hf://{SMOL_REPO}:q4_1");
    let (ok, log) = download(&hub, Some(TOKEN), cache.path(), &model, None).await;
    assert!(ok, "download failed:\n{log}");
    let fetched = resolve_paths(&hub);
    assert!(
        !fetched.is_empty() && fetched.iter().all(|p| p.ends_with(SMOL_FILE)),
        "only the Q4_1 file was fetched: {fetched:?}"
    );
    let file = log
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with(SMOL_FILE))
        .unwrap_or_else(|| panic!("stdout names the file:\n{log}"));
    assert_eq!(sha256_of(Path::new(file)), hex::encode(Sha256::digest(&gguf)));

    let served = serve_offline(cache.path(), &model, None, None).await;
    let models = models_of(&served).await;
    assert_eq!(
        models["data"][0]["id"], "SmolLM2-135M-Instruct-GGUF:q4_1",
        "{models}"
    );
    drop(served);

    let (ok, log) = download(
        &hub,
        Some(TOKEN),
        cache.path(),
        &format!("hf://{SMOL_REPO}"),
        None,
    )
    .await;
    assert!(!ok, "no Q4_K_M file, yet the download succeeded:\n{log}");
    assert!(
        log.contains("Q4_K_M") && log.contains(SMOL_FILE) && log.contains("--file"),
        "{log}"
    );
}

#[tokio::test]
async fn a_private_gguf_and_a_model_directory_download_and_then_serve_offline_from_the_cache() {
    let hub = FakeHub::start().unwrap();
    // Fetching the test models may take a while the first time; not on the async workers.
    tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    let (smol_sha, gguf) = smol_hub(&hub);
    tokio::task::spawn_blocking(models::minilm_dir)
        .await
        .unwrap();
    let minilm_sha = minilm_hub(&hub);
    let cache = tempfile::tempdir().unwrap();

    // The GGUF: the one file asked for, pinned to a commit as the operator pins it.
    let model = format!("hf://{SMOL_REPO}@{smol_sha}");
    let (ok, log) = download(&hub, Some(TOKEN), cache.path(), &model, Some(SMOL_FILE)).await;
    assert!(ok, "download failed:\n{log}");
    assert!(!log.contains(TOKEN), "the token was printed:\n{log}");
    assert!(log.contains("percent=100"), "progress is logged:\n{log}");
    let snapshot = cache
        .path()
        .join("models--kandle-test--SmolLM2-135M-Instruct-GGUF/snapshots")
        .join(&smol_sha);
    let file = snapshot.join(SMOL_FILE);
    assert!(
        file.is_symlink(),
        "{} is a link into blobs/",
        file.display()
    );
    assert_eq!(sha256_of(&file), hex::encode(Sha256::digest(&gguf)));
    assert!(
        log.lines().any(|l| l.trim() == file.display().to_string()),
        "stdout names the file:\n{log}"
    );
    let fetched = resolve_paths(&hub);
    assert!(
        fetched.iter().all(|p| p.ends_with(SMOL_FILE)),
        "only the GGUF was fetched: {fetched:?}"
    );
    assert!(
        hub.requests().iter().all(|r| r.authorized),
        "every request carried the token"
    );

    // A second download finds everything cached and transfers nothing.
    let before = hub
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/resolve/"))
        .count();
    let (ok, log) = download(&hub, Some(TOKEN), cache.path(), &model, Some(SMOL_FILE)).await;
    assert!(ok, "{log}");
    let after = hub
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/resolve/"))
        .count();
    assert_eq!(before, after, "nothing downloaded twice:\n{log}");

    // The directory, by branch: configs, tokenizer, safetensors and pooling; no pickles, no onnx.
    let model_dir = format!("hf://{MINILM_REPO}@main");
    let (ok, log) = download(&hub, Some(TOKEN), cache.path(), &model_dir, None).await;
    assert!(ok, "download failed:\n{log}");
    let repo = cache
        .path()
        .join("models--sentence-transformers--all-MiniLM-L6-v2");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        minilm_sha
    );
    let snap = repo.join("snapshots").join(&minilm_sha);
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        assert!(snap.join(f).is_file(), "{f} downloaded");
    }
    for f in ["pytorch_model.bin", "onnx/model.onnx"] {
        assert!(!snap.join(f).exists(), "{f} must not be downloaded");
    }
    assert_eq!(
        sha256_of(&snap.join("model.safetensors")),
        sha256_of(&models::minilm_dir().join("model.safetensors"))
    );

    // Offline: the hub sees no request at all, and both models answer.
    let requests = hub.requests().len();
    let smol = serve_offline(cache.path(), &model, Some(SMOL_FILE), Some("smol")).await;
    let resp: Value = client()
        .post(format!("{}/v1/completions", smol.url))
        .json(&json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["usage"]["completion_tokens"], 3, "{resp}");
    assert!(
        !resp["choices"][0]["text"].as_str().unwrap().is_empty(),
        "{resp}"
    );
    drop(smol);

    let minilm = serve_offline(cache.path(), &model_dir, None, Some("minilm")).await;
    let resp: Value = client()
        .post(format!("{}/v1/embeddings", minilm.url))
        .json(&json!({"model": "minilm", "input": "kandle serves models"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let v: Vec<f64> = resp["data"][0]["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("{resp}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 384);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-3,
        "normalised as the sentence-transformers config says: {norm}"
    );
    drop(minilm);
    assert_eq!(
        hub.requests().len(),
        requests,
        "serving offline touched the hub"
    );

    // Online, with the hub unreachable: the cached copy is served (as huggingface_hub does).
    let fallback = serve_from_cache(cache.path(), &model_dir, None, Some("minilm"), false).await;
    models_of(&fallback).await;
}

#[tokio::test]
async fn the_operators_init_and_serve_containers_run_verbatim_and_reach_ready() {
    use k8s_openapi::api::core::v1::Container;
    use kandle_operator::LanguageModel;
    use kandle_operator::builders::{BuilderConfig, CACHE_DIR, Resolution, deployment};

    let hub = FakeHub::start().unwrap();
    tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    let (sha, _) = smol_hub(&hub);
    let lm: LanguageModel = serde_json::from_value(json!({
        "apiVersion": "kandle.dev/v1alpha1",
        "kind": "LanguageModel",
        "metadata": {"name": "smollm", "namespace": "models", "uid": "0b5e5c8e-1b1e-4c59-9d3e-6d7a3f0e2a11"},
        "spec": {
            "model": {
                "huggingFace": {
                    "repo": SMOL_REPO,
                    "revision": "main",
                    "file": SMOL_FILE,
                    "tokenSecretRef": {"name": "hf", "key": "token"}
                },
                "task": "TextGeneration",
                "architecture": "llama",
                "dtype": "auto"
            },
            "runtime": {"maxBatchSize": 2, "maxSequenceLength": 1024, "maxConcurrentRequests": 4, "maxNewTokens": 16},
            "serving": {"apiKeySecretRef": {"name": "api", "key": "key"}}
        }
    }))
    .unwrap();
    let config = BuilderConfig {
        hub_endpoint: Some(hub.url()),
        ..BuilderConfig::default()
    };
    // The controller resolves `main` to its commit before building; this is that resolution.
    let d = deployment(
        &lm,
        &config,
        &Resolution {
            revision: Some(sha.clone()),
            model_bytes: None,
        },
    )
    .unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let init = &pod.init_containers.as_ref().expect("an init container")[0];
    let serve = &pod.containers[0];

    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    // The kubelet's part: the cache volume at a temp dir, a free port, the Secret's value.
    let args = |c: &Container| -> Vec<String> {
        let mut args = c.args.clone().unwrap();
        for i in 0..args.len() {
            if args[i] == CACHE_DIR {
                args[i] = cache.path().display().to_string();
            }
            if i > 0 && args[i - 1] == "--port" {
                args[i] = port.to_string();
            }
        }
        args
    };
    let command = |c: &Container| {
        assert_eq!(
            c.command.as_deref(),
            Some(&["kandle-runtime".to_owned()][..])
        );
        let mut cmd = runtime();
        cmd.args(args(c));
        let env = kandle_tests::kubelet_env(c.env.as_deref().unwrap_or_default(), |name, from| {
            let secret = from.secret_key_ref.as_ref().expect("only Secret refs");
            match (name, secret.name.as_str()) {
                ("HF_TOKEN", "hf") => TOKEN.to_owned(),
                ("KANDLE_API_KEY", "api") => API_KEY.to_owned(),
                other => panic!("unexpected secret env {other:?}"),
            }
        });
        cmd.envs(env);
        cmd
    };

    let init_args = args(init);
    assert_eq!(
        init_args[..3],
        ["download", "--model", &format!("hf://{SMOL_REPO}@{sha}")]
    );
    let (out, log) = output(command(init)).await;
    assert!(
        out.status.success(),
        "the init container failed: {init_args:?}\n{log}"
    );
    assert!(!log.contains(TOKEN));

    let serve_args = args(serve);
    for flag in [
        "--cache-dir",
        "--file",
        "--task",
        "--architecture",
        "--max-sequence-length",
        "--max-concurrent-requests",
    ] {
        assert!(
            serve_args.iter().any(|a| a == flag),
            "the operator emits {flag}: {serve_args:?}"
        );
    }
    let mut cmd = command(serve);
    assert!(
        serve
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "HF_HUB_OFFLINE"),
        "serve runs offline"
    );
    cmd.env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let requests = hub.requests().len();
    let served = wait_ready(cmd.spawn().unwrap(), port).await;
    // serving.apiKeySecretRef reaches the server as KANDLE_API_KEY.
    let anonymous = client()
        .get(format!("{}/v1/models", served.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let models: Value = client()
        .get(format!("{}/v1/models", served.url))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm", "{models}");
    // maxSequenceLength (1024) caps the model's own context (8192 for SmolLM2).
    let resp = client()
        .post(format!("{}/v1/completions", served.url))
        .bearer_auth(API_KEY)
        .json(&json!({"model": "smollm", "prompt": "hello ".repeat(1100), "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("1024"),
        "{body}"
    );
    drop(served);
    assert_eq!(
        hub.requests().len(),
        requests,
        "the serve container touched the hub"
    );
}

#[tokio::test]
async fn a_wrong_or_missing_token_fails_clearly_without_printing_the_token() {
    let hub = FakeHub::start().unwrap();
    hub.add_repo(
        "org/private",
        [
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", b"x".to_vec()),
        ],
    );
    hub.require_token("org/private", TOKEN);
    let cache = tempfile::tempdir().unwrap();
    let wrong = "hf_wrongTokenThatMustNotLeak42";
    let (ok, log) = download(
        &hub,
        Some(wrong),
        cache.path(),
        "hf://org/private@main",
        None,
    )
    .await;
    assert!(!ok, "{log}");
    assert!(log.contains("refused the token in HF_TOKEN"), "{log}");
    assert!(log.contains("org/private"), "{log}");
    assert!(!log.contains(wrong), "the token leaked:\n{log}");

    let (ok, log) = download(&hub, None, cache.path(), "hf://org/private@main", None).await;
    assert!(!ok);
    assert!(
        log.contains("needs a token") && log.contains("HF_TOKEN"),
        "{log}"
    );
}

#[tokio::test]
async fn an_unknown_repo_or_revision_is_named_in_the_error() {
    let hub = FakeHub::start().unwrap();
    hub.add_repo(
        "org/model",
        [
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", b"x".to_vec()),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let (ok, log) = download(&hub, None, cache.path(), "hf://org/nothing@main", None).await;
    assert!(!ok);
    assert!(log.contains("repository org/nothing not found"), "{log}");
    let (ok, log) = download(&hub, None, cache.path(), "hf://org/model@v9", None).await;
    assert!(!ok);
    assert!(
        log.contains("revision does not exist in org/model") && log.contains("v9"),
        "{log}"
    );
    let (ok, log) = download(
        &hub,
        None,
        cache.path(),
        "hf://org/model@main",
        Some("model.gguf"),
    )
    .await;
    assert!(!ok);
    assert!(log.contains("no file \"model.gguf\""), "{log}");
    let (ok, log) = download(
        &hub,
        None,
        cache.path(),
        "hf://org/model@main/../../etc",
        None,
    )
    .await;
    assert!(!ok);
    assert!(log.contains("invalid"), "{log}");
}

#[tokio::test]
async fn offline_with_an_empty_cache_fails_and_says_how_to_fill_it() {
    let cache = tempfile::tempdir().unwrap();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let model = format!("hf://org/model@{sha}");
    let mut c = runtime();
    c.args(["serve", "--model", &model, "--cache-dir"])
        .arg(cache.path())
        .args(["--port", "0", "--host", "127.0.0.1"])
        .env("HF_HUB_OFFLINE", "1");
    let (out, log) = output(c).await;
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("is not in the model cache"), "{log}");
    assert!(
        log.contains(&format!("kandle-runtime download --model {model}")),
        "{log}"
    );

    let mut c = runtime();
    c.args(["download", "--model", &model, "--cache-dir"])
        .arg(cache.path())
        .env("HF_HUB_OFFLINE", "1");
    let (out, log) = output(c).await;
    assert!(!out.status.success());
    assert!(log.contains("is not in the model cache"), "{log}");
}

#[tokio::test]
async fn a_partial_download_is_resumed_and_a_corrupt_one_is_caught_by_its_sha256() {
    let hub = FakeHub::start().unwrap();
    let weights: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = hex::encode(Sha256::digest(&weights));
    hub.add_repo(
        "org/big",
        [
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", weights.clone()),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("models--org--big/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // What an interrupted run leaves: the first part of the blob, under its ETag (the sha256).
    let partial = blobs.join(format!("{digest}.incomplete"));
    std::fs::write(&partial, &weights[..1_000_000]).unwrap();

    let (ok, log) = download(&hub, None, cache.path(), "hf://org/big@main", None).await;
    assert!(ok, "{log}");
    let gets: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("model.safetensors"))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some("bytes=1000000-"),
        "resumed where it stopped"
    );
    assert!(!partial.exists());
    assert_eq!(sha256_of(&blobs.join(&digest)), digest);
    let snapshot =
        std::fs::read_to_string(cache.path().join("models--org--big/refs/main")).unwrap();
    assert_eq!(
        sha256_of(
            &cache
                .path()
                .join("models--org--big/snapshots")
                .join(snapshot)
                .join("model.safetensors")
        ),
        digest
    );

    // A partial file with wrong bytes: the finished file does not match, is removed, and is
    // never linked into the snapshot; the next run starts over and succeeds.
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("models--org--big/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        blobs.join(format!("{digest}.incomplete")),
        vec![0u8; 1_000_000],
    )
    .unwrap();
    let (ok, log) = download(&hub, None, cache.path(), "hf://org/big@main", None).await;
    assert!(!ok, "{log}");
    assert!(log.contains("sha256") && log.contains("removed"), "{log}");
    assert!(!blobs.join(&digest).exists() && !blobs.join(format!("{digest}.incomplete")).exists());
    let (ok, log) = download(&hub, None, cache.path(), "hf://org/big@main", None).await;
    assert!(ok, "{log}");
    assert_eq!(sha256_of(&blobs.join(&digest)), digest);
}

#[tokio::test]
async fn serve_refuses_what_it_cannot_do_at_load_with_a_clear_message() {
    let gguf = tokio::task::spawn_blocking(models::smollm2_gguf)
        .await
        .unwrap();
    let minilm = tokio::task::spawn_blocking(models::minilm_dir)
        .await
        .unwrap();
    // (A GGUF keeps its own quantisation whatever --dtype says; f16 is refused for encoders,
    // which compute in f32, or with bf16 products for the sentence embedders.)
    let cases: [(&std::path::Path, &[&str], &str); 4] = [
        (
            &gguf,
            &["--architecture", "bert"],
            "--architecture \"bert\" does not match the model",
        ),
        (&minilm, &["--dtype", "f16"], "is not supported for bert models"),
        (
            &gguf,
            &["--task", "Classification"],
            "--task Classification was asked for",
        ),
        (&gguf, &["--task", "Text2Text"], "--task Text2Text was asked for"),
    ];
    for (model, flags, expected) in cases {
        let mut c = runtime();
        c.arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(flags);
        let (out, log) = output(c).await;
        assert!(!out.status.success(), "{flags:?} was accepted:\n{log}");
        assert!(log.contains(expected), "{flags:?}:\n{log}");
    }
}

#[tokio::test]
async fn download_to_a_plain_directory_writes_the_files_at_their_repo_paths() {
    let hub = FakeHub::start().unwrap();
    hub.add_repo(
        "org/embedder",
        [
            ("config.json", b"{\"model_type\": \"bert\"}".to_vec()),
            ("model.safetensors", b"weights".to_vec()),
            (
                "1_Pooling/config.json",
                b"{\"pooling_mode_mean_tokens\": true}".to_vec(),
            ),
            ("flax_model.msgpack", b"not needed".to_vec()),
        ],
    );
    let to = tempfile::tempdir().unwrap();
    let mut c = runtime();
    c.args(["download", "--model", "hf://org/embedder@main", "--to"])
        .arg(to.path())
        .env("HF_ENDPOINT", hub.url());
    let (out, log) = output(c).await;
    assert!(out.status.success(), "{log}");
    assert_eq!(
        std::fs::read(to.path().join("model.safetensors")).unwrap(),
        b"weights"
    );
    assert!(to.path().join("1_Pooling/config.json").is_file());
    assert!(!to.path().join("flax_model.msgpack").exists());
    assert!(
        !to.path().join("model.safetensors").is_symlink(),
        "plain files, no cache layout"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        to.path().display().to_string()
    );
}
