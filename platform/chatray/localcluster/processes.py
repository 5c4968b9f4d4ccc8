"""Finding and stopping the processes of one local cluster, and of nothing else on the machine.

Every process of a cluster carries ``CHATRAY_LOCAL_CLUSTER=<temp dir>`` (:data:`MARKER_ENV`) in its environment,
inherited from ``ray start``. Stopping sends SIGTERM, then SIGKILL after a grace period, to those processes only
(and to Ray's processes that name the temp dir, and their children), never plain ``ray stop``, which would stop
every Ray of this user on the machine (a notebook's ``ray.init()``, a test suite's Ray, another project's cluster).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from chatray.errors import ChatrayError
from chatray.localcluster.settings import MARKER_ENV, NODE_ENV, STOP_GRACE_S

__all__ = ["cluster_processes", "kill_node", "node_processes", "psutil_module", "stop_cluster_processes"]

# Ray flags through which its processes name their temp/session/log dirs (`--temp_dir=...`, `--session-dir=...`).
_DIR_FLAGS = frozenset({"--temp-dir", "--session-dir", "--log-dir", "--logs-dir"})


def psutil_module() -> ModuleType:
    """psutil; Ray ships it in ray/thirdparty_files (what ``ray stop`` itself uses) when it is not installed.

    Raises:
        ChatrayError: when neither psutil nor Ray is installed.
    """
    try:
        import psutil
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")  # locates Ray without importing it (slow)
        if spec is None or not spec.submodule_search_locations:
            raise ChatrayError("neither psutil nor Ray is installed", hint="pip install 'ray[default]'") from None
        sys.path.append(str(Path(list(spec.submodule_search_locations)[0]) / "thirdparty_files"))
        import psutil
    return psutil


def _dir_forms(path: str | os.PathLike[str]) -> set[str]:
    """A dir as given (absolute) and as resolved: it may sit behind a symlink."""
    return {os.path.abspath(os.path.expanduser(path)), os.path.realpath(os.path.expanduser(path))}


def _belongs(info: Mapping[str, Any], dirs: set[str], by_flags: bool) -> bool:
    """Whether a process (psutil's ``info``: environ, cmdline) is one of the cluster with temp dir ``dirs``."""
    marker = (info.get("environ") or {}).get(MARKER_ENV)
    if marker and _dir_forms(marker) & dirs:
        return True
    if not by_flags:
        return False
    # Ray's own processes name their dirs: --temp_dir=..., --session-dir=..., --log_dir=..., --logs-dir=...
    for arg in info.get("cmdline") or ():
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if flag.replace("_", "-") in _DIR_FLAGS and any(value == d or value.startswith(d + os.sep) for d in dirs):
                return True
    return False


def _add_with_descendants(found: dict[int, Any], p: Any, psutil: Any) -> None:
    """Add ``p`` and every process below it to ``found`` (by PID); a process gone meanwhile is skipped."""
    found.setdefault(p.pid, p)
    try:
        for child in p.children(recursive=True):
            found.setdefault(child.pid, child)
    except psutil.Error:
        pass


def cluster_processes(temp_dir: str | os.PathLike[str]) -> list[Any]:
    """The running processes of the local cluster whose Ray temp dir is ``temp_dir``, as ``psutil.Process``.

    Those of this user that carry ``CHATRAY_LOCAL_CLUSTER=<temp dir>`` in their environment (set at start,
    inherited by all of them) or, as Ray's own processes do, name a dir inside it with ``--temp-dir=`` /
    ``--session-dir=`` / ``--log-dir=`` / ``--logs-dir=``; plus all their descendants (workers rename
    themselves ``ray::...`` and may lose their readable environment). Never this process or its ancestors.
    When ``temp_dir`` is Ray's shared default (``/tmp/ray``), only the marker counts: other Rays use it too.
    """
    psutil = psutil_module()
    dirs = _dir_forms(temp_dir)
    by_flags = not dirs & _dir_forms(Path(tempfile.gettempdir()) / "ray") and not dirs & _dir_forms("/tmp/ray")
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    uid = os.getuid() if hasattr(os, "getuid") else None
    found: dict[int, Any] = {}
    for p in psutil.process_iter(["uids", "cmdline", "environ"], ad_value=None):
        uids = p.info.get("uids")
        if p.pid in skip or (uid is not None and uids is not None and uids.real != uid):
            continue
        if _belongs(p.info, dirs, by_flags):
            _add_with_descendants(found, p, psutil)
    for pid in skip:
        found.pop(pid, None)
    return sorted(found.values(), key=lambda p: p.pid)


def _running(p: Any) -> bool:
    psutil = psutil_module()
    try:
        # A zombie has exited; its parent (or an init that does not reap) just has not collected it yet.
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def _stop_order(p: Any) -> int:
    """As ``ray stop``: the raylet first (its agents fate-share with it), the GCS last (others report to it)."""
    try:
        name = p.name()
    except psutil_module().Error:  # gone already
        return 1
    return {"raylet": 0, "gcs_server": 2}.get(name, 1)


def _stop_group(group: list[Any], grace_s: float) -> list[str]:
    """SIGTERM to ``group``, SIGKILL to what is left after ``grace_s``; returns the names of those killed."""
    psutil = psutil_module()
    for p in group:
        try:
            p.terminate()  # psutil checks the pid still names the same process (no pid-reuse accidents)
        except psutil.Error:
            pass
    killed = []
    alive = _wait_gone(group, grace_s)
    for p in alive:
        try:
            killed.append(p.name())
        except psutil.Error:
            killed.append(str(p.pid))
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_gone(alive, 5.0)
    return killed


def stop_cluster_processes(temp_dir: str | os.PathLike[str], grace_s: float = STOP_GRACE_S) -> tuple[int, list[str]]:
    """Stop the processes of the local cluster with Ray temp dir ``temp_dir`` (:func:`cluster_processes`).

    Like ``ray stop``, restricted to this cluster: SIGTERM to the raylets, then to the other processes, then
    to the GCS, each group getting a third of ``grace_s`` seconds before SIGKILL. Other Ray instances on the
    machine keep running. Processes that appear while stopping are stopped in a second round.

    Returns:
        (how many processes were stopped, names of those that needed SIGKILL).
    """
    stopped, killed = 0, []
    for _round in range(2):
        procs = cluster_processes(temp_dir)
        if not procs:
            break
        stopped += len(procs)
        orders = [_stop_order(p) for p in procs]
        for order in range(3):
            killed += _stop_group([p for p, o in zip(procs, orders) if o == order], grace_s / 3)
    return stopped, killed


def node_processes(temp_dir: str | os.PathLike[str], node: str) -> list[Any]:
    """The running processes of one worker node of a local cluster: those of :func:`cluster_processes` that carry
    ``CHATRAY_LOCAL_NODE=<node>`` (set by :func:`~chatray.localcluster.start.add_local_worker`), and their
    descendants (the node's raylet starts its workers)."""
    psutil = psutil_module()
    found: dict[int, Any] = {}
    for p in cluster_processes(temp_dir):
        try:
            mine = p.environ().get(NODE_ENV) == node
        except psutil.Error:  # gone, or its environment unreadable: a worker is still found as a descendant
            continue
        if mine:
            _add_with_descendants(found, p, psutil)
    return sorted(found.values(), key=lambda p: p.pid)


def kill_node(temp_dir: str | os.PathLike[str], node: str) -> list[int]:
    """SIGKILL every process of worker node ``node`` at once, as when its machine dies: no process gets to say
    goodbye to the head, which notices through missed health checks.

    Returns:
        The PIDs that were killed (empty when the node was not running).
    """
    psutil = psutil_module()
    procs = node_processes(temp_dir, node)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_gone(procs, 10.0)
    return [p.pid for p in procs]
