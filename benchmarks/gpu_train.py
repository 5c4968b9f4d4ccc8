"""GPU training benchmark: GPT-2 124M tokens/s and MFU with chatray's own training step.

Runs where there is PyTorch and transformers but no Ray (a lent GPU machine): it builds the step with
``chatray.train.step.make_train_step`` from a run config -- exactly as a Ray Train worker of ``chatray train``
builds it: vocabulary padded to a multiple of 128 on CUDA (``model.pad_vocab_multiple: auto``), TF32 for float32
matmuls, AdamW fused, warm-up + cosine, clipping, bf16 autocast (``train.precision: auto``), torch.compile of the
forward + loss (``model.compile``) -- on a GPT-2 124M-config model with random weights, fed with packed blocks made
by ``chatray.train.batches.pack_rows`` from synthetic dialogue-length rows (nothing is downloaded, no dataset needed).

    python benchmarks/gpu_train.py              # CUDA: bf16 + compile vs an fp32 eager baseline (< 4 min on an H100)
    python benchmarks/gpu_train.py --smoke      # tiny config on CPU, seconds: checks the script itself

MFU = tokens/s x (6N + 12*L*H*Q*T) / peak, with N the parameters of the tokenizer-sized model without the
position embedding (the token embedding counts: it is also the output layer; the padding rows are not useful work
and do not count), L layers, H heads, Q head size, T the block size. The peak is the card's dense bf16 figure,
picked from the device name (H100 SXM / H200 / GH200: 989 TFLOP/s, H100 PCIe: 756, A100: 312) or given with
--peak-tflops. Micro-batch 32 x 1024 by default: llm.c and build-nanogpt train GPT-2 124M at 64 x 1024 on an 80 GB
card, but with their own fused classifier or a leaner model; Hugging Face's GPT-2 under autocast holds more per
token (bf16 logits, their float32 upcast and gradient), and 32 x 1024 keeps well inside an H100 80GB while the
per-step optimizer and clipping work already weighs only a few percent (``--micro-batch 64`` to try llm.c's).
Targets: MFU >= 45% on an H100/H200, and >= 3x the fp32 eager baseline (no padding, no TF32, no compile) measured
in the same run. Prints one line per phase, a check that a step never waits for the device, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chatray.config import FinetuneConfig, from_dict  # noqa: E402
from chatray.data.dataset import IGNORE_INDEX  # noqa: E402
from chatray.model import quiet_transformers, tiny_config  # noqa: E402
from chatray.train.batches import Batch, pack_rows, packed_batch  # noqa: E402
from chatray.train.step import StepConfig, TrainStep, make_train_step  # noqa: E402

MFU_TARGET = 0.45
RATIO_TARGET = 3.0
# Dense bf16 peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a card from its name (``torch.cuda.get_device_name``), or None when unknown."""
    return next((peak for frag, peak in PEAK_TFLOPS if frag in device_name), None)


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


def step_config(device: torch.device, micro: int, model: dict[str, object] | None = None,
                **train: object) -> StepConfig:
    """The step settings a worker on ``device`` would use for a run whose ``model``/``train`` sections set these."""
    cfg = from_dict(FinetuneConfig, {"train": {"lr": 6e-4, "warmup_steps": 2, "max_steps": 1000,
                                               "micro_batch_size": micro, **train}, "model": model or {}})
    return StepConfig.from_config(cfg, device.type)


def build(arch: str | None, block: int, vocab: int) -> torch.nn.Module:
    """A randomly initialised GPT-2 (``arch`` shape; None: a really small one for --smoke), on the CPU."""
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    torch.manual_seed(0)
    cfg = tiny_config(vocab, block, eos_token_id=vocab - 1, arch=arch, dropout=0.0)
    if arch is None:
        cfg.n_layer, cfg.n_head, cfg.n_embd = 2, 2, 64
    return GPT2LMHeadModel(cfg)


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
    print(f"[{name}] {steps} steps: {dt:.2f}s ({dt / steps * 1e3:.1f} ms/step), {tokens / dt:,.0f} tokens/s, "
          f"loss {loss:.3f}", flush=True)
    return tokens / dt


