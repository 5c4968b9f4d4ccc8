"""``chatray serve``: run the application of a serve_config.yaml in the foreground (like ``serve run``).

The YAML is the same file ``serve deploy`` takes; :func:`load_serve_config` checks it with Ray's own
schema plus :class:`~chatray.serve.app.ServeArgs`, and :func:`serve_foreground` applies its
``http_options`` and ``deployments:`` section, with command-line overrides on top. Each arg is validated
once: the file's where the file is read, an override where it is given.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

from chatray.errors import ChatrayError
from chatray.serve.app import ServeArgs, parse_args

__all__ = ["load_serve_config", "serve_foreground"]

DEFAULT_PORT = 8000
_CHATRAY_APP = "chatray.serve.app:"
_DEFAULT_APP = {"name": "chatray", "import_path": "chatray.serve.app:build_app"}


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a Ray Serve config file whose applications use ``chatray.serve.app:build_app``.

    Returns:
        The YAML as a dict (unchanged).

    Raises:
        ChatrayError: unreadable YAML, a schema error from Ray, or bad chatray args (named).
    """
    return _checked_config(Path(path))[0]


def _checked_config(p: Path) -> tuple[dict[str, Any], dict[int, ServeArgs]]:
    """The YAML and the validated args of each chatray application in it, by index."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not p.is_file():
        raise ChatrayError(f"serve config not found: {p}", hint="pass --config serve_config.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ChatrayError(f"{p}: not valid YAML: {e}") from e
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ChatrayError(f"{p}: invalid Ray Serve config at {where}: {err['msg']}") from None
    args: dict[int, ServeArgs] = {}
    for i, app in enumerate(data.get("applications") or []):
        if str(app.get("import_path", "")).startswith(_CHATRAY_APP):
            try:
                args[i] = parse_args(app.get("args") or {})
            except ChatrayError as e:
                raise ChatrayError(f"{p}: applications[{i}]: {e}", hint=e.hint) from None
    return data, args


def _pick_app(data: dict[str, Any], name: str | None) -> int:
    """Index of the application to run: the one named ``name``, else the first chatray one."""
    apps = [(i, a) for i, a in enumerate(data.get("applications") or [])
            if str(a.get("import_path", "")).startswith("chatray.")]  # any chatray app, in either path form
    if name:
        apps = [(i, a) for i, a in apps if a.get("name") == name]
    if not apps:
        raise ChatrayError(f"no chatray application{f' named {name!r}' if name else ''} in the serve config")
    return apps[0][0]


def _with_overrides(args: ServeArgs, overrides: dict[str, Any]) -> ServeArgs:
    """``args`` with the command line's overrides, each validated here (the file's values were already)."""
    if not overrides:
        return args
    given = parse_args(overrides)
    return args.model_copy(update={k: getattr(given, k) for k in given.model_fields_set})


def _check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ChatrayError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                               hint=f"another server is running there; use --port {port + 1}") from None


def _deployment_options(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from ray.serve.schema import DeploymentSchema

    out: dict[str, dict[str, Any]] = {}
    for d in app.get("deployments") or []:
        schema = DeploymentSchema.model_validate(d)
        opts = schema.model_dump(exclude_unset=True)
        out[opts.pop("name")] = opts
    return out


def serve_foreground(config: str | Path | None = None, *, checkpoint: str | None = None, host: str | None = None,
                     port: int | None = None, args: dict[str, Any] | None = None, address: str | None = None,
                     app_name: str | None = None, block: bool = True) -> str:
    """Deploy the chatray application of ``config`` (or the defaults) and keep serving until Ctrl-C.

    Args:
        config: a serve_config.yaml; None uses the defaults (one replica each, 127.0.0.1:8000).
        checkpoint: overrides ``args.checkpoint``.
        host, port: override ``http_options``.
        args: other app-arg overrides (``{"max_batch_size": 32}``).
        address: Ray address to connect to (default: ``RAY_ADDRESS``, else a new local Ray).
        app_name: which application of the config (default: the first chatray one).
        block: wait for Ctrl-C and shut Serve down (False: return after the deploy, for tests).

    Returns:
        The URL it serves on.

    Raises:
        ChatrayError: bad config/args, busy port, or a checkpoint that cannot be resolved.
    """
    if config:
        data, file_args = _checked_config(Path(config))
    else:
        data, file_args = {"applications": [_DEFAULT_APP]}, {0: parse_args({})}
    index = _pick_app(data, app_name)
    app = data["applications"][index]
    overrides = {**(args or {}), **({"checkpoint": checkpoint} if checkpoint else {})}
    parsed = _with_overrides(file_args[index], overrides)
    http = dict(data.get("http_options") or {})
    http["host"] = host or http.get("host") or "127.0.0.1"
    http["port"] = int(port or http.get("port") or DEFAULT_PORT)
    http.setdefault("request_timeout_s", 120)
    _check_port(http["host"], http["port"])
    deployments = _deployment_options(app)

    import ray
    from ray import serve

    from chatray.rayenv import connect
    from chatray.serve.app import build_app_with_options

    # Built before Ray starts: the checkpoint is resolved (and pinned) here, so a bad one fails fast and clearly.
    generator = parsed.generator_settings()
    application = build_app_with_options(parsed, deployments, generator=generator)
    started_ray = connect(address, env_vars={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                          include_dashboard=False)
    if block:
        # Ctrl-C and `kill` (SIGTERM, as from a process manager) both shut down cleanly, also while deploying,
        # and even when a shell started us in the background with SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    url = f"http://{http['host']}:{http['port']}{(app.get('route_prefix') or '/').rstrip('/')}"
    done = False
    try:
        serve.start(http_options=http, proxy_location=data.get("proxy_location", "HeadOnly"))
        serve.run(application, name=app.get("name", "chatray"),
                  route_prefix=app.get("route_prefix", "/"))
        if not block:
            done = True
            return url
        print(f"chatray: serving {generator.model.pinned} at {url}  (OpenAI API at {url}/v1; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("chatray: shutting down", flush=True)
    finally:
        if not done:
            serve.shutdown()
            if started_ray:
                ray.shutdown()
    return url
