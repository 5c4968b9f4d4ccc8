"""The one exception type users see as a clean one-line error (plus a hint) from the CLI."""

from __future__ import annotations

__all__ = ["ChatrayError"]


class ChatrayError(Exception):
    """A user-facing error: one clear line naming what is wrong and where, plus an optional hint.

    The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits 1; ``--debug`` shows the traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message
