"""The GPU benchmark scripts run end to end (``--smoke``: a tiny model on CPU).

A lent GPU machine gives a session minutes, not hours: a script that broke since it last ran there would waste
them. These runs check the scripts drive today's engine and training step and print the figures they promise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _smoke(script: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_gpu_serve_smoke_reports_every_figure():
    res = _smoke("gpu_serve.py")
    for n in (1, 8):
        run = res[f"engine_{n}"]
        assert run["tokens"] == 16 * n and run["tokens_per_s"] > 0
        assert 0 < run["itl_p50_ms"] <= run["itl_p99_ms"] and 0 < run["ttft_p50_ms"] <= run["ttft_p99_ms"]
        assert res[f"hf_generate_{n}_tokens_per_s"] > 0 and res[f"ratio_vs_hf_{n}"] > 0
    assert set(res["meets_targets"]) == {"tokens_per_s_1"}  # the 64-request targets need the full run


@pytest.mark.timeout(300)
def test_gpu_train_smoke_reports_mfu_against_its_baseline():
    res = _smoke("gpu_train.py")
    assert res["tokens_per_s"] > 0 and res["fp32_eager_tokens_per_s"] > 0 and 0 < res["mfu"] < 1
    assert res["padded_vocab"] % 128 == 0 and res["attention"] == "causal"
