#!/usr/bin/env bash
# Container cluster test (run by CI after run.sh): three nodes from the runtime image on a
# private docker network, each started from its settings file in config/ (the image copies
# them to /etc/mpreg/), exactly as docker-compose.yml runs them:
#
#   node-a  add, multiply (cpu, math)   the seed; its ports are published to the host
#   node-b  model_score (gpu)           dials node-a; killed, later restarted
#   node-c  tpu_square (tpu)            dials node-a; its ports are published too
#
# From the host, through node-a: the cluster forms, calls are routed by resources to the
# node that has them (a DAG spanning node-a and node-b), a killed node is suspected, then
# removed, and calls needing it fail fast, a partitioned node is detected and the cluster
# heals once the partition ends, and the killed node rejoins when restarted. The nodes
# listen on 0.0.0.0, so they run with credentials made here, now, by one authority
# (docker/make-credentials.sh, mounted read-only); a node with another authority's
# credentials and a node without any (run --insecure) both try to join node-a and are
# refused, counted in its /metrics. Needs docker, cargo, curl, jq and root (for the base image's
# debootstrap, only the first time). Prints one `ok - ` / `not ok - ` line per check; on
# failure dumps every container's logs and exits non-zero. Containers and the network
# are always removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

IMAGE="mpreg-node:test"
RUN_ID="$$-${RANDOM}"             # unique, so parallel runs and leftovers never collide
NET="mpreg-cluster-$RUN_ID"       # private network; nodes find each other by alias on it
BIN="$ROOT/target/release/mpreg"  # the host copy of the binary that went into the image
START_SECS=60                     # bound for start-up polls (node listening, cluster formed)
DETECT_SECS=15                    # bound for noticing a killed or partitioned node
HEAL_SECS=30                      # bound for the cluster to heal after a partition
FAST_MS=5000                      # a call that cannot be served must fail within this
CALL_SECS=30                      # hard bound on every client call (a hang fails, not blocks)
NODES=(node-a node-b node-c)
CREATED=()                        # containers to remove (and whose logs to dump)
NET_CREATED=0
WORK="$(mktemp -d /tmp/mpreg-cluster.XXXXXX)"

# ok, not_ok, summary_and_exit, fatal, step, build_image, container_* (shared with run.sh).
SUITE="container cluster test"
# shellcheck source=tests/container/lib.sh
. "$ROOT/tests/container/lib.sh"

cname() { echo "mpreg-cl-$RUN_ID-$1"; }   # container name of node $1

trap remove_containers EXIT
trap 'exit 130' INT TERM   # turn signals into a normal exit so the EXIT trap runs

dump_logs() {
    if [ -n "${A_MON:-}" ]; then
        echo "----- node-a /topology (now) -----"
        curl -sS --max-time 3 "http://127.0.0.1:$A_MON/topology" 2>&1 || true
        echo
    fi
    container_logs_all
}

# ---- observing a node ----------------------------------------------------------------
# gone PORT PEER: PEER is neither in /topology nor in /catalog (removed with its functions).
gone() {
    local cat
    [ "$(peer_state "$1" "$2")" = absent ] || return 1
    cat="$(curl -fsS --max-time 3 "http://127.0.0.1:$1/catalog" 2>/dev/null)" || return 1
    jq_true --arg n "$2" 'any(.nodes[]; .node == $n) | not' <<<"$cat"
}

both_alive_linked() {   # PORT PEER1 PEER2
    [ "$(peer_state "$1" "$2")" = alive+linked ] && [ "$(peer_state "$1" "$3")" = alive+linked ]
}
not_alive() {           # PORT PEER: suspected, removed, anything but alive
    local s
    s="$(peer_state "$1" "$2")"
    [ "$s" != no-answer ] && [ "$s" != bad-json ] && [ "${s%%+*}" != alive ]
}

# scores URL: the DAG spanning node-a and node-b answers score 1.26 (for polling).
scores() { client "$1" request "$WORK/chain.json" && grep -q '"score": 1\.26' <<<"$OUT"; }

