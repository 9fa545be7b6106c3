//! A real Kubernetes control plane for tests: etcd and kube-apiserver on loopback.
//!
//! This is controller-runtime's envtest approach, done in Rust: no kubelet, no
//! controller-manager, no scheduler — just the API server with real validation (CRD schemas,
//! CEL), server-side apply, watches, admission (including Pod Security) and RBAC. Tests that
//! need what a missing controller would do (a Deployment's status, say) play that controller
//! themselves and say so.
//!
//! Data model: one [`ControlPlane`] owns a temp directory (certificates, etcd data, logs,
//! kubeconfig) and two child processes. The processes are spawned from a dedicated *keeper*
//! thread with `PR_SET_PDEATHSIG=SIGKILL`: the kernel kills them when that thread ends, so
//! neither a panicking test nor a killed test binary leaves etcd or kube-apiserver behind. A
//! [`ControlPlane`] stops both (SIGTERM, then SIGKILL after a grace period) and removes its
//! directory on drop; the per-binary [`ControlPlane::shared`] instance does so at process exit.
//!
//! Why these flags (kube-apiserver): the same set envtest uses — the ServiceAccount admission
//! plugin is off because no controller-manager creates service accounts or tokens, RBAC is the
//! only authorizer so permission tests mean something, and `--advertise-address=127.0.0.1`
//! because the apiserver refuses to start on a machine with no default route without it.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::tools::Tools;

/// How long a start may take before it is reported as failed (the goal is well under 30 s).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The admin user's name; its certificate is in group `system:masters`.
pub const ADMIN_USER: &str = "kandle-admin";

/// A running etcd + kube-apiserver pair. See the module docs.
pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    processes: Mutex<Vec<Process>>,
    keeper: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
    namespaces: AtomicU32,
    started_in: Duration,
}

struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(cp)) = SHARED.get() {
        cp.shutdown();
    }
}

