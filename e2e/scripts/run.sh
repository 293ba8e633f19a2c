#!/usr/bin/env bash
# Runs the KEDA end-to-end suite: the real KEDA operator and metrics apiserver on a real
# kube-apiserver call the scaler (e2e/keda, Go tests with client-go).
#
#   bash e2e/scripts/run.sh                 the whole suite
#   bash e2e/scripts/run.sh -run Redis      arguments go to `go test`
#
# Steps: the brokers and Celery venv (scripts/test-env.sh, unless CKS_REDIS_URL is
# already set), the control plane's binaries (e2e/scripts/build.sh, cached outside the clone), the
# scaler (cargo build, debug, as the Rust suites use it), gofmt and go vet of every e2e module,
# then `go test`. Knobs: CKS_E2E_WORKDIR (keep the control plane's files and logs there),
# CKS_E2E_KEEP=1 (print where the logs are even on success), CKS_SCALER_BIN (a scaler already built)
# or CKS_SCALER_PROFILE (debug or release),
# CKS_E2E_PUSH_TRIALS (default 10), CKS_E2E_PARALLEL (scenarios at once, default 8),
# CKS_E2E_REDIS_DBS (the Redis databases the scenarios lease, one each, exclusively: numbers and
# ranges such as 1-15, the default, or 3,5-7; database 0 belongs to the Rust suites; a lease is a
# flock'ed file /tmp/cks-e2e-redis-<host>-<port>-db<N>.lock, so two runs on one machine share no
# database, and a scenario waits while every database is leased),
# CKS_E2E_RESULTS (JSON lines with the measured figures; default <workdir>/results.jsonl).
#
# Scenarios run in parallel (t.Parallel), each in namespaces, a Redis database, a RabbitMQ vhost
# and an SQS queue prefix of its own; TestBrokerOutage (it stops brokers) and TestPushNeverLost (it
# asserts latencies) run first, alone. Its rabbitmq subtest
# stops the shared RabbitMQ node: when anything else uses that node, run it apart, as
# scripts/test.sh does (`-skip TestBrokerOutage/rabbitmq`, then `-run TestBrokerOutage/rabbitmq`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
START=$SECONDS

command -v go >/dev/null 2>&1 || die "go is not installed: the control plane is built from the Go module proxy (Go >= 1.26)"
command -v kubectl >/dev/null 2>&1 || die "kubectl is not installed (the manifests scenario renders kustomizations with it)"

if [ -z "${CKS_REDIS_URL:-}" ] || [ -z "${CKS_PYTHON:-}" ]; then
    log "preparing brokers and the Celery venv (scripts/test-env.sh)"
    eval "$(bash scripts/test-env.sh)"
fi
# The test command's target directory, outside the clone (scripts/test.sh).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/celery-keda-scaler/target}"

log "control plane binaries (e2e/scripts/build.sh)"
CKS_E2E_BIN="$(bash e2e/scripts/build.sh)"
export CKS_E2E_BIN

# The scaler: CKS_SCALER_BIN when the caller built it (scripts/test.sh passes the binary its
# `cargo test` built), else a build of CKS_SCALER_PROFILE (debug by default; release for benchmarks).
if [ -z "${CKS_SCALER_BIN:-}" ]; then
    PROFILE="${CKS_SCALER_PROFILE:-debug}"
    case "$PROFILE" in
        debug) log "cargo build --locked --bin celery-keda-scaler"; cargo build --locked --bin celery-keda-scaler >&2 ;;
        release) log "cargo build --locked --release --bin celery-keda-scaler"; cargo build --locked --release --bin celery-keda-scaler >&2 ;;
        *) die "CKS_SCALER_PROFILE must be debug or release (got '$PROFILE')" ;;
    esac
    CKS_SCALER_BIN="$(cargo metadata --locked --format-version 1 --no-deps | "${CKS_PYTHON:-python3}" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$PROFILE/celery-keda-scaler"
fi
export CKS_SCALER_BIN
[ -x "$CKS_SCALER_BIN" ] || die "$CKS_SCALER_BIN was not built"
log "scaler: $CKS_SCALER_BIN"

log "gofmt and go vet (e2e)"
unformatted="$(gofmt -l e2e)"
[ -z "$unformatted" ] || die "gofmt -l e2e lists files to format: $unformatted"
# Every e2e module with Go code (the others only pin tools and data).
for mod in e2e/*/go.mod; do
    dir="$(dirname "$mod")"
    if [ -n "$(find "$dir" -name '*.go' -print -quit)" ]; then
        (cd "$dir" && go vet ./...)
    fi
done

log "go test (e2e/keda), prepared in $((SECONDS - START))s"
cd e2e/keda
# One package: go test streams its output (with ./... it holds each package's output until it ends).
# Scenarios that own their namespace and their place on the broker run in parallel (t.Parallel);
# go test's default -parallel is GOMAXPROCS (2 here), too few for scenarios that mostly wait.
exec go test -count=1 -v -timeout 50m -parallel "${CKS_E2E_PARALLEL:-8}" "$@" .
