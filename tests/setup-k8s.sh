#!/usr/bin/env bash
# Builds the control-plane binaries kandle's tests run against (kube-apiserver, etcd, kubectl)
# and helm, from Go modules pinned in tests/k8s-tools/go.mod and tests/helm-tool/go.mod, into a
# cache directory outside the repository. Idempotent: a binary already in the cache is kept.
#
#   KANDLE_CACHE        cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/kandle)
#   KUBEBUILDER_ASSETS  an envtest directory holding kube-apiserver, etcd and kubectl; when set,
#                       those three are taken from it and not built (helm is still built unless
#                       the directory has it too).
#
# Prints the directories it settled on as `KANDLE_K8S_BIN=...` and `KANDLE_HELM=...` lines.
set -euo pipefail

K8S_VERSION=v1.35.4
K8S_COMMIT=7b8c6cf0edd376b3d7c2f255142977c7f93db258
HELM_VERSION=v3.20.2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
k8s_dir="$cache/k8s-$K8S_VERSION"
helm_dir="$cache/helm-$HELM_VERSION"
mkdir -p "$k8s_dir" "$helm_dir"

log() { printf '[setup-k8s] %s\n' "$*" >&2; }

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    log "error: 'go' is not on PATH. Install Go >= 1.25 (https://go.dev/dl) to build the"
    log "control-plane binaries, or set KUBEBUILDER_ASSETS to a directory with kube-apiserver,"
    log "etcd and kubectl (e.g. from 'setup-envtest use 1.35.x -p path') and put helm on PATH."
    exit 1
  fi
}

# build MODULE_DIR PACKAGE OUTPUT LDFLAGS
build() {
  local mod="$1" pkg="$2" out="$3" ldflags="$4"
  if [[ -x "$out" ]]; then
    log "$(basename "$out"): cached at $out"
    return
  fi
  need_go
  local start=$SECONDS tmp="$out.tmp.$$"
  log "$(basename "$out"): building $pkg (a few minutes on 2 cores) ..."
  (cd "$mod" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false" \
      go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp" "$pkg")
  mv -f "$tmp" "$out"
  log "$(basename "$out"): built in $((SECONDS - start)) s"
}

total_start=$SECONDS

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  for b in kube-apiserver etcd kubectl; do
    if [[ ! -x "$KUBEBUILDER_ASSETS/$b" ]]; then
      log "error: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable '$b'"
      exit 1
    fi
  done
  log "using kube-apiserver, etcd and kubectl from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  k8s_dir="$KUBEBUILDER_ASSETS"
else
  build_date="2026-01-01T00:00:00Z"
  kv=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kv+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitCommit=$K8S_COMMIT -X $p.gitTreeState=clean"
    kv+=" -X $p.buildDate=$build_date -X $p.gitMajor=1 -X $p.gitMinor=35"
  done
  build "$here/k8s-tools" go.etcd.io/etcd/server/v3 "$k8s_dir/etcd" ""
  build "$here/k8s-tools" k8s.io/kubernetes/cmd/kube-apiserver "$k8s_dir/kube-apiserver" "$kv"
  build "$here/k8s-tools" k8s.io/kubernetes/cmd/kubectl "$k8s_dir/kubectl" "$kv"
fi

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "${KUBEBUILDER_ASSETS}/helm" ]]; then
  helm_dir="$KUBEBUILDER_ASSETS"
else
  build "$here/helm-tool" helm.sh/helm/v3/cmd/helm "$helm_dir/helm" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
fi

log "done in $((SECONDS - total_start)) s"
echo "KANDLE_K8S_BIN=$k8s_dir"
echo "KANDLE_HELM=$helm_dir/helm"
