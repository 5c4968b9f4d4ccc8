"""The lines ``chatray train`` prints, on the driver and in the workers, tagged ``[chatray train]``.

Written to the streams directly: Ray Train patches ``print()`` in workers to tee into its logger, which
shows every line twice in the driver log.
"""

from __future__ import annotations

import sys

__all__ = ["note", "say", "warn"]

_TAG = "[chatray train]"


def say(msg: str) -> None:
    """A progress line on stdout (steps, evals, checkpoints)."""
    sys.stdout.write(f"{_TAG} {msg}\n")
    sys.stdout.flush()


def note(msg: str) -> None:
    """Something the user should know that changes nothing they asked for, on stderr."""
    sys.stderr.write(f"{_TAG} {msg}\n")
    sys.stderr.flush()


def warn(msg: str) -> None:
    """Something skipped or changed against what was asked for, on stderr."""
    note(f"warning: {msg}")
