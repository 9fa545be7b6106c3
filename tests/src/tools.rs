//! The external binaries the tests drive: kube-apiserver, etcd, kubectl and helm.
//!
//! They come from `tests/setup-k8s.sh`, which builds them once from the Go modules pinned in
//! `tests/k8s-tools` and `tests/helm-tool` into the cache (or takes kube-apiserver, etcd and
//! kubectl from `KUBEBUILDER_ASSETS`, the envtest convention). The first test that needs them
//! runs the script, which is a no-op when the cache is warm, so `cargo test` alone works.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The Kubernetes release the control plane runs (and k8s-openapi's feature targets).
pub const K8S_VERSION: &str = "v1.35.4";
/// The helm release the chart tests use.
pub const HELM_VERSION: &str = "v3.20.2";

/// Where each tool lives.
#[derive(Debug, Clone)]
pub struct Tools {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl Tools {
    /// The tools, built or located once per process. Panics with the setup script's output
    /// when they cannot be had.
    pub fn get() -> &'static Tools {
        static TOOLS: OnceLock<Tools> = OnceLock::new();
        TOOLS.get_or_init(|| Tools::locate().unwrap_or_else(|e| panic!("{e:#}")))
    }

    /// Runs `tests/setup-k8s.sh` (idempotent) and reads the paths it settled on.
    pub fn locate() -> Result<Tools> {
        let script = crate::repo_root().join("tests").join("setup-k8s.sh");
        let output = Command::new("bash")
            .arg(&script)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!(
                "{} failed ({}); it builds the control-plane binaries the tests need.\n{stderr}",
                script.display(),
                output.status
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value = |key: &str| -> Result<PathBuf> {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key).map(PathBuf::from))
                .with_context(|| format!("{} printed no {key} line:\n{stdout}\n{stderr}", script.display()))
        };
        let bin = value("KANDLE_K8S_BIN=")?;
        let tools = Tools {
            kube_apiserver: bin.join("kube-apiserver"),
            etcd: bin.join("etcd"),
            kubectl: bin.join("kubectl"),
            helm: value("KANDLE_HELM=")?,
        };
        for path in [&tools.kube_apiserver, &tools.etcd, &tools.kubectl, &tools.helm] {
            check_executable(path)?;
        }
        Ok(tools)
    }
}

fn check_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{} is missing", path.display()))?;
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{} is not executable", path.display());
    }
    Ok(())
}
