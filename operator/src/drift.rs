//! Config drift: which fields kandle owns in a child differ in the live object.
//!
//! "Owned" means present in the desired object the builders produce, which is exactly what
//! kandle server-side applies. The live object has much more (defaults, status, other managers'
//! fields); none of that is drift. So the comparison walks the *desired* JSON:
//! - objects: every key kandle sets must be present in the live object with an equal value;
//! - lists of objects with a `name` (containers, env, volumes, ports, mounts): matched by name,
//!   so that entries another manager added (a sidecar, an extra env var) are not kandle's and
//!   not drift, while an edit to one of kandle's entries is;
//! - other lists (args, command, tolerations, access modes): server-side apply replaces them
//!   whole, so their length and every item must match;
//! - quantities (under `requests`, `limits`, and a `storage` request) compare by value,
//!   because the API server rewrites them in canonical form (`1024Mi` comes back as `1Gi`).
//!
//! Of the metadata only labels and annotations are compared (name, namespace and owner are
//! identity, not configuration).
use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result};

/// One owned field whose live value differs from kandle's.
#[derive(Clone, Debug, PartialEq)]
pub struct Difference {
    /// Path of the field, e.g. `spec.template.spec.containers[runtime].image`.
    pub path: String,
    /// kandle's value.
    pub desired: Value,
    /// The live value, `None` when the field is missing.
    pub live: Option<Value>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values are left out on purpose: an env value could be a secret someone pasted in.
        match self.live {
            Some(_) => write!(f, "{} changed", self.path),
            None => write!(f, "{} removed", self.path),
        }
    }
}

/// Differences between the desired child and the live one, over the fields kandle owns.
pub fn config_drift<K: Serialize>(desired: &K, live: &K) -> Result<Vec<Difference>> {
    let desired =
        owned_view(serde_json::to_value(desired).map_err(|source| Error::Serialize { what: "desired child", source })?);
    let live = serde_json::to_value(live).map_err(|source| Error::Serialize { what: "live child", source })?;
    let mut out = Vec::new();
    diff_value("", &desired, &live, Context::Plain, &mut out);
    Ok(out)
}

/// Drops what is not configuration: status, and metadata other than labels and annotations.
fn owned_view(mut desired: Value) -> Value {
    if let Value::Object(map) = &mut desired {
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            meta.retain(|k, _| k == "labels" || k == "annotations");
        }
    }
    desired
}

#[derive(Clone, Copy, PartialEq)]
enum Context {
    Plain,
    /// Inside `requests`/`limits` maps: values are quantities.
    Quantities,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn diff_value(path: &str, desired: &Value, live: &Value, ctx: Context, out: &mut Vec<Difference>) {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (key, dv) in d {
                let child = join(path, key);
                let child_ctx = if key == "requests" || key == "limits" { Context::Quantities } else { ctx };
                match l.get(key) {
                    Some(lv) => diff_value(&child, dv, lv, child_ctx, out),
                    None if dv.is_null() => {}
                    None => out.push(Difference { path: child, desired: dv.clone(), live: None }),
                }
            }
        }
        (Value::Array(d), Value::Array(l)) if keyed_by_name(d) => {
            for item in d {
                let name = item["name"].as_str().unwrap_or_default();
                let child = format!("{path}[{name}]");
                match l.iter().find(|li| li["name"].as_str() == Some(name)) {
                    Some(li) => diff_value(&child, item, li, ctx, out),
                    None => out.push(Difference { path: child, desired: item.clone(), live: None }),
                }
            }
        }
        (Value::Array(d), Value::Array(l)) => {
            let mut inner = Vec::new();
            if d.len() == l.len() {
                for (i, (di, li)) in d.iter().zip(l).enumerate() {
                    diff_value(&format!("{path}[{i}]"), di, li, ctx, &mut inner);
                }
            }
            // An atomic list is reported (and re-applied) as a whole.
            if d.len() != l.len() || !inner.is_empty() {
                out.push(Difference { path: path.to_owned(), desired: desired.clone(), live: Some(live.clone()) });
            }
        }
        (d, l) if ctx == Context::Quantities && quantities_equal(d, l) => {}
        (d, l) if d == l => {}
        (d, l) => out.push(Difference { path: path.to_owned(), desired: d.clone(), live: Some(l.clone()) }),
    }
}

