"""GPU batching benchmark: tokens/s at batch 32 vs batch 1 through chatray's own generation engine.

Runs where there is PyTorch and transformers but no Ray (a lent GPU machine): it drives
``chatray.serve.async_engine.AsyncEngine`` -- the exact continuous-batching code a Serve ``Generator`` replica runs
-- on a GPT-2 124M-config model with random weights (nothing is downloaded).

    python benchmarks/gpu_serve.py              # on a CUDA machine (target: ratio >= 10x; < 3 min on an H100)
    python benchmarks/gpu_serve.py --smoke      # tiny config on CPU, seconds: checks the script itself

Prints one line per phase and a final JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from chatray.model import resolve_device, resolve_dtype  # noqa: E402
from chatray.serve.async_engine import AsyncEngine  # noqa: E402
from chatray.serve.engine import GenerationEngine  # noqa: E402
from chatray.serve.sampling import SamplingParams  # noqa: E402

TARGET = 10.0


def build_tokenizer():
    """A small byte-level BPE tokenizer trained in-process (the model keeps GPT-2's 50257-row vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["the quick brown fox jumps over the lazy dog", "hello, how are you? I am fine, thank you.",
             "你喜欢什么运动? 我喜欢游泳和跑步。", "Ray Serve scales model serving across a cluster."] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(smoke: bool, device: str, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64) if smoke else GPT2Config()  # GPT2Config() is the 124M shape
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval(), sum(p.numel() for p in model.parameters())


async def _concurrent(engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams]) -> int:
    done = await asyncio.gather(*(engine.generate(p, sp) for p, sp in zip(prompts, params)))
    return sum(c.completion_tokens for c in done)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device or "auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (CPU) or on a GPU machine")
    dtype = resolve_dtype(args.dtype, device)
    tok = build_tokenizer()
    model, n_params = build_model(args.smoke, device, dtype)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"model: GPT-2 {'smoke' if args.smoke else '124M'} config, {n_params / 1e6:.1f}M params, {dtype}, "
          f"device {name}", flush=True)
    engine = GenerationEngine(model, tok, max_batch_size=args.batch)
    base = tok("hello, how are you? the quick brown fox jumps over the lazy dog", add_special_tokens=False)
    prompt = (base["input_ids"] * 64)[: args.prompt_tokens]

    def params(i: int) -> SamplingParams:
        # Per-request settings in one batch: half greedy, half nucleus sampling with their own seeds.
        if i % 2 == 0:
            return SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        return SamplingParams(max_tokens=args.new_tokens, temperature=0.8, top_p=0.95, top_k=50, seed=i,
                              ignore_eos=True)

    async def main() -> dict:
        aengine = AsyncEngine(engine, batch_wait_timeout_s=0.0, step_delay_s=0.0)
        try:
            await _concurrent(aengine, [prompt] * min(4, args.batch), [params(i) for i in range(4)])  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            single_tokens = 0
            for i in range(args.single_requests):
                single_tokens += (await aengine.generate(prompt, params(i))).completion_tokens
            single_s = time.perf_counter() - t0
            single = single_tokens / single_s
            print(f"batch 1 : {single_tokens} tokens in {single_s:.2f}s = {single:.1f} tokens/s", flush=True)
            t0 = time.perf_counter()
            batch_tokens = 0
            for r in range(args.batch_rounds):
                batch_tokens += await _concurrent(aengine, [prompt] * args.batch,
                                                  [params(r * args.batch + i) for i in range(args.batch)])
            batch_s = time.perf_counter() - t0
            batched = batch_tokens / batch_s
            print(f"batch {args.batch}: {batch_tokens} tokens in {batch_s:.2f}s = {batched:.1f} tokens/s "
                  f"(max batch seen {engine.stats['max_batch_seen']})", flush=True)
        finally:
            aengine.shutdown()
        return {"single_tokens_per_s": round(single, 1), "batched_tokens_per_s": round(batched, 1),
                "ratio": round(batched / single, 2)}

    t_start = time.perf_counter()
    res = asyncio.run(main())
    res.update({"batch": args.batch, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt), "device": name,
                "dtype": str(dtype).removeprefix("torch."), "params_m": round(n_params / 1e6, 1),
                "target_ratio": TARGET, "meets_target": res["ratio"] >= TARGET,
                "seconds": round(time.perf_counter() - t_start, 1)})
    print(f"ratio batch {args.batch} / batch 1 = {res['ratio']:.1f}x (target >= {TARGET:g}x)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few seconds (script check)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--single-requests", type=int, default=4, help="requests run one at a time for batch 1")
    ap.add_argument("--batch-rounds", type=int, default=3, help="rounds of --batch concurrent requests")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.smoke:
        args.device = args.device or "cpu"
        args.new_tokens, args.batch, args.single_requests, args.batch_rounds = 16, 8, 2, 1
    res = run(args)
    line = json.dumps(res)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
