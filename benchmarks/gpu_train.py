"""GPU training benchmark: GPT-2 124M tokens/s and MFU with chatray's own training step.

Runs where there is PyTorch and transformers but no Ray (a lent GPU machine): it drives
``chatray.train.step.TrainStep`` -- the exact step a Ray Train worker runs (AdamW fused, warm-up + cosine,
clipping, bf16 autocast, torch.compile) -- on a GPT-2 124M-config model with random weights, fed with
packed blocks made by ``chatray.train.batches.pack_rows`` from synthetic dialogue-length rows (nothing is
downloaded, no dataset needed).

    python benchmarks/gpu_train.py              # CUDA: bf16 + compile vs an fp32 eager baseline (< 4 min on an H100)
    python benchmarks/gpu_train.py --smoke      # tiny config on CPU, seconds: checks the script itself

MFU = tokens/s x (6N + 12*L*H*Q*T) / peak, with N the parameters without the position embedding (the token
embedding counts: it is also the output layer), L layers, H heads, Q head size, T the block size; the peak
defaults to the H100 SXM dense bf16 figure, 989 TFLOP/s (--peak-tflops to change it).
Targets: MFU >= 40% on an H100, and >= 3x the fp32 eager baseline measured in the same run.
Prints one line per phase and a final JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chatray.config import FinetuneConfig, from_dict  # noqa: E402
from chatray.data.dataset import IGNORE_INDEX  # noqa: E402
from chatray.model import quiet_transformers, tiny_config  # noqa: E402
from chatray.train.batches import Batch, pack_rows, packed_batch  # noqa: E402
from chatray.train.step import StepConfig, TrainStep  # noqa: E402

MFU_TARGET = 0.40
RATIO_TARGET = 3.0


def flops_per_token(model: torch.nn.Module, block_size: int) -> tuple[float, int]:
    """(6N + 12*L*H*Q*T, N) for a GPT-2 model (N without the position embedding)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    return 6 * n + 12 * L * H * Q * block_size, n


def synthetic_batches(n: int, micro: int, block: int, vocab: int, seed: int = 0) -> list[Batch]:
    """``n`` packed micro-batches from random 'conversations' of 20-600 tokens (a third without loss)."""
    rng = np.random.default_rng(seed)
    need = n * micro * block + block
    ids, labs, total = [], [], 0
    while total < need:
        length = int(rng.integers(20, 600))
        row = rng.integers(0, vocab, length).astype(np.int32)
        lab = row.copy()
        lab[: length // 3] = IGNORE_INDEX  # the user turn
        ids.append(row)
        labs.append(lab)
        total += length
    packed = pack_rows(ids, labs, block, pad_id=0)
    return [packed_batch(packed["input_ids"][i * micro:(i + 1) * micro], packed["labels"][i * micro:(i + 1) * micro],
                         packed["n_real"][i * micro:(i + 1) * micro]) for i in range(n)]


def step_config(device: torch.device, **train: object) -> StepConfig:
    """The step settings a worker on ``device`` would use for a run whose ``train`` section sets ``train``."""
    compile_ = bool(train.pop("compile", False))
    cfg = from_dict(FinetuneConfig, {"train": {"lr": 6e-4, "warmup_steps": 2, "max_steps": 1000, **train},
                                     "model": {"compile": compile_}})
    return StepConfig.from_config(cfg, device.type)


def build(arch: str | None, block: int, vocab: int, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    torch.manual_seed(0)
    cfg = tiny_config(vocab, block, eos_token_id=vocab - 1, arch=arch, dropout=0.0)
    if arch is None:  # --smoke: a really small model
        cfg.n_layer, cfg.n_head, cfg.n_embd = 2, 2, 64
    return GPT2LMHeadModel(cfg).to(device)


def measure(name: str, step: TrainStep, batches: list[Batch], warmup: int, steps: int, device: torch.device,
            ) -> float:
    """Tokens/s of ``steps`` optimizer steps after ``warmup`` (compile happens in the warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        step([batches[i % len(batches)]])
    sync()
    print(f"[{name}] warm-up {warmup} steps: {time.perf_counter() - t0:.1f}s", flush=True)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        step([b])
        tokens += b.n_tokens
    sync()
    dt = time.perf_counter() - t0
    loss = step.flush_loss()
    print(f"[{name}] {steps} steps: {dt:.2f}s, {tokens / dt:,.0f} tokens/s, loss {loss:.3f}", flush=True)
    return tokens / dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, seconds")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 16; smoke 4)")
    p.add_argument("--block", type=int, default=None, help="tokens per sequence (default 1024; smoke 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, optimized path (default 40; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, incl. compile (default 8; smoke 1)")
    p.add_argument("--baseline-steps", type=int, default=None, help="timed fp32 eager steps (default 6; smoke 3)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile on the optimized path")
    p.add_argument("--no-baseline", action="store_true", help="skip the fp32 eager baseline")
    args = p.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke (CPU) to check the script", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    micro = args.micro_batch or (16 if cuda else 4)
    block = args.block or (1024 if cuda else 64)
    steps = args.steps or (40 if cuda else 3)
    warmup = args.warmup or (8 if cuda else 1)
    base_steps = args.baseline_steps or (6 if cuda else 3)
    vocab = 50257 if cuda else 512
    arch = "gpt2" if cuda else None
    t_start = time.perf_counter()
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"micro-batch {micro} x {block} tokens", flush=True)
    batches = synthetic_batches(max(steps, warmup, base_steps) + warmup, micro, block, vocab)
    real = sum(b.n_real for b in batches) / sum(b.n_tokens for b in batches)

    # Optimized: what a GPU worker runs (precision auto -> bf16 on CUDA; TF32 for the fp32 parts).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = build(arch, block, vocab, device)
    fpt, n_params = flops_per_token(model, block)
    cfg = step_config(device, compile=cuda and not args.no_compile)  # precision auto: bf16 on CUDA
    fast = measure("bf16+compile" if cfg.compile else cfg.precision, TrainStep(model, cfg, device), batches, warmup,
                   steps, device)
    mfu = fast * fpt / (args.peak_tflops * 1e12)
    del model
    if cuda:
        torch.cuda.empty_cache()

    base = None
    if not args.no_baseline:
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32, as an fp32 eager loop would run by default
        torch.backends.cudnn.allow_tf32 = False
        model = build(arch, block, vocab, device)
        base = measure("fp32 eager", TrainStep(model, step_config(device, precision="fp32"), device),
                       batches, 1, base_steps, device)
    ratio = fast / base if base else None
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "params_non_pos_emb": n_params,
           "flops_per_token": fpt, "micro_batch": micro, "block": block, "tokens_per_s": round(fast),
           "mfu": round(mfu, 4), "peak_tflops": args.peak_tflops,
           "fp32_eager_tokens_per_s": round(base) if base else None,
           "speedup_vs_fp32_eager": round(ratio, 2) if ratio else None, "real_token_share": round(real, 4),
           "seconds": round(time.perf_counter() - t_start, 1)}
    print(f"MFU {mfu:.1%} (target {MFU_TARGET:.0%} on an H100); "
          + (f"{ratio:.2f}x the fp32 eager baseline (target {RATIO_TARGET:.0f}x)" if ratio else "no baseline"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
