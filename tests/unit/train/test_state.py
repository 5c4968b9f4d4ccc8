"""A training checkpoint's own files without Ray: what a checkpoint saves is what a resumed worker restores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from chatray.config import FinetuneConfig, load_config
from chatray.data.dataset import load_tokenizer
from chatray.model import build_model, load_model
from chatray.storage.checkpoints import checkpoint_dir_name
from chatray.train.batches import iter_local_batches
from chatray.train.plan import plan_run
from chatray.train.state import (
    DataLayout,
    DataPosition,
    find_resume,
    gather_rng_states,
    read_saved_run,
    read_train_state,
    restore_train_state,
    write_checkpoint,
)
from chatray.train.step import StepConfig, TrainStep, make_train_step

CPU = torch.device("cpu")


def _run(small_dataset, tmp_path, *extra: str) -> tuple[FinetuneConfig, object, TrainStep, list]:
    cfg, plan = plan_run(load_config(FinetuneConfig, None, [
        f"data.path={small_dataset}", f"run.storage_path={tmp_path}", "run.name=r", "model.n_layer=1",
        "model.n_head=2", "model.n_embd=32", "train.max_steps=10", "train.warmup_steps=2", "train.lr=2e-3", *extra]))
    model = build_model("tiny", vocab_size=plan.vocab_size, block_size=plan.block_size, eos_token_id=plan.eos_id,
                        n_layer=1, n_head=2, n_embd=32, seed=0)
    batches = list(iter_local_batches(str(small_dataset), "train", block_size=plan.block_size, micro_batch_size=4,
                                      pad_id=plan.pad_id))
    return cfg, plan, make_train_step(model, StepConfig.from_config(cfg), CPU, pad_id=plan.pad_id), batches


def _save(step: TrainStep, cfg, plan, small_dataset, position: DataPosition) -> str:
    folder = Path(plan.run_uri) / checkpoint_dir_name(step.step)
    folder.mkdir(parents=True)
    write_checkpoint(folder, step=step, tokenizer=load_tokenizer(str(small_dataset)), cfg=cfg, plan=plan,
                     rngs=gather_rng_states(), position=position, layout=DataLayout.of(cfg, 1),
                     metrics={"step": step.step, "loss": float("nan"), "eval_loss": 2.5, "tokens_seen": 99})
    return str(folder)


def test_resume_continues_exactly_where_the_checkpoint_stopped(small_dataset, tmp_path):
    cfg, plan, run, batches = _run(small_dataset, tmp_path)
    for b in batches[:3]:
        run([b])
    uri = _save(run, cfg, plan, small_dataset, DataPosition(epoch=1, micro_batches=7, tokens_seen=1234))
    for b in batches[3:5]:
        run([b])

    resume = find_resume(plan.run_uri, enabled=True, rank=0)
    assert resume is not None and resume.uri == uri
    assert find_resume(plan.run_uri, enabled=False, rank=0) is None  # run.resume: false starts over
    resumed = TrainStep(load_model(uri), StepConfig.from_config(cfg), CPU, plan.pad_id)
    position = restore_train_state(resumed, resume, layout=DataLayout.of(cfg, 1), seed=0, rank=0)
    assert position == DataPosition(epoch=1, micro_batches=7, tokens_seen=1234)
    assert resumed.step == 3
    for b in batches[3:5]:
        resumed([b])
    for pa, pb in zip(run.raw_model.parameters(), resumed.raw_model.parameters()):
        torch.testing.assert_close(pa, pb)


def test_padded_run_checkpoints_the_tokenizer_vocab_and_resumes_padded(small_dataset, tmp_path):
    cfg, plan, run, batches = _run(small_dataset, tmp_path, "model.pad_vocab_multiple=128")
    assert run.raw_model.config.vocab_size > plan.vocab_size, "the run trains padded"
    for b in batches[:3]:
        run([b])
    uri = _save(run, cfg, plan, small_dataset, DataPosition(epoch=0, micro_batches=3, tokens_seen=1))
    for b in batches[3:5]:
        run([b])

    assert json.loads((Path(uri) / "config.json").read_text())["vocab_size"] == plan.vocab_size
    resume = find_resume(plan.run_uri, enabled=True, rank=0)
    rows = {s["exp_avg"].shape[0] for s in resume.state["trainer"]["optimizer"]["state"].values()
            if s["exp_avg"].dim() == 2}
    assert plan.vocab_size in rows and run.raw_model.config.vocab_size not in rows, rows
    loaded = load_model(uri)
    assert loaded.config.vocab_size == plan.vocab_size
    resumed = make_train_step(loaded, StepConfig.from_config(cfg), CPU, pad_id=plan.pad_id)
    assert resumed.raw_model.config.vocab_size == run.raw_model.config.vocab_size, "re-padded on resume"
    restore_train_state(resumed, resume, layout=DataLayout.of(cfg, 1), seed=0, rank=0)
    for b in batches[3:5]:
        resumed([b])
    for pa, pb in zip(run.raw_model.parameters(), resumed.raw_model.parameters()):
        torch.testing.assert_close(pa, pb)


def test_other_layout_restarts_the_epoch(small_dataset, tmp_path):
    cfg, plan, run, batches = _run(small_dataset, tmp_path)
    run([batches[0]])
    _save(run, cfg, plan, small_dataset, DataPosition(epoch=2, micro_batches=5, tokens_seen=10))
    resume = find_resume(plan.run_uri, enabled=True, rank=0)
    fresh = TrainStep(load_model(resume.uri), StepConfig.from_config(cfg), CPU, plan.pad_id)
    position = restore_train_state(fresh, resume, layout=DataLayout(2, "pack", 8), seed=0, rank=0)
    assert position == DataPosition(epoch=2, micro_batches=0, tokens_seen=10) and fresh.step == 1


def test_checkpoint_files(small_dataset, tmp_path):
    cfg, plan, run, batches = _run(small_dataset, tmp_path)
    run([batches[0]])
    uri = _save(run, cfg, plan, small_dataset, DataPosition(epoch=0, micro_batches=1, tokens_seen=99))
    state = read_train_state(uri)
    assert state["version"] == 1 and state["trainer"]["step"] == 1 and state["tokens_seen"] == 99
    assert state["data"] == {"epoch": 0, "micro_batches": 1, "world_size": 1, "packing": "pack",
                             "micro_batch_size": cfg.train.micro_batch_size}
    assert read_saved_run(uri) == (cfg, dataclasses.asdict(plan))
    metrics = json.loads((Path(uri) / "metrics.json").read_text())
    assert metrics["loss"] is None and metrics["eval_loss"] == 2.5  # NaN is written as null
    files = {p.name: p.stat().st_size for p in Path(uri).iterdir() if p.name != "metrics.json"}
    assert metrics["files"] == files and {"model.safetensors", "train_state.pt", "train_config.json"} <= set(files)


def test_unreadable_train_state_falls_back_to_the_previous_checkpoint(small_dataset, tmp_path, capsys):
    cfg, plan, run, batches = _run(small_dataset, tmp_path)
    run([batches[0]])
    good = _save(run, cfg, plan, small_dataset, DataPosition())
    run([batches[1]])
    bad = Path(_save(run, cfg, plan, small_dataset, DataPosition())) / "train_state.pt"
    bad.write_bytes(b"\0" * bad.stat().st_size)  # same size: only loading it can tell
    resume = find_resume(plan.run_uri, enabled=True, rank=0)
    assert resume is not None and resume.uri == good
    assert "train_state.pt unreadable" in capsys.readouterr().err
