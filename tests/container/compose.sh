#!/usr/bin/env bash
# Compose test (run by CI after cluster.sh): docker-compose.yml as a user runs it — the
# three nodes and the Python worker service — under a project name of its own, with
# credentials made here, now (docker/make-credentials.sh, the worker's token included)
# and every published port picked by docker (MPREG_*_PORT/MON=0).
#
# From the host, through node-a: the cluster forms; the worker's text_stats (a function
# no node has, served by a Python process attached to node-b) answers, also inside a DAG
# with node-c's tpu_square; node-a's /catalog marks it as served by a worker; node-b
# restarts and the worker reconnects and serves again; the worker is stopped (SIGTERM:
# it says goodbye) and a call of text_stats fails fast with 1001. Needs docker with
# `docker-compose` (v1) or `docker compose`, cargo, curl, jq, pip and root (for the base
# image, only the first time). Everything the project created is removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

RUN_ID="$$-${RANDOM}"
PROJECT="mpreg-compose-$RUN_ID"
BIN="$ROOT/target/release/mpreg"
START_SECS=90                     # bound for the cluster and the worker to come up
HEAL_SECS=60                      # bound for the worker to serve again after node-b restarts
FAST_MS=5000
CALL_SECS=30
WORK="$(mktemp -d /tmp/mpreg-compose.XXXXXX)"
UP=0

SUITE="compose test"
# shellcheck source=tests/container/lib.sh
. "$ROOT/tests/container/lib.sh"

if command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
else echo "compose test: neither docker-compose nor docker compose is installed" >&2; exit 1; fi
COMPOSE+=(-p "$PROJECT" -f "$ROOT/docker-compose.yml")
export MPREG_KEYS="$WORK/keys" MPREG_A_PORT=0 MPREG_A_MON=0 MPREG_B_MON=0 MPREG_C_MON=0

cleanup() {
    if [ "$UP" = 1 ]; then "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dump_logs() { "${COMPOSE[@]}" logs --no-color 2>&1 | tail -n 300 || true; }

# ---- build and start ------------------------------------------------------------------
build_image mpreg-node:latest
step "worker image mpreg-worker:latest" bash "$ROOT/docker/build-worker-image.sh"
make_credentials "$WORK/keys" mpreg-demo node-a node-b node-c
UP=1
step "${COMPOSE[*]} up -d" "${COMPOSE[@]}" up -d --no-build
port_of() { "${COMPOSE[@]}" port "$1" "$2" | tail -n1 | sed 's/.*://'; }
A_URL="ws://127.0.0.1:$(port_of node-a 9000)"
A_MON="$(port_of node-a 9100)"
ok "published: node-a at $A_URL, monitoring on $A_MON"

# ---- the worker's function, from node-a ----------------------------------------------------
stats_ok() {
    client "$A_URL" call text_stats '["a good day, a good good night"]'
    [ "$RC" = 0 ] && jq_true '.words == 7 and .most_common == "good" and .sentiment == "positive"' <<<"$OUT"
}
if wait_for "$START_SECS" stats_ok; then
    ok "text_stats (Python worker on node-b) answers through node-a $(secs "$WAITED_MS") after up"
else
    fatal "text_stats answers through node-a within ${START_SECS}s" \
        "(last: exit $RC, stdout: $(one_line "$OUT"), stderr: $(one_line "$ERR"))"
fi

cat >"$WORK/dag.json" <<'JSON'
[{"name": "sq", "fun": "tpu_square", "args": [7], "locs": ["tpu"]},
 {"name": "text", "fun": "echo", "args": ["sq"]},
 {"name": "stats", "fun": "text_stats", "args": ["no bad words here"]}]
JSON
expect_result "a DAG mixing node-c's tpu_square and the worker's text_stats" \
    '"sentiment": "negative"' "$A_URL" request "$WORK/dag.json"

catalog="$(curl -fsS --max-time 3 "http://127.0.0.1:$A_MON/catalog" || true)"
if jq_true '.nodes[] | select(.node == "node-b") | .about[] | select(.name == "text_stats" and .worker == true)' \
    <<<"$catalog"; then
    ok "node-a /catalog marks node-b's text_stats as served by a worker"
else
    not_ok "node-a /catalog marks node-b's text_stats as served by a worker (got: $(one_line "$catalog"))"
fi

# ---- node-b restarts: the worker reconnects ------------------------------------------------
step "${COMPOSE[*]} restart node-b" "${COMPOSE[@]}" restart node-b
if wait_for "$HEAL_SECS" stats_ok; then
    ok "after node-b's restart the worker reconnected: text_stats answers again in $(secs "$WAITED_MS")"
else
    not_ok "text_stats answers again within ${HEAL_SECS}s of node-b's restart" \
        "(last: exit $RC, stdout: $(one_line "$OUT"), stderr: $(one_line "$ERR"))"
fi

# ---- the worker leaves cleanly ---------------------------------------------------------------
step "${COMPOSE[*]} stop worker" "${COMPOSE[@]}" stop worker
logs="$("${COMPOSE[@]}" logs --no-color worker 2>&1 || true)"
registrations="$(grep -c "registered as" <<<"$logs" || true)"
if [ "$registrations" -ge 2 ]; then ok "the worker's log shows $registrations registrations (one after node-b's restart)"
else not_ok "the worker's log shows 2 registrations (got $registrations: $(one_line "$(tail -n 5 <<<"$logs")"))"; fi
gone_from_a() { client "$A_URL" call text_stats '["x"]'; [ "$RC" != 0 ] && grep -q 'error: 1001' <<<"$ERR"; }
if wait_for 10 gone_from_a; then ok "text_stats left the cluster with the worker ($(secs "$WAITED_MS"))"
else not_ok "text_stats left the cluster with the worker (last: exit $RC, stderr: $(one_line "$ERR"))"; fi
expect_fast_error "a call of text_stats without its worker" "$A_URL" call text_stats '["x"]'

summary_and_exit
