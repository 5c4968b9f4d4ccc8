"""One optimizer step of causal-LM fine-tuning, with no Ray in sight.

:class:`TrainStep` owns the optimizer (AdamW, fused where available), the warm-up + cosine schedule,
gradient accumulation, clipping, bf16 autocast and optional ``torch.compile``. :func:`make_train_step` builds it
the one way both Ray Train workers (``chatray.train.loop``) and ``benchmarks/gpu_train.py`` use: vocabulary padded
for the device (``model.pad_vocab_multiple``), TF32 matmuls on CUDA, the model placed and wrapped. When
``torch.distributed`` is initialised (Ray Train sets it up) it averages over ranks; otherwise it is a
plain single-process step.

Loss normalisation is by target tokens over the whole global batch: every rank scales its summed loss by
``world_size / global_target_tokens`` before DDP averages gradients, so N workers with batch B/N take the
same step as one worker with batch B.

A step on one worker does not wait for the device: its token counts come from the host-side batches, and the
loss is summed on the device and read only when a log line is due (:meth:`TrainStep.flush_loss`), as is the
gradient norm. With several workers the counts are summed over ranks each step (one all-reduce of four numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from chatray.data.dataset import IGNORE_INDEX
from chatray.model.vocab import pad_vocab, padded_rows, real_vocab_size
from chatray.train.batches import Batch, dummy_batch

if TYPE_CHECKING:
    from chatray.config import FinetuneConfig

__all__ = ["StepConfig", "StepResult", "TrainStep", "lr_multiplier", "make_optimizer", "make_train_step"]

# Fields of StepConfig resolved from more than the ``train`` section; the others are copied from it by name.
_RESOLVED = ("grad_accum", "precision", "compile", "pad_vocab_multiple")
# ``model.pad_vocab_multiple: auto`` on CUDA: 50,257 -> 50,304 rows, a shape tensor cores run at full speed.
_GPU_VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class StepConfig:
    """Optimiser and numerics of a training step, resolved for one device.

    Built by :meth:`from_config`: the defaults and help texts live in :class:`chatray.config.TrainSection`.
    """

    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    grad_accum: int  # micro-batches per optimizer step on each worker (global_batch_size applied)
    precision: Literal["fp32", "bf16"]  # ``auto`` resolved for the device
    compile: bool  # ``model.compile``
    pad_vocab_multiple: int  # ``model.pad_vocab_multiple``, ``auto`` resolved for the device (1 = no padding)

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, device_type: str = "cpu") -> StepConfig:
        """The step settings of run ``cfg`` on a device of type ``device_type`` (``cpu``, ``cuda``)."""
        t = cfg.train
        shared = {f.name: getattr(t, f.name) for f in dataclasses.fields(cls) if f.name not in _RESOLVED}
        precision = t.precision
        if precision == "auto":
            precision = "bf16" if device_type == "cuda" else "fp32"
        multiple = cfg.model.pad_vocab_multiple
        if multiple == "auto":
            multiple = _GPU_VOCAB_MULTIPLE if device_type == "cuda" else 1
        return cls(**shared, grad_accum=cfg.grad_accum, precision=precision, compile=cfg.model.compile,
                   pad_vocab_multiple=multiple)


@dataclass
class StepResult:
    """What one optimizer step did, summed over all ranks."""

    step: int
    lr: float
    tokens: int  # input positions processed (padding included)
    real_tokens: int  # input positions holding data
    loss_tokens: int  # positions with a target


def lr_multiplier(step: int, cfg: StepConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: StepConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms); fused kernels where supported."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(groups, **kwargs)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def make_train_step(model: torch.nn.Module, cfg: StepConfig, device: torch.device, *,
                    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None, pad_id: int = 0) -> TrainStep:
    """The training step a worker runs on ``device``, built from an unwrapped model.

    Pads the vocabulary to ``cfg.pad_vocab_multiple`` (before wrapping: DDP and the optimizer must see the final
    weights) and, on CUDA, lets float32 matmuls use TF32 (``torch.set_float32_matmul_precision("high")``).

    Args:
        model: a Hugging Face causal LM on the CPU or on ``device``, not yet wrapped.
        cfg: the step settings for ``device`` (:meth:`StepConfig.from_config`).
        device: where the step runs.
        wrap: places and wraps the model (Ray Train's ``prepare_model``); default: ``model.to(device)``.
        pad_id: token of the dummy batches of a rank whose data ran out.

    Returns:
        The :class:`TrainStep`.

    Raises:
        ChatrayError: padding was asked for a model without tied, bias-free output embeddings.
    """
    if cfg.pad_vocab_multiple > 1:
        pad_vocab(model, cfg.pad_vocab_multiple)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return TrainStep(wrap(model) if wrap is not None else model.to(device), cfg, device, pad_id=pad_id)


class TrainStep:
    """Forward/backward over ``grad_accum`` micro-batches, then clip and step AdamW and the schedule.

    Args:
        model: the model, possibly wrapped in DistributedDataParallel, already on ``device``.
        cfg: optimiser and numerics.
        device: where batches go.
        pad_id: token used for the dummy batches of a worker whose data ran out.
    """

    def __init__(self, model: torch.nn.Module, cfg: StepConfig, device: torch.device, pad_id: int = 0) -> None:
        self.cfg = cfg
        self.device = device
        self.pad_id = pad_id
        self.model = model
        self.raw_model = _unwrap(model)
        self.vocab_size = real_vocab_size(self.raw_model)  # logits beyond it are padding, sliced off before the loss
        self.optimizer = make_optimizer(self.raw_model, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(s, cfg))
        self.step = 0
        # Forward + loss compiled together, so the float32 upcast of the logits and the cross-entropy fuse.
        self._loss = torch.compile(self._loss_impl) if cfg.compile else self._loss_impl
        self._last: Batch | None = None
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # local, since last flush
        self._loss_tokens = 0  # global, since last flush
        self.grad_norm: torch.Tensor | None = None  # of the last step, before clipping
        self.world_size = torch.distributed.get_world_size() if _distributed() else 1

    # ---------------------------------------------------------------------------------------- numerics
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_impl(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            # No use_cache=False: without a cache and a mask, transformers looks for packed sequences in the position
            # ids (a host sync in eager mode, an explicit mask that rules out flash attention under compile).
            logits = self.model(input_ids=input_ids).logits  # (B, T, padded vocab)
        if logits.size(-1) != self.vocab_size:
            logits = logits[..., : self.vocab_size]  # (B, T, vocab)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch's targets (float32)."""
        return self._loss(batch.input_ids, batch.targets)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if not _distributed() or self.world_size == 1:  # Ray Train sets up a group even for one worker
            return values
        comm = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=comm)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # ---------------------------------------------------------------------------------------- the step
    def __call__(self, micro_batches: list[Batch | None]) -> StepResult | None:
        """One optimizer step over this rank's micro-batches (``None`` = this rank's data ran out).

        Returns:
            The step's global counts, or None when every rank is out of data (nothing was done: the caller
            starts the next epoch and calls again).
        """
        assert len(micro_batches) == self.cfg.grad_accum, (len(micro_batches), self.cfg.grad_accum)
        real = [b for b in micro_batches if b is not None]
        local = [float(sum(b.n_loss for b in real)), float(len(real)), float(sum(b.n_real for b in real)),
                 float(sum(b.n_tokens for b in real))]
        loss_tokens, n_real_batches, real_tokens, tokens = self._sum_over_ranks(local)
        if n_real_batches == 0:
            return None
        scale = self.world_size / loss_tokens if loss_tokens else 0.0
        self.model.train()
        last = len(micro_batches) - 1
        for i, b in enumerate(micro_batches):
            if b is None:
                b = dummy_batch(self._last, 1, 8, self.pad_id)
            else:
                self._last = b
            b = b.to(self.device)
            sync = contextlib.nullcontext()
            if i < last and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()  # DDP: all-reduce gradients on the last micro-batch only
            with sync:
                loss = self.loss_sum(b)
                (loss * scale).backward()
            self._loss_sum += loss.detach().double()
        if self.cfg.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._loss_tokens += int(loss_tokens)
        return StepResult(self.step, lr, int(tokens), int(real_tokens), int(loss_tokens))

    def flush_loss(self) -> float:
        """Mean training loss per target token since the last flush, over all ranks (synchronises)."""
        (total,) = self._sum_over_ranks([float(self._loss_sum.item())])
        mean = total / self._loss_tokens if self._loss_tokens else float("nan")
        self._loss_sum.zero_()
        self._loss_tokens = 0
        return mean

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> tuple[float, int]:
        """Mean loss per target token over ``batches`` (this rank's share), summed over ranks.

        Returns:
            (eval_loss, target_tokens); the loss is NaN when there were no targets.
        """
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        for b in batches:
            b = b.to(self.device)
            total += self.loss_sum(b).double()
            n += b.n_loss
        self.model.train()
        s, count = self._sum_over_ranks([float(total.item()), float(n)])
        return (s / count if count else float("nan")), int(count)

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and step (for ``train_state.pt``), with the tokenizer-sized vocabulary.

        The optimizer moments of padding rows are always zero (they get no gradient), so they are left out:
        ``train_state.pt`` is the same whether or not the run padded, and resumes on either kind of device.
        """
        return {"step": self.step, "optimizer": self._optimizer_rows(self.optimizer.state_dict(), pad=False),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the schedule continues at ``state['step']``)."""
        self.optimizer.load_state_dict(self._optimizer_rows(state["optimizer"], pad=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    def _optimizer_rows(self, opt_state: dict[str, Any], *, pad: bool) -> dict[str, Any]:
        """``opt_state`` with the padded matrix's moments trimmed to the vocabulary, or zero-padded back."""
        weight = padded_rows(self.raw_model)
        if weight is None:
            return opt_state
        index = next(i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])
                     if p is weight)  # optimizer state dicts number parameters in group order
        rows = weight.shape[0] if pad else self.vocab_size
        state = dict(opt_state["state"])
        if index in state:
            state[index] = {k: _with_rows(v, rows) if torch.is_tensor(v) and v.dim() == 2 else v
                            for k, v in state[index].items()}
        return {**opt_state, "state": state}


def _with_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` (rows, cols) cut or zero-padded to ``rows`` rows, as a new tensor."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out
