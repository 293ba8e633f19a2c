#!/usr/bin/env bash
# The project's test command: prepares everything the suites need (scripts/test-env.sh: Debian
# packages, the Celery virtualenv, Redis, RabbitMQ with the management API, moto for SQS; and
# e2e/scripts/build.sh: the control plane from the Go module proxy), then runs the checks and every
# suite. .ci/run calls exactly `bash scripts/test.sh`.
#
#   bash scripts/test.sh                      everything, as CI runs it
#   bash scripts/test.sh SUITE... [-- ARGS]   only the named suites, in that order:
#       checks      cargo fmt --check, scripts/check-layers.sh, clippy, the manifests, the Helm
#                   chart, the Docker build context
#       unit        the unit tests (cargo test --lib --bins)
#       NAME        the Rust suite tests/NAME.rs (redis, rabbitmq, sqs, service, faults, ...)
#       image       the container image: scripts/image.sh builds it, tests/image.rs runs it as the
#                   manifests do
#       protected   redis, rabbitmq, sqs and routing again with the tenancy protections on
#       benches     the benches, run once as tests
#       keda        the KEDA end-to-end suite (e2e/scripts/run.sh)
#     ARGS go to the runner of the one suite named: libtest for a Rust suite
#     (`redis -- priority --nocapture`), `go test` for keda (`keda -- -run TestRedisPushFromZero`).
#   CKS_E2E=0 bash scripts/test.sh            everything but the KEDA suite
#   CKS_SKIP_CHECKS=1 bash scripts/test.sh    everything but the checks
#   eval "$(bash scripts/test-env.sh)"        only the environment, exported into your shell
#
# The full run, on 2 cores: the control plane builds (niced) while the environment is prepared and
# the crate compiles; the manifest and Helm checks run beside clippy; then the Rust suites and the
# KEDA suite run side by side (their brokers are shared, their places on them are not: Redis
# database 0 and the suites' own servers, databases 1-15 for KEDA, a vhost or an SQS prefix per
# test); last, alone, the two tests that stop the shared RabbitMQ (faults'
# rabbitmq_app_stopped_and_started, KEDA's TestBrokerOutage/rabbitmq). The container image is built
# and run in a third lane beside them. Each lane's output is
# prefixed with its name and kept in target/test-env/logs.
#
# Knobs: CARGO_TARGET_DIR (default ${XDG_CACHE_HOME:-~/.cache}/celery-keda-scaler/target, outside
# the clone, so a fresh clone recompiles only this crate), CKS_VENV, CKS_E2E_PARALLEL (see
# e2e/scripts/run.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${CKS_ENV_ONLY:-0}" = 1 ]; then
    # Older spelling of `bash scripts/test-env.sh`.
    exec bash scripts/test-env.sh
fi

RUN_START=$SECONDS
LOG_DIR="$ROOT/target/test-env/logs"
mkdir -p "$LOG_DIR"
log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
since() { printf '%dm%02ds' $((($SECONDS - $1) / 60)) $((($SECONDS - $1) % 60)); }

# The two tests that stop the shared RabbitMQ node run alone, after everything else.
RUST_RABBIT_STOP=rabbitmq_app_stopped_and_started
KEDA_RABBIT_STOP='TestBrokerOutage/rabbitmq'
# The broker suites the protected pass runs again (tests/common protected_tenancy()).
PROTECTED=(redis rabbitmq sqs routing)

# --- what to run ---------------------------------------------------------------------------

suites=()
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; args=("$@"); break ;;
        -*) die "unknown option $1 (suite names first, then -- and the runner's arguments; see the top of $0)" ;;
        *) suites+=("$1"); shift ;;
    esac
