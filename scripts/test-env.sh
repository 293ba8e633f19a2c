#!/usr/bin/env bash
# The test environment: installs what is missing (Debian packages, the Celery virtualenv) and
# starts the brokers the suites talk to (Redis, RabbitMQ with the management API, a local SQS from
# moto), then exports CKS_* variables that point at them.
#
#   eval "$(bash scripts/test-env.sh)"    prepare, and print `export` lines for the caller's shell
#                                          (moto keeps running in the background; its pid is printed)
#   source scripts/test-env.sh             what scripts/test.sh does: the variables are set in the
#                                          sourcing shell, and moto stops when that shell exits
#
# Knobs: CKS_VENV (virtualenv, default <repo>/.venv). Needs Debian/Ubuntu for the apt step;
# brokers already running on their standard ports are reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Executed: print the exports. Sourced (scripts/test.sh): set them here, stop moto at exit.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then ENV_ONLY=1; else ENV_ONLY="${CKS_ENV_ONLY:-0}"; fi
VENV="${CKS_VENV:-$ROOT/.venv}"
ENV_DIR="$ROOT/target/test-env"
REQUIREMENTS="$ROOT/tests/requirements.txt"

REDIS_HOST=127.0.0.1
REDIS_PORT=6379
AMQP_PORT=5672
MGMT_PORT=15672
WAIT_REDIS=30
WAIT_RABBIT=120
WAIT_MGMT=90
WAIT_MOTO=60

# rabbitmq-* live in /usr/sbin, which is not on a normal user's PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac
export PATH

# Everything except the `export` lines of the print-exports mode goes to stderr, so the
# output can be eval'ed.
log() { printf '==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
fi
as_root() {
    if [ "${#SUDO[@]}" -gt 0 ]; then "${SUDO[@]}" "$@"; else "$@"; fi
}

START_SECONDS=$SECONDS
mkdir -p "$ENV_DIR"

# --- helpers ---------------------------------------------------------------------

port_open() { # host port
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}

# Prints the HTTP status of a GET (000 when nothing answers).
http_status() { # url [user:password]
    local url=$1 auth=${2:-}
    if command -v curl >/dev/null 2>&1; then
        local args=(-s -o /dev/null -w '%{http_code}' --max-time 5)
        [ -n "$auth" ] && args+=(-u "$auth")
        curl "${args[@]}" "$url" 2>/dev/null || true
    else
        local py
        py=$(command -v python3 || true)
        [ -x "$VENV/bin/python" ] && py="$VENV/bin/python"
        "$py" - "$url" "$auth" <<'PY' 2>/dev/null || echo 000
import base64, sys, urllib.error, urllib.request
url, auth = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url)
if auth:
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
    fi
}

redis_ping() {
    [ "$(timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null || true)" = PONG ]
}

