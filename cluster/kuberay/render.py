"""Render cluster/kuberay/rayjob.yaml and rayservice.yaml from the files they derive from.

    python cluster/kuberay/render.py            # rewrite rayjob.yaml and rayservice.yaml
    python cluster/kuberay/render.py --check    # exit 1 (and say which) when they are out of date
    python cluster/kuberay/render.py --serve-config [--checkpoint URI] [--host 127.0.0.1]
                                                # print serve_config.yaml with the GPU overrides (for `serve deploy`
                                                # on a launcher cluster)

Sources, so the three manifests cannot drift apart:

* the cluster shape (head, GPU worker group, autoscaling, auth) is ``spec`` of ``raycluster.yaml``;
* ``RayService.spec.serveConfigV2`` is ``serve_config.yaml`` with exactly the overrides in :data:`SERVE_OVERRIDES`;
* the RayJob runs ``python jobs/finetune.py --config jobs/finetune_gpt2.yaml`` (plus any ``--set`` in
  :data:`JOB_OVERRIDES`); the RayService serves that run's best checkpoint, ``<run.storage_path>/<run.name>:best``.

Your bucket: edit ``data.path`` / ``run.storage_path`` in jobs/finetune_gpt2.yaml (or put ``--set`` overrides in
:data:`JOB_OVERRIDES`), then rerun. Needs PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RAYCLUSTER = HERE / "raycluster.yaml"
RAYJOB = HERE / "rayjob.yaml"
RAYSERVICE = HERE / "rayservice.yaml"
SERVE_CONFIG = REPO / "serve_config.yaml"
JOB_SCRIPT = "jobs/finetune.py"
JOB_CONFIG = "jobs/finetune_gpt2.yaml"
# Where the image keeps the checkout (cluster/kuberay/Dockerfile WORKDIR): the job's working_dir.
IMAGE_WORKDIR = "/home/ray/chatray"

# `--set` overrides the RayJob passes to jobs/finetune.py, e.g. {"run.storage_path": "s3://my-bucket/checkpoints"}
# (keys of chatray.config.FinetuneConfig). Empty: the job config's own S3 paths are used as they are.
JOB_OVERRIDES: dict[str, str] = {}

APP = "chatray"  # the application in serve_config.yaml
GENERATOR = "Generator"

# The documented differences between serve_config.yaml and RayService.spec.serveConfigV2, as
# (path, value, why). A path is a list of keys; "app:<name>" / "deployment:<name>" select list items by name.
# `checkpoint` is filled in from the RayJob's run (see _checkpoint_uri).
SERVE_OVERRIDES: list[tuple[list[str], Any, str]] = [
    (["http_options", "host"], "0.0.0.0",
     "the Serve proxy listens on the pod IP, where KubeRay's serve Service sends requests"),
    (["applications", f"app:{APP}", "args", "checkpoint"], None,
     "the RayJob's best checkpoint on S3 (<run.storage_path>/<run.name>:best)"),
    (["applications", f"app:{APP}", "deployments", f"deployment:{GENERATOR}", "ray_actor_options"],
     {"num_cpus": 2, "num_gpus": 1},
     "one GPU per Generator replica (the GPU profile commented in serve_config.yaml)"),
    (["applications", f"app:{APP}", "args", "max_batch_size"], 64,
     "a GPU replica decodes 64 sequences per step (KV cache on the card, decode as CUDA graphs)"),
    (["applications", f"app:{APP}", "deployments", f"deployment:{GENERATOR}", "max_ongoing_requests"], 128,
     "per GPU replica: a batch of 64 running plus 64 waiting in the engine"),
    (["applications", f"app:{APP}", "deployments", f"deployment:{GENERATOR}", "autoscaling_config",
      "target_ongoing_requests"], 48,
     "scale out before a GPU replica's 64 slots are full"),
]

__all__ = [
    "SERVE_OVERRIDES",
    "JOB_OVERRIDES",
    "render_rayjob",
    "render_rayservice",
    "render_serve_config",
    "dump",
    "get_path",
    "path_str",
]


def _load(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _select(node: Any, key: str) -> tuple[Any, Any]:
    """Resolve one path element: a mapping key, or ``app:<name>`` / ``deployment:<name>`` in a list."""
    if ":" in key and isinstance(node, list):
        _, name = key.split(":", 1)
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == name:
                return node, i
        raise KeyError(f"no item named {name!r}")
    if not isinstance(node, dict):
        raise KeyError(f"{key!r}: not a mapping")
    return node, key


def get_path(doc: Any, path: list[str]) -> Any:
    """The value at ``path`` (see :data:`SERVE_OVERRIDES` for the path syntax)."""
    node = doc
    for key in path:
        parent, k = _select(node, key)
        node = parent[k]
    return node


def path_str(path: list[str]) -> str:
    """``["applications", "app:chatray", "args"]`` -> ``applications[chatray].args``."""
    out = ""
    for key in path:
        out += f"[{key.split(':', 1)[1]}]" if ":" in key else (f".{key}" if out else key)
    return out


def _set_path(doc: Any, path: list[str], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        parent, k = _select(node, key)
        node = parent[k]
    parent, k = _select(node, path[-1])
    parent[k] = copy.deepcopy(value)


def _job_config() -> dict[str, Any]:
    return _load(REPO / JOB_CONFIG) or {}


def _checkpoint_uri() -> str:
    """``<run.storage_path>/<run.name>:best`` of the RayJob's run (its config plus JOB_OVERRIDES)."""
    run = _job_config().get("run") or {}
    storage = JOB_OVERRIDES.get("run.storage_path", run.get("storage_path"))
    name = JOB_OVERRIDES.get("run.name", run.get("name"))
    if not storage or not name:
        raise SystemExit(f"{JOB_CONFIG} needs run.storage_path and run.name: they name the checkpoint to serve")
    if "://" not in storage:
        raise SystemExit(f"{JOB_CONFIG}: run.storage_path {storage!r} is not shared storage (s3://...): "
                         "the RayJob's cluster is gone when the RayService starts")
    return f"{storage.rstrip('/')}/{name}:best"


