#!/usr/bin/env bash
# Build the Python worker image `mpreg-worker:latest` (or $1) from python/Dockerfile.
#
# The build context is staged in target/worker-image: the SDK (python/mpreg_worker), its
# examples, and websockets installed into site/ by the host's pip for the image's Python
# (bookworm's 3.11, x86_64 or aarch64 as the host) — the image itself needs no package
# index. Needs the base image (docker/build-base-image.sh).
set -euo pipefail

IMAGE="${1:-mpreg-worker:latest}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="$ROOT/target/worker-image"
PYTHON="${PYTHON:-python3}"

log() { echo "build-worker-image: $*" >&2; }

rm -rf "$STAGE"
mkdir -p "$STAGE/site"
cp -r "$ROOT/python/mpreg_worker" "$ROOT/python/examples" "$STAGE/"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
log "websockets for CPython 3.11 ($(uname -m)) into $STAGE/site"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$STAGE/site" \
    --python-version 3.11 --implementation cp --only-binary=:all: \
    --platform "manylinux2014_$(uname -m)" "websockets>=13,<16"
log "docker build -t $IMAGE"
docker build -q -t "$IMAGE" -f "$ROOT/python/Dockerfile" "$STAGE" >&2
log "done: $IMAGE"
