"""``train_loop_per_worker``: what each Ray Train worker runs.

Shape (as Ray documents it): read ``get_dataset_shard("train")``, build or restore the model, wrap it with
``prepare_model`` (DDP), run :class:`chatray.train.step.TrainStep` until ``max_steps``, evaluate and log
on a schedule, and let rank 0 write checkpoints that every rank reports with ``ray.train.report``.

Resume: rank 0 picks the newest checkpoint of the run whose files are complete and whose ``train_state.pt``
loads (broken ones are skipped with a warning) and every rank restores model, optimizer, schedule, step,
RNG and data position (epoch + micro-batches consumed) from it. This one path serves both a rerun with the
same run name and Ray Train's restart of the worker group after a worker died.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.config import FinetuneConfig, from_dict, to_dict
from chatray.data.dataset import read_split_rows
from chatray.storage.checkpoints import CheckpointInfo, checkpoint_dir_name, list_checkpoints
from chatray.storage.uri import download_dir, exists, is_remote, join, write_text
from chatray.train.batches import Batch, collate_padded, packed_batch

if TYPE_CHECKING:

    from chatray.train.step import TrainStep

__all__ = ["FAULT_ENV", "TRAIN_STATE_VERSION", "train_loop_per_worker"]

logger = logging.getLogger("chatray.train")

TRAIN_STATE_VERSION = 1
# Test hook: the worker of rank CHATRAY_FAULT_RANK (default: the last) exits hard once, after this step.
FAULT_ENV = "CHATRAY_FAULT_AT_STEP"


# Written to the streams directly: Ray Train V2 patches print() in workers to tee into its logger, which
# shows every line twice in the driver log.
def _say(msg: str) -> None:
    sys.stdout.write(f"[chatray train] {msg}\n")
    sys.stdout.flush()


def _warn(msg: str) -> None:
    sys.stderr.write(f"[chatray train] warning: {msg}\n")
    sys.stderr.flush()


class _EpochStream:
    """Micro-batches from this worker's dataset shard, one epoch at a time, resumable by position.

    ``next()`` returns None once this worker's share of the epoch is used up; the caller starts the next
    epoch only when every worker is out (Ray Data's split starts epochs in lock-step).
    """

    def __init__(self, shard: Any, *, micro_batch_size: int, packing: str, block_size: int, pad_id: int,
                 epoch: int = 0, skip: int = 0) -> None:
        self.shard = shard
        self.micro_batch_size = micro_batch_size
        self.packing = packing
        self.block_size = block_size
        self.pad_id = pad_id
        self.epoch = epoch
        self.pulled = 0  # micro-batch requests in this epoch (same on every rank)
        self._skip = skip
        self._it: Any = None
        self._done = False

    def _open(self) -> None:
        self._it = iter(self.shard.iter_batches(batch_size=self.micro_batch_size, batch_format="numpy",
                                                prefetch_batches=2, drop_last=False))
        skipped = 0
        while skipped < self._skip and not self._done:
            try:
                next(self._it)
            except StopIteration:
                self._done = True
            skipped += 1
        self.pulled = self._skip
        self._skip = 0

    def next(self) -> Batch | None:
        if self._it is None:
            self._open()
        self.pulled += 1
        if self._done:
            return None
        try:
            raw = next(self._it)
        except StopIteration:
            self._done = True
            return None
        if self.packing == "pack":
            return packed_batch(raw["input_ids"], raw["labels"], raw["n_real"])
        return collate_padded(raw["input_ids"], raw["labels"], self.pad_id, self.block_size)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.pulled = 0
        self._it = None
        self._done = False


def _eval_batches(cfg: FinetuneConfig, plan: dict[str, Any], rank: int, world: int) -> list[Batch]:
    """This rank's share (rows ``rank::world``) of the eval split, padded per row: exact per-conversation loss."""
    ids, labs = read_split_rows(cfg.data.path, "eval")
    ids, labs = ids[rank::world], labs[rank::world]
    mb = cfg.train.micro_batch_size
    out = []
    for i in range(0, len(ids), mb):
        out.append(collate_padded(ids[i: i + mb], labs[i: i + mb], plan["pad_id"], plan["block_size"]))
        if cfg.eval.max_batches is not None and len(out) >= cfg.eval.max_batches:
            break
    return out


_COPIES: dict[str, Path] = {}


def _local_copy(info: CheckpointInfo) -> Path:
    """A local folder with the checkpoint (remote ones downloaded once per process; never written to)."""
    if not is_remote(info.uri):
        return Path(info.uri)
    if info.uri not in _COPIES:
        _COPIES[info.uri] = download_dir(info.uri, tempfile.mkdtemp(prefix="chatray-resume-"))
    return _COPIES[info.uri]


def _drop_copies() -> None:
    """Delete the local copies of remote checkpoints once model and state are loaded (they can be GBs)."""
    for path in _COPIES.values():
        shutil.rmtree(path, ignore_errors=True)
    _COPIES.clear()


def _choose_resume(run_uri: str) -> tuple[str | None, dict[str, Any] | None]:
    """Newest checkpoint with complete files and a loadable ``train_state.pt`` (rank 0 only)."""
    import torch

    infos = list_checkpoints(run_uri, require_train_state=True)
    for info in reversed(infos):
        if not info.valid:
            _warn(f"skipping checkpoint {info.uri}: {info.problem}")
            continue
        try:
            state = torch.load(_local_copy(info) / "train_state.pt", map_location="cpu", weights_only=True)
            if state.get("version") != TRAIN_STATE_VERSION or "trainer" not in state:
                raise ValueError(f"unknown train_state version {state.get('version')!r}")
        except Exception as e:  # truncated/corrupt pickle, unknown format
            _warn(f"skipping checkpoint {info.uri}: train_state.pt unreadable ({str(e).splitlines()[0]})")
            continue
        return info.uri, state
    return None, None


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sample_reply(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, device: Any) -> str:
    """Greedy reply of the (unwrapped) model to one user message, through the chat template."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    ctx = getattr(model.config, "n_positions", 1024)
    ids = ids[:, -max(ctx - max_new_tokens, 1):]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _maybe_fault(run_uri: str, step: int, rank: int, world: int) -> None:
    """Test hook (``CHATRAY_FAULT_AT_STEP``): kill this worker process once, as a crash would."""
    at = os.environ.get(FAULT_ENV)
    if not at or int(at) != step or rank != int(os.environ.get("CHATRAY_FAULT_RANK", world - 1)):
        return
    marker = join(run_uri, f".fault-injected-{step}")
    if exists(marker):
        return
    write_text(marker, "1")
    _warn(f"fault injection: worker rank {rank} exits at step {step}")
    os._exit(1)


def _save_checkpoint(step: TrainStep, *, cfg: FinetuneConfig, plan: dict[str, Any], tokenizer: Any,
                     stream: _EpochStream, metrics: dict[str, Any], rank: int, world: int) -> None:
    """Rank 0 writes the checkpoint folder; every rank calls ``ray.train.report`` (it is a barrier)."""
    import ray.train
    import torch

    from chatray.model import save_model
    from chatray.train.step import rng_state

    rngs = _gather(rng_state())
    s = step.step
    report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if not math.isfinite(report.get("eval_loss", float("nan"))):
        report["eval_loss"] = 1e30  # Ray ranks checkpoints by this: no eval data ranks them last
    if rank != 0:
        ray.train.report(report, checkpoint=None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="chatray-ckpt-"))
    try:
        save_model(step.raw_model, tokenizer, tmp)
        torch.save({"version": TRAIN_STATE_VERSION, "trainer": step.state_dict(), "rng": rngs,
                    "data": {"epoch": stream.epoch, "micro_batches": stream.pulled, "world_size": world,
                             "packing": cfg.data.packing, "micro_batch_size": cfg.train.micro_batch_size},
                    "tokens_seen": int(metrics.get("tokens_seen", 0))}, tmp / "train_state.pt")
        (tmp / "train_config.json").write_text(json.dumps({"config": to_dict(cfg), "plan": plan}, indent=1),
                                               encoding="utf-8")
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        info = {**{k: _finite(v) if isinstance(v, float) else v for k, v in metrics.items()}, "files": files}
        (tmp / "metrics.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=checkpoint_dir_name(s))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"checkpoint {checkpoint_dir_name(s)} saved (step {s})")


def _finite(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function.

    Args:
        config: ``{"cfg": FinetuneConfig as a dict, "plan": driver-resolved facts}``; the plan holds
            ``run_uri``, ``block_size``, ``pad_id``, ``eos_id``, ``vocab_size``, ``grad_accum``.
    """
    import ray.train
    import ray.train.torch
    import torch

    from chatray.data.dataset import load_tokenizer
    from chatray.model import build_model, load_model, quiet_transformers
    from chatray.train.step import StepConfig, TrainStep, set_rng_state

    t_start = time.perf_counter()
    cfg = from_dict(FinetuneConfig, config["cfg"], "train_loop_config")
    plan = config["plan"]
    run_uri = plan["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    quiet_transformers()
    tokenizer = load_tokenizer(cfg.data.path)

    # ---- resume: rank 0 chooses, every rank loads the same checkpoint
    resume_uri, state = (_choose_resume(run_uri) if rank == 0 and cfg.run.resume else (None, None))
    resume_uri = _broadcast(resume_uri)
    if resume_uri is not None and state is None:
        state = torch.load(_local_copy(CheckpointInfo(resume_uri, "", 0)) / "train_state.pt", map_location="cpu",
                           weights_only=True)

    torch.manual_seed(cfg.train.seed)
    if resume_uri is not None:
        model = load_model(_local_copy(CheckpointInfo(resume_uri, "", 0)))
    else:
        model = build_model(cfg.model.name, vocab_size=plan["vocab_size"], block_size=plan["block_size"],
                            eos_token_id=plan["eos_id"], n_layer=cfg.model.n_layer, n_head=cfg.model.n_head,
                            n_embd=cfg.model.n_embd, dropout=cfg.model.dropout, seed=cfg.train.seed)
    _drop_copies()
    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable()
    model = ray.train.torch.prepare_model(model)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    t = cfg.train
    step = TrainStep(model, StepConfig(lr=t.lr, min_lr_ratio=t.min_lr_ratio, warmup_steps=t.warmup_steps,
                                       max_steps=t.max_steps, weight_decay=t.weight_decay, beta1=t.beta1,
                                       beta2=t.beta2, grad_clip=t.grad_clip, grad_accum=plan["grad_accum"],
                                       precision=precision, compile=cfg.model.compile),
                     device, pad_id=plan["pad_id"])

    epoch, skip, tokens_seen = 0, 0, 0
    if state is not None:
        step.load_state_dict(state["trainer"])
        data = state.get("data", {})
        epoch = int(data.get("epoch", 0))
        same_layout = (data.get("world_size") == world and data.get("packing") == cfg.data.packing
                       and data.get("micro_batch_size") == cfg.train.micro_batch_size)
        if same_layout:
            skip = int(data.get("micro_batches", 0))
            set_rng_state(state["rng"][rank])
        else:
            torch.manual_seed(cfg.train.seed + 1000 * step.step + rank)
            if rank == 0:
                _warn(f"workers/packing/micro-batch changed since the checkpoint: data restarts at epoch {epoch}")
        tokens_seen = int(state.get("tokens_seen", 0))
        if rank == 0:
            _say(f"resumed from {resume_uri} at step {step.step} (epoch {epoch}, micro-batch {skip})")
    else:
        torch.manual_seed(cfg.train.seed + rank)
    start_step = step.step

    shard = ray.train.get_dataset_shard("train")
    stream = _EpochStream(shard, micro_batch_size=t.micro_batch_size, packing=cfg.data.packing,
                          block_size=plan["block_size"], pad_id=plan["pad_id"], epoch=epoch, skip=skip)
    eval_batches = _eval_batches(cfg, plan, rank, world)
    log = None
    if rank == 0:
        from chatray.train.metrics import MetricsLog

        log = MetricsLog(run_uri, keep_until_step=start_step)
        _say(f"run {run_uri}: {world} worker(s) on {device.type}, {precision}, global batch "
             f"{t.micro_batch_size * plan['grad_accum'] * world} x {plan['block_size']} tokens "
             f"({cfg.data.packing}), steps {start_step} -> {t.max_steps}")
    if start_step >= t.max_steps:
        if rank == 0:
            _say(f"already at step {start_step} >= train.max_steps={t.max_steps}; raise train.max_steps to continue")
        return

    window_t, window_tokens, window_real = time.perf_counter(), 0, 0
    empty_epoch_steps = 0
    first_step_s: float | None = None
    while step.step < t.max_steps:
        res = step([stream.next() for _ in range(plan["grad_accum"])])
        if res is None:  # every worker is out of data: next epoch (Ray Data starts it on all splits together)
            if stream.pulled <= plan["grad_accum"]:
                empty_epoch_steps += 1
                if empty_epoch_steps > 1:
                    raise RuntimeError(f"the train split of {cfg.data.path} yielded no batches")
            stream.next_epoch()
            if rank == 0:
                _say(f"epoch {stream.epoch} begins at step {step.step}")
            continue
        empty_epoch_steps = 0
        tokens_seen += res.tokens
        if first_step_s is None:  # start-up (imports, data pipeline) is reported apart from the speed
            first_step_s = time.perf_counter() - t_start
            window_t = time.perf_counter()
        else:
            window_tokens += res.tokens
            window_real += res.real_tokens
        s = step.step
        _maybe_fault(run_uri, s, rank, world)
        is_last = s == t.max_steps
        do_ckpt = s % cfg.checkpoint.every == 0 or is_last
        do_eval = plan["eval_rows"] > 0 and bool((cfg.eval.every and s % cfg.eval.every == 0) or do_ckpt)
        if not (s % t.log_every == 0 or do_eval or do_ckpt):
            continue
        loss = step.flush_loss()
        dt = max(time.perf_counter() - window_t, 1e-9)
        rec: dict[str, Any] = {
            "step": s, "epoch": stream.epoch, "loss": loss, "lr": res.lr, "tokens_per_s": window_tokens / dt,
            "real_tokens_per_s": window_real / dt, "tokens_seen": tokens_seen,
            "grad_norm": float(step.grad_norm) if step.grad_norm is not None else None,
            "elapsed_s": time.perf_counter() - t_start, "first_step_s": first_step_s, "workers": world,
        }
        if do_eval:
            eval_loss, _ = step.evaluate(eval_batches)
            rec["eval_loss"] = eval_loss
            rec["perplexity"] = math.exp(min(eval_loss, 50.0)) if math.isfinite(eval_loss) else float("nan")
            if rank == 0 and cfg.eval.sample_prompt:
                rec["sample"] = _sample_reply(step.raw_model, tokenizer, cfg.eval.sample_prompt,
                                              cfg.eval.sample_max_tokens, device)
        if rank == 0:
            assert log is not None
            log.append(rec)
            line = (f"step {s}/{t.max_steps} | loss {loss:.4f} | lr {res.lr:.2e} | "
                    f"{rec['tokens_per_s']:,.0f} tok/s | epoch {stream.epoch}")
            if do_eval:
                line += f" | eval_loss {rec['eval_loss']:.4f} | ppl {rec['perplexity']:.2f}"
            _say(line)
            if rec.get("sample") is not None:
                _say(f"sample reply to {cfg.eval.sample_prompt!r}: {rec['sample']!r}")
        if do_ckpt:
            _save_checkpoint(step, cfg=cfg, plan=plan, tokenizer=tokenizer, stream=stream,
                             metrics={**rec, "train_loss": loss}, rank=rank, world=world)
        window_t, window_tokens, window_real = time.perf_counter(), 0, 0
