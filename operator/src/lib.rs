//! kandle-operator: the `LanguageModel` API types and the controller that turns them into
//! inference deployments. See DESIGN.md for the contract.
//!
//! Dependencies point inward: [`api`] knows nothing of the controller; [`builders`],
//! [`status`] and [`drift`] are pure functions over plain data, unit-tested beside the code;
//! only the reconcile shell (a later issue) touches the network.
pub mod api;
pub mod builders;
pub mod consts;
pub mod controller;
pub mod crd;
pub mod drift;
mod error;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod status;

pub use api::{LanguageModel, LanguageModelSpec, LanguageModelStatus};
pub use error::{Error, Result, kube_reason};

/// Configuration of the controller process (`kandle-operator run`).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// How the children of every model are built (and which hub revisions resolve against).
    pub builder: builders::BuilderConfig,
    /// A kubeconfig file; `None` means the usual discovery (`KUBECONFIG`, `~/.kube/config`,
    /// then the in-cluster ServiceAccount).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Watch these namespaces only; empty watches all (the chart's `watchNamespaces`).
    pub namespaces: Vec<String>,
    /// Server-side apply the `LanguageModel` CRD this binary was built with before reconciling:
    /// Helm installs CRDs once and never upgrades them, so the operator carries its own schema.
    pub apply_crd: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: std::net::SocketAddr,
    /// Take part in leader election (several replicas, one reconciling); `None` reconciles at
    /// once, for a single replica.
    pub leader_election: Option<LeaderElection>,
}

/// Where the leader Lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease (the operator's own namespace in a cluster).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity (its pod name in a cluster).
    pub identity: String,
}

/// Selects rustls' ring provider: kube uses ring, but the dependency graph also enables
/// aws-lc-rs, and rustls then refuses to pick one by itself.
pub fn init_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client from the kubeconfig named in `config`, or from the usual discovery.
pub async fn client(config: &RunConfig) -> Result<kube::Client> {
    init_crypto();
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| Error::Config(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?,
    };
    Ok(kube::Client::try_from(kube_config)?)
}

/// Runs the controller until SIGTERM or Ctrl-C, serving metrics and health on the side.
pub async fn run(config: RunConfig) -> Result<()> {
    let client = client(&config).await?;
    let metrics = std::sync::Arc::new(metrics::Metrics::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| Error::Io { what: format!("metrics listener on {}", config.metrics_addr), source })?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    if config.apply_crd {
        crd::apply(&client).await?;
        tracing::info!(crd = crd::CRD_NAME, "applied the LanguageModel CRD");
    }
    let ctx = std::sync::Arc::new(controller::Context::new(client, config.builder.clone(), metrics));
    tracing::info!(namespaces = ?config.namespaces, metrics = %config.metrics_addr, "kandle-operator starting");
    let Some(le) = &config.leader_election else {
        run_controllers(ctx, &config.namespaces).await;
        tracing::info!("kandle-operator stopped");
        return Ok(());
    };
    let elector = leader::Elector::new(ctx.client.clone(), &le.namespace, &le.lease_name, &le.identity);
    // A standby replica must still stop promptly on SIGTERM.
    tokio::select! {
        _ = elector.acquire() => {}
        _ = shutdown_signal() => return Ok(()),
    }
    tokio::select! {
        _ = run_controllers(ctx, &config.namespaces) => {
            tracing::info!("kandle-operator stopped");
            Ok(())
        }
        _ = elector.hold() => Err(Error::LostLeadership),
    }
}

/// One controller for the whole cluster, or one per watched namespace (a namespaced install
/// has no cluster-wide list/watch rights, so one all-namespace watch would be refused).
async fn run_controllers(ctx: std::sync::Arc<controller::Context>, namespaces: &[String]) {
    if namespaces.is_empty() {
        return controller::run_controller(ctx, None).await;
    }
    futures::future::join_all(namespaces.iter().map(|ns| controller::run_controller(ctx.clone(), Some(ns.clone())))).await;
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