impl ControlPlane {
    /// The control plane shared by every test in this test binary, started on first use.
    /// Panics (failing the test) with the processes' log tails when it cannot start.
    pub fn shared() -> &'static ControlPlane {
        let result = SHARED.get_or_init(|| {
            let cp = ControlPlane::start().map_err(|e| format!("{e:#}"))?;
            // SAFETY: registers a plain extern "C" function; it only touches the static.
            unsafe { libc::atexit(stop_shared_at_exit) };
            Ok(cp)
        });
        match result {
            Ok(cp) => cp,
            Err(e) => panic!("the local control plane could not start: {e}"),
        }
    }

    /// Starts a new control plane of its own (the binaries are built first if needed).
    ///
    /// Its ports are picked free, then bound by etcd and kube-apiserver a moment later; a
    /// process started in between (the tests run in parallel) can take one ("bind: address
    /// already in use" in CI, once). Such a start is retried with new ports, twice at most.
    pub fn start() -> Result<ControlPlane> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("control plane: a port was taken while starting; again with new ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once() -> Result<ControlPlane> {
        let tools = Tools::locate()?;
        let (result_tx, result_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let keeper = std::thread::Builder::new()
            .name("control-plane-keeper".into())
            .spawn(move || {
                // The children die with this thread (PR_SET_PDEATHSIG), so it lives exactly as
                // long as the control plane: until told to stop, or until the process exits.
                let _ = result_tx.send(launch(&tools));
                let _ = stop_rx.recv();
            })
            .context("spawning the control-plane keeper thread")?;
        let mut cp = match result_rx.recv() {
            Ok(Ok(cp)) => cp,
            Ok(Err(e)) => {
                let _ = stop_tx.send(());
                let _ = keeper.join();
                return Err(e);
            }
            Err(_) => bail!("the control-plane keeper thread died while starting"),
        };
        cp.keeper = Mutex::new(Some((stop_tx, keeper)));
        Ok(cp)
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A kubeconfig file for the admin user (certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding certificates, etcd data and the processes' logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long the start took, from spawning etcd to a ready API server.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Process ids of etcd and kube-apiserver (for tests of the cleanup itself).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|p| p.child.id()).collect()
    }

    /// The last `lines` lines of each process's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let procs = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for p in procs.iter() {
            let _ = write!(out, "{}", log_tail(p.name, &p.log, lines));
        }
        out
    }

    /// The kube client config of the admin user.
    pub async fn config(&self) -> Result<Config> {
        crate::init_crypto();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
    }

    /// A client authenticated as the admin user. Clients are made per call because a
    /// `kube::Client` belongs to the tokio runtime it was made on, and each test has its own.
    pub async fn client(&self) -> Client {
        let config = self.config().await.expect("reading the control plane's kubeconfig");
        Client::try_from(config).expect("building a kube client")
    }

    /// A client that impersonates `user` in `groups` (authenticated as admin, which may
    /// impersonate anyone) — what RBAC then decides is what that user could do.
    pub async fn impersonating(&self, user: &str, groups: &[&str]) -> Client {
        let mut config = self.config().await.expect("reading the control plane's kubeconfig");
        config.auth_info.impersonate = Some(user.to_string());
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        config.auth_info.impersonate_groups = Some(groups);
        Client::try_from(config).expect("building a kube client")
    }

    /// A client that acts as ServiceAccount `namespace/name`, with the groups the API server
    /// gives real ServiceAccount tokens.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Client {
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let ns_group = format!("system:serviceaccounts:{namespace}");
        self.impersonating(&user, &["system:serviceaccounts", &ns_group]).await
    }

    /// Creates a namespace of its own for one test: `<prefix>-<n>-<random>`.
    pub async fn namespace(&self, prefix: &str) -> String {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{n}-{:04x}", rand::random::<u16>());
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        name
    }

    /// `kubectl` pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&Tools::get().kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// `helm` pointed at this control plane, with its cache/config/data kept in the control
    /// plane's directory rather than the user's home.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(&Tools::get().helm);
        let home = self.dir.join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Stops both processes and removes the directory. Idempotent.
    pub fn shutdown(&self) {
        let mut procs = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        // The API server first, so it does not spend its grace period retrying a dead etcd.
        procs.reverse();
        for p in procs.iter_mut() {
            stop(&mut p.child, STOP_GRACE);
        }
        procs.clear();
        if let Some((stop_tx, keeper)) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop_tx.send(());
            let _ = keeper.join();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs; always reaps the child.
fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling our own child, which has not been reaped (try_wait said so).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn log_tail(name: &str, path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    format!("--- last {} lines of {name} log ({}) ---\n{}\n", tail.len(), path.display(), tail.join("\n"))
}

/// Spawns `cmd` with its output in `log`, dying with the calling thread.
fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Process> {
    let out = fs::File::create(&log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
    Ok(Process { name, child, log })
}

/// PEM files for the API server and its clients.
struct Pki {
    ca_cert: String,
    serving_cert: String,
    serving_key: String,
    admin_cert: String,
    admin_key: String,
    sa_private: String,
    sa_public: String,
}

fn generate_pki() -> Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "kandle-test-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "10.0.0.1".to_string(),
    ])?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, ADMIN_USER);
    admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    let sa_key = KeyPair::generate()?;
    Ok(Pki {
        ca_cert: ca_cert.pem(),
        serving_cert: serving_cert.pem(),
        serving_key: serving_key.serialize_pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        sa_public: sa_key.public_key_pem(),
        sa_private: sa_key.serialize_pem(),
    })
}

fn kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kandle-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {ADMIN_USER}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: kandle-test
  context:
    cluster: kandle-test
    user: {ADMIN_USER}
    namespace: default
current-context: kandle-test
",
        ca = b64(&pki.ca_cert),
        cert = b64(&pki.admin_cert),
        key = b64(&pki.admin_key),
    )
}

