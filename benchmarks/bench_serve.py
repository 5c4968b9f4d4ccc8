"""Serving benchmark on CPU: chatray's engine vs transformers ``generate``, HTTP vs in-process, and latency under a
Poisson load, as ratios and percentiles measured in one run.

On a GPT-2-124M-config checkpoint with random weights (built here: nothing is downloaded) and the same prompts
(chat-length text, 20-60 tokens, token ids fixed by a seed), every request greedy with 32 new tokens, EOS ignored:
  1. engine vs HF: aggregate tokens/s of the in-process engine (all N requests submitted at once to
     ``GenerationEngine.generate``) / transformers ``model.generate`` on a static, left-padded batch of the same N
     prompts (``use_cache=True``), at N = 1, 16 and 64; the two sides' repetitions alternate and medians are
     compared. Targets: >= 1.0x at 1, >= 1.2x at 16 and 64. Also checks, in fp32, that both give the same token
     ids for every prompt (the engine claims greedy parity with ``generate``);
  2. HTTP vs in-process: 16 concurrent clients on ``POST /v1/completions`` of a real Ray Serve app (one Generator
     replica) / the in-process engine given the same 16 requests at once, alternated, medians. Target >= 0.9x;
  3. Poisson load: ``--requests`` streaming requests (``stream: true``, server-sent events) arriving at ``--rate``
     requests/s (seeded); TTFT, inter-token latency (ITL) and time per output token (TPOT), p50 and p99, as
     ``vllm bench serve`` defines them: TTFT from sending to the first token's chunk, ITL the gaps between
     successive tokens' chunks (pooled over all requests), TPOT per request (latency - TTFT) / (tokens - 1).
     The requests ask for ``logprobs: 0`` so that each token is streamed in a chunk of its own, as vLLM's are.
     The load is also printed as a share of the replica's throughput measured in part 2;
  and, for information: deploy (``serve.run`` on the running Ray) to the first 200 from /v1/models, and the p50 of
  GET /v1/models (proxy -> ingress -> generator, no model work: what Serve's data plane costs).

    python benchmarks/bench_serve.py                 # GPT-2 124M shape, 4-6 minutes on 2 CPU cores
    python benchmarks/bench_serve.py --quick         # tiny model, one repetition: checks the script (~1 minute)
    python benchmarks/bench_serve.py --rate 1.5 --requests 96

Every side uses the same number of torch threads (``--threads``, default 1: on a shared 2-core machine more
threads than free cores makes small matmuls much slower, for the engine and the baseline alike); the replica
gets as many CPUs. The Serve data plane is chatray's (chatray.rayenv: direct gRPC between Serve's proxy and
replicas), as for the Ray that ``chatray serve`` starts; ``--stock-serve`` measures Ray's stock one instead.
Prints a table and a final JSON line with every ratio, its target and whether it is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "tests"))  # support.checkpoints: the checkpoint builder the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NEW_TOKENS = 32
CONCURRENCY_TARGETS = {1: 1.0, 16: 1.2, 64: 1.2}  # engine / HF tokens/s
HTTP_CLIENTS = 16
HTTP_TARGET = 0.9  # HTTP / in-process tokens/s
PROMPT_TOKENS = (20, 60)
# Chat-like sentences the prompts are cut from (the test tokenizer is a small BPE: about 1 token per 2 characters).
SENTENCES = [
    "hello, how are you today?", "what is ray and why would I use it for training?",
    "tell me about the quick brown fox that jumps over the lazy dog.", "can you summarise this paragraph for me?",
    "I am fine, thank you, and you?", "please write a short poem about the sea at night.",
    "how do I fine-tune a small language model on my own conversations?",
    "what is the difference between a process and a thread?", "be brief: which is larger, 7 or 12?",
    "translate good morning into French and Spanish.", "why is the sky blue during the day and red at sunset?",
    "list three things to pack for a weekend hike.", "what time zone is Tokyo in?",
    "explain continuous batching as if I were five.", "I would like to book a table for two at eight.",
    "a framework for distributed python.",
]


@dataclass
class Timings:
    """Alternated measurements of two sides: seconds per repetition, and tokens generated per repetition."""

    tokens: int
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)

    def tok_s(self, side: Literal["a", "b"]) -> float:
        return self.tokens / statistics.median(getattr(self, side))

    def pair_range(self) -> list[float]:
        """The lowest and highest a/b tokens/s ratio of one repetition's pair (run back to back): how much the
        load on the machine moved the ratio during the measurement."""
        ratios = [tb / ta for ta, tb in zip(self.a, self.b)]
        return [round(min(ratios), 3), round(max(ratios), 3)]


def make_prompts(tokenizer: Any, count: int, seed: int) -> list[list[int]]:
    """``count`` token-id prompts of 20-60 tokens each, cut from shuffled :data:`SENTENCES` (seeded)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        want = rng.randint(*PROMPT_TOKENS)
        ids: list[int] = []
        while len(ids) < want:
            ids += tokenizer(" ".join(rng.sample(SENTENCES, 3)) + " ", add_special_tokens=False)["input_ids"]
        prompts.append(ids[:want])
    return prompts


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default (what vLLM's benchmark uses)."""
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def _span(bounds: list[float]) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}x"


