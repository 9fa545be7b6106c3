//! How users meet kandle: the Helm chart, the examples and the GitOps manifests, exercised with
//! the real `helm` and `kubectl` binaries against the local control plane.
//!
//! No kubelet runs here, so the chart's operator Deployment never gets a pod. Where a test needs
//! the operator to run *as the chart installs it*, it starts the real `kandle-operator` binary
//! with the container args the chart rendered and a kubeconfig that impersonates the chart's
//! ServiceAccount, so RBAC decides exactly as it would in a cluster. The only substitutions are
//! the metrics address (a free loopback port instead of 0.0.0.0:8080), `--kubeconfig`, the
//! fake hub's endpoint, and POD_NAME/POD_NAMESPACE (the Downward API's job).
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kandle_operator::builders::BuilderConfig;
use kandle_operator::controller::{self, Context};
use kandle_operator::metrics::Metrics;
use kandle_operator::{LanguageModel, crd};
use kandle_tests::control_plane::{ControlPlane, apply_crd};
use kandle_tests::fake_hub::FakeHub;
use kandle_tests::{eventually, finish_rollout};
use kandle_tests::repo_root;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = kandle_tests::EVENTUALLY;
const TOKEN: &str = "hf_example_token_for_tests";

fn chart() -> PathBuf {
    repo_root().join("charts/kandle")
}

fn examples() -> PathBuf {
    repo_root().join("examples")
}

/// Runs `cmd` (optionally feeding `stdin`), asserts it succeeded, returns its stdout.
fn run(cmd: &mut Command, stdin: Option<&str>, what: &str) -> String {
    let (ok, out, err) = output(cmd, stdin);
    assert!(ok, "{what} failed:\n{err}\n{out}");
    out
}

/// Runs `cmd`, asserts it failed, returns its stderr.
fn run_fail(cmd: &mut Command, what: &str) -> String {
    let (ok, out, err) = output(cmd, None);
    assert!(!ok, "{what} should have failed but printed:\n{out}");
    err
}

