"""Training curves: TensorBoard event files beside ``metrics.jsonl``, and PNG plots drawn from it.

:class:`TensorBoardLog` writes every record that :class:`~chatray.train.metrics.MetricsLog` logs as TensorBoard
scalars (loss, learning rate, grad norm, tokens/s, eval loss, perplexity) and the sample reply as text, into
``<storage>/<run>/`` itself, so ``tensorboard --logdir <storage>`` shows one curve per run on a local or NFS
folder. On S3 the events are written to a local folder and the file is copied up after each record (as
``metrics.jsonl`` is rewritten). A resumed run purges the events past its resume step, so a curve has no repeat.

:func:`plot_runs` draws the same curves from ``metrics.jsonl`` to a PNG (S3 runs, headless machines, and several
runs side by side): ``chatray train plot``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from chatray.errors import ChatrayError
from chatray.storage.uri import filesystem_for, is_remote, join

__all__ = ["SCALARS", "TensorBoardLog", "plot_runs"]

# metrics.jsonl key -> TensorBoard tag (and the PNG panel it goes to).
SCALARS: dict[str, str] = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "perplexity": "eval/perplexity",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
}
_SAMPLE_TAG = "eval/sample"
_LABELS = {"loss": "{run} train", "eval_loss": "{run} eval"}


class TensorBoardLog:
    """TensorBoard events of one run, written by rank 0 next to its ``metrics.jsonl``.

    Args:
        run_uri: ``<storage>/<run>`` (local, NFS or ``s3://``).
        purge_after: a resumed run's step; TensorBoard drops earlier events past it (0 for a fresh run: all).
    """

    def __init__(self, run_uri: str, purge_after: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_uri = run_uri
        self._remote = is_remote(run_uri)
        if self._remote:
            self._dir = Path(tempfile.mkdtemp(prefix="chatray-tb-"))
        else:
            self._dir = Path(filesystem_for(run_uri)[1])
            self._dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard discards events at steps >= this one from the run's older event files.
        self._writer = SummaryWriter(log_dir=str(self._dir), purge_step=purge_after + 1 if purge_after else 0)

    def add(self, record: dict[str, Any]) -> None:
        """Write one ``metrics.jsonl`` record (its ``step`` is the x axis) and make it visible to readers."""
        step = int(record.get("step", 0))
        for key, tag in SCALARS.items():
            v = record.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._writer.add_scalar(tag, v, step)
        if record.get("sample") is not None:
            self._writer.add_text(_SAMPLE_TAG, str(record["sample"]), step)
        self._writer.flush()
        if self._remote:
            self._upload()

    def _upload(self) -> None:
        from chatray.storage.uri import upload_dir

        upload_dir(self._dir, self.run_uri)

    def close(self) -> None:
        """Flush and close the writer (and drop the local copy of an S3 run's events)."""
        self._writer.close()
        if self._remote:
            self._upload()
            shutil.rmtree(self._dir, ignore_errors=True)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_runs(run_uris: list[str], out: str | Path) -> Path:
    """Draw the curves of one or more runs (from their ``metrics.jsonl``) into one PNG.

    Panels: train and eval loss, perplexity, learning rate, grad norm, tokens/s; one colour per run.

    Args:
        run_uris: ``<storage>/<run>`` folders or ``s3://`` prefixes.
        out: the PNG to write (its folder is created).

    Returns:
        The PNG's path.

    Raises:
        ChatrayError: a run without ``metrics.jsonl`` records (the message names it).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    from chatray.train.metrics import read_metrics

    runs = []
    for uri in run_uris:
        records = read_metrics(uri)
        if not records:
            raise ChatrayError(f"no training metrics in {join(uri, 'metrics.jsonl')}",
                               hint="give <storage>/<run> of a run that has logged at least one step")
        runs.append((uri.rstrip("/").rsplit("/", 1)[-1], records))
    panels = [("loss", ("loss", "eval_loss")), ("perplexity", ("perplexity",)), ("learning rate", ("lr",)),
              ("grad norm", ("grad_norm",)), ("tokens/s", ("tokens_per_s",))]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for i, (name, records) in enumerate(runs):
            for key in keys:
                steps, values = _series(records, key)
                if steps:
                    ax.plot(steps, values, color=f"C{i}", linestyle="--" if key == "eval_loss" else "-",
                            marker="o" if key in ("eval_loss", "perplexity") else None, markersize=3,
                            label=_LABELS.get(key, "{run}").format(run=name))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes.flat[-1].axis("off")
    fig.suptitle(", ".join(name for name, _ in runs))
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
