"""``chatray up`` / ``chatray down``: the single-node local cluster the demo uses."""

from __future__ import annotations

import click

__all__ = ["down", "up"]


@click.command()
@click.option("--num-cpus", type=int, default=None, help="CPUs to offer (default: all).")
def up(num_cpus: int | None) -> None:
    """Start a single-node Ray cluster on 127.0.0.1 (token auth on), unless one is running."""
    from chatray.localcluster import start_local_cluster

    cluster, started = start_local_cluster(num_cpus=num_cpus)
    click.echo(("started" if started else "reusing") + f" Ray at {cluster.address}; dashboard {cluster.dashboard_url}")
    click.echo("token: ~/.ray/auth_token (clients need RAY_AUTH_MODE=token; chatray sets it for you)")


@click.command()
@click.option("--force", is_flag=True, help="Also stop a local Ray that chatray did not start.")
def down(force: bool) -> None:
    """Shut down Serve and stop the local Ray cluster that `chatray up` / `make demo` started."""
    from chatray.localcluster import stop_local_cluster

    for line in stop_local_cluster(force=force):
        click.echo(line)