# answers_49 URL: tpu_square [7] answers 49 (for polling).
answers_49() { client "$1" call tpu_square '[7]' --locs tpu && [ "$OUT" = 49 ]; }

# ---- build ---------------------------------------------------------------------------
command -v curl >/dev/null && command -v jq >/dev/null || fatal "curl and jq present on the host"
build_image "$IMAGE"
make_credentials "$WORK/keys" mpreg-demo "${NODES[@]}"
make_credentials "$WORK/foreign" mpreg-demo node-x   # same cluster id, another authority

# ---- start ---------------------------------------------------------------------------
if docker network create "$NET" >/dev/null; then NET_CREATED=1; ok "network $NET created"
else fatal "network $NET created"; fi

# start_node NODE [docker run options...]: the image's own settings file for NODE.
start_node() {
    local node="$1" c; shift
    c="$(cname "$node")"
    # Recorded before `docker run`: a run that fails after creating the container (say,
    # a port bind error) still leaves a container behind for cleanup to remove.
    CREATED+=("$c")
    if docker run -d --name "$c" --hostname "$node" --network "$NET" --network-alias "$node" "$@" \
        -v "$WORK/keys/nodes:/run/mpreg-keys:ro" \
        "$IMAGE" server start-config "/etc/mpreg/cluster-$node.toml" >/dev/null; then
        ok "container $c started ($node, /etc/mpreg/cluster-$node.toml)"
    else
        fatal "container $c started ($node)"
    fi
}
start_node node-a -p 127.0.0.1::9000 -p 127.0.0.1::9100
start_node node-b
start_node node-c -p 127.0.0.1::9000 -p 127.0.0.1::9100

A_RPC="$(container_host_port "$(cname node-a)" 9000)"
A_MON="$(container_host_port "$(cname node-a)" 9100)"
C_RPC="$(container_host_port "$(cname node-c)" 9000)"
C_MON="$(container_host_port "$(cname node-c)" 9100)"
if [ -n "$A_RPC" ] && [ -n "$A_MON" ] && [ -n "$C_RPC" ] && [ -n "$C_MON" ]; then
    ok "published ports: node-a rpc $A_RPC monitoring $A_MON, node-c rpc $C_RPC monitoring $C_MON"
else
    fatal "published ports found (node-a '$A_RPC' '$A_MON', node-c '$C_RPC' '$C_MON')"
fi
A_URL="ws://127.0.0.1:$A_RPC"
C_URL="ws://127.0.0.1:$C_RPC"

# Each node prints MPREG_URL= once it listens.
for node in "${NODES[@]}"; do
    wait_listening "$node" "$(cname "$node")" "$START_SECS"
done

# ---- the cluster forms ---------------------------------------------------------------
if wait_for "$START_SECS" both_alive_linked "$A_MON" node-b node-c; then
    ok "node-a /topology: node-b and node-c alive and linked ($(secs "$WAITED_MS"))"
else
    fatal "node-a /topology: node-b and node-c alive and linked within ${START_SECS}s" \
        "(node-b: $(peer_state "$A_MON" node-b), node-c: $(peer_state "$A_MON" node-c))"
fi
# node-c dialled only node-a: it learned node-b through gossip (full mesh).
if wait_for "$START_SECS" both_alive_linked "$C_MON" node-a node-b; then
    ok "node-c /topology: node-a and node-b alive and linked, node-b learned by gossip ($(secs "$WAITED_MS"))"
else
    not_ok "node-c /topology: node-a and node-b alive and linked within ${START_SECS}s" \
        "(node-a: $(peer_state "$C_MON" node-a), node-b: $(peer_state "$C_MON" node-b))"
fi

B_INSTANCE="$(instance_of "$A_MON" node-b)"