def alternate(side_a: Callable[[], object], side_b: Callable[[], object], reps: int, tokens: int) -> Timings:
    """Time ``reps`` runs of each side, alternating which goes first, so background load hits both alike."""
    t = Timings(tokens)
    order: list[tuple[Literal["a", "b"], Callable[[], object]]] = [("a", side_a), ("b", side_b)]
    for rep in range(reps):
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            getattr(t, name).append(time.perf_counter() - t0)
    return t


# ---------------------------------------------------------------------------------------------- 1. engine vs HF
def load_sides(ckpt: Path, threads: int, max_batch_size: int) -> tuple[Any, Any, Any]:
    """The engine the replica runs and a separate copy of the model for transformers' ``generate`` (the engine
    may adapt the model it is given), both in this process; and the tokenizer."""
    import torch

    from chatray.model import load_model, load_model_tokenizer
    from chatray.serve.engine import GenerationEngine

    torch.set_num_threads(threads)
    tok = load_model_tokenizer(ckpt)
    engine = GenerationEngine(load_model(ckpt, device="cpu", dtype="auto"), tok, max_batch_size=max_batch_size)
    hf_model = load_model(ckpt, device="cpu", dtype="auto")
    # generate falls back to the model's generation config for an EOS the call leaves unset: forget it here, so
    # that every row runs its NEW_TOKENS (ignore_eos on the engine's side) and EOS keeps its logit for parity.
    hf_model.generation_config.eos_token_id = None
    return engine, hf_model, tok


def hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy ``model.generate`` on one static left-padded batch; the new token ids of each row."""
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    limit = len(tokenizer)

    class _VocabLimit(LogitsProcessor):
        """Ids past the tokenizer (padded embedding rows) are never sampled: the engine masks them too."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, limit:] = float("-inf")
            return scores

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=pad,
                           use_cache=True)
    processors = LogitsProcessorList([_VocabLimit()] if limit < model.config.vocab_size else [])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, logits_processor=processors)
    assert out.shape == (len(prompts), width + NEW_TOKENS), f"HF generated {tuple(out.shape)}"
    return out[:, width:].tolist()


def engine_generate(engine: Any, prompts: list[list[int]], logprobs: int | None = None) -> list[Any]:
    """All prompts submitted at once; greedy, NEW_TOKENS each (EOS ignored)."""
    from chatray.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    outs = engine.generate(prompts, params)
    assert all(o.completion_tokens == NEW_TOKENS for o in outs), [o.completion_tokens for o in outs]
    return outs


