//! The committed CRD must be exactly what `kandle-operator crd` prints: the Rust types are the
//! only source of the API, and a stale YAML would install a different API than the operator
//! expects.
use std::path::Path;

#[test]
fn the_committed_crd_is_exactly_what_kandle_operator_crd_prints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(kandle_operator::crd::CRD_PATH);
    let generated = kandle_operator::crd::crd_yaml().expect("render the CRD");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nGenerate it from the workspace root with:\n  cargo run -p kandle-operator -- crd > {}",
            path.display(),
            kandle_operator::crd::CRD_PATH
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
             workspace root with:\n  cargo run -p kandle-operator -- crd > {}",
            kandle_operator::crd::CRD_PATH,
            kandle_operator::crd::CRD_PATH
        );
    }
}
