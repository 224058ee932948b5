#!/usr/bin/env bash
# Container federation test (run by CI after cluster.sh): three clusters from the runtime
# image in a line A–B–C, each on its own docker network, each pair bridged by one node
# attached to both networks:
#
#   network A:  a1        cluster-a, no functions, no bridge; the client calls through it
#               a-bridge  cluster-a, no functions; bridges to b1 (also on network B)
#   network B:  b1        cluster-b, the demo functions (add, ...), exports add; accepts
#                         a-bridge's bridge and bridges to c1 (also on network C)
#   network C:  c1        cluster-c, tpu_square only (nothing else has it), exports it
#
# Each cluster has its own authority, node credentials (docker/make-credentials.sh) and
# route key (`mpreg keys rotate`), made here, now; each side pins the other's authority
# in `[mpreg.federation.trust]`. From the host, through a1: `add` with --target-cluster
# cluster-b runs on b1 (only b1 serves add; without --target-cluster too, as nothing in
# cluster-a has it and cluster-b exports it; multiply, not exported, is 1001); a partition of the bridge (`docker network
# disconnect` of a-bridge from network B) makes the call fail fast with 1005 and
# a-bridge's /routes withdraw the route to cluster-b; heal (`docker network connect`) and
# the route and the call are back. Across two bridges: tpu_square with --target-cluster
# cluster-c runs on c1; a partition of B–C (b1 disconnected from network C) withdraws
# cluster-c at a-bridge and the call fails fast with 1005 while cluster-b stays routed;
# heal and it runs on c1 again. Needs docker, cargo, curl, jq and root (for the base
# image's debootstrap, only the first time). Prints one `ok - ` / `not ok - ` line per
# check; on failure dumps every container's logs and exits non-zero. Containers and
# networks are always removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

IMAGE="mpreg-node:test"
RUN_ID="$$-${RANDOM}"             # unique, so parallel runs and leftovers never collide
NET_A="mpreg-fed-a-$RUN_ID"       # cluster-a's network
NET_B="mpreg-fed-b-$RUN_ID"       # cluster-b's network
NET_C="mpreg-fed-c-$RUN_ID"       # cluster-c's network
BIN="$ROOT/target/release/mpreg"  # the host copy of the binary that went into the image
START_SECS=60                     # bound for start-up polls (node listening, route learned)
DETECT_SECS=15                    # bound for noticing the partitioned bridge
HEAL_SECS=40                      # bound for the bridge to be redialled after the heal
FAST_MS=5000                      # a call that cannot be served must fail within this
CALL_SECS=30                      # hard bound on every client call (a hang fails, not blocks)
CREATED=()                        # containers to remove (and whose logs to dump)
NETS_CREATED=()                   # networks to remove (three: lib.sh's NET is one)
NET_CREATED=0                     # so remove_containers leaves the networks to cleanup
WORK="$(mktemp -d /tmp/mpreg-federation.XXXXXX)"

SUITE="container federation test"
# shellcheck source=tests/container/lib.sh
. "$ROOT/tests/container/lib.sh"

cname() { echo "mpreg-fed-$RUN_ID-$1"; }   # container name of node $1
# network connect|disconnect NET NODE: NODE joins or leaves the docker network NET.
network() {
    if docker network "$1" "$2" "$(cname "$3")"; then ok "$3: docker network $1 $2"
    else fatal "$3: docker network $1 $2"; fi
}

