"""Before a run starts: the checks a user can fail, and the :class:`RunPlan` every worker receives.

Everything a user can get wrong is checked here, before any worker starts, so that it surfaces as one clear
line: missing dataset, model/dataset tokenizer mismatch, block size over the model's context, storage that
cannot be written, and a rerun whose config cannot continue the existing checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chatray.config import FinetuneConfig, from_dict, to_dict
from chatray.errors import ChatrayError
from chatray.storage.uri import exists, filesystem_for, is_remote, join, read_text, write_text
from chatray.train.console import note

__all__ = ["RunPlan", "absolute_paths", "plan_run"]


@dataclass(frozen=True)
class RunPlan:
    """What the driver resolves once and every worker agrees on (saved as ``plan`` in ``train_config.json``)."""

    run_uri: str  # <storage_path>/<run name>
    block_size: int  # tokens per training sequence
    pad_id: int
    eos_id: int
    vocab_size: int  # of the dataset's tokenizer
    fingerprint: str  # of the dataset's tokenizer
    grad_accum: int  # micro-batches per optimizer step on each worker
    eval_rows: int
    train_rows: int
    train_tokens: int
    start_step: int  # of the checkpoint a rerun continues from (0: a fresh run)

    def loop_config(self, cfg: FinetuneConfig) -> dict[str, Any]:
        """``train_loop_config`` for Ray Train: ``cfg`` and this plan as plain data (workers may run other code)."""
        return {"cfg": to_dict(cfg), "plan": dataclasses.asdict(self)}

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> tuple[FinetuneConfig, RunPlan]:
        """The run config and plan that :meth:`loop_config` packed, validated again on the worker."""
        return from_dict(FinetuneConfig, config["cfg"], "train_loop_config"), cls(**config["plan"])


def _abs(uri: str) -> str:
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with local data/storage paths made absolute (workers run in other directories)."""
    return replace(cfg, data=replace(cfg.data, path=_abs(cfg.data.path)),
                   run=replace(cfg.run, storage_path=_abs(cfg.run.storage_path)))


def _check_writable(storage: str, run_uri: str) -> None:
    probe = join(run_uri, f".chatray-write-test-{os.getpid()}")
    try:
        write_text(probe, "ok")
        fs, path = filesystem_for(probe)
        fs.delete_file(path)
    except ChatrayError:
        raise
    except Exception as e:  # PermissionError, OSError from S3 (no bucket, access denied), read-only FS
        raise ChatrayError(f"storage {storage} is not writable: {str(e).splitlines()[0]}",
                           hint="set run.storage_path (--storage) to a folder or s3:// bucket you can write to") from e


def _pretrained_tokenizer_fingerprint(name: str) -> str:
    """Fingerprint of the tokenizer that comes with pretrained model ``name``.

    Raises:
        ChatrayError: when the model's tokenizer cannot be loaded.
    """
    from chatray.data.tokenizer import load_pretrained_tokenizer, tokenizer_fingerprint
    from chatray.model import model_source

    return tokenizer_fingerprint(load_pretrained_tokenizer(model_source(name)))


def _check_model(cfg: FinetuneConfig, block_size: int, manifest: dict[str, Any]) -> None:
    """The model fits the data: context >= block size and the dataset's tokenizer (pretrained), a valid shape (tiny)."""
    from chatray.model import is_tiny, model_context_length

    name = cfg.model.name
    tok_info = manifest["tokenizer"]
    if not is_tiny(name):
        ctx = model_context_length(name)
        if ctx is not None and block_size > ctx:
            rows = int(manifest["max_length"])
            raise ChatrayError(f"block size {block_size} exceeds the context of model {name!r} ({ctx} tokens)",
                               hint=f"set data.block_size <= {ctx} (the dataset's rows are {rows} tokens)")
        theirs = _pretrained_tokenizer_fingerprint(name)
        if theirs != tok_info["fingerprint"]:
            raise ChatrayError(f"dataset {cfg.data.path} was tokenized with {tok_info.get('source')!r} "
                               f"({tok_info['fingerprint']}) but model {name!r} uses a different tokenizer "
                               f"({theirs})", hint=f"prepare the data with --tokenizer {name}, or use model.name: tiny")
    elif any(v is not None for v in (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd)):
        from chatray.model.presets import TINY

        n_head = cfg.model.n_head or TINY.n_head
        n_embd = cfg.model.n_embd or TINY.n_embd
        if n_embd % n_head:
            raise ChatrayError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")


