#!/usr/bin/env bash
# Launch: cluster/local/start.sh [RAY_START_ARGS...]   (stop: cluster/local/stop.sh; second node: add-worker.sh)
#
# Starts a single-node Ray cluster on this machine with `ray start --head`: GCS on 127.0.0.1:6379, dashboard /
# Jobs API / Serve REST API on 127.0.0.1:8265, token authentication on, Ray's files under ~/.chatray/ray.
# Idempotent: when a cluster already answers at that address it only prints how to reach it.
# Prints the cluster address, the dashboard URL, where the token is, and writes <temp dir>/chatray-cluster.env
# (RAY_AUTH_MODE=token and the addresses) for clients to `source`.
# Settings (ports, hosts, temp dir, CPUs) come from the environment: see cluster/local/_env.sh and README.md.
# Extra arguments are passed to `ray start` (e.g. --resources '{"accel": 1}').
# Same code as `chatray up`: python -m chatray.localcluster start.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m chatray.localcluster start "$@"
