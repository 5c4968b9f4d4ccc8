"""Ray Train fine-tuning for real on a local Ray (2 CPUs): tiny GPT-2 on the chatterbot demo data.

Three runs share the work (each Ray Train start-up costs seconds on a 2-core machine):

* ``two_workers``: 2 workers, global batch 16, 80 steps (into a second epoch); one worker is killed at step 45.
  Loss falls; the run restarts from the step-40 checkpoint; metrics.jsonl has every step exactly once;
  the final checkpoint loads with ``AutoModelForCausalLM`` and generates; its tokenizer has the chat template.
* ``one_worker``: 1 worker, the same global batch, checkpoints in S3 (moto). Its loss trajectory matches
  the 2-worker one (tolerance below), and its checkpoints resolve and load back from S3.
* the ``one_worker`` run rerun with a higher ``max_steps``: it resumes at step 81 with the optimizer state
  carried over.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from chatray.config import FinetuneConfig, load_config
from chatray.storage.checkpoints import list_checkpoints, materialize_checkpoint, resolve_checkpoint
from chatray.train.loop import FAULT_ENV
from chatray.train.metrics import read_metrics
from chatray.train.trainer import run_training

pytestmark = pytest.mark.integration

STEPS = 80
# Per-step training loss of 1 vs 2 workers at the same global batch. Same init and, by construction of the
# split (blocks of one step's share dealt to workers in turn), the same sequences in every global batch;
# only float summation order differs (gradient all-reduce), and that drifts a little over 80 steps of
# lr 3e-3. Tolerance: 2% per step (measured: see the report in docs/training.md).
TRAJECTORY_RTOL = 0.02


def _cfg(dataset: str, storage: str, name: str, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"data.path={dataset}", f"run.storage_path={storage}", f"run.name={name}",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
        f"train.max_steps={STEPS}", "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=5", "train.log_every=1", "train.seed=1",
        "checkpoint.every=20", "checkpoint.num_to_keep=2", "eval.every=20", "eval.max_batches=2",
        "eval.sample_max_tokens=8", "scaling.cpus_per_worker=0.5", "run.max_failures=1", *extra])


def _window_means(recs: list[dict], width: int = 10) -> list[float]:
    losses = [r["loss"] for r in recs]
    return [statistics.fmean(losses[i: i + width]) for i in range(0, len(losses), width)]


@pytest.fixture(scope="module")
def two_workers(tiny_dataset, tmp_path_factory, ray_session):
    storage = tmp_path_factory.mktemp("train-int")
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, "45")  # forwarded to the workers: rank 1 exits hard once after step 45
    try:
        summary = run_training(_cfg(tiny_dataset, str(storage), "two", "scaling.num_workers=2"), progress=False)
    finally:
        mp.undo()
    return storage / "two", summary


@pytest.fixture(scope="module")
def one_worker(tiny_dataset, s3_server, ray_session):
    storage = f"s3://{s3_server['bucket']}/train-int"
    summary = run_training(_cfg(tiny_dataset, storage, "one", "scaling.num_workers=1"), progress=False)
    return f"{storage}/one", summary


def test_killed_worker_run_finishes_without_gaps(two_workers):
    run, summary = two_workers
    assert summary["step"] == STEPS
    assert (run / ".fault-injected-45").exists(), "the fault hook fired"
    recs = read_metrics(str(run))
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), "every step logged exactly once"
    assert len({r["epoch"] for r in recs}) >= 2, "the run crossed epochs"
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60, 80]
    assert all(r["perplexity"] > 1 for r in evals)
    early, late = _window_means(recs)[0], _window_means(recs)[-1]
    assert late < early - 1.0, (early, late)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    steps = [c.step for c in list_checkpoints(str(run)) if c.valid]
    assert STEPS in steps and len(steps) <= 2 + 1  # num_to_keep=2 (+ the latest)


def test_final_checkpoint_loads_generates_and_chats(two_workers):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, summary = two_workers
    latest = resolve_checkpoint(f"{run}:latest")
    assert latest.endswith("checkpoint_00000080")
    assert summary["best"] == resolve_checkpoint(f"{run}:best")
    names = {p.name for p in Path(latest).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "train_state.pt", "metrics.json",
            "tokenizer.json"} <= names
    metrics = json.loads((Path(latest) / "metrics.json").read_text())
    assert metrics["step"] == STEPS and metrics["eval_loss"] > 0
    assert metrics["tokens_seen"] == read_metrics(str(run))[-1]["tokens_seen"] > (STEPS - 2) * 16 * 128
    model = AutoModelForCausalLM.from_pretrained(latest)
    tok = AutoTokenizer.from_pretrained(latest)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    state = torch.load(Path(latest) / "train_state.pt", weights_only=True)
    assert state["trainer"]["step"] == STEPS and state["data"]["world_size"] == 2


def test_one_worker_matches_two_workers_and_checkpoints_live_in_s3(one_worker, two_workers):
    one_uri, summary = one_worker
    assert summary["step"] == STEPS
    one, two = read_metrics(one_uri), read_metrics(str(two_workers[0]))
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    rel = [abs(x["loss"] - y["loss"]) / y["loss"] for x, y in zip(one, two)]
    print(f"1 vs 2 workers: max relative loss difference {max(rel):.2e} over {len(rel)} steps")
    for x, y, r in zip(one, two, rel):
        assert r < TRAJECTORY_RTOL, f"step {x['step']}: 1 worker {x['loss']:.4f} vs 2 workers {y['loss']:.4f}"
    best = resolve_checkpoint(f"{one_uri}:best")
    assert best.startswith("s3://") and "/checkpoint_" in best
    local = materialize_checkpoint(f"{one_uri}:latest")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(local).config.n_layer == 2


def test_rerun_with_same_name_resumes(one_worker, tiny_dataset, tmp_path):
    import torch

    from chatray.storage.uri import download_dir

    one_uri, _ = one_worker
    storage = one_uri.rsplit("/", 1)[0]
    summary = run_training(_cfg(tiny_dataset, storage, "one", "scaling.num_workers=1",
                                f"train.max_steps={STEPS + 8}", "checkpoint.every=8"), progress=False)
    assert summary["step"] == STEPS + 8
    recs = read_metrics(one_uri)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 9)), "the log continues, no repeat"
    assert recs[STEPS]["tokens_seen"] == recs[STEPS - 1]["tokens_seen"] + 16 * 128
    local = download_dir(resolve_checkpoint(f"{one_uri}:latest"), tmp_path / "latest")
    state = torch.load(Path(local) / "train_state.pt", weights_only=True)
    assert state["trainer"]["step"] == STEPS + 8
    adam_steps = {float(s["step"]) for s in state["trainer"]["optimizer"]["state"].values()}
    assert adam_steps == {float(STEPS + 8)}, "AdamW moments continued from the checkpoint, not from zero"
