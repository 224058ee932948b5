#!/usr/bin/env bash
# Remakes layout/node.order: runs the release binary under layout/pagetrack.c through the
# work a node does (a 12-process cluster bench, the in-process demo, a durable node driven
# by the CLI), and lists the functions it ran, most used first. See layout/README.md.
#
# Run it from the repository root after changing dependencies or much of the code, then
# rebuild. Needs cc, nm, python3 and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
BIN=$PWD/target/release/mpreg
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cc -O2 -shared -fPIC -pthread -o "$WORK/libpagetrack.so" layout/pagetrack.c
mkdir "$WORK/addrs"
export PAGETRACK_DIR=$WORK/addrs
# Re-protect the code every 200 µs: finer than the library's default, fewer functions missed.
export PAGETRACK_US=${PAGETRACK_US:-200}

echo "1/3 bench cluster --nodes 12" >&2
LD_PRELOAD=$WORK/libpagetrack.so "$BIN" bench cluster --nodes 12 --json > /dev/null

echo "2/3 demo" >&2
PAGETRACK_MATCH=" demo" LD_PRELOAD=$WORK/libpagetrack.so "$BIN" demo > /dev/null

echo "3/3 a durable node with the demo functions, driven by the CLI, stopped by SIGTERM" >&2
LD_PRELOAD=$WORK/libpagetrack.so "$BIN" server start --port 0 --monitoring-port 0 --name layout \
    --functions demo --data-dir "$WORK/data" > "$WORK/node.log" 2>&1 &
NODE=$!
for _ in $(seq 1 100); do
    grep -q '^MPREG_MONITORING_URL=' "$WORK/node.log" && break
    sleep 0.1
done
export MPREG_URL=$(sed -n 's/^MPREG_URL=//p' "$WORK/node.log")
MONITORING=$(sed -n 's/^MPREG_MONITORING_URL=//p' "$WORK/node.log")
for _ in 1 2 3; do
    "$BIN" client call add '[1,2]' --locs cpu > /dev/null
    "$BIN" client call echo '["x"]' > /dev/null
done
"$BIN" client queue create jobs > /dev/null
for n in 1 2 3; do "$BIN" client queue send jobs "{\"n\":$n}" > /dev/null; done
"$BIN" client queue receive jobs --max 3 > /dev/null
"$BIN" client queue stats jobs > /dev/null
"$BIN" client cache put ns k '{"v":1}' > /dev/null
"$BIN" client cache get ns k > /dev/null
"$BIN" client cache incr ns c > /dev/null
"$BIN" client cache stats > /dev/null
"$BIN" client status > /dev/null
for path in health metrics topology catalog; do curl -sf "$MONITORING/$path" > /dev/null; done
kill -TERM "$NODE"
wait "$NODE"

python3 layout/order.py "$BIN" "$WORK/addrs" layout/node.order
echo "wrote layout/node.order; rebuild (cargo build --release) to apply it" >&2
