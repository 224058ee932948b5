#!/usr/bin/env bash
# Kubernetes settings test (run by CI): what deploy/kubernetes/ says is what runs. Three
# containers from the runtime image on a private docker network play the StatefulSet's
# pods mpreg-0, mpreg-1, mpreg-2:
#
#   - the container's arguments are the StatefulSet's `args`, read from statefulset.yaml,
#     with $(POD_NAME) replaced as Kubernetes replaces it;
#   - /etc/mpreg-settings/node.toml is the ConfigMap's `node.toml`, read from configmap.yaml;
#   - /run/mpreg-keys holds one credentials file per pod, <pod>.cred, as the Secret made
#     with `mpreg keys` (README, "Kubernetes") does;
#   - each container answers to <pod>.mpreg-headless, the headless Service's DNS name;
#   - it runs as the pod's security context does: uid 10001, read-only root filesystem,
#     no capabilities, no privilege escalation, /data a volume of its own.
#
# A fourth container plays a pod of the worker Deployment: the image mpreg-worker with the
# Deployment's environment, dialling the client Service's name `mpreg` (an alias of
# mpreg-1 here) with the Secret's worker token.
#
# Checks: every pod sees the other two alive and linked (they found each other through
# the seed mpreg-0 and the advertised DNS names), /health answers as the probes ask it,
# the dashboard is served, the worker's text_stats answers through mpreg-0; a restarted pod (as on a rolling restart) rejoins with a new
# instance; with the seed gone the other two still see each other. Needs docker, cargo,
# curl, jq, python3 with PyYAML (the venv CI builds at target/py-venv) and root (for the
# base image, the first time). Containers, volumes and the network are always removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

IMAGE="mpreg-node:test"
RUN_ID="$$-${RANDOM}"
NET="mpreg-k8s-$RUN_ID"
BIN="$ROOT/target/release/mpreg"
PYTHON="${PYTHON:-$ROOT/target/py-venv/bin/python}"
MANIFESTS="$ROOT/deploy/kubernetes"
START_SECS=60
CALL_SECS=30                      # hard bound on every client call (lib.sh's client)
PODS=(mpreg-0 mpreg-1 mpreg-2)
CREATED=()
NET_CREATED=0
WORK="$(mktemp -d /tmp/mpreg-k8s.XXXXXX)"

SUITE="container kubernetes test"
# shellcheck source=tests/container/lib.sh
. "$ROOT/tests/container/lib.sh"

cname() { echo "mpreg-k8s-$RUN_ID-$1"; }

trap remove_containers EXIT
trap 'exit 130' INT TERM
dump_logs() { container_logs_all; }

# What the manifests say: the settings file, the container's args, its uid.
step "the ConfigMap's node.toml and the StatefulSet's args read" "$PYTHON" - "$MANIFESTS" "$WORK" <<'EOF'
import pathlib, sys, yaml
manifests, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = yaml.safe_load((manifests / "configmap.yaml").read_text())
(work / "settings").mkdir()
(work / "settings" / "node.toml").write_text(config["data"]["node.toml"])
pod = yaml.safe_load((manifests / "statefulset.yaml").read_text())["spec"]["template"]["spec"]
container = pod["containers"][0]
(work / "args").write_text("\n".join(container["args"]) + "\n")
(work / "uid").write_text(str(pod["securityContext"]["runAsUser"]))
assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data", "/etc/mpreg-settings", "/run/mpreg-keys"]
worker = yaml.safe_load((manifests / "worker-deployment.yaml").read_text())["spec"]["template"]["spec"]
env = worker["containers"][0]["env"]
(work / "worker.env").write_text("".join(f"{e['name']}={e['value']}\n" for e in env))
assert worker["containers"][0]["volumeMounts"][0]["mountPath"] == "/run/mpreg-keys"
EOF
RUN_UID="$(cat "$WORK/uid")"
chmod -R a+rX "$WORK/settings"

build_image "$IMAGE"
step "worker image mpreg-worker:latest" bash "$ROOT/docker/build-worker-image.sh"
CLUSTER="$(sed -n 's/^cluster_id = "\(.*\)"$/\1/p' "$WORK/settings/node.toml")"
[ -n "$CLUSTER" ] || fatal "the ConfigMap's node.toml names a cluster_id"
make_credentials "$WORK/keys" "$CLUSTER" "${PODS[@]}"
step "docker network $NET" docker network create "$NET"
NET_CREATED=1

# start_pod POD [docker run options...]: the StatefulSet's container for POD; its
# monitoring port published.
start_pod() {
    local pod="$1" c args=()
    shift
    c="$(cname "$pod")"
    CREATED+=("$c")
    while IFS= read -r arg; do args+=("${arg//\$(POD_NAME)/$pod}"); done <"$WORK/args"
    if docker run -d --name "$c" --hostname "$pod" --network "$NET" --network-alias "$pod.mpreg-headless" \
        --user "$RUN_UID:$RUN_UID" --read-only --cap-drop ALL --security-opt no-new-privileges \
        -e POD_NAME="$pod" -v "/data" -p 127.0.0.1::9100 \
        -v "$WORK/settings:/etc/mpreg-settings:ro" -v "$WORK/keys/nodes:/run/mpreg-keys:ro" "$@" \
        "$IMAGE" "${args[@]}" >/dev/null; then
        ok "pod $pod started: mpreg ${args[*]}"
    else
        fatal "pod $pod started"
    fi
}
start_pod mpreg-0 -p 127.0.0.1::9000
start_pod mpreg-1 --network-alias mpreg   # the client Service's name resolves to it
start_pod mpreg-2
declare -A MON
for pod in "${PODS[@]}"; do MON[$pod]="$(container_host_port "$(cname "$pod")" 9100)"; done

