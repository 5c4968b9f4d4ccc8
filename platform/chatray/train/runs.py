"""What is in storage: runs, their progress, losses and checkpoints (``chatray train status|list|logs``).

Everything here reads ``<storage>/<run>/metrics.jsonl`` and the checkpoint folders, so it works the same for
a run on this machine, on a cluster with NFS, or with checkpoints in S3, and needs no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from chatray.errors import ChatrayError
from chatray.storage.checkpoints import best_checkpoint, latest_checkpoint, list_checkpoints, split_selector
from chatray.storage.uri import exists, filesystem_for, is_remote, join

__all__ = ["follow_metrics", "format_metrics_line", "format_runs", "format_status", "list_runs", "run_status",
           "run_uri_for"]


def run_uri_for(run: str, storage: str) -> str:
    """``RUN`` as given on the command line -> ``<storage>/<run>`` (a path or URI with ``/`` is used as is)."""
    run, _ = split_selector(run)
    if "/" in run or is_remote(run):
        return run
    return join(storage, run)


def run_status(run_uri: str) -> dict[str, Any]:
    """Progress of a run: last step and losses, best/latest checkpoint, broken checkpoints.

    Raises:
        ChatrayError: when there is no run at ``run_uri``.
    """
    from chatray.train.metrics import read_metrics

    if not exists(run_uri):
        raise ChatrayError(f"no run at {run_uri}", hint="see `chatray train list --storage ...`")
    recs = read_metrics(run_uri)
    ckpts = list_checkpoints(run_uri)
    latest = latest_checkpoint(run_uri)
    best = best_checkpoint(run_uri)
    last = recs[-1] if recs else {}
    evals = [r for r in recs if r.get("eval_loss") is not None]
    return {
        "run_uri": run_uri,
        "step": last.get("step", latest.step if latest else 0),
        "loss": last.get("loss"),
        "lr": last.get("lr"),
        "tokens_per_s": last.get("tokens_per_s"),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "perplexity": evals[-1].get("perplexity") if evals else None,
        "sample": evals[-1].get("sample") if evals else None,
        "latest": latest.uri if latest else None,
        "latest_step": latest.step if latest else None,
        "best": best.uri if best else None,
        "best_eval_loss": best.eval_loss if best else None,
        "checkpoints": [{"uri": c.uri, "step": c.step, "eval_loss": c.eval_loss, "problem": c.problem} for c in ckpts],
    }


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_status(st: dict[str, Any]) -> str:
    """Human-readable :func:`run_status`."""
    lines = [
        f"run         {st['run_uri']}",
        f"step        {st['step']}",
        f"train loss  {_fmt(st['loss'])}    lr {_fmt(st['lr'], '.2e')}    tokens/s {_fmt(st['tokens_per_s'], ',.0f')}",
        f"eval loss   {_fmt(st['eval_loss'])}    perplexity {_fmt(st['perplexity'], '.2f')}",
        f"latest      {st['latest'] or '-'}",
        f"best        {st['best'] or '-'}" + (f"  (eval_loss {st['best_eval_loss']:.4f})"
                                              if st.get("best_eval_loss") is not None else ""),
    ]
    if st.get("sample") is not None:
        lines.append(f"sample      {st['sample']!r}")
    broken = [c for c in st["checkpoints"] if c["problem"]]
    for c in broken:
        lines.append(f"broken      {c['uri']}: {c['problem']}")
    return "\n".join(lines)


def list_runs(storage: str) -> list[dict[str, Any]]:
    """Runs under ``storage`` (folders with ``metrics.jsonl`` or checkpoints), newest activity first."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(storage)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise ChatrayError(f"cannot list {storage}: {e}") from e
    out = []
    for e in entries:
        if e.type != pafs.FileType.Directory or e.base_name.startswith("."):
            continue
        uri = join(storage, e.base_name)
        sub = fs.get_file_info(pafs.FileSelector(e.path, allow_not_found=True))
        names = {s.base_name for s in sub}
        if "metrics.jsonl" not in names and not any(n.startswith("checkpoint_") for n in names):
            continue
        mtime = max((s.mtime.timestamp() for s in sub if s.mtime is not None), default=0.0)
        st = run_status(uri)
        out.append({"name": e.base_name, "run_uri": uri, "step": st["step"], "loss": st["loss"],
                    "eval_loss": st["eval_loss"], "best": st["best"], "updated": mtime})
    return sorted(out, key=lambda r: -r["updated"])


def format_runs(runs: list[dict[str, Any]]) -> str:
    """A table of :func:`list_runs`."""
    if not runs:
        return "no runs"
    rows = [("RUN", "STEP", "LOSS", "EVAL", "UPDATED")]
    for r in runs:
        rows.append((r["name"], str(r["step"]), _fmt(r["loss"]), _fmt(r["eval_loss"]),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"])) if r["updated"] else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def format_metrics_line(r: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` record as the log line the workers print."""
    line = (f"step {r.get('step')} | loss {_fmt(r.get('loss'))} | lr {_fmt(r.get('lr'), '.2e')} | "
            f"{_fmt(r.get('tokens_per_s'), ',.0f')} tok/s")
    if r.get("eval_loss") is not None:
        line += f" | eval_loss {_fmt(r.get('eval_loss'))} | ppl {_fmt(r.get('perplexity'), '.2f')}"
    if r.get("sample") is not None:
        line += f" | sample {r['sample']!r}"
    return line


def follow_metrics(run_uri: str, *, follow: bool = False, poll_s: float = 2.0,
                   stop_at_step: int | None = None) -> Iterator[dict[str, Any]]:
    """The run's metric records; with ``follow``, keep polling for new ones (until ``stop_at_step``)."""
    from chatray.train.metrics import read_metrics

    seen = 0
    while True:
        recs = read_metrics(run_uri)
        if len(recs) < seen:  # the run restarted from a checkpoint and rewound its log
            seen = 0
        yield from recs[seen:]
        seen = len(recs)
        if not follow or (stop_at_step is not None and recs and recs[-1].get("step", 0) >= stop_at_step):
            return
        time.sleep(poll_s)
