"""``chatray serve``, ``chatray chat`` and ``chatray generate``: thin click commands over chatray.serve.

No heavy import at module level (``chatray --help`` must stay instant): Ray, torch and httpx are imported
inside the commands.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

__all__ = ["chat", "generate", "serve"]

_DEFAULT_URL = "http://127.0.0.1:8000"


def _parse_args(items: tuple[str, ...]) -> dict:
    from chatray.config import parse_overrides

    return parse_overrides(items)


@click.group("serve", invoke_without_command=True)
@click.option("--checkpoint", default=None, metavar="URI",
              help="Checkpoint folder, s3:// URI or <storage>/<run>:latest|:best (overrides the config's args).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), metavar="YAML",
              help="Ray Serve config (default: ./serve_config.yaml when it exists).")
@click.option("--host", default=None, help="Interface to listen on (default from the config: 127.0.0.1).")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="Port (default from the config: 8000).")
@click.option("--arg", "extra_args", multiple=True, metavar="KEY=VALUE",
              help="Override an app arg, e.g. --arg max_batch_size=32 --arg temperature=0 (repeatable).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
@click.option("--app-name", default=None, help="Which application of the config to run (default: the first).")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own output here too (else it goes to a log file).")
@click.pass_context
def serve(ctx: click.Context, checkpoint: str | None, config_path: str | None, host: str | None, port: int | None,
          extra_args: tuple[str, ...], address: str | None, app_name: str | None, verbose: bool) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (foreground, like `serve run`; Ctrl-C stops).

    \b
    Example:
      chatray serve --checkpoint .demo/checkpoints/tiny-demo:best
      curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages":[{"role":"user","content":"hi"}]}'
      chatray serve status
    """
    if ctx.invoked_subcommand is not None:
        return
    from chatray.raylogs import quiet_terminal, set_verbose
    from chatray.serve.launch import serve_foreground

    if config_path is None and Path("serve_config.yaml").is_file():
        config_path = "serve_config.yaml"
    set_verbose(verbose)
    with quiet_terminal("serve"):
        serve_foreground(config_path, checkpoint=checkpoint, host=host, port=port, args=_parse_args(extra_args),
                         address=address, app_name=app_name)


@serve.command("status")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else the local one).")
@click.option("--prometheus", default=None, envvar="CHATRAY_PROMETHEUS_URL", metavar="URL",
              help="A Prometheus server that scrapes the cluster (env CHATRAY_PROMETHEUS_URL); without one, or "
              "when it does not answer, Ray's metrics endpoints are scraped twice, --window seconds apart.")
@click.option("--window", type=click.FloatRange(1, 3600), default=None, metavar="SECONDS",
              help="Seconds to look back over (default: 60 with Prometheus, else 10).")
def status(address: str | None, prometheus: str | None, window: float | None) -> None:
    """One screen per application: replicas, running/waiting, tokens/s, p50/p99 TTFT and ITL.

    \b
    Example:
      chatray serve status
      chatray serve status --prometheus http://prometheus:9090 --window 300
    """
    from chatray.serve.status import format_status, serve_status

    click.echo(format_status(serve_status(address, prometheus, window)))


def _sampling(temperature: float | None, top_p: float | None, max_tokens: int | None, seed: int | None,
              stop: tuple[str, ...] = ()) -> dict:
    out: dict = {}
    for k, v in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens), ("seed", seed)):
        if v is not None:
            out[k] = v
    if stop:
        out["stop"] = list(stop)
    return out


_CLIENT_OPTIONS = (
    click.option("--url", default=_DEFAULT_URL, envvar="CHATRAY_URL", show_default=True,
                 help="Server root URL (env CHATRAY_URL)."),
    click.option("--api-key", default=None, envvar="CHATRAY_API_KEY",
                 help="API key (env CHATRAY_API_KEY) when the server requires one."),
    click.option("--temperature", type=click.FloatRange(0, 2), default=None,
                 help="0 = greedy (default: the server's)."),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus sampling."),
    click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Reply length limit."),
    click.option("--seed", type=int, default=None, help="Same seed + same input = same reply."),
)


def _client_options(f: Callable[..., None]) -> Callable[..., None]:
    """The options ``chat`` and ``generate`` share (server, key, sampling), in this order in --help."""
    for option in reversed(_CLIENT_OPTIONS):
        f = option(f)
    return f


@click.command("chat")
@_client_options
@click.option("--system", default=None, help="A system message that starts the conversation.")
def chat(url: str, api_key: str | None, temperature: float | None, top_p: float | None, max_tokens: int | None,
         seed: int | None, system: str | None) -> None:
    """Chat with a running server, streaming replies (reads lines from stdin; works with piped input).

    \b
    Example:
      chatray chat --temperature 0.7
      printf 'hello\\nwhat sports do you like?\\n' | chatray chat
    """
    from chatray.serve.client import ChatClient, run_repl

    with ChatClient(url, api_key=api_key) as client:
        run_repl(client, sampling=_sampling(temperature, top_p, max_tokens, seed), system=system)


@click.command("generate")
@click.argument("prompt", required=False)
@_client_options
@click.option("--stop", multiple=True, help="Stop string (repeatable); the reply ends before it.")
@click.option("--raw", is_flag=True, help="Send PROMPT to /v1/completions as is (no chat template).")
@click.option("--no-stream", is_flag=True, help="Wait for the whole reply instead of streaming it.")
def generate(prompt: str | None, url: str, api_key: str | None, temperature: float | None, top_p: float | None,
             max_tokens: int | None, seed: int | None, stop: tuple[str, ...], raw: bool, no_stream: bool) -> None:
    """One-shot: send PROMPT (or stdin) as a user message and print the reply.

    \b
    Example:
      chatray generate "你喜欢什么运动?"
      chatray generate --raw --max-tokens 20 "Once upon a time"
    """
    from chatray.errors import ChatrayError
    from chatray.serve.client import ChatClient

    if prompt is None:
        if sys.stdin.isatty():
            raise ChatrayError("no prompt given", hint='chatray generate "your question"')
        prompt = sys.stdin.read()
    body = _sampling(temperature, top_p, max_tokens, seed, stop)
    path = "/completions" if raw else "/chat/completions"
    body.update({"prompt": prompt} if raw else {"messages": [{"role": "user", "content": prompt}]})
    with ChatClient(url, api_key=api_key) as client:
        if no_stream:
            choice = client.complete(path, body)["choices"][0]
            click.echo(choice["text"] if raw else choice["message"]["content"])
            return
        for delta in client.stream(path, body):
            click.echo(delta, nl=False)
        click.echo()
