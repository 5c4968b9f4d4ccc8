"""Serving benchmark on CPU: HTTP overhead, batching gain and cold start, as ratios measured in one run.

For a tiny and a GPT-2-124M-config checkpoint (random weights, built here: nothing is downloaded):
  1. overhead: p50 latency of one request over HTTP (32 new tokens, greedy) / the same generate call
     in-process through the same engine, measured alternately -- target <= 1.10x; also the p50 of GET /healthz
     (Serve's proxy + the ingress, no model call) and the ratio that alone would give: the floor here; and of
     GET /v1/models (proxy -> ingress -> generator, no model work: what the Serve data plane costs);
  2. batching: aggregate generated tokens/s with 16 concurrent clients / one client at a time -- target >= 4x;
  3. cold start: deploy (``serve.run`` of the app on the running Ray, what ``serve deploy`` triggers) to the
     first 200 from /v1/models, seconds; plus ``chatray serve`` from process start (includes starting Ray).

    python benchmarks/bench_serve.py                 # both models (several minutes on 2 CPU cores)
    python benchmarks/bench_serve.py --quick         # tiny model only, fewer requests

The Serve data plane is chatray's (chatray.rayenv: direct gRPC between Serve's proxy and replicas), as
for the Ray that ``chatray serve`` starts; ``--stock-serve`` measures Ray's stock one (Ray actor calls) instead.
Both sides use the same number of torch threads (``--threads``, default 1: on a shared 2-core machine
more threads than free cores makes small matmuls much slower, for the replica and the baseline alike).
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "tests"))  # support.checkpoints: the checkpoint builder the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NEW_TOKENS = 32
PROMPT = "hello, how are you? the quick brown fox jumps over the lazy dog and"


def in_process_engine(ckpt: Path, threads: int):
    """The same engine the replica runs, in this process (the baseline), and the prompt's token ids."""
    import torch

    from chatray.model import load_model, load_model_tokenizer
    from chatray.serve.app import ServeArgs
    from chatray.serve.engine import GenerationEngine

    torch.set_num_threads(threads)
    model, tok = load_model(ckpt, device="cpu", dtype="auto"), load_model_tokenizer(ckpt)
    engine = GenerationEngine(model, tok, max_batch_size=ServeArgs().max_batch_size)
    return engine, tok(PROMPT, add_special_tokens=False)["input_ids"]


def paired_p50(engine, url: str, ids: list[int], runs: int) -> tuple[float, float]:
    """p50 of the in-process call and of the HTTP request, measured alternately so that load from other
    processes on this machine affects both sides alike."""
    import httpx

    from chatray.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    body = {"prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    local, remote = [], []
    with httpx.Client(timeout=300) as client:
        def http() -> None:
            r = client.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == NEW_TOKENS

        engine.generate([ids], params)  # warm-up both
        http()
        for _ in range(runs):
            t0 = time.perf_counter()
            engine.generate([ids], params)
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            http()
            remote.append(time.perf_counter() - t0)
    return statistics.median(local), statistics.median(remote)


def noop_p50(url: str, runs: int, path: str = "/healthz") -> float:
    """p50 of a GET that does no model work. /healthz: the ingress answers itself, so this is what Serve's HTTP
    proxy and one replica hop cost on this machine (a floor under any generation request's overhead).
    /v1/models: the ingress asks a generator replica for its model info, so both hops of a generation request."""
    import httpx

    times = []
    with httpx.Client(timeout=60) as client:
        client.get(url + path).raise_for_status()
        for _ in range(runs):
            t0 = time.perf_counter()
            client.get(url + path).raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _post(client, url: str, ids: list[int]) -> int:
    r = await client.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": NEW_TOKENS,
                                                         "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def throughput(url: str, ids: list[int], clients: int, requests_each: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def one_client() -> int:
            return sum([await _post(client, url, ids) for _ in range(requests_each)])

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one_client() for _ in range(clients))))
        return tokens / (time.perf_counter() - t0)


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


