"""The typed settings each part of the Serve application receives.

``build_app`` validates :class:`~chatray.serve.app.ServeArgs` once and builds these from it
(:meth:`~chatray.serve.app.ServeArgs.generator_settings`, :meth:`~chatray.serve.app.ServeArgs.ingress_settings`);
replicas take them as they are. No defaults here: every value comes from ``ServeArgs``, where each default is
written once.

Imports nothing heavy (no torch, no Ray): the app builder, the ingress and the replicas all import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GeneratorSettings", "IngressSettings", "SamplingDefaults", "ServedModel"]


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for each sampling field it leaves out."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass(frozen=True)
class ServedModel:
    """The one model a deployment serves, resolved once where the app is built.

    Every replica, including one that autoscaling adds or Serve restarts later, loads exactly this: a run's
    ``:best`` is pinned to one checkpoint folder and a hub id to one cached revision.

    Attributes:
        requested: the checkpoint as given (``<storage>/<run>:best``, a folder, ``s3://...``, ``gpt2``).
        kind: ``checkpoint`` (written by ``chatray train``: integrity-checked), ``folder`` (a plain Hugging Face
            model folder) or ``hub`` (a hub id, from the local Hugging Face cache).
        location: the checkpoint or folder URI, or the hub repo id.
        revision: the hub commit (``hub`` only).
        run: the training run's name (``checkpoint`` only).
        step: the checkpoint's training step (``checkpoint`` only).
        eval_loss: the checkpoint's eval loss, when it was evaluated.
    """

    requested: str
    kind: Literal["checkpoint", "folder", "hub"]
    location: str
    revision: str | None = None
    run: str | None = None
    step: int | None = None
    eval_loss: float | None = None

    @property
    def pinned(self) -> str:
        """``location``, with ``@revision`` for a hub model: what exactly is served."""
        return f"{self.location}@{self.revision}" if self.revision else self.location


@dataclass(frozen=True)
class GeneratorSettings:
    """What one ``Generator`` replica needs.

    Attributes:
        model: what every replica loads (resolved once, when the app was built).
        model_name: the id ``/v1/models`` reports.
        cache_dir: where the replica copies a remote checkpoint (None: the resolver's default).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        max_batch_size: requests decoded together (the KV cache's slots).
        max_model_len: most tokens per request (None: the model's context).
        max_num_batched_tokens: tokens one engine step processes.
        gpu_memory_utilization: share of the GPU's memory the replica uses.
        cuda_graphs: replay decode steps as CUDA graphs on a GPU.
        batch_wait_timeout_s: how long an idle engine waits to prefill a burst of arrivals together.
        step_delay_s: sleep after each decode step (tests only).
        sampling: defaults for fields a request leaves out.
        max_n: the most choices (``n``) one request may ask for.
    """

    model: ServedModel
    model_name: str
    cache_dir: str | None
    device: str
    dtype: str
    max_batch_size: int
    max_model_len: int | None
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    cuda_graphs: bool
    batch_wait_timeout_s: float
    step_delay_s: float
    sampling: SamplingDefaults
    max_n: int


@dataclass(frozen=True)
class IngressSettings:
    """What the HTTP ingress needs. No secret travels here: the replica reads the API key itself
    (:func:`chatray.serve.apikey.read_api_key`).

    Attributes:
        api_key_env: name of the variable holding the API key in the replica's environment (None: not used).
        api_key_file: path of a file holding the API key on the replica's node; when set, the only source.
        require_api_key: the app's builder saw a key, so a replica without one must refuse to start.
        max_body_bytes: larger request bodies get 413.
        request_timeout_s: per-request limit (408 after).
        retry_after_s: ``Retry-After`` seconds when overloaded.
        model_name: the served model's id (the ``model_name`` label of the rejected-requests counter).
    """

    api_key_env: str | None
    api_key_file: str | None
    require_api_key: bool
    max_body_bytes: int
    request_timeout_s: float
    retry_after_s: float
    model_name: str
