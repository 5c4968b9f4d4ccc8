"""A Ray cluster on 127.0.0.1 for laptops and CI: start the head, add worker nodes on this machine, stop.

One implementation behind ``chatray up`` / ``chatray down``, ``make demo``, the e2e tests and the
``cluster/local/*.sh`` scripts (which run ``python -m chatray.localcluster start|stop|add-worker``).

* **Its own Ray temp dir** (``$CHATRAY_HOME/ray``, i.e. ``~/.chatray/ray``, unless set): sessions, logs, sockets
  and ``chatray-cluster.env``, the file clients ``source`` (``RAY_AUTH_MODE=token`` and the addresses).
* **Marked processes**: ``ray start`` runs with ``CHATRAY_LOCAL_CLUSTER=<temp dir>`` in its environment, which
  every process of the cluster inherits, so stopping a cluster stops its processes and no other Ray's.
* **Token authentication, always on**: a token is created when there is none (``ray get-auth-token
  --generate`` writes ``~/.ray/auth_token``), Ray runs with ``RAY_AUTH_MODE=token``, and
  ``RAY_AUTH_MODE=disabled`` is refused. Clients get the same from :mod:`chatray.rayenv`.
* **A state file** (``$CHATRAY_HOME/local-cluster.json``) records each cluster started, by temp dir, so
  ``chatray down`` stops only a cluster chatray started (``--force`` also without that record).

Settings come from ``CHATRAY_*`` environment variables (:meth:`LocalCluster.from_env`; ``cluster/local/_env.sh``
lists them) or from a :class:`LocalCluster` passed in.

Modules, one job each: ``settings`` (addresses, paths, numbers from the environment), ``probes`` (ports and
what answers on them), ``processes`` (finding and stopping a cluster's processes), ``state`` (the state and env
files), ``start`` (head and worker nodes), ``worker_node`` (Ray's ``ray start`` for a worker node of a loopback
head), ``stop``, ``commands`` (``chatray up`` / ``down`` and ``python -m chatray.localcluster``).
"""

from chatray.localcluster.commands import main
from chatray.localcluster.probes import cluster_alive
from chatray.localcluster.processes import cluster_processes, stop_cluster_processes
from chatray.localcluster.settings import MARKER_ENV, LocalCluster, default_temp_dir, ray_executable, resources_from_env
from chatray.localcluster.start import add_local_worker, start_local_cluster
from chatray.localcluster.state import describe_cluster
from chatray.localcluster.stop import stop_local_cluster

__all__ = [
    "MARKER_ENV",
    "LocalCluster",
    "add_local_worker",
    "cluster_alive",
    "cluster_processes",
    "default_temp_dir",
    "describe_cluster",
    "main",
    "ray_executable",
    "resources_from_env",
    "start_local_cluster",
    "stop_cluster_processes",
    "stop_local_cluster",
]
