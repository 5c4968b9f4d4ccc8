"""A training checkpoint's own files, and resuming from them; on top of :mod:`chatray.storage`.

Next to the Hugging Face files (weights, configs, tokenizer) a training checkpoint holds:

* ``train_state.pt``: ``{"version", "trainer": optimizer + scheduler + step, "rng": one state per rank,
  "data": epoch, micro-batches consumed and the layout they count in, "tokens_seen"}``, in types
  ``torch.load(weights_only=True)`` accepts;
* ``train_config.json``: ``{"config": the run config, "plan": the RunPlan}``, what a rerun must match;
* ``metrics.json``: the metrics of the checkpoint's step and the file sizes (checked on discovery).

Resume: rank 0 picks the newest checkpoint of the run whose files are complete and whose ``train_state.pt``
loads (broken ones are skipped with a warning), and every rank restores optimizer, schedule, step, RNG and
data position from it. This one path serves both a rerun with the same run name and Ray Train's restart of
the worker group after a worker died.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.config import FinetuneConfig, from_dict, to_dict
from chatray.errors import ChatrayError
from chatray.storage.checkpoints import TRAIN_STATE_FILE, list_checkpoints
from chatray.storage.uri import filesystem_for, is_remote, join, read_text
from chatray.train.console import say, warn

if TYPE_CHECKING:
    from chatray.train.plan import RunPlan
    from chatray.train.step import TrainStep

__all__ = [
    "TRAIN_CONFIG_FILE",
    "TRAIN_STATE_VERSION",
    "DataLayout",
    "DataPosition",
    "Resume",
    "find_resume",
    "gather_rng_states",
    "read_saved_run",
    "read_train_state",
    "restore_train_state",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
]

TRAIN_STATE_VERSION = 1
TRAIN_CONFIG_FILE = "train_config.json"


@dataclass(frozen=True)
class DataLayout:
    """What a count of consumed micro-batches means: it only says where to continue under the same layout."""

    world_size: int
    packing: str
    micro_batch_size: int

    @classmethod
    def of(cls, cfg: FinetuneConfig, world_size: int) -> DataLayout:
        """The layout of a run of ``cfg`` on ``world_size`` workers."""
        return cls(world_size, cfg.data.packing, cfg.train.micro_batch_size)


@dataclass(frozen=True)
class DataPosition:
    """Where a worker's data stream stands."""

    epoch: int = 0
    micro_batches: int = 0  # micro-batch requests in this epoch (the same on every rank)
    tokens_seen: int = 0  # input positions of all ranks since the run began


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from and its loaded ``train_state.pt``."""

    uri: str
    state: dict[str, Any]


# ------------------------------------------------------------------------------------------------- RNG and ranks
def rng_state() -> dict[str, Any]:
    """Torch (CPU + CUDA) and Python RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import torch

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (collective: every rank calls it)."""
    import torch.distributed as dist

    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (collective: every rank calls it)."""
    import torch.distributed as dist

    if not _distributed():
        return [rng_state()]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, rng_state())
    return out


