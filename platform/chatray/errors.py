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

    def __reduce__(self) -> tuple:
        # Subclasses take other constructor arguments: rebuild from the state, so errors cross process
        # boundaries (a forked reader, a Ray task) with their message, hint and fields intact.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type, args: tuple, state: dict) -> ChatrayError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err
