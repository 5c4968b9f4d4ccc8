"""Ray Train fine-tuning for real on a local Ray (2 CPUs): tiny GPT-2 on the chatterbot demo data.

Two Ray Train runs share the work (each worker-group start costs seconds on a 2-core machine):

* ``two_workers``: 2 workers, global batch 16, 60 steps (into a second epoch), checkpoints in S3 (moto); one
  worker is killed at step 45. The run restarts from the step-40 checkpoint and finishes; metrics.jsonl has
  every step exactly once; the loss falls; the checkpoints resolve (``:latest``, ``:best``) and load back from
  S3 with ``AutoModelForCausalLM``, generate, and carry the chat template.
* The same 60 steps with global batch 16 in one process (chatray's ``TrainStep``, the code every worker runs,
  no Ray) give the same loss trajectory as the 2 workers, killed worker included (tolerance below).
* The ``two_workers`` run rerun with a higher ``max_steps`` (streaming its data through Ray Data this time, and
  with the vocabulary padded as on a GPU): it resumes at step 61 with the optimizer state, the step count and the
  metrics log carried over, and its checkpoints keep the tokenizer-sized vocabulary.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from chatray.config import FinetuneConfig, load_config
from chatray.storage.checkpoints import list_checkpoints, materialize_checkpoint, resolve_checkpoint
from chatray.train.loop import FAULT_ENV
from chatray.train.metrics import read_metrics
from chatray.train.trainer import run_training

pytestmark = pytest.mark.integration

STEPS = 60
SEED = 1
# Per-step training loss, 2 Ray workers vs 1 process, same global batch of 16 blocks. The split deals blocks
# of 8 sequences to the workers in turn, so each global batch holds the same sequences; the loss is
# normalised over the global batch's target tokens. Only float summation order differs (one batch of 16 vs
# two of 8 averaged by DDP), which moves the loss by far less than this tolerance.
TRAJECTORY_RTOL = 1e-3
# The session's Ray started before the moto server set these, and chatray forwards secrets only by name (`--env`).
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _cfg(dataset: str, storage: str, name: str, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"data.path={dataset}", f"run.storage_path={storage}", f"run.name={name}",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "scaling.num_workers=2",
        f"train.max_steps={STEPS}", "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=5", "train.log_every=1", f"train.seed={SEED}",
        "checkpoint.every=20", "checkpoint.num_to_keep=2", "eval.every=20", "eval.max_batches=2",
        "eval.sample_max_tokens=8", "scaling.cpus_per_worker=0.5", "run.max_failures=1", *extra])


def _window_means(recs: list[dict], width: int = 10) -> list[float]:
    losses = [r["loss"] for r in recs]
    return [statistics.fmean(losses[i: i + width]) for i in range(0, len(losses), width)]


@pytest.fixture(scope="module")
def two_workers(tiny_dataset, s3_server, ray_session):
    storage = f"s3://{s3_server['bucket']}/train-int"
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, "45")  # forwarded to the workers: rank 1 exits hard once after step 45
    try:
        summary = run_training(_cfg(tiny_dataset, storage, "two", "eval.at_start=true"), progress=False,
                               forward_env=S3_CREDENTIALS)
    finally:
        mp.undo()
    return f"{storage}/two", summary


def _one_process_losses(dataset: str, steps: int) -> list[float]:
    """The same run in one process without Ray: global batches of 16 consecutive packed blocks per epoch."""
    import numpy as np
    import torch

    from chatray.data.dataset import load_tokenizer, read_split_rows
    from chatray.model import build_model
    from chatray.train.batches import pack_rows, packed_batch
    from chatray.train.step import StepConfig, TrainStep

    tok = load_tokenizer(dataset)
    ids, labs = read_split_rows(dataset, "train")
    parts = [pack_rows(ids[i: i + 1024], labs[i: i + 1024], 128, tok.pad_token_id) for i in range(0, len(ids), 1024)]
    blocks = {k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "labels", "n_real")}
    torch.manual_seed(SEED)
    model = build_model("tiny", vocab_size=len(tok), block_size=128, eos_token_id=tok.eos_token_id, n_layer=2,
                        n_head=2, n_embd=64, seed=SEED)
    # The Ray run's own step settings (its global batch of 16 is one micro-batch here: grad_accum 1).
    step_cfg = StepConfig.from_config(_cfg(dataset, "unused", "unused"))
    assert step_cfg.grad_accum == 1
    step = TrainStep(model, step_cfg, torch.device("cpu"), tok.pad_token_id)
    losses: list[float] = []
    while len(losses) < steps:
        for k in range(0, len(blocks["n_real"]), 16):  # one epoch; the last batch is what is left of it
            step([packed_batch(*(blocks[c][k: k + 16] for c in ("input_ids", "labels", "n_real")))])
            losses.append(step.flush_loss())
            if len(losses) == steps:
                break
    return losses


def test_killed_worker_run_finishes_without_gaps(two_workers, tiny_dataset):
    from chatray.data.dataset import load_tokenizer

    run, summary = two_workers
    assert summary["step"] == STEPS
    from chatray.storage.uri import exists

    assert exists(f"{run}/.fault-injected-45"), "the fault hook fired"
    untrained, *recs = read_metrics(run)
    # eval.at_start: the untrained model's eval is the first line, kept when the run resumed at step 40
    assert untrained["step"] == 0 and "loss" not in untrained and untrained["sample"] is not None
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), "every step logged exactly once"
    assert len({r["epoch"] for r in recs}) >= 2, "the run crossed epochs"
    evals = [untrained] + [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert all(r["perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    early, late = _window_means(recs)[0], _window_means(recs)[-1]
    assert late < early - 1.0, (early, late)
    assert evals[-1]["eval_loss"] < evals[1]["eval_loss"] < math.log(len(load_tokenizer(tiny_dataset))), \
        "below a uniform guess over the vocabulary"
    # a random init predicts about uniformly: its eval loss is near log(vocab), far above the trained model's
    assert untrained["eval_loss"] > evals[1]["eval_loss"] + 1.0
    steps = [c.step for c in list_checkpoints(run) if c.valid]
    assert STEPS in steps and len(steps) <= 3  # num_to_keep=2 by eval_loss, plus the latest


def _tensorboard_events(run: str, local: Path) -> Any:
    """The run's TensorBoard events as TensorBoard itself reads them (copied down from S3 first)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from chatray.storage.uri import download_dir

    download_dir(run, local)
    acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_and_plot_of_the_run(two_workers, tmp_path):
    """The restarted run's event files give each logged step once (the restart purged the redone steps), with
    the values of metrics.jsonl; `chatray train plot` draws its curves from S3."""
    from click.testing import CliRunner

    from chatray.cli import cli

    run, _ = two_workers
    records = read_metrics(run)
    acc = _tensorboard_events(run, tmp_path / "events")
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == list(range(1, STEPS + 1)), "each step once, none from the killed attempt"
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in records if "loss" in r], rel=1e-6)
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert evals == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in records if "eval_loss" in r]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/perplexity"} <= set(acc.Tags()["scalars"])
    assert "eval/sample/text_summary" in acc.Tags()["tensors"]  # the sample reply, as text

    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["train", "plot", run, "--out", str(out)])
    assert result.exit_code == 0, result.output
    import matplotlib.image

    assert out.stat().st_size > 20_000 and matplotlib.image.imread(out).shape == (800, 1500, 4)


