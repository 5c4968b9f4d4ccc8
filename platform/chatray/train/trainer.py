"""Driver side of a fine-tuning run: ``build_trainer(cfg) -> TorchTrainer`` and ``run_training(cfg)``.

The checks before a run and the facts its workers share are :mod:`chatray.train.plan`'s job.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chatray.config import FinetuneConfig
from chatray.errors import ChatrayError
from chatray.train.console import note, warn
from chatray.train.plan import RunPlan, plan_run

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

__all__ = ["build_trainer", "run_training", "scaling_config"]


def _worker_env(explicit: Sequence[str] = ()) -> dict[str, str]:
    """The forwarded variables (non-secret settings plus ``explicit``) that Ray workers do not already see with
    the same value.

    Asking a worker first keeps the runtime environment empty in the common case, so Ray can hand the
    Train workers already-started processes instead of launching new ones (seconds each).
    """
    import ray

    from chatray.rayenv import forwarded_env

    wanted = forwarded_env(explicit)

    @ray.remote(num_cpus=0)
    def _seen(keys: list[str]) -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in keys}

    try:
        seen = ray.get(_seen.remote(sorted(wanted)), timeout=60)
    except Exception:  # no answer in time: forward everything
        return wanted
    return {k: v for k, v in wanted.items() if seen.get(k) != v}


_CACHE_TOKENS = 20_000_000  # ~160 MB of packed int32 ids + labels in the object store


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
            note(f"note: the cluster has {total:g} CPUs; reserving {fit:g} per worker (not {want:g}) so that Ray "
                 "Data can read")
            return fit
    return want


def scaling_config(cfg: FinetuneConfig, resources: dict[str, float]) -> Any:
    """Ray Train's ``ScalingConfig`` for ``cfg``: a fixed group of ``num_workers``, or an elastic one,
    ``num_workers=(min_workers, num_workers)``, placed by ``placement_strategy``.

    Args:
        cfg: the run.
        resources: CPU/GPU per worker; ``cfg.scaling.resources_per_worker`` (custom resources) is added to it.

    Returns:
        A ``ray.train.ScalingConfig``.
    """
    import ray.train

    sc = cfg.scaling
    workers: int | tuple[int, int] = sc.num_workers if sc.min_workers is None else (sc.min_workers, sc.num_workers)
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=sc.use_gpu, placement_strategy=sc.placement_strategy,
                                   resources_per_worker={**resources, **sc.resources_per_worker})


def build_trainer(cfg: FinetuneConfig, plan: RunPlan | None = None, *,
                  forward_env: Sequence[str] = ()) -> TorchTrainer:
    """The Ray Train ``TorchTrainer`` for a run (checks it first unless ``plan`` is given).

    Workers run :func:`chatray.train.loop.train_loop_per_worker`; the train split is a Ray Dataset split
    across workers without dropping rows; checkpoints go to ``<storage_path>/<name>/checkpoint_<step>``.
    Workers get this process's non-secret settings (:func:`chatray.rayenv.forwarded_env`) and the variables
    named in ``forward_env``; credentials otherwise come from the nodes' own environment.

    Raises:
        ChatrayError: a name in ``forward_env`` that is not set here.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from chatray.rayenv import connect, forwarded_env
    from chatray.storage.uri import s3_filesystem
    from chatray.train.batches import make_train_dataset
    from chatray.train.loop import train_loop_per_worker
    from chatray.train.splits import ExactSplitDataConfig

    if plan is None:
        cfg, plan = plan_run(cfg)
    connect(env_vars=None if os.environ.get("RAY_ADDRESS") else forwarded_env(forward_env))
    resources: dict[str, float] = {"CPU": _cpus_per_worker(cfg)}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    storage = cfg.run.storage_path
    fs = None
    if storage.startswith("s3://"):
        fs, storage = s3_filesystem(), storage[len("s3://"):]
    cache = cfg.data.cache if cfg.data.cache is not None else plan.train_tokens < _CACHE_TOKENS
    ds = make_train_dataset(cfg.data.path, packing=cfg.data.packing, block_size=plan.block_size, pad_id=plan.pad_id,
                            pack_rows_per_batch=cfg.data.pack_rows,
                            rows_per_block=cfg.train.micro_batch_size * plan.grad_accum, in_memory=cache)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.loop_config(cfg),
        scaling_config=scaling_config(cfg, resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                                         checkpoint_score_attribute="eval_loss",
                                                         checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": env} if (env := _worker_env(forward_env)) else None),
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


def run_training(cfg: FinetuneConfig, *, progress: bool | None = None,
                 forward_env: Sequence[str] = ()) -> dict[str, Any]:
    """Check, launch and wait for a fine-tuning run on the current Ray cluster (``RAY_ADDRESS``) or a local one.

    Args:
        cfg: the run.
        progress: show a progress bar (default: when stderr is a terminal).
        forward_env: variable names whose values the workers get too (``--env``), each with a warning line:
            they become part of the job's runtime environment.

    Returns:
        ``run_uri``, ``step``, ``latest`` and ``best`` checkpoint URIs, last ``loss`` and ``eval_loss``.

    Raises:
        ChatrayError: bad input (see :func:`plan_run`), an unset ``forward_env`` name, or a run that failed after
            its retries.
    """
    from chatray.rayenv import forward_warning, forwarded_env
    from chatray.storage.checkpoints import best_checkpoint, latest_checkpoint
    from chatray.train.metrics import read_metrics

    forwarded_env(forward_env)  # an unset name fails here, before any work
    for name in forward_env:
        warn(forward_warning(name))
    cfg, plan = plan_run(cfg)
    run_uri = plan.run_uri
    if plan.start_step:
        note(f"run {cfg.run.name} has a checkpoint at step {plan.start_step}: resuming")
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, plan, forward_env=forward_env)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with _Progress(run_uri, plan.start_step, cfg.train.max_steps, show):
            trainer.fit()
    except Exception as e:
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        cause = str(e).strip().splitlines()
        detail = next((ln for ln in reversed(cause) if ln.strip() and not ln.startswith(" ")), type(e).__name__)
        raise ChatrayError(f"training run {cfg.run.name} ({run_uri}) failed: {detail[:300]}",
                           hint="the worker traceback is above; rerun the same command to resume from the "
                           "latest checkpoint") from e
    latest = latest_checkpoint(run_uri)
    best = best_checkpoint(run_uri)
    recs = read_metrics(run_uri)
    last = recs[-1] if recs else {}
    evals = [r for r in recs if r.get("eval_loss") is not None]
    return {"run_uri": run_uri, "step": last.get("step", plan.start_step), "loss": last.get("loss"),
            "eval_loss": evals[-1]["eval_loss"] if evals else None, "latest": latest.uri if latest else None,
            "best": best.uri if best else None, "seconds": round(time.perf_counter() - t0, 1)}
