"""``make demo``: the whole platform on one machine, end to end, with progress throughout.

Steps: local Ray cluster (``ray start --head`` on 127.0.0.1, token auth) -> prepare the bundled dialogues
(chatterbot English + Chinese, and the founding conversation) -> submit ``jobs/finetune_tiny.yaml`` through the
Ray Jobs API and follow it -> ``serve deploy`` serve_config.yaml with the run's best checkpoint -> chat requests
over HTTP -> the untrained and the fine-tuned model side by side (eval loss, perplexity, the same prompt).
A second run reuses the dataset, a finished training run, and a healthy deployment.

    python -m chatray.demo [--fresh] [--no-chat]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from chatray.errors import ChatrayError
from chatray.raylogs import is_verbose

__all__ = ["run_demo"]

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / ".demo"
DATA = DEMO_DIR / "data"
JOB_CONFIG = REPO / "jobs" / "finetune_tiny.yaml"
SERVE_CONFIG = REPO / "serve_config.yaml"
# How the demo prepares its data (``chatray data prepare --demo`` options); the demo test prepares it the same way.
# Rows of at most 64 tokens keep padded batches short: the tiny model sees its corpus more often in its budget.
PREPARE_OPTIONS = {"tokenizer": "train:4000", "max_length": 64}
# (prompt, temperature), all from the training data: at 0 a prompt gets that data's answer; at 0.7 the founding
# conversation's own questions (the tiny model knows its corpus, not open chat: docs/training.md).
PROMPTS = [("你喜欢什么运动?", 0.0), ("What is AI?", 0.0), ("你好,我是小明。", 0.7), ("你喜欢什么运动?", 0.7)]


def _step(n: int, total: int, msg: str) -> float:
    print(f"\033[1m[{n}/{total}] {msg}\033[0m", flush=True)
    return time.perf_counter()


def _done(t: float, msg: str = "done") -> None:
    print(f"      {msg} ({time.perf_counter() - t:.0f}s)", flush=True)


def _chatray(*args: str, env: dict[str, str] | None = None, check: bool = True,
             capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "chatray.cli", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=capture)
    if check and r.returncode != 0:
        out = (r.stderr or "") if capture else ""
        raise ChatrayError(f"`chatray {' '.join(args)}` failed (exit {r.returncode}){': ' + out[-500:] if out else ''}")
    return r


def _job_settings() -> dict:
    from chatray.config import FinetuneConfig, load_config

    cfg = load_config(FinetuneConfig, JOB_CONFIG)
    return {"storage": cfg.run.storage_path, "name": cfg.run.name, "data": cfg.data.path,
            "sample_prompt": cfg.eval.sample_prompt}


def run_demo(fresh: bool = False, chat: bool = True) -> None:
    """Run the demo; raises ChatrayError with the failing step named."""
    from chatray.localcluster import resources_from_env, start_local_cluster
    from chatray.rayenv import ray_auth_env

    total = 6
    t_all = time.perf_counter()
    os.chdir(REPO)
    DEMO_DIR.mkdir(exist_ok=True)
    env = ray_auth_env()
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    t = _step(1, total, "local Ray cluster (ray start --head on 127.0.0.1, token auth)")
    cluster, started = start_local_cluster(**resources_from_env())  # CHATRAY_NUM_CPUS / _GPUS, as start.sh
    env = ray_auth_env(env)
    env["RAY_ADDRESS"] = cluster.dashboard_url
    _done(t, ("started" if started else "reusing running cluster") + f"; dashboard {cluster.dashboard_url}")

    settings = _job_settings()
    data = Path(settings["data"]) if Path(settings["data"]).is_absolute() else REPO / settings["data"]
    t = _step(2, total, f"prepare the bundled dialogues (chatterbot English + Chinese, the founding conversation) "
                        f"-> {data}")
    if _dataset_current(data) and not fresh:
        _done(t, "reusing the prepared dataset")
    else:
        fresh = True  # a new dataset: the run trains from scratch on it
        r = _chatray("data", "prepare", "--demo", "--out", str(data), "--tokenizer", PREPARE_OPTIONS["tokenizer"],
                     "--max-length", str(PREPARE_OPTIONS["max_length"]), "--overwrite", "--quiet",
                     env={**env, "RAY_ADDRESS": cluster.address}, capture=not is_verbose())
        summary = next((ln for ln in (r.stdout or "").splitlines() if ln.startswith("prepared ")), "")
        _done(t, summary.partition(": ")[2] or "done")

    storage = settings["storage"]
    run = settings["name"]
    t = _step(3, total, f"fine-tune: submit {JOB_CONFIG.relative_to(REPO)} through the Ray Jobs API")
    from chatray.storage.checkpoints import resolve_checkpoint

    best = None
    if not fresh:
        try:
            best = resolve_checkpoint(f"{storage}/{run}:best")
        except ChatrayError:
            best = None
    extra = ["--set", "run.resume=false"] if fresh else []
    if best and (Path(best) / "model.safetensors").exists() and _run_finished(storage, run):
        _done(t, f"reusing finished run {run} (checkpoint {best}); pass --fresh to retrain")
    else:
        _chatray("train", "submit", "--address", cluster.dashboard_url, "--config", str(JOB_CONFIG), "--wait",
                 *extra, env=env)
        best = resolve_checkpoint(f"{storage}/{run}:best")
        _done(t, f"best checkpoint {best}")

    t = _step(4, total, "serve deploy serve_config.yaml with the run's best checkpoint")
    deploy_cfg = _serve_config_for(best)
    url = _deploy(deploy_cfg, cluster.dashboard_url, env)
    _done(t, f"serving at {url}")

    if chat:
        t = _step(5, total, "chat requests over HTTP")
        _chat(url)
        _done(t)
        t = _step(6, total, "before and after fine-tuning")
        _compare(f"{storage}/{run}", best, url, settings["sample_prompt"])
        _done(t)
    from chatray.train.curves import plot_runs

    curves = plot_runs([f"{storage}/{run}"], DEMO_DIR / "curves.png")
    print(f"\nDemo finished in {time.perf_counter() - t_all:.0f}s.\n")
    print(f"  curves:     {curves.relative_to(REPO) if curves.is_relative_to(REPO) else curves}   "
          f"(live: .venv/bin/tensorboard --logdir {storage})")
    print(f"  chat:       .venv/bin/chatray chat --url {url}")
    print(f"  one-shot:   .venv/bin/chatray generate --url {url} \"你喜欢什么运动?\"")
    print(f"  curl:       curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
          "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
    print(f"  dashboard:  {cluster.dashboard_url}   (Ray auth token in ~/.ray/auth_token)")
    print(f"  training:   .venv/bin/chatray train status {run} --storage {storage}")
    print("  stop all:   make down   (or .venv/bin/chatray down)")


def _dataset_current(data: Path) -> bool:
    """Whether ``data`` was prepared as this demo prepares it (a dataset from other settings is redone)."""
    from chatray.data.dataset import read_manifest

    try:
        manifest = read_manifest(str(data))
    except ChatrayError:  # missing, incomplete or unreadable: prepared again
        return False
    sources = [str(s.get("path", "")) for s in manifest.get("sources", []) if isinstance(s, dict)]
    tokenizer = manifest.get("tokenizer")
    return (manifest.get("max_length") == PREPARE_OPTIONS["max_length"]
            and isinstance(tokenizer, dict) and tokenizer.get("source") == PREPARE_OPTIONS["tokenizer"]
            and any(s.endswith("founding.jsonl") for s in sources))


def _run_finished(storage: str, run: str) -> bool:
    p = Path(storage) if Path(storage).is_absolute() else REPO / storage
    return (p / run / "DONE").exists() or any((p / run).glob("checkpoint_*"))


def _serve_config_for(checkpoint: str) -> Path:
    """serve_config.yaml with the application's ``checkpoint`` arg set to ``checkpoint`` (absolute)."""
    import yaml

    cfg = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    for app in cfg.get("applications", []):
        app.setdefault("args", {})["checkpoint"] = str(checkpoint)
    out = DEMO_DIR / "serve_config.yaml"
    out.write_text("# Generated by `make demo` from serve_config.yaml: checkpoint set to the demo run's best.\n"
                   + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def _deploy(config: Path, dashboard_url: str, env: dict[str, str], wait_s: float = 600) -> str:
    """``serve deploy CONFIG`` against the local cluster, then wait until ``/readyz`` answers 200."""
    import httpx
    import yaml

    serve = Path(sys.executable).parent / "serve"
    r = subprocess.run([str(serve) if serve.exists() else "serve", "deploy", str(config), "-a", dashboard_url],
                       env=env, text=True, capture_output=True)
    if r.returncode != 0:
        raise ChatrayError(f"`serve deploy {config}` failed: {(r.stderr or r.stdout).strip()[-800:]}")
    http = yaml.safe_load(config.read_text(encoding="utf-8")).get("http_options", {})
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    t0 = time.time()
    deadline, said = t0 + wait_s, t0
    last = ""
    while time.time() < deadline:
        try:
            resp = httpx.get(f"{url}/readyz", timeout=5)
            if resp.status_code == 200:
                return url
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        st = subprocess.run([str(serve) if serve.exists() else "serve", "status", "-a", dashboard_url], env=env,
                            text=True, capture_output=True)
        if "DEPLOY_FAILED" in st.stdout:
            raise ChatrayError(f"serve deploy failed:\n{st.stdout.strip()[-1500:]}")
        if time.time() - said >= 30:  # a line per half minute of waiting, not per poll
            said = time.time()
            print(f"      still waiting for {url}/readyz ({last}, {said - t0:.0f}s)", flush=True)
        time.sleep(3)
    raise ChatrayError(f"the deployment did not become ready within {wait_s:.0f}s ({last})",
                       hint="`serve status` shows why")


def _reply(url: str, prompt: str, temperature: float) -> str:
    import httpx

    body = {"model": "chatray", "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
            "max_tokens": 48, "seed": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    if r.status_code != 200:
        raise ChatrayError(f"chat request failed: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"].strip()


def _chat(url: str) -> None:
    for prompt, temp in PROMPTS:
        print(f"      user (temperature {temp}): {prompt}")
        print(f"      chatray: {_reply(url, prompt, temp)}")


def _compare(run_uri: str, best: str, url: str, prompt: str) -> None:
    """The untrained model (the run's step-0 eval and sample reply to ``prompt``: ``eval.at_start``) next to the
    served fine-tuned one."""
    import json

    from chatray.train.metrics import read_metrics

    recs = read_metrics(run_uri)
    before = recs[0] if recs and recs[0].get("step") == 0 else None
    after = json.loads((Path(best) / "metrics.json").read_text(encoding="utf-8"))
    if before is None or not before.get("perplexity") or not after.get("perplexity"):
        print("      the untrained model's eval was not recorded for this run "
              "(.venv/bin/python -m chatray.demo --fresh retrains)")
        return
    ratio = before["perplexity"] / after["perplexity"]
    print(f"      {'':14}{'untrained':>14}{'fine-tuned (step ' + str(after['step']) + ')':>26}")
    print(f"      {'eval loss':14}{before['eval_loss']:>14.3f}{after['eval_loss']:>26.3f}")
    print(f"      {'perplexity':14}{before['perplexity']:>14,.1f}{after['perplexity']:>26,.1f}   ({ratio:,.0f}x lower)")
    print(f"      user (temperature 0): {prompt}")
    print(f"        untrained:  {before.get('sample') or '(empty reply)'}")
    print(f"        fine-tuned: {_reply(url, prompt, 0.0)}")


def main() -> None:
    ap = argparse.ArgumentParser(description="chatray end-to-end demo")
    ap.add_argument("--fresh", action="store_true", help="re-prepare and retrain instead of reusing")
    ap.add_argument("--no-chat", action="store_true", help="skip the chat requests")
    args = ap.parse_args()
    try:
        run_demo(fresh=args.fresh, chat=not args.no_chat)
    except (ChatrayError, ValueError, OSError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        hint = getattr(e, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        from chatray.localcluster import cluster_alive

        try:
            alive = cluster_alive()
        except ValueError:  # a bad CHATRAY_*_PORT, the same setting that stopped the demo
            alive = False
        if alive:
            print("the cluster is left running for inspection; `make down` stops it", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
