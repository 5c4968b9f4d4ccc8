"""The CLI answers --help fast without heavy imports, and turns errors into one clean line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from click.testing import CliRunner

from chatray import __version__
from chatray.cli import cli


def test_help_is_light_and_fast():
    code = ("import sys, time; t = time.perf_counter(); from chatray.cli import cli; "
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'pyarrow') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chatray.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "data" in r.stdout
    assert time.perf_counter() - t < 5  # generous: typically ~0.2 s; the import check above is the real guard


def test_version():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_prepare_bad_input_is_one_clean_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "chatray.cli", "data", "prepare", str(bad), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "error: " in r.stderr and "bad.jsonl:line 2: malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_prepare_requires_inputs():
    r = CliRunner().invoke(cli, ["data", "prepare", "--out", "x"])
    assert r.exit_code == 2 and "--demo" in r.output


def test_inspect_missing_dataset(tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatray.cli", "data", "inspect", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "dataset not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "x").write_text(json.dumps({}))
    r = subprocess.run([sys.executable, "-m", "chatray.cli", "data", "inspect", str(tmp_path / "half")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not a prepared dataset" in r.stderr
