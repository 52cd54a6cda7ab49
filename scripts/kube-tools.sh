#!/usr/bin/env bash
# Builds the Kubernetes tools the Kubernetes tests and the chart checks run, from the Go
# module proxy (no release binary can be downloaded here), into a cache that later runs on
# the same machine reuse: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy and kubectl of one Kubernetes release, CoreDNS (the test node's cluster DNS),
# helm and kubeconform.
# etcd, containerd, runc and the CNI plugins come from Debian (scripts/install-deps.sh).
#
# Prints the directory that holds the binaries. A fresh machine takes ~10-15 minutes on
# 2 cores (the Kubernetes commands share one build); a warm cache answers at once.
#
#   FIREWORKS_KUBE_CACHE   cache root (default /var/cache/fireworks/kube)
set -euo pipefail
export PATH=/usr/local/go/bin:$PATH

# One Kubernetes release for every component and for the project's client-go: kubelet
# 1.35 is the last release that runs on containerd 1.x (Debian 12 ships 1.6).
KUBE_VERSION=1.35.4
STAGING_VERSION=0.35.4
HELM_VERSION=4.3.2
KUBECONFORM_VERSION=0.7.0
# Built against the same client-go (v0.35.4) as the rest.
COREDNS_VERSION=1.14.7

root=${FIREWORKS_KUBE_CACHE:-/var/cache/fireworks/kube}
# The stamp names every version: a change of any of them builds a new directory.
out="$root/k${KUBE_VERSION}-h${HELM_VERSION}-c${KUBECONFORM_VERSION}-d${COREDNS_VERSION}"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl coredns helm kubeconform)

complete() {
  local b
  for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
}
if complete; then
  echo "$out/bin"
  exit 0
fi

mkdir -p "$root"
# One build at a time per cache (tests of several packages may ask together).
exec 9>"$root/.lock"
flock 9
if complete; then
  echo "$out/bin"
  exit 0
fi

work=$(mktemp -d "$root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
log() { echo "kube-tools: $*" >&2; }

# k8s.io/kubernetes replaces its staging modules with ./staging paths, which `go install
# pkg@version` refuses; a module of our own that requires it and points each staging
# module at its published version builds the same commands.
build_kubernetes() {
  local m=$work/kubernetes
  mkdir -p "$m"
  cd "$m"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | sed -nE 's/^\s*"GoMod": "(.*)",?$/\1/p')
  {
    echo "module fireworks.local/kubebuild"
    echo
    echo "go 1.25.0"
    echo
    echo "require k8s.io/kubernetes v$KUBE_VERSION"
    echo
    echo "replace ("
    sed -nE "s#^\s*(k8s\.io/[a-z0-9-]+) => \./staging/src/k8s\.io/[a-z0-9-]+\$#\t\1 => \1 v$STAGING_VERSION#p" "$gomod"
    echo ")"
  } >go.mod
  # The rest of the requirements, exactly as Kubernetes pins them (its staging modules
  # at v0.0.0, which the replaces above turn into their published versions).
  sed -nE '/^require \(/,/^\)/p' "$gomod" >>go.mod
  local v="v$KUBE_VERSION"
  local minor=${KUBE_VERSION#*.}
  minor=${minor%%.*}
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "building Kubernetes $v (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl)"
  CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ld" -o "$work/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
}

# CoreDNS with the plugins a cluster's DNS needs and no more (its own main imports every
# plugin, cloud providers' SDKs included): its documented way to choose plugins is a main
# of one's own that imports them and sets the directive order.
build_coredns() {
  local m=$work/coredns
  mkdir -p "$m"
  cd "$m"
  printf 'module fireworks.local/corednsbuild\n\ngo 1.25.0\n\nrequire github.com/coredns/coredns v%s\n' "$COREDNS_VERSION" >go.mod
  cat >main.go <<'EOF'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	// The order in which the plugins see a query.
	dnsserver.Directives = []string{"log", "errors", "health", "ready", "cache", "kubernetes"}
	coremain.Run()
}
EOF
  log "building CoreDNS v$COREDNS_VERSION (cache, errors, health, kubernetes, log, ready)"
  CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$work/bin/coredns" .
}

# The others publish ordinary modules.
build_module_cmd() {
  local pkg=$1 ver=$2
  log "building $pkg@$ver"
  CGO_ENABLED=0 GOBIN="$work/bin" go install -trimpath -ldflags "-s -w" "$pkg@$ver"
}

start=$(date +%s)
(build_kubernetes)
(build_coredns)
build_module_cmd helm.sh/helm/v4/cmd/helm "v$HELM_VERSION"
build_module_cmd github.com/yannh/kubeconform/cmd/kubeconform "v$KUBECONFORM_VERSION"
log "built in $(( $(date +%s) - start ))s"

rm -rf "$out"
mkdir -p "$out"
mv "$work/bin" "$out/bin"
# Builds of other versions are not used any more.
for d in "$root"/k*; do
  [ "$d" = "$out" ] || rm -rf "$d"
done
complete || { log "missing binaries in $out/bin"; exit 1; }
echo "$out/bin"