def test_two_workers_match_one_process(two_workers, tiny_dataset):
    run, _ = two_workers
    two = [r["loss"] for r in read_metrics(run) if "loss" in r]
    one = _one_process_losses(tiny_dataset, STEPS)
    rel = [abs(a - b) / b for a, b in zip(one, two)]
    print(f"1 process vs 2 workers: max relative loss difference {max(rel):.2e} over {len(rel)} steps")
    for i, (a, b, r) in enumerate(zip(one, two, rel)):
        assert r < TRAJECTORY_RTOL, f"step {i + 1}: 1 process {a:.5f} vs 2 workers {b:.5f}"


def _eval_loss(model, dataset: str, pad_id: int, workers: int = 2, micro: int = 8, max_batches: int = 2) -> float:
    """Mean loss per target token over the eval rows the run's workers evaluate, recomputed in this process."""
    import torch
    import torch.nn.functional as F

    from chatray.data.dataset import IGNORE_INDEX, read_split_rows
    from chatray.train.batches import collate_padded

    ids, labs = read_split_rows(dataset, "eval")
    total, count = 0.0, 0
    for rank in range(workers):
        rows, rlabs = ids[rank::workers], labs[rank::workers]
        for i in range(0, min(len(rows), micro * max_batches), micro):
            b = collate_padded(rows[i: i + micro], rlabs[i: i + micro], pad_id, 128)
            with torch.no_grad():
                logits = model(input_ids=b.input_ids).logits  # (B, T, vocab)
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b.targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += b.n_loss
    return total / count


