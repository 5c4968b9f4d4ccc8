"""Fixtures for training unit tests: a small prepared dataset written without Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A prepared dataset (400-token BPE, max_length 64, ~120 train / 16 eval rows)."""
    return make_dataset(tmp_path_factory.mktemp("train-unit") / "ds")
