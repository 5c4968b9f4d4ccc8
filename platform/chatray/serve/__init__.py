"""Serving: an OpenAI-compatible HTTP API on Ray Serve, with batched, streaming generation.

Modules (import them directly; this package imports nothing heavy):
  * ``engine``, ``sampling``: the generation core (torch + transformers only, no Ray): continuous batching,
    per-request sampling, stop strings, exact token counts. ``benchmarks/gpu_serve.py`` runs it without Ray.
  * ``schemas``, ``prompting``: OpenAI request/response shapes and request -> prompt ids + sampling params.
  * ``generator``, ``ingress``, ``app``: the Serve deployments and ``build_app`` (serve_config.yaml's
    ``import_path: chatray.serve.app:build_app``).
  * ``launch``, ``client``, ``commands``: ``chatray serve``, ``chatray chat``, ``chatray generate``.
"""

__all__: list[str] = []
