"""How the train split is divided between Ray Train workers: every row to exactly one worker, in order.

Ray Train's default ``DataConfig`` uses ``streaming_split(n, equal=True)``, which drops up to ``n - 1`` rows
per epoch to make the splits equal. Here whole blocks go to the worker that has received the fewest rows
so far, so with the equal-sized blocks of :func:`chatray.train.batches.make_train_dataset` the shares differ
by at most one block; the training step copes (a worker whose share ran out joins the gradient
all-reduce with an empty batch until every worker is done), so nothing is lost. Order is preserved and
locality hints are off, so a worker's share of an epoch is the same on a rerun: resuming can skip exactly
the micro-batches consumed before the checkpoint.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig

__all__ = ["ExactSplitDataConfig"]


class ExactSplitDataConfig(DataConfig):
    """``DataConfig`` that splits with ``equal=False`` and ``preserve_order=True``."""

    def __init__(self) -> None:
        super().__init__(datasets_to_split="all", enable_shard_locality=False)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            opts = self._resolve_execution_options(name)
            opts.preserve_order = True
            ds.context.execution_options = opts
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output
