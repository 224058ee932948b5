# Shared helpers for the container tests (run.sh, cluster.sh, federation.sh); source it, don't run it.
#
# The sourcing script sets SUITE (the label of the final summary line, e.g.
# "container test") and defines dump_logs (called once, before the summary, when a
# check failed). Every check prints one `ok - ` / `not ok - ` line. The client helpers
# use BIN (the host's mpreg binary), WORK (a scratch directory), CALL_SECS and FAST_MS.

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

# The sourcing script lists the containers it made in CREATED (recorded before `docker run`,
# so a run that fails after creating one still leaves it to remove), sets NET_CREATED=1
# once its network NET exists, and keeps scratch files in WORK.
remove_containers() {   # the EXIT trap: containers (-v: their anonymous /data volumes), network, WORK
    local c
    for c in "${CREATED[@]}"; do docker rm -f -v "$c" >/dev/null 2>&1 || true; done
    if [ "$NET_CREATED" = 1 ]; then docker network rm "$NET" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
container_logs_all() {  # every container in CREATED: its state and its logs
    local c
    for c in "${CREATED[@]}"; do
        echo "----- docker logs $c ($(docker inspect -f '{{.State.Status}}, exit code {{.State.ExitCode}}' "$c" 2>/dev/null || echo gone)) -----"
        docker logs "$c" 2>&1 || true
    done
    echo "----- end of logs -----"
}

container_running() { [ "$(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }

wait_listening() {   # NODE CONTAINER SECS: until the node prints MPREG_URL= (it listens), else fatal
    local deadline=$((SECONDS + $3))
    until grep -q 'MPREG_URL=' <<<"$(container_logs "$2")"; do
        container_running "$2" || fatal "$1 printed MPREG_URL= (container exited early)"
        [ "$SECONDS" -lt "$deadline" ] || fatal "$1 printed MPREG_URL= within ${3}s"
        sleep 0.5
    done
    ok "$1 listening ($(grep -m1 -o 'MPREG_URL=[^[:space:]]*' <<<"$(container_logs "$2")"))"
}

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

# ---- time and polling ---------------------------------------------------------------
now_ms() { date +%s%3N; }
secs() {   # 87 -> 87ms, 1234 -> 1.2s
    if [ "$1" -lt 1000 ]; then echo "${1}ms"; else awk -v ms="$1" 'BEGIN { printf "%.1fs", ms / 1000 }'; fi
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

# ---- observing a node ---------------------------------------------------------------
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

# instance_of PORT PEER: PEER's instance id as the node knows it (a restart changes it).
instance_of() {
    topology "$1" | jq -r --arg n "$2" '.nodes[] | select(.node == $n) | .instance_id' 2>/dev/null || true
}

# ---- calling through a node ----------------------------------------------------------
# client URL ARGS...: `mpreg client ARGS --url URL`, bounded; sets OUT ERR RC MS.
client() {
    local url="$1" start; shift
    start="$(now_ms)"
    RC=0
    timeout "$CALL_SECS" "$BIN" client "$@" --url "$url" >"$WORK/out" 2>"$WORK/err" || RC=$?
    MS=$(($(now_ms) - start))
    OUT="$(cat "$WORK/out")"
    ERR="$(cat "$WORK/err")"
}
one_line() { tr '\n' ' ' <<<"$1" | tr -s ' '; }
# jq_true ARGS...: jq -e ARGS on standard input, and that input is not empty (jq 1.6, in
# Debian bookworm, exits 0 on empty input, which would pass a check whose call failed).
jq_true() {
    local input
    input="$(cat)"
    [ -n "$input" ] && jq -e "$@" <<<"$input" >/dev/null 2>&1
}

# expect_result WHAT PATTERN URL ARGS...: the call succeeds and stdout matches PATTERN (ERE).
expect_result() {
    local what="$1" pattern="$2"; shift 2
    client "$@"
    if [ "$RC" = 0 ] && grep -Eq "$pattern" <<<"$OUT"; then ok "$what ($(secs "$MS"))"
    else not_ok "$what (exit $RC after $(secs "$MS"); stdout: $(one_line "$OUT"); stderr: $(one_line "$ERR"))"; fi
}

# expect_fast_error WHAT URL ARGS...: the call fails within FAST_MS with error 1001 or 1005.
expect_fast_error() {
    local what="$1"; shift
    expect_fast_error_code "$what" '100[15]' "$@"
}

# expect_fast_error_code WHAT CODE URL ARGS...: the call fails within FAST_MS with an
# error whose code matches CODE (ERE, e.g. 1005).
expect_fast_error_code() {
    local what="$1" code="$2"; shift 2
    client "$@"
    if [ "$RC" != 0 ] && [ "$RC" != 124 ] && [ "$MS" -lt "$FAST_MS" ] && grep -Eq "error: $code" <<<"$ERR"; then
        ok "$what: failed in $(secs "$MS") with $(one_line "$ERR")"
    else
        not_ok "$what: expected exit 1 within $(secs "$FAST_MS") with 'error: $code'" \
            "(exit $RC after $(secs "$MS"); stdout: $(one_line "$OUT"); stderr: $(one_line "$ERR"))"
    fi
}
