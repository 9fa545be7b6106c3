//! The `LanguageModel` CRD against a real kube-apiserver: it installs (so every CEL rule compiles
//! and fits the API server's cost budget), the valid manifest is accepted and defaulted, the
//! scale subresource drives `spec.replicas`, and every manifest of
//! `operator/tests/invalid/languagemodels.yaml` is refused with a 422 whose message names the
//! field. The CRD is read from `crds/`, which a kandle-operator test keeps byte-identical to
//! `kandle-operator crd`.
use kandle_tests::{
    control_plane::{ControlPlane, apply_crd},
    repo_root,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// Installs (or re-applies) the committed CRD and waits until it is served.
async fn install_crd(client: &Client) {
    let path = repo_root().join("crds/languagemodels.kandle.dev.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    apply_crd(client, &text).await;
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kandle.dev", "v1alpha1", "LanguageModel"),
        "languagemodels",
    )
}

struct Cases {
    valid: Value,
    invalid: Vec<Value>,
}

fn cases() -> Cases {
    let path = repo_root().join("operator/tests/invalid/languagemodels.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let all: Value = serde_yaml::from_str(&text).expect("the cases parse");
    Cases { valid: all["valid"].clone(), invalid: all["invalid"].as_array().expect("an `invalid` list").clone() }
}

/// JSON merge patch (RFC 7386), the way the cases are written.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn object(manifest: Value) -> DynamicObject {
    serde_json::from_value(manifest).expect("a manifest is an object")
}

#[tokio::test]
async fn the_valid_language_model_is_accepted_and_defaulted() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace("lm-crd").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource());

    let created = api
        .create(&PostParams::default(), &object(cases().valid))
        .await
        .unwrap_or_else(|e| panic!("the valid manifest was refused: {e}"));
    let spec = &created.data["spec"];
    assert_eq!(spec["model"]["huggingFace"]["revision"], "main", "{spec:#}");
    assert_eq!(spec["model"]["dtype"], "auto");
    assert_eq!(spec["drift"]["policy"], "Revert");
    assert_eq!(spec["paused"], false);
    assert_eq!(spec["cache"]["accessMode"], "ReadWriteOnce");

    // A minimal manifest gets the documented defaults.
    let minimal = json!({
        "apiVersion": "kandle.dev/v1alpha1",
        "kind": "LanguageModel",
        "metadata": {"name": "minimal"},
        "spec": {"model": {"huggingFace": {"repo": "sentence-transformers/all-MiniLM-L6-v2"}}}
    });
    let created = api.create(&PostParams::default(), &object(minimal)).await.expect("a minimal manifest is accepted");
    let spec = &created.data["spec"];
    assert_eq!(spec["replicas"], 1, "{spec:#}");
    assert_eq!(spec["serving"]["port"], 8080);
    assert_eq!(spec["serving"]["serviceType"], "ClusterIP");
}

#[tokio::test]
async fn the_scale_subresource_sets_spec_replicas() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace("lm-scale").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource());
    api.create(&PostParams::default(), &object(cases().valid)).await.expect("create");

    let scale = api
        .patch_scale("smollm", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .expect("the scale subresource answers");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    let lm = api.get("smollm").await.expect("get");
    assert_eq!(lm.data["spec"]["replicas"], 3);
}

#[tokio::test]
async fn every_invalid_language_model_is_refused_with_a_message_naming_the_field() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace("lm-invalid").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource());
    let cases = cases();
    assert!(cases.invalid.len() >= 15, "at least 15 invalid manifests, found {}", cases.invalid.len());

    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let mut failures = Vec::new();
    for case in &cases.invalid {
        let name = case["name"].as_str().expect("a case name");
        let expected = case["refusedWith"].as_str().expect("refusedWith");
        let mut manifest = cases.valid.clone();
        if let Some(spec) = case.get("spec") {
            merge_patch(&mut manifest["spec"], spec);
        }
        if let Some(meta) = case.get("metadata") {
            merge_patch(&mut manifest["metadata"], meta);
        }
        match api.create(&dry_run, &object(manifest)).await {
            Ok(_) => failures.push(format!("{name}: accepted, expected a refusal containing {expected:?}")),
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains(expected) => {}
            Err(e) => failures.push(format!("{name}: expected a 422 containing {expected:?}, got: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.invalid.len(),
        failures.join("\n")
    );
}