fn output(cmd: &mut Command, stdin: Option<&str>) -> (bool, String, String) {
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Blocking work (helm, kubectl) off the test's runtime, where an in-process controller runs.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// `helm template` of the chart for release `release` in `ns`, with `--set` values.
fn template(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> String {
    let mut cmd = cp.helm();
    cmd.args(["template", release]).arg(chart()).args(["--namespace", ns, "--kube-version", "1.35.4"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd, None, &format!("helm template {sets:?}"))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn condition(lm: &LanguageModel, type_: &str) -> Option<(String, String)> {
    lm.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

/// The example manifests: every `examples/*.yaml` that holds a LanguageModel.
fn example_files() -> Vec<(PathBuf, LanguageModel)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let lm: LanguageModel = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not a LanguageModel: {e}", p.display()));
            (p, lm)
        })
        .collect()
}

/// A fake hub that serves every example's repository (a config.json, and the GGUF file an
/// example names); the private example's repository needs [`TOKEN`].
fn hub_for_examples() -> FakeHub {
    let hub = FakeHub::start().unwrap();
    for (_, lm) in example_files() {
        let hf = lm.spec.model.hugging_face.as_ref().expect("every example reads from the hub");
        let mut files = vec![("config.json".to_owned(), b"{}".to_vec())];
        if let Some(f) = &hf.file {
            files.push((f.clone(), b"GGUF".to_vec()));
        }
        let sha = hub.add_repo(&hf.repo, files.clone());
        if hf.revision != "main" {
            hub.set_ref(&hf.repo, &hf.revision, &sha);
        }
        if hf.token_secret_ref.is_some() {
            hub.require_token(&hf.repo, TOKEN);
        }
    }
    hub
}

/// An in-process controller for one namespace, as the cluster admin.
struct Operator {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn operator(client: &Client, ns: &str, hub: &FakeHub) -> Operator {
    let builder = BuilderConfig { runtime_image: "kandle-runtime:test".into(), hub_endpoint: Some(hub.url()), ..BuilderConfig::default() };
    let ctx = Arc::new(Context::new(client.clone(), builder, Arc::new(Metrics::default())));
    Operator { task: tokio::spawn(controller::run_controller(ctx, Some(ns.to_owned()))) }
}

async fn setup() -> (&'static ControlPlane, Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    // The tests of this binary run in parallel; installing the CRD first keeps concurrent
    // `helm install`s from racing to create it (helm skips a CRD that exists).
    apply_crd(&client, &crd::crd_yaml().unwrap()).await;
    (cp, client)
}

#[tokio::test]
async fn helm_lint_passes_and_a_wrong_value_is_refused_naming_it() {
    let (cp, _) = setup().await;
    blocking(move || {
        run(cp.helm().args(["lint", "--strict"]).arg(chart()), None, "helm lint --strict");
        for (set, field) in [
            ("replicaCount=0", "replicaCount"),
            ("logFormat=xml", "logFormat"),
            ("metrics.port=http", "port"),
            ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
            ("image.pullPolicy=Sometimes", "pullPolicy"),
            ("noSuchValue=1", "noSuchValue"),
            ("tracing.otlpEndpoint=otel-collector:4318", "otlpEndpoint"),
            ("tracing.modelsOtlpEndpoint=otel-collector:4318", "modelsOtlpEndpoint"),
            ("tracing.tlsSecret=Collector_CA", "tlsSecret"),
            ("tracing.mutualTls=yes", "mutualTls"),
        ] {
            let err = run_fail(
                cp.helm().args(["template", "r"]).arg(chart()).args(["--set", set]),
                &format!("helm template --set {set}"),
            );
            assert!(err.contains(field), "the error for {set} should name {field}: {err}");
        }
        let err = run_fail(
            cp.helm().args(["template", "r"]).arg(chart()).args([
                "--set",
                "metrics.serviceMonitor.enabled=true",
                "--set",
                "metrics.service.enabled=false",
            ]),
            "a ServiceMonitor without its Service",
        );
        assert!(err.contains("metrics.service.enabled"), "{err}");
        let err = run_fail(
            cp.helm().args(["template", "r"]).arg(chart()).args(["--set", "tracing.mutualTls=true"]),
            "mutual TLS without its Secret",
        );
        assert!(err.contains("tracing.tlsSecret"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn the_rendered_chart_is_accepted_by_the_api_server_in_every_mode() {
    let (cp, client) = setup().await;
    let release_ns = cp.namespace("tpl").await;
    let watched = cp.namespace("tpl-models").await;
    let _ = client;
    blocking(move || {
        let tls = [
            "tracing.otlpEndpoint=https://otel-collector.observability:4318",
            "tracing.tlsSecret=collector-ca",
            "tracing.mutualTls=true",
        ];
        let modes: [(&str, Vec<String>); 4] = [
            ("defaults", vec![]),
            ("traces over mutual TLS", tls.iter().map(|s| s.to_string()).collect()),
            ("namespaced", vec![format!("watchNamespaces={{{watched}}}"), "networkPolicy.enabled=true".into()]),
            ("everything off", vec![
                "leaderElection.enabled=false".into(),
                "applyCrd=false".into(),
                "metrics.service.enabled=false".into(),
                "serviceAccount.create=false".into(),
                "rbac.create=false".into(),
            ]),
        ];
        for (mode, sets) in &modes {
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            let rendered = template(cp, "tpl", &release_ns, &sets);
            let out = run(
                cp.kubectl().args(["apply", "--dry-run=server", "-f", "-"]),
                Some(&rendered),
                &format!("server-side dry run of the chart ({mode})"),
            );
            assert!(out.contains("deployment.apps/tpl-kandle"), "{mode}: {out}");
        }

        // Defaults: cluster-wide RBAC, a metrics Service, no NetworkPolicy or ServiceMonitor.
        let d = docs(&template(cp, "tpl", &release_ns, &[]));
        assert_eq!(find(&d, "ClusterRole").len(), 2, "model rules + CRD rules");
        assert!(find(&d, "Role").iter().all(|r| r["metadata"]["name"] == "tpl-kandle-leader-election"));
        assert_eq!(find(&d, "Service").len(), 1);
        assert!(find(&d, "NetworkPolicy").is_empty() && find(&d, "ServiceMonitor").is_empty());
        let dep = find(&d, "Deployment")[0];
        let pod = &dep["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(args[0], "run");
        assert!(args.contains(&"--apply-crd=true") && args.contains(&"--leader-elect=true"), "{args:?}");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");

        // Traces over TLS: the Secret mounted read-only, the SDK's variables naming its keys;
        // none of it by default.
        assert!(c.get("volumeMounts").is_none() && pod.get("volumes").is_none(), "{pod}");
        let d = docs(&template(cp, "tpl", &release_ns, &tls));
        let pod = &find(&d, "Deployment")[0]["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(pod["volumes"], json!([{"name": "otlp-tls", "secret": {"secretName": "collector-ca"}}]));
        assert_eq!(c["volumeMounts"], json!([{"name": "otlp-tls", "mountPath": "/etc/kandle/otlp-tls", "readOnly": true}]));
        let env: BTreeMap<&str, &str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
            .collect();
        assert_eq!(env["OTEL_EXPORTER_OTLP_CERTIFICATE"], "/etc/kandle/otlp-tls/ca.crt");
        assert_eq!(env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"], "/etc/kandle/otlp-tls/tls.crt");
        assert_eq!(env["OTEL_EXPORTER_OTLP_CLIENT_KEY"], "/etc/kandle/otlp-tls/tls.key");
        let d = docs(&template(cp, "tpl", &release_ns, &tls[..2]));
        let c = &find(&d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
        let names: Vec<&str> = c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"OTEL_EXPORTER_OTLP_CERTIFICATE"), "{names:?}");
        assert!(!names.contains(&"OTEL_EXPORTER_OTLP_CLIENT_KEY"), "a CA alone, without mutualTls: {names:?}");

        // Namespaced: a Role in the watched namespace, no cluster-wide model rights.
        let d = docs(&template(cp, "tpl", &release_ns, &[&format!("watchNamespaces={{{watched}}}")]));
        let cluster_roles = find(&d, "ClusterRole");
        assert_eq!(cluster_roles.len(), 1, "only the CRD rule is cluster-wide");
        assert_eq!(cluster_roles[0]["rules"][0]["resourceNames"], json!(["languagemodels.kandle.dev"]));
        assert!(find(&d, "Role").iter().any(|r| r["metadata"]["namespace"] == watched.as_str()));
        let args = find(&d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"].clone();
        assert!(args.as_array().unwrap().contains(&json!(format!("--watch-namespaces={watched}"))), "{args}");

        // The ServiceMonitor (its CRD is not installed here, so only rendered).
        let d = docs(&template(cp, "tpl", &release_ns, &["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"]));
        let sm = find(&d, "ServiceMonitor");
        assert_eq!(sm.len(), 1);
        assert_eq!(sm[0]["metadata"]["labels"]["release"], "prom");
        assert_eq!(sm[0]["spec"]["selector"]["matchLabels"], find(&d, "Service")[0]["spec"]["selector"]);
    })
    .await;
}

#[tokio::test]
async fn install_upgrade_and_uninstall_with_the_real_helm() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("life").await;
    let ns2 = ns.clone();
    let notes = blocking(move || {
        run(
            cp.helm().args(["install", "life"]).arg(chart()).args([
                "--namespace", &ns2, "--set", "hub.endpoint=http://hub.example:8080",
                "--set", "runtime.gpuImage=registry.local/kandle-runtime:1-cuda",
                "--set", "tracing.otlpEndpoint=http://otel-collector.observability:4318",
                "--set", "tracing.modelsOtlpEndpoint=http://otel-collector.observability:4318",
            ]),
            None,
            "helm install",
        )
    })
    .await;
    assert!(notes.contains("kubectl wait --for=condition=Ready"), "NOTES.txt tells the user what next: {notes}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = deployments.get("life-kandle").await.unwrap();
    let c = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    assert!(c.args.as_ref().unwrap().contains(&"--hub-endpoint=http://hub.example:8080".to_owned()));
    assert!(c.args.as_ref().unwrap().contains(&"--runtime-image-gpu=registry.local/kandle-runtime:1-cuda".to_owned()));
    assert!(c.args.as_ref().unwrap().contains(&"--runtime-otlp-endpoint=http://otel-collector.observability:4318".to_owned()));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    let otlp = c.env.as_ref().unwrap().iter().find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT");
    assert_eq!(otlp.and_then(|e| e.value.as_deref()), Some("http://otel-collector.observability:4318"));

    // A values change reaches the operator Deployment.
    let ns2 = ns.clone();
    blocking(move || {
        run(
            cp.helm().args(["upgrade", "life"]).arg(chart()).args([
                "--namespace", &ns2, "--reuse-values", "--set", "replicaCount=2", "--set", "logLevel=debug",
            ]),
            None,
            "helm upgrade",
        )
    })
    .await;
    let d = deployments.get("life-kandle").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let c = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let env = c.env.as_ref().unwrap();
    assert!(env.iter().any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")), "{env:?}");
    assert!(c.args.as_ref().unwrap().contains(&"--hub-endpoint=http://hub.example:8080".to_owned()), "--reuse-values kept it");

    // Uninstall leaves nothing of the release behind but the CRD (documented in NOTES.txt).
    let ns2 = ns.clone();
    let left = blocking(move || {
        run(cp.helm().args(["uninstall", "life", "--namespace", &ns2, "--wait"]), None, "helm uninstall");
        run(
            cp.kubectl().args([
                "get",
                "deployments,services,serviceaccounts,roles,rolebindings,networkpolicies,clusterroles,clusterrolebindings",
                "--all-namespaces",
                "-l",
                "app.kubernetes.io/instance=life",
                "-o",
                "name",
            ]),
            None,
            "kubectl get what the release left",
        )
    })
    .await;
    assert_eq!(left.trim(), "", "helm uninstall left: {left}");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get_opt(crd::CRD_NAME).await.unwrap().is_some(), "the CRD stays (Helm never deletes crds/)");
}

/// `kubectl auth can-i` as the chart's ServiceAccount.
fn can_i(cp: &ControlPlane, sa: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let mut cmd = cp.kubectl();
    cmd.args(["auth", "can-i", verb, resource, "--as", sa]);
    match ns {
        Some(ns) => cmd.args(["-n", ns]),
        None => cmd.arg("--all-namespaces"),
    };
    let (ok, out, err) = output(&mut cmd, None);
    match out.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {verb} {resource}: {other} {err} ({ok})"),
    }
}

/// What the operator needs in a namespace it manages.
const NEEDED: &[(&str, &str)] = &[
    ("list", "languagemodels.kandle.dev"),
    ("watch", "languagemodels.kandle.dev"),
    ("patch", "languagemodels.kandle.dev"),
    ("update", "languagemodels.kandle.dev/finalizers"),
    ("patch", "languagemodels.kandle.dev/status"),
    ("watch", "deployments.apps"),
    ("create", "deployments.apps"),
    ("patch", "deployments.apps"),
    ("delete", "deployments.apps"),
    ("patch", "services"),
    ("watch", "services"),
    ("patch", "poddisruptionbudgets.policy"),
    ("patch", "persistentvolumeclaims"),
    ("get", "secrets"),
    ("create", "events.events.k8s.io"),
];

/// What it must never be able to do in a namespace it manages.
const NEVER_IN_MANAGED: &[(&str, &str)] = &[
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("create", "pods/exec"),
    ("create", "pods"),
    ("delete", "pods"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "serviceaccounts/token"),
    ("patch", "configmaps"),
];

/// Cluster-scoped rights it must never have.
const NEVER_CLUSTER: &[(&str, &str)] = &[
    ("list", "secrets"),
    ("watch", "secrets"),
    ("patch", "nodes"),
    ("delete", "nodes"),
    ("create", "nodes"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
];

fn check_matrix(cp: &ControlPlane, sa: &str, managed: &str, release_ns: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for (verb, res) in NEEDED {
        if !can_i(cp, sa, verb, res, Some(managed)) {
            wrong.push(format!("cannot {verb} {res} in {managed}"));
        }
    }
    for (verb, res) in NEVER_IN_MANAGED {
        if can_i(cp, sa, verb, res, Some(managed)) {
            wrong.push(format!("can {verb} {res} in {managed}"));
        }
    }
    for (verb, res) in NEVER_CLUSTER {
        if can_i(cp, sa, verb, res, None) {
            wrong.push(format!("can {verb} {res} cluster-wide"));
        }
    }
    for (verb, res, name) in [("get", "leases.coordination.k8s.io", "kandle-operator"), ("update", "leases.coordination.k8s.io", "kandle-operator")] {
        if !can_i(cp, sa, verb, &format!("{res}/{name}"), Some(release_ns)) {
            wrong.push(format!("cannot {verb} lease {name} in {release_ns}"));
        }
    }
    if can_i(cp, sa, "update", "leases.coordination.k8s.io/someone-else", Some(release_ns)) {
        wrong.push("can update any Lease".into());
    }
    if !can_i(cp, sa, "patch", "customresourcedefinitions.apiextensions.k8s.io/languagemodels.kandle.dev", None) {
        wrong.push("cannot patch its own CRD".into());
    }
    if can_i(cp, sa, "patch", "customresourcedefinitions.apiextensions.k8s.io/other.example.com", None) {
        wrong.push("can patch other CRDs".into());
    }
    wrong
}

#[tokio::test]
async fn the_cluster_wide_install_grants_what_the_operator_needs_and_no_more() {
    let (cp, _) = setup().await;
    let release_ns = cp.namespace("wide").await;
    let managed = cp.namespace("wide-models").await;
    let wrong = blocking(move || {
        run(cp.helm().args(["install", "wide"]).arg(chart()).args(["--namespace", &release_ns]), None, "helm install");
        let sa = format!("system:serviceaccount:{release_ns}:wide-kandle");
        let mut wrong = check_matrix(cp, &sa, &managed, &release_ns);
        // Cluster-wide, the owned kinds are necessarily allowed in kube-system too (RBAC has no
        // deny); everything else there stays out of reach. Set watchNamespaces to exclude it.
        for (verb, res) in NEVER_IN_MANAGED.iter().chain([("get", "configmaps"), ("list", "pods")].iter()) {
            if can_i(cp, &sa, verb, res, Some("kube-system")) {
                wrong.push(format!("can {verb} {res} in kube-system"));
            }
        }
        run(cp.helm().args(["uninstall", "wide", "--namespace", &release_ns]), None, "helm uninstall");
        wrong
    })
    .await;
    assert!(wrong.is_empty(), "the cluster-wide RBAC is wrong:\n{}", wrong.join("\n"));
}

/// A kubeconfig that acts as ServiceAccount `ns/name`, for the real operator binary.
fn impersonating_kubeconfig(cp: &ControlPlane, ns: &str, name: &str, dir: &Path) -> PathBuf {
    let mut cfg: Value = serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig()).unwrap()).unwrap();
    for user in cfg["users"].as_array_mut().unwrap() {
        user["user"]["as"] = json!(format!("system:serviceaccount:{ns}:{name}"));
        user["user"]["as-groups"] = json!(["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"]);
    }
    let path = dir.join(format!("kubeconfig-{ns}-{name}"));
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_namespaced_install_is_least_privilege_and_its_operator_brings_an_example_to_ready() {
    let (cp, client) = setup().await;
    let release_ns = cp.namespace("scoped").await;
    let managed = cp.namespace("scoped-models").await;
    let hub = hub_for_examples();

    // An older schema in the cluster, as after a chart upgrade (Helm does not touch crds/ then):
    // the Revision printer column is missing. The operator must put its own schema back.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let (rn, mn) = (release_ns.clone(), managed.clone());
    let (wrong, manifest) = blocking(move || {
        run(
            cp.helm().args(["install", "scoped"]).arg(chart()).args([
                "--namespace", &rn, "--set", &format!("watchNamespaces={{{mn}}}"),
                // Rendered into the args the operator below runs with, so the flag is parsed.
                "--set", "runtime.gpuImage=registry.local/kandle-runtime:1-cuda",
                "--set", "tracing.otlpEndpoint=http://otel-collector.observability:4318",
                "--set", "tracing.modelsOtlpEndpoint=http://otel-collector.observability:4318",
            ]),
            None,
            "helm install (namespaced)",
        );
        let sa = format!("system:serviceaccount:{rn}:scoped-kandle");
        let mut wrong = check_matrix(cp, &sa, &mn, &rn);
        for (verb, res) in NEEDED.iter().chain(NEVER_IN_MANAGED) {
            if can_i(cp, &sa, verb, res, Some("kube-system")) {
                wrong.push(format!("can {verb} {res} in kube-system"));
            }
        }
        if can_i(cp, &sa, "list", "languagemodels.kandle.dev", None) {
            wrong.push("can list LanguageModels cluster-wide".into());
        }
        let manifest = run(cp.helm().args(["get", "manifest", "scoped", "--namespace", &rn]), None, "helm get manifest");
        (wrong, manifest)
    })
    .await;
    assert!(wrong.is_empty(), "the namespaced RBAC is wrong:\n{}", wrong.join("\n"));

    let mut old = crds.get(crd::CRD_NAME).await.unwrap();
    let columns = old.spec.versions[0].additional_printer_columns.as_mut().unwrap();
    columns.retain(|c| c.name != "Revision");
    old.metadata.managed_fields = None;
    crds.replace(crd::CRD_NAME, &PostParams::default(), &old).await.unwrap();

    // The operator as the chart runs it: its rendered args, as its ServiceAccount.
    let d = docs(&manifest);
    let container = &find(&d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .filter(|a| !a.starts_with("--metrics-addr="))
        .collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kubeconfig = impersonating_kubeconfig(cp, &release_ns, "scoped-kandle", cp.dir());
    let mut child = tokio::process::Command::new(kandle_tests::workspace_binary("kandle-operator"))
        .args(&args)
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg(format!("--hub-endpoint={}", hub.url()))
        .env("POD_NAME", "scoped-kandle-0")
        .env("POD_NAMESPACE", &release_ns)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The chart asks for JSON logs: keep every line to check it is one JSON object.
    let stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });

    // It re-applied its CRD (the field manager says it was the operator, not another test's
    // setup, that put the column back).
    eventually("the operator to re-apply its CRD", || async {
        let crd = crds.get(crd::CRD_NAME).await.unwrap();
        let by_operator = crd.managed_fields().iter().any(|m| m.manager.as_deref() == Some("kandle-operator"));
        let cols = crd.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
        (by_operator && cols.iter().any(|c| c.name == "Revision")).then_some(())
    })
    .await;

    // An example, applied with kubectl into the watched namespace, becomes Ready.
    let example = examples().join("smollm2-gguf.yaml");
    let mn = managed.clone();
    blocking(move || run(cp.kubectl().args(["apply", "-n", &mn, "-f"]).arg(&example), None, "kubectl apply the example")).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &managed);
    let model = eventually("the example's Deployment", || async { deployments.get_opt("smollm2").await.unwrap() }).await;
    // The chart's tracing.modelsOtlpEndpoint reaches the model's server, with its pod's
    // Kubernetes attributes; the API server took the downward-API fields they expand.
    let serve_env = model.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
    let value = |name: &str| serve_env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
    assert_eq!(value("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(), Some("http://otel-collector.observability:4318"));
    let attributes = value("OTEL_RESOURCE_ATTRIBUTES").expect("the pods' resource attributes");
    assert!(attributes.starts_with(&format!("k8s.namespace.name={managed},k8s.deployment.name=smollm2,k8s.pod.name=$(KANDLE_POD_NAME),")), "{attributes}");
    finish_rollout(&client, &managed, "smollm2").await;
    let mn = managed.clone();
    let waited = blocking(move || {
        run(
            cp.kubectl().args(["wait", "--for=condition=Ready", "languagemodel/smollm2", "-n", &mn, "--timeout=60s"]),
            None,
            "kubectl wait --for=condition=Ready",
        )
    })
    .await;
    assert!(waited.contains("condition met"), "{waited}");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &release_ns);
    let lease = leases.get("kandle-operator").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("scoped-kandle-0"));

    // SIGTERM stops it cleanly.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the operator exits on SIGTERM").unwrap();
    let logs = logs.await.unwrap();
    assert!(status.success(), "{status}\n{}", logs.join("\n"));
    assert!(logs.len() >= 2, "the operator logged its start and stop: {logs:?}");
    for line in &logs {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["timestamp"].is_string(), "{line}");
    }
    let rn = release_ns.clone();
    blocking(move || run(cp.helm().args(["uninstall", "scoped", "--namespace", &rn]), None, "helm uninstall")).await;
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server_and_reconciled_by_the_operator() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("examples").await;
    let hub = hub_for_examples();
    let examples = example_files();
    assert!(examples.len() >= 12, "one example per family plus private and multi-replica: {}", examples.len());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hf-token"}, "stringData": {"token": TOKEN},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let _operator = operator(&client, &ns, &hub);

    for (path, lm) in &examples {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.starts_with("# "), "{} starts with a comment saying what it serves and needs", path.display());
        let (ns2, p2) = (ns.clone(), path.clone());
        let (dry, real) = blocking(move || {
            let dry = run(cp.kubectl().args(["apply", "--dry-run=server", "-n", &ns2, "-f"]).arg(&p2), None, "server-side dry run");
            let real = run(cp.kubectl().args(["apply", "-n", &ns2, "-f"]).arg(&p2), None, "kubectl apply");
            (dry, real)
        })
        .await;
        let name = lm.name_any();
        assert!(dry.contains(&format!("languagemodel.kandle.dev/{name} created (server dry run)")), "{dry}");
        assert!(real.contains(&format!("languagemodel.kandle.dev/{name} created")), "{real}");
    }

    let lms: Api<LanguageModel> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    for (path, lm) in &examples {
        let name = lm.name_any();
        let got = eventually(&format!("{} resolved", path.display()), || async {
            let lm = lms.get(&name).await.unwrap();
            (condition(&lm, "ModelResolved").map(|c| c.0) == Some("True".into())).then_some(lm)
        })
        .await;
        assert_eq!(condition(&got, "Degraded").map(|c| c.0), Some("False".into()), "{}", path.display());
        let d = eventually(&format!("{}'s Deployment", path.display()), || async { deployments.get_opt(&name).await.unwrap() }).await;
        let serve = serde_json::to_string(&d.spec.unwrap().template).unwrap();
        if let Some(task) = lm.spec.model.task {
            assert!(serve.contains(&format!("\"--task\",\"{}\"", task.as_str())), "{}: {serve}", path.display());
        }
        assert!(!serve.contains(TOKEN), "the token never lands in a pod template: {}", path.display());
    }

    // `kubectl apply -k examples/` (and Argo CD / Flux, which apply that folder) gets exactly
    // these models.
    let listed = blocking(move || run(cp.kubectl().args(["kustomize"]).arg(repo_root().join("examples")), None, "kubectl kustomize examples")).await;
    let mut kustomized: Vec<String> = docs(&listed)
        .iter()
        .filter(|d| d["kind"] == "LanguageModel")
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    let mut names: Vec<String> = examples.iter().map(|(_, lm)| lm.name_any()).collect();
    kustomized.sort();
    names.sort();
    assert_eq!(kustomized, names, "examples/kustomization.yaml lists every example");
}

/// Runs the Argo CD health check on `obj` in an embedded Lua, as Argo CD does.
fn argo_health(obj: &LanguageModel) -> (String, String) {
    use mlua::LuaSerdeExt;
    let script = std::fs::read_to_string(health_lua_path()).unwrap();
    let lua = mlua::Lua::new();
    let value = serde_json::to_value(obj).unwrap();
    let options = mlua::serde::SerializeOptions::new().serialize_none_to_null(false).serialize_unit_to_null(false);
    lua.globals().set("obj", lua.to_value_with(&value, options).unwrap()).unwrap();
    let hs: mlua::Table = lua.load(&script).eval().unwrap_or_else(|e| panic!("the health script failed: {e}"));
    (hs.get::<String>("status").unwrap(), hs.get::<String>("message").unwrap())
}

fn health_lua_path() -> PathBuf {
    examples().join("gitops/argocd/resource_customizations/kandle.dev/LanguageModel/health.lua")
}

#[tokio::test]
async fn the_argo_cd_health_check_reads_what_the_operator_writes() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("argo").await;
    let hub = hub_for_examples();
    let _operator = operator(&client, &ns, &hub);
    let lms: Api<LanguageModel> = Api::namespaced(client.clone(), &ns);
    for file in ["smollm2-gguf.yaml", "private-model.yaml"] {
        let (ns2, p) = (ns.clone(), examples().join(file));
        blocking(move || run(cp.kubectl().args(["apply", "-n", &ns2, "-f"]).arg(&p), None, "kubectl apply")).await;
    }

    // Created, resolved, no pods ready yet: Progressing.
    let fresh = eventually("smollm2 resolved", || async {
        let lm = lms.get("smollm2").await.unwrap();
        (condition(&lm, "ModelResolved").map(|c| c.0) == Some("True".into())).then_some(lm)
    })
    .await;
    assert_eq!(argo_health(&fresh).0, "Progressing", "{:?}", fresh.status);

    // Rolled out: Healthy.
    finish_rollout(&client, &ns, "smollm2").await;
    let ready = eventually("smollm2 Ready", || async {
        let lm = lms.get("smollm2").await.unwrap();
        (condition(&lm, "Ready").map(|c| c.0) == Some("True".into())).then_some(lm)
    })
    .await;
    assert_eq!(argo_health(&ready).0, "Healthy", "{:?}", ready.status);

    // A spec change the operator has not observed yet: Progressing, whatever the old status said.
    let mut unobserved = ready.clone();
    unobserved.metadata.generation = Some(ready.metadata.generation.unwrap() + 1);
    let (status, message) = argo_health(&unobserved);
    assert_eq!(status, "Progressing");
    assert!(message.contains("generation"), "{message}");

    // The private model without its token Secret: Degraded, with the operator's reason.
    let degraded = eventually("the private model Degraded", || async {
        let lm = lms.get("llama-3-2-1b").await.unwrap();
        (condition(&lm, "Degraded").map(|c| c.0) == Some("True".into())).then_some(lm)
    })
    .await;
    let (status, message) = argo_health(&degraded);
    assert_eq!(status, "Degraded");
    assert!(message.contains("TokenSecretMissing"), "{message}");

    // An object the operator has never touched: Progressing.
    let mut untouched = fresh.clone();
    untouched.status = None;
    assert_eq!(argo_health(&untouched).0, "Progressing");
}

#[test]
fn the_gitops_manifests_point_at_what_exists_and_argocd_cm_carries_the_same_lua() {
    let lua = std::fs::read_to_string(health_lua_path()).unwrap();
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(examples().join("gitops/argocd/argocd-cm.yaml")).unwrap()).unwrap();
    assert_eq!(cm["data"]["resource.customizations.health.kandle.dev_LanguageModel"].as_str(), Some(lua.as_str()));

    let apps = docs(&std::fs::read_to_string(examples().join("gitops/argocd/applications.yaml")).unwrap());
    assert_eq!(apps.len(), 2);
    for app in &apps {
        assert_eq!(app["kind"], "Application");
        let path = app["spec"]["source"]["path"].as_str().unwrap();
        assert!(repo_root().join(path).is_dir(), "Argo CD Application path {path} exists");
    }
    let flux_dir = examples().join("gitops/flux");
    let ks = docs(&std::fs::read_to_string(flux_dir.join("kustomizations.yaml")).unwrap());
    for k in &ks {
        let path = k["spec"]["path"].as_str().unwrap().trim_start_matches("./");
        assert!(repo_root().join(path).is_dir(), "Flux Kustomization path {path} exists");
        let out = run(Command::new(&kandle_tests::tools::Tools::get().kubectl).arg("kustomize").arg(repo_root().join(path)), None, "kubectl kustomize");
        assert!(!docs(&out).is_empty());
    }
    let hr = docs(&std::fs::read_to_string(flux_dir.join("operator/helmrelease.yaml")).unwrap());
    let chart_path = hr[0]["spec"]["chart"]["spec"]["chart"].as_str().unwrap().trim_start_matches("./");
    assert!(repo_root().join(chart_path).join("Chart.yaml").is_file(), "HelmRelease chart {chart_path}");
}
