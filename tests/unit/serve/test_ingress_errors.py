"""The ingress maps a failed generator call to an OpenAI-shaped 503 + Retry-After, whichever data plane failed.

The Ingress class runs here without Serve, with a stand-in generator handle whose call fails the way Serve's
handles fail: a RayActorError subclass (Ray actor calls, or gRPC UNAVAILABLE) or a raw grpc.aio.AioRpcError
(another gRPC transport failure on Serve's gRPC data plane, chatray.rayenv).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from ray.exceptions import ActorUnavailableError

from chatray.serve.app import ServeArgs
from chatray.serve.ingress import Ingress
from chatray.serve.schemas import APIError, CompletionRequest

# @serve.ingress wraps the class in an ASGI wrapper subclass (async __init__); chatray's class, the one that
# defines the routes' helpers, is a base of it.
_IngressClass = next(c for c in Ingress.func_or_class.__mro__ if "_generate" in vars(c))


class _FailingCall:
    def __init__(self, error: BaseException) -> None:
        self._error = error

    def __await__(self):
        raise self._error
        yield  # pragma: no cover - makes this a generator


class _Generator:
    def __init__(self, error: BaseException) -> None:
        self.generate = self
        self._error = error

    def remote(self, *args, **kwargs) -> _FailingCall:
        return _FailingCall(self._error)


@pytest.mark.parametrize("error", [
    grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, details="stream reset"),
    ActorUnavailableError("Actor is unavailable.", None),
], ids=["grpc-internal", "actor-unavailable"])
def test_a_failed_generator_call_is_a_503_with_retry_after(error):
    ingress = _IngressClass(_Generator(error), ServeArgs(retry_after_s=2, api_key_env=None).ingress_settings())
    req = CompletionRequest.model_validate({"prompt": "hi", "max_tokens": 4})
    with pytest.raises(APIError) as info:
        asyncio.run(ingress._generate("completion", req))
    e = info.value
    assert e.status == 503 and e.headers == {"Retry-After": "2"}
    assert "model replica unavailable" in e.body()["error"]["message"]
