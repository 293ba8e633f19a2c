#!/usr/bin/env bash
# Builds the control plane's binaries (etcd, kube-apiserver, kube-controller-manager, KEDA's operator
# and metrics apiserver, prometheus-adapter) from the Go module proxy at the versions pinned in e2e/*/go.mod, into a cache
# outside the clone keyed by each module's go.mod and go.sum: a second run, or a fresh clone on the
# same machine, rebuilds nothing. Prints the bin directory on stdout.
#
#   CKS_E2E_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/celery-keda-scaler/e2e)
#   CKS_E2E_ONLY    build only these modules (space-separated, e.g. "helm helm-docs" for
#                   scripts/check-helm.sh); the others keep their links in the bin directory
set -euo pipefail

E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CKS_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/celery-keda-scaler/e2e}"
# Go's module and build caches live outside the clone too (Go's defaults already do; pinned here
# so that a user's GOFLAGS=-mod=vendor or a GOPATH inside the clone cannot change it).
export GOMODCACHE="${GOMODCACHE:-$(go env GOMODCACHE)}"
export GOCACHE="${GOCACHE:-$(go env GOCACHE)}"
# readonly: the committed go.sum must be complete, and a build never edits the clone.
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0

log() { printf '==> %s\n' "$*" >&2; }

# build MODULE_DIR LDFLAGS PACKAGE...: builds the packages of one module into a directory named by the
# hash of its go.mod and go.sum; binaries are named after the last element of the package path (etcd's
# root package is named "etcd"; prometheus-adapter's cmd/adapter "prometheus-adapter", beside KEDA's
# metrics apiserver, which is "adapter").
build() {
    local dir=$1 ldflags=$2
    shift 2
    if [ -n "${CKS_E2E_ONLY:-}" ] && [[ " $CKS_E2E_ONLY " != *" $dir "* ]]; then
        return
    fi
    local key lock
    key=$(cat "$E2E/$dir/go.mod" "$E2E/$dir/go.sum" | sha256sum | cut -c1-16)
    local out="$CACHE/$dir-$key"
    if [ -f "$out/.complete" ]; then
        printf '%s\n' "$out"
        return
    fi
    # One build of a module at a time (scripts/test.sh builds in the background while
    # scripts/check-helm.sh may ask for Helm): the second waits, then finds it built.
    mkdir -p "$CACHE"
    exec {lock}>"$CACHE/$dir.lock"
    flock "$lock"
    if [ -f "$out/.complete" ]; then
        exec {lock}>&-
        printf '%s\n' "$out"
        return
    fi
    log "building $dir ($*) into $out (cold: several minutes on 2 cores)"
    local start=$SECONDS
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    (cd "$E2E/$dir" && go mod download && for pkg in "$@"; do
        local name=${pkg##*/}
        [ "$pkg" = go.etcd.io/etcd/server/v3 ] && name=etcd
        [ "$pkg" = sigs.k8s.io/prometheus-adapter/cmd/adapter ] && name=prometheus-adapter
        go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp/$name" "$pkg"
    done)
    touch "$out.tmp/.complete"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    exec {lock}>&-
    log "built $dir in $((SECONDS - start))s"
    printf '%s\n' "$out"
}

mod_version() { # dir module
    (cd "$E2E/$1" && go list -m -f '{{.Version}}' "$2")
}

mkdir -p "$CACHE/bin"
k8s_version=$(mod_version kubernetes k8s.io/kubernetes)
keda_version=$(mod_version keda github.com/kedacore/keda/v2)
# Helm, for the chart in deploy/helm (scripts/check-helm.sh, e2e/keda/helm_test.go).
helm_version=$(mod_version helm helm.sh/helm/v3)
# Helm's default Kubernetes version (helm template, lint) is the one of its client-go, as its Makefile sets it.
helm_k8s_minor=$(mod_version helm k8s.io/client-go)
helm_k8s_minor=${helm_k8s_minor#v0.}
helm_k8s_minor=${helm_k8s_minor%%.*}
k8s_minor=${k8s_version#v1.}
k8s_minor=${k8s_minor%%.*}
kv=k8s.io/component-base/version
dirs=(
    "$(build etcd "" go.etcd.io/etcd/server/v3)"
    "$(build kubernetes "-X $kv.gitVersion=$k8s_version -X $kv.gitMajor=1 -X $kv.gitMinor=$k8s_minor -X $kv.gitTreeState=clean" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)"
    "$(build keda "-X github.com/kedacore/keda/v2/version.Version=${keda_version#v}" \
        github.com/kedacore/keda/v2/cmd/operator github.com/kedacore/keda/v2/cmd/adapter)"
    "$(build helm "-X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor" \
        helm.sh/helm/v3/cmd/helm)"
    "$(build helm-docs "" github.com/norwoodj/helm-docs/cmd/helm-docs)"
    # Prometheus Adapter, for the plain HPA without KEDA (e2e/keda/prometheus_adapter_test.go); its
    # Makefile sets no version.
    "$(build prometheus-adapter "" sigs.k8s.io/prometheus-adapter/cmd/adapter)"
)
# One directory of links to the current binaries, for PATH.
for d in "${dirs[@]}"; do
    [ -n "$d" ] || continue # not built (CKS_E2E_ONLY)
    for f in "$d"/*; do ln -sfn "$f" "$CACHE/bin/$(basename "$f")"; done
done
printf '%s\n' "$CACHE/bin"
