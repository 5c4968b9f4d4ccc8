"""What a deployment serves is pinned once, when the app is built: chatray checkpoints, plain folders, hub ids."""

from __future__ import annotations

import json
import shutil

import pytest
from support.checkpoints import make_checkpoint
from support.hub import REVISION, make_hub_cache, make_plain_folder

from chatray.errors import ChatrayError
from chatray.serve.settings import ServedModel
from chatray.serve.source import fetch_served_model, resolve_served_model


def _better(run, step: int, eval_loss: float):
    """Another checkpoint of ``run``, as training writes it, with this step and eval loss."""
    folder = run / f"checkpoint_{step:08d}"
    shutil.copytree(run / "checkpoint_00000001", folder)
    (folder / "metrics.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    return folder


def test_best_is_pinned_to_one_checkpoint_with_its_run_step_and_eval_loss(tmp_path):
    run = tmp_path / "run"
    first = make_checkpoint(run / "checkpoint_00000001")
    pinned = resolve_served_model(f"{run}:best")
    assert pinned == ServedModel(requested=f"{run}:best", kind="checkpoint", location=str(first), run="run",
                                 step=1, eval_loss=5.0)
    _better(run, 2, 1.0)  # training goes on after the build
    assert fetch_served_model(pinned) == first  # a replica started now still loads the pinned one
    assert resolve_served_model(f"{run}:best").location == str(run / "checkpoint_00000002")  # a redeploy moves


def test_a_torn_chatray_checkpoint_keeps_failing_its_integrity_check(tmp_path):
    folder = make_checkpoint(tmp_path / "run" / "checkpoint_00000001")
    (folder / "metrics.json").unlink()  # named like a checkpoint: not mistaken for a plain folder
    with pytest.raises(ChatrayError, match="incomplete or corrupted: missing metrics.json"):
        resolve_served_model(str(folder))


def test_a_plain_save_pretrained_folder_is_served_as_it_is(tmp_path):
    folder = make_plain_folder(tmp_path / "my-gpt2")
    pinned = resolve_served_model(str(folder))
    assert pinned == ServedModel(requested=str(folder), kind="folder", location=str(folder))
    assert fetch_served_model(pinned) == folder


def test_a_hub_id_comes_from_the_local_cache_at_one_revision(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snapshot = make_hub_cache(cache, "chatray-test/tiny-gpt2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    pinned = resolve_served_model("chatray-test/tiny-gpt2")
    assert pinned == ServedModel(requested="chatray-test/tiny-gpt2", kind="hub", location="chatray-test/tiny-gpt2",
                                 revision=REVISION)
    assert pinned.pinned == f"chatray-test/tiny-gpt2@{REVISION}"
    assert fetch_served_model(pinned) == snapshot
    # GPT-2 presets: a cache that holds them under the hub's full name serves the short one too.
    make_hub_cache(cache, "openai-community/gpt2")
    assert resolve_served_model("gpt2").location == "openai-community/gpt2"


def test_a_hub_id_missing_from_the_cache_names_the_cache_and_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatrayError, match=r"'no-such/model' is not a folder and not in the local Hugging Face "
                                           r"cache .*/hf/hub") as e:
        resolve_served_model("no-such/model")
    assert "HF_HOME" in e.value.hint
    # A pinned revision that this node's cache lacks fails the replica with the same clear message.
    with pytest.raises(ChatrayError, match=f"at revision {REVISION}"):
        fetch_served_model(ServedModel(requested="x/y", kind="hub", location="x/y", revision=REVISION))


def test_a_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ChatrayError, match="checkpoint not found"):
        resolve_served_model(str(tmp_path / "nowhere"))
