"""Driver side of a fine-tuning run: checks, ``build_trainer(cfg) -> TorchTrainer``, ``run_training(cfg)``.

Everything a user can get wrong is checked here, before any worker starts, so that it surfaces as one clear
line: missing dataset, model/dataset tokenizer mismatch, block size over the model's context, storage that
cannot be written, and a rerun whose config cannot continue the existing checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.config import FinetuneConfig, to_dict
from chatray.errors import ChatrayError
from chatray.storage.uri import filesystem_for, is_remote, join, read_text, write_text

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

__all__ = ["absolute_paths", "build_trainer", "plan_run", "run_training"]

def _worker_env() -> dict[str, str]:
    """The forwarded variables that Ray workers do not already see with the same value.

    Asking a worker first keeps the runtime environment empty in the common case, so Ray can hand the
    Train workers already-started processes instead of launching new ones (seconds each).
    """
    import ray

    from chatray.rayenv import forwarded_env

    wanted = forwarded_env()

    @ray.remote(num_cpus=0)
    def _seen(keys: list[str]) -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in keys}

    try:
        seen = ray.get(_seen.remote(sorted(wanted)), timeout=60)
    except Exception:  # no answer in time: forward everything, as before
        return wanted
    return {k: v for k, v in wanted.items() if seen.get(k) != v}


def _abs(uri: str) -> str:
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with local data/storage paths made absolute (workers run in other directories)."""
    return replace(cfg, data=replace(cfg.data, path=_abs(cfg.data.path)),
                   run=replace(cfg.run, storage_path=_abs(cfg.run.storage_path)))


def _check_writable(storage: str, run_uri: str) -> None:
    probe = join(run_uri, f".chatray-write-test-{os.getpid()}")
    try:
        write_text(probe, "ok")
        fs, path = filesystem_for(probe)
        fs.delete_file(path)
    except ChatrayError:
        raise
    except Exception as e:  # PermissionError, OSError from S3 (no bucket, access denied), read-only FS
        raise ChatrayError(f"storage {storage} is not writable: {str(e).splitlines()[0]}",
                           hint="set run.storage_path (--storage) to a folder or s3:// bucket you can write to") from e


_CACHE_TOKENS = 20_000_000  # ~160 MB of packed int32 ids + labels in the object store

_COMPAT_KEYS = ("model", "n_layer", "n_head", "n_embd", "block_size", "tokenizer_fingerprint")


def _compat(cfg: FinetuneConfig, plan: dict[str, Any]) -> dict[str, Any]:
    m = cfg.model
    return {"model": m.name, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
            "block_size": plan["block_size"], "tokenizer_fingerprint": plan["fingerprint"]}


def _set_aside(run_uri: str) -> None:
    """``run.resume: false`` on an existing run: move its folder aside (never delete or overwrite checkpoints)."""
    from chatray.storage.uri import exists

    if not exists(run_uri):
        return
    if is_remote(run_uri):
        raise ChatrayError(f"run {run_uri} exists and run.resume is false; chatray does not move object-store runs",
                           hint="pick a new run name (--name), or delete the old run yourself")
    _, path = filesystem_for(run_uri)
    aside = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(path, aside)
    print(f"[chatray train] run.resume is false: moved the existing run to {aside}", file=sys.stderr, flush=True)


def _check_ray_snapshot(run_uri: str) -> None:
    """Ray Train restores a run from ``checkpoint_manager_snapshot.json``; catch what would make it fail."""
    from chatray.storage.uri import exists

    snap_uri = join(run_uri, "checkpoint_manager_snapshot.json")
    if not exists(snap_uri):
        return
    import ray
    try:
        snap = json.loads(read_text(snap_uri))
    except ValueError as e:
        raise ChatrayError(f"{snap_uri} is corrupt ({e})", hint="use a new run name (--name)") from e
    if snap.get("ray_version") not in (None, ray.__version__):
        raise ChatrayError(f"run {run_uri} was written by Ray {snap.get('ray_version')}, this is Ray {ray.__version__};"
                           " Ray Train cannot resume it", hint="use the same Ray version, or a new run name (--name)")
    for r in snap.get("checkpoint_results", []):
        name = r.get("checkpoint_dir_name")
        if name and not exists(join(run_uri, name)):
            raise ChatrayError(f"run {run_uri}: Ray's checkpoint list names {name}, which no longer exists",
                               hint="restore that folder, or use a new run name (--name)")


