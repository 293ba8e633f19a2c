#!/usr/bin/env bash
# Builds the scaler's container image from the Dockerfile with podman, the way a user builds it
# with Docker, on a machine that reaches no container registry, and checks what the image is:
#
#   1. installs podman, runc and debootstrap when missing (Debian packages);
#   2. writes a containers.conf for this host (runc; ulimits low enough for its limits) and points
#      CONTAINERS_CONF at it;
#   3. makes two stand-in base images offline from Debian's mirror (`debootstrap --variant=minbase
#      bookworm`), cached outside the clone and keyed by their recipe:
#        runtime  what gcr.io/distroless/cc-debian12:nonroot provides: glibc, libgcc, libgomp,
#                 libstdc++, libssl, CA certificates, tzdata, netbase, /etc/passwd with nonroot
#                 (uid 65532); no shell, no package manager;
#        builder  what rust:1-bookworm provides: a C/C++ toolchain and CA certificates, with this
#                 machine's Rust toolchain mounted read-only at build time (crates still come
#                 from crates.io, into the Dockerfile's cache mounts);
#   4. `podman build`s the Dockerfile unchanged, only RUST_IMAGE / RUNTIME_IMAGE set to the
#      stand-ins (the cargo registry and target/ stay in the Dockerfile's cache mounts, in
#      podman's storage, so a rebuild compiles only what changed);
#   5. checks the image: user 65532:65532 in its config and in a running container, its OCI
#      labels (version = the crate's, revision = HEAD), entrypoint, command and ports, a clean
#      exit 0 on SIGTERM; prints the binary's and the image's size.
#
#   bash scripts/image.sh        from the repository root (or anywhere: it cds there)
#
# Then `cargo test --test image` runs the image as the manifests run it (tests/image.rs).
# Knobs: CKS_IMAGE (tag, default localhost/celery-keda-scaler:test), CKS_IMAGE_CACHE (stand-in
# base images, default ~/.cache/celery-keda-scaler/images; CONTAINERS_CONF is written there too).
# Output of the long steps: target/image/*.log. On failure: exit 1 with one line saying why.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMAGE="${CKS_IMAGE:-localhost/celery-keda-scaler:test}"
CACHE="${CKS_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/celery-keda-scaler/images}"
LOGS="$ROOT/target/image"
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
# The builder's packages: rust:1-bookworm's C toolchain (buildpack-deps) as far as a Rust build
# can use it. netbase and tzdata are there for the runtime image, which is cut from the same tree.
BUILDER_PACKAGES=gcc,g++,libc6-dev,make,pkg-config,ca-certificates,netbase,tzdata
# The packages whose files make the runtime image (distroless cc = base + libgcc, libgomp, libstdc++).
RUNTIME_PACKAGES=(base-files libc6 libgcc-s1 libgomp1 libstdc++6 libssl3 netbase tzdata)
# Where the builder expects the Rust toolchain (mounted read-only by `podman build --volume`).
TOOLCHAIN_MOUNT=/usr/local/rust

log() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
# The last line of a log that says what went wrong, for the one-line error.
why() { # log
    local line
    line="$(grep -E '^(error|Error|ERRO|E:)|error(\[E[0-9]+\])?:' "$1" 2>/dev/null | tail -n 1 || true)"
    [ -n "$line" ] || line="$(tail -n 1 "$1" 2>/dev/null || true)"
    printf '%s' "${line:0:300}"
}

mkdir -p "$LOGS" "$CACHE"
START=$SECONDS

# --- 1. tools --------------------------------------------------------------------------------

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root (podman runs the image as root here)"
    { DEBIAN_FRONTEND=noninteractive apt-get update &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; } \
        >"$LOGS/apt.log" 2>&1 || die "apt-get install ${missing[*]} failed: $(why "$LOGS/apt.log") (log: $LOGS/apt.log)"
fi
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac
[ "$(id -u)" -eq 0 ] || die "podman runs the image as root on this machine kind: run as root"

# One run at a time per cache (two clones share the stand-ins and the cargo cache mounts).
exec 9>"$CACHE/.lock"
flock 9

# --- 2. containers.conf ------------------------------------------------------------------------

# crun fails on this host's hybrid cgroups and the default ulimits are above the host's: runc,
# and ulimits it can set. tests/image.rs reads the same file (CONTAINERS_CONF or this path).
export CONTAINERS_CONF="$CACHE/containers.conf"
conf='# Written by scripts/image.sh: podman on this machine kind (runc; ulimits the host allows).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"'
[ "$(cat "$CONTAINERS_CONF" 2>/dev/null || true)" = "$conf" ] || printf '%s\n' "$conf" >"$CONTAINERS_CONF"
podman info >"$LOGS/podman-info.log" 2>&1 || die "podman info failed: $(why "$LOGS/podman-info.log") (log: $LOGS/podman-info.log)"
log "$(podman --version), runtime $(podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null), containers.conf $CONTAINERS_CONF"

