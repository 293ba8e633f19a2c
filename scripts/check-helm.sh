#!/usr/bin/env bash
# Checks the Helm chart deploy/helm/celery-keda-scaler with Helm itself, offline:
#
#   1. Chart.yaml's appVersion is the crate version of Cargo.toml;
#   2. `helm lint --strict` with the defaults and each deploy/helm/ci/*-values.yaml;
#   3. `helm template` of each, then every object validated: core kinds with `kubernetes-validate
#      --strict`, KEDA / cert-manager / Prometheus Operator kinds with tests/k8s/validate-crds.mjs
#      (the validators of scripts/validate-manifests.sh, which installs them);
#   4. values the schema (or the chart) must refuse are refused, naming what is wrong;
#   5. the PrometheusRule's alerts: `promtool check rules` and `promtool test rules`
#      (deploy/helm/promtool/alerts-test.yaml); promtool comes from Debian's `prometheus` package,
#      installed with apt-get when missing;
#   6. the dashboard is valid JSON and every ConfigMap renders it unchanged;
#   7. the chart's README values table is what helm-docs generates (when helm-docs is built);
#   8. `helm package` produces celery-keda-scaler-<version>.tgz, which renders like the directory.
#
# Helm (and helm-docs) are built from the Go module proxy by e2e/scripts/build.sh at the versions of
# e2e/helm/go.mod (cached outside the clone); CKS_E2E_BIN names that bin directory if already built.
# Applying the rendered objects to a real API server, `helm install/upgrade/uninstall` and the
# dashboard-vs-/metrics check are in e2e/keda/helm_test.go (the KEDA end-to-end suite).
#
#   bash scripts/check-helm.sh
#
# Knobs: CKS_VENV (kubernetes-validate's virtualenv, default <repo>/.venv), CKS_K8S_VERSION (1.31.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHART=deploy/helm/celery-keda-scaler
CI=deploy/helm/ci
VENV="${CKS_VENV:-$ROOT/.venv}"
K8S_VERSION="${CKS_K8S_VERSION:-1.31.0}"
RELEASE=celery-keda-scaler
NS=keda

log() { printf '==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
FAILED=0
fail() {
    printf 'FAIL %s\n' "$*" >&2
    FAILED=$((FAILED + 1))
}
START=$SECONDS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- tools ------------------------------------------------------------------------------------

if [ -z "${CKS_E2E_BIN:-}" ] || [ ! -x "${CKS_E2E_BIN}/helm" ]; then
    command -v go >/dev/null 2>&1 || die "go is not installed: Helm is built from the Go module proxy (Go >= 1.25)"
    log "Helm and helm-docs (CKS_E2E_ONLY='helm helm-docs' e2e/scripts/build.sh)"
    CKS_E2E_BIN="$(CKS_E2E_ONLY="helm helm-docs" bash e2e/scripts/build.sh)"
fi
HELM="$CKS_E2E_BIN/helm"
[ -x "$HELM" ] || die "$HELM is missing after e2e/scripts/build.sh"
if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian package prometheus)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2 ||
        die "apt-get install prometheus failed (it ships promtool)"
fi
KV="$VENV/bin/kubernetes-validate"
[ -x "$KV" ] || die "$KV is missing: run scripts/validate-manifests.sh first (it installs kubernetes-validate into $VENV)"
[ -d tests/k8s/node_modules/@kubernetes-models ] || die "tests/k8s/node_modules is missing: run scripts/validate-manifests.sh first (npm ci)"
log "tools: $("$HELM" version --short), $(promtool --version 2>&1 | head -1)"

# --- 1. appVersion --------------------------------------------------------------------------------

crate_version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
app_version="$(sed -n 's/^appVersion: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")"
chart_version="$(sed -n 's/^version: \(.*\)$/\1/p' "$CHART/Chart.yaml")"
if [ -n "$crate_version" ] && [ "$app_version" = "$crate_version" ]; then
    note "ok   appVersion $app_version = Cargo.toml version"
else
    fail "$CHART/Chart.yaml appVersion is '$app_version', Cargo.toml's version is '$crate_version'"
fi

# --- 2. lint, 3. template + validate ------------------------------------------------------

mapfile -t VALUES < <(find "$CI" -name '*-values.yaml' | sort)
[ "${#VALUES[@]}" -ge 6 ] || fail "expected at least 6 value sets in $CI, found ${#VALUES[@]}"
log "helm lint --strict and helm template: the defaults and ${#VALUES[@]} value sets"
RENDERED=()
for v in "" "${VALUES[@]}"; do
    name="$(basename "${v:-defaults}" .yaml)"
    args=()
    [ -n "$v" ] && args=(-f "$v")
    if "$HELM" lint --strict "$CHART" --namespace "$NS" "${args[@]}" >"$WORK/lint.out" 2>&1; then
        note "ok   helm lint --strict ${v:-(defaults)}"
    else
        fail "helm lint --strict ${v:-(defaults)}"
        sed 's/^/    /' "$WORK/lint.out" >&2
    fi
    out="$WORK/render-$name.yaml"
    if "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" "${args[@]}" >"$out" 2>"$WORK/template.err"; then
        note "ok   helm template ${v:-(defaults)}: $(grep -c '^kind:' "$out") objects"
        RENDERED+=("helm:$name=$out")
    else
        fail "helm template ${v:-(defaults)}"
        sed 's/^/    /' "$WORK/template.err" >&2
    fi