def _check_resume(cfg: FinetuneConfig, plan: dict[str, Any]) -> int:
    """Step of the checkpoint a rerun would continue from (0: fresh); errors when it cannot continue."""
    from chatray.storage.checkpoints import latest_checkpoint

    _check_ray_snapshot(plan["run_uri"])
    latest = latest_checkpoint(plan["run_uri"], require_train_state=True)
    if latest is None:
        return 0
    try:
        saved = json.loads(read_text(join(latest.uri, "train_config.json")))
    except (ChatrayError, ValueError):
        return latest.step  # written by another tool: trust it
    old = _compat(from_saved(saved["config"]), saved["plan"])
    new = _compat(cfg, plan)
    diffs = [f"{k} was {old[k]!r}, now {new[k]!r}" for k in _COMPAT_KEYS if old[k] != new[k]]
    if diffs:
        raise ChatrayError(f"cannot resume run {plan['run_uri']} from step {latest.step}: {'; '.join(diffs)}",
                           hint="use a new run name (--name) to start over with this config")
    return latest.step


def from_saved(d: dict[str, Any]) -> FinetuneConfig:
    """A config saved in a checkpoint's ``train_config.json`` (keys this version does not know are dropped)."""
    import dataclasses
    import typing

    from chatray.config import from_dict

    hints = typing.get_type_hints(FinetuneConfig)
    clean: dict[str, Any] = {}
    for f in dataclasses.fields(FinetuneConfig):
        if isinstance(d.get(f.name), dict):
            names = {g.name for g in dataclasses.fields(hints[f.name])}
            clean[f.name] = {k: v for k, v in d[f.name].items() if k in names}
    return from_dict(FinetuneConfig, clean, "train_config.json")


