"""The command lines of the local cluster: ``chatray up`` / ``chatray down`` (click) and
``python -m chatray.localcluster start|stop|add-worker``, what cluster/local/*.sh run."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from chatray.errors import ChatrayError
from chatray.localcluster.settings import START_TIMEOUT_S, LocalCluster, env_number, resources_from_env
from chatray.localcluster.start import add_local_worker, start_local_cluster
from chatray.localcluster.state import describe_cluster
from chatray.localcluster.stop import stop_local_cluster

__all__ = ["down", "main", "up"]


@click.command()
@click.option("--num-cpus", type=int, default=None, envvar="CHATRAY_NUM_CPUS", help="CPUs to offer (default: all).")
@click.option("--host", default=None, envvar="CHATRAY_RAY_HOST", metavar="ADDRESS",
              help="Where Ray listens and what it advertises (default 127.0.0.1: this machine only). Any other "
                   "address (0.0.0.0, or this machine's LAN IP) makes Ray listen on every interface, protected by "
                   "its auth token (docs/operations.md).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker nodes to add on this machine once the head is up: separate raylets with their own "
                   "resources, on the same address as the head (multi-node tests, node-loss drills).")
@click.option("--worker-cpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs each worker node offers.")
def up(num_cpus: int | None, host: str | None, workers: int, worker_cpus: int) -> None:
    """Start a Ray cluster on 127.0.0.1 (token auth on), unless one is running: a head, plus --workers nodes.

    Every Ray process of it listens on 127.0.0.1 only, unless --host says otherwise. Ray's files go to
    $CHATRAY_HOME/ray (~/.chatray/ray); ports and dirs follow the CHATRAY_* variables of cluster/local/_env.sh.
    `chatray down` stops the head and its worker nodes.
    """
    cluster = LocalCluster.from_env()
    if host:
        cluster.host = host
    cluster, started = start_local_cluster(cluster, num_cpus=num_cpus, echo=click.echo)
    for _ in range(workers):
        add_local_worker(cluster, ray_args=["--num-cpus", str(worker_cpus)], echo=click.echo)
    click.echo(("started" if started else "reusing") + f" Ray at {cluster.address}\n")
    click.echo(describe_cluster(cluster, "chatray down"))


@click.command()
@click.option("--force", is_flag=True,
              help="Also stop the cluster in chatray's Ray temp dir ($CHATRAY_HOME/ray) when chatray has no record "
                   "of starting it (e.g. the state file was deleted). Still only that cluster's processes: other "
                   "Ray instances on the machine are never stopped (`ray stop` stops them all).")
def down(force: bool) -> None:
    """Shut down Serve and stop the local Ray cluster that `chatray up` / `make demo` started.

    Only that cluster's processes are stopped (found by its Ray temp dir; SIGTERM, then SIGKILL for what is left,
    16 s in all); a notebook's ray.init(), a test suite's Ray or another cluster on the machine keep running.
    """
    stop_local_cluster(force=force, echo=click.echo)


_USAGE = """\
usage: python -m chatray.localcluster start [RAY_START_ARGS...]
       python -m chatray.localcluster add-worker [RAY_START_ARGS...]
       python -m chatray.localcluster stop [--all]

start       start a Ray head (ray start --head) unless one answers; print how to reach it
add-worker  join one more Ray node on this machine to it (--num-cpus 1 unless given)
stop        shut Serve down, then stop this cluster's Ray processes only (those of its temp dir);
            --all runs plain `ray stop` instead, which stops EVERY Ray process of this user on the machine

Settings come from the environment: CHATRAY_RAY_HOST, CHATRAY_RAY_PORT, CHATRAY_DASHBOARD_HOST,
CHATRAY_DASHBOARD_PORT, CHATRAY_DASHBOARD_AGENT_PORT, CHATRAY_RAY_CLIENT_PORT, CHATRAY_RAY_TEMP_DIR,
CHATRAY_NUM_CPUS, CHATRAY_NUM_GPUS, CHATRAY_START_TIMEOUT (see cluster/local/_env.sh)."""


def _say(line: str) -> None:
    print(f"==> {line}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m chatray.localcluster``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command in ("-h", "--help") or "-h" in rest or "--help" in rest:
        print(_USAGE)
        return 0
    if command not in ("start", "stop", "add-worker") or (command == "stop" and rest not in ([], ["--all"])):
        print(_USAGE, file=sys.stderr)
        return 2
    try:
        cluster = LocalCluster.from_env()
        wait_s = env_number("CHATRAY_START_TIMEOUT", float) or START_TIMEOUT_S
        if command == "start":
            cluster, started = start_local_cluster(cluster, **resources_from_env(), wait_s=wait_s, ray_args=rest,
                                                   echo=_say)
            print(("==> Ray is up\n" if started else "") + "\n" + describe_cluster(cluster, "cluster/local/stop.sh"))
        elif command == "add-worker":
            add_local_worker(cluster, ray_args=rest, wait_s=wait_s, echo=_say)
        else:
            # The cluster of CHATRAY_RAY_TEMP_DIR, with the addresses recorded at its start; no record needed.
            stop_local_cluster(force=True, every_ray=rest == ["--all"], echo=_say)
    except (ChatrayError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "hint", None):
            print(f"hint: {e.hint}", file=sys.stderr)  # type: ignore[union-attr]
        return 1
    return 0
