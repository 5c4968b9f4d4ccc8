"""``train_loop_per_worker``: what each Ray Train worker runs.

Shape (as Ray documents it): read ``get_dataset_shard("train")``, build or restore the model, wrap it with
``prepare_model`` (DDP), run :class:`chatray.train.step.TrainStep` until ``max_steps``, evaluate and log
on a schedule, and let rank 0 write checkpoints that every rank reports with ``ray.train.report``.
Which checkpoint a worker resumes from, and what it restores, is :mod:`chatray.train.state`'s job.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.config import FinetuneConfig
from chatray.data.dataset import read_split_rows
from chatray.storage.checkpoints import checkpoint_dir_name
from chatray.storage.uri import exists, join, write_text
from chatray.train.batches import Batch, ShardStream, collate_padded
from chatray.train.console import say, warn
from chatray.train.plan import RunPlan
from chatray.train.state import (
    DataLayout,
    DataPosition,
    Resume,
    find_resume,
    gather_rng_states,
    restore_train_state,
    write_checkpoint,
)

if TYPE_CHECKING:
    import torch

    from chatray.train.step import StepResult, TrainStep

__all__ = ["FAULT_ENV", "train_loop_per_worker"]

# Test hook: the worker of rank CHATRAY_FAULT_RANK (default: the last) exits hard once, after this step.
FAULT_ENV = "CHATRAY_FAULT_AT_STEP"


@dataclass(frozen=True)
class _Worker:
    """This worker's place in the group."""

    rank: int
    world: int
    device: torch.device
    t_start: float  # when the worker function began: start-up is reported apart from the speed


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: restore or build the model, then train up to ``train.max_steps``.

    Args:
        config: the run's config and plan, as :meth:`chatray.train.plan.RunPlan.loop_config` packed them.
    """
    import ray.train

    from chatray.data.dataset import load_tokenizer
    from chatray.model import quiet_transformers

    t_start = time.perf_counter()
    cfg, plan = RunPlan.from_loop_config(config)
    worker = _join_group(cfg, t_start)
    quiet_transformers()
    tokenizer = load_tokenizer(cfg.data.path)
    resume = find_resume(plan.run_uri, enabled=cfg.run.resume, rank=worker.rank)
    step = _train_step(_model(cfg, plan, resume), cfg, plan, worker.device)
    position = restore_train_state(step, resume, layout=DataLayout.of(cfg, worker.world), seed=cfg.train.seed,
                                   rank=worker.rank)
    stream = ShardStream(ray.train.get_dataset_shard("train"), micro_batch_size=cfg.train.micro_batch_size,
                         packing=cfg.data.packing, block_size=plan.block_size, pad_id=plan.pad_id,
                         epoch=position.epoch, skip=position.micro_batches)
    _Run(cfg, plan, worker, step, stream, tokenizer, tokens_seen=position.tokens_seen).run()


def _join_group(cfg: FinetuneConfig, t_start: float) -> _Worker:
    """This worker's rank and device (CPU workers get ``scaling.torch_threads`` threads)."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    return _Worker(ctx.get_world_rank(), ctx.get_world_size(), device, t_start)


def _model(cfg: FinetuneConfig, plan: RunPlan, resume: Resume | None) -> Any:
    """The checkpoint's model when resuming, else a new one (``tiny``: random init; others: pretrained weights)."""
    import torch

    from chatray.model import build_model, load_model
    from chatray.storage.checkpoints import materialize_checkpoint

    torch.manual_seed(cfg.train.seed)
    if resume is None:
        m = cfg.model
        return build_model(m.name, vocab_size=plan.vocab_size, block_size=plan.block_size, eos_token_id=plan.eos_id,
                           n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, seed=cfg.train.seed)
    # A remote checkpoint is copied here for loading only; the copy (it can be GBs) goes once the model is loaded.
    with tempfile.TemporaryDirectory(prefix="chatray-resume-") as cache:
        return load_model(materialize_checkpoint(resume.uri, cache_dir=cache))


def _train_step(model: Any, cfg: FinetuneConfig, plan: RunPlan, device: torch.device) -> TrainStep:
    """The model (vocabulary padded for the device) wrapped for data parallelism inside a :class:`TrainStep`."""
    import ray.train.torch

    from chatray.train.step import StepConfig, make_train_step

    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable()
    return make_train_step(model, StepConfig.from_config(cfg, device.type), device,
                           wrap=ray.train.torch.prepare_model, pad_id=plan.pad_id)


