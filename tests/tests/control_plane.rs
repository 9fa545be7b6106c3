//! The local control plane harness against itself: a real kube-apiserver + etcd, real
//! kubectl and helm. Each test works in a namespace of its own on the shared control plane,
//! except the cleanup test, which starts and drops one of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kandle_tests::control_plane::ControlPlane;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    }
}

#[tokio::test]
async fn server_side_apply_of_an_unchanged_object_changes_nothing() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("ssa").await;
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, &ns);
    let params = PatchParams::apply("kandle-test").force();
    let mut cm = serde_json::to_value(config_map("settings", &[("a", "1")])).unwrap();
    cm["apiVersion"] = "v1".into();
    cm["kind"] = "ConfigMap".into();

    let first = api.patch("settings", &params, &Patch::Apply(&cm)).await.unwrap();
    let second = api.patch("settings", &params, &Patch::Apply(&cm)).await.unwrap();
    assert_eq!(first.resource_version(), second.resource_version(), "a no-op apply must not write");
    assert_eq!(second.data.unwrap()["a"], "1");

    cm["data"]["a"] = "2".into();
    let third = api.patch("settings", &params, &Patch::Apply(&cm)).await.unwrap();
    assert_ne!(first.resource_version(), third.resource_version(), "a real change must write");
}

#[tokio::test]
async fn a_watch_started_before_a_change_sees_it() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("watch").await;
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, &ns);
    let mut events = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    // Wait until the initial list is done, so the change below happens after the watch began.
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.try_next()).await {
            Ok(Ok(Some(Event::InitDone))) => break,
            Ok(Ok(Some(_))) => continue,
            other => panic!("watch did not finish its initial list: {other:?}"),
        }
    }
    api.create(&PostParams::default(), &config_map("seen", &[("k", "v")])).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.try_next().await.unwrap() {
            if let Event::Apply(cm) = event {
                return cm;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("the watch saw no change within 20 s");
    assert_eq!(seen.name_any(), "seen");
}

#[tokio::test]
async fn rbac_is_enforced_for_an_impersonated_service_account() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("rbac").await;
    let as_sa: Api<ConfigMap> = Api::namespaced(cp.service_account_client(&ns, "reader").await, &ns);

    let err = as_sa.list(&Default::default()).await.expect_err("no Role yet, so listing must be forbidden");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected a 403, got {other}"),
    }

    let admin = cp.client().await;
    let role = Role {
        metadata: ObjectMeta { name: Some("cm-reader".into()), ..Default::default() },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &role).await.unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some("cm-reader".into()), ..Default::default() },
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: "cm-reader".into() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, &ns).create(&PostParams::default(), &binding).await.unwrap();

    // The RBAC authorizer reads from an informer cache, so the grant takes a moment to apply.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match as_sa.list(&Default::default()).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("still refused 15 s after the Role was bound: {e}"),
        }
    }
    // The Role grants reads only.
    let err = as_sa.create(&PostParams::default(), &config_map("nope", &[])).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 403), "{err}");
}

#[test]
fn kubectl_with_the_written_kubeconfig_lists_namespaces() {
    let cp = ControlPlane::shared();
    let out = cp.kubectl().args(["get", "namespaces", "-o", "name"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l == "namespace/kube-system"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "namespace/default"), "{stdout}");

    let version = cp.kubectl().args(["version", "-o", "json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&version.stdout).expect("kubectl version -o json");
    assert_eq!(v["serverVersion"]["gitVersion"], kandle_tests::tools::K8S_VERSION, "{v}");
}

#[test]
fn helm_version_runs() {
    let cp = ControlPlane::shared();
    let out = cp.helm().args(["version", "--short"]).output().unwrap();
    assert!(out.status.success(), "helm failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(kandle_tests::tools::HELM_VERSION), "{stdout}");
}

#[test]
fn dropping_the_harness_leaves_no_etcd_or_apiserver_behind() {
    let cp = ControlPlane::start().expect("starting a second control plane");
    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} should be running");
    }
    eprintln!("second control plane started in {:.1?}", cp.started_in());
    assert!(cp.started_in() < Duration::from_secs(60), "start took {:?}", cp.started_in());
    drop(cp);
    for pid in &pids {
        // Reaped children leave no /proc entry; a reused pid would not run from our directory.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(&*dir.to_string_lossy()), "process {pid} still runs: {cmdline}");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
