"""The HTTP ingress: a light FastAPI app (``@serve.ingress``) in front of the ``Generator`` deployment.

It owns everything about HTTP and nothing about the model: API key (constant-time compare), body size
limit (413), JSON/schema validation (400 naming the field), timeouts (408), backpressure from the
generator's ``max_queued_requests`` (503/429 with Retry-After), OpenAI response and SSE shapes, and
cancelling the generator call when the client goes away. Every error, including 404/405, uses OpenAI's
``{"error": {...}}`` shape; bad input never yields a 5xx.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI's, ``stream`` as server-sent events),
``GET /v1/models``, ``POST /tokenize`` and ``POST /detokenize`` (vLLM's), ``GET /healthz``, ``GET /readyz``.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotations of the
class-based routes that ``@serve.ingress`` rewrites.
"""

import asyncio
import functools
import hmac
import html
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatray import __version__
from chatray.serve.apikey import read_api_key
from chatray.serve.metrics import rejection_counter
from chatray.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_request,
)
from chatray.serve.settings import IngressSettings

__all__ = ["Ingress", "app"]

logger = logging.getLogger("ray.serve")

# /readyz answers within this many seconds: a probe wants a quick "not yet", not a request's full timeout.
_READINESS_TIMEOUT_S = 5.0

app = FastAPI(title="chatray", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)


# A generator replica that died, is shutting down or cannot be reached: over Ray actor calls a RayActorError, over
# Serve's gRPC data plane (chatray.rayenv) the same or a grpc.aio.AioRpcError. Answered 503 + Retry-After.
_UNAVAILABLE = (RayActorError, DeploymentUnavailableError, grpc.aio.AioRpcError)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# The one place rejections are counted (request_rejected{status, reason}): every error status the ingress answers
# is an APIError that reaches _api_error, or one sent in-band in a stream. Installed when the Ingress replica starts
# (the exception handlers are module-level, and each replica is a process of its own).
_count_rejection = None


def _install_rejection_counter(model_name: str) -> None:
    # A module function, not a `global` statement in Ingress.__init__: Serve ships the class's methods by value,
    # with a copy of the globals they name, while this function runs in the module the handlers read.
    global _count_rejection
    _count_rejection = rejection_counter(model_name)


def _rejected(e: APIError) -> None:
    if _count_rejection is not None:
        _count_rejection(e.status, e.code or e.type)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    _rejected(e)
    return _error_response(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions"
    elif e.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(e.detail)
    return JSONResponse(error_body(message, APIError._TYPES.get(e.status_code, "invalid_request_error")),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:  # a bug, never bad input
    logger.exception("unexpected error in the chatray ingress")
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "internal_error"), status_code=500)


async def _running_generators() -> int | None:
    """RUNNING replicas of this app's ``Generator`` (from Serve's controller), or None when unknown."""
    try:
        app_name = serve.get_replica_context().app_name
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), _READINESS_TIMEOUT_S)
        return int(status.applications[app_name].deployments["Generator"].replica_states.get("RUNNING", 0))
    except Exception:  # noqa: BLE001 - only decides between two error answers
        return None


def _template_header(kind: str, result: dict[str, Any]) -> dict[str, str]:
    """A chat reply from a model whose tokenizer has no chat template says that chatray's was used."""
    if kind == "chat" and result.get("chat_template") == "chatray-default":
        return {"X-Chatray-Chat-Template": "chatray-default"}
    return {}