def _eval_batches(cfg: FinetuneConfig, plan: RunPlan, worker: _Worker) -> list[Batch]:
    """This rank's share (rows ``rank::world``) of the eval split, padded per row: exact per-conversation loss."""
    ids, labs = read_split_rows(cfg.data.path, "eval")
    ids, labs = ids[worker.rank::worker.world], labs[worker.rank::worker.world]
    mb = cfg.train.micro_batch_size
    out = []
    for i in range(0, len(ids), mb):
        out.append(collate_padded(ids[i: i + mb], labs[i: i + mb], plan.pad_id, plan.block_size))
        if cfg.eval.max_batches is not None and len(out) >= cfg.eval.max_batches:
            break
    return out


def _sample_reply(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, device: Any) -> str:
    """Greedy reply of the (unwrapped) model to one user message, through the chat template."""
    import torch

    from chatray.model import config_context_length
    from chatray.model.vocab import unpadded_vocab

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    ctx = config_context_length(model.config) or 1024
    ids = ids[:, -max(ctx - max_new_tokens, 1):]
    was_training = model.training
    model.eval()
    with torch.no_grad(), unpadded_vocab(model):  # padding rows' logits (0) must never be sampled
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _maybe_fault(run_uri: str, step: int, worker: _Worker) -> None:
    """Test hook (``CHATRAY_FAULT_AT_STEP``): kill this worker process once, as a crash would."""
    at = os.environ.get(FAULT_ENV)
    if not at or int(at) != step or worker.rank != int(os.environ.get("CHATRAY_FAULT_RANK", worker.world - 1)):
        return
    marker = join(run_uri, f".fault-injected-{step}")
    if exists(marker):
        return
    write_text(marker, "1")
    warn(f"fault injection: worker rank {worker.rank} exits at step {step}")
    os._exit(1)


