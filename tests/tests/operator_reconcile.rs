//! The operator's reconcile loop against a real kube-apiserver, with a fake hub.
//!
//! No kube-controller-manager runs here, so nothing turns a Deployment into pods: where a test
//! needs a rollout to finish, it plays the Deployment controller by writing the Deployment's
//! status itself. Each test watches only its own namespace.
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kandle_operator::builders::BuilderConfig;
use kandle_operator::controller::{self, Context};
use kandle_operator::metrics::Metrics;
use kandle_operator::{LanguageModel, crd};
use kandle_tests::control_plane::{ControlPlane, apply_crd};
use kandle_tests::fake_hub::FakeHub;
use kandle_tests::otlp_collector::{OtlpCollector, string_attribute};
use kandle_tests::{eventually, finish_rollout};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn install_crd(client: &Client) {
    apply_crd(client, &crd::crd_yaml().unwrap()).await;
}

struct Env {
    ns: String,
    client: Client,
    hub: FakeHub,
    ctx: Arc<Context>,
    controller: tokio::task::JoinHandle<()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

async fn env(prefix: &str) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "kandle_operator=info,warn".into()))
        .with_test_writer()
        .try_init();
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace(prefix).await;
    let hub = FakeHub::start().unwrap();
    hub.add_repo("org/tiny", [("config.json", b"{\"model_type\":\"llama\"}".to_vec())]);
    let builder = BuilderConfig { runtime_image: "kandle-runtime:test".into(), hub_endpoint: Some(hub.url()), ..BuilderConfig::default() };
    let ctx = Arc::new(Context::new(client.clone(), builder, Arc::new(Metrics::default())));
    let controller = tokio::spawn(controller::run_controller(ctx.clone(), Some(ns.clone())));
    Env { ns, client, hub, ctx, controller }
}

