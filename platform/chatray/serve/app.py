"""The Serve application builder: ``import_path: chatray.serve.app:build_app`` in serve_config.yaml.

``build_app(args)`` validates its args once with pydantic (:class:`ServeArgs`, the one place serving defaults
are written), builds each deployment's typed settings from them (:mod:`chatray.serve.settings`) and binds
``Ingress(Generator)``; replicas take those settings as they are. Deployment options (replicas, autoscaling,
resources, queue limits) are not args: they come from the ``deployments:`` section of serve_config.yaml, which
Ray Serve applies on top of the defaults declared on the deployment classes (``chatray serve`` applies the same
section itself).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from chatray.errors import ChatrayError
from chatray.serve.settings import GeneratorSettings, IngressSettings, SamplingDefaults

__all__ = ["ServeArgs", "build_app", "build_app_with_options", "model_name_from_checkpoint", "parse_args"]

DEFAULT_CHECKPOINT = ".demo/checkpoints/tiny-demo:best"


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of the application in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(DEFAULT_CHECKPOINT,
                            description="checkpoint folder, s3:// URI, <storage>/<run>:latest|:best, a plain "
                            "Hugging Face model folder, or a hub id from the local HF cache; resolved once per deploy")
    model_name: str | None = Field(None, description="model id reported by /v1/models (default: the run name)")
    cache_dir: str | None = Field(None, description="where replicas copy remote checkpoints (default: the resolver's)")
    api_key_env: str | None = Field("CHATRAY_API_KEY",
                                    description="env var holding the API key in the replicas' environment (that of "
                                    "`ray start` on each node); unset/empty = no auth")
    api_key_file: str | None = Field(None, description="absolute path of a file holding the API key on each node; "
                                     "when set, it is used instead of api_key_env")
    device: str = Field("auto", description="auto (GPU when the replica has one), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="weights dtype")
    max_batch_size: int = Field(16, ge=1, le=1024, description="requests decoded together per replica (vLLM's "
                                "max_num_seqs): the KV cache holds this many sequences")
    max_model_len: int | None = Field(None, ge=8, description="most tokens (prompt + output) per request; the KV "
                                      "cache gives each running request this many positions (default: the model's "
                                      "context)")
    max_num_batched_tokens: int = Field(2048, ge=2, le=1 << 20, description="tokens one engine step processes: "
                                        "every running request's next token, then prompt chunks")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of the GPU's memory a replica uses "
                                          "(weights, KV cache, work); fewer than max_batch_size run when it is short")
    cuda_graphs: bool = Field(True, description="replay decode steps as CUDA graphs on a GPU")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10, description="idle replica waits this long to batch")
    max_tokens: int = Field(256, ge=1, description="default max_tokens when a request has none")
    temperature: float = Field(0.7, ge=0, le=2, description="default temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="default top_p")
    top_k: int = Field(0, ge=0, description="default top_k (0 = off)")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="default repetition penalty (1 = off)")
    max_n: int = Field(4, ge=1, le=64, description="most choices (n) one request may ask for")
    # At most 2 MiB: the ingress forwards the request over Serve's gRPC data plane, whose messages are capped at
    # 4 MiB (a 1024-token context never needs a body near either).
    max_body_bytes: int = Field(1 << 20, ge=1024, le=2 << 20, description="larger request bodies get 413")
    request_timeout_s: float = Field(100.0, gt=0, description="per-request limit in the ingress (408 after)")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After seconds on 503/429 when overloaded")
    step_delay_s: float = Field(0.0, ge=0, le=5, description="testing only: sleep after each decode step")

    @field_validator("max_num_batched_tokens")
    @classmethod
    def _token_budget(cls, v: int, info: ValidationInfo) -> int:
        batch = info.data.get("max_batch_size")
        if batch is not None and v <= batch:
            raise ValueError(f"must exceed max_batch_size ({batch}), got {v}: each step decodes up to "
                             "max_batch_size tokens first")
        return v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"must be an environment variable name, got {v!r}")
        return v or None

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isabs(os.path.expanduser(v.strip())):
            # Replicas run in other directories than the builder: a relative path would name another file.
            raise ValueError(f"must be an absolute path (or start with ~), got {v!r}")
        return v.strip() if v else None

    def sampling_defaults(self) -> SamplingDefaults:
        """The sampling settings a request gets for the fields it leaves out."""
        return SamplingDefaults(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, repetition_penalty=self.repetition_penalty)

    def generator_settings(self) -> GeneratorSettings:
        """What each ``Generator`` replica gets: the checkpoint is resolved here, once per deploy.

        A relative path is taken relative to where the app is built; ``<run>:best`` becomes one checkpoint
        folder and a hub id one cached revision, so every replica (also ones added or restarted later) loads
        the same weights.

        Raises:
            ChatrayError: nothing servable at ``checkpoint``.
        """
        from chatray.serve.source import resolve_served_model

        model = resolve_served_model(self.checkpoint)
        return GeneratorSettings(
            model=model, model_name=self.served_model_name(),
            cache_dir=self.cache_dir, device=self.device, dtype=self.dtype, max_batch_size=self.max_batch_size,
            max_model_len=self.max_model_len, max_num_batched_tokens=self.max_num_batched_tokens,
            gpu_memory_utilization=self.gpu_memory_utilization, cuda_graphs=self.cuda_graphs,
            batch_wait_timeout_s=self.batch_wait_timeout_s, step_delay_s=self.step_delay_s,
            sampling=self.sampling_defaults(), max_n=self.max_n)

    def served_model_name(self) -> str:
        """The id ``/v1/models`` reports: ``model_name``, else the checkpoint's run name."""
        return self.model_name or model_name_from_checkpoint(self.checkpoint)

    def ingress_settings(self) -> IngressSettings:
        """What the ingress gets: where its replicas read the API key, never the key itself.

        A key that this process (where the app is built) sees in ``api_key_env`` makes the key required: a replica
        that cannot read one then refuses to start instead of serving without auth.
        """
        from chatray.serve.apikey import env_api_key

        required = bool(self.api_key_file) or env_api_key(self.api_key_env) is not None
        return IngressSettings(api_key_env=self.api_key_env, api_key_file=self.api_key_file,
                               require_api_key=required, max_body_bytes=self.max_body_bytes,
                               request_timeout_s=self.request_timeout_s, retry_after_s=self.retry_after_s,
                               model_name=self.served_model_name())