rabbit_log_tail() {
    local f
    for f in "$ENV_DIR/rabbitmq-start.log" /var/log/rabbitmq/startup_log /var/log/rabbitmq/startup_err /var/log/rabbitmq/*.log; do
        if [ -s "$f" ]; then
            printf -- '--- tail of %s ---\n' "$f" >&2
            as_root tail -n 40 "$f" >&2 || true
        fi
    done
}

# --- 1. Debian packages and the virtualenv (serialised between concurrent runs) ---

if command -v flock >/dev/null 2>&1; then
    exec 9>"$ENV_DIR/prepare.lock"
    flock 9
fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
for bin in rabbitmq-server rabbitmqctl rabbitmq-plugins; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        missing+=(rabbitmq-server)
        break
    fi
done
# Prometheus, for the KEDA suite's plain HPA without KEDA (e2e/keda/prometheus_adapter_test.go).
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    if [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
        die "missing ${missing[*]}; run as root or install sudo"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    # A package's service may fail to start here (no systemd, policy-rc.d); the
    # services are started below, so only the binaries matter.
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        note "apt-get install reported an error (often a service that cannot start here); checking the binaries"
        as_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a >&2 || true
    fi
    for bin in redis-server redis-cli redis-sentinel rabbitmq-server rabbitmqctl rabbitmq-plugins prometheus python3; do
        command -v "$bin" >/dev/null 2>&1 || die "$bin is still missing after apt-get install"
    done
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV" >&2
    rm -f "$VENV/.cks-requirements.sha256"
fi
STAMP="$VENV/.cks-requirements.sha256"
want_sum="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want_sum" ]; then
    log "pip install -r tests/requirements.txt"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -r "$REQUIREMENTS" >&2
    printf '%s\n' "$want_sum" >"$STAMP"
fi
for bin in python celery moto_server; do
    [ -x "$VENV/bin/$bin" ] || die "$VENV/bin/$bin is missing; delete $STAMP and re-run"
done

if command -v flock >/dev/null 2>&1; then
    exec 9>&- # daemons started below must not inherit (and hold) the lock
fi

# --- 2. Redis ---------------------------------------------------------------------

if redis_ping; then
    log "Redis: using the server already answering on $REDIS_HOST:$REDIS_PORT"
else
    log "Redis: starting redis-server on $REDIS_HOST:$REDIS_PORT"
    mkdir -p "$ENV_DIR/redis"
    : >"$ENV_DIR/redis/redis.log"
    # A concurrent run may win the race for the port; waiting for PONG covers that.
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" \
        --save "" --appendonly no \
        --dir "$ENV_DIR/redis" --logfile "$ENV_DIR/redis/redis.log" \
        --pidfile "$ENV_DIR/redis/redis.pid" >&2 || true
    deadline=$((SECONDS + WAIT_REDIS))
    until redis_ping; do
        if [ $SECONDS -ge $deadline ]; then
            tail -n 30 "$ENV_DIR/redis/redis.log" >&2 2>/dev/null || true
            die "Redis did not answer PING on $REDIS_HOST:$REDIS_PORT within ${WAIT_REDIS}s (log: $ENV_DIR/redis/redis.log)"
        fi
        sleep 0.2
    done
fi
export CKS_REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT"

# --- 3. RabbitMQ with the management API -------------------------------------------

MGMT_URL="http://127.0.0.1:$MGMT_PORT"
if port_open 127.0.0.1 "$AMQP_PORT"; then
    log "RabbitMQ: using the broker already listening on 127.0.0.1:$AMQP_PORT"
else
    # The node may be up but still booting (e.g. just started by systemd).
    if timeout 20 "${SUDO[@]}" rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        log "RabbitMQ: node is running but not listening yet; waiting for it"
    else
        log "RabbitMQ: starting rabbitmq-server -detached"
        as_root rabbitmq-server -detached >"$ENV_DIR/rabbitmq-start.log" 2>&1 || true
    fi
    deadline=$((SECONDS + WAIT_RABBIT))
    until port_open 127.0.0.1 "$AMQP_PORT"; do
        if [ $SECONDS -ge $deadline ]; then
            rabbit_log_tail
            die "RabbitMQ did not listen on 127.0.0.1:$AMQP_PORT within ${WAIT_RABBIT}s"
        fi
        sleep 1
    done
    remaining=$((deadline - SECONDS))
    [ $remaining -lt 15 ] && remaining=15
    if ! timeout "$remaining" "${SUDO[@]}" rabbitmqctl -q await_startup >&2; then
        rabbit_log_tail
        die "rabbitmqctl await_startup failed"
    fi
fi

if [ "$(http_status "$MGMT_URL/api/overview" guest:guest)" != 200 ]; then
    log "RabbitMQ: enabling rabbitmq_management"
    if ! timeout 120 "${SUDO[@]}" rabbitmq-plugins -q enable rabbitmq_management >&2; then
        rabbit_log_tail
        die "rabbitmq-plugins enable rabbitmq_management failed"
    fi
    deadline=$((SECONDS + WAIT_MGMT))
    until [ "$(http_status "$MGMT_URL/api/overview" guest:guest)" = 200 ]; do
        if [ $SECONDS -ge $deadline ]; then
            rabbit_log_tail
            die "RabbitMQ management API $MGMT_URL/api/overview did not answer 200 (guest:guest) within ${WAIT_MGMT}s"
        fi
        sleep 1
    done
fi
export CKS_AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT//"
export CKS_RABBITMQ_MANAGEMENT_URL="$MGMT_URL"

# --- 4. SQS (moto_server) ------------------------------------------------------------

MOTO_PID=""
MOTO_PORT=""
env_cleanup() { # stops the moto this script started (not in the print-exports mode)
    if [ -n "$MOTO_PID" ] && [ "$ENV_ONLY" != 1 ]; then
        kill "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
    fi
}
trap env_cleanup EXIT

moto_alive() { # pid port
    [ -n "$1" ] && [ -n "$2" ] && kill -0 "$1" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q moto_server &&
        [ "$(http_status "http://127.0.0.1:$2/")" != 000 ]
}

if [ "$ENV_ONLY" = 1 ]; then
    # Reuse the moto a previous CKS_ENV_ONLY run left behind.
    old_pid=$(cat "$ENV_DIR/moto.pid" 2>/dev/null || true)
    old_port=$(cat "$ENV_DIR/moto.port" 2>/dev/null || true)
    if moto_alive "$old_pid" "$old_port"; then
        MOTO_PID=$old_pid
        MOTO_PORT=$old_port
        log "SQS: reusing moto_server (pid $MOTO_PID) on 127.0.0.1:$MOTO_PORT"
    fi
fi
if [ -z "$MOTO_PID" ]; then
    MOTO_PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log "SQS: starting moto_server on 127.0.0.1:$MOTO_PORT"
    if [ "$ENV_ONLY" = 1 ]; then
        # Outlives this script: stdout must not be the caller's $(...) pipe.
        nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" </dev/null >"$ENV_DIR/moto.log" 2>&1 &
        MOTO_PID=$!
        disown "$MOTO_PID" 2>/dev/null || true
        echo "$MOTO_PID" >"$ENV_DIR/moto.pid"
        echo "$MOTO_PORT" >"$ENV_DIR/moto.port"
    else
        "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" </dev/null >"$ENV_DIR/moto.log" 2>&1 &
        MOTO_PID=$!
    fi
    deadline=$((SECONDS + WAIT_MOTO))
    until [ "$(http_status "http://127.0.0.1:$MOTO_PORT/")" != 000 ]; do
        if ! kill -0 "$MOTO_PID" 2>/dev/null; then
            tail -n 30 "$ENV_DIR/moto.log" >&2 || true
            die "moto_server exited (log: $ENV_DIR/moto.log)"
        fi
        if [ $SECONDS -ge $deadline ]; then
            tail -n 30 "$ENV_DIR/moto.log" >&2 || true
            die "moto_server did not answer on 127.0.0.1:$MOTO_PORT within ${WAIT_MOTO}s (log: $ENV_DIR/moto.log)"
        fi
        sleep 0.2
    done
fi
export CKS_SQS_ENDPOINT="http://127.0.0.1:$MOTO_PORT"

aws_defaulted=()
for kv in AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1; do
    name=${kv%%=*}
    if [ -z "${!name:-}" ]; then
        declare -gx "$kv"
        aws_defaulted+=("$name")
    fi
done

# --- 5. Python --------------------------------------------------------------------------

export CKS_PYTHON="$VENV/bin/python"
export CKS_CELERY="$VENV/bin/celery"
export PATH="$VENV/bin:$PATH"

log "environment ready in $((SECONDS - START_SECONDS))s"
note "CKS_REDIS_URL=$CKS_REDIS_URL"
note "CKS_AMQP_URL=$CKS_AMQP_URL"
note "CKS_RABBITMQ_MANAGEMENT_URL=$CKS_RABBITMQ_MANAGEMENT_URL"
note "CKS_SQS_ENDPOINT=$CKS_SQS_ENDPOINT"
note "CKS_PYTHON=$CKS_PYTHON"

if [ "$ENV_ONLY" = 1 ]; then
    for name in CKS_REDIS_URL CKS_AMQP_URL CKS_RABBITMQ_MANAGEMENT_URL CKS_SQS_ENDPOINT CKS_PYTHON CKS_CELERY; do
        printf 'export %s=%q\n' "$name" "${!name}"
    done
    # Only the defaults this script chose; never echo real credentials.
    for name in "${aws_defaulted[@]}"; do
        printf 'export %s=%q\n' "$name" "${!name}"
    done
    # shellcheck disable=SC2016 # $PATH is for the caller's shell to expand
    printf 'export PATH=%q:"$PATH"\n' "$VENV/bin"
    printf '# moto_server pid %s (log %s); stop it with: kill %s\n' "$MOTO_PID" "$ENV_DIR/moto.log" "$MOTO_PID"
    exit 0
fi

