"""``chatray up`` / ``chatray down``: the single-node local cluster the demo uses (chatray.localcluster)."""

from __future__ import annotations

import click

__all__ = ["down", "up"]


@click.command()
@click.option("--num-cpus", type=int, default=None, envvar="CHATRAY_NUM_CPUS", help="CPUs to offer (default: all).")
def up(num_cpus: int | None) -> None:
    """Start a single-node Ray cluster on 127.0.0.1 (token auth on), unless one is running.

    Ray's files go to $CHATRAY_HOME/ray (~/.chatray/ray); ports and dirs follow the CHATRAY_* variables of
    cluster/local/_env.sh.
    """
    from chatray.localcluster import describe_cluster, start_local_cluster

    cluster, started = start_local_cluster(num_cpus=num_cpus, echo=click.echo)
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
    from chatray.localcluster import stop_local_cluster

    stop_local_cluster(force=force, echo=click.echo)
