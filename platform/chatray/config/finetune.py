"""The fine-tuning run config (``chatray train``, ``jobs/finetune_*.yaml``): one section per concern.

Each field's default and help text live here only; the training code derives its settings from these
sections (e.g. :meth:`chatray.train.step.StepConfig.from_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from chatray.config.loading import opt

__all__ = [
    "CheckpointSection",
    "DataSection",
    "EvalSection",
    "FinetuneConfig",
    "ModelSection",
    "RunSection",
    "ScalingSection",
    "TrainSection",
]


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def _too_low(obj: Any, nullable: bool = False, **minimums: float) -> list[str]:
    """``KEY must be >= MIN`` for each field of ``obj`` below its minimum; an unset (None) field passes.

    Args:
        nullable: the fields may be null, and the message says so.
    """
    return [f"{key} must be >= {low}{' or null' if nullable else ''}, got {getattr(obj, key)}"
            for key, low in minimums.items() if getattr(obj, key) is not None and getattr(obj, key) < low]


@dataclasses.dataclass
class DataSection:
    """Where the prepared dataset is and how rows become training sequences."""

    path: str = opt(".demo/data", "prepared dataset folder or s3:// prefix (made by `chatray data prepare`)")
    packing: Literal["pack", "pad"] = opt(
        "pack", "pack: concatenate rows into full blocks (no padding); pad: one row per sequence, padded")
    block_size: int | None = opt(None, "tokens per training sequence (default: the dataset's max_length)")
    pack_rows: int = opt(1024, "rows packed together per Ray Data batch (only the tail block of each is padded)")
    cache: bool | None = opt(None, "read + pack the train split once into Ray's object store instead of streaming "
                             "it each epoch (default: when the split has under 20M tokens)")

    def __post_init__(self) -> None:
        problems = []
        if not self.path:
            problems.append("path must name a prepared dataset")
        _raise_problems(problems + _too_low(self, block_size=8, pack_rows=1))


@dataclasses.dataclass
class ModelSection:
    """Which model to fine-tune."""

    name: str = opt("tiny", "tiny (random init, dataset tokenizer), gpt2, gpt2-medium, a hub id or a local folder")
    n_layer: int | None = opt(None, "tiny only: transformer layers (preset: 4)")
    n_head: int | None = opt(None, "tiny only: attention heads (preset: 4)")
    n_embd: int | None = opt(None, "tiny only: hidden size (preset: 256)")
    dropout: float | None = opt(None, "dropout probability (default: 0.0 for tiny, the checkpoint's own otherwise)")
    compile: bool = opt(False, "torch.compile the model (faster steps on GPU after a one-off compile)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    pad_vocab_multiple: int | Literal["auto"] = opt(
        "auto", "train with the vocabulary padded to a multiple of this (faster GPU matmuls; checkpoints keep the "
        "tokenizer's size); auto: 128 on GPU, 1 (none) on CPU")

    def __post_init__(self) -> None:
        problems = []
        if not self.name:
            problems.append("name must be a preset, hub id or folder")
        if self.pad_vocab_multiple != "auto":
            problems += _too_low(self, pad_vocab_multiple=1)
        problems += _too_low(self, n_layer=1, n_head=1, n_embd=1)
        if self.n_embd and self.n_head and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        _raise_problems(problems)


@dataclasses.dataclass
class TrainSection:
    """Optimisation: steps, batch, AdamW, schedule, precision."""

    max_steps: int = opt(200, "optimizer steps in total (a resumed run continues up to this)")
    micro_batch_size: int = opt(8, "sequences per worker per forward/backward pass")
    global_batch_size: int | None = opt(
        None, "sequences per optimizer step over all workers; sets grad_accum (default: micro x accum x workers)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step (ignored when global_batch_size is set)")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_steps: int = opt(10, "linear warm-up steps before the cosine decay")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only; biases and norms get none)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    seed: int = opt(0, "seed for weights, dropout and data (same seed + config = same run)")
    log_every: int = opt(10, "log loss, lr and tokens/s every N steps")

    def __post_init__(self) -> None:
        problems = _too_low(self, max_steps=1, micro_batch_size=1, global_batch_size=1, grad_accum=1)
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        problems += _too_low(self, warmup_steps=0, weight_decay=0)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                problems.append(f"{key} must be in [0, 1), got {getattr(self, key)}")
        _raise_problems(problems + _too_low(self, grad_clip=0, log_every=1))


@dataclasses.dataclass
class ScalingSection:
    """How many Ray Train workers and what each one gets."""

    num_workers: int = opt(1, "Ray Train workers (data-parallel replicas); the most workers when min_workers is set")
    min_workers: int | None = opt(None, "elastic: after a lost node, go on with as few as this many workers instead "
                                  "of waiting for num_workers (Ray Train's num_workers=(min, max)); null = fixed")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt(
        "PACK", "where the workers go: PACK fills a node first, SPREAD prefers different nodes, STRICT_SPREAD "
        "requires one node per worker (a restart then waits for enough nodes)")
    resources_per_worker: dict[str, float] = opt(
        {}, "custom Ray resources each worker needs besides its CPU/GPU, e.g. {trainer_slot: 1} to pin workers to "
        "the nodes that offer it")
    use_gpu: bool = opt(False, "give each worker one GPU (bf16 autocast); otherwise train on CPU in fp32")
    cpus_per_worker: float = opt(1.0, "logical CPUs reserved per worker (leave some for Ray Data)")
    torch_threads: int | None = opt(None, "torch CPU threads per worker (default: cpus_per_worker, at least 1)")

    def __post_init__(self) -> None:
        problems = _too_low(self, num_workers=1, min_workers=1)
        if self.min_workers is not None and self.min_workers > self.num_workers:
            problems.append(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        for key in ("CPU", "GPU"):
            if key in self.resources_per_worker:
                problems.append(f"resources_per_worker.{key}: set cpus_per_worker / use_gpu instead")
        problems += [f"resources_per_worker.{k} must be > 0, got {v}" for k, v in self.resources_per_worker.items()
                     if not v > 0]
        if not self.cpus_per_worker > 0:
            problems.append(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        _raise_problems(problems + _too_low(self, torch_threads=1))


@dataclasses.dataclass
class RunSection:
    """Where checkpoints go and how failures are handled."""

    name: str = opt("tiny-demo", "run name: checkpoints go to <storage_path>/<name>; rerunning a name resumes it")
    storage_path: str = opt(".demo/checkpoints", "shared storage: a local/NFS folder or s3://bucket/prefix")
    max_failures: int = opt(2, "worker-group restarts from the latest checkpoint before the run fails (-1 = no limit)")
    resume: bool = opt(True, "continue from the run's latest valid checkpoint; false starts over (a local run "
                       "folder is moved aside to <name>.replaced-<time>, never deleted)")

    def __post_init__(self) -> None:
        problems = []
        if not self.name or "/" in self.name or self.name.startswith(".") or ":" in self.name:
            problems.append(f"name must be a plain folder name (no '/', ':' or leading '.'), got {self.name!r}")
        if not self.storage_path:
            problems.append("storage_path must be a folder or s3:// URI")
        _raise_problems(problems + _too_low(self, max_failures=-1))


@dataclasses.dataclass
class EvalSection:
    """Evaluation on the dataset's eval split."""

    every: int = opt(50, "evaluate every N steps (0 = only at checkpoints and at the end)")
    max_batches: int | None = opt(20, "eval micro-batches per worker (null = the whole eval split)")
    sample_prompt: str = opt("Hello! How are you?", "user message whose greedy reply is logged at each eval ('' = off)")
    sample_max_tokens: int = opt(32, "tokens generated for the sample reply")
    at_start: bool = opt(False, "also evaluate the untrained model before the first step (logged as step 0)")

    def __post_init__(self) -> None:
        _raise_problems(_too_low(self, every=0) + _too_low(self, nullable=True, max_batches=1)
                        + _too_low(self, sample_max_tokens=1))


