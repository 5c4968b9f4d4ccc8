"""The ``Generator`` deployment: one model replica with a continuous-batching engine.

Each replica fetches the checkpoint that the app pinned when it was built (:mod:`chatray.serve.source`),
copying a remote one to a local cache (once per node), loads the safetensors weights with
:func:`chatray.model.load_model` (on the GPU when the replica has one) and runs
:class:`~chatray.serve.async_engine.AsyncEngine`. Concurrent requests routed to a replica share its decode
steps, each with its own sampling settings. Its settings arrive typed and validated (built from ``ServeArgs``
by ``build_app``).

Requests and replies cross the Ray boundary as plain dicts; errors come back as values (``{"error": ...}``
or an ``error`` event) so the ingress can map them to the OpenAI error shape before any byte is sent. A request's
``n`` choices, ``echo`` and logprobs are shaped by :mod:`~chatray.serve.choices`; ``/tokenize`` and ``/detokenize``
run here too, where the tokenizer is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from ray import serve

from chatray.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from chatray.serve.settings import GeneratorSettings

# torch/transformers (chatray.model's loader, chatray.serve.engine, chatray.serve.prompting) are imported inside
# the replica only: building the app (`serve deploy`'s build task, `chatray serve`) and the ingress never need them.

__all__ = ["Generator"]

logger = logging.getLogger("ray.serve")


@serve.deployment(
    name="Generator",
    max_ongoing_requests=32,
    max_queued_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)
class Generator:
    """Model replica: ``generate`` (one reply) and ``generate_stream`` (events) over a shared batch."""

    def __init__(self, settings: GeneratorSettings) -> None:
        import torch

        from chatray.data.tokenizer import CHAT_TEMPLATE
        from chatray.model import load_model, load_model_tokenizer
        from chatray.serve import choices, prompting
        from chatray.serve.async_engine import AsyncEngine
        from chatray.serve.engine import GenerationEngine
        from chatray.serve.logprobs import LogprobFormatter
        from chatray.serve.metrics import EngineMetrics, ray_sink
        from chatray.serve.outputs import EngineError
        from chatray.serve.source import fetch_served_model

        s, t0 = settings, time.perf_counter()
        # Pinned when the app was built: never re-resolve `:best` here, or replicas would serve mixed weights.
        local = fetch_served_model(s.model, cache_dir=s.cache_dir)
        model = load_model(local, device=s.device, dtype=s.dtype)
        tokenizer = load_model_tokenizer(local)
        template = "tokenizer"
        if not getattr(tokenizer, "chat_template", None):
            # A model trained elsewhere (e.g. the pretrained GPT-2) has none: chatray's is plain text plus EOS,
            # which any GPT-2 tokenizer encodes, and is what a chatray fine-tune of that model learns.
            tokenizer.chat_template, template = CHAT_TEMPLATE, "chatray-default"
            logger.warning("[chatray serve] warning: the tokenizer of %s has no chat template: "
                           "/v1/chat/completions uses chatray's", s.model.pinned)
        # vLLM's series on Ray's metrics endpoint, labelled with the model and (by Serve) this replica.
        core = GenerationEngine(model, tokenizer, max_batch_size=s.max_batch_size, max_model_len=s.max_model_len,
                                max_num_batched_tokens=s.max_num_batched_tokens,
                                gpu_memory_utilization=s.gpu_memory_utilization, cuda_graphs=s.cuda_graphs)
        graphs = core.warm_up()  # CUDA graphs of every decode-step shape, before the first request (GPU only)
        self._engine = AsyncEngine(core, batch_wait_timeout_s=s.batch_wait_timeout_s, step_delay_s=s.step_delay_s,
                                   metrics=EngineMetrics(ray_sink(s.model_name)))
        self._tokenizer = tokenizer
        self._defaults, self._max_n = s.sampling, s.max_n
        self._choices, self._prompting, self._engine_error = choices, prompting, EngineError
        self._formatter = LogprobFormatter(tokenizer)
        m = s.model
        self._info = {
            "id": s.model_name, "checkpoint": m.requested, "resolved_checkpoint": m.pinned, "kind": m.kind,
            "run": m.run, "step": m.step, "eval_loss": m.eval_loss, "chat_template": template,
            "local_path": str(local),
            "context_length": self._engine.engine.context_length, "device": str(self._engine.engine.device),
            "dtype": str(model.dtype).removeprefix("torch."), "max_batch_size": core.max_batch_size,
            "loaded_at": int(time.time()), "torch_threads": torch.get_num_threads(),
            "replica": serve.get_replica_context().replica_tag,
        }
        logger.info("[chatray serve] replica ready: %s from %s on %s in %.1fs; KV cache %d sequences x %d tokens "
                    "(%.0f MiB), %d CUDA graphs", s.model_name, local, self._info["device"], time.perf_counter() - t0,
                    core.max_batch_size, core.context_length, core.cache.nbytes() / 2**20, graphs)

    def _plan(self, kind: str, body: dict[str, Any]):
        model = ChatCompletionRequest if kind == "chat" else CompletionRequest
        req = model.model_validate(body)
        return self._prompting.plan_request(self._tokenizer, req, context_length=self._engine.engine.context_length,
                                            vocab_size=self._engine.engine.vocab_size, defaults=self._defaults,
                                            max_n=self._max_n)

    async def generate(self, kind: Literal["chat", "completion"], body: dict[str, Any]) -> dict[str, Any]:
        """One whole reply: ``{"choices": [{"text", "finish_reason", "logprobs"}], "prompt_tokens",
        "completion_tokens", "model"}``, or ``{"error": {...}}`` (see :meth:`APIError.to_dict`)."""
        try:
            plan = self._plan(kind, body)
            result = await self._choices.complete(self._engine, plan, self._formatter)
        except APIError as e:
            return {"error": e.to_dict()}
        except ValueError as e:
            return {"error": APIError(400, str(e)).to_dict()}
        except self._engine_error as e:
            return {"error": APIError(503, str(e), code="engine_error").to_dict()}
        return {**result, "model": self._info["id"], "chat_template": self._info["chat_template"]}

    async def generate_stream(self, kind: Literal["chat", "completion"],
                              body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events: ``start`` (or ``error``) first, then ``delta`` (``index``, ``text``, ``logprobs``) and ``finish``
        (``index``, ``finish_reason``) events of every choice, then ``end`` with usage over all choices.

        Cancelling the stream (the client went away) aborts the request in the engine.
        """
        try:
            plan = self._plan(kind, body)
        except APIError as e:
            yield {"event": "error", "error": e.to_dict()}
            return
        except ValueError as e:
            yield {"event": "error", "error": APIError(400, str(e)).to_dict()}
            return
        yield {"event": "start", "model": self._info["id"], "prompt_tokens": len(plan.prompt_ids),
               "chat_template": self._info["chat_template"]}
        events = self._choices.stream(self._engine, plan, self._formatter)
        completion_tokens = 0
        try:
            async for event in events:
                completion_tokens += event.get("completion_tokens", 0)
                yield event
            yield {"event": "end", "prompt_tokens": len(plan.prompt_ids), "completion_tokens": completion_tokens}
        except (self._engine_error, ValueError) as e:
            yield {"event": "error", "error": APIError(503, str(e), code="engine_error").to_dict()}
        finally:
            await events.aclose()

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/tokenize``: ``{count, max_model_len, tokens, token_strs}``, or ``{"error": {...}}``."""
        try:
            req = TokenizeRequest.model_validate(body)
            return self._prompting.tokenize(self._tokenizer, req, context_length=self._engine.engine.context_length)
        except APIError as e:
            return {"error": e.to_dict()}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/detokenize``: ``{prompt}``, or ``{"error": {...}}``."""
        try:
            return self._prompting.detokenize(self._tokenizer, DetokenizeRequest.model_validate(body))
        except APIError as e:
            return {"error": e.to_dict()}

    def model_info(self) -> dict[str, Any]:
        """The served model: id, checkpoint URI, local path, context length, device."""
        return dict(self._info)

    def stats(self) -> dict[str, Any]:
        """Engine counters (requests, aborted, steps, running, waiting, ...)."""
        return self._engine.stats()

    def check_health(self) -> None:
        """Serve's health check: the engine's step loop must be alive."""
        if not self._engine.alive:
            raise RuntimeError(f"generation engine stopped: {self._engine.last_error}")

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown(timeout=1.0)
