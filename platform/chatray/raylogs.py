"""A quiet terminal: chatray's own lines (and errors) on it, everything else Ray prints in one log file.

Ray floods a driver's terminal with its internals: its logging (token-auth notices, "Started a local Ray
instance"), and every worker's and actor's output streamed back to the driver (Train's controller and process
groups, Ray Data's execution plans, Serve's access logs). chatray's own lines carry a tag (``[chatray train]``,
``[chatray data]``, ``[chatray serve]``); :class:`QuietOutput` keeps those on the terminal, without Ray's
``(Actor pid=...)`` prefix, and writes the rest to ``~/.cache/chatray/logs/<command>-<time>.log``
(``CHATRAY_LOG_DIR``), whose path it prints once. ``--verbose`` (``CHATRAY_VERBOSE=1``) leaves Ray's output as
Ray prints it.

Worker output reaches the driver through Ray's stdstream dispatcher, and Ray's error messages through its
printing functions (internals of ``ray._private.worker``; a unit test checks that the installed Ray still has
them).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

__all__ = ["TAG", "QuietOutput", "active_output", "chatray_text", "filter_log_lines", "is_verbose", "log_dir",
           "new_log_file", "quiet_terminal", "set_verbose"]

TAG = "[chatray"
VERBOSE_ENV = "CHATRAY_VERBOSE"
_KEEP_LOGS = 30  # newest log files kept per folder
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DISPATCHER_HANDLER = "ray_print_logs"
_RAY_PRINTERS = ("print_to_stdstream", "print_worker_logs")  # module functions of ray._private.worker


def set_verbose(on: bool = True) -> None:
    """``--verbose``: Ray's output stays on the terminal, here and in the processes this one starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def is_verbose() -> bool:
    """Whether Ray's own output should stay on the terminal (``--verbose`` sets ``CHATRAY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_dir() -> Path:
    """Where the log files go: ``CHATRAY_LOG_DIR``, else ``~/.cache/chatray/logs``."""
    return Path(os.environ.get("CHATRAY_LOG_DIR") or "~/.cache/chatray/logs").expanduser()


def new_log_file(command: str) -> Path:
    """A new log file for ``command`` (``train``, ``serve``, ...), after pruning all but the newest ones."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-_KEEP_LOGS]:
        old.unlink(missing_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def chatray_text(line: str) -> str | None:
    """The chatray part of an output line (from its tag on, colours removed), or None for anyone else's line."""
    i = line.find(TAG)
    return _ANSI.sub("", line[i:]) if i >= 0 else None


def filter_log_lines(lines: list[str], log: TextIO) -> list[str]:
    """Split a driver's or job's log: every line goes to ``log``; returns the lines for the terminal.

    Those are chatray's tagged lines, and the ``error:`` / ``hint:`` lines chatray's entry points print.
    """
    shown = []
    for line in lines:
        log.write(line if line.endswith("\n") else line + "\n")
        text = chatray_text(line)
        if text is None and line.startswith(("error: ", "hint: ")):
            text = line
        if text is not None:
            shown.append(text.rstrip("\n"))
    log.flush()
    return shown


class QuietOutput:
    """Routes Ray's logging and its workers' output to a log file while it is active (see the module doc).

    ``start()`` before ``ray.init()`` (so Ray's start-up notices go to the file), ``attach_workers()`` after it,
    ``stop()`` when the command ends. Does nothing with ``--verbose``.

    Args:
        command: names the log file (``train``, ``serve``, ``data-prepare``).
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.path: Path | None = None
        self._file: TextIO | None = None
        self._moved: list[tuple[logging.Logger, logging.Handler]] = []
        self._showwarning: Any = None
        self._printers: dict[str, Any] = {}
        self._handlers: list[tuple[str, Any]] = []

    @property
    def active(self) -> bool:
        return self._file is not None

    def start(self) -> QuietOutput:
        """Open the log file, print its path once, and send Ray's loggers and Python warnings there."""
        if self.active or is_verbose():
            return self
        import ray  # noqa: F401 - Ray adds its terminal handlers when imported: redirect them after that

        self.path = new_log_file(self.command)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in stop()
        print(f"{TAG}] Ray's own output goes to {self.path} (--verbose shows it here)", file=sys.stderr, flush=True)
        self._redirect_loggers()
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        return self

    def attach_workers(self) -> None:
        """After ``ray.init()``: workers' output lines go through :meth:`_worker_lines` instead of Ray's printer."""
        if not self.active:
            return
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        self._handlers = [h for h in dispatcher.handlers if h[0] == _DISPATCHER_HANDLER]
        dispatcher.remove_handler(_DISPATCHER_HANDLER)
        dispatcher.add_handler(_DISPATCHER_HANDLER, self._worker_lines)
        # Ray's error channel ("Task ... failed, will be retried") and the lines its de-duplicator holds back
        # until shutdown are printed by these two functions directly, not through the dispatcher.
        self._printers = {name: getattr(ray_worker, name) for name in _RAY_PRINTERS}
        ray_worker.print_to_stdstream = lambda data, *args, **kwargs: self._worker_lines(data)
        ray_worker.print_worker_logs = lambda data, *args, **kwargs: self._worker_lines(data)
        self._redirect_loggers()  # loggers Ray configured while starting (Train, Data, Serve)

    def split(self, lines: list[str]) -> list[str]:
        """Write ``lines`` (e.g. a job's log) to the file; returns the ones for the terminal (all when inactive)."""
        if self._file is None:
            return list(lines)
        return filter_log_lines(lines, self._file)

    def stop(self) -> None:
        """Put Ray's loggers and Python's warnings back and close the file."""
        for logger, handler in self._moved:
            logger.addHandler(handler)
        for logger in {lg for lg, _ in self._moved}:
            for h in list(logger.handlers):
                if getattr(h, "_chatray_quiet", False):
                    logger.removeHandler(h)
        self._moved.clear()
        if self._printers:
            from ray._private import worker as ray_worker

            for name, fn in self._printers.items():
                setattr(ray_worker, name, fn)
            self._printers = {}
            # A Ray that outlives the command (a notebook's) prints its workers' lines as before.
            ray_worker.global_worker_stdstream_dispatcher.remove_handler(_DISPATCHER_HANDLER)
            for name, handler in self._handlers:
                ray_worker.global_worker_stdstream_dispatcher.add_handler(name, handler)
        if self._showwarning is not None:
            warnings.showwarning, self._showwarning = self._showwarning, None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> QuietOutput:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    def _redirect_loggers(self) -> None:
        """Replace the terminal handlers of Ray's loggers (``ray``, ``ray.data``, ...) by one to the file."""
        names = ["ray"] + [n for n in logging.Logger.manager.loggerDict if n.startswith("ray.")]
        for name in names:
            logger = logging.getLogger(name)
            streams = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler) and not getattr(h, "_chatray_quiet", False)]
            if not streams:
                continue
            for h in streams:
                logger.removeHandler(h)
                self._moved.append((logger, h))
            to_file = logging.StreamHandler(self._file)
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            to_file._chatray_quiet = True  # type: ignore[attr-defined]
            logger.addHandler(to_file)

    def _warning(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
        if self._file is not None:
            self._file.write(warnings.formatwarning(message, category, filename, lineno, line))

    def _worker_lines(self, data: dict[str, Any]) -> None:
        """One batch of a worker's output (Ray's dict: lines, pid, actor_name, task_name, is_err)."""
        if self._file is None:
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}) "
        shown = self.split([prefix + line for line in data.get("lines", [])])
        if shown:
            sink = sys.stderr if data.get("is_err") else sys.stdout
            sink.write("".join(s + "\n" for s in shown))
            sink.flush()


_active: QuietOutput | None = None


@contextmanager
def quiet_terminal(command: str) -> Iterator[QuietOutput]:
    """For the duration of a command: a Ray that :func:`chatray.rayenv.connect` starts or joins prints through a
    :class:`QuietOutput` (nothing changes with ``--verbose``, or when Ray was already initialized here)."""
    global _active
    out, previous = QuietOutput(command), _active
    _active = out
    try:
        yield out
    finally:
        _active = previous
        out.stop()


def active_output() -> QuietOutput | None:
    """The :class:`QuietOutput` of the running command, if it asked for one."""
    return _active
