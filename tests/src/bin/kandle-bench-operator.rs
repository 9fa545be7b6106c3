//! Operator scale benchmark: N LanguageModels on the local control plane.
//!
//! Prints (1) the time from the first apply until every Deployment exists, (2) the operator
//! process's peak RSS (VmHWM), and (3) the write requests the operator makes in one full
//! no-op resync — a restarted operator reconciling every settled model again (goal: 0; read from
//! its `kandle_api_writes_total`, which counts applies, status patches and deletes; Lease
//! renewals and Events are not reconcile writes and are not counted).
//!
//!   cargo build --release -p kandle-operator
//!   cargo run --release -p kandle-tests --bin kandle-bench-operator -- --models 1000

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use kandle_tests::control_plane::{ControlPlane, apply_crd};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};

/// Applies N LanguageModels and measures the operator.
#[derive(Parser, Debug)]
struct Cli {
    /// How many LanguageModels.
    #[arg(long, env = "KANDLE_BENCH_MODELS", default_value_t = 1000)]
    models: usize,
    /// The kandle-operator binary (default: beside this one).
    #[arg(long, env = "KANDLE_OPERATOR_BIN")]
    operator_bin: Option<PathBuf>,
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn spawn_operator(bin: &PathBuf, cp: &ControlPlane, ns: &str, port: u16) -> Result<std::process::Child> {
    std::process::Command::new(bin)
        .args(["run", "--log-format", "text", "--leader-elect=false", "--namespace", ns])
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", std::env::var("KANDLE_BENCH_OPERATOR_LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
        .stderr(match std::env::var_os("KANDLE_BENCH_OPERATOR_LOG") {
            Some(path) => std::process::Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
            None => std::process::Stdio::null(),
        })
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn writes(port: u16) -> Result<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
    let line = text.lines().find(|l| l.starts_with("kandle_api_writes_total")).context("no kandle_api_writes_total")?;
    Ok(line.split_whitespace().last().unwrap_or("0").parse()?)
}

fn model(i: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kandle.dev/v1alpha1", "kind": "LanguageModel",
        "metadata": {"name": format!("m{i:04}")},
        // A commit revision needs no hub call: the benchmark measures the operator, not a hub.
        "spec": {"model": {"huggingFace": {"repo": "org/model", "revision": "0123456789abcdef0123456789abcdef01234567"}}},
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = match cli.operator_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("kandle-operator"),
    };
    if !bin.is_file() {
        bail!("{} is missing: build it first (cargo build --release -p kandle-operator)", bin.display());
    }
    let cp = tokio::task::spawn_blocking(ControlPlane::start).await??;
    let client = cp.client().await;
    let crd = std::fs::read_to_string(kandle_tests::repo_root().join("crds/languagemodels.kandle.dev.yaml"))?;
    apply_crd(&client, &crd).await;
    let ns = cp.namespace("bench").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut operator = spawn_operator(&bin, &cp, &ns, port)?;

    let gvk = GroupVersionKind::gvk("kandle.dev", "v1alpha1", "LanguageModel");
    let lms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk_with_plural(&gvk, "languagemodels"));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    for i in 0..cli.models {
        let obj: DynamicObject = serde_json::from_value(model(i))?;
        lms.create(&PostParams::default(), &obj).await?;
    }
    let applied = started.elapsed();
    let mut peak = 0.0f64;
    loop {
        peak = peak.max(peak_rss_mib(operator.id()).unwrap_or(0.0));
        let n = deployments.list_metadata(&ListParams::default()).await?.items.len();
        if n >= cli.models {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("only {n} of {} Deployments after 30 min", cli.models);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_deployed = started.elapsed();
    // Let status writes and the work queue drain, then read the peak.
    let mut last = writes(port).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = writes(port).await?;
        if now == last {
            break;
        }
        last = now;
    }
    peak = peak.max(peak_rss_mib(operator.id()).unwrap_or(0.0));
    let _ = operator.kill();
    let _ = operator.wait();

    let versions = |items: Vec<(String, Option<String>)>| items.into_iter().collect::<std::collections::BTreeMap<_, _>>();
    let lm_before = versions(lms.list_metadata(&ListParams::default()).await?.items.into_iter().map(|o| (o.metadata.name.unwrap_or_default(), o.metadata.resource_version)).collect());
    let dep_before = versions(deployments.list_metadata(&ListParams::default()).await?.items.into_iter().map(|o| (o.metadata.name.unwrap_or_default(), o.metadata.resource_version)).collect());

    // A full no-op resync: a new operator process reconciles every (settled) model once.
    let port2 = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut second = spawn_operator(&bin, &cp, &ns, port2)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resync_started = Instant::now();
    let mut settled = writes(port2).await.unwrap_or(0);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = writes(port2).await?;
        if now == settled && resync_started.elapsed() > Duration::from_secs(10) {
            break;
        }
        settled = now;
    }
    let resync_peak = peak_rss_mib(second.id()).unwrap_or(0.0);
    let lm_after = versions(lms.list_metadata(&ListParams::default()).await?.items.into_iter().map(|o| (o.metadata.name.unwrap_or_default(), o.metadata.resource_version)).collect());
    let dep_after = versions(deployments.list_metadata(&ListParams::default()).await?.items.into_iter().map(|o| (o.metadata.name.unwrap_or_default(), o.metadata.resource_version)).collect());
    let changed = |a: &std::collections::BTreeMap<String, Option<String>>, b: &std::collections::BTreeMap<String, Option<String>>| {
        a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count()
    };
    let lm_changed = changed(&lm_before, &lm_after);
    let dep_changed = changed(&dep_before, &dep_after);
    let _ = second.kill();
    let _ = second.wait();

    println!("models: {}", cli.models);
    println!("create requests sent in: {:.1} s", applied.as_secs_f64());
    println!("every Deployment exists after: {:.1} s", all_deployed.as_secs_f64());
    println!("operator peak RSS (VmHWM), first run: {peak:.1} MiB (goal <= 64 MiB)");
    println!("operator peak RSS, resync run: {resync_peak:.1} MiB");
    println!("reconcile write requests during the full no-op resync: {settled} (goal 0)");
    println!("objects whose resourceVersion moved during the resync: {lm_changed} LanguageModels, {dep_changed} Deployments");
    Ok(())
}
