//! Runs the test harness's control plane (etcd + kube-apiserver on loopback) for people: try
//! kubectl, helm and the operator against it without a real cluster. Stops and cleans up on
//! Ctrl-C or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kandle_tests::control_plane::ControlPlane;
use kandle_tests::tools::Tools;

/// A local Kubernetes API server (no nodes: pods are never scheduled) for trying kandle.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Also copy the admin kubeconfig here (it is removed again on exit).
    #[arg(long, env = "KANDLE_DEV_KUBECONFIG")]
    kubeconfig_out: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let cp = tokio::task::spawn_blocking(ControlPlane::start).await??;
    let kubeconfig = match &cli.kubeconfig_out {
        Some(path) => {
            std::fs::copy(cp.kubeconfig(), path).with_context(|| format!("writing {}", path.display()))?;
            path.clone()
        }
        None => cp.kubeconfig().to_path_buf(),
    };
    let tools = Tools::get();
    println!("kandle dev cluster ready in {:.1?} at {}", cp.started_in(), cp.server());
    println!("export KUBECONFIG={}", kubeconfig.display());
    println!("export PATH={}:{}:$PATH", dir_of(&tools.kubectl), dir_of(&tools.helm));
    println!("# no kubelet or controller-manager runs here: objects are stored, validated and");
    println!("# watched, but pods are never scheduled. Ctrl-C stops it and removes its data.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping the dev cluster ...");
    tokio::task::spawn_blocking(move || drop(cp)).await?;
    if let Some(path) = cli.kubeconfig_out {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn dir_of(path: &std::path::Path) -> String {
    path.parent().map(|p| p.display().to_string()).unwrap_or_default()
}