def compare_at(engine: Any, hf_model: Any, tok: Any, batch: list[list[int]], reps: int) -> dict[str, Any]:
    """Engine vs HF generate on one batch of prompts: tokens/s of each, their ratio, greedy token-id parity."""
    n = len(batch)
    # The engine's token ids come with logprobs, which the timed runs do not ask for: one run apart.
    engine_ids = [[lp.token_id for lp in o.logprobs] for o in engine_generate(engine, batch, logprobs=0)]
    hf_ids: list[list[int]] = []

    def hf_side() -> None:
        hf_ids[:] = hf_generate(hf_model, tok, batch)

    # One request's runs are short (about a second each here), so more of them, for a steadier median.
    t = alternate(lambda: engine_generate(engine, batch), hf_side, reps if n > 1 else 3 * reps, n * NEW_TOKENS)
    assert all(len(ids) == NEW_TOKENS for ids in hf_ids + engine_ids)
    same = sum(a == b for a, b in zip(engine_ids, hf_ids))
    ratio = t.tok_s("a") / t.tok_s("b")
    row = {"concurrency": n, "engine_tok_s": round(t.tok_s("a"), 1), "hf_tok_s": round(t.tok_s("b"), 1),
           "ratio": round(ratio, 3), "target": f">= {CONCURRENCY_TARGETS[n]}",
           "met": ratio >= CONCURRENCY_TARGETS[n], "pair_ratio_range": t.pair_range(),
           "greedy_ids_match": f"{same}/{n}"}
    print(f"  N={n:<3d} engine {row['engine_tok_s']:8.1f} tok/s  HF generate {row['hf_tok_s']:8.1f} tok/s  "
          f"ratio {ratio:.3f}x (pairs {_span(row['pair_ratio_range'])}; target {row['target']}: "
          f"{'met' if row['met'] else 'MISSED'})  same greedy ids {same}/{n} prompts", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- 2. HTTP
async def _complete(client: Any, url: str, ids: list[int]) -> int:
    r = await client.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": NEW_TOKENS,
                                                         "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    tokens = r.json()["usage"]["completion_tokens"]
    assert tokens == NEW_TOKENS, f"HTTP reply has {tokens} tokens"
    return tokens


async def http_vs_engine(engine: Any, url: str, prompts: list[list[int]], reps: int) -> dict[str, Any]:
    """The same requests, all at once, through HTTP (one client each) and to the in-process engine, alternated."""
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        async def burst() -> None:
            await asyncio.gather(*(_complete(client, url, p) for p in prompts))

        await burst()  # warm-up: the replica's first forward and the client's connections
        t = Timings(len(prompts) * NEW_TOKENS)
        for rep in range(reps):
            # The in-process side blocks this event loop while it runs: nothing else is in flight then.
            for side in ("http", "engine") if rep % 2 == 0 else ("engine", "http"):
                t0 = time.perf_counter()
                if side == "http":
                    await burst()
                else:
                    engine_generate(engine, prompts)
                (t.a if side == "http" else t.b).append(time.perf_counter() - t0)
    ratio = t.tok_s("a") / t.tok_s("b")
    row = {"clients": len(prompts), "http_tok_s": round(t.tok_s("a"), 1), "in_process_tok_s": round(t.tok_s("b"), 1),
           "ratio": round(ratio, 3), "target": f">= {HTTP_TARGET}", "met": ratio >= HTTP_TARGET,
           "pair_ratio_range": t.pair_range()}
    print(f"  {len(prompts)} clients: HTTP {row['http_tok_s']:.1f} tok/s  in-process {row['in_process_tok_s']:.1f} "
          f"tok/s  ratio {ratio:.3f}x (pairs {_span(row['pair_ratio_range'])}; target {row['target']}: "
          f"{'met' if row['met'] else 'MISSED'})", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- 3. Poisson load
@dataclass
class _Stream:
    """One streamed request as the client saw it (seconds)."""

    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    chunks: int = 0
    streamed: int = 0  # tokens the chunks carried
    tokens: int = 0  # completion tokens, from the usage chunk


async def _stream_one(client: Any, url: str, ids: list[int]) -> _Stream:
    # logprobs: every token goes out in a chunk of its own, as vLLM streams them. Without it, the text of a token
    # that ends mid-character (many do, from a random model) is held back and sent with a later one, and the
    # gaps would measure the detokenizer rather than the engine.
    body = {"prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 0}
    s = _Stream(start=time.perf_counter())
    last = s.start
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"in-band stream error: {chunk['error']}")
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            tokens = len((choice.get("logprobs") or {}).get("tokens", ()))
            if not tokens:
                continue  # the usage chunk, or the finish chunk (sent in the same step as the last token)
            s.chunks += 1
            s.streamed += tokens
            if s.ttft is None:
                s.ttft = now - s.start
            else:
                s.itl.append(now - last)
            last = now
    s.latency = last - s.start
    assert s.tokens == s.streamed == NEW_TOKENS, f"stream sent {s.streamed} tokens, usage says {s.tokens}"
    return s


async def poisson_load(url: str, prompts: list[list[int]], rate: float, count: int, seed: int) -> dict[str, Any]:
    """``count`` streaming requests with exponential gaps of mean 1/rate (a Poisson process, seeded)."""
    import httpx

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(count):
        arrivals.append(t)
        t += rng.expovariate(rate)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count + 4)) as client:
        await _stream_one(client, url, prompts[0])  # warm-up: connection, replica
        t0 = time.perf_counter()

        async def at(offset: float, ids: list[int]) -> _Stream:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            return await _stream_one(client, url, ids)

        streams = await asyncio.gather(*(at(a, prompts[i % len(prompts)]) for i, a in enumerate(arrivals)))
    duration = max(s.start + s.latency for s in streams) - t0
    ttft = [s.ttft for s in streams if s.ttft is not None]
    itl = [gap for s in streams for gap in s.itl]
    tpot = [(s.latency - s.ttft) / (s.tokens - 1) for s in streams if s.ttft is not None]
    latency = [s.latency for s in streams]
    ms = {f"{name}_{p}_ms": round(1000 * percentile(values, q), 1)
          for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("latency", latency))
          for p, q in (("p50", 50), ("p99", 99))}
    return {"requests": count, "rate_req_s": rate, "seed": seed, "duration_s": round(duration, 2),
            "achieved_req_s": round(count / duration, 2),
            "output_tok_s": round(sum(s.tokens for s in streams) / duration, 1),
            "tokens_per_chunk": round(sum(s.tokens for s in streams) / sum(s.chunks for s in streams), 2), **ms}


