# Shared part of cluster/local/*.sh (sourced, not run): finds the Python that runs chatray.localcluster, the one
# implementation of the local cluster (also behind `chatray up` / `chatray down` and `make demo`).
#
# Settings, read by chatray.localcluster from the environment (each can be overridden):
#   CHATRAY_RAY_HOST        where Ray listens (default 127.0.0.1: every process on loopback only, worker nodes of
#                           add-worker.sh too; 0.0.0.0 or a LAN IP: every interface, token auth protects it; needed
#                           for nodes on other machines)
#   CHATRAY_RAY_PORT        GCS port, the cluster address is HOST:PORT     (default 6379)
#   CHATRAY_DASHBOARD_HOST  dashboard + Jobs API + Serve REST API bind      (default 127.0.0.1)
#   CHATRAY_DASHBOARD_PORT  dashboard port                                  (default 8265)
#   CHATRAY_RAY_TEMP_DIR    Ray's temp dir: sessions, logs, sockets        (default $CHATRAY_HOME/ray = ~/.chatray/ray)
#   CHATRAY_HOME            chatray's state (local-cluster.json: the clusters it started)   (default ~/.chatray)
#   CHATRAY_NUM_CPUS        CPUs the head offers to Ray                     (default: all)
#   CHATRAY_NUM_GPUS        GPUs the head offers to Ray                     (default: all detected)
#   CHATRAY_DASHBOARD_AGENT_PORT  the head's dashboard agent (runs submitted jobs) (default 52365, else a free one)
#   CHATRAY_RAY_CLIENT_PORT       Ray Client server, ray://                       (default 10001, else a free one)
#   CHATRAY_START_TIMEOUT         seconds start.sh/add-worker.sh wait for each part to come up (default 180)
#
# Token authentication: the head starts with RAY_AUTH_MODE=token after making sure a token exists
# (~/.ray/auth_token, created with `ray get-auth-token --generate`, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH if you
# set them). RAY_AUTH_MODE=disabled is refused: there is no switch to turn authentication off.
#
# Credentials (AWS_*, HF_TOKEN, CHATRAY_API_KEY): export them before start.sh / add-worker.sh. Every process of
# the cluster inherits this environment, so jobs and Serve apps need none in their specs (README.md, Credentials).
#
# Every process of the cluster carries CHATRAY_LOCAL_CLUSTER=<Ray temp dir> in its environment: stop.sh stops
# those (and Ray's processes naming that dir, and their children) and nothing else.

_CHATRAY_LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHATRAY_REPO="$(cd "$_CHATRAY_LOCAL_DIR/../.." && pwd)"

# Python: the repo's virtual environment when there is one (`make setup`), else python3 on PATH with Ray
# installed. Job entrypoints such as `python jobs/finetune.py` then find that same Python first on PATH.
if [[ -x "$CHATRAY_REPO/.venv/bin/python" ]]; then
    PY="$CHATRAY_REPO/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python || true)"
fi
# find_spec, not `import ray`: importing Ray takes seconds, and every script would pay it just to check.
if [[ -z "$PY" ]] || ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('ray') is None)" >/dev/null 2>&1; then
    echo "error: no Python with Ray found (neither $CHATRAY_REPO/.venv/bin/python nor python3 on PATH)" >&2
    echo "hint: run \`make setup\` in $CHATRAY_REPO, or pip install 'ray[default,serve]'" >&2
    exit 1
fi
# chatray.localcluster from this checkout, installed or not.
export PYTHONPATH="$CHATRAY_REPO/platform${PYTHONPATH:+:$PYTHONPATH}"
