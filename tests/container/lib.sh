# Shared helpers for the container tests (run.sh, cluster.sh); source it, don't run it.
#
# The sourcing script sets SUITE (the label of the final summary line, e.g.
# "container test") and defines dump_logs (called once, before the summary, when a
# check failed). Every check prints one `ok - ` / `not ok - ` line.

PASSED=0
FAILED=0

ok()     { PASSED=$((PASSED + 1)); echo "ok - $*"; }
not_ok() { FAILED=$((FAILED + 1)); echo "not ok - $*"; }

summary_and_exit() {
    if [ "$FAILED" -ne 0 ]; then
        dump_logs
        echo "$SUITE: $PASSED passed, $FAILED failed"
        exit 1
    fi
    echo "$SUITE: $PASSED passed, 0 failed"
    exit 0
}

# A failed prerequisite makes every later check meaningless: stop here.
fatal() { not_ok "$*"; summary_and_exit; }

# Run a build step; its output goes to stderr so the ok/not ok lines stay readable.
step() {
    local what="$1"; shift
    if "$@" >&2; then ok "$what"; else fatal "$what"; fi
}

# The three build steps both tests start with: base image (debootstrap, needs root, only
# the first time), the release binary the image wraps, the image itself (tag $1).
build_image() {
    step "base image mpreg-base:bookworm present" "$ROOT/docker/build-base-image.sh"
    step "cargo build --release --locked" cargo build --release --locked
    step "docker build -t $1" docker build -t "$1" "$ROOT"
}

# Logs are captured into a variable before grepping: `docker logs | grep -q` can die of
# SIGPIPE once grep has matched, which pipefail would report as a failure.
container_logs() { docker logs "$1" 2>&1 || true; }

container_running() { [ "$(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }

container_host_port() {   # `docker port` prints e.g. 127.0.0.1:49153; keep the part after the colon
    local p
    p="$(docker port "$1" "$2/tcp" | head -n1)"
    echo "${p##*:}"
}

# make_credentials DIR CLUSTER NODE...: a cluster authority in DIR/authority and
# DIR/nodes/NODE.cred for each NODE, made now with the host binary ($BIN) and owned by the
# image's runtime user; mount DIR/nodes read-only at /run/mpreg-keys.
make_credentials() {
    local dir="$1" cluster="$2"; shift 2
    step "credentials for $* (cluster $cluster) in $dir" \
        env MPREG_BIN="$BIN" bash "$ROOT/docker/make-credentials.sh" "$dir" "$cluster" "$@"
}

# metric PORT FAMILY LABELS: a counter's value from GET /metrics (0 when absent), e.g.
# metric 9100 mpreg_peer_refused_total 'node="node-a",reason="untrusted"'.
metric() {
    local text
    text="$(curl -fsS --max-time 3 "http://127.0.0.1:$1/metrics" 2>/dev/null || true)"
    awk -v key="$2{$3}" '$1 == key { print $2; found = 1 } END { if (!found) print 0 }' <<<"$text"
}

now_ms() { date +%s%3N; }

# topology PORT: the node's /topology JSON (empty when it does not answer).
topology() { curl -fsS --max-time 3 "http://127.0.0.1:$1/topology" 2>/dev/null || true; }

# peer_state PORT PEER: how the node sees PEER: "alive+linked", "suspect", "absent", ...
peer_state() {
    local json
    json="$(topology "$1")"
    [ -n "$json" ] || { echo "no-answer"; return; }
    jq -r --arg n "$2" '[.nodes[] | select(.node == $n)]
        | if length == 0 then "absent"
          else .[0] | .state + (if .linked then "+linked" else "" end) end' <<<"$json" 2>/dev/null \
        || echo "bad-json"
}

# wait_for SECS CMD...: run CMD until it succeeds or SECS pass; WAITED_MS says how long.
wait_for() {
    local secs="$1" start; shift
    start="$(now_ms)"
    while :; do
        if "$@"; then WAITED_MS=$(($(now_ms) - start)); return 0; fi
        WAITED_MS=$(($(now_ms) - start))
        [ "$WAITED_MS" -lt $((secs * 1000)) ] || return 1
        sleep 0.2
    done
}