fn model(name: &str, extra: serde_json::Value) -> LanguageModel {
    let mut spec = json!({
        "model": {"huggingFace": {"repo": "org/tiny", "revision": "main"}, "task": "TextGeneration"},
        "resources": {"gpu": {"count": 1, "product": "NVIDIA-L4"}},
        "replicas": 2,
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "kandle.dev/v1alpha1", "kind": "LanguageModel",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

fn condition(lm: &LanguageModel, type_: &str) -> Option<(String, String)> {
    lm.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn a_model_gets_its_children_is_pinned_to_the_hub_commit_and_becomes_ready() {
    let env = env("reconcile").await;
    let sha = env.hub.commit("org/tiny", "main", [("weights.safetensors", vec![0u8; 8])]);
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    // A Secret's files for the runtime (a trace collector's CA, say): the API server fills in
    // the volume's defaults, which must be neither drift nor a reason to write again below.
    let files = json!({"runtime": {"files": [{"mountPath": "/etc/otel", "secretName": "collector-ca"}]}});
    let lm = lms.create(&PostParams::default(), &model("tiny", files)).await.unwrap();

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let d = eventually("the Deployment", || async { deployments.get_opt("tiny").await.unwrap() }).await;
    let volume = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().volumes.as_ref().unwrap().iter().find(|v| v.name == "files-0").expect("the files' volume");
    assert_eq!(volume.secret.as_ref().unwrap().secret_name.as_deref(), Some("collector-ca"));
    let owner = &d.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("LanguageModel", lm.uid().unwrap().as_str(), Some(true)));
    assert_eq!(d.labels()["kandle.dev/model"], "tiny");
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let serve = pod.containers.iter().find(|c| c.args.as_ref().is_some_and(|a| a.iter().any(|x| x == "serve")) || c.command.as_ref().is_some_and(|a| a.iter().any(|x| x == "serve"))).expect("a serve container");
    assert_eq!(serve.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"], "NVIDIA-L4");
    let pinned = serde_json::to_string(pod).unwrap();
    assert!(pinned.contains(&sha), "the pods are pinned to the resolved commit {sha}: {pinned}");

    // The children are applied one after another: wait for each rather than race the reconcile.
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.ns);
    eventually("the Service", || async { services.get_opt("tiny").await.unwrap() }).await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &env.ns);
    eventually("a PDB for replicas 2", || async { pdbs.get_opt("tiny").await.unwrap() }).await;

    let resolved = eventually("ModelResolved", || async {
        let lm = lms.get("tiny").await.unwrap();
        (condition(&lm, "ModelResolved").map(|c| c.0) == Some("True".into())).then_some(lm)
    })
    .await;
    assert_eq!(resolved.status.as_ref().unwrap().resolved_revision.as_deref(), Some(sha.as_str()));
    assert_eq!(condition(&resolved, "Ready").unwrap().0, "False");

    finish_rollout(&env.client, &env.ns, "tiny").await;
    // kubectl blocks; run it off this test's single-threaded runtime, where the controller runs.
    let ns = env.ns.clone();
    let out = tokio::task::spawn_blocking(move || {
        ControlPlane::shared()
            .kubectl()
            .args(["wait", "--for=condition=Ready", "lm/tiny", "-n", &ns, "--timeout=30s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    if !out.status.success() {
        let lm = lms.get("tiny").await.unwrap();
        let d = deployments.get("tiny").await.unwrap();
        panic!(
            "kubectl wait: {}{}\nstatus: {:#?}\ndeployment status: {:#?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            lm.status,
            d.status
        );
    }
    let lm = lms.get("tiny").await.unwrap();
    assert_eq!(lm.status.as_ref().unwrap().ready_replicas, Some(2));
    assert_eq!(lm.status.as_ref().unwrap().observed_generation, lm.metadata.generation);

    // A settled model reconciled again writes nothing: no apply, no status patch.
    let writes = env.ctx.metrics.writes.get();
    let versions = (lm.resource_version(), deployments.get("tiny").await.unwrap().resource_version());
    controller::reconcile(Arc::new(lm), env.ctx.clone()).await.unwrap();
    assert_eq!(env.ctx.metrics.writes.get(), writes, "a no-op reconcile made write requests");
    let after = (lms.get("tiny").await.unwrap().resource_version(), deployments.get("tiny").await.unwrap().resource_version());
    assert_eq!(after, versions);
}

#[tokio::test]
async fn an_edited_deployment_is_reverted_under_the_revert_policy() {
    let env = env("revert").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    lms.create(&PostParams::default(), &model("m", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let d = eventually("the Deployment", || async { deployments.get_opt("m").await.unwrap() }).await;
    let replicas = d.spec.as_ref().unwrap().replicas;

    let edit = json!({"spec": {"replicas": 7}});
    deployments.patch("m", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    eventually("the edit to be reverted", || async {
        let d = deployments.get("m").await.unwrap();
        (d.spec.as_ref().unwrap().replicas == replicas).then_some(())
    })
    .await;
    assert!(env.ctx.metrics.drift_corrections.get() >= 1);
    assert!(env.ctx.metrics.encode().contains("kandle_drift_detected_total{kind=\"config\"}"));
    let lm = eventually("status.drift", || async {
        let lm = lms.get("m").await.unwrap();
        lm.status.as_ref().and_then(|s| s.drift.clone()).is_some().then_some(lm)
    })
    .await;
    let drift = lm.status.unwrap().drift.unwrap();
    assert!(drift.config.iter().any(|p| p.contains("Deployment/m") && p.contains("replicas")), "{drift:?}");
}

#[tokio::test]
async fn an_edited_deployment_is_reported_and_left_alone_under_the_report_policy() {
    let env = env("report").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    lms.create(&PostParams::default(), &model("m", json!({"drift": {"policy": "Report"}}))).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    eventually("the Deployment", || async { deployments.get_opt("m").await.unwrap() }).await;

    let edit = json!({"spec": {"replicas": 5}});
    deployments.patch("m", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    let lm = eventually("Drifted=True", || async {
        let lm = lms.get("m").await.unwrap();
        (condition(&lm, "Drifted").map(|c| c.0) == Some("True".into())).then_some(lm)
    })
    .await;
    let message = &lm.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Drifted").unwrap().message;
    assert!(message.contains("replicas"), "{message}");
    assert_eq!(deployments.get("m").await.unwrap().spec.unwrap().replicas, Some(5), "Report must not revert");
    assert_eq!(env.ctx.metrics.drift_corrections.get(), 0);
}

#[tokio::test]
async fn deleting_a_model_removes_its_children_and_nothing_else() {
    let env = env("delete").await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let bystander = ConfigMap { metadata: ObjectMeta { name: Some("m".into()), ..Default::default() }, ..Default::default() };
    cms.create(&PostParams::default(), &bystander).await.unwrap();
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    lms.create(&PostParams::default(), &model("m", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    eventually("the Deployment", || async { deployments.get_opt("m").await.unwrap() }).await;
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.ns);
    eventually("the Service", || async { services.get_opt("m").await.unwrap() }).await;

    lms.delete("m", &DeleteParams::default()).await.unwrap();
    eventually("the model to be gone", || async { lms.get_opt("m").await.unwrap().is_none().then_some(()) }).await;
    assert!(deployments.get_opt("m").await.unwrap().is_none());
    assert!(services.get_opt("m").await.unwrap().is_none());
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(pdbs.get_opt("m").await.unwrap().is_none());
    assert!(cms.get_opt("m").await.unwrap().is_some(), "a ConfigMap kandle does not own was touched");
}

#[tokio::test]
async fn a_missing_token_secret_degrades_the_model_until_the_secret_appears() {
    let env = env("token").await;
    env.hub.require_token("org/tiny", "hf_test_token_value");
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    let spec = json!({"model": {"huggingFace": {"repo": "org/tiny", "tokenSecretRef": {"name": "hf", "key": "token"}}}});
    lms.create(&PostParams::default(), &model("private", spec)).await.unwrap();
    let lm = eventually("ModelResolved=False", || async {
        let lm = lms.get("private").await.unwrap();
        (condition(&lm, "ModelResolved").map(|c| c.0) == Some("False".into())).then_some(lm)
    })
    .await;
    assert_eq!(condition(&lm, "ModelResolved").unwrap().1, "TokenSecretMissing");
    assert_eq!(condition(&lm, "Degraded").map(|c| c.0), Some("True".into()));
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(deployments.get_opt("private").await.unwrap().is_none(), "nothing is deployed unpinned");

    let secret = Secret {
        metadata: ObjectMeta { name: Some("hf".into()), ..Default::default() },
        data: Some([("token".to_string(), ByteString(b"hf_test_token_value".to_vec()))].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &secret).await.unwrap();
    // Secrets are not watched (a cluster-wide Secret watch is more privilege than kandle wants);
    // the backoff retry would pick it up within 30 s. Reconcile now instead of waiting.
    let err = controller::reconcile(Arc::new(lms.get("private").await.unwrap()), env.ctx.clone()).await;
    assert!(err.is_ok(), "{err:?}");
    let lm = lms.get("private").await.unwrap();
    assert_eq!(condition(&lm, "ModelResolved").map(|c| c.0), Some("True".into()));
    assert!(deployments.get_opt("private").await.unwrap().is_some());
    assert!(env.hub.requests().iter().any(|r| r.authorized));
    let everything = format!("{:?}", lm.status);
    assert!(!everything.contains("hf_test_token_value"), "the token leaked into status");
}

#[tokio::test]
async fn an_unknown_repository_is_reported_with_a_reason_the_user_can_act_on() {
    let env = env("unknown").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    let spec = json!({"model": {"huggingFace": {"repo": "org/does-not-exist"}}});
    lms.create(&PostParams::default(), &model("ghost", spec)).await.unwrap();
    let lm = eventually("ModelResolved=False", || async {
        let lm = lms.get("ghost").await.unwrap();
        (condition(&lm, "ModelResolved").map(|c| c.0) == Some("False".into())).then_some(lm)
    })
    .await;
    assert_eq!(condition(&lm, "ModelResolved").unwrap().1, "RepositoryNotFound");
}

#[tokio::test]
async fn the_operator_binary_reconciles_a_model_to_ready() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace("binary").await;
    let hub = FakeHub::start().unwrap();
    hub.add_repo("org/tiny", [("config.json", b"{}".to_vec())]);
    let collector = OtlpCollector::start().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(kandle_tests::workspace_binary("kandle-operator"))
        .args(["run", "--log-format", "text", "--namespace", &ns, "--leader-election-namespace", &ns])
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--hub-endpoint", &hub.url(), "--metrics-addr", &format!("127.0.0.1:{port}")])
        // Traces: nothing leaves on the batch schedule within the test, all at exit.
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url())
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let lms: Api<LanguageModel> = Api::namespaced(client.clone(), &ns);
    lms.create(&PostParams::default(), &model("tiny", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("the Deployment", || async { deployments.get_opt("tiny").await.unwrap() }).await;
    finish_rollout(&client, &ns, "tiny").await;
    eventually("Ready=True", || async {
        let lm = lms.get("tiny").await.unwrap();
        (condition(&lm, "Ready").map(|c| c.0) == Some("True".into())).then_some(())
    })
    .await;

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kandle_reconcile_duration_seconds"), "{metrics}");
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    // SIGTERM stops it cleanly.
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the operator exits on SIGTERM").unwrap();
    assert!(status.success(), "{status}");

    // The reconciles' spans reached the collector as the operator exited, named for the model.
    assert_eq!(collector.refused(), Vec::<String>::new());
    let spans = collector.spans();
    let reconciles: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.name == "reconcile" && string_attribute(&s.attributes, "model") == Some(&format!("{ns}/tiny")))
        .collect();
    assert!(!reconciles.is_empty(), "reconcile spans of {ns}/tiny among {:?}", spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>());
    for (resource, _) in &reconciles {
        let resource = resource.as_ref().expect("a resource");
        assert_eq!(string_attribute(&resource.attributes, "service.name"), Some("kandle-operator"));
    }
    // Only the operator's own spans: none of the Kubernetes client's or the HTTP stack's.
    assert!(spans.iter().all(|(_, s)| s.name == "reconcile"), "{:?}", spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>());
}

fn spawn_operator(cp: &ControlPlane, ns: &str, hub: &FakeHub, identity: &str) -> tokio::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    tokio::process::Command::new(kandle_tests::workspace_binary("kandle-operator"))
        .args(["run", "--log-format", "text", "--namespace", ns, "--leader-election-namespace", ns])
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--hub-endpoint", &hub.url(), "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("POD_NAME", identity)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt("kandle-operator").await.unwrap()?.spec?.holder_identity
}

async fn reporting_instances(client: &Client, ns: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    // The API server's own controllers record Events too (e.g. the Service IP allocator).
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("kandle-operator"))
        .filter_map(|e| e.reporting_instance)
        .collect()
}

#[tokio::test]
async fn of_two_operator_processes_only_the_leader_reconciles_and_the_other_takes_over() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace("leader").await;
    let hub = FakeHub::start().unwrap();
    hub.add_repo("org/tiny", [("config.json", b"{}".to_vec())]);

    let mut a = spawn_operator(cp, &ns, &hub, "op-a");
    eventually("op-a to lead", || async { (lease_holder(&client, &ns).await.as_deref() == Some("op-a")).then_some(()) }).await;
    let _b = spawn_operator(cp, &ns, &hub, "op-b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lease_holder(&client, &ns).await.as_deref(), Some("op-a"), "the standby must not take a live lease");

    let lms: Api<LanguageModel> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    lms.create(&PostParams::default(), &model("one", json!({}))).await.unwrap();
    eventually("Deployment one", || async { deployments.get_opt("one").await.unwrap() }).await;
    // Events are published right after each write: wait for the first, then check them all.
    let instances = eventually("an Event from the operator", || async {
        let i = reporting_instances(&client, &ns).await;
        (!i.is_empty()).then_some(i)
    })
    .await;
    assert!(instances.iter().all(|i| i == "op-a"), "only the leader acts: {instances:?}");

    a.kill().await.unwrap();
    let killed = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while lease_holder(&client, &ns).await.as_deref() != Some("op-b") {
        assert!(tokio::time::Instant::now() < deadline, "op-b did not take over within 40 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let takeover = killed.elapsed();
    eprintln!("standby took over {takeover:.1?} after the leader was killed");
    assert!(takeover <= Duration::from_secs(20), "takeover took {takeover:?} (lease 15 s + retry 2 s)");
    lms.create(&PostParams::default(), &model("two", json!({}))).await.unwrap();
    eventually("Deployment two", || async { deployments.get_opt("two").await.unwrap() }).await;
    eventually("an Event from op-b", || async {
        reporting_instances(&client, &ns).await.iter().any(|i| i == "op-b").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_spec_change_rolls_out_and_kubectl_scale_reaches_the_deployment() {
    let env = env("rollout").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    lms.create(&PostParams::default(), &model("m", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let hash = |d: &Deployment| d.annotations().get("kandle.dev/pod-template-hash").cloned();
    let first = eventually("the Deployment", || async { deployments.get_opt("m").await.unwrap() }).await;
    finish_rollout(&env.client, &env.ns, "m").await;
    eventually("Ready=True", || async {
        let lm = lms.get("m").await.unwrap();
        (condition(&lm, "Ready").map(|c| c.0) == Some("True".into())).then_some(())
    })
    .await;

    // A change to what the pods run: new template hash, Progressing until the rollout is done.
    let change = json!({"spec": {"runtime": {"maxNewTokens": 256}}});
    lms.patch("m", &PatchParams::default(), &Patch::Merge(&change)).await.unwrap();
    let updated = eventually("a new pod template", || async {
        let d = deployments.get("m").await.unwrap();
        (hash(&d) != hash(&first)).then_some(d)
    })
    .await;
    assert!(hash(&updated).is_some());
    let args = serde_json::to_string(&updated.spec.as_ref().unwrap().template).unwrap();
    // Quoted, so that a hex hash or commit that happens to hold "256" cannot pass for it.
    assert!(args.contains("\"256\""), "the new limit reaches the server's flags: {args}");
    eventually("Progressing=True, Ready=False", || async {
        let lm = lms.get("m").await.unwrap();
        let progressing = condition(&lm, "Progressing").map(|c| c.0) == Some("True".into());
        let ready = condition(&lm, "Ready").map(|c| c.0) == Some("False".into());
        (progressing && ready && lm.status.as_ref()?.observed_generation == lm.metadata.generation).then_some(())
    })
    .await;
    finish_rollout(&env.client, &env.ns, "m").await;
    eventually("Ready=True after the rollout", || async {
        let lm = lms.get("m").await.unwrap();
        (condition(&lm, "Ready").map(|c| c.0) == Some("True".into())).then_some(())
    })
    .await;

    // `kubectl scale` goes through the scale subresource to spec.replicas, then the Deployment.
    let ns = env.ns.clone();
    let out = tokio::task::spawn_blocking(move || {
        ControlPlane::shared().kubectl().args(["scale", "lm/m", "--replicas=3", "-n", &ns]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "kubectl scale: {}", String::from_utf8_lossy(&out.stderr));
    eventually("3 replicas in the Deployment", || async {
        (deployments.get("m").await.unwrap().spec?.replicas == Some(3)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_from_the_generated_template_is_admitted_under_the_restricted_pod_security_standard() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kandle_operator::builders::{self, Resolution};

    let env = env("psa").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    // With files mounted from a Secret and a ConfigMap, volume kinds the standard allows.
    let files = json!({"runtime": {"files": [
        {"mountPath": "/etc/otel", "secretName": "collector-ca"},
        {"mountPath": "/etc/kandle/template", "configMapName": "chat-template"},
    ]}});
    let lm = lms.create(&PostParams::default(), &model("m", files)).await.unwrap();
    let label = json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    Api::<Namespace>::all(env.client.clone()).patch(&env.ns, &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();

    let resolution = Resolution { revision: Some("0123456789abcdef0123456789abcdef01234567".into()), model_bytes: None };
    let deployment = builders::deployment(&lm, &env.ctx.builder, &resolution).unwrap();
    let template = deployment.spec.unwrap().template;
    let pod = Pod {
        metadata: ObjectMeta { name: Some("m-dry-run".into()), labels: template.metadata.and_then(|m| m.labels), ..Default::default() },
        spec: template.spec,
        ..Default::default()
    };
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.create(&PostParams { dry_run: true, ..Default::default() }, &pod)
        .await
        .unwrap_or_else(|e| panic!("the restricted namespace refused kandle's pod: {e}"));

    // And the check has teeth: a privileged variant is refused.
    let mut bad = pod.clone();
    bad.spec.as_mut().unwrap().containers[0].security_context = Some(k8s_openapi::api::core::v1::SecurityContext {
        privileged: Some(true),
        ..Default::default()
    });
    let err = pods.create(&PostParams { dry_run: true, ..Default::default() }, &bad).await.unwrap_err();
    assert!(err.to_string().contains("violates PodSecurity"), "{err}");
}

#[tokio::test]
async fn a_refused_token_and_an_unreachable_hub_each_get_their_own_reason() {
    let env = env("hub-errors").await;
    env.hub.require_token("org/tiny", "hf_the_right_one");
    let secret = Secret {
        metadata: ObjectMeta { name: Some("hf".into()), ..Default::default() },
        data: Some([("token".to_string(), ByteString(b"hf_a_wrong_one".to_vec()))].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &secret).await.unwrap();
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    let spec = json!({"model": {"huggingFace": {"repo": "org/tiny", "tokenSecretRef": {"name": "hf", "key": "token"}}}});
    lms.create(&PostParams::default(), &model("refused", spec)).await.unwrap();
    let lm = eventually("HubUnauthorized", || async {
        let lm = lms.get("refused").await.unwrap();
        (condition(&lm, "ModelResolved").map(|c| c.1) == Some("HubUnauthorized".into())).then_some(lm)
    })
    .await;
    let text = serde_json::to_string(&lm.status).unwrap();
    assert!(!text.contains("hf_a_wrong_one"), "the token leaked into status: {text}");
    assert!(env.ctx.metrics.encode().contains("kandle_models{phase=\"Degraded\"} 1"), "{}", env.ctx.metrics.encode());

    // A hub nobody answers at: a closed loopback port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let builder = BuilderConfig { runtime_image: "r".into(), hub_endpoint: Some(format!("http://127.0.0.1:{closed}")), ..BuilderConfig::default() };
    let ctx = Arc::new(Context::new(env.client.clone(), builder, Arc::new(Metrics::default())));
    // In a namespace env's controller does not watch, so only this reconcile touches it.
    let other = ControlPlane::shared().namespace("hub-offline").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &other);
    lms.create(&PostParams::default(), &model("offline", json!({}))).await.unwrap();
    // The first reconcile only adds kandle's finalizer; the second does the work.
    controller::reconcile(Arc::new(lms.get("offline").await.unwrap()), ctx.clone()).await.unwrap();
    let lm = lms.get("offline").await.unwrap();
    let err = controller::reconcile(Arc::new(lm), ctx.clone()).await.unwrap_err();
    assert!(matches!(err, kandle_operator::Error::Resolve(_)), "{err}");
    assert!(!err.is_permanent(), "an unreachable hub is worth a quick retry: {err}");
    let lm = eventually("HubUnreachable", || async {
        let lm = lms.get("offline").await.unwrap();
        (condition(&lm, "ModelResolved").map(|c| c.1) == Some("HubUnreachable".into())).then_some(lm)
    })
    .await;
    assert_eq!(condition(&lm, "Degraded").map(|c| c.0), Some("True".into()));
}

#[tokio::test]
async fn a_paused_model_gets_no_writes_to_its_children_but_still_reports_status() {
    let env = env("paused").await;
    let lms: Api<LanguageModel> = Api::namespaced(env.client.clone(), &env.ns);
    lms.create(&PostParams::default(), &model("m", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    eventually("the Deployment", || async { deployments.get_opt("m").await.unwrap() }).await;

    lms.patch("m", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"paused": true}}))).await.unwrap();
    eventually("status for the paused generation", || async {
        let lm = lms.get("m").await.unwrap();
        (lm.status.as_ref()?.observed_generation == lm.metadata.generation).then_some(())
    })
    .await;
    // Neither a spec change nor an edit to a child is acted on while paused.
    let change = json!({"spec": {"runtime": {"maxNewTokens": 4321}}});
    lms.patch("m", &PatchParams::default(), &Patch::Merge(&change)).await.unwrap();
    deployments.patch("m", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"replicas": 4}}))).await.unwrap();
    eventually("status for the changed generation", || async {
        let lm = lms.get("m").await.unwrap();
        (lm.status.as_ref()?.observed_generation == lm.metadata.generation).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = deployments.get("m").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(4), "a paused model's drift must not be reverted");
    let template = serde_json::to_string(&d.spec.unwrap().template).unwrap();
    assert!(!template.contains("\"4321\""), "a paused model must not roll out: {template}");

    // Unpausing applies the pending change and reverts the edit.
    lms.patch("m", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"paused": false}}))).await.unwrap();
    eventually("the pending change applied", || async {
        let d = deployments.get("m").await.unwrap();
        let template = serde_json::to_string(&d.spec.as_ref()?.template).unwrap();
        (template.contains("\"4321\"") && d.spec?.replicas == Some(2)).then_some(())
    })
    .await;
}
