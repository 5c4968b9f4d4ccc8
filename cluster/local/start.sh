#!/usr/bin/env bash
# Launch: cluster/local/start.sh            (stop: cluster/local/stop.sh; second node: cluster/local/add-worker.sh)
#
# Starts a single-node Ray cluster on this machine with `ray start --head`: GCS on 127.0.0.1:6379, dashboard /
# Jobs API / Serve REST API on 127.0.0.1:8265, token authentication on, Ray's files under ~/.chatray/ray.
# Idempotent: when a cluster already answers at that address it only prints how to reach it.
# Settings (ports, hosts, temp dir, CPUs) come from the environment: see cluster/local/_env.sh and README.md.
# Extra arguments are passed to `ray start` (e.g. --num-cpus 4 --resources '{"accel": 1}').
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

print_info() {
    local token_at
    token_at="$(chatray_token_location)"
    cat <<EOF

Ray cluster:   $CHATRAY_RAY_ADDRESS     (ray status --address $CHATRAY_RAY_ADDRESS)
Dashboard:     $CHATRAY_DASHBOARD_URL   (also the Jobs API and Serve's REST API)
Token auth:    on; the token is in $token_at (print it: ray get-auth-token).
               The dashboard asks for it in the browser. CLI/SDK clients need RAY_AUTH_MODE=token:
                 source $CHATRAY_ENV_FILE
                 ray job submit --address $CHATRAY_DASHBOARD_URL -- python -c 'print(1)'
                 serve deploy serve_config.yaml --address $CHATRAY_DASHBOARD_URL
Ray files:     $CHATRAY_RAY_TEMP_DIR (logs: $CHATRAY_RAY_TEMP_DIR/session_latest/logs)
Stop:          cluster/local/stop.sh
EOF
}

write_env_file() {
    mkdir -p "$CHATRAY_RAY_TEMP_DIR"
    cat >"$CHATRAY_ENV_FILE" <<EOF
# Written by cluster/local/start.sh: \`source\` this file to point Ray's CLIs and SDKs at the local cluster.
export RAY_AUTH_MODE=token
export RAY_ADDRESS=$CHATRAY_RAY_ADDRESS
export RAY_API_SERVER_ADDRESS=$CHATRAY_DASHBOARD_URL
export RAY_DASHBOARD_ADDRESS=$CHATRAY_DASHBOARD_URL
EOF
}

chatray_ensure_token

if chatray_cluster_answers; then
    echo "==> a Ray cluster already answers at $CHATRAY_RAY_ADDRESS: leaving it as it is"
    write_env_file
    print_info
    exit 0
fi
if chatray_port_open "$CHATRAY_RAY_HOST" "$CHATRAY_RAY_PORT"; then
    echo "error: $CHATRAY_RAY_ADDRESS is in use, but no Ray cluster there accepts this machine's token" >&2
    echo "hint: stop whatever listens there, or use other ports:" \
        "CHATRAY_RAY_PORT=6380 CHATRAY_DASHBOARD_PORT=8266 $0" >&2
    exit 1
fi
if chatray_port_open "$_dash_client_host" "$CHATRAY_DASHBOARD_PORT"; then
    echo "error: the dashboard port $_dash_client_host:$CHATRAY_DASHBOARD_PORT is already in use (another Ray?)" >&2
    echo "hint: stop it, or pick another port: CHATRAY_DASHBOARD_PORT=8266 $0" >&2
    exit 1
fi

mkdir -p "$CHATRAY_RAY_TEMP_DIR"
# Explicit settings are used as given; the defaults move to a free port when another Ray holds them.
agent_port="${CHATRAY_DASHBOARD_AGENT_PORT:-$(chatray_free_port 52365)}"
client_port="${CHATRAY_RAY_CLIENT_PORT:-$(chatray_free_port 10001)}"
args=(
    --head
    --node-ip-address "$CHATRAY_RAY_HOST"
    --port "$CHATRAY_RAY_PORT"
    --include-dashboard true
    --dashboard-host "$CHATRAY_DASHBOARD_HOST"
    --dashboard-port "$CHATRAY_DASHBOARD_PORT"
    --dashboard-agent-listen-port "$agent_port"
    --ray-client-server-port "$client_port"
    --temp-dir "$CHATRAY_RAY_TEMP_DIR"
    --disable-usage-stats
)
[[ -n "${CHATRAY_NUM_CPUS:-}" ]] && args+=(--num-cpus "$CHATRAY_NUM_CPUS")
[[ -n "${CHATRAY_NUM_GPUS:-}" ]] && args+=(--num-gpus "$CHATRAY_NUM_GPUS")

echo "==> starting Ray head on $CHATRAY_RAY_ADDRESS (dashboard $CHATRAY_DASHBOARD_URL, files in $CHATRAY_RAY_TEMP_DIR)"
log="$CHATRAY_RAY_TEMP_DIR/ray-start.log"
# CHATRAY_LOCAL_CLUSTER is inherited by every process of this cluster: stop.sh finds them by it.
if ! CHATRAY_LOCAL_CLUSTER="$CHATRAY_RAY_TEMP_DIR" "$RAY" start "${args[@]}" "$@" >"$log" 2>&1; then
    echo "error: \`ray start --head\` failed; its output ($log):" >&2
    tail -n 30 "$log" >&2
    exit 1
fi

# The Jobs API lives in the dashboard, which comes up a little after `ray start` returns.
# A slow or busy machine can take a minute or two: wait up to CHATRAY_START_TIMEOUT seconds for each part.
wait_s="${CHATRAY_START_TIMEOUT:-180}"
echo "==> waiting for the dashboard / Jobs API at $CHATRAY_DASHBOARD_URL"
deadline=$((SECONDS + wait_s))
until curl -fsS -m 2 "$CHATRAY_DASHBOARD_URL/api/gcs_healthz" >/dev/null 2>&1 || ((SECONDS > deadline)); do
    sleep 0.5
done
if ! curl -fsS -m 2 "$CHATRAY_DASHBOARD_URL/api/gcs_healthz" >/dev/null 2>&1; then
    echo "error: the dashboard did not come up at $CHATRAY_DASHBOARD_URL within $wait_s s" >&2
    echo "hint: see $CHATRAY_RAY_TEMP_DIR/session_latest/logs/dashboard.log; stop with cluster/local/stop.sh" >&2
    exit 1
fi
# Jobs are handed to the head's dashboard agent: submissions fail until it serves HTTP.
deadline=$((SECONDS + wait_s))
until chatray_port_open 127.0.0.1 "$agent_port" || ((SECONDS > deadline)); do
    sleep 0.5
done
if ! chatray_port_open 127.0.0.1 "$agent_port"; then
    echo "error: the head's dashboard agent is not listening on port $agent_port: jobs could not be submitted" >&2
    echo "hint: see $CHATRAY_RAY_TEMP_DIR/session_latest/logs/dashboard_agent.log; stop with cluster/local/stop.sh" >&2
    exit 1
fi
if ! chatray_timeout 60 "$RAY" job list --address "$CHATRAY_DASHBOARD_URL" >/dev/null 2>&1; then
    echo "error: Ray started but its Jobs API at $CHATRAY_DASHBOARD_URL does not accept this machine's token" >&2
    echo "hint: see $log and $CHATRAY_RAY_TEMP_DIR/session_latest/logs; stop with cluster/local/stop.sh" >&2
    exit 1
fi
write_env_file
echo "==> Ray is up"
print_info
