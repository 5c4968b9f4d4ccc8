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