def _set_aside(run_uri: str) -> None:
    """``run.resume: false`` on an existing run: move its folder aside (never delete or overwrite checkpoints)."""
    if not exists(run_uri):
        return
    if is_remote(run_uri):
        raise ChatrayError(f"run {run_uri} exists and run.resume is false; chatray does not move object-store runs",
                           hint="pick a new run name (--name), or delete the old run yourself")
    _, path = filesystem_for(run_uri)
    aside = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(path, aside)
    note(f"run.resume is false: moved the existing run to {aside}")


def _check_ray_snapshot(run_uri: str) -> None:
    """Ray Train restores a run from ``checkpoint_manager_snapshot.json``; catch what would make it fail."""
    snap_uri = join(run_uri, "checkpoint_manager_snapshot.json")
    if not exists(snap_uri):
        return
    import ray
    try:
        snap = json.loads(read_text(snap_uri))
    except ValueError as e:
        raise ChatrayError(f"{snap_uri} is corrupt ({e})", hint="use a new run name (--name)") from e
    if snap.get("ray_version") not in (None, ray.__version__):
        raise ChatrayError(f"run {run_uri} was written by Ray {snap.get('ray_version')}, this is Ray {ray.__version__};"
                           " Ray Train cannot resume it", hint="use the same Ray version, or a new run name (--name)")
    for r in snap.get("checkpoint_results", []):
        name = r.get("checkpoint_dir_name")
        if name and not exists(join(run_uri, name)):
            raise ChatrayError(f"run {run_uri}: Ray's checkpoint list names {name}, which no longer exists",
                               hint="restore that folder, or use a new run name (--name)")


# What a resumed run must share with the checkpoint it continues from.
_COMPAT_KEYS = ("model", "n_layer", "n_head", "n_embd", "block_size", "tokenizer_fingerprint")


def _compat(cfg: FinetuneConfig, block_size: int, fingerprint: str) -> dict[str, Any]:
    m = cfg.model
    return {"model": m.name, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
            "block_size": block_size, "tokenizer_fingerprint": fingerprint}


def _check_resume(cfg: FinetuneConfig, plan: RunPlan) -> int:
    """Step of the checkpoint a rerun would continue from (0: fresh); errors when it cannot continue."""
    from chatray.storage.checkpoints import latest_checkpoint
    from chatray.train.state import read_saved_run

    _check_ray_snapshot(plan.run_uri)
    latest = latest_checkpoint(plan.run_uri, require_train_state=True)
    if latest is None:
        return 0
    saved = read_saved_run(latest.uri)
    if saved is None:
        return latest.step  # written by another tool: trust it
    old_cfg, old_plan = saved
    old = _compat(old_cfg, old_plan["block_size"], old_plan["fingerprint"])
    new = _compat(cfg, plan.block_size, plan.fingerprint)
    diffs = [f"{k} was {old[k]!r}, now {new[k]!r}" for k in _COMPAT_KEYS if old[k] != new[k]]
    if diffs:
        raise ChatrayError(f"cannot resume run {plan.run_uri} from step {latest.step}: {'; '.join(diffs)}",
                           hint="use a new run name (--name) to start over with this config")
    return latest.step


def plan_run(cfg: FinetuneConfig) -> tuple[FinetuneConfig, RunPlan]:
    """Check a run before launching it and resolve what every worker needs to agree on.

    Returns:
        (cfg with absolute local paths, the run's plan).

    Raises:
        ChatrayError: any of the problems listed in the module docstring.
    """
    from chatray.data.dataset import load_tokenizer, read_manifest

    cfg = absolute_paths(cfg)
    manifest = read_manifest(cfg.data.path)
    block_size = cfg.data.block_size or int(manifest["max_length"])
    _check_model(cfg, block_size, manifest)
    tok = load_tokenizer(cfg.data.path)
    eos = tok.eos_token_id if tok.eos_token_id is not None else manifest["tokenizer"]["eos_token_id"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    splits = manifest["splits"]
    plan = RunPlan(run_uri=join(cfg.run.storage_path, cfg.run.name), block_size=block_size, pad_id=int(pad),
                   eos_id=int(eos), vocab_size=len(tok), fingerprint=manifest["tokenizer"]["fingerprint"],
                   grad_accum=cfg.grad_accum, eval_rows=int(splits.get("eval", {}).get("rows", 0)),
                   train_rows=int(splits["train"]["rows"]), train_tokens=int(splits["train"].get("tokens", 0)),
                   start_step=0)
    if plan.train_rows == 0:
        raise ChatrayError(f"dataset {cfg.data.path} has no training rows")
    if not cfg.run.resume:
        _set_aside(plan.run_uri)
    _check_writable(cfg.run.storage_path, plan.run_uri)
    return cfg, replace(plan, start_step=_check_resume(cfg, plan))
