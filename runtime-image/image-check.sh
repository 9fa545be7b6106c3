#!/usr/bin/env bash
# Builds runtime-image/Dockerfile's CPU image and runs it, on a machine without Docker whose
# only network is the package registries (Debian's mirror, crates.io): buildah from Debian,
# as root, with chroot isolation (no OCI runtime or cgroups needed, so it works inside a
# container). Docker Hub being out of reach, the two base images the CPU stages name are made
# here first, under the names the Dockerfile asks for:
#   debian:bookworm-slim   mmdebstrap's minbase bookworm from Debian's mirror (what the
#                          official slim image is: no ca-certificates, which the Dockerfile
#                          installs itself);
#   rust:1.89-bookworm     that, with gcc, libc6-dev, ca-certificates (and the CAs this
#                          machine adds to the system's, for its egress proxy), and this
#                          machine's default Rust toolchain through rustup at
#                          /usr/local/{cargo,rustup} as in the official image (the toolchain
#                          is newer than 1.89: the workspace's rust-version, 1.89, is the most
#                          any locked crate needs, as `cargo metadata` shows).
# Then the Dockerfile is built (`buildah bud`, network for crates.io) from a clean clone of
# HEAD, unchanged but for `${DEVICE}` written out as `cpu` (see below), and the image is
# checked: its user is 65532 and processes in it run as that uid, its entrypoint is the
# binary and its command `serve --help`, which runs, and the entrypoint serves SmolLM2
# (mounted read-only) to /ready and a completion. The CUDA stages need NVIDIA's images and
# are not built here.
#
#   sudo bash runtime-image/image-check.sh     # ~7 min here, most of it the release build
#   sudo bash runtime-image/image-check.sh --checks-only    # the checks of the last build
#
# Images live in containers/storage (vfs driver: works inside containers, where overlay may
# not); `buildah rmi kandle-runtime:check`, the two base tags and `buildah rmi --prune` (the
# build stages' images) clean up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in buildah mmdebstrap curl git; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install buildah mmdebstrap curl git" >&2; exit 1; }
done
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}" BUILDAH_ISOLATION=chroot
exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
phase() { printf '\n==> %s\n' "$*"; }

if ! exists docker.io/library/debian:bookworm-slim; then
  phase "base: debian:bookworm-slim from Debian's mirror"
  mmdebstrap --variant=minbase bookworm "$work/bookworm.tar" http://deb.debian.org/debian
  c=$(buildah from scratch)
  buildah add "$c" "$work/bookworm.tar" /
  buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  buildah commit --rm "$c" docker.io/library/debian:bookworm-slim
fi

if ! exists docker.io/library/rust:1.89-bookworm; then
  phase "base: rust:1.89-bookworm = that + gcc + this machine's toolchain"
  toolchain=$(rustup show active-toolchain | cut -d' ' -f1)
  c=$(buildah from docker.io/library/debian:bookworm-slim)
  buildah run --network host "$c" -- sh -c 'apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates pkg-config && rm -rf /var/lib/apt/lists/*'
  # The CAs this machine adds to the system's (an egress proxy that re-signs TLS, where
  # there is one), so that cargo in the build stage reaches crates.io as cargo here does.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    buildah copy "$c" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/
    buildah run "$c" -- update-ca-certificates
  fi
  buildah run "$c" -- mkdir -p /usr/local/cargo/bin "/usr/local/rustup/toolchains/$toolchain"
  # The toolchain without its documentation (share/, ~800 MB).
  home=$(dirname "$(dirname "$(rustup which rustc)")")
  for part in bin etc lib libexec; do
    buildah copy "$c" "$home/$part" "/usr/local/rustup/toolchains/$toolchain/$part"
  done
  buildah copy "$c" "$(command -v rustup)" /usr/local/cargo/bin/rustup
  buildah run "$c" -- sh -c "cd /usr/local/cargo/bin && for p in cargo rustc rustdoc; do ln -s rustup \$p; done \
    && RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo ./rustup default $toolchain"
  buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  buildah commit --rm "$c" docker.io/library/rust:1.89-bookworm
fi

if [ "${1:-}" != "--checks-only" ]; then
  phase "build: runtime-image/Dockerfile, from a clean clone of HEAD"
  git clone -q . "$work/src"
  # Debian's buildah (1.28) takes `FROM build-${DEVICE}` for an image to pull, not the stage
  # the ARG names (BuildKit resolves it): the one change, DEVICE written out as cpu.
  sed 's/\${DEVICE}/cpu/g' runtime-image/Dockerfile >"$work/Dockerfile"
  buildah bud --network host --layers=false -f "$work/Dockerfile" -t kandle-runtime:check "$work/src"
fi

phase "check: user, entrypoint, default command"
user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' kandle-runtime:check)
entry=$(buildah inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' kandle-runtime:check)
cmd=$(buildah inspect --type image --format '{{.OCIv1.Config.Cmd}}' kandle-runtime:check)
[ "$user" = "65532:65532" ] || { echo "user is '$user', not 65532:65532" >&2; exit 1; }
[ "$entry" = '[/usr/local/bin/kandle-runtime]' ] || { echo "entrypoint is $entry" >&2; exit 1; }
[ "$cmd" = '[serve --help]' ] || { echo "command is $cmd" >&2; exit 1; }
c=$(buildah from kandle-runtime:check)
trap 'buildah rm "$c" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
[ "$(buildah run "$c" -- id -u)" = 65532 ] || { echo "processes do not run as 65532" >&2; exit 1; }
buildah run "$c" -- /usr/local/bin/kandle-runtime serve --help | grep -q -- "--model" || { echo "serve --help fails" >&2; exit 1; }
echo "user $user, entrypoint $entry, command $cmd"

phase "check: it serves SmolLM2 from a read-only mount"
gguf=$(find "${KANDLE_CACHE:-$HOME/.cache/kandle}" -name 'SmolLM2-135M-Instruct*Q4_1*.gguf' 2>/dev/null | head -1)
[ -n "$gguf" ] || { echo "no SmolLM2 GGUF in the test cache: run cargo test -p kandle-tests --test runtime_models first" >&2; exit 1; }
port=18089
buildah run --network host -v "$(dirname "$gguf"):/models:ro" "$c" -- \
  /usr/local/bin/kandle-runtime serve --model "/models/$(basename "$gguf")" --port "$port" >"$work/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; buildah rm "$c" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/ready" || { cat "$work/serve.log" >&2; exit 1; }
echo
model=$(curl -sf "http://127.0.0.1:$port/v1/models" | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0, \"ignore_eos\": true}" | tee "$work/answer.json"; echo
grep -q '"completion_tokens":8' "$work/answer.json" || { echo "no 8-token completion" >&2; cat "$work/serve.log" >&2; exit 1; }
echo "image-check: OK (kandle-runtime:check $(buildah images --format '{{.ID}}, {{.Size}}' kandle-runtime:check))"
