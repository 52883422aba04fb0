#!/usr/bin/env bash
# Builds the real test components (kube-apiserver, kube-controller-manager,
# etcd, MinIO) from their official Go modules at the versions pinned in
# scripts/testenv-versions.env. Results are cached outside the work tree,
# keyed by component and version, so a rebuild is a no-op.
#
# Usage: build.sh [k8s-new|k8s-old|etcd|minio|all]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
source "$here/../testenv-versions.env"
CACHE=${FERRY_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-testenv}
mkdir -p "$CACHE"

log() { printf '[testenv build] %s\n' "$*" >&2; }

need_go() {
  command -v go >/dev/null 2>&1 || { log "Go toolchain not found: install Go (https://go.dev/doc/install) or the Debian package golang"; exit 1; }
}

# build_kubernetes VERSION [GOTOOLCHAIN]
# k8s.io/kubernetes cannot be 'go install'ed: its go.mod replaces every
# staging module (k8s.io/api, k8s.io/apiserver, ...) with a local directory.
# A wrapper module requires k8s.io/kubernetes at VERSION and replaces each
# staging module with its published v0.MINOR.PATCH release instead.
build_kubernetes() {
  local version=$1 toolchain=${2:-}
  local out="$CACHE/kubernetes-$version"
  if [[ -x $out/bin/kube-apiserver && -x $out/bin/kube-controller-manager ]]; then
    log "kubernetes $version: cached in $out"
    return
  fi
  need_go
  local staging_version="v0.${version#v1.}"
  local minor=${version#v1.}; minor=${minor%%.*}
  local work="$out/src"
  rm -rf "$work"; mkdir -p "$work" "$out/bin"
  local gomod
  gomod=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
  {
    echo "module ferry.dev/testenv/kubernetes"
    echo
    echo "go $(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $version"
    echo
    # Every 'k8s.io/foo => ./staging/src/k8s.io/foo' becomes
    # 'k8s.io/foo => k8s.io/foo v0.MINOR.PATCH'.
    sed -n 's#^\s*\(replace \)\?\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#replace \2 => \2 '"$staging_version"'#p' "$gomod"
  } > "$work/go.mod"
  log "kubernetes $version: building kube-apiserver and kube-controller-manager (several minutes on a fresh machine)"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (
    cd "$work"
    [[ -n $toolchain ]] && export GOTOOLCHAIN=$toolchain
    GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$out/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
  )
  log "kubernetes $version: built into $out/bin"
}

build_etcd() {
  local out="$CACHE/etcd-$ETCD_VERSION"
  if [[ -x $out/bin/etcd ]]; then log "etcd $ETCD_VERSION: cached"; return; fi
  need_go
  local work="$out/src"
  rm -rf "$work"; mkdir -p "$work" "$out/bin"
  cat > "$work/go.mod" <<GOMOD
module ferry.dev/testenv/etcd

go 1.22

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > "$work/main.go" <<'GO'
// Command etcd runs the etcd server from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  log "etcd $ETCD_VERSION: building"
  (cd "$work" && GOFLAGS=-mod=mod go build -ldflags "-s -w" -o "$out/bin/etcd" .)
}

build_minio() {
  local out="$CACHE/minio-$MINIO_VERSION"
  if [[ -x $out/bin/minio ]]; then log "minio $MINIO_VERSION: cached"; return; fi
  need_go
  mkdir -p "$out/bin"
  log "minio $MINIO_VERSION: building"
  GOBIN="$out/bin" go install -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
}

what=${1:-all}
case $what in
  k8s-new) build_kubernetes "$K8S_NEW_VERSION" ;;
  k8s-old) build_kubernetes "$K8S_OLD_VERSION" "$K8S_OLD_GOTOOLCHAIN" ;;
  etcd) build_etcd ;;
  minio) build_minio ;;
  all)
    build_etcd
    build_minio
    build_kubernetes "$K8S_NEW_VERSION"
    build_kubernetes "$K8S_OLD_VERSION" "$K8S_OLD_GOTOOLCHAIN"
    ;;
  *) log "unknown component '$what' (k8s-new, k8s-old, etcd, minio, all)"; exit 2 ;;
esac
