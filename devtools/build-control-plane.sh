#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, KWOK, Helm) from Go modules at pinned versions and caches
# the binaries by version outside git. Only the first run on a machine pays the build;
# later runs find the stamp file and return at once.
#
# Prints the binary directory as its last line.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

CACHE_ROOT="${MMO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/marketplace-metering-operator}"
# Bump when the build itself changes (flags, not versions) so cached binaries are rebuilt.
BUILD_REVISION=2
BIN_DIR="$CACHE_ROOT/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-r$BUILD_REVISION"
WORK_DIR="$CACHE_ROOT/build"
STAMP="$BIN_DIR/.complete"

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

log() { printf '[control-plane %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if [[ -f "$STAMP" ]]; then
  echo "$BIN_DIR"
  exit 0
fi
mkdir -p "$BIN_DIR" "$WORK_DIR"
# One build at a time per cache (parallel test sessions, `make -j`): a second caller waits for
# the first and then finds the stamp.
exec 9>"$CACHE_ROOT/.build.lock"
if ! flock -n 9; then
  log "another build of the control plane is running; waiting for it"
  flock 9
fi
if [[ -f "$STAMP" ]]; then
  echo "$BIN_DIR"
  exit 0
fi
command -v go >/dev/null || { log "Go is required (go1.26+) to build the control plane"; exit 1; }
log "building into $BIN_DIR (first run on this machine: expect tens of minutes)"

build_kubernetes() {
  local mod="$WORK_DIR/kubernetes-$K8S_VERSION"
  local staging_version="v0.${K8S_VERSION#v1.}"
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local all_present=1
  for b in "${bins[@]}"; do [[ -x "$BIN_DIR/$b" ]] || all_present=0; done
  if [[ $all_present == 1 ]]; then log "kubernetes $K8S_VERSION already built"; return; fi
  mkdir -p "$mod"
  log "kubernetes $K8S_VERSION: resolving staging modules ($staging_version)"
  local gomod
  gomod="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  local staging
  staging="$(go mod edit -json "$gomod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        print(r["Old"]["Path"])')"
  {
    echo "module local/kubernetes-wrapper"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $staging_version"; done
    echo ")"
  } >"$mod/go.mod"
  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "kubernetes $K8S_VERSION: go mod tidy (downloads about 1 GB of modules on a cold machine)"
  (cd "$mod" && go mod tidy -e >/dev/null 2>"$mod/tidy.log" || { cat "$mod/tidy.log" >&2; exit 1; })
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  for b in "${bins[@]}"; do
    if [[ -x "$BIN_DIR/$b" ]]; then continue; fi
    log "kubernetes $K8S_VERSION: go build $b"
    (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
}

build_etcd() {
  if [[ -x "$BIN_DIR/etcd" ]]; then log "etcd $ETCD_VERSION already built"; return; fi
  local mod="$WORK_DIR/etcd-$ETCD_VERSION"
  mkdir -p "$mod"
  printf 'module local/etcd-wrapper\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$mod/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$mod/tools.go"
  log "etcd $ETCD_VERSION: go mod tidy"
  (cd "$mod" && go mod tidy -e >/dev/null 2>"$mod/tidy.log" || { cat "$mod/tidy.log" >&2; exit 1; })
  log "etcd $ETCD_VERSION: go build etcd"
  (cd "$mod" && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
}

build_kwok() {
  if [[ -x "$BIN_DIR/kwok" ]]; then log "kwok $KWOK_VERSION already built"; return; fi
  log "kwok $KWOK_VERSION: go install sigs.k8s.io/kwok/cmd/kwok"
  local gobin="$WORK_DIR/gobin-kwok"
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$gobin/kwok" "$BIN_DIR/kwok"
}

build_helm() {
  if [[ -x "$BIN_DIR/helm" ]]; then log "helm $HELM_VERSION already built"; return; fi
  log "helm $HELM_VERSION: go install helm.sh/helm/v3/cmd/helm"
  local gobin="$WORK_DIR/gobin-helm"
  # Helm's own Makefile sets the Kubernetes version it assumes offline (`helm template`, `lint`);
  # without it Helm reports v1.20 and charts with a kubeVersion constraint fail to render.
  local k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  GOBIN="$gobin" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$gobin/helm" "$BIN_DIR/helm"
}

SECONDS=0
build_kubernetes
build_etcd
build_kwok
build_helm
touch "$STAMP"
log "done in ${SECONDS}s"
echo "$BIN_DIR"
