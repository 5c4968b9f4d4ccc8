"""What a deployment serves: resolved once where the app is built, fetched the same way by every replica.

:func:`resolve_served_model` turns the ``checkpoint`` arg into a :class:`~chatray.serve.settings.ServedModel`
when the app is built, so ``<run>:best`` is pinned to one checkpoint folder and a hub id to one cached
revision; :func:`fetch_served_model` runs in each replica and gives a local folder holding exactly that.
A replica that autoscaling adds, or that Serve restarts, after training wrote a better checkpoint still
loads the pinned one; serving the newer one is a redeploy.

Three kinds of source:
  * a chatray checkpoint (folder, run folder, ``<run>:latest|:best``, local, NFS or ``s3://``), checked
    against its ``metrics.json`` integrity record;
  * a plain Hugging Face model folder (``save_pretrained`` output, local or ``s3://``);
  * a hub id (``gpt2``, ``openai-community/gpt2``), taken from the local Hugging Face cache only: serving never
    downloads, so a replica starts the same way offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from chatray.errors import ChatrayError
from chatray.serve.settings import ServedModel

__all__ = ["hub_cache_dir", "resolve_served_model", "fetch_served_model"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub`` (default ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def _looks_like_hub_id(uri: str) -> bool:
    return "://" not in uri and not uri.startswith((".", "/", "~")) and ":" not in uri and bool(_HUB_ID.fullmatch(uri))


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of ``repo_id`` (at ``revision``, else the cached ``main``), from the cache only.

    Raises:
        ChatrayError: not in the cache; the message names the cache folder and ``HF_HOME``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        at = f" at revision {revision}" if revision else ""
        raise ChatrayError(
            f"model {repo_id!r}{at} is not a folder and not in the local Hugging Face cache {cache} "
            f"({type(e).__name__})",
            hint="serving never downloads: fill the cache once where there is network "
            f"(`huggingface-cli download {repo_id}`) and point HF_HOME (or HF_HUB_CACHE) at it on every node, "
            "or give a local folder") from None


def resolve_served_model(uri: str) -> ServedModel:
    """Pin what ``uri`` names, once: the concrete checkpoint, the folder, or the cached hub revision.

    Args:
        uri: a chatray checkpoint URI, a plain Hugging Face model folder, or a hub id in the local cache.
            A relative local path is taken relative to this process's working directory.

    Returns:
        The :class:`ServedModel` every replica of the deployment loads.

    Raises:
        ChatrayError: nothing servable there (the message names ``uri`` and what is missing).
    """
    from chatray.storage.checkpoints import (
        describe_checkpoint,
        is_plain_model_folder,
        resolve_checkpoint,
        split_selector,
    )
    from chatray.storage.uri import is_remote

    base, selector = split_selector(uri)
    local = None if is_remote(base) else Path(base.removeprefix("file://")).expanduser()
    if selector is None and local is not None and not local.exists() and _looks_like_hub_id(uri):
        # The hub serves the GPT-2 presets under both names, so a cache may hold either.
        errors: list[ChatrayError] = []
        for repo_id in dict.fromkeys((uri, uri if "/" in uri else f"openai-community/{uri}")):
            try:
                snapshot = _cached_snapshot(repo_id, None)
            except ChatrayError as e:
                errors.append(e)
                continue
            return ServedModel(requested=uri, kind="hub", location=repo_id, revision=snapshot.name)
        raise errors[0]
    resolved = resolve_checkpoint(uri)
    if is_plain_model_folder(resolved):
        return ServedModel(requested=uri, kind="folder", location=resolved)
    info = describe_checkpoint(resolved)
    run = resolved.rstrip("/").rsplit("/", 2)[-2] if resolved.count("/") >= 2 else None
    return ServedModel(requested=uri, kind="checkpoint", location=resolved, run=run, step=info.step,
                       eval_loss=info.eval_loss)


def fetch_served_model(model: ServedModel, cache_dir: str | None = None) -> Path:
    """A local folder holding exactly ``model`` (in a replica): remote checkpoints and folders are copied into
    ``cache_dir`` once per node; hub models come from this node's Hugging Face cache at the pinned revision.

    Raises:
        ChatrayError: the pinned checkpoint or revision is gone or incomplete on this node.
    """
    if model.kind == "hub":
        return _cached_snapshot(model.location, model.revision)
    from chatray.storage.checkpoints import materialize_checkpoint

    return materialize_checkpoint(model.location, cache_dir=cache_dir)
