#!/usr/bin/env bash
# Builds the real test components (kube-apiserver, kube-controller-manager,
# etcd, MinIO) from their official Go modules at the versions pinned in
# scripts/testenv-versions.env. Results are cached outside the work tree,
# keyed by component and version, so a rebuild is a no-op.
#
# Usage: build.sh [node|test-node|k8s-new|k8s-old|etcd|minio|crds|all]
# 'all' builds the node stack (which includes the new control plane), the
# old control plane, etcd and MinIO, and fetches the public CRDs.
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

# The wrapper module's go.mod: k8s.io/kubernetes cannot be 'go install'ed,
# because its go.mod replaces every staging module (k8s.io/api,
# k8s.io/apiserver, ...) with a local directory. The wrapper requires
# k8s.io/kubernetes at VERSION and replaces each staging module with its
# published v0.MINOR.PATCH release instead; every other module built with it
# (the CSI sidecars) is held to the same staging versions by those replaces.
# kubernetes_gomod VERSION MODULE WORKDIR [REQUIRE...]
kubernetes_gomod() {
  local version=$1 module=$2 work=$3; shift 3
  local staging_version="v0.${version#v1.}" gomod
  gomod=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
  {
    echo "module $module"
    echo
    echo "go $(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $version"
    local req
    for req in "$@"; do echo "require $req"; done
    echo
    # Every 'k8s.io/foo => ./staging/src/k8s.io/foo' becomes
    # 'k8s.io/foo => k8s.io/foo v0.MINOR.PATCH'.
    sed -n 's#^\s*\(replace \)\?\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#replace \2 => \2 '"$staging_version"'#p' "$gomod"
  } > "$work/go.mod"
}

# version_ldflags VERSION: what 'kubectl version' and /version report.
version_ldflags() {
  local version=$1 minor=${1#v1.} ldflags="-s -w" pkg
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ldflags"
}

# build_kubernetes VERSION [GOTOOLCHAIN]: the control plane of node-less
# clusters (kube-apiserver and kube-controller-manager).
build_kubernetes() {
  local version=$1 toolchain=${2:-}
  local out="$CACHE/kubernetes-$version"
  if [[ -x $out/bin/kube-apiserver && -x $out/bin/kube-controller-manager ]]; then
    log "kubernetes $version: cached in $out"
    return
  fi
  need_go
  local work="$out/src"
  rm -rf "$work"; mkdir -p "$work" "$out/bin"
  kubernetes_gomod "$version" ferry.dev/testenv/kubernetes "$work"
  log "kubernetes $version: building kube-apiserver and kube-controller-manager (several minutes on a fresh machine)"
  (
    cd "$work"
    [[ -n $toolchain ]] && export GOTOOLCHAIN=$toolchain
    GOFLAGS=-mod=mod go build -ldflags "$(version_ldflags "$version")" -o "$out/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
  )
  log "kubernetes $version: built into $out/bin"
}

# The Go sources of the test node that live in this repository (the CSI
# driver and the pause program); their hash is part of the cache key.
NODE_SOURCES="$here/node"
NODE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet
  csi-provisioner csi-snapshotter snapshot-controller csi-snapshot-metadata ferry-csi pause helm)