# ---------------------------------------------------------------------------------------------- driver
def wait_200(url: str, timeout: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def models_p50(url: str, runs: int = 20) -> float:
    """p50 of GET /v1/models: the ingress asks the Generator replica for its model info, so both hops of a
    generation request with no model work: what Serve's data plane costs (compare with ``--stock-serve``)."""
    import httpx

    times = []
    with httpx.Client(timeout=60) as client:
        client.get(url + "/v1/models").raise_for_status()
        for _ in range(runs):
            t0 = time.perf_counter()
            client.get(url + "/v1/models").raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def deploy(ckpt: Path, url: str, threads: int) -> float:
    """chatray's app with one Generator replica (serving defaults otherwise); seconds to the first 200."""
    from ray import serve

    from chatray.serve.app import build_app_with_options

    app = build_app_with_options(
        {"checkpoint": f"{ckpt.parent}:best", "api_key_env": None},
        {"Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
         "Generator": {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": -1,
                       "ray_actor_options": {"num_cpus": threads}}})
    t0 = time.perf_counter()
    serve.run(app, name="bench", route_prefix="/")
    return time.perf_counter() - t0 + wait_200(url, 180)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, one repetition, 16 Poisson requests: checks the script, not the targets")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on every side (default 1)")
    ap.add_argument("--reps", type=int, default=None, help="alternated repetitions per side (default 3, --quick 1)")
    ap.add_argument("--rate", type=float, default=None,
                    help="Poisson arrivals, requests/s (default 1.75: 50-65%% of what one replica of the 124M "
                         "shape served at 16 clients with the engine of 2026-12; --quick: 40)")
    ap.add_argument("--requests", type=int, default=None, help="requests of the Poisson load (default 48, --quick 16)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    ap.add_argument("--stock-serve", action="store_true",
                    help="Ray's stock Serve data plane (RAY_SERVE_USE_GRPC_BY_DEFAULT=0) instead of chatray's")
    args = ap.parse_args()
    args.size = "tiny" if args.quick else "gpt2-124m"
    args.reps = args.reps or (1 if args.quick else 3)
    args.rate = args.rate or (40.0 if args.quick else 1.75)
    args.requests = args.requests or (16 if args.quick else 48)
    for name in ("threads", "reps", "requests"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.rate <= 0:
        ap.error(f"--rate must be > 0, got {args.rate}")
    return args


def main() -> None:
    args = parse_args()
    from chatray.rayenv import apply_serve_env

    if args.stock_serve:
        os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] = "0"
    apply_serve_env()  # what `chatray serve` and `chatray up` give the Ray they start
    dataplane = "grpc" if os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1" else "stock"  # as Ray reads it

    import ray
    from ray import serve
    from support.checkpoints import make_checkpoint
    from support.ports import free_port

    sizes = sorted(CONCURRENCY_TARGETS)
    work = Path(tempfile.mkdtemp(prefix="chatray-bench-"))
    try:
        ckpt = make_checkpoint(work / args.size / "checkpoint_00000001", size=args.size)
        engine, hf_model, tok = load_sides(ckpt, args.threads, max(sizes))
        prompts = make_prompts(tok, max(sizes), args.seed)
        lengths = [len(p) for p in prompts]
        print(f"{args.size}, {args.threads} torch thread(s), {NEW_TOKENS} new tokens, greedy, EOS ignored; prompts "
              f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}); medians of {args.reps} "
              f"alternated repetitions; Serve data plane: {dataplane}", flush=True)
        print("1. in-process engine vs transformers generate (static batch), aggregate tokens/s", flush=True)
        engine_generate(engine, prompts[:1])  # warm-up both
        hf_generate(hf_model, tok, prompts[:1])
        vs_hf = [compare_at(engine, hf_model, tok, prompts[:n], args.reps) for n in sizes]
        del hf_model

        ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        try:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            cold = deploy(ckpt, url, args.threads)
            hops = models_p50(url)
            print(f"   deploy -> first 200 from /v1/models: {cold:.1f}s; GET /v1/models p50 {1000 * hops:.1f} ms",
                  flush=True)
            print(f"2. HTTP ({HTTP_CLIENTS} concurrent clients, one Generator replica) vs in-process engine",
                  flush=True)
            http = asyncio.run(http_vs_engine(engine, url, prompts[:HTTP_CLIENTS], args.reps))
            del engine
            capacity = http["http_tok_s"] / NEW_TOKENS
            print(f"3. Poisson load over HTTP, streaming: {args.requests} requests at {args.rate:g} req/s "
                  f"({args.rate / capacity:.0%} of the {capacity:.2f} req/s served at {HTTP_CLIENTS} clients)",
                  flush=True)
            load = asyncio.run(poisson_load(url, prompts, args.rate, args.requests, args.seed))
            load["share_of_capacity"] = round(args.rate / capacity, 2)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"   {'':8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name in ("ttft", "itl", "tpot", "latency"):
        print(f"   {name.upper():8s} {load[f'{name}_p50_ms']:8.1f} {load[f'{name}_p99_ms']:8.1f}")
    print(f"   {load['achieved_req_s']} req/s achieved, {load['output_tok_s']} output tok/s over "
          f"{load['duration_s']}s; {load['tokens_per_chunk']} tokens per streamed chunk", flush=True)

    print(f"\n{'measurement':34s} {'ratio':>7s} {'pairs':>12s} {'target':>7s}  met")
    for name, row in [*((f"engine / HF generate, N={r['concurrency']}", r) for r in vs_hf),
                      (f"HTTP / in-process, {HTTP_CLIENTS} clients", http)]:
        print(f"{name:34s} {row['ratio']:7.3f} {_span(row['pair_ratio_range']):>12s} {row['target']:>7s}  "
              f"{'yes' if row['met'] else 'NO'}")
    result = {"model": args.size, "threads": args.threads, "new_tokens": NEW_TOKENS, "reps": args.reps,
              "prompt_tokens": {"min": min(lengths), "max": max(lengths)}, "dataplane": dataplane,
              "engine_vs_hf": vs_hf, "http_vs_in_process": http, "poisson": load,
              "deploy_to_first_200_s": round(cold, 1), "models_p50_ms": round(1000 * hops, 1),
              "all_targets_met": all(r["met"] for r in vs_hf) and http["met"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
