# Shared settings of cluster/local/*.sh (sourced, not run). Every setting can be overridden from the environment.
#
#   CHATRAY_RAY_HOST        address the head binds and advertises          (default 127.0.0.1: loopback only)
#   CHATRAY_RAY_PORT        GCS port, the cluster address is HOST:PORT     (default 6379)
#   CHATRAY_DASHBOARD_HOST  dashboard + Jobs API + Serve REST API bind      (default 127.0.0.1)
#   CHATRAY_DASHBOARD_PORT  dashboard port                                  (default 8265)
#   CHATRAY_RAY_TEMP_DIR    Ray's temp dir: sessions, logs, sockets        (default ~/.chatray/ray)
#   CHATRAY_NUM_CPUS        CPUs the head offers to Ray                     (default: all)
#   CHATRAY_NUM_GPUS        GPUs the head offers to Ray                     (default: all detected)
#   CHATRAY_DASHBOARD_AGENT_PORT  the head's dashboard agent (runs submitted jobs) (default 52365, else a free one)
#   CHATRAY_RAY_CLIENT_PORT       Ray Client server, ray://                       (default 10001, else a free one)
#   CHATRAY_START_TIMEOUT         seconds start.sh/add-worker.sh wait for each part to come up (default 180)
#
# Token authentication: `ray start --head` (Ray 2.60) enables it when a token exists; these scripts make sure
# one exists (~/.ray/auth_token, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH if you set them) and always run Ray with
# RAY_AUTH_MODE=token. They refuse RAY_AUTH_MODE=disabled: there is no switch to turn authentication off.

_CHATRAY_LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHATRAY_REPO="$(cd "$_CHATRAY_LOCAL_DIR/../.." && pwd)"

# Ray CLI: the repo's virtual environment when there is one, else whatever is on PATH.
if [[ -x "$CHATRAY_REPO/.venv/bin/ray" ]]; then
    CHATRAY_BIN="$CHATRAY_REPO/.venv/bin"
    RAY="$CHATRAY_BIN/ray"
    SERVE="$CHATRAY_BIN/serve"
    PY="$CHATRAY_BIN/python"
    # The cluster's processes inherit PATH: job entrypoints such as `python jobs/finetune.py` must find this
    # environment's python (with chatray and Ray installed), not the system one.
    export PATH="$CHATRAY_BIN:$PATH"
    export VIRTUAL_ENV="$CHATRAY_REPO/.venv"
else
    RAY="$(command -v ray || true)"
    SERVE="$(command -v serve || true)"
    PY="$(command -v python3 || command -v python || true)"
    if [[ -z "$RAY" || -z "$PY" ]]; then
        echo "error: no Ray CLI found (neither $CHATRAY_REPO/.venv/bin/ray nor \`ray\` on PATH)" >&2
        echo "hint: run \`make setup\` in $CHATRAY_REPO, or pip install 'ray[default,serve]'" >&2
        exit 1
    fi
fi

CHATRAY_RAY_HOST="${CHATRAY_RAY_HOST:-127.0.0.1}"
CHATRAY_RAY_PORT="${CHATRAY_RAY_PORT:-6379}"
CHATRAY_DASHBOARD_HOST="${CHATRAY_DASHBOARD_HOST:-127.0.0.1}"
CHATRAY_DASHBOARD_PORT="${CHATRAY_DASHBOARD_PORT:-8265}"
CHATRAY_RAY_TEMP_DIR="${CHATRAY_RAY_TEMP_DIR:-$HOME/.chatray/ray}"
CHATRAY_RAY_ADDRESS="$CHATRAY_RAY_HOST:$CHATRAY_RAY_PORT"
# Where clients reach the dashboard: a wildcard bind is still reached through the advertised host.
case "$CHATRAY_DASHBOARD_HOST" in
    0.0.0.0|::|"[::]") _dash_client_host="$CHATRAY_RAY_HOST" ;;
    *) _dash_client_host="$CHATRAY_DASHBOARD_HOST" ;;
esac
CHATRAY_DASHBOARD_URL="http://$_dash_client_host:$CHATRAY_DASHBOARD_PORT"
# Written by start.sh; `source` it to point Ray CLIs/SDKs at this cluster.
CHATRAY_ENV_FILE="$CHATRAY_RAY_TEMP_DIR/chatray-cluster.env"

# Token auth, always on.
case "${RAY_AUTH_MODE:-token}" in
    token) ;;
    *)
        echo "error: RAY_AUTH_MODE=$RAY_AUTH_MODE: chatray's local cluster always uses token authentication" >&2
        echo "hint: unset RAY_AUTH_MODE (or set it to token)" >&2
        exit 1
        ;;
esac
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

# Where the token lives, for messages (the token itself is never printed).
chatray_token_location() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        echo "the RAY_AUTH_TOKEN environment variable"
    elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        echo "$RAY_AUTH_TOKEN_PATH"
    else
        echo "$HOME/.ray/auth_token"
    fi
}

# Make sure a token exists: Ray then starts with token auth; clients on this machine read the same file.
chatray_ensure_token() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        return 0
    fi
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
            echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH does not exist or is empty" >&2
            echo "hint: unset it to use ~/.ray/auth_token (created for you), or write a token there" >&2
            return 1
        fi
        return 0
    fi
    if [[ ! -s "$HOME/.ray/auth_token" ]]; then
        echo "==> creating a Ray authentication token in $HOME/.ray/auth_token (ray get-auth-token --generate)"
        "$RAY" get-auth-token --generate >/dev/null
        chmod 600 "$HOME/.ray/auth_token" 2>/dev/null || true
    fi
}

# `timeout SECONDS cmd...` where coreutils' timeout exists (not on stock macOS), else just `cmd...`.
chatray_timeout() {
    if command -v timeout >/dev/null 2>&1; then
        timeout "$@"
    else
        shift
        "$@"
    fi
}

# True when something accepts TCP connections on host:port.
chatray_port_open() {
    "$PY" - "$1" "$2" <<'EOF'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
EOF
}

# Prints $1 when that TCP port is free on every interface (or $1 is 0), else a free port the OS picks.
# Ray's dashboard agent (the Jobs API's executor on each node) binds a fixed port, 52365 by default: a second
# Ray on the machine holding it leaves the agent without HTTP, and then every job submission fails.
chatray_free_port() {
    "$PY" - "$1" <<'EOF'
import socket, sys

def free(port):
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False

want = int(sys.argv[1])
if want and free(want):
    print(want)
else:
    with socket.socket() as s:
        s.bind(("", 0))
        print(s.getsockname()[1])
EOF
}

# True when a Ray cluster answers at CHATRAY_RAY_ADDRESS (with our token).
chatray_cluster_answers() {
    chatray_port_open "$CHATRAY_RAY_HOST" "$CHATRAY_RAY_PORT" || return 1
    chatray_timeout 60 "$RAY" status --address "$CHATRAY_RAY_ADDRESS" >/dev/null 2>&1
}
