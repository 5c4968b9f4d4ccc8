"""`make demo` (python -m chatray.demo) fails with one clear line on a bad CHATRAY_* setting, before starting Ray."""

from __future__ import annotations

import os
import subprocess
import sys

from support.ports import free_port


def test_bad_cpu_count_is_named_and_no_cluster_is_claimed(tmp_path):
    env = {**os.environ, "CHATRAY_NUM_CPUS": "two", "CHATRAY_HOME": str(tmp_path),
           "CHATRAY_DASHBOARD_PORT": str(free_port()), "CHATRAY_RAY_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "chatray.demo", "--no-chat"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert "error: CHATRAY_NUM_CPUS must be a whole number, got 'two'" in r.stderr
    assert "Traceback" not in r.stderr
    assert "left running" not in r.stderr  # nothing was started, so nothing to point `make down` at


def _manifest(folder, *, tokenizer: str, max_length: int, founding: bool) -> None:
    import json

    sources = [{"path": "/x/chatterbot_corpus/data/english"}] + ([{"path": "/x/chatray/data/founding.jsonl"}]
                                                                  if founding else [])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "max_length": max_length, "splits": {},
                                                      "sources": sources, "tokenizer": {"source": tokenizer}}))


def test_a_dataset_from_other_settings_is_prepared_again(tmp_path):
    from chatray.demo import PREPARE_OPTIONS, _dataset_current

    tok, length = PREPARE_OPTIONS["tokenizer"], PREPARE_OPTIONS["max_length"]
    cases = {"current": (tok, length, True), "old-length": (tok, 128, True), "old-vocab": ("train:8000", length, True),
             "no-founding": (tok, length, False)}
    for name, (t, m, f) in cases.items():
        _manifest(tmp_path / name, tokenizer=t, max_length=m, founding=f)
    assert [n for n in cases if _dataset_current(tmp_path / n)] == ["current"]
    assert not _dataset_current(tmp_path / "missing")


def test_before_and_after_come_from_the_runs_step_zero_and_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    import json

    import chatray.demo as demo

    run, best = tmp_path / "run", tmp_path / "run" / "checkpoint_00000010"
    best.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 8.0, "perplexity": 2980.9,
                                                   "sample": "工工工"}) + "\n")
    (best / "metrics.json").write_text(json.dumps({"step": 10, "eval_loss": 3.0, "perplexity": 20.1}))
    monkeypatch.setattr(demo, "_reply", lambda url, prompt, temperature: f"reply to {prompt} at {temperature}")
    demo._compare(str(run), str(best), "http://unused", "你喜欢什么运动?")
    out = capsys.readouterr().out
    assert "fine-tuned (step 10)" in out and "(148x lower)" in out
    assert "untrained:  工工工" in out and "fine-tuned: reply to 你喜欢什么运动? at 0.0" in out
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")  # no step-0 eval
    demo._compare(str(run), str(best), "http://unused", "你喜欢什么运动?")
    assert "was not recorded for this run" in capsys.readouterr().out
