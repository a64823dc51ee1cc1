#!/usr/bin/env bash
# Build a stepserve image from this checkout and print its size.
#
#   scripts/build-image.sh                  # the CPU image: localhost/stepserve:cpu
#   TARGET=cuda scripts/build-image.sh      # the CUDA image (needs its base image)
#   TARGET=redis scripts/build-image.sh     # Redis for deploy/compose.yaml (Debian's)
#
# Works with buildah/podman (no daemon) or docker. On machines that reach only the
# package registries it makes what the public images would give:
#   - the base: the public image (BASE, default python:3.11-slim) if it can be pulled,
#     else a local Debian base made with debootstrap from apt's own mirror;
#   - torch: a torch wheel that pip's find-links hold on this machine (copied into
#     deploy/image/wheels/) is preferred, and PyTorch's index is used only if reachable;
#   - pip's CA bundle (from `pip config`) for the build stages (deploy/image/certs/).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${TARGET:-cpu}
DOCKERFILE=Dockerfile
if [ "$TARGET" = redis ]; then
    DOCKERFILE=deploy/redis.Dockerfile
    TAG=${TAG:-localhost/stepserve-redis:latest}
    BASE=${BASE:-debian:bookworm-slim}
fi
TAG=${TAG:-localhost/stepserve:$TARGET}
BASE=${BASE:-python:3.11-slim}
LOCAL_BASE=localhost/debian-base:bookworm

if command -v buildah >/dev/null; then
    BUILD=(buildah bud --isolation chroot --layers)
    IMAGES=podman
elif command -v docker >/dev/null; then
    BUILD=(docker build)
    IMAGES=docker
else
    echo "build-image: needs buildah (+ podman) or docker" >&2
    exit 2
fi

have_image() { "$IMAGES" image exists "$1" 2>/dev/null || "$IMAGES" image inspect "$1" >/dev/null 2>&1; }

local_base() {
    # a minimal Debian with python3 and venv, from the mirror apt already uses
    have_image "$LOCAL_BASE" && return
    command -v debootstrap >/dev/null || { echo "build-image: $BASE cannot be pulled and" \
        "debootstrap is missing (apt-get install -y debootstrap)" >&2; exit 2; }
    local mirror rootfs
    # the Debian archive apt uses (its active .list / .sources files only)
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '^(URIs:|deb) *https?://[^ ]+' | awk '{print $2}' \
        | grep -E '/debian/?$' | head -1 || true)
    rootfs=$(mktemp -d)
    echo "build-image: making $LOCAL_BASE from ${mirror:-http://deb.debian.org/debian}" >&2
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1
    then
        tail -20 "$rootfs.log" >&2
        echo "build-image: debootstrap failed (log above)" >&2
        exit 2
    fi
    tar -C "$rootfs" -c . | "$IMAGES" import - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
}

if [ "$TARGET" != cuda ]; then
    if ! have_image "$BASE" && ! timeout 60 "$IMAGES" pull -q "$BASE" >/dev/null 2>&1; then
        local_base
        BASE=$LOCAL_BASE
    fi
fi

ARGS=(--build-arg "BASE=$BASE" -t "$TAG")
[ "$TARGET" = redis ] || ARGS+=(--target "$TARGET")
# torch: prefer a wheel pip finds on this machine; PyTorch's index only if reachable
rm -f deploy/image/wheels/*.whl deploy/image/certs/*.crt
for dir in $(pip config list 2>/dev/null | sed -nE "s/.*find-links='([^']*)'.*/\1/p"); do
    cp "$dir"/torch-2.13.0*.whl deploy/image/wheels/ 2>/dev/null || true
done
if ! timeout 10 python3 -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=8)" 2>/dev/null; then
    ARGS+=(--build-arg TORCH_INDEX= --build-arg CUDA_TORCH_INDEX=)
fi
cert=$(pip config list 2>/dev/null | sed -nE "s/^global\.cert='([^']*)'/\1/p" | head -1)
if [ -n "$cert" ] && [ -f "$cert" ]; then
    cp "$cert" deploy/image/certs/ca.crt
    ARGS+=(--build-arg PIP_CERT=/image/certs/ca.crt)
fi

start=$(date +%s)
"${BUILD[@]}" "${ARGS[@]}" -f "$DOCKERFILE" .
echo "build-image: built $TAG in $(( $(date +%s) - start )) s" >&2
"$IMAGES" image inspect "$TAG" --format '{{.Size}}' | awk -v t="$TAG" \
    '{printf "%s: %.0f MB\n", t, $1 / 1e6}'