/// Everything a start does; runs on the keeper thread.
fn launch(tools: &Tools) -> Result<ControlPlane> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("kandle-cp-").tempdir()?.keep();
    let result = launch_in(tools, &dir, started);
    if result.is_err() {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

fn launch_in(tools: &Tools, dir: &Path, started: Instant) -> Result<ControlPlane> {
    let pki = generate_pki().context("generating certificates")?;
    let pki_dir = dir.join("pki");
    fs::create_dir_all(&pki_dir)?;
    let files = [
        ("ca.crt", &pki.ca_cert),
        ("apiserver.crt", &pki.serving_cert),
        ("apiserver.key", &pki.serving_key),
        ("sa.key", &pki.sa_private),
        ("sa.pub", &pki.sa_public),
    ];
    for (name, pem) in files {
        fs::write(pki_dir.join(name), pem)?;
    }
    let etcd_port = free_port()?;
    let peer_port = free_port()?;
    let api_port = free_port()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let server = format!("https://127.0.0.1:{api_port}");

    let mut etcd = Command::new(&tools.etcd);
    etcd.arg("--name=kandle-test")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={etcd_url}"))
        .arg(format!("--advertise-client-urls={etcd_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=kandle-test={peer_url}"))
        // Test data is disposable: skipping fsync makes etcd (and so every write) much faster.
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    let mut processes = vec![spawn("etcd", etcd, dir.join("etcd.log"))?];

    let pki_path = |f: &str| pki_dir.join(f).display().to_string();
    let mut apiserver = Command::new(&tools.kube_apiserver);
    apiserver
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg(format!("--cert-dir={}", pki_dir.display()))
        .arg(format!("--tls-cert-file={}", pki_path("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", pki_path("apiserver.key")))
        .arg(format!("--secure-port={api_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        // Room for every Service a scale test creates (a /24 fills at 253 models).
        .arg("--service-cluster-ip-range=10.0.0.0/16")
        .arg("--allow-privileged=true")
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--authorization-mode=RBAC")
        .arg(format!("--client-ca-file={}", pki_path("ca.crt")))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", pki_path("sa.pub")))
        .arg(format!("--service-account-signing-key-file={}", pki_path("sa.key")))
        // The "kubernetes" Service cannot point at a loopback address; nothing here needs it.
        .arg("--endpoint-reconciler-type=none")
        .arg("--profiling=false")
        .arg("-v=1");
    processes.push(spawn("kube-apiserver", apiserver, dir.join("kube-apiserver.log"))?);

    let kubeconfig = dir.join("kubeconfig");
    fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki))?;
    let mut cp = ControlPlane {
        dir: dir.to_path_buf(),
        server,
        kubeconfig,
        processes: Mutex::new(processes),
        keeper: Mutex::new(None),
        namespaces: AtomicU32::new(0),
        started_in: Duration::ZERO,
    };
    match wait_ready(&cp, started) {
        Ok(()) => {
            cp.started_in = started.elapsed();
            Ok(cp)
        }
        Err(e) => {
            let tails = cp.log_tails(40);
            // Drop would also remove the directory; stop the processes before reading is done.
            cp.shutdown();
            Err(e.context(format!("the control plane did not become ready\n{tails}")))
        }
    }
}

/// Polls `/readyz` (which includes the RBAC bootstrap hooks) until it answers `ok`.
fn wait_ready(cp: &ControlPlane, started: Instant) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = Client::try_from(cp.config().await?)?;
        let mut last: String;
        loop {
            {
                let mut procs = cp.processes.lock().unwrap_or_else(|p| p.into_inner());
                for p in procs.iter_mut() {
                    if let Some(status) = p.child.try_wait()? {
                        bail!("{} exited early ({status})", p.name);
                    }
                }
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await {
                Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
                Ok(Ok(body)) => last = body,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(anyhow!("/readyz not ok after {START_TIMEOUT:?}; last answer: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Server-side applies the CustomResourceDefinition in `yaml` and waits until it is served.
/// Panics (failing the test) with the API server's refusal.
pub async fn apply_crd(client: &Client, yaml: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};

    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).expect("the CRD YAML parses");
    let name = crd.metadata.name.clone().expect("the CRD has a name");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut body = serde_json::to_value(&crd).expect("the CRD serializes");
    body["apiVersion"] = "apiextensions.k8s.io/v1".into();
    body["kind"] = "CustomResourceDefinition".into();
    api.patch(&name, &PatchParams::apply("kandle-tests").force(), &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("the API server refused the CRD {name}: {e}"));
    tokio::time::timeout(Duration::from_secs(30), await_condition(api, &name, conditions::is_crd_established()))
        .await
        .unwrap_or_else(|_| panic!("the CRD {name} was not established within 30 s"))
        .expect("watching the CRD");
}
