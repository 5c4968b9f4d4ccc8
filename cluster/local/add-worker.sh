#!/usr/bin/env bash
# Launch: cluster/local/add-worker.sh [--num-cpus N] [--num-gpus N] [other `ray start` args]   (after start.sh)
#
# Joins one more Ray worker node to the head started by cluster/local/start.sh. On the same machine this is
# a second raylet with its own CPUs/object store: handy to see multi-node scheduling (Train workers and Serve
# replicas spread over nodes, a node dying). Run it several times for several nodes; stop.sh stops them all.
# Default: --num-cpus 1. Ray accepts more nodes only when the head listens on the network: start it with
# CHATRAY_RAY_HOST=0.0.0.0 (or the LAN IP) and run this script with the same setting. From another machine, run
# `ray start --address=<head>:6379` then, with ~/.ray/auth_token copied there and RAY_AUTH_MODE=token.
# Same code as the rest of the local cluster: python -m chatray.localcluster add-worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m chatray.localcluster add-worker "$@"