healthy() { curl -fsS --max-time 3 "http://127.0.0.1:$1/health" 2>/dev/null | jq_true --arg n "$2" '.status == "ok" and .node == $n'; }
sees_others() {   # POD: it sees every other pod alive and linked
    local pod="$1" other
    for other in "${PODS[@]}"; do
        [ "$other" = "$pod" ] && continue
        [ "$(peer_state "${MON[$pod]}" "$other")" = alive+linked ] || return 1
    done
}

for pod in "${PODS[@]}"; do
    if wait_for "$START_SECS" healthy "${MON[$pod]}" "$pod"; then ok "$pod: /health ok, named $pod"; else fatal "$pod: /health"; fi
done
for pod in "${PODS[@]}"; do
    if wait_for "$START_SECS" sees_others "$pod"; then
        ok "$pod sees the other pods alive and linked (after ${WAITED_MS}ms)"
    else
        not_ok "$pod sees the other pods alive and linked: $(topology "${MON[$pod]}")"
    fi
done
url_of() { topology "${MON[mpreg-0]}" | jq -r --arg n "$1" '.nodes[] | select(.node == $n) | .url'; }
if [ "$(url_of mpreg-2)" = "ws://mpreg-2.mpreg-headless:9000" ]; then
    ok "mpreg-2 advertises its headless Service name"
else
    not_ok "mpreg-2 advertises ws://mpreg-2.mpreg-headless:9000, not $(url_of mpreg-2)"
fi
# Captured first: `curl | grep -q` can die of SIGPIPE, which pipefail reports as a failure.
page="$(curl -fsS --max-time 3 "http://127.0.0.1:${MON[mpreg-0]}/" || true)"
if grep -q "<title>MPREG node</title>" <<<"$page"; then
    ok "the dashboard is served at / on the monitoring port"
else
    not_ok "the dashboard is served at /"
fi
if [ "$(metric "${MON[mpreg-0]}" mpreg_peer_refused_total 'node="mpreg-0",reason="untrusted"')" = 0 ]; then
    ok "no peer refused: every pod's credentials come from one authority"
else
    not_ok "a peer was refused as untrusted"
fi

# The worker Deployment's pod: its environment, the token (only that file of the Secret).
W="$(cname worker)"
CREATED+=("$W")
if docker run -d --name "$W" --network "$NET" --env-file "$WORK/worker.env" \
    --user "$RUN_UID:$RUN_UID" --read-only --cap-drop ALL --security-opt no-new-privileges \
    -v "$WORK/keys/nodes/worker.token:/run/mpreg-keys/worker.token:ro" mpreg-worker:latest >/dev/null; then
    ok "worker started: $(tr '\n' ' ' <"$WORK/worker.env")"
else
    fatal "worker started"
fi
A_URL="ws://127.0.0.1:$(container_host_port "$(cname mpreg-0)" 9000)"
stats_ok() {
    client "$A_URL" call text_stats '["a good day, a good good night"]'
    [ "$RC" = 0 ] && jq_true '.words == 7 and .most_common == "good"' <<<"$OUT"
}
if wait_for "$START_SECS" stats_ok; then
    ok "text_stats (the worker, connected through the client Service's name) answers through mpreg-0"
else
    not_ok "text_stats answers through mpreg-0 (last: exit $RC, stdout: $(one_line "$OUT"), stderr: $(one_line "$ERR"))"
fi

# A rolling restart restarts each pod in turn; one step of it: mpreg-1 stops (SIGTERM,
# GOODBYE) and starts again with the same name, settings and volume.
before="$(instance_of "${MON[mpreg-0]}" mpreg-1)"
step "mpreg-1 restarted (docker restart: SIGTERM, then the same container again)" docker restart -t 30 "$(cname mpreg-1)"
MON[mpreg-1]="$(container_host_port "$(cname mpreg-1)" 9100)"
rejoined() { sees_others mpreg-0 && [ "$(instance_of "${MON[mpreg-0]}" mpreg-1)" != "$before" ] && sees_others mpreg-1; }
if wait_for "$START_SECS" rejoined; then
    ok "mpreg-1 rejoined as a new instance (after ${WAITED_MS}ms)"
else
    not_ok "mpreg-1 rejoined: $(topology "${MON[mpreg-0]}")"
fi

# The seed is only how pods first meet: without it the others keep their links.
step "the seed mpreg-0 stopped" docker stop -t 30 "$(cname mpreg-0)"
pair() { [ "$(peer_state "${MON[mpreg-1]}" mpreg-2)" = alive+linked ] && [ "$(peer_state "${MON[mpreg-2]}" mpreg-1)" = alive+linked ]; }
seed_gone() { [ "$(peer_state "${MON[mpreg-1]}" mpreg-0)" != alive+linked ]; }
if wait_for "$START_SECS" seed_gone && pair; then
    ok "without the seed, mpreg-1 and mpreg-2 still see each other alive and linked"
else
    not_ok "mpreg-1 and mpreg-2 without the seed: $(topology "${MON[mpreg-1]}")"
fi

summary_and_exit