def plan_run(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Any]]:
    """Check a run before launching it and resolve what every worker needs to agree on.

    Returns:
        (cfg with absolute local paths, plan) where the plan holds ``run_uri``, ``block_size``, ``pad_id``,
        ``eos_id``, ``vocab_size``, ``fingerprint``, ``grad_accum``, ``eval_rows``, ``train_rows``, ``start_step``.

    Raises:
        ChatrayError: any of the problems listed in the module docstring.
    """
    from chatray.data.dataset import load_tokenizer, read_manifest
    from chatray.model import is_tiny, model_context_length, model_tokenizer_fingerprint

    cfg = absolute_paths(cfg)
    manifest = read_manifest(cfg.data.path)
    tok_info = manifest["tokenizer"]
    max_len = int(manifest["max_length"])
    block_size = cfg.data.block_size or max_len
    name = cfg.model.name
    if not is_tiny(name):
        ctx = model_context_length(name)
        if ctx is not None and block_size > ctx:
            raise ChatrayError(f"block size {block_size} exceeds the context of model {name!r} ({ctx} tokens)",
                               hint=f"set data.block_size <= {ctx} (the dataset's rows are {max_len} tokens)")
        theirs = model_tokenizer_fingerprint(name)
        if theirs != tok_info["fingerprint"]:
            raise ChatrayError(f"dataset {cfg.data.path} was tokenized with {tok_info.get('source')!r} "
                               f"({tok_info['fingerprint']}) but model {name!r} uses a different tokenizer "
                               f"({theirs})", hint=f"prepare the data with --tokenizer {name}, or use model.name: tiny")
    elif any(v is not None for v in (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd)):
        from chatray.model.presets import TINY

        n_head = cfg.model.n_head or TINY.n_head
        n_embd = cfg.model.n_embd or TINY.n_embd
        if n_embd % n_head:
            raise ChatrayError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")
    tok = load_tokenizer(cfg.data.path)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok_info["eos_token_id"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    run_uri = join(cfg.run.storage_path, cfg.run.name)
    plan: dict[str, Any] = {
        "run_uri": run_uri, "block_size": block_size, "pad_id": int(pad), "eos_id": int(eos),
        "vocab_size": len(tok), "fingerprint": tok_info["fingerprint"], "grad_accum": cfg.grad_accum,
        "eval_rows": int(manifest["splits"].get("eval", {}).get("rows", 0)),
        "train_rows": int(manifest["splits"]["train"]["rows"]),
        "train_tokens": int(manifest["splits"]["train"].get("tokens", 0)),
    }
    if plan["train_rows"] == 0:
        raise ChatrayError(f"dataset {cfg.data.path} has no training rows")
    if not cfg.run.resume:
        _set_aside(run_uri)
    _check_writable(cfg.run.storage_path, run_uri)
    plan["start_step"] = _check_resume(cfg, plan)
    return cfg, plan


def _cpus_per_worker(cfg: FinetuneConfig) -> float:
    """CPUs to reserve per worker, leaving one for Ray Data on small CPU-only clusters (else reads starve)."""
    import ray

    want = cfg.scaling.cpus_per_worker
    if cfg.scaling.use_gpu or not ray.is_initialized():
        return want
    total = float(ray.cluster_resources().get("CPU", 0))
    n = cfg.scaling.num_workers
    if total and n * want > total - 1:
        fit = max(round((total - 1) / n, 2), 0.1) if total > 1 else round(total / (n + 1), 2)
        if fit < want:
            print(f"[chatray train] note: the cluster has {total:g} CPUs; reserving {fit:g} per worker "
                  f"(not {want:g}) so that Ray Data can read", file=sys.stderr, flush=True)
            return fit
    return want


def build_trainer(cfg: FinetuneConfig, plan: dict[str, Any] | None = None) -> TorchTrainer:
    """The Ray Train ``TorchTrainer`` for a run (checks it first unless ``plan`` is given).

    Workers run :func:`chatray.train.loop.train_loop_per_worker`; the train split is a Ray Dataset split
    across workers without dropping rows; checkpoints go to ``<storage_path>/<name>/checkpoint_<step>``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from chatray.storage.uri import s3_filesystem
    from chatray.train.batches import make_train_dataset
    from chatray.train.loop import train_loop_per_worker
    from chatray.train.splits import ExactSplitDataConfig

    if plan is None:
        cfg, plan = plan_run(cfg)
    from chatray.rayenv import connect, forwarded_env

    connect(env_vars=None if os.environ.get("RAY_ADDRESS") else forwarded_env())
    resources: dict[str, float] = {"CPU": _cpus_per_worker(cfg)}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    storage = cfg.run.storage_path
    fs = None
    if storage.startswith("s3://"):
        fs, storage = s3_filesystem(), storage[len("s3://"):]
    cache = cfg.data.cache if cfg.data.cache is not None else plan["train_tokens"] < _CACHE_TOKENS
    ds = make_train_dataset(cfg.data.path, packing=cfg.data.packing, block_size=plan["block_size"],
                            pad_id=plan["pad_id"], pack_rows_per_batch=cfg.data.pack_rows,
                            rows_per_block=cfg.train.micro_batch_size * plan["grad_accum"], in_memory=cache)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                                         checkpoint_score_attribute="eval_loss",
                                                         checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": env} if (env := _worker_env()) else None),
        datasets={"train": ds},
        dataset_config=ExactSplitDataConfig(),
    )


class _Progress:
    """A progress bar on the driver, fed by polling ``metrics.jsonl`` (only when stderr is a terminal)."""

    def __init__(self, run_uri: str, start: int, total: int, enabled: bool) -> None:
        self.run_uri, self.start, self.total, self.enabled = run_uri, start, total, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        from tqdm import tqdm

        from chatray.train.metrics import read_metrics

        bar = tqdm(total=self.total, initial=self.start, desc="train", unit="step", dynamic_ncols=True)
        while not self._stop.wait(2.0):
            try:
                recs = read_metrics(self.run_uri)
            except Exception:  # storage hiccup: try again next tick
                continue
            if recs:
                r = recs[-1]
                bar.n = int(r.get("step", bar.n))
                bar.set_postfix(loss=f"{r.get('loss') or float('nan'):.3f}", tok_s=f"{r.get('tokens_per_s') or 0:,.0f}")
                bar.refresh()
        bar.close()


def run_training(cfg: FinetuneConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Check, launch and wait for a fine-tuning run on the current Ray cluster (``RAY_ADDRESS``) or a local one.

    Args:
        cfg: the run.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        ``run_uri``, ``step``, ``latest`` and ``best`` checkpoint URIs, last ``loss`` and ``eval_loss``.

    Raises:
        ChatrayError: bad input (see :func:`plan_run`) or a run that failed after its retries.
    """
    from chatray.storage.checkpoints import best_checkpoint, latest_checkpoint
    from chatray.train.metrics import read_metrics

    cfg, plan = plan_run(cfg)
    run_uri = plan["run_uri"]
    if plan["start_step"]:
        print(f"[chatray train] run {cfg.run.name} has a checkpoint at step {plan['start_step']}: resuming",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, plan)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with _Progress(run_uri, plan["start_step"], cfg.train.max_steps, show):
            trainer.fit()
    except Exception as e:
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        cause = str(e).strip().splitlines()
        detail = next((ln for ln in reversed(cause) if ln.strip() and not ln.startswith(" ")), type(e).__name__)
        raise ChatrayError(f"training run {cfg.run.name} failed: {detail[:300]}",
                           hint="the worker traceback is above; rerun the same command to resume from the "
                           "latest checkpoint") from e
    latest = latest_checkpoint(run_uri)
    best = best_checkpoint(run_uri)
    recs = read_metrics(run_uri)
    last = recs[-1] if recs else {}
    evals = [r for r in recs if r.get("eval_loss") is not None]
    return {"run_uri": run_uri, "step": last.get("step", plan["start_step"]), "loss": last.get("loss"),
            "eval_loss": evals[-1]["eval_loss"] if evals else None, "latest": latest.uri if latest else None,
            "best": best.uri if best else None, "seconds": round(time.perf_counter() - t0, 1)}
