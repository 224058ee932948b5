#!/usr/bin/env bash
# Build the local base image `mpreg-base:bookworm` (or $1) from scratch.
#
# Why: no container registry is reachable from our machines, so `FROM debian` cannot be
# pulled. debootstrap fetches .deb packages from its default Debian mirror (plain apt
# traffic, not a registry) and `docker import` turns the resulting root filesystem into
# an image. Idempotent: does nothing when the image already exists.
# Needs root (debootstrap chroots; apt-get installs debootstrap when missing).
set -euo pipefail

IMAGE="${1:-${MPREG_BASE_IMAGE:-mpreg-base:bookworm}}"
SUITE="bookworm"   # must match the host's glibc era: the binary is built on the host

log() { echo "build-base-image: $*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists, nothing to do"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    log "debootstrap missing, installing it with apt-get"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >&2
fi

ROOTFS="$(mktemp -d /tmp/mpreg-rootfs.XXXXXX)"
# The rootfs holds root-owned files and device nodes; remove it whatever happens.
trap 'rm -rf --one-file-system "$ROOTFS"' EXIT

log "debootstrap --variant=minbase $SUITE into $ROOTFS (about 30 s)"
# No mirror argument on purpose: debootstrap's built-in default mirror is used.
debootstrap --variant=minbase "$SUITE" "$ROOTFS" >&2

# Package lists and caches are dead weight in a runtime image.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

log "importing rootfs as $IMAGE"
tar -C "$ROOTFS" -c . | docker import - "$IMAGE" >&2
log "done: $(docker image inspect --format '{{.Id}} {{.Size}} bytes' "$IMAGE")"
