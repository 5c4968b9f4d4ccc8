"""``chatray train ...``: thin click layer over :mod:`chatray.train` (no torch/ray import at module level).

    chatray train --config jobs/finetune_tiny.yaml [--set train.max_steps=200 ...]
    chatray train submit --address http://127.0.0.1:8265 --config jobs/finetune_gpt2.yaml
    chatray train status RUN | chatray train logs RUN [--follow] | chatray train list
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from chatray.config import FinetuneConfig, field_help
from chatray.raylogs import QuietOutput, quiet_terminal, set_verbose

__all__ = ["train"]

_DEFAULT_STORAGE = FinetuneConfig().run.storage_path


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``train`` and ``train submit`` (flags beat --set, which beats the YAML)."""
    options = [
        click.option("--config", "-c", "config", type=click.Path(dir_okay=False),
                     help="YAML run config, e.g. jobs/finetune_tiny.yaml."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key (repeatable), e.g. --set train.lr=3e-4."),
        click.option("--data", help=field_help(FinetuneConfig, "data.path")),
        click.option("--storage", help=field_help(FinetuneConfig, "run.storage_path")),
        click.option("--name", help=field_help(FinetuneConfig, "run.name")),
        click.option("--max-steps", type=int, help=field_help(FinetuneConfig, "train.max_steps")),
        click.option("--num-workers", callback=_parse_num_workers, metavar="N|MIN-MAX",
                     help=field_help(FinetuneConfig, "scaling.num_workers") + "; MIN-MAX (e.g. 1-2) is elastic: "
                     "scaling.min_workers=MIN, scaling.num_workers=MAX"),
        click.option("--use-gpu/--no-use-gpu", default=None, help=field_help(FinetuneConfig, "scaling.use_gpu")),
        click.option("--env", "env_names", multiple=True, metavar="NAME",
                     help="Forward this variable's value to the job's workers (repeatable). It is then visible in "
                     "the job's runtime_env to anyone who can read the Jobs API/dashboard; secrets are not "
                     "forwarded otherwise."),
    ]
    for o in reversed(options):
        f = o(f)
    return f


def _parse_num_workers(_ctx: click.Context, _param: click.Parameter,
                       value: str | None) -> tuple[int | None, int] | None:
    """``--num-workers N`` -> (None, N): a fixed group; ``--num-workers MIN-MAX`` -> (MIN, MAX): elastic."""
    if value is None:
        return None
    low, sep, high = value.partition("-")
    if not (low.strip().isdigit() and (not sep or high.strip().isdigit())):
        raise click.BadParameter(f"expected a number of workers N or a range MIN-MAX (e.g. 1-2), got {value!r}")
    if not sep:
        return None, int(low)
    if not 1 <= int(low) <= int(high):
        raise click.BadParameter(f"MIN-MAX needs 1 <= MIN <= MAX, got {value!r}")
    return int(low), int(high)


def _overrides(sets: tuple[str, ...], data: str | None, storage: str | None, name: str | None,
               max_steps: int | None, num_workers: tuple[int | None, int] | None, use_gpu: bool | None) -> list[str]:
    out = list(sets)
    if num_workers is not None:  # N: a fixed group whatever the YAML says; MIN-MAX: elastic
        out += [f"scaling.min_workers={'null' if num_workers[0] is None else num_workers[0]}",
                f"scaling.num_workers={num_workers[1]}"]
    for key, value in (("data.path", data), ("run.storage_path", storage), ("run.name", name),
                       ("train.max_steps", max_steps), ("scaling.use_gpu", use_gpu)):
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


@click.group(invoke_without_command=True)
@_run_options
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own output here too (else it goes to a log file).")
@click.pass_context
def train(ctx: click.Context, config: str | None, sets: tuple[str, ...], data: str | None, storage: str | None,
          name: str | None, max_steps: int | None, num_workers: tuple[int | None, int] | None, use_gpu: bool | None,
          env_names: tuple[str, ...], progress: bool | None, verbose: bool) -> None:
    """Fine-tune a model on a prepared dataset with Ray Train (current cluster via RAY_ADDRESS, else a local one).

    \b
    Examples:
      chatray train --config jobs/finetune_tiny.yaml
      chatray train --config jobs/finetune_tiny.yaml --max-steps 400 --num-workers 2
      chatray train submit --config jobs/finetune_gpt2.yaml --address http://HEAD:8265
      chatray train status tiny-demo
    """
    set_verbose(verbose)
    if ctx.invoked_subcommand is not None:
        return
    from chatray.config import load_config
    from chatray.train.trainer import run_training

    cfg = load_config(FinetuneConfig, config, _overrides(sets, data, storage, name, max_steps, num_workers, use_gpu))
    with quiet_terminal("train"):
        s = run_training(cfg, progress=progress, forward_env=env_names)
    click.echo(f"done: {s['run_uri']} at step {s['step']} (loss {s['loss'] or float('nan'):.4f}, eval loss "
               f"{s['eval_loss'] if s['eval_loss'] is not None else float('nan'):.4f}) in {s['seconds']:.0f}s")
    if s["best"]:
        click.echo(f"best checkpoint: {s['best']}")
        click.echo(f"next: chatray serve --checkpoint {s['run_uri']}:best")


@train.command("submit")
@_run_options
@click.option("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265).")
@click.option("--wait/--no-wait", default=False, help="Stream the job's log until it ends (default: return at once).")
@click.option("--verbose", "-v", is_flag=True,
              help="With --wait, show the job's whole log (else chatray's lines, and the rest in a log file).")
def submit(config: str | None, sets: tuple[str, ...], data: str | None, storage: str | None, name: str | None,
           max_steps: int | None, num_workers: tuple[int | None, int] | None, use_gpu: bool | None,
           env_names: tuple[str, ...],
           address: str | None, wait: bool, verbose: bool) -> None:
    """Submit a fine-tuning run as a Ray job (jobs/finetune.py); prints the job id."""
    from chatray.train.submit import job_client, submit_training

    set_verbose(verbose)
    with quiet_terminal("train-submit") as out:
        out.start()  # the upload of the source tree logs through Ray's loggers
        job_id = submit_training(config, _overrides(sets, data, storage, name, max_steps, num_workers, use_gpu),
                                 address=address, forward_env=env_names)
        click.echo(job_id)
        if wait:
            client = job_client(address)
            _follow_job(client, job_id, out)
            status = client.get_job_status(job_id)
            click.echo(f"job {job_id}: {status}", err=True)
            if str(status) != "SUCCEEDED" and getattr(status, "value", "") != "SUCCEEDED":
                raise SystemExit(1)
    if not wait:
        click.echo(f"follow it: chatray train logs {name or '<run>'} --address {address or '$RAY_ADDRESS'} --follow",
                   err=True)


def _follow_job(client: Any, job_id: str, out: QuietOutput) -> None:
    """Print the job's log as it comes: with a quiet terminal, chatray's lines (and errors) only, the whole log
    going to the log file."""
    from chatray.train.submit import job_logs

    pending = ""
    for chunk in job_logs(client, job_id, follow=True):
        *lines, pending = (pending + chunk).split("\n")
        for line in out.split(lines):
            click.echo(line)
    for line in out.split([pending] if pending else []):
        click.echo(line)


def _storage(storage: str | None, config: str | None) -> str:
    if storage:
        return storage
    if config:
        from chatray.config import load_config

        return load_config(FinetuneConfig, config).run.storage_path
    return _DEFAULT_STORAGE


_storage_opts = [
    click.option("--storage", help=f"Storage holding the runs (default: from --config, else {_DEFAULT_STORAGE})."),
    click.option("--config", "-c", "config", type=click.Path(dir_okay=False),
                 help="Take the storage from this config."),
]


def _with(opts: list[Callable[..., Any]]) -> Callable[..., Any]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@train.command("status")
@click.argument("run")
@_with(_storage_opts)
@click.option("--address", help="Also show the run's latest Ray job on this cluster.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run: str, storage: str | None, config: str | None, address: str | None, as_json: bool) -> None:
    """Step, losses and the best checkpoint of RUN (a run name, or <storage>/<run>)."""
    from chatray.train.runs import format_status, run_status, run_uri_for

    st = run_status(run_uri_for(run, _storage(storage, config)))
    if address:
        from chatray.train.submit import job_client, latest_job

        job = latest_job(job_client(address), st["run_uri"].rstrip("/").rsplit("/", 1)[-1])
        st["job"] = {"id": job.submission_id, "status": str(job.status)} if job else None
    if as_json:
        click.echo(json.dumps(st, indent=1, default=str))
        return
    click.echo(format_status(st))
    if st.get("job"):
        click.echo(f"job         {st['job']['id']} {st['job']['status']}")


@train.command("logs")
@click.argument("run")
@_with(_storage_opts)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until interrupted (or the job ends).")
@click.option("--address", help="Print the Ray job's driver log from this cluster instead of the metrics log.")
def logs(run: str, storage: str | None, config: str | None, follow: bool, address: str | None) -> None:
    """Log of RUN: its Ray job's output (--address), or the metrics it logged to storage."""
    if address:
        from chatray.errors import ChatrayError
        from chatray.train.submit import job_client, job_logs, latest_job

        client = job_client(address)
        job = latest_job(client, run.rstrip("/").rsplit("/", 1)[-1])
        if job is None:
            raise ChatrayError(f"no Ray job for run {run!r} on {address}",
                               hint="see `chatray train list --address ...`")
        out = job_logs(client, job.submission_id, follow=follow)
        if isinstance(out, str):
            click.echo(out, nl=False)
        else:
            for chunk in out:
                click.echo(chunk, nl=False)
        return
    from chatray.train.runs import follow_metrics, format_metrics_line, run_uri_for

    for rec in follow_metrics(run_uri_for(run, _storage(storage, config)), follow=follow):
        click.echo(format_metrics_line(rec))


@train.command("list")
@_with(_storage_opts)
@click.option("--address", help="Also list chatray jobs on this Ray cluster.")
def list_(storage: str | None, config: str | None, address: str | None) -> None:
    """Runs in storage (and, with --address, chatray jobs on the cluster)."""
    from chatray.train.runs import format_runs, list_runs

    where = _storage(storage, config)
    click.echo(format_runs(list_runs(where)))
    if address:
        from chatray.train.submit import job_client

        jobs = [j for j in job_client(address).list_jobs() if (j.metadata or {}).get("chatray_run")]
        for j in sorted(jobs, key=lambda j: j.start_time or 0):
            click.echo(f"job {j.submission_id}  run {j.metadata['chatray_run']}  {j.status}")


@train.command("plot")
@click.argument("runs", nargs=-1, required=True)
@_with(_storage_opts)
@click.option("--out", "-o", default="curves.png", show_default=True, type=click.Path(dir_okay=False),
              help="The PNG to write.")
def plot(runs: tuple[str, ...], storage: str | None, config: str | None, out: str) -> None:
    """Draw the training curves of one or more RUNS (names or <storage>/<run>, local or s3://) into a PNG."""
    from chatray.train.curves import plot_runs
    from chatray.train.runs import run_uri_for

    where = _storage(storage, config)
    path = plot_runs([run_uri_for(r, where) for r in runs], out)
    click.echo(f"curves of {', '.join(runs)} written to {path}")