def host_syncs_per_step(step: TrainStep, batch: Batch, device: torch.device) -> int | None:
    """How often one (warm) step makes the host wait for the GPU, as CUDA's sync debug mode counts; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step([batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    step.flush_loss()
    return sum("synchroniz" in str(w.message) for w in caught)


def attention_kind(step: TrainStep, batch: Batch) -> str:
    """How the traced forward calls SDPA: ``causal`` (flash-eligible), ``masked`` (an explicit mask), or ``none``."""
    b = batch.to(step.device)
    kinds = set()
    for graph in torch._dynamo.explain(step._loss_impl)(b.input_ids, b.targets).graphs:
        for node in graph.graph.nodes:
            if "scaled_dot_product_attention" in str(node.target):
                causal = node.kwargs.get("is_causal") is True and node.kwargs.get("attn_mask") is None
                kinds.add("causal" if causal else "masked")
    torch._dynamo.reset()
    return ",".join(sorted(kinds)) or "none"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, seconds")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 32; smoke 4)")
    p.add_argument("--block", type=int, default=None, help="tokens per sequence (default 1024; smoke 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, optimized path (default 30; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, incl. compile (default 8; smoke 1)")
    p.add_argument("--baseline-steps", type=int, default=None, help="timed fp32 eager steps (default 4; smoke 3)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16 peak (default: from the device name, e.g. H100 SXM/H200 989, A100 312)")
    p.add_argument("--pad-vocab-multiple", default=None,
                   help="model.pad_vocab_multiple (default: the config's auto, 128 on CUDA; smoke 128)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile on the optimized path")
    p.add_argument("--no-baseline", action="store_true", help="skip the fp32 eager baseline")
    return p.parse_args()


def optimized(args: argparse.Namespace, device: torch.device, arch: str | None, micro: int, block: int, vocab: int,
              batches: list[Batch]) -> dict[str, object]:
    """The training step as ``chatray train`` runs it on ``device``: its tokens/s and what it is made of."""
    torch.backends.cudnn.allow_tf32 = True
    model = build(arch, block, vocab)
    fpt, n_params = flops_per_token(model, block)  # counted before padding: useful work only
    pad = args.pad_vocab_multiple or ("auto" if device.type == "cuda" else 128)
    cfg = step_config(device, micro, {"compile": device.type == "cuda" and not args.no_compile,
                                      "pad_vocab_multiple": pad if pad == "auto" else int(pad)})
    step = make_train_step(model, cfg, device)
    name = f"{cfg.precision}{'+compile' if cfg.compile else ''}, vocab {step.raw_model.config.vocab_size}"
    attention = attention_kind(step, batches[0])
    tps = measure(name, step, batches, args.warmup, args.steps, device)
    syncs = host_syncs_per_step(step, batches[0], device)
    print(f"attention in the traced forward: {attention}; host syncs in one warm step: {syncs}", flush=True)
    return {"tokens_per_s": tps, "flops_per_token": fpt, "params_non_pos_emb": n_params, "precision": cfg.precision,
            "compile": cfg.compile, "padded_vocab": step.raw_model.config.vocab_size, "attention": attention,
            "host_syncs_per_step": syncs}


def baseline(args: argparse.Namespace, device: torch.device, arch: str | None, block: int, vocab: int,
             batches: list[Batch]) -> float:
    """An fp32 eager loop as PyTorch runs by default: no padding, no TF32, no compile."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    model = build(arch, block, vocab).to(device)
    cfg = step_config(device, batches[0].input_ids.shape[0], precision="fp32")
    return measure("fp32 eager", TrainStep(model, cfg, device), batches, 1, args.baseline_steps, device)


def main() -> int:
    args = parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke (CPU) to check the script", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if cuda else 1.0)
    if peak is None:
        print(f"unknown peak for {device_name}: give --peak-tflops (dense bf16)", file=sys.stderr)
        return 2
    micro = args.micro_batch or (32 if cuda else 4)
    block = args.block or (1024 if cuda else 64)
    args.steps = args.steps or (30 if cuda else 3)
    args.warmup = args.warmup or (8 if cuda else 1)
    args.baseline_steps = args.baseline_steps or (4 if cuda else 3)
    vocab = 50257 if cuda else 500  # smoke: not a multiple of 128 either, so the padding is exercised
    arch = "gpt2" if cuda else None
    t_start = time.perf_counter()
    print(f"device {device_name}, peak {peak:g} TFLOP/s, torch {torch.__version__}, "
          f"micro-batch {micro} x {block} tokens", flush=True)
    batches = synthetic_batches(max(args.steps, args.warmup, args.baseline_steps) + args.warmup, micro, block, vocab)
    real = sum(b.n_real for b in batches) / sum(b.n_tokens for b in batches)

    fast = optimized(args, device, arch, micro, block, vocab, batches)
    tps = float(fast["tokens_per_s"])  # type: ignore[arg-type]
    mfu = tps * float(fast["flops_per_token"]) / (peak * 1e12)  # type: ignore[arg-type]
    if cuda:
        torch.cuda.empty_cache()
    base = None if args.no_baseline else baseline(args, device, arch, block, vocab, batches)
    ratio = tps / base if base else None
    out = {"device": device_name, **fast, "micro_batch": micro, "block": block, "tokens_per_s": round(tps),
           "mfu": round(mfu, 4), "peak_tflops": peak, "fp32_eager_tokens_per_s": round(base) if base else None,
           "speedup_vs_fp32_eager": round(ratio, 2) if ratio else None, "real_token_share": round(real, 4),
           "seconds": round(time.perf_counter() - t_start, 1)}
    print(f"MFU {mfu:.1%} (target {MFU_TARGET:.0%} on an H100/H200); "
          + (f"{ratio:.2f}x the fp32 eager baseline (target {RATIO_TARGET:.0f}x)" if ratio else "no baseline"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
