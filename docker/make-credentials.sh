#!/usr/bin/env bash
# Makes a cluster authority and node credentials for the containers, locally, at test or
# deploy time (nothing secret is ever committed):
#
#   bash docker/make-credentials.sh DIR CLUSTER_ID NODE...
#
#   DIR/authority/cluster.key   the authority's secret (mode 0600): keep it, never mount it
#   DIR/authority/cluster.pub   its public key
#   DIR/nodes/NODE.cred         one per node (mode 0600), readable by the image's runtime
#                               user (uid 10001): mount DIR/nodes read-only at
#                               /run/mpreg-keys, as docker-compose.yml and the tests do
#   DIR/nodes/worker.token      the token Python workers present (mode 0600, same owner;
#                               the nodes' settings name it in worker_token_file)
#
# An existing authority in DIR is reused (its certificates stay valid); credentials are
# (re)issued for every NODE named. Uses target/release/mpreg unless MPREG_BIN is set.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 DIR CLUSTER_ID NODE..." >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${MPREG_BIN:-$ROOT/target/release/mpreg}"
DIR="$1"; CLUSTER="$2"; shift 2
RUNTIME_UID=10001   # the Dockerfile's `mpreg` user

[ -x "$BIN" ] || { echo "$BIN not found: run cargo build --release first" >&2; exit 1; }
mkdir -p "$DIR/authority" "$DIR/nodes"
chmod 0700 "$DIR/authority"
if [ ! -f "$DIR/authority/cluster.key" ]; then
    "$BIN" keys init "$DIR/authority" >/dev/null
fi
for node in "$@"; do
    cred="$("$BIN" keys issue "$DIR/authority" "$node" --cluster-id "$CLUSTER")"
    mv -f "$cred" "$DIR/nodes/$node.cred"
done
if [ ! -s "$DIR/nodes/worker.token" ]; then
    (umask 077; head -c 32 /dev/urandom | base64 > "$DIR/nodes/worker.token")
fi
if [ "$(id -u)" = 0 ]; then
    chown "$RUNTIME_UID:$RUNTIME_UID" "$DIR"/nodes/*.cred "$DIR/nodes/worker.token"
else
    echo "note: the containers run as uid $RUNTIME_UID; give them the files with" \
        "sudo chown $RUNTIME_UID:$RUNTIME_UID $DIR/nodes/*.cred $DIR/nodes/worker.token" >&2
fi
echo "authority $(cat "$DIR/authority/cluster.pub") -> $DIR/nodes: $*"