def test_checkpoints_in_s3_load_generate_and_chat(two_workers, tiny_dataset):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatray.storage.uri import read_text

    run, summary = two_workers
    latest = resolve_checkpoint(f"{run}:latest")
    assert latest.startswith("s3://") and latest.endswith(f"/checkpoint_{STEPS:08d}")
    assert summary["best"] == resolve_checkpoint(f"{run}:best")
    metrics = json.loads(read_text(f"{latest}/metrics.json"))
    assert metrics["step"] == STEPS and metrics["eval_loss"] == read_metrics(run)[-1]["eval_loss"]
    assert metrics["tokens_seen"] == read_metrics(run)[-1]["tokens_seen"]
    local = materialize_checkpoint(f"{run}:latest")
    names = {p.name for p in Path(local).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "metrics.json", "tokenizer.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    tok = AutoTokenizer.from_pretrained(local)
    # The loaded weights are the trained ones: they give the eval loss the run logged at this step.
    assert _eval_loss(model, tiny_dataset, tok.pad_token_id) == pytest.approx(metrics["eval_loss"], rel=1e-4)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert torch.equal(out[0, : ids.shape[1]], ids[0]) and 1 <= len(new) <= 12
    assert len(new) == 12 or new[-1] == tok.eos_token_id, "greedy decoding stops only at EOS or max_new_tokens"
    assert model.config.n_layer == 2 and model.dtype == torch.float32


def test_rerun_with_same_name_resumes(two_workers, tiny_dataset, tmp_path):
    import torch

    from chatray.storage.uri import download_dir

    run, _ = two_workers
    storage = run.rsplit("/", 1)[0]
    from chatray.data.dataset import load_tokenizer

    # data.cache=false: this run streams the split (read_parquet -> map_batches packing -> repartition) instead
    # of loading it in memory, so both data paths are exercised. The padded vocabulary is what a GPU run trains
    # with: an unpadded checkpoint resumes padded, and the new checkpoints are tokenizer-sized again.
    vocab = len(load_tokenizer(tiny_dataset))
    assert vocab % 128, "the demo tokenizer's size must not be a multiple of 128, or nothing is padded"
    summary = run_training(_cfg(tiny_dataset, storage, "two", f"train.max_steps={STEPS + 8}", "checkpoint.every=8",
                                "data.cache=false", "model.pad_vocab_multiple=128"), progress=False,
                           forward_env=S3_CREDENTIALS)
    assert summary["step"] == STEPS + 8
    untrained, *recs = read_metrics(run)
    assert untrained["step"] == 0, "the untrained model's eval (eval.at_start) stays first when the run resumes"
    assert [r["step"] for r in recs] == list(range(1, STEPS + 9)), "the log continues, no repeat"
    assert recs[STEPS]["tokens_seen"] > recs[STEPS - 1]["tokens_seen"]
    local = download_dir(resolve_checkpoint(f"{run}:latest"), tmp_path / "latest")
    state = torch.load(Path(local) / "train_state.pt", weights_only=True)
    assert state["trainer"]["step"] == STEPS + 8
    adam_steps = {float(s["step"]) for s in state["trainer"]["optimizer"]["state"].values()}
    assert adam_steps == {float(STEPS + 8)}, "AdamW moments continued from the checkpoint, not from zero"
    assert json.loads((Path(local) / "config.json").read_text())["vocab_size"] == vocab
    rows = {m.shape[0] for s in state["trainer"]["optimizer"]["state"].values() for m in s.values() if m.dim() == 2}
    assert vocab in rows and -(-vocab // 128) * 128 not in rows, rows