done

log "validating ${#RENDERED[@]} renders (Kubernetes $K8S_VERSION, strict; CRD kinds against their schemas)"
crd_rc=0
node tests/k8s/validate-crds.mjs --core-dir "$WORK/core" --summary "$WORK/summary.json" -- "${RENDERED[@]}" >"$WORK/crd.out" 2>&1 || crd_rc=$?
if [ "$crd_rc" -ne 0 ] || [ ! -f "$WORK/summary.json" ]; then
    fail "CRD kinds of the renders"
    sed 's/^/    /' "$WORK/crd.out" >&2
else
    crd_n="$(node -p "require('$WORK/summary.json').crd")"
    core_n="$(node -p "require('$WORK/summary.json').core")"
    mapfile -t core_files < <(node -p "require('$WORK/summary.json').coreFiles.map(f => f.file).join('\n')" | sed '/^$/d')
    kv_rc=0
    "$KV" --strict -k "$K8S_VERSION" "${core_files[@]}" >"$WORK/kv.out" 2>&1 || kv_rc=$?
    passed="$(grep -c '^INFO .* passed for resource' "$WORK/kv.out" || true)"
    if [ "$kv_rc" -ne 0 ] || grep -Eq '^(ERROR|WARN)' "$WORK/kv.out" || [ "$passed" != "$core_n" ]; then
        fail "kubernetes-validate --strict passed $passed of $core_n core objects"
        grep -Ev '^INFO' "$WORK/kv.out" | sed 's/^/    /' >&2
    else
        note "ok   $crd_n CRD objects and $core_n core objects valid"
    fi
fi

# --- 4. refusals ------------------------------------------------------------------------------

# refuse WANT ARGS...: helm template must fail with a message containing WANT.
refuse() {
    local want=$1
    shift
    if "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" "$@" >/dev/null 2>"$WORK/refuse.err"; then
        fail "helm template $* was accepted"
    elif grep -qF -- "$want" "$WORK/refuse.err"; then
        note "ok   refused: $* ($want)"
    else
        fail "helm template $* failed without naming '$want':"
        sed 's/^/    /' "$WORK/refuse.err" >&2
    fi
}
log "values the chart must refuse"
refuse "additional properties 'replicas' not allowed" --set replicas=3
refuse "additional properties 'tags' not allowed" --set image.tags=x
refuse "additional properties 'enable' not allowed" --set networkPolicy.enable=true
refuse "additional properties 'team' not allowed" --set tls.certManager.issuerRef.team=x
refuse "/replicaCount" --set replicaCount=two
refuse "/replicaCount" --set-string replicaCount=2
refuse "/tls/enabled" --set-string tls.enabled=yes
refuse "/config/logFormat" --set config.logFormat=xml
refuse "/image/digest" --set image.digest=latest
refuse "/tenancy/allowedBrokerHosts" --set tenancy.allowedBrokerHosts=redis.svc
refuse "/serviceMonitor/interval" --set serviceMonitor.interval=30
refuse "/extraEnv/0" --set 'extraEnv[0].value=x'
refuse "/brokers/named/orders" --set brokers.named.orders.secretName=s
refuse "/prometheusRule/backlog/for" --set prometheusRule.backlog.for=15min
# TLS half configured: on without certificates, certificates without TLS on, two sources.
refuse "/tls" --set tls.enabled=true
refuse "/tls" --set tls.certManager.enabled=true
refuse "/tls" --set tls.existingSecret=my-tls
refuse "/tls" --set tls.enabled=true,tls.existingSecret=my-tls,tls.certManager.enabled=true
refuse "tls.triggerAuthentication.create with tls.existingSecret needs tls.triggerAuthentication.clientSecret" \
    --set tls.enabled=true,tls.existingSecret=my-tls
refuse "tenancy.namespaces.orders: no broker orders is configured" \
    --set brokers.existingSecret= --set 'tenancy.namespaces.orders={team-a}'

# --- 5. alerts ----------------------------------------------------------------------------

