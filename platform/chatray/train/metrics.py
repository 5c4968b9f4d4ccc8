"""``<storage>/<run>/metrics.jsonl``: one JSON object per logged step, rewritten whole on every append (and the
same records as TensorBoard events beside it: :mod:`chatray.train.curves`).

Rewriting (instead of appending) works the same on a local disk, NFS and S3 (objects cannot be appended
to), keeps the file consistent after a restart (lines past the resumed checkpoint are dropped, so the
logged steps have no gap and no repeat) and costs little: a line per ``log_every`` steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from chatray.storage.uri import exists, filesystem_for, is_remote, join, read_text, write_text

__all__ = ["METRICS_JSONL", "MetricsLog", "read_metrics"]

METRICS_JSONL = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (empty when there is none); unreadable lines are skipped."""
    uri = join(run_uri, METRICS_JSONL)
    if not exists(uri):
        return []
    out = []
    for line in read_text(uri).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class MetricsLog:
    """The metrics file of one run, owned by rank 0.

    Args:
        run_uri: ``<storage>/<run>``.
        keep_until_step: existing lines with ``step`` above this are dropped (a resumed run redoes those steps);
            0 for a run that starts from scratch, which keeps none (not even an earlier attempt's step-0 eval).
    """

    def __init__(self, run_uri: str, keep_until_step: int = 0, *, tensorboard: bool = False) -> None:
        self.uri = join(run_uri, METRICS_JSONL)
        old = read_metrics(run_uri) if keep_until_step > 0 else []
        self.records = [r for r in old if int(r.get("step", 0)) <= keep_until_step]
        self._write()
        self._tb = None
        if tensorboard:
            from chatray.train.curves import TensorBoardLog

            self._tb = TensorBoardLog(run_uri, purge_after=keep_until_step)

    def append(self, record: dict[str, Any]) -> None:
        """Add one line and persist the file (and the TensorBoard events, when on)."""
        rec = {k: _clean(v) for k, v in record.items()}
        self.records.append(rec)
        self._write()
        if self._tb is not None:
            self._tb.add(rec)

    def close(self) -> None:
        """Close the TensorBoard writer, if any (the JSONL file is always complete)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write(self) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        if is_remote(self.uri):
            write_text(self.uri, text)
            return
        _, path = filesystem_for(self.uri)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)  # readers (status, progress bar) never see half a file