class _Run:
    """One worker's steps from where the run stands to ``train.max_steps``: epochs, logs, evals, checkpoints."""

    def __init__(self, cfg: FinetuneConfig, plan: RunPlan, worker: _Worker, step: TrainStep, stream: ShardStream,
                 tokenizer: Any, *, tokens_seen: int) -> None:
        self.cfg, self.plan, self.worker, self.step, self.stream = cfg, plan, worker, step, stream
        self.tokenizer = tokenizer
        self.tokens_seen = tokens_seen
        self.eval_batches = _eval_batches(cfg, plan, worker)
        self.log: Any = None  # rank 0's MetricsLog
        self.first_step_s: float | None = None
        self._window_t, self._window_tokens, self._window_real = time.perf_counter(), 0, 0
        self._empty_epochs = 0

    def run(self) -> None:
        """Train until ``train.max_steps`` (nothing to do when a resumed run is already there)."""
        start, max_steps, rank = self.step.step, self.cfg.train.max_steps, self.worker.rank
        if rank == 0:
            from chatray.train.metrics import MetricsLog

            self.log = MetricsLog(self.plan.run_uri, keep_until_step=start, tensorboard=True)
            say(f"run {self.plan.run_uri}: {self.worker.world} worker(s) on {self.worker.device.type}, "
                f"{self.step.cfg.precision}, global batch "
                f"{self.cfg.train.micro_batch_size * self.step.cfg.grad_accum * self.worker.world} x "
                f"{self.plan.block_size} tokens ({self.cfg.data.packing}), steps {start} -> {max_steps}")
        try:
            if start >= max_steps:
                if rank == 0:
                    say(f"already at step {start} >= train.max_steps={max_steps}; raise train.max_steps to continue")
                return
            self._steps(start, max_steps)
        finally:
            if self.log is not None:
                self.log.close()

    def _steps(self, start: int, max_steps: int) -> None:
        if start == 0 and self.cfg.eval.at_start and self.plan.eval_rows > 0:
            self._evaluate_untrained()
        while self.step.step < max_steps:
            res = self.step([self.stream.next() for _ in range(self.step.cfg.grad_accum)])
            if res is None:  # every worker is out of data
                self._next_epoch()
                continue
            self._empty_epochs = 0
            self._count(res)
            self._after_step(res)

    def _next_epoch(self) -> None:
        """Ray Data starts the next epoch on all splits together; an epoch without a batch is an error."""
        if self.stream.pulled <= self.step.cfg.grad_accum:
            self._empty_epochs += 1
            if self._empty_epochs > 1:
                raise RuntimeError(f"the train split of {self.cfg.data.path} yielded no batches")
        self.stream.next_epoch()  # the step lines carry the epoch

    def _count(self, res: StepResult) -> None:
        self.tokens_seen += res.tokens
        if self.first_step_s is None:  # start-up (imports, data pipeline) is reported apart from the speed
            self.first_step_s = time.perf_counter() - self.worker.t_start
            self._window_t = time.perf_counter()
        else:
            self._window_tokens += res.tokens
            self._window_real += res.real_tokens

    def _after_step(self, res: StepResult) -> None:
        """Log, evaluate and checkpoint when this step is due for it."""
        s, cfg = self.step.step, self.cfg
        _maybe_fault(self.plan.run_uri, s, self.worker)
        do_ckpt = s % cfg.checkpoint.every == 0 or s == cfg.train.max_steps
        do_eval = self.plan.eval_rows > 0 and bool((cfg.eval.every and s % cfg.eval.every == 0) or do_ckpt)
        if not (s % cfg.train.log_every == 0 or do_eval or do_ckpt):
            return
        rec = self._record(res, do_eval)
        if self.log is not None:
            self._print(rec)
        if do_ckpt:
            self._checkpoint({**rec, "train_loss": rec["loss"]})
        self._window_t, self._window_tokens, self._window_real = time.perf_counter(), 0, 0

    def _record(self, res: StepResult, do_eval: bool) -> dict[str, Any]:
        """The step's metrics (loss since the last record, speed of the window), with eval loss when due."""
        loss = self.step.flush_loss()
        dt = max(time.perf_counter() - self._window_t, 1e-9)
        rec: dict[str, Any] = {
            "step": self.step.step, "epoch": self.stream.epoch, "loss": loss, "lr": res.lr,
            "tokens_per_s": self._window_tokens / dt, "real_tokens_per_s": self._window_real / dt,
            "tokens_seen": self.tokens_seen,
            "grad_norm": float(self.step.grad_norm) if self.step.grad_norm is not None else None,
            "elapsed_s": time.perf_counter() - self.worker.t_start, "first_step_s": self.first_step_s,
            "workers": self.worker.world,
        }
        return {**rec, **self._evaluate()} if do_eval else rec

    def _evaluate(self) -> dict[str, Any]:
        """Eval loss and perplexity over the eval batches (every rank), and rank 0's sample reply."""
        eval_loss, _ = self.step.evaluate(self.eval_batches)
        out: dict[str, Any] = {
            "eval_loss": eval_loss,
            "perplexity": math.exp(min(eval_loss, 50.0)) if math.isfinite(eval_loss) else float("nan"),
        }
        if self.worker.rank == 0 and self.cfg.eval.sample_prompt:
            out["sample"] = _sample_reply(self.step.raw_model, self.tokenizer, self.cfg.eval.sample_prompt,
                                          self.cfg.eval.sample_max_tokens, self.worker.device)
        return out

    def _evaluate_untrained(self) -> None:
        """``eval.at_start``: the model before its first step, logged as step 0 (the baseline the run improves on)."""
        rec = {"step": 0, "epoch": self.stream.epoch, **self._evaluate()}
        if self.log is None:
            return
        self.log.append(rec)
        say(f"before training: eval_loss {rec['eval_loss']:.4f} | ppl {rec['perplexity']:.2f}")
        if rec.get("sample") is not None:
            say(f"sample reply to {self.cfg.eval.sample_prompt!r}: {rec['sample']!r}")

    def _print(self, rec: dict[str, Any]) -> None:
        """Rank 0: append to ``metrics.jsonl`` and print the log line."""
        self.log.append(rec)
        line = (f"step {rec['step']}/{self.cfg.train.max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                f"{rec['tokens_per_s']:,.0f} tok/s | epoch {rec['epoch']}")
        if "eval_loss" in rec:
            line += f" | eval_loss {rec['eval_loss']:.4f} | ppl {rec['perplexity']:.2f}"
        say(line)
        if rec.get("sample") is not None:
            say(f"sample reply to {self.cfg.eval.sample_prompt!r}: {rec['sample']!r}")

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint folder; every rank calls ``ray.train.report`` (it is a barrier)."""
        import ray.train

        rngs = gather_rng_states()
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if not math.isfinite(report.get("eval_loss", float("nan"))):
            report["eval_loss"] = 1e30  # Ray ranks checkpoints by this: no eval data ranks them last
        if self.worker.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        name = checkpoint_dir_name(self.step.step)
        position = DataPosition(self.stream.epoch, self.stream.pulled, self.tokens_seen)
        with tempfile.TemporaryDirectory(prefix="chatray-ckpt-", ignore_cleanup_errors=True) as tmp:
            write_checkpoint(Path(tmp), step=self.step, tokenizer=self.tokenizer, cfg=self.cfg, plan=self.plan,
                             rngs=rngs, position=position, layout=DataLayout.of(self.cfg, self.worker.world),
                             metrics=metrics)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        say(f"checkpoint {name} saved (step {self.step.step})")
