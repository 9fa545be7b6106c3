//! The CRD's CEL rules, evaluated client-side with kube-cel against the generated schema, on the
//! cases of `tests/invalid/languagemodels.yaml` (the same cases the control-plane tests send to
//! a real API server). Checks that the valid manifest passes, that every invalid one is refused
//! with a message naming its field, and that every rule in the CRD is exercised by some case.
use kandle_operator::LanguageModel;
use kube::{CustomResourceExt, core::cel};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Cases {
    valid: Value,
    invalid: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    name: String,
    by: By,
    refused_with: String,
    #[serde(default)]
    spec: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
}

#[derive(Deserialize, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum By {
    /// A CEL rule (`x-kubernetes-validations`).
    Cel,
    /// OpenAPI schema validation (an enum, a type).
    Schema,
}

fn cases() -> Cases {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/invalid/languagemodels.yaml");
    let text = std::fs::read_to_string(path).expect("read the invalid manifests");
    serde_yaml::from_str(&text).expect("parse the invalid manifests")
}

/// JSON merge patch (RFC 7386).
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

fn manifest(valid: &Value, case: &Case) -> Value {
    let mut m = valid.clone();
    if let Some(spec) = &case.spec {
        merge_patch(&mut m["spec"], spec);
    }
    if let Some(meta) = &case.metadata {
        merge_patch(&mut m["metadata"], meta);
    }
    m
}

fn schema() -> Value {
    let crd = LanguageModel::crd();
    let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
    serde_json::to_value(schema).expect("schema as JSON")
}

fn cel_errors(object: &Value) -> Vec<String> {
    match cel::Validator::new().validate(&schema(), object, None) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| format!("{}: {} [{:?}]", e.field_path, e.message, e.kind)).collect(),
    }
}

/// Every `x-kubernetes-validations` rule of the schema, as (rule, message).
fn rules(schema: &Value, out: &mut Vec<(String, String)>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rs)) = map.get("x-kubernetes-validations") {
                for r in rs {
                    out.push((
                        r["rule"].as_str().unwrap_or_default().into(),
                        r["message"].as_str().unwrap_or_default().into(),
                    ));
                }
            }
            map.values().for_each(|v| rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn the_valid_manifest_passes_every_rule() {
    let cases = cases();
    assert_eq!(cel_errors(&cases.valid), Vec::<String>::new());
    let lm: LanguageModel = serde_json::from_value(cases.valid).expect("the valid manifest deserializes");
    assert_eq!(lm.spec.replicas, 2);
}

#[test]
fn there_are_at_least_fifteen_invalid_manifests_with_unique_names() {
    let cases = cases();
    assert!(cases.invalid.len() >= 15, "{}", cases.invalid.len());
    let mut names: Vec<_> = cases.invalid.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.invalid.len(), "case names are unique");
}

#[test]
fn every_invalid_manifest_is_refused_by_a_rule_whose_message_names_the_field() {
    let cases = cases();
    let mut failures = Vec::new();
    for case in cases.invalid.iter().filter(|c| c.by == By::Cel) {
        let errors = cel_errors(&manifest(&cases.valid, case));
        let field = case.refused_with.split_whitespace().next().unwrap_or_default();
        assert!(
            field.starts_with("spec.") || field.starts_with("metadata."),
            "{}: message must start with the field",
            case.name
        );
        if !errors.iter().any(|e| e.contains(&case.refused_with)) {
            failures
                .push(format!("{}: expected a refusal containing {:?}, got {errors:#?}", case.name, case.refused_with));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn schema_cases_use_a_value_outside_the_fields_enum() {
    let cases = cases();
    let schema = schema();
    for case in cases.invalid.iter().filter(|c| c.by == By::Schema) {
        let path: Vec<&str> = case.refused_with.split('.').collect();
        let mut node = &schema;
        let mut value = &manifest(&cases.valid, case);
        for key in &path {
            node = &node["properties"][*key];
            value = &value[*key];
        }
        let allowed =
            node["enum"].as_array().unwrap_or_else(|| panic!("{}: {} has no enum", case.name, case.refused_with));
        assert!(!value.is_null(), "{}: the manifest sets {}", case.name, case.refused_with);
        assert!(!allowed.contains(value), "{}: {value} is allowed by the schema", case.name);
        // Nor does any CEL rule object: the refusal is the schema's.
        assert_eq!(cel_errors(&manifest(&cases.valid, case)), Vec::<String>::new(), "{}", case.name);
    }
}

#[test]
fn every_rule_compiles_and_its_message_names_a_field() {
    let schema = schema();
    let compiled = cel::compile_schema(&schema);
    let errors: Vec<String> = compiled.compilation_errors().iter().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let mut all = Vec::new();
    rules(&schema, &mut all);
    assert!(all.len() >= 20, "{} rules", all.len());
    for (rule, message) in &all {
        assert!(
            message.starts_with("spec.") || message.starts_with("metadata.name"),
            "rule {rule:?} has a message that does not start with the field: {message:?}"
        );
    }
}

#[test]
fn every_rule_is_exercised_by_an_invalid_manifest() {
    let cases = cases();
    let mut all = Vec::new();
    rules(&schema(), &mut all);
    let untested: Vec<_> = all
        .iter()
        .filter(|(_, message)| !cases.invalid.iter().any(|c| c.by == By::Cel && message.contains(&c.refused_with)))
        .map(|(rule, message)| format!("{message} ({rule})"))
        .collect();
    assert!(untested.is_empty(), "rules without an invalid manifest:\n{}", untested.join("\n"));
}