log "alerts: promtool check rules and promtool test rules"
mkdir -p "$WORK/promtool"
if "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" -f "$CI/tls-cert-manager-values.yaml" -f "$CI/monitoring-values.yaml" \
    --show-only templates/prometheusrule.yaml >"$WORK/prometheusrule.yaml" 2>"$WORK/template.err"; then
    # A PrometheusRule's spec is a Prometheus rule file.
    awk '/^spec:/{on=1; next} on{sub(/^  /, ""); print}' "$WORK/prometheusrule.yaml" >"$WORK/promtool/rules.yaml"
    cp deploy/helm/promtool/alerts-test.yaml "$WORK/promtool/"
    if promtool check rules "$WORK/promtool/rules.yaml" >"$WORK/promtool.out" 2>&1; then
        note "ok   promtool check rules: $(grep -o '[0-9]* rules found' "$WORK/promtool.out")"
    else
        fail "promtool check rules"
        sed 's/^/    /' "$WORK/promtool.out" >&2
    fi
    if (cd "$WORK/promtool" && promtool test rules alerts-test.yaml) >"$WORK/promtool.out" 2>&1; then
        note "ok   promtool test rules deploy/helm/promtool/alerts-test.yaml"
    else
        fail "promtool test rules deploy/helm/promtool/alerts-test.yaml"
        sed 's/^/    /' "$WORK/promtool.out" >&2
    fi
    # Every alert has a runbook section in the README (its anchor is the lower-cased name).
    for alert in $(sed -n 's/^ *- alert: //p' "$WORK/promtool/rules.yaml"); do
        if grep -qx "#### $alert" README.md; then
            note "ok   README runbook: #### $alert"
        else
            fail "README.md has no runbook section '#### $alert'"
        fi
        if ! grep -q "alertname: $alert\$" deploy/helm/promtool/alerts-test.yaml; then
            fail "deploy/helm/promtool/alerts-test.yaml does not test $alert"
        fi
    done
else
    fail "helm template --show-only templates/prometheusrule.yaml"
    sed 's/^/    /' "$WORK/template.err" >&2
fi

# --- 6. dashboard -------------------------------------------------------------------------

if python3 -m json.tool "$CHART/files/dashboard.json" >/dev/null 2>"$WORK/json.err"; then
    "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" -f "$CI/monitoring-values.yaml" \
        --show-only templates/dashboard-configmap.yaml >"$WORK/dashboard-cm.yaml"
    if python3 - "$WORK/dashboard-cm.yaml" "$CHART/files/dashboard.json" <<'EOF'; then
import json, sys
# The ConfigMap's data is a block scalar: take it back out and compare as JSON.
lines = open(sys.argv[1]).read().split("\n")
start = next(i for i, l in enumerate(lines) if l.strip().startswith("celery-keda-scaler.json:"))
body = "\n".join(l[4:] for l in lines[start + 1:] if l.startswith("    ") or l == "")
assert json.loads(body) == json.load(open(sys.argv[2])), "the ConfigMap's dashboard differs from files/dashboard.json"
EOF
        note "ok   dashboard JSON valid, ConfigMap carries it unchanged"
    else
        fail "the dashboard ConfigMap does not carry files/dashboard.json"
    fi
else
    fail "$CHART/files/dashboard.json is not valid JSON"
    sed 's/^/    /' "$WORK/json.err" >&2
fi

# --- 7. README values table -----------------------------------------------------------------

if [ -x "$CKS_E2E_BIN/helm-docs" ]; then
    cp -r "$CHART" "$WORK/docs-chart"
    if (cd "$WORK/docs-chart" && "$CKS_E2E_BIN/helm-docs" --chart-search-root . --log-level warning) >"$WORK/helm-docs.out" 2>&1 &&
        cmp -s "$WORK/docs-chart/README.md" "$CHART/README.md"; then
        note "ok   $CHART/README.md is what helm-docs generates"
    else
        fail "$CHART/README.md is stale: run (cd $CHART && $CKS_E2E_BIN/helm-docs --chart-search-root .)"
        diff -u "$CHART/README.md" "$WORK/docs-chart/README.md" 2>&1 | head -30 >&2 || true
    fi
else
    fail "helm-docs is not in $CKS_E2E_BIN (e2e/scripts/build.sh builds it)"
fi

# --- 8. package -----------------------------------------------------------------------------

if "$HELM" package "$CHART" --destination "$WORK/package" >"$WORK/package.out" 2>&1 &&
    [ -f "$WORK/package/celery-keda-scaler-$chart_version.tgz" ]; then
    "$HELM" template "$RELEASE" "$WORK/package/celery-keda-scaler-$chart_version.tgz" --namespace "$NS" >"$WORK/from-package.yaml"
    if cmp -s "$WORK/from-package.yaml" "$WORK/render-defaults.yaml"; then
        note "ok   helm package: celery-keda-scaler-$chart_version.tgz ($(stat -c %s "$WORK/package/celery-keda-scaler-$chart_version.tgz") bytes) renders like the directory"
    else
        fail "the packaged chart renders differently from $CHART"
    fi
else
    fail "helm package $CHART"
    sed 's/^/    /' "$WORK/package.out" >&2
fi

echo
if [ "$FAILED" -gt 0 ]; then
    printf 'check-helm: %d check(s) FAILED (%ss)\n' "$FAILED" "$((SECONDS - START))" >&2
    exit 1
fi
printf 'check-helm: all checks passed (%ss)\n' "$((SECONDS - START))" >&2
