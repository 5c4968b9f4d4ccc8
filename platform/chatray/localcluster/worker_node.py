"""``ray start --address`` for one more node on this machine when the head listens on loopback only.

Ray 2.60 runs a loopback head in its local-only mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
:func:`chatray.rayenv.ray_host_env`): the node's address is 127.0.0.1 and every server binds there. Its ``ray start``
CLI then refuses any worker node, in one place only: the ``if not ray_constants.ENABLE_RAY_CLUSTER`` check at the top
of the worker branch of ``ray.scripts.scripts.start`` ("Multi-node Ray clusters are not supported on Windows and
OSX"). Nothing else refuses: the raylet, the GCS and ``ray._private.node.Node`` work with several nodes on
127.0.0.1, which is how Ray's own multi-node tests run (``ray.cluster_utils.Cluster`` starts each node through
``Node`` directly, never through that CLI check).

This module runs Ray's own ``ray start`` with that check relaxed and everything else unchanged: the ``scripts``
module alone sees ``ENABLE_RAY_CLUSTER`` as True, while ``ray._private.services`` (which picks the node's address and
so where its servers bind) still reads local-only mode from the environment, so the new node stays on 127.0.0.1.
Run it as ``python -m chatray.localcluster.worker_node --address=127.0.0.1:6379 [ray start args]``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

__all__ = ["main", "relax_worker_check"]


def relax_worker_check() -> None:
    """Make ``ray start`` (the ``ray.scripts.scripts`` module only) accept a worker node in local-only mode.

    Raises:
        RuntimeError: the installed Ray no longer reads the switch where this expects it (a unit test checks it).
    """
    import ray._private.ray_constants as constants
    import ray.scripts.scripts as scripts

    if getattr(scripts, "ray_constants", None) is not constants or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError("ray.scripts.scripts no longer reads ray_constants.ENABLE_RAY_CLUSTER: chatray's "
                           "loopback worker node needs updating for this Ray version")

    class _ScriptsView(types.ModuleType):
        """``ray_constants`` as the CLI sees it: the same values, multi-node allowed."""

        def __getattr__(self, name: str) -> object:
            return getattr(constants, name)

    view = _ScriptsView(constants.__name__)
    view.ENABLE_RAY_CLUSTER = True  # type: ignore[attr-defined]
    scripts.ray_constants = view  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    """``ray start`` with ``argv`` (a worker node's arguments), the local-only check relaxed; the exit status."""
    import ray.scripts.scripts as scripts

    relax_worker_check()
    args = ["start", *(sys.argv[1:] if argv is None else argv)]
    try:
        scripts.cli.main(args=args, prog_name="ray", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