def model_name_from_checkpoint(uri: str) -> str:
    """``/x/checkpoints/tiny-demo:best`` -> ``tiny-demo``; ``.../tiny-demo/checkpoint_000003`` -> ``tiny-demo``."""
    base = re.sub(r":(latest|best)$", "", uri.rstrip("/"))
    parts = [p for p in base.rstrip("/").split("/") if p]
    if not parts:
        return "chatray"
    name = parts[-1]
    if name.startswith("checkpoint") and len(parts) > 1:
        name = parts[-2]
    return name


def parse_args(args: dict[str, Any] | ServeArgs | None) -> ServeArgs:
    """Validate app args (a :class:`ServeArgs` is taken as it is: it was validated when it was made).

    Raises:
        ChatrayError: naming every bad arg (``args.temperature: ...``).
    """
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            name = ".".join(str(p) for p in err["loc"]) or "args"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown arg (known: {', '.join(sorted(ServeArgs.model_fields))})"
            problems.append(f"args.{name}: {msg} (got {err.get('input')!r})" if err["type"] != "extra_forbidden"
                            else f"args.{name}: {msg}")
        raise ChatrayError("invalid chatray.serve.app:build_app args: " + "; ".join(problems),
                           hint="see the args section of serve_config.yaml") from None


def build_app(args: dict[str, Any] | ServeArgs) -> Any:
    """Build the chatray Serve application: ``Ingress`` -> ``Generator``.

    Args:
        args: the application args (see :class:`ServeArgs`), e.g. from serve_config.yaml.

    Returns:
        A ``ray.serve.Application``.

    Raises:
        ChatrayError: an invalid arg (the message names it).
    """
    return build_app_with_options(args)


def build_app_with_options(args: dict[str, Any] | ServeArgs, deployments: dict[str, dict[str, Any]] | None = None,
                           *, generator: GeneratorSettings | None = None) -> Any:
    """Like :func:`build_app`, also applying per-deployment options (``{"Generator": {...}}``) the way
    serve_config.yaml's ``deployments:`` section does (used by ``chatray serve`` and the tests).

    ``generator`` is ``args``' :meth:`ServeArgs.generator_settings` when the caller already resolved them
    (the checkpoint is resolved once per build)."""
    from chatray.serve.generator import Generator
    from chatray.serve.ingress import Ingress

    a = parse_args(args)
    opts = deployments or {}
    unknown = set(opts) - {"Generator", "Ingress"}
    if unknown:
        raise ChatrayError(f"unknown deployment name(s) {', '.join(sorted(unknown))}: "
                           "chatray's deployments are Ingress and Generator")
    handle = Generator.options(**opts.get("Generator", {})).bind(generator or a.generator_settings())
    return Ingress.options(**opts.get("Ingress", {})).bind(handle, a.ingress_settings())