# ------------------------------------------------------------------------------------------------- saving
def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def write_checkpoint(folder: Path, *, step: TrainStep, tokenizer: Any, cfg: FinetuneConfig, plan: RunPlan,
                     rngs: list[dict[str, Any]], position: DataPosition, layout: DataLayout,
                     metrics: dict[str, Any]) -> None:
    """Write one training checkpoint into the empty local ``folder`` (rank 0; Ray Train uploads it).

    Args:
        step: the training step (its unwrapped model, optimizer, scheduler and step count are saved).
        tokenizer: saved with the weights, chat template included.
        cfg, plan: the run, saved to ``train_config.json``.
        rngs: :func:`gather_rng_states` of this step.
        position, layout: where every rank's data stream stands, and the layout that position counts in.
        metrics: the step's metrics for ``metrics.json`` (non-finite floats become null).
    """
    import torch

    from chatray.model import save_model

    save_model(step.raw_model, tokenizer, folder)
    data = {"epoch": position.epoch, "micro_batches": position.micro_batches, **dataclasses.asdict(layout)}
    torch.save({"version": TRAIN_STATE_VERSION, "trainer": step.state_dict(), "rng": rngs, "data": data,
                "tokens_seen": position.tokens_seen}, folder / TRAIN_STATE_FILE)
    (folder / TRAIN_CONFIG_FILE).write_text(json.dumps({"config": to_dict(cfg), "plan": dataclasses.asdict(plan)},
                                                       indent=1), encoding="utf-8")
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    info = {**{k: _finite(v) if isinstance(v, float) else v for k, v in metrics.items()}, "files": files}
    (folder / "metrics.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- reading
def read_train_state(checkpoint_uri: str) -> dict[str, Any]:
    """The ``train_state.pt`` of a checkpoint (local, NFS or ``s3://``), loaded with ``weights_only=True``.

    Raises:
        ValueError: an unknown ``version``; whatever ``torch.load`` raises for a truncated or corrupt file.
    """
    import torch

    fs, path = filesystem_for(join(checkpoint_uri, TRAIN_STATE_FILE))
    with fs.open_input_file(path) as f:
        # torch.load seeks between records; on an object store each seek is a request, so read it whole.
        src = io.BytesIO(f.read()) if is_remote(checkpoint_uri) else f
        state = torch.load(src, map_location="cpu", weights_only=True)
    if state.get("version") != TRAIN_STATE_VERSION or "trainer" not in state:
        raise ValueError(f"unknown train_state version {state.get('version')!r}")
    return state


def _config_from_saved(d: dict[str, Any]) -> FinetuneConfig:
    """A config saved in ``train_config.json`` (keys this version does not know are dropped)."""
    hints = typing.get_type_hints(FinetuneConfig)
    clean: dict[str, Any] = {}
    for f in dataclasses.fields(FinetuneConfig):
        if isinstance(d.get(f.name), dict):
            names = {g.name for g in dataclasses.fields(hints[f.name])}
            clean[f.name] = {k: v for k, v in d[f.name].items() if k in names}
    return from_dict(FinetuneConfig, clean, TRAIN_CONFIG_FILE)


def read_saved_run(checkpoint_uri: str) -> tuple[FinetuneConfig, dict[str, Any]] | None:
    """The run config and plan (as saved, a mapping) of a checkpoint; None without a readable ``train_config.json``.

    Raises:
        ConfigError: the saved config does not validate.
    """
    try:
        saved = json.loads(read_text(join(checkpoint_uri, TRAIN_CONFIG_FILE)))
    except (ChatrayError, ValueError):
        return None
    return _config_from_saved(saved["config"]), saved["plan"]


# ------------------------------------------------------------------------------------------------- resuming
def _choose_resume(run_uri: str) -> Resume | None:
    """Newest checkpoint with complete files and a loadable ``train_state.pt``."""
    for info in reversed(list_checkpoints(run_uri, require_train_state=True)):
        if not info.valid:
            warn(f"skipping checkpoint {info.uri}: {info.problem}")
            continue
        try:
            return Resume(info.uri, read_train_state(info.uri))
        except Exception as e:  # truncated/corrupt pickle, unknown format
            warn(f"skipping checkpoint {info.uri}: {TRAIN_STATE_FILE} unreadable ({str(e).splitlines()[0]})")
    return None


def find_resume(run_uri: str, *, enabled: bool, rank: int) -> Resume | None:
    """The checkpoint every rank continues from: rank 0 chooses, the others load the same one (collective).

    Args:
        run_uri: ``<storage>/<run>``.
        enabled: ``run.resume``; False starts over.
        rank: this worker's rank.
    """
    chosen = _choose_resume(run_uri) if rank == 0 and enabled else None
    uri = _broadcast(chosen.uri if chosen else None)
    if uri is None or chosen is not None:
        return chosen
    return Resume(uri, read_train_state(uri))


def restore_train_state(step: TrainStep, resume: Resume | None, *, layout: DataLayout, seed: int,
                        rank: int) -> DataPosition:
    """Seed a fresh run, or restore optimizer, schedule, step and RNG from ``resume`` into ``step``.

    The data position carries over only under the same layout (workers, packing, micro-batch size); otherwise
    the data restarts at the saved epoch with a seed derived from the step.

    Returns:
        Where this worker's data stream continues.
    """
    import torch

    if resume is None:
        torch.manual_seed(seed + rank)
        return DataPosition()
    state = resume.state
    step.load_state_dict(state["trainer"])
    data = state.get("data", {})
    epoch = int(data.get("epoch", 0))
    skip = 0
    saved_layout = DataLayout(data.get("world_size"), data.get("packing"), data.get("micro_batch_size"))
    if saved_layout == layout:
        skip = int(data.get("micro_batches", 0))
        set_rng_state(state["rng"][rank])
    else:
        torch.manual_seed(seed + 1000 * step.step + rank)
        if rank == 0:
            warn(f"workers/packing/micro-batch changed since the checkpoint: data restarts at epoch {epoch}")
    if rank == 0:
        say(f"resumed from {resume.uri} at step {step.step} (epoch {epoch}, micro-batch {skip})")
    return DataPosition(epoch, skip, int(state.get("tokens_seen", 0)))