# ---- intruders are refused -----------------------------------------------------------
# start_intruder NODE KEYS_DIR MPREG_ARGS...: a node of the same cluster id that dials
# node-a, with KEYS_DIR (if not empty) mounted at /run/mpreg-keys.
start_intruder() {
    local node="$1" keys="$2" c; shift 2
    local mount=()
    [ -z "$keys" ] || mount=(-v "$keys:/run/mpreg-keys:ro")
    c="$(cname "$node")"
    CREATED+=("$c")
    if docker run -d --name "$c" --hostname "$node" --network "$NET" --network-alias "$node" "${mount[@]}" \
        "$IMAGE" server start --host 0.0.0.0 --port 9000 --monitoring-port 9100 --name "$node" \
        --cluster-id mpreg-demo --functions tpu_square --peer ws://node-a:9000 \
        --advertise-url "ws://$node:9000" "$@" >/dev/null; then
        ok "container $c started ($node dials node-a)"
    else
        fatal "container $c started ($node)"
    fi
}
start_intruder node-x "$WORK/foreign/nodes" --credentials /run/mpreg-keys/node-x.cred
start_intruder node-o "" --insecure
refused() { [ "$(metric "$A_MON" mpreg_peer_refused_total "node=\"node-a\",reason=\"$1\"")" -ge 1 ]; }
if wait_for "$START_SECS" refused untrusted; then
    ok "node-a refused node-x (another authority): mpreg_peer_refused_total{reason=untrusted} $(metric "$A_MON" mpreg_peer_refused_total 'node="node-a",reason="untrusted"')"
else
    not_ok "node-a refused node-x (another authority) within ${START_SECS}s"
fi
if wait_for "$START_SECS" refused no_credentials; then
    ok "node-a refused node-o (no credentials): mpreg_peer_refused_total{reason=no_credentials} $(metric "$A_MON" mpreg_peer_refused_total 'node="node-a",reason="no_credentials"')"
else
    not_ok "node-a refused node-o (no credentials) within ${START_SECS}s"
fi
for intruder in node-x node-o; do
    state="$(peer_state "$A_MON" "$intruder")"
    if [ "$state" = absent ]; then ok "node-a /topology: $intruder absent"
    else not_ok "node-a /topology: $intruder absent (got: $state)"; fi
    n="$(grep -c 'peer refused' <<<"$(container_logs "$(cname "$intruder")")" || true)"
    m="$(grep -c 'refused by peer' <<<"$(container_logs "$(cname "$intruder")")" || true)"
    if [ "$((n + m))" -gt 0 ]; then ok "$intruder was told it is refused ($m 'refused by peer', $n 'peer refused' lines)"
    else not_ok "$intruder logs a refusal"; fi
    docker rm -f -v "$(cname "$intruder")" >/dev/null 2>&1 || true
done
state="$(peer_state "$A_MON" node-b)"
if [ "$state" = alive+linked ]; then ok "node-a /topology: node-b still alive and linked after the intruders"
else not_ok "node-a /topology: node-b still alive and linked after the intruders (got: $state)"; fi

# ---- routing by resources ------------------------------------------------------------
expect_result "tpu_square [7] --locs tpu via node-a answers 49 (runs on node-c)" '^49$' \
    "$A_URL" call tpu_square '[7]' --locs tpu
expect_result "add [20,22] --locs cpu via node-a answers 42 (runs on node-a)" '^42$' \
    "$A_URL" call add '[20,22]' --locs cpu
expect_result "add [20,22] --locs cpu via node-c answers 42 (runs on node-a)" '^42$' \
    "$C_URL" call add '[20,22]' --locs cpu
cat >"$WORK/chain.json" <<'JSON'
[{"name": "sum",    "fun": "add",         "args": [20, 22],   "locs": ["cpu"]},
 {"name": "scaled", "fun": "multiply",    "args": ["sum", 3], "locs": ["cpu"]},
 {"name": "scored", "fun": "model_score", "args": ["scaled"], "locs": ["gpu"]}]
JSON
expect_result "DAG via node-a: add, multiply on node-a -> model_score on node-b scores 1.26" \
    '"score": 1\.26' "$A_URL" request "$WORK/chain.json"

# ---- a node dies ---------------------------------------------------------------------
KILLED_AT="$(now_ms)"
if docker kill "$(cname node-b)" >/dev/null; then ok "docker kill node-b"; else fatal "docker kill node-b"; fi
if wait_for "$DETECT_SECS" not_alive "$A_MON" node-b; then
    ok "node-a /topology: node-b no longer alive $(secs "$WAITED_MS") after the kill ($(peer_state "$A_MON" node-b))"
else
    not_ok "node-a /topology: node-b no longer alive within ${DETECT_SECS}s of the kill ($(peer_state "$A_MON" node-b))"
fi
expect_fast_error "model_score --locs gpu via node-a with node-b dead" \
    "$A_URL" call model_score '[126]' --locs gpu
expect_result "tpu_square [7] via node-a still answers 49 with node-b dead" '^49$' \
    "$A_URL" call tpu_square '[7]' --locs tpu
# Suspected first (not routed to), then, after remove_after_s (6 s), removed with its functions.
if wait_for "$DETECT_SECS" gone "$A_MON" node-b; then
    ok "node-a: node-b removed from /topology and /catalog $(secs $(($(now_ms) - KILLED_AT))) after the kill"
else
    not_ok "node-a: node-b removed from /topology and /catalog within ${DETECT_SECS}s" \
        "(topology: $(peer_state "$A_MON" node-b))"
fi
expect_fast_error "model_score --locs gpu via node-a with node-b removed" \
    "$A_URL" call model_score '[126]' --locs gpu

# ---- a network partition -------------------------------------------------------------
if docker network disconnect "$NET" "$(cname node-c)"; then ok "node-c disconnected from $NET"
else fatal "node-c disconnected from $NET"; fi
if wait_for "$DETECT_SECS" not_alive "$A_MON" node-c; then
    ok "node-a /topology: node-c no longer alive $(secs "$WAITED_MS") after the partition ($(peer_state "$A_MON" node-c))"
else
    not_ok "node-a /topology: node-c no longer alive within ${DETECT_SECS}s of the partition ($(peer_state "$A_MON" node-c))"
fi
expect_fast_error "tpu_square --locs tpu via node-a with node-c partitioned" \
    "$A_URL" call tpu_square '[7]' --locs tpu

# The alias is part of the network endpoint: reconnecting must name it again.
if docker network connect --alias node-c "$NET" "$(cname node-c)"; then ok "node-c reconnected to $NET as node-c"
else fatal "node-c reconnected to $NET as node-c"; fi
if wait_for "$HEAL_SECS" answers_49 "$A_URL"; then
    ok "healed: tpu_square [7] via node-a answers 49 again $(secs "$WAITED_MS") after the reconnect"
else
    not_ok "healed: tpu_square [7] via node-a answers 49 within ${HEAL_SECS}s of the reconnect" \
        "(last: exit $RC, stdout: $(one_line "$OUT"), stderr: $(one_line "$ERR"); node-c: $(peer_state "$A_MON" node-c))"
fi
state="$(peer_state "$A_MON" node-c)"
if [ "$state" = alive+linked ]; then ok "node-a /topology: node-c alive and linked again"
else not_ok "node-a /topology: node-c alive and linked again (got: $state)"; fi

# ---- the dead node comes back ----------------------------------------------------------
# Same container, same alias, a new process: a new instance, welcome at once.
if docker start "$(cname node-b)" >/dev/null; then ok "docker start node-b"; else fatal "docker start node-b"; fi
if wait_for "$HEAL_SECS" scores "$A_URL"; then
    ok "rejoined: the DAG via node-a scores 1.26 again $(secs "$WAITED_MS") after node-b restarted"
else
    not_ok "rejoined: the DAG via node-a scores 1.26 within ${HEAL_SECS}s of node-b's restart" \
        "(last: exit $RC, stdout: $(one_line "$OUT"), stderr: $(one_line "$ERR"); node-b: $(peer_state "$A_MON" node-b))"
fi
state="$(peer_state "$A_MON" node-b)"
instance="$(instance_of "$A_MON" node-b)"
if [ "$state" = alive+linked ] && [ -n "$instance" ] && [ "$instance" != "$B_INSTANCE" ]; then
    ok "node-a /topology: node-b alive and linked, new instance $instance (was $B_INSTANCE)"
else
    not_ok "node-a /topology: node-b alive and linked with a new instance (got: $state, instance '$instance', was '$B_INSTANCE')"
fi

summary_and_exit
