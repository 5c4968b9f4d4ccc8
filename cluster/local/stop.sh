#!/usr/bin/env bash
# Launch: cluster/local/stop.sh [--all]     (start again: cluster/local/start.sh)
#
# Stops what cluster/local/start.sh and add-worker.sh started: shuts Ray Serve down first when it is running
# (so replicas drain and the HTTP proxy lets go of its port), then stops this cluster's Ray processes.
#
# Only this cluster's processes are stopped (those started with this CHATRAY_RAY_TEMP_DIR); other Ray
# instances on the machine (a notebook's ray.init(), another project's cluster) keep running. `--all` runs
# plain `ray stop` instead, which stops every Ray process of this user on the machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

all=0
for arg in "$@"; do
    case "$arg" in
        --all) all=1 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $arg (expected --all)" >&2; exit 2 ;;
    esac
done

if chatray_cluster_answers; then
    # `serve status` prints "proxies: {}" and "applications: {}" when Serve is not running: nothing to shut down.
    serve_state="$(chatray_timeout 60 "$SERVE" status --address "$CHATRAY_DASHBOARD_URL" 2>/dev/null || true)"
    if ! { grep -q "^proxies: {}" <<<"$serve_state" && grep -q "^applications: {}" <<<"$serve_state"; }; then
        echo "==> shutting down Ray Serve (serve shutdown)"
        chatray_timeout 120 "$SERVE" shutdown -y --address "$CHATRAY_DASHBOARD_URL" ||
            echo "warning: serve shutdown failed; stopping Ray anyway" >&2
    fi
else
    echo "==> no Ray cluster answers at $CHATRAY_RAY_ADDRESS"
fi

if [[ "$all" == 1 ]]; then
    echo "==> ray stop (every Ray process of this user on this machine)"
    "$RAY" stop
    rm -f "$CHATRAY_ENV_FILE"
    exit 0
fi

echo "==> stopping the Ray processes of $CHATRAY_RAY_TEMP_DIR"
# Like `ray stop` (SIGTERM, a grace period, then SIGKILL), restricted to this cluster: processes that carry
# CHATRAY_LOCAL_CLUSTER=<temp dir> in their environment (set by start.sh/add-worker.sh, inherited by all of
# them) or name the temp dir on their command line, plus their children (workers rename themselves ray::...).
"$PY" - "$CHATRAY_RAY_TEMP_DIR" <<'EOF'
import importlib.util
import os
import sys

try:
    import psutil
except ImportError:  # Ray ships psutil in ray/thirdparty_files (what `ray stop` itself uses)
    ray_dir = list(importlib.util.find_spec("ray").submodule_search_locations)[0]
    sys.path.insert(0, os.path.join(ray_dir, "thirdparty_files"))
    import psutil

# The temp dir as given and as resolved (it may sit behind a symlink).
temp_dirs = {os.path.abspath(sys.argv[1]), os.path.realpath(sys.argv[1])}
me = os.getpid()


def ours(p: psutil.Process) -> bool:
    try:
        if p.pid == me:
            return False
        marker = p.environ().get("CHATRAY_LOCAL_CLUSTER")
        if marker and {os.path.abspath(marker), os.path.realpath(marker)} & temp_dirs:
            return True
        # Ray's own processes name their dirs as --temp-dir=..., --session-dir=..., --log_dir=..., ...
        for arg in p.cmdline():
            if arg.startswith("--") and "=" in arg:
                value = arg.split("=", 1)[1]
                if any(value == d or value.startswith(d + "/") for d in temp_dirs):
                    return True
        return False
    except (psutil.Error, OSError):
        return False


found: dict[int, psutil.Process] = {}
for p in psutil.process_iter():
    if ours(p):
        found[p.pid] = p
        try:
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except psutil.Error:
            pass
found.pop(me, None)
procs = list(found.values())
if not procs:
    print("    no processes of this cluster are running")
    sys.exit(0)
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(procs, timeout=16)
names = []
for p in alive:
    try:
        names.append(p.name())
    except psutil.Error:
        names.append(str(p.pid))
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=5)
print(f"    stopped {len(procs)} processes" + (f" (SIGKILL for {', '.join(names)})" if alive else ""))
EOF
rm -f "$CHATRAY_ENV_FILE" "$CHATRAY_RAY_TEMP_DIR/ray_current_cluster"
if chatray_port_open "$CHATRAY_RAY_HOST" "$CHATRAY_RAY_PORT"; then
    echo "warning: something still listens on $CHATRAY_RAY_ADDRESS (started outside these scripts?)" >&2
    echo "hint: cluster/local/stop.sh --all runs \`ray stop\`, which stops every Ray process of this user" >&2
    exit 1
fi
echo "==> stopped"