node_stack_key() {
  local sources
  sources=$(cd "$NODE_SOURCES" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
  echo "kubernetes=$K8S_NEW_VERSION provisioner=$EXTERNAL_PROVISIONER_VERSION snapshotter=$EXTERNAL_SNAPSHOTTER_VERSION snapshot-metadata=$EXTERNAL_SNAPSHOT_METADATA_VERSION helm=$HELM_VERSION sources=$sources"
}

# build_node_stack: everything a 'new+node' cluster runs, in ONE 'go build'
# so that the packages the binaries share (client-go, apimachinery, gRPC,
# the CSI spec) compile once: the control plane, kubelet and kube-scheduler
# of K8S_NEW_VERSION, the upstream external-provisioner, csi-snapshotter,
# snapshot-controller and external-snapshot-metadata sidecar, helm, and this
# repository's test CSI driver and pause program. Static binaries (no cgo),
# so the pause program runs in an image with nothing else in it. The
# snapshot CRDs come from the snapshotter's client module, the
# SnapshotMetadataService CRD from the snapshot metadata client module.
build_node_stack() {
  local version=$K8S_NEW_VERSION
  local out="$CACHE/node-stack-$version" key
  key=$(node_stack_key)
  local missing=0 b
  for b in "${NODE_BINARIES[@]}"; do [[ -x $out/bin/$b ]] || missing=1; done
  if ((missing == 0)) && [[ -f $out/stamp && $(cat "$out/stamp") == "$key" ]]; then
    log "node stack $version: cached in $out"
    return
  fi
  need_go
  local work="$out/src"
  rm -rf "$work" "$out/stamp"; mkdir -p "$work" "$out/bin" "$out/crds"
  cp -r "$NODE_SOURCES/." "$work/"
  # The snapshot metadata sidecar is built and tested upstream with its
  # client module from its own tree (a replace, which only its own
  # repository sees); its go.mod names client v0.2.0 for everyone else,
  # which the Go module proxy does not serve. The client tagged with the
  # sidecar's version is that very tree, and MVS selects it over v0.2.0.
  kubernetes_gomod "$version" ferry.dev/testenv/node "$work" \
    "github.com/kubernetes-csi/external-provisioner/v6 $EXTERNAL_PROVISIONER_VERSION" \
    "github.com/kubernetes-csi/external-snapshotter/v8 $EXTERNAL_SNAPSHOTTER_VERSION" \
    "github.com/kubernetes-csi/external-snapshotter/client/v8 $EXTERNAL_SNAPSHOTTER_VERSION" \
    "github.com/kubernetes-csi/external-snapshot-metadata $EXTERNAL_SNAPSHOT_METADATA_VERSION" \
    "github.com/kubernetes-csi/external-snapshot-metadata/client $EXTERNAL_SNAPSHOT_METADATA_VERSION" \
    "helm.sh/helm/v3 $HELM_VERSION"
  # The sidecar's runtime package carries its unit tests' harness in a
  # plain .go file (test_harness.go), so the binary would link csi-test's
  # mocks, built on github.com/golang/mock; the csi-test the provisioner and
  # the snapshotter require (for their own tests) has moved to
  # go.uber.org/mock, and no csi-test release fits both that and the CSI
  # spec of this build. Nothing outside the sidecar's tests uses the
  # harness, so the sidecar is built from a copy of its module (in the
  # build directory, from the module cache) without that one file.
  local metadata_dir
  metadata_dir=$(cd "$work" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshot-metadata)
  cp -r "$metadata_dir" "$work/external-snapshot-metadata"
  chmod -R u+w "$work/external-snapshot-metadata"
  rm -f "$work/external-snapshot-metadata/pkg/internal/runtime/test_harness.go"
  echo "replace github.com/kubernetes-csi/external-snapshot-metadata => ./external-snapshot-metadata" >> "$work/go.mod"
  log "node stack $version: building ${NODE_BINARIES[*]} in one go build (the longest step on a fresh machine)"
  (
    cd "$work"
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -ldflags "$(version_ldflags "$version") -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$out/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
      github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner \
      github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
      github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller \
      github.com/kubernetes-csi/external-snapshot-metadata/cmd/csi-snapshot-metadata \
      helm.sh/helm/v3/cmd/helm ./cmd/ferry-csi ./cmd/pause
    local client
    client=$(GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)
    cp "$client"/config/crd/*.storage.k8s.io_*.yaml "$out/crds/"
    client=$(GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshot-metadata/client)
    cp "$client"/config/crd/cbt.storage.k8s.io_*.yaml "$out/crds/"
  )
  echo "$key" > "$out/stamp"
  log "node stack $version: built into $out/bin"
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

# public_crds_dir: where fetch_public_crds puts the CRDs.
public_crds_dir() { echo "$CACHE/public-crds-prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-argo-cd-$ARGO_CD_VERSION"; }

# fetch_public_crds: the CRDs of real operators, exactly as their projects
# publish them, taken from their modules on the Go module proxy:
# prometheus-operator (example/prometheus-operator-crd) and Argo CD
# (manifests/crds). Nothing is built.
fetch_public_crds() {
  local out; out=$(public_crds_dir)
  if [[ -f $out/done ]]; then log "public CRDs: cached"; return; fi
  need_go
  log "public CRDs: prometheus-operator $PROMETHEUS_OPERATOR_VERSION, Argo CD $ARGO_CD_VERSION"
  rm -rf "$out" && mkdir -p "$out/prometheus-operator" "$out/argo-cd"
  local dir
  dir=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  cp "$dir"/example/prometheus-operator-crd/*.yaml "$out/prometheus-operator/"
  dir=$(go mod download -json "github.com/argoproj/argo-cd/v3@$ARGO_CD_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  cp "$dir"/manifests/crds/*-crd.yaml "$out/argo-cd/"
  chmod -R u+w "$out"
  touch "$out/done"
}

# test_node_sources: the Go tests of this repository's node programs (the
# CSI driver), in the node stack's module so they use the very versions
# the node runs.
test_node_sources() {
  build_node_stack
  local work="$CACHE/node-stack-$K8S_NEW_VERSION/src"
  cp -r "$NODE_SOURCES/." "$work/"
  (cd "$work" && GOFLAGS=-mod=mod CGO_ENABLED=0 go test ./cmd/...)
}

what=${1:-all}
case $what in
  k8s-new) build_kubernetes "$K8S_NEW_VERSION" ;;
  node) build_node_stack ;;
  test-node) test_node_sources ;;
  k8s-old) build_kubernetes "$K8S_OLD_VERSION" "$K8S_OLD_GOTOOLCHAIN" ;;
  etcd) build_etcd ;;
  minio) build_minio ;;
  crds) fetch_public_crds ;;
  all)
    build_etcd
    build_minio
    fetch_public_crds
    build_node_stack
    build_kubernetes "$K8S_OLD_VERSION" "$K8S_OLD_GOTOOLCHAIN"
    ;;
  *) log "unknown component '$what' (node, test-node, k8s-new, k8s-old, etcd, minio, crds, all)"; exit 2 ;;
esac
