"""Training throughput: ``chatray train`` (Ray Train, 1 worker) vs a plain PyTorch loop, and packed vs padded.

    python benchmarks/bench_train.py                   # prepares the chatterbot demo data once (cached)
    python benchmarks/bench_train.py --data .demo/data  # any prepared dataset

Same machine, same run, same model (the ``tiny`` GPT-2), batch, optimizer (AdamW) and data for both sides:

1. Ray start-up time (``ray.init``) and the first step of a Ray Train worker are printed separately.
2. ``chatray train`` steady-state tokens/s (median of the logged windows after warm-up) vs the same steps in a
   plain single-process loop written directly against PyTorch, with the same number of CPU threads.
   Target: ratio >= 0.9.
3. Packed vs padded batches through chatray's training step: tokens/s counting real (non-pad) tokens, and the
   share of real tokens. Target: >= 95% real tokens packed.

Prints one line per measurement and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RATIO_TARGET = 0.9
REAL_TARGET = 0.95


def _say(msg: str) -> None:
    print(f"[bench_train] {msg}", flush=True)


def plain_loop(data: str, *, steps: int, warmup: int, micro: int, block: int, threads: int, lr: float,
               pad_id: int, vocab: int, seed: int) -> float:
    """Tokens/s of a hand-written PyTorch loop: same model, batches, AdamW, schedule and clipping."""
    import torch
    import torch.nn.functional as F

    from chatray.config import FinetuneConfig, from_dict
    from chatray.model import build_model
    from chatray.train.batches import iter_local_batches
    from chatray.train.step import StepConfig, lr_multiplier

    torch.set_num_threads(threads)
    model = build_model("tiny", vocab_size=vocab, block_size=block, eos_token_id=pad_id, seed=seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)
    schedule = StepConfig.from_config(from_dict(FinetuneConfig, {"train": {"lr": lr, "warmup_steps": 10,
                                                                           "max_steps": steps + warmup}}))
    sched = torch.optim.lr_scheduler.LambdaLR(  # the schedule chatray uses (warm-up + cosine)
        opt, lambda s: lr_multiplier(s, schedule))
    batches = []
    while len(batches) < steps + warmup:
        batches += list(iter_local_batches(data, "train", packing="pack", block_size=block, micro_batch_size=micro,
                                           pad_id=pad_id))
    tokens, t0 = 0, 0.0
    for i, b in enumerate(batches[: steps + warmup]):
        if i == warmup:
            t0, tokens = time.perf_counter(), 0
        logits = model(input_ids=b.input_ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b.targets.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += b.n_tokens
    return tokens / (time.perf_counter() - t0)


def step_throughput(data: str, packing: str, *, steps: int, micro: int, block: int, threads: int, pad_id: int,
                    vocab: int) -> tuple[float, float, float]:
    """(tokens/s, real tokens/s, real share) of chatray's TrainStep on packed or padded batches (no Ray)."""
    import torch

    from chatray.config import FinetuneConfig, from_dict
    from chatray.model import build_model
    from chatray.train.batches import iter_local_batches
    from chatray.train.step import StepConfig, TrainStep

    torch.set_num_threads(threads)
    model = build_model("tiny", vocab_size=vocab, block_size=block, eos_token_id=pad_id, seed=0)
    cfg = from_dict(FinetuneConfig, {"train": {"lr": 1e-3, "warmup_steps": 5, "max_steps": 1000}})
    step = TrainStep(model, StepConfig.from_config(cfg), torch.device("cpu"), pad_id)
    batches = list(iter_local_batches(data, "train", packing=packing, block_size=block, micro_batch_size=micro,
                                      pad_id=pad_id))
    share = sum(b.n_real for b in batches) / sum(b.n_tokens for b in batches)
    for b in batches[:2]:
        step([b])
    tokens = real = 0
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(2 + i) % len(batches)]
        step([b])
        tokens += b.n_tokens
        real += b.n_real
    dt = time.perf_counter() - t0
    return tokens / dt, real / dt, share


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared dataset (default: chatterbot English, prepared once into .demo/)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of the chatray run")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help="torch CPU threads, the same for every side (default: cores - 1, at most 4)")
    args = p.parse_args()

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    _say(f"ray.init: {ray_start:.1f}s")

    from chatray.config import FinetuneConfig, load_config
    from chatray.data.dataset import read_manifest
    from chatray.train.metrics import read_metrics
    from chatray.train.trainer import run_training

    data = args.data
    if data is None:
        data = str(REPO / ".demo" / "bench-train-data")
        if not (Path(data) / "manifest.json").exists():
            from chatray.data.prepare import prepare_dataset

            _say(f"preparing chatterbot English into {data} (once)")
            prepare_dataset(["chatterbot:english"], data, tokenizer="train:2000", max_length=128, progress=False)
    m = read_manifest(data)
    block, pad_id, vocab = int(m["max_length"]), int(m["tokenizer"]["pad_token_id"]), None
    from chatray.data.dataset import load_tokenizer

    vocab = len(load_tokenizer(data))
    micro, threads, lr = args.micro_batch, args.threads, 1e-3

    # --- chatray train, 1 worker, steady state
    storage = tempfile.mkdtemp(prefix="chatray-bench-")
    cfg = load_config(FinetuneConfig, None, [
        f"data.path={data}", f"run.storage_path={storage}", "run.name=bench", f"train.max_steps={args.steps}",
        f"train.micro_batch_size={micro}", f"train.lr={lr}", "train.warmup_steps=10", "train.log_every=10",
        "eval.every=0", "eval.sample_prompt=", f"checkpoint.every={args.steps}", "scaling.num_workers=1",
        f"scaling.cpus_per_worker={threads}", f"scaling.torch_threads={threads}"])
    t0 = time.perf_counter()
    run_training(cfg, progress=False)
    wall = time.perf_counter() - t0
    recs = read_metrics(f"{storage}/bench")
    first_step = recs[0]["first_step_s"]
    steady = [r["tokens_per_s"] for r in recs[2:] if r.get("eval_loss") is None] or [recs[-1]["tokens_per_s"]]
    chatray_tps = statistics.median(steady)
    _say(f"chatray train: first step after {first_step:.1f}s in the worker, {wall:.1f}s for the whole run; "
         f"steady state {chatray_tps:,.0f} tokens/s (median of {len(steady)} windows)")

    # --- plain PyTorch, same process kind of work; run twice around nothing else to damp machine noise
    plain = [plain_loop(data, steps=min(args.steps, 60), warmup=5, micro=micro, block=block, threads=threads, lr=lr,
                        pad_id=pad_id, vocab=vocab, seed=0) for _ in range(2)]
    plain_tps = max(plain)
    ratio = chatray_tps / plain_tps
    _say(f"plain PyTorch loop: {plain_tps:,.0f} tokens/s -> chatray/plain = {ratio:.2f} (target >= {RATIO_TARGET})")

    # --- packed vs padded through TrainStep
    pk = step_throughput(data, "pack", steps=40, micro=micro, block=block, threads=threads, pad_id=pad_id, vocab=vocab)
    pd = step_throughput(data, "pad", steps=40, micro=micro, block=block, threads=threads, pad_id=pad_id, vocab=vocab)
    _say(f"packed: {pk[1]:,.0f} real tokens/s ({pk[2]:.1%} real); padded: {pd[1]:,.0f} real tokens/s "
         f"({pd[2]:.1%} real) -> packed/padded = {pk[1] / pd[1]:.2f}x (target >= {REAL_TARGET:.0%} real packed)")
    out = {"ray_init_s": round(ray_start, 1), "first_step_s": round(first_step, 1), "run_wall_s": round(wall, 1),
           "chatray_tokens_per_s": round(chatray_tps), "plain_tokens_per_s": round(plain_tps),
           "ratio": round(ratio, 3), "packed_real_tokens_per_s": round(pk[1]), "padded_real_tokens_per_s": round(pd[1]),
           "packed_real_share": round(pk[2], 4), "padded_real_share": round(pd[2], 4),
           "threads": threads, "micro_batch": micro, "block": block}
    print(json.dumps(out))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
