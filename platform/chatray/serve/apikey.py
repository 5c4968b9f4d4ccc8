"""The serving API key, read inside the Ingress replica and nowhere else.

The key is never a deployment argument or a config value: Serve keeps an application's args and runtime
environment in the GCS and shows them through its REST API, ``serve status`` and the dashboard. What the app
builder passes on is where to look (:class:`~chatray.serve.settings.IngressSettings`: a variable name, a file
path) and whether it saw a key itself; the replica reads the key from its own environment or from the file.

* ``api_key_file`` set: the key is that file's content (surrounding whitespace dropped), read on the replica's
  node; the variable is not consulted. A missing, unreadable or empty file stops the replica.
* Otherwise the variable named by ``api_key_env`` in the replica's environment (that of ``ray start`` on its
  node, or of the process whose ``ray.init()`` started a local Ray); unset or empty means no key, unless the
  builder saw one (``require_api_key``): then the replica refuses to start rather than serve without auth.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from chatray.errors import ChatrayError
from chatray.serve.settings import IngressSettings

__all__ = ["env_api_key", "read_api_key"]

_WHERE = ("in the environment of `ray start` on each node, in the KubeRay Secret the Ray containers read "
          "(chatray-env), or point args.api_key_file at a file the replicas can read")


def env_api_key(name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key variable ``name`` holds in ``environ`` (default: this process's), or None when unset or blank."""
    if not name:
        return None
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def read_api_key(settings: IngressSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key this replica checks requests against, or None for no key.

    Args:
        settings: where to look (``api_key_file``, else ``api_key_env``) and whether a key is required.
        environ: the environment to read (default: this process's).

    Returns:
        The key, or None when none is configured and none is required.

    Raises:
        ChatrayError: ``api_key_file`` missing, unreadable or empty here; or no key here although the app's
            builder saw one (``require_api_key``). The message names the file or variable, never a value.
    """
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ChatrayError(f"api_key_file {path} does not exist on this Ingress replica's node",
                               hint="create it on every node that runs an Ingress replica (on Kubernetes: mount "
                               "a Secret there), or drop api_key_file and set the api_key_env variable in the "
                               "environment of `ray start` on each node") from None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise ChatrayError(f"api_key_file {path} cannot be read on this Ingress replica's node: {reason}",
                               hint="make it readable by the user Ray runs as") from None
        if not key:
            raise ChatrayError(f"api_key_file {path} is empty: refusing to serve without an API key",
                               hint="write the key into it (one line)")
        return key
    key = env_api_key(settings.api_key_env, environ)
    if key is None and settings.require_api_key:
        raise ChatrayError(f"{settings.api_key_env} is set where the app was built but not in this Ingress "
                           "replica's environment: refusing to serve without an API key",
                           hint=f"set {settings.api_key_env} {_WHERE}")
    return key