cleanup() {   # the EXIT trap: containers and WORK (lib.sh), then both networks
    local net
    remove_containers
    for net in "${NETS_CREATED[@]}"; do docker network rm "$net" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
dump_logs() { container_logs_all; }

# routes_to PORT CLUSTER: the path a node's /routes selects to CLUSTER ("a>b"), "none"
# when it has no route, "no-answer" when /routes does not answer.
routes_to() {
    local json
    json="$(curl -fsS --max-time 3 "http://127.0.0.1:$1/routes" 2>/dev/null)" || { echo no-answer; return; }
    jq -r --arg c "$2" '[.routes[]? | select(.destination == $c and .selected != null)]
        | if length == 0 then "none" else .[0].selected | join(">") end' <<<"$json" 2>/dev/null || echo bad-json
}
route_is() { [ "$(routes_to "$1" "$2")" = "$3" ]; }   # PORT CLUSTER PATH
# route_within SECS ON_FAIL PORT CLUSTER PATH WHAT: the node's /routes selects PATH to
# CLUSTER within SECS: ok, else ON_FAIL (not_ok; fatal when nothing after can pass).
route_within() {
    local secs="$1" on_fail="$2" port="$3" cluster="$4" path="$5" what="$6"
    if wait_for "$secs" route_is "$port" "$cluster" "$path"; then ok "$what ($(secs "$WAITED_MS"))"
    else "$on_fail" "$what: not within ${secs}s (got: $(routes_to "$port" "$cluster"))"; fi
}
# call_within SECS ON_FAIL WHAT CHECK URL: CHECK (a call through URL) passes within SECS.
call_within() {
    local secs="$1" on_fail="$2" what="$3"; shift 3
    if wait_for "$secs" "$@"; then ok "$what ($(secs "$WAITED_MS"))"
    else "$on_fail" "$what: not within ${secs}s (last: exit $RC, stdout: $(one_line "$OUT"), stderr: $(one_line "$ERR"))"; fi
}

# adds_in_b URL: add [20,22] with --target-cluster cluster-b answers 42 (for polling).
adds_in_b() { client "$1" call add '[20,22]' --target-cluster cluster-b && [ "$OUT" = 42 ]; }
# squares_in_c URL: tpu_square [7] with --target-cluster cluster-c answers 49 (only c1 has it).
squares_in_c() { client "$1" call tpu_square '[7]' --target-cluster cluster-c && [ "$OUT" = 49 ]; }
# unreachable URL: add with --target-cluster cluster-b fails with 1005 (for polling).
unreachable() { client "$1" call add '[1,1]' --target-cluster cluster-b; [ "$RC" != 0 ] && grep -q 'error: 1005' <<<"$ERR"; }

# ---- build and credentials -------------------------------------------------------------
command -v curl >/dev/null && command -v jq >/dev/null || fatal "curl and jq present on the host"
build_image "$IMAGE"
make_credentials "$WORK/a" cluster-a a1 a-bridge
make_credentials "$WORK/b" cluster-b b1
make_credentials "$WORK/c" cluster-c c1
# A cluster's route key: made in its authority's directory, copied beside the node
# credentials (the nodes never see the authority's secret).
for cl in a b c; do
    step "route key of cluster-$cl" "$BIN" keys rotate "$WORK/$cl/authority" --cluster-id "cluster-$cl"
    cp "$WORK/$cl/authority/route.key" "$WORK/$cl/nodes/route.key"
    [ "$(id -u)" != 0 ] || chown 10001:10001 "$WORK/$cl/nodes/route.key"
done
A_PUB="$(cat "$WORK/a/authority/cluster.pub")"
B_PUB="$(cat "$WORK/b/authority/cluster.pub")"
C_PUB="$(cat "$WORK/c/authority/cluster.pub")"

# settings NODE CLUSTER PEERS FUNCTIONS [FEDERATION...]: $WORK/conf/NODE.toml, mounted
# read-only at /run/mpreg-conf. Timing as config/cluster-node-*.toml; announcements every
# 0.5 s valid 3 s, so a silent bridge is closed within about 3 s.
mkdir -p "$WORK/conf"
settings() {
    local node="$1" cluster="$2" peers="$3" functions="$4"; shift 4
    {
        cat <<TOML
[mpreg]
name = "$node"
cluster_id = "$cluster"
host = "0.0.0.0"
port = 9000
monitoring_port = 9100
data_dir = "/data"
functions = $functions
peers = $peers
advertise_url = "ws://$node:9000"
gossip_interval_s = 0.25
suspect_after_s = 2.0
remove_after_s = 6.0
credentials = "/run/mpreg-keys/$node.cred"
TOML
        printf '%s\n' "$@"
    } >"$WORK/conf/$node.toml"
    chmod 0644 "$WORK/conf/$node.toml"
}
settings a1 cluster-a '[]' '[]'
settings a-bridge cluster-a '["ws://a1:9000"]' '[]' \
    '[mpreg.federation]' 'peers = ["ws://b1:9000"]' 'allowed_clusters = ["cluster-b"]' \
    'route_key_dir = "/run/mpreg-keys"' 'announce_interval_s = 0.5' 'route_ttl_s = 3.0' \
    '[mpreg.federation.trust]' "cluster-b = \"$B_PUB\""
settings b1 cluster-b '[]' '["demo"]' \
    '[mpreg.federation]' 'peers = ["ws://c1:9000"]' 'allowed_clusters = ["cluster-a", "cluster-c"]' \
    'route_key_dir = "/run/mpreg-keys"' 'announce_interval_s = 0.5' 'route_ttl_s = 3.0' \
    '[mpreg.federation.exports]' 'functions = ["add"]' \
    '[mpreg.federation.trust]' "cluster-a = \"$A_PUB\"" "cluster-c = \"$C_PUB\""
settings c1 cluster-c '[]' '["tpu_square"]' \
    '[mpreg.federation]' 'allowed_clusters = ["cluster-b"]' \
    'route_key_dir = "/run/mpreg-keys"' 'announce_interval_s = 0.5' 'route_ttl_s = 3.0' \
    '[mpreg.federation.exports]' 'functions = ["tpu_square"]' \
    '[mpreg.federation.trust]' "cluster-b = \"$B_PUB\""

# ---- start -----------------------------------------------------------------------------
for net in "$NET_A" "$NET_B" "$NET_C"; do
    if docker network create "$net" >/dev/null; then NETS_CREATED+=("$net"); ok "network $net created"
    else fatal "network $net created"; fi
done

# start_node NODE CLUSTER_DIR NETWORK: NODE's settings, its cluster's keys, ports published.
start_node() {
    local node="$1" keys="$2" net="$3" c
    c="$(cname "$node")"
    CREATED+=("$c")   # before `docker run`: a run that fails after creating it still leaves one
    if docker run -d --name "$c" --hostname "$node" --network "$net" --network-alias "$node" \
        -p 127.0.0.1::9000 -p 127.0.0.1::9100 \
        -v "$WORK/$keys/nodes:/run/mpreg-keys:ro" -v "$WORK/conf:/run/mpreg-conf:ro" \
        "$IMAGE" server start-config "/run/mpreg-conf/$node.toml" >/dev/null; then
        ok "container $c started ($node on $net)"
    else
        fatal "container $c started ($node)"
    fi
}
start_node c1 c "$NET_C"
start_node b1 b "$NET_B"
start_node a1 a "$NET_A"
start_node a-bridge a "$NET_A"
# Each bridge node is on both networks of its pair; it dials the other side by its alias
# there: a-bridge dials b1 on network B, b1 dials c1 on network C.
network connect "$NET_B" a-bridge
network connect "$NET_C" b1

A1_URL="ws://127.0.0.1:$(container_host_port "$(cname a1)" 9000)"
BRIDGE_MON="$(container_host_port "$(cname a-bridge)" 9100)"
B1_MON="$(container_host_port "$(cname b1)" 9100)"

for node in c1 b1 a1 a-bridge; do
    wait_listening "$node" "$(cname "$node")" "$START_SECS"
done

# ---- the bridge and the route ----------------------------------------------------------
route_within "$START_SECS" fatal "$BRIDGE_MON" cluster-b "cluster-a>cluster-b" \
    "a-bridge /routes: cluster-b selected via cluster-a>cluster-b"
route_within "$START_SECS" not_ok "$B1_MON" cluster-a "cluster-b>cluster-a" \
    "b1 /routes: cluster-a selected via cluster-b>cluster-a"
# a1 has no bridge: it learns from a-bridge's catalog entry that a-bridge reaches cluster-b.
call_within "$START_SECS" fatal "add [20,22] --target-cluster cluster-b via a1 answers 42: ran on b1 across the bridge" \
    adds_in_b "$A1_URL"
expect_result "add [2,3] --target-cluster cluster-b via a1 answers 5" '^5$' \
    "$A1_URL" call add '[2,3]' --target-cluster cluster-b
# Cluster A serves no add: without target_cluster the command is asked of the clusters
# cluster-a reaches, and cluster-b exports add; it serves multiply but does not export it.
expect_result "add [2,3] via a1 without --target-cluster answers 5 (runs in cluster-b, which exports it)" '^5$' \
    "$A1_URL" call add '[2,3]'
expect_fast_error_code "multiply [2,3] via a1 without --target-cluster (cluster-b does not export it)" 1001 \
    "$A1_URL" call multiply '[2,3]'

# ---- two bridges: A–B–C ----------------------------------------------------------------
route_within "$START_SECS" fatal "$BRIDGE_MON" cluster-c "cluster-a>cluster-b>cluster-c" \
    "a-bridge /routes: cluster-c selected via cluster-a>cluster-b>cluster-c"
call_within "$START_SECS" fatal "tpu_square [7] --target-cluster cluster-c via a1 answers 49: ran on c1 across two bridges" \
    squares_in_c "$A1_URL"

# Partition B–C: b1 leaves network C. The route to cluster-c is withdrawn all the way to
# a-bridge, the call from A fails fast with 1005; cluster-b stays routed.
network disconnect "$NET_C" b1
route_within "$DETECT_SECS" not_ok "$BRIDGE_MON" cluster-c none \
    "a-bridge /routes: the route to cluster-c withdrawn after the B–C partition"
expect_fast_error_code "tpu_square --target-cluster cluster-c via a1 with B–C partitioned" 1005 \
    "$A1_URL" call tpu_square '[7]' --target-cluster cluster-c
expect_result "add [2,3] --target-cluster cluster-b via a1 still answers 5 with B–C partitioned" '^5$' \
    "$A1_URL" call add '[2,3]' --target-cluster cluster-b

network connect "$NET_C" b1
call_within "$HEAL_SECS" not_ok "healed: tpu_square [7] --target-cluster cluster-c via a1 answers 49 again after the reconnect" \
    squares_in_c "$A1_URL"

# ---- partition of the bridge -----------------------------------------------------------
network disconnect "$NET_B" a-bridge
route_within "$DETECT_SECS" not_ok "$BRIDGE_MON" cluster-b none \
    "a-bridge /routes: the route to cluster-b withdrawn after the partition"
# Nothing was reset: a-bridge closes the bridge because it went silent (then redials it).
bridge_closed() { grep -q 'federation bridge silent; closing' <<<"$(container_logs "$(cname a-bridge)")"; }
if wait_for "$DETECT_SECS" bridge_closed; then
    ok "a-bridge closed the silent bridge to b1 ($(secs "$WAITED_MS") after the withdrawal)"
else
    not_ok "a-bridge logs 'federation bridge silent; closing' within ${DETECT_SECS}s of the partition"
fi
call_within "$DETECT_SECS" not_ok "a1: --target-cluster cluster-b fails with 1005 after the bridge closed" \
    unreachable "$A1_URL"
expect_fast_error_code "add --target-cluster cluster-b via a1 with the bridge partitioned" 1005 \
    "$A1_URL" call add '[2,3]' --target-cluster cluster-b

# ---- heal ------------------------------------------------------------------------------
network connect "$NET_B" a-bridge
call_within "$HEAL_SECS" not_ok "healed: add [20,22] --target-cluster cluster-b via a1 answers 42 again after the reconnect" \
    adds_in_b "$A1_URL"
path="$(routes_to "$BRIDGE_MON" cluster-b)"
if [ "$path" = "cluster-a>cluster-b" ]; then ok "a-bridge /routes: cluster-b selected again via $path"
else not_ok "a-bridge /routes: cluster-b selected again (got: $path)"; fi

summary_and_exit