def render_serve_config(base: dict[str, Any] | None = None, *, checkpoint: str | None = None,
                        host: str | None = None) -> dict[str, Any]:
    """serve_config.yaml with :data:`SERVE_OVERRIDES` applied.

    Args:
        base: the parsed serve_config.yaml (read from the repo when None).
        checkpoint: checkpoint URI for the app (default: the RayJob run's best checkpoint on S3).
        host: HTTP host (default: the override's 0.0.0.0; 127.0.0.1 for a launcher cluster behind SSH).
    """
    out = copy.deepcopy(base if base is not None else _load(SERVE_CONFIG))
    for path, value, _why in SERVE_OVERRIDES:
        if path[-1] == "checkpoint":
            value = checkpoint or _checkpoint_uri()
        elif path[-1] == "host" and host:
            value = host
        _set_path(out, path, value)
    return out


def _cluster_spec() -> dict[str, Any]:
    doc = _load(RAYCLUSTER)
    if not isinstance(doc, dict) or doc.get("kind") != "RayCluster" or "spec" not in doc:
        raise SystemExit(f"{RAYCLUSTER} is not a RayCluster manifest with a spec")
    return doc["spec"]


def _entrypoint() -> str:
    args = ["python", JOB_SCRIPT, "--config", JOB_CONFIG]
    for key, value in JOB_OVERRIDES.items():
        args += ["--set", f"{key}={value}"]
    return shlex.join(args)


def render_rayjob() -> dict[str, Any]:
    """The RayJob: a fresh cluster of raycluster.yaml's shape runs the fine-tuning job, then goes away."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "chatray-finetune-gpt2", "labels": {"app.kubernetes.io/name": "chatray"}},
        "spec": {
            "entrypoint": _entrypoint(),
            "runtimeEnvYAML": f"working_dir: {IMAGE_WORKDIR}\n",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            # Ray Train already restarts failed workers from the latest checkpoint (run.max_failures).
            "backoffLimit": 0,
            "rayClusterSpec": _cluster_spec(),
        },
    }


def render_rayservice() -> dict[str, Any]:
    """The RayService: serve_config.yaml (with the GPU overrides) on a cluster of raycluster.yaml's shape."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "chatray", "labels": {"app.kubernetes.io/name": "chatray"}},
        "spec": {
            "serveConfigV2": dump(render_serve_config()),
            "rayClusterConfig": _cluster_spec(),
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: Any) -> str:
    """YAML in file order, multi-line strings as ``|`` blocks, non-ASCII kept."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def _header(launch: str, what: str) -> str:
    lines = [
        f"# Launch: {launch}",
        "#",
        f"# {what}",
        "# GENERATED by cluster/kuberay/render.py from cluster/kuberay/raycluster.yaml (the cluster shape),",
        "# serve_config.yaml and jobs/finetune_gpt2.yaml: edit those (or JOB_OVERRIDES in render.py) and rerun",
        "# `python cluster/kuberay/render.py`; tests/unit/cluster fails while this file is out of date.",
    ]
    return "\n".join(lines) + "\n"


def _rayjob_text() -> str:
    head = _header(
        "kubectl apply -f cluster/kuberay/rayjob.yaml      (follow: kubectl get rayjob chatray-finetune-gpt2 -w)",
        "Fine-tunes GPT-2 on a fresh Ray cluster (raycluster.yaml's shape) and deletes the cluster afterwards;\n"
        "# checkpoints go to run.storage_path on S3, where rayservice.yaml picks up the run's best one.")
    return head + dump(render_rayjob())


def _rayservice_text() -> str:
    notes = "\n".join(f"#   {path_str(p)}:\n#       {why}" for p, _v, why in SERVE_OVERRIDES)
    head = _header(
        "kubectl apply -f cluster/kuberay/rayservice.yaml  (then: kubectl port-forward svc/chatray-serve-svc 8000)",
        "Serves the fine-tuned model: serveConfigV2 is serve_config.yaml with these documented overrides:\n" + notes)
    return head + dump(render_rayservice())


def _outputs() -> dict[Path, str]:
    return {RAYJOB: _rayjob_text(), RAYSERVICE: _rayservice_text()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the rendered files are out of date")
    parser.add_argument("--serve-config", action="store_true", help="print the GPU serve config and exit")
    parser.add_argument("--checkpoint", help="with --serve-config: the checkpoint URI to serve")
    parser.add_argument("--host", help="with --serve-config: HTTP host (127.0.0.1 behind an SSH tunnel)")
    args = parser.parse_args(argv)

    if args.serve_config:
        sys.stdout.write(dump(render_serve_config(checkpoint=args.checkpoint, host=args.host)))
        return 0
    stale = []
    for path, text in _outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.relative_to(REPO))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"out of date: {', '.join(map(str, stale))}; run: python cluster/kuberay/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
