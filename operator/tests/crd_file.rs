//! The committed CRD must be exactly what `kandle-operator crd` prints: the Rust types are the
//! only source of the API, and a stale YAML would install a different API than the operator
//! expects.
use std::path::Path;

#[test]
fn the_committed_crd_is_exactly_what_kandle_operator_crd_prints() {
    check(kandle_operator::crd::CRD_PATH);
}

/// Helm installs the chart's `crds/` copy: it must be the same bytes, or `helm install` and
/// `kubectl apply -f crds/` would give different APIs.
#[test]
fn the_charts_crd_is_exactly_what_kandle_operator_crd_prints() {
    check(kandle_operator::crd::CHART_CRD_PATH);
}

fn check(relative: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let generated = kandle_operator::crd::crd_yaml().expect("render the CRD");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nGenerate it from the workspace root with:\n  cargo run -p kandle-operator -- crd | tee {} {}",
            path.display(),
            kandle_operator::crd::CRD_PATH,
            kandle_operator::crd::CHART_CRD_PATH
        )
    });
    if committed != generated {
        let first_diff = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "lengths differ".to_owned(), |i| format!("first difference at line {}", i + 1));
        panic!(
            "{} is stale ({first_diff}). It is generated from operator/src/api.rs; regenerate it from the \
             workspace root with:\n  cargo run -p kandle-operator -- crd | tee {} {}",
            relative,
            kandle_operator::crd::CRD_PATH,
            kandle_operator::crd::CHART_CRD_PATH
        );
    }
}
