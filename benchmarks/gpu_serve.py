"""GPU serving benchmark: chatray's engine at 1, 64 and 256 concurrent requests, against baselines in the same run.

Runs where there is PyTorch and transformers but no Ray (a lent GPU machine): it drives
``chatray.serve.async_engine.AsyncEngine`` over ``chatray.serve.engine.GenerationEngine`` -- the exact code a Serve
``Generator`` replica runs (KV cache, scheduler, device sampling, CUDA-graph decode) -- on a GPT-2 124M-config
model with random weights in bf16 (nothing is downloaded). Prompts of 64 tokens, 128 new tokens (EOS ignored),
half greedy and half nucleus-sampled with their own seeds.

Baselines measured in the same run, on the same model and prompts:
  * transformers ``generate`` with a static batch of the same size (1 and 64), eager;
  * vLLM, when ``import vllm`` works on the machine (the model is saved to a temporary folder for it).

Targets (issue 12): >= 1,000 tokens/s at 1 request; >= 30,000 tokens/s aggregate at 64; inter-token latency
p99 <= 2x p50 at 64; the 256 figure is reported.

    python benchmarks/gpu_serve.py              # on a CUDA machine (a few minutes on an H100)
    python benchmarks/gpu_serve.py --smoke      # tiny config on CPU, seconds: checks the script itself

Prints one line per phase and a final JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
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

TARGETS = {"tokens_per_s_1": 1000.0, "tokens_per_s_64": 30000.0, "itl_p99_over_p50_64": 2.0}


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


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    """``n`` different prompts of ``length`` token ids (seeded)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def params(i: int, new_tokens: int) -> SamplingParams:
    """Per-request settings in one batch: half greedy, half nucleus sampling with their own seeds."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=new_tokens, temperature=0.8, top_p=0.95, top_k=50, seed=i, ignore_eos=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def concurrent(engine: AsyncEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    """All requests at once, streamed: aggregate tokens/s, TTFT and inter-token latency percentiles."""
    gaps: list[float] = []
    ttfts: list[float] = []

    async def one(i: int, prompt: list[int]) -> int:
        t0 = last = time.perf_counter()
        n = 0
        async for out in engine.stream(prompt, params(i, new_tokens)):
            now = time.perf_counter()
            if n == 0:
                ttfts.append(now - t0)
            else:
                gaps.append(now - last)
            last, n = now, out.completion_tokens
        return n

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [gaps[0] if gaps else 0.0] * 99
    tq = statistics.quantiles(ttfts, n=100) if len(ttfts) > 1 else [ttfts[0]] * 99
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "itl_p50_ms": round(q[49] * 1000, 3), "itl_p99_ms": round(q[98] * 1000, 3),
            "ttft_p50_ms": round(tq[49] * 1000, 2), "ttft_p99_ms": round(tq[98] * 1000, 2)}


def hf_generate(model, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """transformers ``generate``, one static batch, greedy, EOS ignored: tokens/s."""
    ids = torch.tensor(prompts, device=device)
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
              "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids[:, :8], **{**kwargs, "attention_mask": kwargs["attention_mask"][:, :8],
                                      "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        _sync(device)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - t0)


def vllm_figures(model, tok, prompts: dict[int, list[list[int]]], new_tokens: int) -> dict | None:
    """vLLM on the same weights and prompts (None when vllm does not import here)."""
    try:
        from vllm import LLM, TokensPrompt
        from vllm import SamplingParams as VP
    except Exception as e:  # noqa: BLE001 - not installed, or no matching CUDA build
        print(f"vllm: not available ({type(e).__name__}: {str(e)[:80]}); no vLLM ratio", flush=True)
        return None
    folder = tempfile.mkdtemp(prefix="chatray-vllm-")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    llm = LLM(model=folder, dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=1024)
    sp = VP(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[1][0])], sp)  # warm-up
    figures = {}
    for n, batch in prompts.items():
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        figures[n] = round(sum(len(o.outputs[0].token_ids) for o in outs) / seconds, 1)
        print(f"vllm     {n:>3} concurrent: {figures[n]:,.1f} tokens/s", flush=True)
    return figures


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device or "auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (CPU) or on a GPU machine")
    dtype = resolve_dtype(args.dtype, device)
    tok = build_tokenizer()
    model, n_params = build_model(args.smoke, device, dtype)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"model: GPT-2 {'smoke' if args.smoke else '124M'} config, {n_params / 1e6:.1f}M params, {dtype}, "
          f"device {name}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    core = GenerationEngine(model, tok, max_batch_size=max(args.concurrency), max_num_batched_tokens=args.budget)
    graphs = core.warm_up()
    print(f"engine: {core.max_batch_size} slots, KV cache {core.cache.nbytes() / 2**20:.0f} MiB, {graphs} CUDA graphs "
          f"captured in {time.perf_counter() - t0:.1f}s", flush=True)
    batches = {n: prompts_for(n, args.prompt_tokens, model.config.vocab_size) for n in (1, *args.concurrency)}
    res: dict = {"device": name, "dtype": str(dtype).removeprefix("torch."), "params_m": round(n_params / 1e6, 1),
                 "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "torch": torch.__version__}

    async def engine_runs() -> None:
        engine = AsyncEngine(core, batch_wait_timeout_s=0.0, step_delay_s=0.0)
        try:
            await concurrent(engine, batches[1] * 4, 8)  # warm-up: prefill kernels, sampler paths
            singles = [await concurrent(engine, batches[1], args.new_tokens) for _ in range(args.single_requests)]
            res["engine_1"] = max(singles, key=lambda r: r["tokens_per_s"])
            print(f"engine     1 concurrent: {res['engine_1']}", flush=True)
            for n in args.concurrency:
                res[f"engine_{n}"] = await concurrent(engine, batches[n], args.new_tokens)
                print(f"engine {n:>5} concurrent: {res[f'engine_{n}']}", flush=True)
        finally:
            engine.shutdown()

    asyncio.run(engine_runs())
    for n in (1, args.hf_batch):
        res[f"hf_generate_{n}_tokens_per_s"] = round(hf_generate(model, batches[n], args.new_tokens, device), 1)
        ratio = res[f"engine_{n}"]["tokens_per_s"] / res[f"hf_generate_{n}_tokens_per_s"]
        res[f"ratio_vs_hf_{n}"] = round(ratio, 2)
        print(f"hf generate {n:>3} static: {res[f'hf_generate_{n}_tokens_per_s']:,.1f} tokens/s "
              f"(engine / hf = {ratio:.2f}x)", flush=True)
    if device.startswith("cuda") and not args.no_vllm:
        v = vllm_figures(model, tok, {n: batches[n] for n in (1, 64, 256) if n in batches}, args.new_tokens)
        if v:
            res["vllm_tokens_per_s"] = v
            res["ratio_vs_vllm"] = {n: round(res[f"engine_{n}"]["tokens_per_s"] / t, 2) for n, t in v.items()}
            print(f"engine / vllm: {res['ratio_vs_vllm']}", flush=True)
    e64 = res.get("engine_64")
    checks = {"tokens_per_s_1": res["engine_1"]["tokens_per_s"] >= TARGETS["tokens_per_s_1"]}
    if e64:
        checks["tokens_per_s_64"] = e64["tokens_per_s"] >= TARGETS["tokens_per_s_64"]
        checks["itl_p99_over_p50_64"] = e64["itl_p99_ms"] <= TARGETS["itl_p99_over_p50_64"] * e64["itl_p50_ms"]
    res.update({"targets": TARGETS, "meets_targets": checks, "steps": core.stats["steps"]})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few seconds (script check)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--hf-batch", type=int, default=64, help="static batch of the transformers baseline")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--single-requests", type=int, default=3, help="runs of one request (the best is kept)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.smoke:
        args.device = args.device or "cpu"
        args.new_tokens, args.concurrency, args.hf_batch, args.single_requests = 16, [8], 8, 1
        args.budget = 1024
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(res)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
