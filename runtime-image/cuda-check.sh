#!/usr/bin/env bash
# Checks the CUDA build (`--features cuda`) on a machine without a GPU or a CUDA install:
#   1. fetches nvcc, the CUDA headers and cuBLAS/cuRAND/NVRTC from PyPI (NVIDIA's wheels) into
#      the cache, once;
#   2. builds kandle-runtime with the `cuda` feature (candle's kernels compiled by nvcc for
#      CUDA_COMPUTE_CAP, default 90), linking against a stand-in for the driver's libcuda that
#      answers every call with CUDA_ERROR_NO_DEVICE (the real one comes with the NVIDIA driver;
#      the Docker build links NVIDIA's own stub instead);
#   3. runs the crate's unit tests in that build, then serves the tiny llama fixture with
#      `--device cuda` and expects the load to fail with "cannot open GPU cuda:0" and a non-zero
#      exit, and with `--device cpu` to reach /ready.
# What it cannot show: anything running on a GPU. That needs a machine with one:
#   cargo test -p kandle-runtime --features cuda, and `serve --device cuda` on a real model.
#
#   KANDLE_CACHE       cache root (default ~/.cache/kandle); the toolkit goes to $KANDLE_CACHE/cuda
#   CUDA_COMPUTE_CAP   GPU generation to compile the kernels for (default 90)
#   KANDLE_CUDA_TARGET_DIR  cargo target directory (default target/cuda)
# A cold run takes ~25 min on 2 cores (nvcc compiles candle's quantised-matmul kernels).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}/cuda"
toolkit="$cache/x13/nvidia/cu13"
stub="$cache/stub"
target="${KANDLE_CUDA_TARGET_DIR:-$root/target/cuda}"

# NVIDIA's wheels: nvcc and the headers of CUDA 13.5, cuBLAS 13.10, cuRAND 10.4, NVRTC 13.5.
wheels=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-cuda-runtime==13.5.37
  nvidia-cuda-cccl==13.3.5.0.6 nvidia-nvvm==13.5.37 nvidia-cublas==13.10.0.20
  nvidia-curand==10.4.4.72 nvidia-cuda-nvrtc==13.5.37)
if [ ! -x "$toolkit/bin/nvcc" ] || [ ! -e "$toolkit/lib/libcublas.so.13" ]; then
  mkdir -p "$cache/wheels13" "$cache/x13"
  python3 -m pip download --no-deps -d "$cache/wheels13" "${wheels[@]}"
  for w in "$cache"/wheels13/*.whl; do python3 -m zipfile -e "$w" "$cache/x13/"; done
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/*
fi

# The driver stand-in: every driver API function cudarc declares, answering 100
# (CUDA_ERROR_NO_DEVICE), and the two that name an error.
cudarc="$(cargo metadata --format-version 1 --locked --features kandle-runtime/cuda \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
cudarc="$(dirname "$cudarc")"
mkdir -p "$stub"
{
  echo '/* Build-check stand-in for the NVIDIA driver: every call answers CUDA_ERROR_NO_DEVICE. */'
  grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' \
    | sort -u | grep -v -x -e cuGetErrorString -e cuGetErrorName | sed 's/.*/int &(void) { return 100; }/'
  echo 'int cuGetErrorString(int e, const char **s) { *s = "no CUDA-capable device is detected"; return 0; }'
  echo 'int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }'
} > "$stub/libcuda_stub.c"
gcc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.1" "$stub/libcuda_stub.c"
ln -sf libcuda.so.1 "$stub/libcuda.so"
for l in cublas cublasLt nvrtc cudart; do ln -sf "$toolkit/lib/lib$l.so.13" "$stub/lib$l.so"; done
ln -sf "$toolkit/lib/libcurand.so.10" "$stub/libcurand.so"

export PATH="$toolkit/bin:$PATH" CUDA_HOME="$toolkit" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc knows CUDA up to 13.4; 13.5's driver API is a superset.
export CUDARC_CUDA_VERSION=13040 CARGO_INCREMENTAL=0
export RUSTFLAGS="-L $stub" LD_LIBRARY_PATH="$stub:$toolkit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --locked -p kandle-runtime --features cuda --lib --target-dir "$target"
cargo build --locked -p kandle-runtime --features cuda --bin kandle-runtime --target-dir "$target"
bin="$target/debug/kandle-runtime"

model="$root/../shared/fixtures/tiny/llama"
[ -f "$model/config.json" ] || { echo "the tiny llama fixture is missing at $model" >&2; exit 1; }
log="$(mktemp)"
if "$bin" serve --model "$model" --device cuda --port 0 >"$log" 2>&1; then
  cat "$log" >&2; echo "FAIL: --device cuda served without a GPU" >&2; exit 1
fi
grep -q 'cannot open GPU cuda:0' "$log" || { cat "$log" >&2; echo "FAIL: no 'cannot open GPU' in the log" >&2; exit 1; }
echo "ok: --device cuda without a GPU fails the load: $(grep -o 'cannot open GPU[^"]*' "$log" | head -n1)"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$bin" serve --model "$model" --device cpu --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then
    echo "ok: the CUDA build serves --device cpu (/ready)"
    exit 0
  fi
  sleep 0.2
done
cat "$log" >&2
echo "FAIL: the CUDA build did not become ready on --device cpu" >&2
exit 1