fn keyed_by_name(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.get("name").and_then(Value::as_str).is_some())
}

fn quantities_equal(a: &Value, b: &Value) -> bool {
    let parse = |v: &Value| match v {
        Value::String(s) => parse_quantity(s),
        Value::Number(n) => n.as_i64().and_then(|i| i128::from(i).checked_mul(NANO)),
        _ => None,
    };
    matches!((parse(a), parse(b)), (Some(x), Some(y)) if x == y)
}

const NANO: i128 = 1_000_000_000;

/// A Kubernetes quantity in nano-units (`1` → 10⁹, `500m` → 5·10⁸), `None` when malformed or
/// out of range. Enough of the grammar for comparing values: sign, decimal digits, and a binary
/// (`Ki`..`Ei`), decimal (`n`, `u`, `m`, `k`..`E`) or exponent (`e3`) suffix.
pub fn parse_quantity(s: &str) -> Option<i128> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || !(whole.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())) {
        return None;
    }
    // Value = digits × 10^-len(frac) × multiplier, computed in nano-units.
    let digits: i128 = format!("{whole}{frac}").parse().ok()?;
    let (num, den): (i128, i128) = match suffix {
        "" => (NANO, 1),
        "n" => (1, 1),
        "u" => (1_000, 1),
        "m" => (1_000_000, 1),
        "k" => (NANO * 1_000, 1),
        "M" => (NANO * 1_000_000, 1),
        "G" => (NANO * 1_000_000_000, 1),
        "T" => (NANO * 1_000_000_000_000, 1),
        "P" => (NANO * 1_000_000_000_000_000, 1),
        "E" => (NANO * 1_000_000_000_000_000_000, 1),
        "Ki" => (NANO << 10, 1),
        "Mi" => (NANO << 20, 1),
        "Gi" => (NANO << 30, 1),
        "Ti" => (NANO << 40, 1),
        "Pi" => (NANO << 50, 1),
        "Ei" => (NANO << 60, 1),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().ok()?;
            if e >= 0 {
                (NANO.checked_mul(10i128.checked_pow(e as u32)?)?, 1)
            } else {
                (NANO, 10i128.checked_pow((-e) as u32)?)
            }
        }
        _ => return None,
    };
    let scale = 10i128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let value = digits.checked_mul(num)? / scale.checked_mul(den)?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::Deployment,
            core::v1::{Container, EnvVar},
        },
        apimachinery::pkg::api::resource::Quantity,
    };

    use super::*;
    use crate::builders::{BuilderConfig, Resolution, deployment, fixtures::*, service};

    fn desired() -> Deployment {
        deployment(
            &hub_model(),
            &BuilderConfig::default(),
            &Resolution { revision: Some(SHA.into()), model_bytes: None },
        )
        .unwrap()
    }

    /// The desired Deployment as the API server would return it: defaults filled in, status,
    /// identity metadata, and quantities in canonical form.
    fn as_live(d: &Deployment) -> Deployment {
        let mut live = d.clone();
        live.metadata.uid = Some("u".into());
        live.metadata.resource_version = Some("42".into());
        live.metadata.labels.as_mut().unwrap().insert("added-by".into(), "someone-else".into());
        live.status = Some(Default::default());
        let spec = live.spec.as_mut().unwrap();
        spec.min_ready_seconds = Some(0);
        let pod = spec.template.spec.as_mut().unwrap();
        pod.dns_policy = Some("ClusterFirst".into());
        let c = &mut pod.containers[0];
        c.termination_message_path = Some("/dev/termination-log".into());
        c.image_pull_policy = Some("IfNotPresent".into());
        let res = c.resources.as_mut().unwrap();
        res.requests.as_mut().unwrap().insert("cpu".into(), Quantity("2000m".into()));
        live
    }

    fn main_container(d: &mut Deployment) -> &mut Container {
        &mut d.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0]
    }

    #[test]
    fn a_live_object_with_only_defaults_and_other_fields_has_no_drift() {
        let d = desired();
        assert_eq!(config_drift(&d, &as_live(&d)).unwrap(), vec![]);
    }

    #[test]
    fn an_edited_image_is_drift_at_its_path() {
        let d = desired();
        let mut live = as_live(&d);
        main_container(&mut live).image = Some("evil:latest".into());
        let diffs = config_drift(&d, &live).unwrap();
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].path, "spec.template.spec.containers[runtime].image");
        assert_eq!(diffs[0].to_string(), "spec.template.spec.containers[runtime].image changed");
    }

    #[test]
    fn edited_replicas_resources_and_command_are_drift() {
        let d = desired();
        let mut live = as_live(&d);
        live.spec.as_mut().unwrap().replicas = Some(5);
        let c = main_container(&mut live);
        c.resources.as_mut().unwrap().limits.as_mut().unwrap().insert("memory".into(), Quantity("1Gi".into()));
        c.command = Some(vec!["sh".into()]);
        let paths: Vec<_> = config_drift(&d, &live).unwrap().into_iter().map(|d| d.path).collect();
        assert_eq!(
            paths,
            [
                "spec.replicas",
                "spec.template.spec.containers[runtime].command",
                "spec.template.spec.containers[runtime].resources.limits.memory",
            ]
        );
    }

    #[test]
    fn a_removed_or_changed_label_is_drift_but_an_added_one_is_not() {
        let d = desired();
        let mut live = as_live(&d);
        live.metadata.labels.as_mut().unwrap().remove("kandle.dev/model");
        live.metadata.labels.as_mut().unwrap().insert("app.kubernetes.io/instance".into(), "other".into());
        let diffs = config_drift(&d, &live).unwrap();
        let paths: Vec<_> = diffs.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["metadata.labels.app.kubernetes.io/instance", "metadata.labels.kandle.dev/model"]);
        assert_eq!(diffs[1].live, None);
    }

    #[test]
    fn entries_added_by_others_to_named_lists_are_not_drift_but_edits_to_kandles_are() {
        let d = desired();
        let mut live = as_live(&d);
        let pod = live.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
        pod.containers.push(Container { name: "sidecar".into(), ..Container::default() });
        pod.containers[0].env.get_or_insert_with(Vec::new).push(EnvVar {
            name: "EXTRA".into(),
            value: Some("1".into()),
            value_from: None,
        });
        assert_eq!(config_drift(&d, &live).unwrap(), vec![]);

        let env = main_container(&mut live).env.as_mut().unwrap();
        env.iter_mut().find(|e| e.name == "HF_HUB_OFFLINE").unwrap().value = Some("0".into());
        let paths: Vec<_> = config_drift(&d, &live).unwrap().into_iter().map(|d| d.path).collect();
        assert_eq!(paths, ["spec.template.spec.containers[runtime].env[HF_HUB_OFFLINE].value"]);
    }

    #[test]
    fn a_changed_argument_list_is_drift_of_the_whole_list() {
        let d = desired();
        let mut live = as_live(&d);
        main_container(&mut live).args.as_mut().unwrap().push("--debug".into());
        let diffs = config_drift(&d, &live).unwrap();
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].path, "spec.template.spec.containers[runtime].args");
    }

    #[test]
    fn service_drift_is_found_the_same_way() {
        let s = service(&hub_model()).unwrap();
        let mut live = s.clone();
        live.spec.as_mut().unwrap().cluster_ip = Some("10.0.0.1".into());
        assert_eq!(config_drift(&s, &live).unwrap(), vec![]);
        live.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        assert_eq!(config_drift(&s, &live).unwrap()[0].path, "spec.type");
    }

    #[test]
    fn quantities_compare_by_value_not_spelling() {
        assert_eq!(parse_quantity("1Gi"), parse_quantity("1024Mi"));
        assert_eq!(parse_quantity("2"), parse_quantity("2000m"));
        assert_eq!(parse_quantity("1.5"), parse_quantity("1500m"));
        assert_eq!(parse_quantity("1k"), parse_quantity("1e3"));
        assert_eq!(parse_quantity("0.5Gi"), parse_quantity("512Mi"));
        assert_eq!(parse_quantity("-1"), Some(-NANO));
        assert_ne!(parse_quantity("1G"), parse_quantity("1Gi"));
        assert_eq!(parse_quantity("lots"), None);
        assert_eq!(parse_quantity("1Xi"), None);
        assert_eq!(parse_quantity(""), None);
        assert!(quantities_equal(&Value::from("2"), &Value::from(2)));
    }
}
