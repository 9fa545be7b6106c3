#!/usr/bin/env bash
# The one command that runs every kandle test: sets up what the tests need (idempotent: builds
# the control-plane binaries and helm once into the cache, fetches the test models once), then
# runs the whole Cargo test suite. Prints how long each phase took.
#
#   KANDLE_CACHE        cache root (default ~/.cache/kandle); see tests/setup-k8s.sh
#   KUBEBUILDER_ASSETS  use these kube-apiserver/etcd/kubectl instead of building them
#   extra arguments are passed to `cargo test` (e.g. `-p kandle-operator`)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

phase() { printf '\n==> %s\n' "$*"; }
took() { printf '<== %s took %d s\n' "$1" "$(( $(date +%s) - $2 ))"; }
all_start=$(date +%s)

phase "setup: control-plane binaries and helm (tests/setup-k8s.sh)"
t=$(date +%s)
bash tests/setup-k8s.sh
took "setup" "$t"

phase "build: cargo test --no-run"
t=$(date +%s)
cargo test --workspace --locked --no-run "$@"
took "build" "$t"

phase "test: cargo test"
t=$(date +%s)
# One control plane per test binary; binaries run one after another.
cargo test --workspace --locked "$@" -- --test-threads="${KANDLE_TEST_THREADS:-4}"
took "test" "$t"

took "all" "$all_start"
