"""A small HTTP client for a chatray server (used by ``chatray chat`` and ``chatray generate``).

Only ``httpx``: the same calls work against any OpenAI-compatible endpoint. Server errors become one-line
:class:`ChatrayError` s carrying the server's message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from chatray.errors import ChatrayError

__all__ = ["ChatClient", "ServerError", "run_repl"]

REPL_HELP = "type a message and press Enter; /reset clears the conversation, /exit (or Ctrl-D) quits"


class ServerError(ChatrayError):
    """The server answered with an OpenAI error (``status``, ``code`` and ``param`` kept)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        hints = {"context_length_exceeded": "use a smaller --max-tokens or a shorter prompt",
                 "invalid_api_key": "pass --api-key or set CHATRAY_API_KEY",
                 "missing_api_key": "pass --api-key or set CHATRAY_API_KEY",
                 "overloaded": "the server is busy: retry in a moment"}
        super().__init__(f"server error {status}: {message}", hint=hints.get(code or ""))
        self.status, self.code, self.param = status, code, param


class ChatClient:
    """Talk to ``/v1`` of a chatray (or any OpenAI-compatible) server.

    Args:
        url: server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        api_key: sent as ``Authorization: Bearer``; None sends nothing.
        timeout: seconds for connect and for each read.
        transport: an ``httpx`` transport (tests pass ``httpx.MockTransport``).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120.0,
                 transport: Any = None):
        import httpx

        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url + "/v1", headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, e: Exception) -> ChatrayError:
        return ChatrayError(f"cannot reach a chatray server at {self.url}: {e}",
                            hint="start one with `chatray serve --checkpoint <storage>/<run>:best`, or pass --url")

    @staticmethod
    def _raise_for(status: int, raw: bytes) -> None:
        try:
            err = json.loads(raw)["error"]
            raise ServerError(status, err.get("message", ""), err.get("code"), err.get("param"))
        except (ValueError, KeyError, TypeError):
            raise ServerError(status, raw.decode("utf-8", "replace")[:200] or "(empty body)") from None

    def models(self) -> list[dict[str, Any]]:
        """The ``data`` list of ``GET /v1/models``."""
        import httpx

        try:
            r = self._http.get("/models")
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        if r.status_code != 200:
            self._raise_for(r.status_code, r.content)
        return r.json()["data"]

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        """POST ``body`` with ``stream: true`` and yield text deltas until ``[DONE]``."""
        import httpx

        try:
            with self._http.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    self._raise_for(r.status_code, r.read())
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"]
                        raise ServerError(200, err.get("message", "stream failed"), err.get("code"))
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                        if text:
                            yield text
        except httpx.TransportError as e:
            raise self._unreachable(e) from e

    def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` (non-streaming) and return the JSON response."""
        import httpx

        try:
            r = self._http.post(path, json={**body, "stream": False})
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        if r.status_code != 200:
            self._raise_for(r.status_code, r.content)
        return r.json()


def run_repl(client: ChatClient, *, sampling: dict[str, Any], system: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
             interactive: bool | None = None) -> int:
    """Chat turn by turn: each input line is a user message, the reply streams to ``stdout``.

    Works the same with piped input (no prompts are printed then). When the conversation outgrows the
    model's context, the oldest turns are dropped (the system message is kept).

    Returns:
        The number of turns answered.

    Raises:
        ChatrayError: the server is unreachable, or (piped input) a turn failed.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(base)
    if interactive:
        name = client.models()[0]["id"]
        print(f"chatray chat: {name} at {client.url} ({REPL_HELP})", file=stderr)
    turns = 0
    while True:
        if interactive:
            print("you> ", end="", file=stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": text})
        reply = _turn(client, history, base, sampling, stdout, interactive, stderr)
        if reply is None:
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        turns += 1
    return turns


def _turn(client: ChatClient, history: list[dict[str, str]], base: list[dict[str, str]], sampling: dict[str, Any],
          stdout: TextIO, interactive: bool, stderr: TextIO) -> str | None:
    while True:
        parts: list[str] = []
        try:
            if interactive:
                print("bot> ", end="", file=stderr, flush=True)
            for delta in client.stream("/chat/completions", {"messages": history, **sampling}):
                parts.append(delta)
                stdout.write(delta)
                stdout.flush()
            stdout.write("\n")
            stdout.flush()
            return "".join(parts)
        except ServerError as e:
            # Too long for the context: forget the oldest exchange and try again (nothing was printed yet).
            if e.code == "context_length_exceeded" and not parts and len(history) > len(base) + 1:
                del history[len(base):len(base) + 2]
                continue
            if not interactive:
                raise
            print(f"\nerror: {e}", file=stderr)
            return None
