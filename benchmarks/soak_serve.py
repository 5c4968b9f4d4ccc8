"""Soak test of serving (a benchmark, not a test): steady streaming load through HTTP for minutes on end.

Deploys chatray's app (one Generator replica, a checkpoint built here: nothing is downloaded) on a local Ray,
then ``--clients`` threads each send streaming chat requests back to back for ``--minutes``. Reports:
  * errors: non-200 answers, in-band stream errors and client exceptions (the goal is none);
  * the Generator replica's RSS after the warm-up (the first minute) and at the end (goal: growth <= 10%);
  * per minute: requests, p50/p99 time to first token and p50/p99 request latency, so drift shows.

    python benchmarks/soak_serve.py                         # 10 minutes, 4 clients, tiny model
    python benchmarks/soak_serve.py --minutes 2 --size gpt2-124m

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "tests"))  # support: the checkpoint builder the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPTS = ["hello, how are you?", "你喜欢什么运动?", "what is ray?", "tell me about the quick brown fox"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class _Client(threading.Thread):
    """Streams chat completions back to back; records (start, ttft, latency) or an error per request."""

    def __init__(self, url: str, stop: threading.Event, max_tokens: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.max_tokens, self.seed = url, stop, max_tokens, seed
        self.results: list[tuple[float, float, float]] = []
        self.errors: list[tuple[float, str]] = []

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=120) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = {"messages": [{"role": "user", "content": PROMPTS[(self.seed + i) % len(PROMPTS)]}],
                        "max_tokens": self.max_tokens, "temperature": 0.8, "stream": True,
                        "seed": self.seed * 100_000 + i}
                t0 = time.monotonic()
                ttft = None
                try:
                    with http.stream("POST", self.url, json=body) as r:
                        if r.status_code != 200:
                            self.errors.append((t0, f"HTTP {r.status_code}"))
                            continue
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"].get("message", "stream error"))
                            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                                ttft = time.monotonic() - t0
                    self.results.append((t0, ttft if ttft is not None else float("nan"), time.monotonic() - t0))
                except Exception as e:  # noqa: BLE001 - every failure is counted, the soak goes on
                    self.errors.append((t0, f"{type(e).__name__}: {e}"[:200]))


def _replica_rss() -> int:
    """RSS in bytes of the Generator replica's process (from the GCS actor table; no dashboard needed)."""
    import psutil
    from ray._private import state

    pids = [a["Pid"] for a in state.actors().values()
            if a.get("State") == "ALIVE" and "Generator" in a.get("ActorClassName", "") and a.get("Pid")]
    if not pids:
        raise RuntimeError("no live Generator replica found")
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default 4)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument("--size", choices=["tiny", "gpt2-124m"], default="tiny", help="checkpoint shape")
    args = p.parse_args()

    import ray
    from ray import serve
    from support.checkpoints import make_checkpoint
    from support.ports import free_port

    from chatray.rayenv import connect
    from chatray.serve.app import build_app_with_options

    tmp = Path(tempfile.mkdtemp(prefix="chatray-soak-"))
    ckpt = make_checkpoint(tmp / "soak" / "checkpoint_00000001", size=args.size)
    connect(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app_with_options({"checkpoint": str(ckpt), "api_key_env": None, "max_batch_size": 16},
                                     {"Generator": {"num_replicas": 1}}), name="soak", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    stop = threading.Event()
    clients = [_Client(url, stop, args.max_tokens, seed=i) for i in range(args.clients)]
    t_start = time.monotonic()
    for c in clients:
        c.start()
    warm_s = min(60.0, args.minutes * 60 / 5)
    time.sleep(warm_s)
    rss_warm = _replica_rss()
    print(f"warm-up done after {warm_s:.0f}s: replica RSS {rss_warm / 2**20:.1f} MiB", flush=True)
    deadline = t_start + args.minutes * 60
    while time.monotonic() < deadline:
        time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
        done = sum(len(c.results) for c in clients)
        print(f"  {time.monotonic() - t_start:6.0f}s  {done} requests, "
              f"{sum(len(c.errors) for c in clients)} errors", flush=True)
    rss_end = _replica_rss()
    stop.set()
    for c in clients:
        c.join(timeout=120)
    serve.shutdown()
    ray.shutdown()

    results = [r for c in clients for r in c.results]
    errors = [e for c in clients for e in c.errors]
    minutes = []
    for m in range(int(-(-args.minutes // 1))):
        lo, hi = t_start + 60 * m, t_start + 60 * (m + 1)
        rows = [r for r in results if lo <= r[0] < hi]
        ttft = [r[1] for r in rows if r[1] == r[1]]
        lat = [r[2] for r in rows]
        minutes.append({"minute": m + 1, "requests": len(rows), "errors": sum(lo <= e[0] < hi for e in errors),
                        "ttft_p50_ms": round(1000 * _pct(ttft, 0.5), 1),
                        "ttft_p99_ms": round(1000 * _pct(ttft, 0.99), 1),
                        "latency_p50_ms": round(1000 * _pct(lat, 0.5), 1),
                        "latency_p99_ms": round(1000 * _pct(lat, 0.99), 1)})
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    print(f"\n{'minute':>6} {'requests':>9} {'errors':>7} {'TTFT p50':>10} {'TTFT p99':>10} {'lat p50':>10} "
          f"{'lat p99':>10}   (ms)")
    for m in minutes:
        print(f"{m['minute']:>6} {m['requests']:>9} {m['errors']:>7} {m['ttft_p50_ms']:>10} {m['ttft_p99_ms']:>10} "
              f"{m['latency_p50_ms']:>10} {m['latency_p99_ms']:>10}")
    print(f"\nrequests {len(results)}, errors {len(errors)}; replica RSS {rss_warm / 2**20:.1f} MiB after warm-up -> "
          f"{rss_end / 2**20:.1f} MiB at the end ({growth:+.1%}; goal <= +10%)")
    for _, e in errors[:5]:
        print(f"  error: {e}")
    print(json.dumps({"minutes": args.minutes, "clients": args.clients, "size": args.size, "requests": len(results),
                      "errors": len(errors), "rss_warm_mib": round(rss_warm / 2**20, 1),
                      "rss_end_mib": round(rss_end / 2**20, 1), "rss_growth": round(growth, 4),
                      "per_minute": minutes}))


if __name__ == "__main__":
    main()