done
rust_suites=()
for f in tests/*.rs; do rust_suites+=("$(basename "$f" .rs)"); done
for s in "${suites[@]}"; do
    case " checks unit protected benches keda ${rust_suites[*]} " in
        *" $s "*) ;;
        *) die "no suite '$s': checks, unit, protected, benches, keda, image or one of ${rust_suites[*]}" ;;
    esac
done
if [ ${#args[@]} -gt 0 ] && [ ${#suites[@]} -ne 1 ]; then
    die "arguments after -- go to the runner of exactly one named suite"
fi
FULL=0
if [ ${#suites[@]} -eq 0 ]; then
    FULL=1
    [ "${CKS_E2E:-1}" = only ] && { suites=(keda); FULL=0; } # older spelling of `keda`
fi
case "${CKS_E2E:-1}" in 0 | 1 | only) ;; *) die "CKS_E2E must be 0 or 1 (got '${CKS_E2E}')" ;; esac
want_keda=0
if [ $FULL = 1 ] && [ "${CKS_E2E:-1}" != 0 ]; then want_keda=1; fi
for s in "${suites[@]}"; do [ "$s" = keda ] && want_keda=1; done
if [ $want_keda = 1 ]; then
    command -v go >/dev/null 2>&1 || die "go is not installed: the KEDA end-to-end suite builds Kubernetes and KEDA from the Go module proxy (Go >= 1.26); CKS_E2E=0 skips it"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/celery-keda-scaler/target}"

# --- background jobs -----------------------------------------------------------------------

declare -A JOB_PID=()
# bg NAME COMMAND...: runs a command in the background, its output prefixed with [NAME] and kept
# in $LOG_DIR/NAME.log; `await NAME` waits for it and returns its status.
bg() {
    local name=$1
    shift
    (
        set -o pipefail
        "$@" 2>&1 | tee "$LOG_DIR/$name.log" | sed -u "s/^/[$name] /"
    ) &
    JOB_PID[$name]=$!
}
await() {
    local name=$1 rc=0
    wait "${JOB_PID[$name]}" || rc=$?
    unset "JOB_PID[$name]"
    return $rc
}
kill_tree() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || true); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
stop_jobs() { # at exit: whatever still runs in the background
    local pid
    for pid in "${JOB_PID[@]}"; do [ -n "$pid" ] && kill_tree "$pid"; done
    rabbit_unlock
}

# Two test commands may run at once on one machine (two clones, a suite beside the full run). They
# share the brokers but never a place on them, except that faults' and KEDA's RabbitMQ outage tests
# stop the one RabbitMQ node: a run holds /tmp/cks-rabbit-outage.lock shared while its suites use
# RabbitMQ and exclusively while it stops the node. The lock is held by a small process of its own,
# so no broker, worker or container started meanwhile inherits it.
RABBIT_LOCK=/tmp/cks-rabbit-outage.lock
RABBIT_HOLDER=""
rabbit_lock() { # -s (suites that use RabbitMQ) | -x (suites that stop it)
    rabbit_unlock
    local ready="$LOG_DIR/rabbit-lock$1"
    rm -f "$ready"
    flock "$1" "$RABBIT_LOCK" sh -c ': >"$1"; exec sleep 86400' _ "$ready" </dev/null >/dev/null 2>&1 &
    RABBIT_HOLDER=$!
    local since=$SECONDS told=0
    until [ -e "$ready" ]; do
        kill -0 "$RABBIT_HOLDER" 2>/dev/null || die "flock $1 $RABBIT_LOCK failed"
        if [ $told = 0 ] && [ $((SECONDS - since)) -ge 2 ]; then
            log "waiting for $RABBIT_LOCK ($1): another test command is stopping RabbitMQ or using it"
            told=1
        fi
        sleep 0.2
    done
}
rabbit_unlock() {
    [ -n "$RABBIT_HOLDER" ] || return 0
    kill_tree "$RABBIT_HOLDER"
    wait "$RABBIT_HOLDER" 2>/dev/null || true
    RABBIT_HOLDER=""
}

# The control plane's first build takes about 30 minutes on 2 cores, most of it while this script
# waits on apt, pip, brokers and tests: start it first, at low priority.
if [ $want_keda = 1 ]; then
    log "control plane: e2e/scripts/build.sh in the background (log: $LOG_DIR/go-build.log)"
    JOB_PID[go-build]=""
    (nice -n 10 bash e2e/scripts/build.sh >"$LOG_DIR/go-build.log" 2>&1) &
    JOB_PID[go-build]=$!
fi

# shellcheck source=scripts/test-env.sh
source scripts/test-env.sh
trap 'stop_jobs; env_cleanup' EXIT

# --- steps ---------------------------------------------------------------------------------

# Every Rust suite's files, as one cargo selection.
all_tests=()
for s in "${rust_suites[@]}"; do all_tests+=(--test "$s"); done

checks() {
    log "cargo fmt --check"
    cargo fmt --check
    log "layers (scripts/check-layers.sh)"
    bash scripts/check-layers.sh
    # The manifest and Helm checks need no Rust build: they run beside clippy.
    bg manifests bash -c 'CKS_VENV="$1" bash scripts/validate-manifests.sh && CKS_VENV="$1" bash scripts/check-helm.sh' _ "$VENV"
    log "cargo clippy --locked --all-targets -- -D warnings"
    cargo clippy --locked --all-targets -- -D warnings
}
await_checks() {
    log "waiting for the manifest and Helm checks"
    await manifests || die "the manifest or Helm checks failed (log: $LOG_DIR/manifests.log)"
}

# The files .dockerignore lets into the image's build context must be all the release build reads.
# Checked without compiling again, from what the build just made (JSON messages of cargo, argument
# 1): every source file in the dep-info of the library and of the binary (rustc's own, next to the
# artifact in deps/: `cargo test` does not copy the binary's dep-info beside it), every file the
# build script watches, and the source file of every target Cargo.toml declares but tests (a
# declared [[bench]] whose file is missing fails `cargo build`).
docker_context() { # CARGO_JSON
    log "Docker build context: the files the build reads are let in by .dockerignore"
    local allowed=() item f missing=()
    while read -r item; do allowed+=("${item%/}"); done < <(grep '^!' .dockerignore | sed 's/^!//')
    in_context() {
        local a
        for a in "${allowed[@]}"; do
            case "$1" in "$a" | "$a"/*) return 0 ;; esac
        done
        return 1
    }
    local read_files watched targets
    read_files=$("$CKS_PYTHON" - "$1" "$ROOT" <<'PY'
import glob, json, os, sys
messages, root = sys.argv[1], sys.argv[2]
deps = set()  # the dep-info files of the package's library and binary
for line in open(messages):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or m["profile"]["test"]:
        continue
    if not m["package_id"].startswith("path+file://"):
        continue
    kind = m["target"]["kind"]
    if "lib" in kind:
        rlib = next(f for f in m["filenames"] if f.endswith(".rlib"))
        d = os.path.join(os.path.dirname(rlib), os.path.basename(rlib)[3:-5] + ".d")
        deps.add(d)
    elif "bin" in kind:
        # The binary beside target/debug is a hard link of rustc's output in deps/.
        exe = m["executable"]
        stem = m["target"]["name"].replace("-", "_")
        for f in glob.glob(os.path.join(os.path.dirname(exe), "deps", stem + "-*")):
            if not f.endswith(".d") and os.path.samefile(f, exe):
                deps.add(f + ".d")
if len(deps) != 2:
    sys.exit("expected the dep-info of one library and one binary, found: %s" % sorted(deps))
files = set()
for d in deps:
    for line in open(d):
        if line.startswith("#") or ":" not in line:
            continue
        for word in line.split(":", 1)[1].split():
            if os.path.isabs(word):
                if not word.startswith(root + "/"):
                    continue  # OUT_DIR, the registry
                word = word[len(root) + 1:]
            files.add(word)
if not files:
    sys.exit("no source files in %s" % sorted(deps))
print("\n".join(sorted(files)))
PY
    ) || die "could not read the dep-info of the build (cargo messages: $1)"
    watched=$(cat "$CARGO_TARGET_DIR"/debug/build/celery-keda-scaler-*/output 2>/dev/null |
        sed -n 's/^cargo:rerun-if-changed=//p' | sort -u || true)
    [ -n "$watched" ] || die "the build script's output (rerun-if-changed lines) was not found under $CARGO_TARGET_DIR/debug/build"
    targets=$(cargo metadata --locked --offline --no-deps --format-version 1 | "$CKS_PYTHON" -c '
import json, os, sys
root = sys.argv[1]
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" not in t["kind"]:
            print(os.path.relpath(t["src_path"], root))
' "$ROOT")
    for f in $read_files $watched $targets Cargo.toml Cargo.lock; do
        in_context "$f" || missing+=("$f")
    done
    [ ${#missing[@]} -eq 0 ] || die "the build reads files .dockerignore keeps out of the image's context: ${missing[*]}"
    printf '    %s source files, %s watched files, %s targets: all in the context\n' \
        "$(wc -w <<<"$read_files")" "$(wc -w <<<"$watched")" "$(wc -w <<<"$targets")" >&2
}

build_tests() {
    log "cargo test --locked --all-targets --no-run"
    cargo test --locked --all-targets --no-run --message-format=json-render-diagnostics >"$LOG_DIR/test-binaries.json"
    # One line per test binary: target kind, target name, path.
    "$CKS_PYTHON" - "$LOG_DIR/test-binaries.json" >"$LOG_DIR/test-binaries.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        print(t["kind"][0], t["name"], m["executable"])
PY
    printf '    %s test binaries\n' "$(wc -l <"$LOG_DIR/test-binaries.txt")" >&2
}

# test_binary KIND NAME: the path of a test binary built by build_tests.
test_binary() {
    awk -v k="$1" -v n="$2" '$1 == k && $2 == n { print $3 }' "$LOG_DIR/test-binaries.txt"
}

# Runs test binaries the way `cargo test` does (from the package root, with CARGO_MANIFEST_DIR),
# but several at once: they mostly wait on brokers, workers and timers. Each job is
# "LABEL|ENV|KIND|NAME|ARGS"; its output goes to $LOG_DIR/rust/LABEL.log and is printed whole when
# it fails. Jobs are started in the order given (longest first).
run_binaries() { # JOBS... (CKS_RUST_JOBS at once, default 4)
    local max=${CKS_RUST_JOBS:-4} failed=() job
    local -A label_of=() start_of=()
    mkdir -p "$LOG_DIR/rust"
    for job in "$@"; do
        while [ ${#label_of[@]} -ge "$max" ]; do reap; done
        local label env kind name args bin
        IFS='|' read -r label env kind name args <<<"$job"
        bin=$(test_binary "$kind" "$name")
        [ -n "$bin" ] || { failed+=("$label (no $kind binary $name: build_tests did not build it)"); continue; }
        # shellcheck disable=SC2086 # env and args are word lists
        (cd "$ROOT" && env CARGO_MANIFEST_DIR="$ROOT" CARGO_PKG_NAME=celery-keda-scaler $env "$bin" $args) \
            >"$LOG_DIR/rust/$label.log" 2>&1 &
        label_of[$!]=$label
        start_of[$!]=$SECONDS
    done
    while [ ${#label_of[@]} -gt 0 ]; do reap; done
    if [ ${#failed[@]} -gt 0 ]; then
        printf 'FAILED: %s\n' "${failed[@]}" >&2
        return 1
    fi
}
# reap: waits for one job of run_binaries and reports it.
reap() {
    local pid rc=0
    wait -n -p pid "${!label_of[@]}" || rc=$?
    local label=${label_of[$pid]} took=$((SECONDS - ${start_of[$pid]}))
    unset "label_of[$pid]" "start_of[$pid]"
    local summary
    summary=$(grep -E '^test result:' "$LOG_DIR/rust/$label.log" | tail -n 1 || true)
    if [ $rc -eq 0 ]; then
        printf 'ok   %-22s %4ss  %s\n' "$label" "$took" "${summary#test result: }"
    else
        cat "$LOG_DIR/rust/$label.log"
        printf 'FAIL %-22s %4ss  exit %s  (log: %s)\n' "$label" "$took" "$rc" "$LOG_DIR/rust/$label.log"
        failed+=("$label")
    fi
}

rust_suite() { # NAME [ARGS]
    local name=$1
    shift
    log "cargo test --locked --test $name${*:+ -- $*}"
    cargo test --locked --test "$name" ${1+-- "$@"}
}

protected_pass() { # [ARGS]
    # The broker suites again, with the protections of a multi-team cluster on (a loopback-only
    # broker host allowlist, inline SQS without keys refused): the same triggers must read the
    # same exact depths. The test binaries are the ones already built.
    local sel=() s
    for s in "${PROTECTED[@]}"; do sel+=(--test "$s"); done
    log "cargo test, broker suites with the tenancy protections on (CKS_TEST_PROTECTIONS=on)"
    CKS_TEST_PROTECTIONS=on cargo test --locked "${sel[@]}" ${1+-- "$@"}
}

# The container image (scripts/image.sh: podman, offline stand-in base images, the Dockerfile's
# build), then tests/image.rs, which runs it as each manifest does (it renders the Helm chart).
image() { # [libtest ARGS]
    build_image
    rust_suite image "$@"
}

# The image lane of the full run: the image, then the test binary build_tests made.
image_lane() {
    build_image
    run_binaries "image||test|image|"
}

# The image's build runs at the control plane build's low priority: in the full run the Rust
# suites beside it wait on timers and brokers and must not be starved (a cold image build is a
# release build of every dependency).
build_image() {
    CKS_E2E_ONLY=helm bash e2e/scripts/build.sh >/dev/null
    log "container image (scripts/image.sh)"
    nice -n 10 bash scripts/image.sh
}

# The KEDA suite. e2e/scripts/run.sh calls e2e/scripts/build.sh, which waits on the lock of a
# module the background build is still building and then finds it cached; a failed background
# build is retried there, with its error in this lane's log.
keda() { # [go test ARGS]
    if [ -n "${JOB_PID[go-build]:-}" ] && kill -0 "${JOB_PID[go-build]}" 2>/dev/null; then
        log "the control plane is still building in the background (log: $LOG_DIR/go-build.log): waiting for it"
    fi
    bash e2e/scripts/run.sh "$@"
}

# The Rust lane of the full run: every Rust suite, the benches once as tests and the protected
# pass, from the binaries build_tests made, four at a time, the longest first; all but the one
# test that stops the shared RabbitMQ.
rust_lane() {
    local jobs=() first=(routing soak faults footprint rabbitmq tenancy sqs) s p
    local protect="CKS_TEST_PROTECTIONS=on"
    for s in "${first[@]}"; do
        for p in "${PROTECTED[@]}"; do
            [ "$p" = "$s" ] && jobs+=("$s-protected|$protect|test|$s|")
        done
        if [ "$s" = faults ]; then jobs+=("faults||test|faults|--skip $RUST_RABBIT_STOP"); else jobs+=("$s||test|$s|"); fi
    done
    for s in "${rust_suites[@]}"; do
        # image runs in a lane of its own, after the image is built.
        case " ${first[*]} image " in *" $s "*) continue ;; esac
        jobs+=("$s||test|$s|")
        for p in "${PROTECTED[@]}"; do
            [ "$p" = "$s" ] && jobs+=("$s-protected|$protect|test|$s|")
        done
    done
    jobs+=("unit-lib||lib|celery_keda_scaler|" "unit-bin||bin|celery-keda-scaler|")
    for s in benches/*.rs; do jobs+=("bench-$(basename "$s" .rs)||bench|$(basename "$s" .rs)|"); done
    log "Rust suites: ${#jobs[@]} test binaries, ${CKS_RUST_JOBS:-4} at a time (logs: $LOG_DIR/rust/)"
    run_binaries "${jobs[@]}"
}

# --- run -----------------------------------------------------------------------------------

if [ $FULL = 0 ]; then
    for s in "${suites[@]}"; do
        case "$s" in
            faults | keda) rabbit_lock -x ;; # they stop RabbitMQ (unless filtered out)
            *) rabbit_lock -s ;;
        esac
        case "$s" in
            checks)
                checks
                cargo build --locked --bin celery-keda-scaler --message-format=json-render-diagnostics >"$LOG_DIR/build.json"
                docker_context "$LOG_DIR/build.json"
                await_checks
                ;;
            unit) cargo test --locked --lib --bins ${args[0]+-- "${args[@]}"} ;;
            protected) protected_pass "${args[@]}" ;;
            benches) cargo test --locked --bench '*' ;;
            keda) keda "${args[@]}" ;;
            image) image "${args[@]}" ;;
            *) rust_suite "$s" "${args[@]}" ;;
        esac
    done
    log "test command (${suites[*]}) finished in $(since $RUN_START)"
    exit 0
fi

[ "${CKS_SKIP_CHECKS:-0}" = 1 ] || checks
build_tests
# The KEDA suite runs the scaler the Rust suites run (cargo test builds it, with the dev-dependency
# features; a plain `cargo build` would compile the dependencies a second time).
export CKS_SCALER_BIN="$CARGO_TARGET_DIR/debug/celery-keda-scaler"
if [ "${CKS_SKIP_CHECKS:-0}" != 1 ]; then
    docker_context "$LOG_DIR/test-binaries.json"
    await_checks
fi

failed=()
step=$SECONDS
rabbit_lock -s
bg rust rust_lane
if [ $want_keda = 1 ]; then
    bg keda keda -skip "$KEDA_RABBIT_STOP"
fi
bg image image_lane
await rust || failed+=("Rust suites (log: $LOG_DIR/rust.log)")
log "Rust lane done in $(since $step)"
if [ $want_keda = 1 ]; then
    await keda || failed+=("KEDA suite (log: $LOG_DIR/keda.log)")
    log "KEDA lane done in $(since $step)"
else
    log "KEDA end-to-end suite skipped (CKS_E2E=0)"
fi
await image || failed+=("container image (log: $LOG_DIR/image.log)")
log "image lane done in $(since $step)"

# Alone: the shared RabbitMQ node is stopped and started again.
step=$SECONDS
log "the tests that stop the shared RabbitMQ, alone"
rabbit_lock -x
cargo test --locked --test faults -- --exact "$RUST_RABBIT_STOP" || failed+=("faults $RUST_RABBIT_STOP")
if [ $want_keda = 1 ]; then
    keda -run "$KEDA_RABBIT_STOP" || failed+=("KEDA $KEDA_RABBIT_STOP")
fi
log "RabbitMQ outages done in $(since $step)"

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    log "test command failed after $(since $RUN_START)"
    exit 1
fi
log "test command finished in $(since $RUN_START)"