# --- 3. stand-in base images ---------------------------------------------------------------------

# The builder tree: Debian minbase with the C toolchain. Its apt cache is dropped (not in the image).
# (Called in a condition, where errexit does not apply: every step says `|| return 1`.)
make_builder_rootfs() { # dir
    debootstrap --variant=minbase --include="$BUILDER_PACKAGES" "$SUITE" "$1" "$MIRROR" || return 1
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* || return 1
    mkdir -p "$1/usr/local/cargo" "$1$TOOLCHAIN_MOUNT" || return 1
}

# The runtime tree, cut from the builder tree: only the files of RUNTIME_PACKAGES (no docs), the
# CA bundle, passwd/group with distroless' users, and distroless' directories. No shell.
make_runtime_rootfs() { # builder-dir dir
    local src=$1 dst=$2 p list f
    mkdir -p "$dst/usr/bin" "$dst/usr/lib" "$dst/usr/lib64" "$dst/usr/sbin" || return 1
    for p in bin lib lib64 sbin; do ln -s "usr/$p" "$dst/$p" || return 1; done
    : >"$dst.files" || return 1
    for p in "${RUNTIME_PACKAGES[@]}"; do
        list="$src/var/lib/dpkg/info/$p:amd64.list"
        [ -f "$list" ] || list="$src/var/lib/dpkg/info/$p.list"
        [ -f "$list" ] || {
            echo "error: no file list for $p in the builder tree"
            return 1
        }
        while IFS= read -r f; do
            case "$f" in /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/* | /usr/share/locale/*) continue ;; esac
            if [ -L "$src$f" ] || [ -f "$src$f" ]; then printf '%s\n' "${f#/}" >>"$dst.files"; fi
        done <"$list"
    done
    tar -C "$src" --no-recursion -cf - -T "$dst.files" | tar -C "$dst" --keep-directory-symlink -xpf - || return 1
    rm -f "$dst.files"
    mkdir -p "$dst/etc/ssl" "$dst/usr/share" || return 1
    cp -a "$src/etc/ssl/certs" "$dst/etc/ssl/" || return 1
    cp -a "$src/usr/share/ca-certificates" "$dst/usr/share/" || return 1
    cp -a "$src/etc/ld.so.cache" "$dst/etc/" || return 1
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$dst/etc/passwd" || return 1
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' >"$dst/etc/group" || return 1
    printf '%s\n' 'passwd: files' 'group: files' 'shadow: files' 'hosts: files dns' \
        'networks: files' 'protocols: files' 'services: files' >"$dst/etc/nsswitch.conf" || return 1
    mkdir -p "$dst/tmp" "$dst/root" "$dst/home/nonroot" "$dst/var" "$dst/proc" "$dst/sys" "$dst/dev" || return 1
    chmod 1777 "$dst/tmp" || return 1
    chmod 0700 "$dst/root" "$dst/home/nonroot" || return 1
    chown 65532:65532 "$dst/home/nonroot" || return 1
    # What the binary needs (ldd: libc, libm, libgcc_s and the loader) and the CA bundle.
    for f in usr/lib/x86_64-linux-gnu/libc.so.6 usr/lib/x86_64-linux-gnu/libm.so.6 \
        usr/lib/x86_64-linux-gnu/libgcc_s.so.1 lib64/ld-linux-x86-64.so.2 etc/ssl/certs/ca-certificates.crt; do
        [ -e "$dst/$f" ] || {
            echo "error: the runtime tree lacks /$f"
            return 1
        }
    done
    if [ -e "$dst/bin/sh" ] || [ -e "$dst/usr/bin/bash" ]; then
        echo "error: the runtime tree has a shell"
        return 1
    fi
}

# The recipe's hash names the images and their tarballs: changing the recipe makes new ones.
RECIPE_KEY="$(
    {
        printf '%s\n' "$SUITE" "$MIRROR" "$BUILDER_PACKAGES" "${RUNTIME_PACKAGES[*]}" "$TOOLCHAIN_MOUNT"
        declare -f make_builder_rootfs make_runtime_rootfs
    } | sha256sum | cut -c1-12
)"
BUILDER_BASE="localhost/cks-stand-in-builder:$RECIPE_KEY"
RUNTIME_BASE="localhost/cks-stand-in-runtime:$RECIPE_KEY"
BUILDER_TAR="$CACHE/builder-$RECIPE_KEY.tar"
RUNTIME_TAR="$CACHE/runtime-$RECIPE_KEY.tar"

if [ ! -f "$BUILDER_TAR" ] || [ ! -f "$RUNTIME_TAR" ]; then
    log "making the stand-in base trees with debootstrap ($SUITE, $MIRROR)"
    tree="$(mktemp -d "$CACHE/tree.XXXXXX")"
    t0=$SECONDS
    make_builder_rootfs "$tree/builder" >"$LOGS/debootstrap.log" 2>&1 ||
        { rm -rf "$tree"; die "debootstrap failed: $(why "$LOGS/debootstrap.log") (log: $LOGS/debootstrap.log)"; }
    make_runtime_rootfs "$tree/builder" "$tree/runtime" >>"$LOGS/debootstrap.log" 2>&1 ||
        { rm -rf "$tree"; die "the runtime tree could not be made: $(why "$LOGS/debootstrap.log") (log: $LOGS/debootstrap.log)"; }
    tar -C "$tree/builder" -cf "$BUILDER_TAR.tmp" . && mv "$BUILDER_TAR.tmp" "$BUILDER_TAR"
    tar -C "$tree/runtime" -cf "$RUNTIME_TAR.tmp" . && mv "$RUNTIME_TAR.tmp" "$RUNTIME_TAR"
    rm -rf "$tree"
    note "done in $((SECONDS - t0))s: $(du -h "$BUILDER_TAR" | cut -f1) builder, $(du -h "$RUNTIME_TAR" | cut -f1) runtime"
fi
# Older recipes' tarballs and images go.
for old in "$CACHE"/builder-*.tar "$CACHE"/runtime-*.tar; do
    [ -e "$old" ] || continue
    case "$old" in "$BUILDER_TAR" | "$RUNTIME_TAR") ;; *) rm -f "$old" ;; esac
done
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep -E '^localhost/cks-stand-in-(builder|runtime):' || true); do
    case "$old" in "$BUILDER_BASE" | "$RUNTIME_BASE") ;; *) podman rmi "$old" >/dev/null 2>&1 || true ;; esac
done

import() { # image tarball change...
    local image=$1 tarball=$2
    shift 2
    podman image exists "$image" && return 0
    local changes=()
    for c in "$@"; do changes+=(--change "$c"); done
    podman import "${changes[@]}" "$tarball" "$image" >"$LOGS/import.log" 2>&1 ||
        die "podman import of $tarball failed: $(why "$LOGS/import.log") (log: $LOGS/import.log)"
    note "imported $image"
}
# Environment as the real images set it (rust:1-bookworm: CARGO_HOME, PATH; distroless: PATH,
# SSL_CERT_FILE, user nonroot in /home/nonroot).
import "$BUILDER_BASE" "$BUILDER_TAR" \
    "ENV CARGO_HOME=/usr/local/cargo" \
    "ENV PATH=$TOOLCHAIN_MOUNT/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "CMD [\"bash\"]"
import "$RUNTIME_BASE" "$RUNTIME_TAR" \
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    "USER 65532" \
    "WORKDIR /home/nonroot"
log "stand-in bases: $BUILDER_BASE, $RUNTIME_BASE (cache $CACHE)"

# --- 4. podman build -------------------------------------------------------------------------------

# This machine's Rust toolchain (rustup's active one, or the one rustc comes from).
rustc_path="$(rustup which rustc 2>/dev/null || command -v rustc || true)"
[ -n "$rustc_path" ] || die "no Rust toolchain (rustc) on this machine: install one with rustup"
TOOLCHAIN="$(cd "$(dirname "$(readlink -f "$rustc_path")")/.." && pwd)"
[ -x "$TOOLCHAIN/bin/cargo" ] && [ -x "$TOOLCHAIN/bin/rustc" ] ||
    die "the Rust toolchain at $TOOLCHAIN has no bin/cargo and bin/rustc"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
# The host's CA bundle, mounted over the builder's for the build only: on a network whose HTTPS
# goes through a TLS-inspecting proxy (this machine kind's does) crates.io is trusted only through
# the CAs the host added; the images keep Debian's bundle.
CA_BUNDLE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
[ -f "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (install ca-certificates, or set SSL_CERT_FILE)"

# podman 4.3 (buildah 1.28) reuses a cached LABEL step when only the value of the build argument it
# uses changed (containers/buildah#5501): a commit that leaves the binary alike would keep the old
# revision label. --label sets it on the final image whatever the cache holds (README, step 0).
log "podman build -t $IMAGE . ($("$TOOLCHAIN/bin/rustc" --version) mounted from $TOOLCHAIN)"
TIMEFORMAT='%R %U %S'
if ! { time podman build --pull=never --network=host \
    --volume "$TOOLCHAIN:$TOOLCHAIN_MOUNT:ro" \
    --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg "RUST_IMAGE=$BUILDER_BASE" \
    --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE" \
    --build-arg "REVISION=$REVISION" \
    --label "org.opencontainers.image.revision=$REVISION" \
    -t "$IMAGE" -f Dockerfile . >"$LOGS/build.log" 2>&1; } 2>"$LOGS/build.time"; then
    die "podman build failed: $(why "$LOGS/build.log") (log: $LOGS/build.log)"
fi
read -r wall user sys <"$LOGS/build.time"
compiled="$(grep -c '^ *Compiling ' "$LOGS/build.log" || true)"
note "built in ${wall%.*}s, CPU $(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%d", u + s }')s of podman and its children; cargo compiled $compiled crates"

# --- 5. checks ----------------------------------------------------------------------------------------

inspect() { podman image inspect --format "$1" "$IMAGE"; }
check() { # what got want
    [ "$2" = "$3" ] || die "image $IMAGE: $1 is '$2', expected '$3'"
}
check "user" "$(inspect '{{.Config.User}}')" "65532:65532"
check "entrypoint" "$(inspect '{{json .Config.Entrypoint}}')" '["/usr/local/bin/celery-keda-scaler"]'
check "command" "$(inspect '{{json .Config.Cmd}}')" '["serve"]'
check "exposed ports" "$(inspect '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}')" "6000/tcp 9090/tcp "
label() { inspect "{{index .Config.Labels \"org.opencontainers.image.$1\"}}"; }
check "label title" "$(label title)" "celery-keda-scaler"
check "label version" "$(label version)" "$VERSION"
check "label revision" "$(label revision)" "$REVISION"
check "label licenses" "$(label licenses)" "$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
check "label source" "$(label source)" "https://github.com/example/celery-keda-scaler"
check "label base.name" "$(label base.name)" "gcr.io/distroless/cc-debian12:nonroot"
[ -n "$(label description)" ] || die "image $IMAGE: label description is empty"

# The image's own entrypoint and user, started as a restricted pod would start it; SIGTERM ends it
# with 0. Its own network namespace, so the default ports do not matter here.
ctr="cks-image-check-$$"
podman rm -f "$ctr" >/dev/null 2>&1 || true
podman run -d --name "$ctr" --network=none --read-only --read-only-tmpfs=false --cap-drop=ALL \
    --security-opt=no-new-privileges "$IMAGE" >"$LOGS/run.log" 2>&1 ||
    die "podman run $IMAGE failed: $(why "$LOGS/run.log") (log: $LOGS/run.log)"
trap 'podman rm -f "$ctr" >/dev/null 2>&1 || true' EXIT
pid=0
for _ in $(seq 1 100); do
    pid="$(podman inspect --format '{{.State.Pid}}' "$ctr" 2>/dev/null || echo 0)"
    [ "$pid" != 0 ] && podman logs "$ctr" 2>&1 | grep -q 'Serving gRPC' && break
    sleep 0.1
done
[ "$pid" != 0 ] || die "the container exited at once: $(podman logs "$ctr" 2>&1 | tail -n 1)"
uids="$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")"
gids="$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")"
check "uid of the running process" "$uids" "65532 65532 65532 65532"
check "gid of the running process" "$gids" "65532 65532 65532 65532"
podman stop --time 10 "$ctr" >/dev/null 2>&1 || true
check "exit code after SIGTERM" "$(podman inspect --format '{{.State.ExitCode}}' "$ctr")" "0"
podman rm -f "$ctr" >/dev/null 2>&1 || true
trap - EXIT

# Sizes: the binary (from the image's own filesystem) and the image, uncompressed.
mnt="$(podman image mount "$IMAGE")"
binary_bytes="$(stat -c %s "$mnt/usr/local/bin/celery-keda-scaler")"
podman image unmount "$IMAGE" >/dev/null 2>&1 || true
image_bytes="$(inspect '{{.Size}}')"
base_bytes="$(podman image inspect --format '{{.Size}}' "$RUNTIME_BASE")"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
log "image $IMAGE ok: user 65532:65532, OCI labels (version $VERSION, revision ${REVISION:0:12}), exit 0 on SIGTERM"
note "binary /usr/local/bin/celery-keda-scaler: $(mib "$binary_bytes") ($binary_bytes bytes)"
note "image: $(mib "$image_bytes") uncompressed, of which the stand-in runtime base $(mib "$base_bytes")"
note "done in $((SECONDS - START))s"
