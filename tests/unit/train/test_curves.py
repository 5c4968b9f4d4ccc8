"""Training curves: TensorBoard events beside metrics.jsonl (read back with TensorBoard's reader) and PNG plots."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from chatray.cli import cli
from chatray.errors import ChatrayError
from chatray.train.curves import plot_runs
from chatray.train.metrics import MetricsLog


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _log(run, steps, keep_until_step=0, shift=0.0):
    log = MetricsLog(str(run), keep_until_step=keep_until_step, tensorboard=True)
    for s in steps:
        rec = {"step": s, "loss": 5.0 - 0.1 * s + shift, "lr": 1e-3, "grad_norm": 1.0 / s, "tokens_per_s": 100.0 * s}
        if s % 4 == 0:
            rec.update(eval_loss=4.0 - 0.1 * s, perplexity=math.exp(4.0 - 0.1 * s), sample=f"reply {s} 你好")
        log.append(rec)
    log.close()


def test_events_hold_every_record_and_a_resume_purges_the_redone_steps(tmp_path):
    run = tmp_path / "runs" / "r1"
    _log(run, range(1, 7))  # the first attempt dies after step 6...
    _log(run, range(5, 9), keep_until_step=4, shift=0.5)  # ...and resumes from its step-4 checkpoint
    acc = _events(run)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == list(range(1, 9))
    assert [v for _, v in loss] == pytest.approx([4.9, 4.8, 4.7, 4.6, 5.0, 4.9, 4.8, 4.7])  # 5..8 from the resume
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/loss")] == [(4, 3.6), (8, 3.2)]
    assert [e.step for e in acc.Scalars("eval/perplexity")] == [4, 8]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])
    texts = acc.Tensors("eval/sample/text_summary")
    assert [t.step for t in texts] == [4, 8]
    assert texts[-1].tensor_proto.string_val[0].decode() == "reply 8 你好"


def test_plot_draws_several_runs_to_a_png(tmp_path):
    import matplotlib.image

    _log(tmp_path / "a", range(1, 9))
    _log(tmp_path / "b", range(1, 13), shift=0.2)
    out = plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out" / "curves.png")
    assert out.stat().st_size > 20_000
    assert matplotlib.image.imread(out).shape == (800, 1500, 4)  # 15 x 8 inches at 100 dpi, RGBA


def test_train_plot_command_and_its_errors(tmp_path):
    _log(tmp_path / "runs" / "a", range(1, 5))
    out = tmp_path / "c.png"
    result = CliRunner().invoke(cli, ["train", "plot", "a", "--storage", str(tmp_path / "runs"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"written to {out}" in result.output and out.stat().st_size > 20_000
    result = CliRunner().invoke(cli, ["train", "plot", "nope", "--storage", str(tmp_path / "runs"), "--out",
                                       str(out)])
    assert result.exit_code != 0 and "no training metrics in" in result.output and "nope/metrics.jsonl" in result.output
    with pytest.raises(ChatrayError, match="no training metrics"):
        plot_runs([str(tmp_path / "empty")], out)
