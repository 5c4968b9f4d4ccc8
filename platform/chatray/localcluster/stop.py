"""Stopping a local cluster: Serve shut down first (replicas drain, the HTTP port is let go), then the processes
of that cluster's temp dir only, and its files cleared."""

from __future__ import annotations

import subprocess
from typing import Any

from chatray.errors import ChatrayError
from chatray.localcluster.probes import cluster_alive, dashboard_state, port_open, serve_running
from chatray.localcluster.processes import cluster_processes, stop_cluster_processes
from chatray.localcluster.settings import STOP_GRACE_S, Echo, LocalCluster, cli_executable, ray_executable, state_file
from chatray.localcluster.state import clear_cluster_files, cluster_from_record, read_state
from chatray.rayenv import ray_auth_env

__all__ = ["stop_local_cluster"]


def _shutdown_serve(cluster: LocalCluster) -> str:
    """``serve shutdown`` when Serve runs, so replicas drain and the HTTP proxy lets go of its port."""
    if not serve_running(cluster):
        return "Serve was not running"
    try:
        r = subprocess.run([cli_executable("serve"), "shutdown", "-y", "-a", cluster.dashboard_url],
                           capture_output=True, text=True, env=ray_auth_env(), timeout=120)
    except subprocess.TimeoutExpired:
        return "warning: serve shutdown did not finish within 120 s; stopping Ray anyway"
    if r.returncode != 0:
        return f"warning: serve shutdown failed ({(r.stderr or r.stdout).strip()[-200:]}); stopping Ray anyway"
    return "Serve shut down"


def _stop_every_ray(cluster: LocalCluster, say: Echo) -> None:
    """Plain ``ray stop``: every Ray process of this user on the machine."""
    if dashboard_state(cluster) == "ok":  # a dashboard that refuses this machine's token cannot drain Serve
        say(_shutdown_serve(cluster))
    say("ray stop (every Ray process of this user on this machine)")
    r = subprocess.run([ray_executable(), "stop"], capture_output=True, text=True, timeout=180)
    say("stopped" if r.returncode == 0 else f"warning: ray stop failed: {r.stderr.strip()[-300:]}")
    clear_cluster_files(cluster)


def _leave_unrecorded(cluster: LocalCluster, procs: list[Any], say: Echo) -> None:
    """Say what runs in ``cluster``'s place that chatray has no record of starting (it is left running)."""
    temp = cluster.ray_temp_dir
    if procs:
        say(f"{len(procs)} Ray processes of {temp} are running, but chatray has no record of starting them "
            f"({state_file()}): left running; --force stops them")
    elif cluster_alive(cluster):
        say(f"a Ray cluster chatray did not start answers at {cluster.dashboard_url} (it is not in {temp}): "
            "left running")
    else:
        say("nothing to stop")


def stop_local_cluster(force: bool = False, cluster: LocalCluster | None = None, *, every_ray: bool = False,
                       grace_s: float = STOP_GRACE_S, echo: Echo | None = None) -> list[str]:
    """Shut down Serve and stop the local cluster that ``start_local_cluster`` started, and only it.

    The cluster is the one in ``cluster``'s temp dir (default: :meth:`LocalCluster.from_env`, whose addresses
    the state file's record of that temp dir replaces). Its processes are found by that temp dir
    (:func:`~chatray.localcluster.processes.cluster_processes`) and stopped with SIGTERM, then SIGKILL after
    ``grace_s`` seconds.

    Args:
        force: also stop them when the state file has no record of chatray starting a cluster in that temp dir
            (e.g. the file was deleted, or CHATRAY_HOME changed). Still only processes of that temp dir.
        every_ray: run plain ``ray stop`` instead, which stops EVERY Ray process of this user on the machine
            (``cluster/local/stop.sh --all``; not offered by ``chatray down``).
        echo: called with each line as it happens.

    Returns:
        What was done, as short lines for the user.

    Raises:
        ChatrayError: when, after stopping, something still listens on the cluster's address (a Ray started
            outside chatray there): it is left running.
    """
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if echo:
            echo(line)

    state = read_state()
    if cluster is None:
        cluster = LocalCluster.from_env()
        record = state.get(str(cluster.ray_temp_dir))
        if record:
            cluster = cluster_from_record(record)
    if every_ray:
        _stop_every_ray(cluster, say)
        return lines
    temp = cluster.ray_temp_dir
    procs = cluster_processes(temp)
    if str(temp) not in state and not force:
        _leave_unrecorded(cluster, procs, say)
        return lines
    if procs and dashboard_state(cluster) == "ok":  # the cluster answering there is this one: drain Serve
        say(_shutdown_serve(cluster))
    stopped, killed = stop_cluster_processes(temp, grace_s=grace_s)
    if stopped:
        say(f"local Ray cluster stopped: {stopped} processes of {temp}"
            + (f" (SIGKILL for {', '.join(killed)})" if killed else ""))
    else:
        say(f"no processes of the local cluster in {temp} were running")
    clear_cluster_files(cluster)
    if port_open(cluster.host, cluster.gcs_port):
        raise ChatrayError(f"something still listens on {cluster.address}: not a process of {temp} (a Ray started "
                           "outside chatray?), left running",
                           hint="`ray stop` (or cluster/local/stop.sh --all) stops every Ray process of this user "
                                "on this machine")
    return lines
