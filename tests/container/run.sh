#!/usr/bin/env bash
# Container test (run by CI): build the runtime image, start one node in it, and talk to
# it from the host through the published ports. The node listens on 0.0.0.0, so it runs
# with credentials made here, now (docker/make-credentials.sh, mounted read-only); the
# same image without credentials refuses to start. Needs docker, cargo and root (for the
# base image's debootstrap, only the first time). Prints one `ok - ` / `not ok - ` line
# per check; on failure dumps the container logs and exits non-zero.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

IMAGE="mpreg-node:test"
NAME="mpreg-ctest-$$-${RANDOM}"   # unique, so parallel runs and leftovers never collide
BIN="$ROOT/target/release/mpreg"  # the host copy of the binary that went into the image
WAIT_SECS=60                      # bound for every poll below
STARTED=0
KEYS="$(mktemp -d /tmp/mpreg-ctest-keys.XXXXXX)"   # authority + credentials, made at test time

# ok, not_ok, summary_and_exit, fatal, step, build_image, container_* (shared with cluster.sh).
SUITE="container test"
# shellcheck source=tests/container/lib.sh
. "$ROOT/tests/container/lib.sh"

cleanup() {
    # -v also drops the anonymous /data volume the container created.
    if [ "$STARTED" = 1 ]; then docker rm -f -v "$NAME" >/dev/null 2>&1 || true; fi
    rm -rf "$KEYS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # turn signals into a normal exit so the EXIT trap runs

dump_logs() {
    if [ "$STARTED" = 1 ]; then
        echo "----- docker logs $NAME -----"
        docker logs "$NAME" 2>&1 || true
        echo "----- end of logs -----"
    fi
}

logs()      { container_logs "$NAME"; }
running()   { container_running "$NAME"; }
host_port() { container_host_port "$NAME" "$1"; }

# ---- build ---------------------------------------------------------------------------
build_image "$IMAGE"
# The image's default command reads /run/mpreg-keys/node.cred in cluster default-cluster.
make_credentials "$KEYS" default-cluster node

# ---- start ---------------------------------------------------------------------------
# Set before `docker run`: a run that fails after creating the container (say, a port
# bind error) still leaves a container behind for cleanup to remove.
STARTED=1
if docker run -d --name "$NAME" -p 127.0.0.1::9000 -p 127.0.0.1::9100 \
    -v "$KEYS/nodes:/run/mpreg-keys:ro" "$IMAGE" >/dev/null; then
    ok "container $NAME started"
else
    fatal "container $NAME started"
fi

RPC_PORT="$(host_port 9000)"
MON_PORT="$(host_port 9100)"
if [ -n "$RPC_PORT" ] && [ -n "$MON_PORT" ]; then
    ok "published ports: rpc 127.0.0.1:$RPC_PORT, monitoring 127.0.0.1:$MON_PORT"
else
    # An exited container has no published ports: say what actually happened.
    fatal "published ports found (rpc='$RPC_PORT' monitoring='$MON_PORT'," \
        "container $(docker inspect -f '{{.State.Status}}, exit code {{.State.ExitCode}}' "$NAME"))"
fi
URL="ws://127.0.0.1:$RPC_PORT"

# The node prints MPREG_URL= once it listens: the only readiness signal we wait on.
deadline=$((SECONDS + WAIT_SECS))
until grep -q 'MPREG_URL=' <<<"$(logs)"; do
    running || fatal "node printed MPREG_URL= (container exited early)"
    [ "$SECONDS" -lt "$deadline" ] || fatal "node printed MPREG_URL= within ${WAIT_SECS}s"
    sleep 0.5
done
ok "node printed MPREG_URL= ($(grep -m1 -o 'MPREG_URL=[^[:space:]]*' <<<"$(logs)"))"

# ---- checks --------------------------------------------------------------------------
# Every client call is bounded by `timeout` so a hung connection fails instead of hanging CI.
out="$(timeout 30 "$BIN" client call echo '["from-host"]' --url "$URL" 2>&1)" || true
if grep -q 'from-host' <<<"$out"; then ok "echo from host returned from-host"
else not_ok "echo from host returned from-host (got: $out)"; fi

out="$(timeout 30 "$BIN" client call add '[20,22]' --locs cpu --url "$URL" 2>&1)" || true
if grep -Eq '(^|[^0-9])42([^0-9]|$)' <<<"$out"; then ok "add [20,22] with locs cpu returned 42"
else not_ok "add [20,22] with locs cpu returned 42 (got: $out)"; fi

if timeout 30 "$BIN" client health --url "http://127.0.0.1:$MON_PORT/health" >/dev/null 2>&1; then
    ok "/health answers 200 on the published monitoring port"
else
    not_ok "/health answers 200 on the published monitoring port"
fi

if grep -q 'peer links are authenticated' <<<"$(logs)"; then ok "node runs with credentials (peer links are authenticated)"
else not_ok "node runs with credentials ('peer links are authenticated' not logged)"; fi

# Open mode on 0.0.0.0 is refused with a clear error and a non-zero exit.
rc=0
out="$(timeout 60 docker run --rm "$IMAGE" server start --host 0.0.0.0 --port 9000 --monitoring-port 9100 2>&1)" || rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q -- '--insecure' <<<"$out"; then
    ok "without credentials the node refuses to listen on 0.0.0.0 (exit $rc)"
else
    not_ok "without credentials the node refuses to listen on 0.0.0.0 (exit $rc: $out)"
fi

n="$(grep -c 'actor started' <<<"$(logs)" || true)"
if [ "$n" -gt 0 ]; then ok "logs show supervision start-up ($n 'actor started' lines)"
else not_ok "logs show supervision start-up ('actor started')"; fi

deadline=$((SECONDS + WAIT_SECS))
status=""
while :; do
    status="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$NAME" 2>/dev/null || true)"
    [ "$status" = healthy ] && break
    running || break
    [ "$SECONDS" -lt "$deadline" ] || break
    sleep 1
done
if [ "$status" = healthy ]; then ok "docker health status is healthy"
else not_ok "docker health status is healthy within ${WAIT_SECS}s (last: '${status:-none}')"; fi

uid="$(docker exec "$NAME" id -u 2>/dev/null || true)"
if [ -n "$uid" ] && [ "$uid" != 0 ]; then ok "container runs as non-root (uid $uid)"
else not_ok "container runs as non-root (uid '${uid:-unknown}')"; fi

summary_and_exit
