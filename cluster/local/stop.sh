#!/usr/bin/env bash
# Launch: cluster/local/stop.sh [--all]     (start again: cluster/local/start.sh)
#
# Stops what cluster/local/start.sh and add-worker.sh started: shuts Ray Serve down first when it is running
# (so replicas drain and the HTTP proxy lets go of its port), then stops this cluster's Ray processes.
#
# Only this cluster's processes are stopped (those started with this CHATRAY_RAY_TEMP_DIR: SIGTERM, then SIGKILL
# for what is left, 16 s in all); other Ray instances on the machine (a notebook's ray.init(), another project's cluster) keep
# running. `--all` runs plain `ray stop` instead, which stops every Ray process of this user on the machine.
# Same code as `chatray down --force`: python -m chatray.localcluster stop.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m chatray.localcluster stop "$@"