# The page talks only to this origin: no CDN, no third-party script can run in it.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _chat_page() -> str:
    return (Path(__file__).parent / "page" / "chat.html").read_text(encoding="utf-8")


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    """OpenAI-compatible HTTP API; forwards generation to the ``Generator`` deployment handle."""

    def __init__(self, generator: Any, settings: IngressSettings) -> None:
        self._generator = generator
        self._s = settings
        # Read here, in the replica, so the key is never part of the app's spec; refuses to start rather than
        # serve without a key the builder saw (ChatrayError naming the variable or file, never the value).
        key = read_api_key(settings)
        self._key = key.encode("utf-8") if key else None
        if self._key:
            source = f"file {settings.api_key_file}" if settings.api_key_file else f"${settings.api_key_env}"
            logger.info("chatray ingress: requests need an API key (from %s)", source)
        self._model_info: dict[str, Any] | None = None
        _install_rejection_counter(settings.model_name)

    # ------------------------------------------------------------------ helpers
    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        # Constant-time comparison, so response timing says nothing about how much of the key matched.
        if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._key):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self._s.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise APIError(400, f"invalid Content-Length header {declared!r}") from None
            if size > limit:
                raise APIError(413, f"request body is {size} bytes; the limit is {limit} bytes",
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked uploads have no Content-Length: count as we go
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _overloaded(self, e: BackPressureError) -> APIError:
        retry = e.retry_after_s if e.retry_after_s is not None else self._s.retry_after_s
        return APIError(e.status_code, f"server overloaded ({e.message}); retry after {math.ceil(retry)}s",
                        code="overloaded", headers={"Retry-After": str(max(1, math.ceil(retry)))})

    def _unavailable(self, e: Exception) -> APIError:
        logger.warning("generator unavailable: %s: %s", type(e).__name__, e)
        retry = max(1, math.ceil(self._s.retry_after_s))
        return APIError(503, f"model replica unavailable ({type(e).__name__}); retry in {retry}s",
                        code="unavailable", headers={"Retry-After": str(retry)})

    def _timeout(self) -> APIError:
        return APIError(408, f"request timed out after {self._s.request_timeout_s:g}s", code="timeout")

    async def _timed_out_waiting(self) -> APIError:
        """No answer before the deadline: 408, or 503 + Retry-After while no Generator replica is running (a
        scale-from-zero start still under way, or replicas that cannot start), so clients come back later."""
        if await _running_generators() != 0:
            return self._timeout()
        retry = max(1, math.ceil(self._s.retry_after_s))
        return APIError(503, f"no model replica is running yet (starting from zero replicas takes a while); "
                        f"retry in {retry}s", code="no_replica", headers={"Retry-After": str(retry)})

    # ------------------------------------------------------------------ the chat page, health and models
    @app.get("/")
    async def chat_page(self, request: Request) -> Response:
        """The browser chat page (same origin, no CDN); it calls this app's /v1 routes with the user's key."""
        base = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
        return HTMLResponse(_chat_page().replace("{{BASE}}", base), headers=_PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz(self) -> Response:
        """Liveness: the ingress answers."""
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """Readiness: a generator replica has its model loaded and answers."""
        try:
            info = await asyncio.wait_for(self._generator.model_info.remote(), _READINESS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"
            return JSONResponse(error_body(f"model not ready: {type(e).__name__}: {e}"[:300],
                                           "service_unavailable_error"), status_code=503)
        self._model_info = info
        return JSONResponse({"status": "ready", "model": info["id"]})

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The served model and the one checkpoint (run, step, eval loss) that every replica loads."""
        self._authorize(request)
        try:
            info = await asyncio.wait_for(self._generator.model_info.remote(), self._s.request_timeout_s)
        except BackPressureError as e:
            raise self._overloaded(e) from None
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from None
        except asyncio.TimeoutError:
            raise await self._timed_out_waiting() from None
        self._model_info = info
        return JSONResponse({"object": "list", "data": [{
            "id": info["id"], "object": "model", "created": info["loaded_at"], "owned_by": "chatray",
            "root": info.get("resolved_checkpoint", info["checkpoint"]), "checkpoint": info["checkpoint"],
            "resolved_checkpoint": info.get("resolved_checkpoint", info["checkpoint"]),
            "context_length": info["context_length"],
            # Pinned when the app was built: every replica serves this one (chatray.serve.source).
            **{k: info.get(k) for k in ("kind", "run", "step", "eval_loss", "chat_template")},
        }]})

    # ------------------------------------------------------------------ generation
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions (the checkpoint's chat template is applied)."""
        self._authorize(request)
        req = parse_request(await self._read_body(request), ChatCompletionRequest)
        return await self._generate("chat", req)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI (legacy) text completions: the prompt is used as is."""
        self._authorize(request)
        req = parse_request(await self._read_body(request), CompletionRequest)
        return await self._generate("completion", req)

    async def _generate(self, kind: str, req: ChatCompletionRequest | CompletionRequest) -> Response:
        body = req.model_dump(mode="python")
        deadline = time.monotonic() + self._s.request_timeout_s
        if req.stream:
            return await self._start_stream(kind, req, body, deadline)
        response = self._generator.generate.remote(kind, body)
        try:
            result = await asyncio.wait_for(response, self._s.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise await self._timed_out_waiting() from None
        except BackPressureError as e:
            raise self._overloaded(e) from None
        except _UNAVAILABLE as e:  # a replica died mid-request
            raise self._unavailable(e) from None
        except asyncio.CancelledError:  # the client went away: stop the generation too
            response.cancel()
            raise
        if "error" in result:
            raise APIError.from_dict(result["error"])
        make = chat_response if kind == "chat" else completion_response
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        return JSONResponse(make(rid, result["model"], result["choices"], result["prompt_tokens"],
                                 result["completion_tokens"]), headers=_template_header(kind, result))

    async def _start_stream(self, kind: str, req: ChatCompletionRequest | CompletionRequest, body: dict[str, Any],
                            deadline: float) -> Response:
        events = self._generator.options(stream=True).generate_stream.remote(kind, body)
        try:
            # Wait for the first event before answering 200, so request errors keep their status code.
            first = await asyncio.wait_for(events.__anext__(), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            events.cancel()
            raise await self._timed_out_waiting() from None
        except BackPressureError as e:
            raise self._overloaded(e) from None
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from None
        except asyncio.CancelledError:
            events.cancel()
            raise
        if first["event"] == "error":
            events.cancel()
            raise APIError.from_dict(first["error"])
        return StreamingResponse(self._stream_body(kind, events, first, req, deadline),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **_template_header(kind, first)})

    async def _stream_body(self, kind: str, events: Any, first: dict[str, Any],
                           req: ChatCompletionRequest | CompletionRequest, deadline: float) -> AsyncIterator[str]:
        rid, created, model = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time()), first["model"]
        finished = False

        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            if kind == "chat":
                delta = {"content": text} if text or finish_reason is None else {}
                return chat_chunk(rid, model, created, delta, finish_reason, index=index, logprobs=logprobs)
            return completion_chunk(rid, model, created, text, finish_reason, index=index, logprobs=logprobs)

        try:
            if kind == "chat":  # each choice opens with its role, as OpenAI's stream does
                for index in range(req.n):
                    yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, index=index))
            while True:
                try:
                    ev = await asyncio.wait_for(events.__anext__(), max(deadline - time.monotonic(), 0.001))
                except asyncio.TimeoutError:
                    _rejected(timeout := self._timeout())
                    yield _sse(timeout.body())
                    break
                except StopAsyncIteration:
                    yield _sse(error_body("generation ended unexpectedly", "service_unavailable_error"))
                    break
                if ev["event"] == "delta":
                    yield _sse(chunk(ev["index"], ev["text"], logprobs=ev["logprobs"]))
                elif ev["event"] == "finish":
                    yield _sse(chunk(ev["index"], "", ev["finish_reason"]))
                elif ev["event"] == "end":
                    finished = True
                    if req.include_usage():
                        usage = (ev["prompt_tokens"], ev["completion_tokens"])
                        make = chat_chunk if kind == "chat" else completion_chunk
                        yield _sse(make(rid, model, created, {} if kind == "chat" else "", usage=usage,
                                        no_choices=True))
                    break
                elif ev["event"] == "error":
                    _rejected(err := APIError.from_dict(ev["error"]))
                    yield _sse(err.body())
                    break
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, OpenAI style
            logger.warning("stream failed: %s: %s", type(e).__name__, e)
            yield _sse(error_body(f"generation failed: {type(e).__name__}", "service_unavailable_error"))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # client gone, timeout or error: free the generator's batch slot
                events.cancel()

    # ------------------------------------------------------------------ tokenizer (vLLM's routes)
    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """Token ids of a prompt or of chat messages (as the generation routes tokenize them)."""
        self._authorize(request)
        req = parse_request(await self._read_body(request), TokenizeRequest)
        return JSONResponse(await self._tokenizer_call("tokenize", req.model_dump(mode="python")))

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """The text of token ids."""
        self._authorize(request)
        req = parse_request(await self._read_body(request), DetokenizeRequest)
        return JSONResponse(await self._tokenizer_call("detokenize", req.model_dump(mode="python")))

    async def _tokenizer_call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await asyncio.wait_for(getattr(self._generator, method).remote(body), self._s.request_timeout_s)
        except BackPressureError as e:
            raise self._overloaded(e) from None
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from None
        except asyncio.TimeoutError:
            raise self._timeout() from None
        if "error" in result:
            raise APIError.from_dict(result["error"])
        return result
