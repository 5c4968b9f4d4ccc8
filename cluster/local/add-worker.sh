#!/usr/bin/env bash
# Launch: cluster/local/add-worker.sh [--num-cpus N] [--num-gpus N] [other `ray start` args]   (after start.sh)
#
# Joins one more Ray worker node to the head started by cluster/local/start.sh. On the same machine this is
# a second raylet with its own CPUs/object store: handy to see multi-node scheduling (Train workers and Serve
# replicas spread over nodes, a node dying). Run it several times for several nodes; stop.sh stops them all.
# Default: --num-cpus 1. On a loopback head (the default) the node joins on 127.0.0.1 too, every listener of it on
# loopback (chatray.localcluster.worker_node relaxes the one check of Ray's CLI that refuses it). From another
# machine (head started with CHATRAY_RAY_HOST=0.0.0.0 or the LAN IP), run
# `ray start --address=<head>:6379` then, with ~/.ray/auth_token copied there and RAY_AUTH_MODE=token.
# Same code as the rest of the local cluster: python -m chatray.localcluster add-worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m chatray.localcluster add-worker "$@"
