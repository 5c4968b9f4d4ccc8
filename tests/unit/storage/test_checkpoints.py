"""Checkpoint resolution (:latest, :best, folders), skipping broken checkpoints, materializing from S3."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from train_helpers import make_checkpoint, make_dataset  # noqa: E402

from chatray.errors import ChatrayError  # noqa: E402
from chatray.storage.checkpoints import (  # noqa: E402
    best_checkpoint,
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    materialize_checkpoint,
    resolve_checkpoint,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ckpt-unit") / "ds", n_train=30, n_eval=4)


@pytest.fixture()
def run(tmp_path, dataset) -> Path:
    """A run with checkpoints at steps 10 (eval 2.0), 20 (eval 1.5, the best), 30 (eval 1.8, the latest)."""
    r = tmp_path / "storage" / "my-run"
    for step, ev in ((10, 2.0), (20, 1.5), (30, 1.8)):
        make_checkpoint(r, step, eval_loss=ev, dataset=dataset)
    return r


def test_latest_and_best(run):
    assert resolve_checkpoint(f"{run}:latest") == str(run / "checkpoint_00000030")
    assert resolve_checkpoint(f"{run}:best") == str(run / "checkpoint_00000020")
    assert resolve_checkpoint(str(run)) == str(run / "checkpoint_00000030")  # a run folder = its latest
    assert resolve_checkpoint(str(run / "checkpoint_00000010")) == str(run / "checkpoint_00000010")
    assert [c.step for c in list_checkpoints(str(run))] == [10, 20, 30]


def test_best_falls_back_to_latest_without_eval_loss(tmp_path, dataset):
    r = tmp_path / "noeval"
    make_checkpoint(r, 1, eval_loss=None, dataset=dataset)
    make_checkpoint(r, 2, eval_loss=None, dataset=dataset)
    assert best_checkpoint(str(r)).step == 2


@pytest.mark.parametrize("damage", ["truncate_weights", "drop_metrics", "garbage_header", "short_tokenizer"])
def test_broken_latest_is_skipped_with_a_warning(run, damage, caplog):
    bad = run / "checkpoint_00000030"
    if damage == "truncate_weights":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop_metrics":
        (bad / "metrics.json").unlink()
    elif damage == "garbage_header":
        (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    else:
        (bad / "tokenizer.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="chatray.checkpoints"):
        assert resolve_checkpoint(f"{run}:latest") == str(run / "checkpoint_00000020")
    assert "skipping checkpoint" in caplog.text and "checkpoint_00000030" in caplog.text
    assert check_checkpoint(str(bad)) is not None
    with pytest.raises(ChatrayError, match="incomplete or corrupted"):
        resolve_checkpoint(str(bad))


def test_train_state_required_for_resume(tmp_path, dataset):
    r = tmp_path / "r"
    make_checkpoint(r, 5, eval_loss=1.0, dataset=dataset)
    make_checkpoint(r, 6, eval_loss=1.0, dataset=dataset, with_train_state=False)
    assert latest_checkpoint(str(r)).step == 6  # serving does not need it
    assert latest_checkpoint(str(r), require_train_state=True).step == 5


def test_nothing_valid_names_the_uri(tmp_path, dataset):
    with pytest.raises(ChatrayError, match=r"checkpoint not found: .*nowhere:best"):
        resolve_checkpoint(str(tmp_path / "nowhere") + ":best")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ChatrayError, match=r"no valid checkpoint in .*empty-run:latest"):
        resolve_checkpoint(f"{empty}:latest")
    r = tmp_path / "only-broken"
    bad = make_checkpoint(r, 1, eval_loss=1.0, dataset=dataset)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ChatrayError, match="no valid checkpoint"):
        resolve_checkpoint(f"{r}:best")


def test_materialize_local_is_in_place(run):
    assert materialize_checkpoint(f"{run}:best") == run / "checkpoint_00000020"


def test_materialize_from_s3_caches_atomically(run, tmp_path, s3_server):
    from chatray.storage.uri import upload_dir

    base = f"s3://{s3_server['bucket']}/unit-ckpt/my-run"
    for c in ("checkpoint_00000010", "checkpoint_00000020", "checkpoint_00000030"):
        upload_dir(run / c, f"{base}/{c}")
    assert resolve_checkpoint(f"{base}:best") == f"{base}/checkpoint_00000020"
    cache = tmp_path / "cache"
    local = materialize_checkpoint(f"{base}:best", cache_dir=str(cache))
    assert local.parent == cache and (local / "model.safetensors").is_file()
    assert not (local / "train_state.pt").exists()  # serving never loads pickles
    assert [p.name for p in cache.iterdir()] == [local.name]  # no temp folders left behind
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert materialize_checkpoint(f"{base}:best", cache_dir=str(cache)) == local
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not copied again

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    assert model.config.vocab_size == len(tok) and tok.chat_template


def test_materialize_refuses_checkpoint_without_safetensors(tmp_path, dataset, s3_server):
    from chatray.storage.uri import upload_dir

    r = tmp_path / "pickles"
    bad = make_checkpoint(r, 1, eval_loss=1.0, dataset=dataset)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    uri = f"s3://{s3_server['bucket']}/unit-ckpt/pickles/checkpoint_00000001"
    upload_dir(bad, uri)
    with pytest.raises(ChatrayError, match="model.safetensors"):
        materialize_checkpoint(uri, cache_dir=str(tmp_path / "c"))
