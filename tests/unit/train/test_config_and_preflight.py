"""Run config validation, shipped job YAMLs, and the one-line errors of ``chatray train`` (before Ray starts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from train_helpers import make_checkpoint, make_dataset

from chatray.cli import cli
from chatray.config import ConfigError, FinetuneConfig, load_config
from chatray.errors import ChatrayError
from chatray.model import build_model, save_model
from chatray.train.plan import RunPlan, plan_run

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("finetune*.yaml")), ids=lambda p: p.name)
def test_shipped_job_configs_load(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# Launch: chatray train"), "each YAML starts with its launch command"
    cfg = load_config(FinetuneConfig, path)
    for section, values in yaml.safe_load(path.read_text(encoding="utf-8")).items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"
    assert cfg.global_batch_size % cfg.scaling.num_workers == 0
    if cfg.train.global_batch_size is not None:  # sets grad_accum, which must divide it out exactly
        assert cfg.global_batch_size == cfg.train.global_batch_size
        assert cfg.grad_accum * cfg.train.micro_batch_size * cfg.scaling.num_workers == cfg.train.global_batch_size


def test_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as ei:
        load_config(FinetuneConfig, None, ["train.lr=-1", "scaling.num_workers=0", "data.block_size=4",
                                           "train.micro_batch_size=0"])
    msg = str(ei.value)
    for part in ("lr must be > 0, got -1.0", "num_workers must be >= 1, got 0", "block_size must be >= 8",
                 "micro_batch_size must be >= 1"):
        assert part in msg


def test_global_batch_sets_grad_accum():
    cfg = load_config(FinetuneConfig, None, ["train.global_batch_size=32", "train.micro_batch_size=4",
                                             "scaling.num_workers=2"])
    assert cfg.grad_accum == 4 and cfg.global_batch_size == 32
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size x scaling.num_workers"):
        load_config(FinetuneConfig, None, ["train.global_batch_size=30", "train.micro_batch_size=4",
                                           "scaling.num_workers=2"])
    assert load_config(FinetuneConfig, None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


def _cfg(ds: Path, storage: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [f"data.path={ds}", f"run.storage_path={storage}", "run.name=r",
                                              *extra])


def test_plan_resolves_block_size_and_ids(small_dataset, tmp_path):
    from chatray.data.dataset import load_tokenizer, read_manifest

    cfg, plan = plan_run(_cfg(small_dataset, tmp_path))
    assert plan.block_size == 64 and plan.start_step == 0
    assert plan.run_uri == str(tmp_path / "r")
    manifest, tok = read_manifest(str(small_dataset)), load_tokenizer(str(small_dataset))
    assert (plan.eval_rows, plan.train_rows) == (16, 120) == (manifest["splits"]["eval"]["rows"],
                                                             manifest["splits"]["train"]["rows"])
    assert plan.vocab_size == len(tok) and (plan.pad_id, plan.eos_id) == (tok.pad_token_id, tok.eos_token_id)
    assert plan.fingerprint == manifest["tokenizer"]["fingerprint"] and plan.grad_accum == cfg.grad_accum
    assert Path(cfg.data.path).is_absolute()


def test_plan_travels_to_the_workers_unchanged(small_dataset, tmp_path):
    cfg, plan = plan_run(_cfg(small_dataset, tmp_path, "train.global_batch_size=16", "train.micro_batch_size=4"))
    loop_config = json.loads(json.dumps(plan.loop_config(cfg)))  # what Ray ships is plain data
    assert RunPlan.from_loop_config(loop_config) == (cfg, plan)


def test_missing_dataset(tmp_path):
    with pytest.raises(ChatrayError, match="dataset not found"):
        plan_run(_cfg(tmp_path / "nope", tmp_path))


def test_model_context_and_tokenizer_mismatch(small_dataset, tmp_path):
    short = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32)
    save_model(short, None, tmp_path / "ctx32")
    with pytest.raises(ChatrayError, match="block size 64 exceeds the context"):
        plan_run(_cfg(small_dataset, tmp_path, f"model.name={tmp_path / 'ctx32'}"))
    other = make_dataset(tmp_path / "other", n_train=20, n_eval=2, vocab=350)
    from chatray.data.dataset import load_tokenizer

    save_model(build_model("tiny", vocab_size=350, block_size=64, eos_token_id=0, n_layer=1, n_head=2, n_embd=32),
               load_tokenizer(str(other)), tmp_path / "other-model")
    with pytest.raises(ChatrayError, match="uses a different tokenizer"):
        plan_run(_cfg(small_dataset, tmp_path, f"model.name={tmp_path / 'other-model'}"))
    own = load_tokenizer(str(small_dataset))
    save_model(build_model("tiny", vocab_size=len(own), block_size=64, eos_token_id=0, n_layer=1, n_head=2,
                           n_embd=32), own, tmp_path / "same-tokenizer")
    _, plan = plan_run(_cfg(small_dataset, tmp_path, f"model.name={tmp_path / 'same-tokenizer'}"))
    assert plan.block_size == 64  # the dataset's own tokenizer passes the check


def test_storage_not_writable(small_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ChatrayError, match="is not writable"):
        plan_run(_cfg(small_dataset, blocker))


def test_resume_with_incompatible_config_is_refused(small_dataset, tmp_path):
    cfg, plan = plan_run(_cfg(small_dataset, tmp_path, "model.n_layer=1"))
    saved = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "plan": dataclasses.asdict(plan)}
    make_checkpoint(tmp_path / "r", 10, eval_loss=1.0, dataset=small_dataset, config=saved)
    _, again = plan_run(_cfg(small_dataset, tmp_path, "model.n_layer=1", "train.max_steps=50"))
    assert again.start_step == 10  # same model: resumes
    with pytest.raises(ChatrayError, match=r"cannot resume run .* from step 10: n_layer was 1, now 2"):
        plan_run(_cfg(small_dataset, tmp_path, "model.n_layer=2"))
    _, fresh = plan_run(_cfg(small_dataset, tmp_path, "model.n_layer=2", "run.resume=false"))  # start over
    assert fresh.start_step == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint_00000010" / "model.safetensors").is_file(), "kept, not deleted"


def test_cli_prints_one_line_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--data", str(tmp_path / "missing"), "--storage", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.splitlines()[0] == f"error: dataset not found: {tmp_path / 'missing'}"
    res = runner.invoke(cli, ["train", "--set", "train.lr=-0.1"])
    assert res.exit_code == 1 and "lr must be > 0, got -0.1" in res.output
    res = runner.invoke(cli, ["train", "--num-workers", "0"])
    assert res.exit_code == 1 and "num_workers must be >= 1, got 0" in res.output


def test_cli_status_and_list(small_dataset, tmp_path):
    run = tmp_path / "st" / "demo"
    make_checkpoint(run, 10, eval_loss=2.5, dataset=small_dataset)
    make_checkpoint(run, 20, eval_loss=2.0, dataset=small_dataset)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 100.0, "eval_loss": 2.5, "perplexity": 12.2},
        {"step": 20, "loss": 2.2, "lr": 5e-4, "tokens_per_s": 120.0, "eval_loss": 2.0, "perplexity": 7.4}]) + "\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "status", "demo", "--storage", str(tmp_path / "st")])
    assert res.exit_code == 0, res.output
    assert "step        20" in res.output and "checkpoint_00000020" in res.output and "2.2000" in res.output
    res = runner.invoke(cli, ["train", "list", "--storage", str(tmp_path / "st")])
    assert res.exit_code == 0 and "demo" in res.output
    res = runner.invoke(cli, ["train", "logs", "demo", "--storage", str(tmp_path / "st")])
    assert res.output.count("step ") == 2
    res = runner.invoke(cli, ["train", "status", "nope", "--storage", str(tmp_path / "st")])
    assert res.exit_code == 1 and "no run at" in res.output


def test_num_workers_range_on_the_cli_is_elastic():
    """`--num-workers 1-2` -> min_workers 1, num_workers 2; `--num-workers 2` is a fixed group even if the YAML was
    elastic; a bad range is a usage error naming the option."""
    from chatray.train.commands import _overrides

    def cfg(num_workers, *sets):
        return load_config(FinetuneConfig, None, _overrides(tuple(sets), None, None, None, None, num_workers, None))

    elastic = cfg((1, 2))
    assert (elastic.scaling.min_workers, elastic.scaling.num_workers) == (1, 2)
    fixed = cfg((None, 2), "scaling.min_workers=1")
    assert (fixed.scaling.min_workers, fixed.scaling.num_workers) == (None, 2)
    res = CliRunner().invoke(cli, ["train", "--num-workers", "2-1"])
    assert res.exit_code == 2 and "--num-workers" in res.output and "1 <= MIN <= MAX" in res.output
    res = CliRunner().invoke(cli, ["train", "--num-workers", "two"])
    assert res.exit_code == 2 and "expected a number of workers N or a range MIN-MAX" in res.output


def test_scaling_problems_are_named():
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, ["scaling.num_workers=1", "scaling.min_workers=2",
                                           "scaling.resources_per_worker={CPU: 1, slot: 0}"])
    text = str(e.value)
    assert "min_workers (2) must be <= num_workers (1)" in text
    assert "resources_per_worker.CPU: set cpus_per_worker / use_gpu instead" in text
    assert "resources_per_worker.slot must be > 0, got 0" in text
    with pytest.raises(ConfigError, match="placement_strategy: must be one of 'PACK', 'SPREAD'"):
        load_config(FinetuneConfig, None, ["scaling.placement_strategy=EVERYWHERE"])


def test_scaling_config_fixed_and_elastic():
    """What Ray Train gets: num_workers as an int or Ray Train V2's (min, max), the placement, custom resources."""
    from chatray.train.trainer import scaling_config

    fixed = scaling_config(load_config(FinetuneConfig, None, ["scaling.num_workers=2",
                                                              "scaling.placement_strategy=STRICT_SPREAD",
                                                              "scaling.resources_per_worker={slot: 1}"]),
                           {"CPU": 0.5})
    assert fixed.num_workers == 2 and fixed.placement_strategy == "STRICT_SPREAD" and not fixed.elasticity_enabled
    assert fixed.resources_per_worker == {"CPU": 0.5, "slot": 1}
    elastic = scaling_config(load_config(FinetuneConfig, None, ["scaling.num_workers=2", "scaling.min_workers=1"]),
                             {"CPU": 1})
    assert elastic.num_workers == (1, 2) and elastic.elasticity_enabled
    assert (elastic.min_workers, elastic.max_workers) == (1, 2)