def bench_model(name: str, ckpt: Path, url: str, args: argparse.Namespace) -> dict:
    from ray import serve

    from chatray.serve.app import build_app_with_options

    engine, ids = in_process_engine(ckpt, args.threads)
    app = build_app_with_options(
        {"checkpoint": f"{ckpt.parent}:best", "api_key_env": None, "max_batch_size": 16, "batch_wait_timeout_s": 0.0},
        {"Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
         "Generator": {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": -1,
                       "ray_actor_options": {"num_cpus": args.threads}}})
    t0 = time.perf_counter()
    serve.run(app, name=name, route_prefix="/")
    cold = time.perf_counter() - t0 + wait_200(url, 120)
    base_p50, http = paired_p50(engine, url, ids, args.runs)
    floor = noop_p50(url, 4 * args.runs)
    two_hops = noop_p50(url, 4 * args.runs, "/v1/models")
    del engine
    single = asyncio.run(throughput(url, ids, 1, args.sequential))
    concurrent = asyncio.run(throughput(url, ids, args.clients, args.requests_each))
    serve.delete(name)
    row = {"model": name, "in_process_p50_s": round(base_p50, 4), "http_p50_s": round(http, 4),
           "overhead_ratio": round(http / base_p50, 3), "healthz_p50_s": round(floor, 4),
           "models_p50_s": round(two_hops, 4),
           "overhead_floor_ratio": round((base_p50 + floor) / base_p50, 3), "tokens_per_s_1_client": round(single, 1),
           f"tokens_per_s_{args.clients}_clients": round(concurrent, 1),
           "batching_ratio": round(concurrent / single, 2), "deploy_to_first_200_s": round(cold, 1)}
    print(f"{name:10s} overhead {row['overhead_ratio']:.3f}x (http p50 {http * 1000:.1f} ms / in-process "
          f"{base_p50 * 1000:.1f} ms; Serve's own /healthz p50 {floor * 1000:.1f} ms puts the floor at "
          f"{row['overhead_floor_ratio']:.3f}x; /v1/models p50 {two_hops * 1000:.1f} ms)  "
          f"batching {row['batching_ratio']:.2f}x ({single:.1f} -> {concurrent:.1f} tok/s)  deploy->200 {cold:.1f}s",
          flush=True)
    return row


def chatray_serve_cold_start(ckpt: Path, port: int) -> float:
    """``chatray serve`` as a user runs it (new local Ray, deploy, first 200), seconds from process start."""
    import yaml

    cfg = ckpt.parents[1] / "serve_config.yaml"  # inside the benchmark's work folder (removed at the end)

    data = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    data["applications"][0]["args"]["checkpoint"] = f"{ckpt.parent}:best"
    for d in data["applications"][0]["deployments"]:
        d.setdefault("ray_actor_options", {})["num_cpus"] = 0.1 if d["name"] == "Ingress" else 1
    cfg.write_text(yaml.safe_dump(data))
    exe = Path(sys.executable).parent / "chatray"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "serve", "--config", str(cfg), "--port", str(port), "--address", "local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_200(f"http://127.0.0.1:{port}", 300)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(2)  # Ctrl-C: chatray serve shuts Serve and its own Ray down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer requests")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the replica and the baseline")
    ap.add_argument("--runs", type=int, default=None, help="latency samples per side (default 7, --quick 5)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-each", type=int, default=2)
    ap.add_argument("--sequential", type=int, default=6, help="requests for the one-client-at-a-time baseline")
    ap.add_argument("--no-cli-cold-start", action="store_true")
    ap.add_argument("--stock-serve", action="store_true",
                    help="Ray's stock Serve data plane (RAY_SERVE_USE_GRPC_BY_DEFAULT=0) instead of chatray's")
    args = ap.parse_args()
    from chatray.rayenv import apply_serve_env

    if args.stock_serve:
        os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] = "0"
    apply_serve_env()  # what `chatray serve` and `chatray up` give the Ray they start
    dataplane = "grpc" if os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1" else "stock"  # as Ray reads it
    print(f"Serve data plane: {dataplane}", flush=True)
    if args.quick:
        args.sequential, args.requests_each = 4, 1
    args.runs = args.runs or (5 if args.quick else 7)

    import ray
    from ray import serve
    from support.checkpoints import make_checkpoint
    from support.ports import free_port

    work = Path(tempfile.mkdtemp(prefix="chatray-bench-"))
    sizes = ["tiny"] if args.quick else ["tiny", "gpt2-124m"]
    ckpts = {s: make_checkpoint(work / s / "checkpoint_00000001", size=s) for s in sizes}
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        try:
            for s in sizes:
                rows.append(bench_model(s, ckpts[s], f"http://127.0.0.1:{port}", args))
        finally:
            serve.shutdown()
            ray.shutdown()
        result = {"models": rows, "targets": {"overhead_ratio": "<= 1.10", "batching_ratio": ">= 4"},
                  "threads": args.threads, "new_tokens": NEW_TOKENS, "clients": args.clients, "dataplane": dataplane}
        if not args.no_cli_cold_start and not args.quick:
            cold = round(chatray_serve_cold_start(ckpts["tiny"], free_port()), 1)
            result["chatray_serve_start_to_first_200_s"] = cold
            print(f"chatray serve (new Ray + deploy) -> first 200: {cold}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
