#!/usr/bin/env bash
# Launch: cluster/local/add-worker.sh [--num-cpus N] [--num-gpus N] [other `ray start` args]   (after start.sh)
#
# Joins one more Ray worker node to the head started by cluster/local/start.sh. On the same machine this is
# a second raylet with its own CPUs/object store: handy to see multi-node scheduling (Train workers and Serve
# replicas spread over nodes, a node dying). Run it several times for several nodes; stop.sh stops them all.
# Default: --num-cpus 1. From another machine, run the `ray start --address=...` line it prints, after
# starting the head on a reachable address (CHATRAY_RAY_HOST=<lan ip>) and copying ~/.ray/auth_token there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

if ! chatray_cluster_answers; then
    echo "error: no Ray cluster answers at $CHATRAY_RAY_ADDRESS" >&2
    echo "hint: start the head first: cluster/local/start.sh" >&2
    exit 1
fi

args=("$@")
if ! printf '%s\n' "${args[@]+"${args[@]}"}" | grep -q -- '^--num-cpus'; then
    args+=(--num-cpus 1)
fi

# Alive nodes, as `ray status` lists them under "Active:" (one " 1 node_<id>" line each).
alive_nodes() {
    chatray_timeout 60 "$RAY" status --address "$CHATRAY_RAY_ADDRESS" 2>/dev/null |
        sed -n '/^Active:/,/^Pending:/p' | grep -c "node_" || true
}
before="$(alive_nodes)"
echo "==> adding a worker node to $CHATRAY_RAY_ADDRESS: ray start --address $CHATRAY_RAY_ADDRESS ${args[*]}"
log="$CHATRAY_RAY_TEMP_DIR/ray-add-worker.log"
# Same temp dir and marker as the head: stop.sh stops this node too.
if ! CHATRAY_LOCAL_CLUSTER="$CHATRAY_RAY_TEMP_DIR" "$RAY" start \
        --address "$CHATRAY_RAY_ADDRESS" \
        --node-ip-address "$CHATRAY_RAY_HOST" \
        --temp-dir "$CHATRAY_RAY_TEMP_DIR" \
        --dashboard-agent-listen-port "$(chatray_free_port 0)" \
        --disable-usage-stats \
        "${args[@]}" >"$log" 2>&1; then
    echo "error: \`ray start --address $CHATRAY_RAY_ADDRESS\` failed; its output ($log):" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
# Wait until the head counts the new node.
wait_s="${CHATRAY_START_TIMEOUT:-180}"
deadline=$((SECONDS + wait_s))
while ((SECONDS <= deadline)); do
    now="$(alive_nodes)"
    if [[ "${now:-0}" -gt "${before:-0}" ]]; then
        echo "==> worker node joined: $now nodes alive (ray status --address $CHATRAY_RAY_ADDRESS)"
        exit 0
    fi
    sleep 1
done
echo "error: the worker started but the head does not list it after $wait_s s; see $log" >&2
exit 1
