"""The demo's fine-tuning learns its corpus: jobs/finetune_tiny.yaml trained on the demo's data, prepared as
``make demo`` prepares it, then the best checkpoint served over real HTTP.

This is the demo's whole training budget (a few minutes on 2 cores): the only test that trains the shipped
configuration unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_training_learns_the_founding_conversation(ray_session, tmp_path):
    from ray import serve

    from chatray.config import FinetuneConfig, load_config
    from chatray.data.corpus import DEMO_INPUTS
    from chatray.data.prepare import prepare_dataset
    from chatray.demo import JOB_CONFIG, PREPARE_OPTIONS
    from chatray.serve.app import build_app_with_options
    from chatray.storage.checkpoints import resolve_checkpoint
    from chatray.train.metrics import read_metrics
    from chatray.train.trainer import run_training

    data, storage = tmp_path / "data", tmp_path / "checkpoints"
    prepare_dataset(list(DEMO_INPUTS), str(data), **PREPARE_OPTIONS, progress=False)
    cfg = load_config(FinetuneConfig, JOB_CONFIG, [f"data.path={data}", f"run.storage_path={storage}"])
    run_training(cfg, progress=False)

    run = f"{storage}/{cfg.run.name}"
    untrained = read_metrics(run)[0]
    assert untrained["step"] == 0 and "loss" not in untrained, "eval.at_start logs the untrained model first"
    best = resolve_checkpoint(f"{run}:best")
    after = json.loads((Path(best) / "metrics.json").read_text(encoding="utf-8"))
    assert after["step"] == cfg.train.max_steps
    assert after["perplexity"] <= untrained["perplexity"] / 10, (untrained["perplexity"], after["perplexity"])

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    try:
        serve.run(build_app_with_options({"checkpoint": f"{run}:best", "api_key_env": None,
                                          "cache_dir": str(tmp_path / "cache")},
                                         {"Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
                                          "Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}),
                  name="demo", route_prefix="/")
        body = {"model": "chatray", "messages": [{"role": "user", "content": "你喜欢什么运动?"}], "temperature": 0,
                "max_tokens": 32}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        reply = r.json()["choices"][0]["message"]["content"]
        assert "篮球" in reply, reply
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert Path(best).name in json.dumps(models)
    finally:
        serve.shutdown()
