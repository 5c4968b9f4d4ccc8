"""Serving: an OpenAI-compatible HTTP API on Ray Serve, with batched, streaming generation.

Modules (import them directly; this package imports nothing heavy):
  * ``engine``, ``sampling``, ``detokenize``, ``kvcache``: the generation core (torch + transformers only, no
    Ray): continuous batching, per-request sampling, streamed text with stop strings, exact token counts, the KV
    cache across transformers versions. ``benchmarks/gpu_serve.py`` runs it without Ray.
  * ``async_engine``: the engine's step loop on a thread, for asyncio callers (the replica).
  * ``logprobs``: the model's log-probabilities, computed in the engine and shaped as OpenAI reports them.
  * ``schemas``, ``prompting``, ``choices``: OpenAI request/response shapes, request -> prompt ids + sampling
    params (and ``/tokenize``), a request's ``n`` choices with echo and logprobs.
  * ``app``, ``settings``, ``generator``, ``ingress``: ``build_app`` (serve_config.yaml's
    ``import_path: chatray.serve.app:build_app``), validating :class:`~chatray.serve.app.ServeArgs` once into the
    typed settings each deployment receives, and the two Serve deployments; ``apikey``: the API key, read inside
    the Ingress replica (never an arg).
  * ``launch``, ``client``, ``commands``: ``chatray serve``, ``chatray chat``, ``chatray generate``.
"""

__all__: list[str] = []