@dataclasses.dataclass
class CheckpointSection:
    """How often checkpoints are written and how many are kept."""

    every: int = opt(100, "write a checkpoint every N steps (always at the end too)")
    num_to_keep: int | None = opt(3, "checkpoints kept per run, ranked by eval_loss (the latest is always kept)")

    def __post_init__(self) -> None:
        _raise_problems(_too_low(self, every=1) + _too_low(self, nullable=True, num_to_keep=1))


@dataclasses.dataclass
class FinetuneConfig:
    """A fine-tuning run: ``chatray train --config jobs/finetune_tiny.yaml --set train.max_steps=50``."""

    data: DataSection = opt(DataSection, "the prepared dataset")
    model: ModelSection = opt(ModelSection, "the model to fine-tune")
    train: TrainSection = opt(TrainSection, "optimisation")
    scaling: ScalingSection = opt(ScalingSection, "Ray Train workers")
    run: RunSection = opt(RunSection, "run name, storage, failures")
    eval: EvalSection = opt(EvalSection, "evaluation")
    checkpoint: CheckpointSection = opt(CheckpointSection, "checkpointing")

    def __post_init__(self) -> None:
        t = self.train
        if t.global_batch_size is not None:
            per_pass = t.micro_batch_size * self.scaling.num_workers
            if t.global_batch_size % per_pass:
                raise ValueError(
                    f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size x "
                    f"scaling.num_workers ({t.micro_batch_size} x {self.scaling.num_workers} = {per_pass})")

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        t = self.train
        if t.global_batch_size is None:
            return t.grad_accum
        return t.global_batch_size // (t.micro_batch_size * self.scaling.num_workers)

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all workers."""
        return self.train.micro_batch_size * self.grad_accum * self.scaling.num_workers
