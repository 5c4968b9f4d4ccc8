"""Config loading: defaults < YAML < --set, unknown keys and wrong types named with the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from chatray.config import ConfigError, field_help, load_config, opt, parse_overrides


@dataclass
class Inner:
    lr: float = opt(1e-3, "Peak learning rate.")
    steps: int = opt(10, "Optimizer steps.")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str = opt("run", "Run name.")
    device: Literal["cpu", "cuda"] = opt("cpu", "Where to run.")
    tags: list[str] = opt([], "Free-form tags.")
    note: str | None = opt(None, "Optional note.")
    train: Inner = opt(Inner, "Training section.")


def test_defaults_yaml_overrides_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: from-yaml\ntrain:\n  lr: 0.01\n  steps: 5\n")
    assert load_config(Outer).train.steps == 10
    c = load_config(Outer, f)
    assert (c.name, c.train.lr, c.train.steps) == ("from-yaml", 0.01, 5)
    c = load_config(Outer, f, ["train.steps=7", "tags=[a, b]", "note=hello"])
    assert (c.name, c.train.lr, c.train.steps, c.tags, c.note) == ("from-yaml", 0.01, 7, ["a", "b"], "hello")


def test_unknown_keys_and_types_reported_together_with_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("nmae: x\ndevice: tpu\ntrain:\n  steps: many\n  lr: 0.1\n  extra: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(Outer, f)
    msg = str(ei.value)
    assert str(f) in msg
    assert "unknown key nmae (did you mean 'name'?)" in msg
    assert "device: must be one of 'cpu', 'cuda', got 'tpu'" in msg
    assert "train.steps: expected an integer, got 'many'" in msg
    assert "unknown key train.extra" in msg
    assert len(ei.value.problems) == 4


def test_validation_error_names_section(tmp_path):
    with pytest.raises(ConfigError, match=r"train: lr must be > 0, got -1"):
        load_config(Outer, None, ["train.lr=-1"])


def test_bad_override_blamed_on_set():
    with pytest.raises(ConfigError, match=r"--set.*unknown key train.stepz"):
        load_config(Outer, None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["nonsense"])


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, f)


def test_field_help():
    assert field_help(Outer, "train.lr") == "Peak learning rate."
