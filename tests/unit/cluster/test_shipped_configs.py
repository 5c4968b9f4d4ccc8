"""Every shipped YAML (serve_config.yaml, jobs/*.yaml, cluster/**/*.yaml) parses, says how to launch it, and agrees
with the code and the other files that consume it.

* launch comment: each file's first line is a comment giving its launch command, which names the file; every
  repo file a launch comment mentions exists;
* serve configs: Ray's ServeDeploySchema, every ``import_path`` importable and callable, chatray's ``ServeArgs``,
  Ray's ``DeploymentSchema`` for each deployment, and the app builds;
* jobs configs: loaded with ``chatray.config.load_config(FinetuneConfig, ...)``, each carrying its run, data, model
  and scaling;
* KubeRay manifests: the vendored (trimmed) KubeRay v1 CRD schema (schemas/kuberay_v1.schema.yaml), the rendered
  files up to date with cluster/kuberay/render.py, RayService.serveConfigV2 == serve_config.yaml apart from the
  documented overrides, the RayJob's entrypoint/config, GPU worker groups, autoscaling, token auth, one image;
* the cluster launcher YAML: Ray's own cluster schema (ray/autoscaler/ray-schema.json) after Ray's defaults, and
  the node types, images, environment and ``ray start`` commands it must carry;
* cluster/local/*.sh: valid bash, each running its ``python -m chatray.localcluster`` subcommand.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import chatray
from chatray.config import FinetuneConfig, load_config
from chatray.localcluster import main as localcluster_main
from chatray.rayenv import SERVE_ENV, is_secret

REPO = Path(__file__).resolve().parents[3]
SCHEMA = Path(__file__).with_name("schemas") / "kuberay_v1.schema.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
LAUNCHER = REPO / "cluster" / "launcher" / "chatray-aws.yaml"
DOCKERFILE = KUBERAY / "Dockerfile"

SHIPPED = sorted([REPO / "serve_config.yaml", *REPO.glob("jobs/*.yaml"), *REPO.glob("cluster/**/*.yaml")])
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
SCRIPTS = sorted((REPO / "cluster" / "local").glob("*.sh"))


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _render() -> Any:
    spec = importlib.util.spec_from_file_location("chatray_kuberay_render", KUBERAY / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two parsed YAML documents differ (list items named by their ``name`` when they have one)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(sub)
            else:
                out += _diff(a[key], b[key], sub)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            named = isinstance(x, dict) and isinstance(y, dict) and "name" in x and x.get("name") == y.get("name")
            out += _diff(x, y, f"{path}[{x['name'] if named else i}]")
        return out
    return [] if a == b else [path]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _cpus(quantity: Any) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _gpu_group(cluster: dict[str, Any]) -> dict[str, Any]:
    groups = [g for g in cluster.get("workerGroupSpecs", [])
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})]
    assert len(groups) == 1, "expected exactly one GPU worker group (nvidia.com/gpu limit)"
    return groups[0]


# ---------------------------------------------------------------------------------------------------------------
# All YAML files


def test_the_shipped_files_are_all_found():
    names = {_rel(p) for p in SHIPPED}
    assert {"serve_config.yaml", "cluster/launcher/chatray-aws.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml"} <= names
    assert any(n.startswith("jobs/") for n in names), "no jobs/*.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=_rel)
def test_yaml_parses_and_starts_with_its_launch_command(path: Path):
    text = path.read_text(encoding="utf-8")
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{_rel(path)}: expected one YAML mapping"
    first = text.splitlines()[0]
    assert first.startswith("#") and "launch" in first.lower(), \
        f"{_rel(path)}: the first line must be a comment giving the launch command, got {first!r}"
    assert path.name in first, f"{_rel(path)}: the launch command on line 1 should name the file: {first!r}"
    # Every repo file named in the leading comments exists (scripts, configs, entrypoints).
    header = "\n".join(line for line in text.splitlines()[:40] if line.startswith("#"))
    for ref in re.findall(r"(?<![\w./:-])((?:cluster|jobs|platform|tests)/[\w./-]+\.(?:py|yaml|sh|md)|"
                          r"serve_config\.yaml|Makefile)", header):
        assert (REPO / ref).exists(), f"{_rel(path)} mentions {ref}, which does not exist"


# ---------------------------------------------------------------------------------------------------------------
# Ray Serve configs: serve_config.yaml and the RayService's serveConfigV2


def _serve_configs() -> list[tuple[str, dict[str, Any]]]:
    out = [("serve_config.yaml", _load(REPO / "serve_config.yaml"))]
    for path in MANIFESTS:
        doc = _load(path)
        if doc.get("kind") == "RayService":
            out.append((f"{_rel(path)}:serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


@pytest.mark.parametrize(("name", "config"), _serve_configs(), ids=[n for n, _ in _serve_configs()])
def test_serve_config_is_valid_and_its_import_paths_resolve(name: str, config: dict[str, Any], tmp_path: Path):
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    apps = config["applications"]
    assert [(a["name"], a["route_prefix"], a["import_path"]) for a in apps] == \
        [("chatray", "/", "chatray.serve.app:build_app")], f"{name}: one app, chatray's builder at /"
    assert config["proxy_location"] == "HeadOnly"
    assert {k: v for k, v in config["http_options"].items() if k != "host"} == {"port": 8000, "request_timeout_s": 120}
    for app in apps:
        module_name, _, attr = app["import_path"].partition(":")
        assert attr, f"{name}: import_path {app['import_path']!r} must be module:attribute"
        module = importlib.import_module(module_name)
        builder = getattr(module, attr, None)
        assert callable(builder), f"{name}: {app['import_path']} is not callable"
        options = {}
        for d in app.get("deployments") or []:
            opts = DeploymentSchema.model_validate(d).model_dump(exclude_unset=True)
            options[opts.pop("name")] = opts
        args = module.ServeArgs.model_validate(app.get("args") or {})
        assert set(options) <= {"Ingress", "Generator"}, f"{name}: unknown deployments {sorted(options)}"
        assert list(options) == ["Ingress", "Generator"], f"{name}: deployments {list(options)}"
        assert options["Ingress"]["num_replicas"] == 1
        assert options["Generator"]["autoscaling_config"]["min_replicas"] == 1
        assert options["Generator"]["autoscaling_config"]["max_replicas"] == 2
        assert (args.api_key_env, args.max_body_bytes) == ("CHATRAY_API_KEY", 1048576)
        gpu = "rayservice" in name  # the KubeRay profile: one GPU per replica, a larger batch (render.py says why)
        assert args.max_batch_size == (64 if gpu else 16)
        assert options["Generator"]["max_ongoing_requests"] >= 2 * args.max_batch_size  # a full batch plus as many
        # The deployment options are ones the deployments accept, and the app builds with them (building
        # resolves the checkpoint, so it gets one that exists here).
        from support.checkpoints import make_checkpoint

        ckpt = make_checkpoint(tmp_path / "run" / "checkpoint_00000001")
        application = module.build_app_with_options(args.model_copy(update={"checkpoint": f"{ckpt.parent}:best"}),
                                                    options)
        assert type(application).__name__ == "Application"


def test_serve_config_serves_what_the_demo_job_writes_on_loopback():
    config = _load(REPO / "serve_config.yaml")
    cfg = load_config(FinetuneConfig, REPO / "jobs" / "finetune_tiny.yaml")
    assert config["applications"][0]["args"]["checkpoint"] == f"{cfg.run.storage_path}/{cfg.run.name}:best"
    assert config["http_options"]["host"] == "127.0.0.1"  # no API key by default: loopback only
    generator = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Generator")
    assert generator["ray_actor_options"] == {"num_cpus": 1}  # the CPU profile; rayservice.yaml gives it a GPU


# ---------------------------------------------------------------------------------------------------------------
# jobs/*.yaml


# What each job config runs: (run.name, data.path, model.name, train.max_steps, scaling.num_workers, use_gpu).
JOBS = {
    "finetune_tiny.yaml": ("tiny-demo", ".demo/data", "tiny", 1900, 1, False),
    "finetune_gpt2.yaml": ("gpt2-chat", "s3://chatray/data/chat-gpt2", "gpt2", 2000, 2, True),
    "finetune_gpt2_medium.yaml": ("gpt2-medium-chat", "s3://chatray/data/chat-gpt2", "gpt2-medium", 3000, 4, True),
}


@pytest.mark.parametrize("path", sorted(REPO.glob("jobs/*.yaml")), ids=_rel)
def test_job_config_loads_with_the_training_config_loader(path: Path):
    assert path.name.startswith("finetune"), f"{_rel(path)}: no loader known for this job config; add it here"
    assert path.name in JOBS, f"{_rel(path)}: add what it runs to JOBS here"
    cfg = load_config(FinetuneConfig, path)
    assert cfg.run.name and cfg.data.path and cfg.train.max_steps >= 1
    assert (cfg.run.name, cfg.data.path, cfg.model.name, cfg.train.max_steps, cfg.scaling.num_workers,
            cfg.scaling.use_gpu) == JOBS[path.name]
    if cfg.scaling.use_gpu:
        # A multi-GPU job runs on a cluster: its data and checkpoints must be on storage every node reaches.
        assert "://" in cfg.run.storage_path and "://" in cfg.data.path, \
            f"{_rel(path)}: a GPU job config should use shared storage (s3://) for data.path and run.storage_path"


def test_demo_job_names_the_data_the_demo_prepares_and_compares_before_after():
    from chatray.demo import JOB_CONFIG, PREPARE_OPTIONS

    text = JOB_CONFIG.read_text(encoding="utf-8")
    wanted = (f"chatray data prepare --demo --out .demo/data --tokenizer {PREPARE_OPTIONS['tokenizer']} "
              f"--max-length {PREPARE_OPTIONS['max_length']}")
    assert wanted in text, "the YAML's set-up comment and the demo prepare the same data"
    cfg = load_config(FinetuneConfig, JOB_CONFIG)
    # the demo's before/after: the untrained model is evaluated, and :best is the last step's checkpoint
    assert cfg.eval.at_start and cfg.eval.sample_prompt == "你喜欢什么运动?"
    assert cfg.checkpoint.every == cfg.train.max_steps and cfg.data.packing == "pad"


def test_job_entrypoint_script_exists_and_takes_config_and_set(capsys):
    script = REPO / "jobs" / "finetune.py"
    text = script.read_text(encoding="utf-8")
    assert "--config" in text and "--set" in text and "__main__" in text
    spec = importlib.util.spec_from_file_location("chatray_jobs_finetune", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert "--config CONFIG" in usage and "--set KEY=VALUE" in usage, usage


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests


@pytest.fixture(scope="module")
def crd_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate the KubeRay manifests")
    schema = _load(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_kuberay_manifests_are_the_three_expected_kinds():
    kinds = {_load(p)["kind"]: p.name for p in MANIFESTS}
    assert kinds == {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_kuberay_manifest_matches_the_crd_schema(path: Path, crd_validator):
    doc = _load(path)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in crd_validator.iter_errors(doc)]
    assert not errors, f"{_rel(path)} does not match the KubeRay v1 CRD schema:\n" + "\n".join(errors)


def test_crd_schema_rejects_what_kubectl_would(crd_validator):
    good = _load(KUBERAY / "raycluster.yaml")
    assert crd_validator.is_valid(good)
    bad_cases = {
        "misspelled field": lambda d: d["spec"].__setitem__("workerGroupSpec", d["spec"]["workerGroupSpecs"]),
        "non-string rayStartParams": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        "worker group without maxReplicas": lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        "bad quantity": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"].__setitem__("memory", "8 gigs"),
        "wrong apiVersion": lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"),
        "container field typo": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
            "imagePullPolicyy", "Always"),
    }
    for what, mutate in bad_cases.items():
        doc = copy.deepcopy(good)
        mutate(doc)
        assert not crd_validator.is_valid(doc), f"the schema accepted a manifest with a {what}"


def test_rendered_manifests_are_up_to_date():
    render = _render()
    assert _load(KUBERAY / "rayjob.yaml") == render.render_rayjob(), \
        "cluster/kuberay/rayjob.yaml is stale: run python cluster/kuberay/render.py"
    assert _load(KUBERAY / "rayservice.yaml") == render.render_rayservice(), \
        "cluster/kuberay/rayservice.yaml is stale: run python cluster/kuberay/render.py"
    assert render.main(["--check"]) == 0
    cluster = _load(KUBERAY / "raycluster.yaml")["spec"]
    assert _cluster_spec(_load(KUBERAY / "rayjob.yaml")) == cluster
    assert _cluster_spec(_load(KUBERAY / "rayservice.yaml")) == cluster


def test_rayservice_serve_config_is_serve_config_yaml_apart_from_the_documented_overrides():
    render = _render()
    base = _load(REPO / "serve_config.yaml")
    service = _load(KUBERAY / "rayservice.yaml")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    documented = {render.path_str(p) for p, _v, _why in render.SERVE_OVERRIDES}
    changed = set(_diff(base, served))
    # Each difference lies inside a documented override, and each documented override is really applied.
    undocumented = {c for c in changed if not any(c == d or c.startswith(d + ".") or c.startswith(d + "[")
                                                 for d in documented)}
    assert not undocumented, f"serveConfigV2 differs from serve_config.yaml at undocumented paths: {undocumented}"
    for path, value, _why in render.SERVE_OVERRIDES:
        if value is not None:
            assert render.get_path(served, path) == value, render.path_str(path)
    # Each override is also listed in the file's own header comment.
    header = (KUBERAY / "rayservice.yaml").read_text(encoding="utf-8").split("\napiVersion:")[0]
    for d in documented:
        assert d in header, f"rayservice.yaml's header does not document the override of {d}"

    # GPU per Generator replica; the proxy reachable from the serve Service.
    app = served["applications"][0]
    gen = next(d for d in app["deployments"] if d["name"] == "Generator")
    assert gen["ray_actor_options"]["num_gpus"] == 1
    assert gen["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert served["http_options"]["host"] == "0.0.0.0"


def test_rayservice_serves_the_checkpoint_the_rayjob_writes():
    job = _load(KUBERAY / "rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/finetune.py"], job["entrypoint"]
    assert (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert config == "jobs/finetune_gpt2.yaml" and (REPO / config).is_file()
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(FinetuneConfig, REPO / config, sets)
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == _dockerfile()["workdir"], \
        "the RayJob's working_dir must be where the image keeps the checkout (Dockerfile WORKDIR)"
    served = yaml.safe_load(_load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    checkpoint = served["applications"][0]["args"]["checkpoint"]
    assert checkpoint == f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}:best"
    assert checkpoint.startswith("s3://")

    # The job fits the cluster: one GPU per Train worker, and CPUs for the worker plus Ray Data beside it.
    cluster = job["rayClusterSpec"]
    group = _gpu_group(cluster)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cfg.scaling.use_gpu
    assert cfg.scaling.num_workers <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert _cpus(limits["cpu"]) > cfg.scaling.cpus_per_worker, "no CPU left for Ray Data on the GPU pods"


def _dockerfile() -> dict[str, str]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for s in src.split():
            assert (REPO / s).exists(), f"Dockerfile copies {s}, which is not in the repo"
    return {"base": base, "workdir": workdir}


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_kuberay_cluster_has_token_auth_autoscaling_gpus_and_one_image(path: Path):
    cluster = _cluster_spec(_load(path))
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["enableInTreeAutoscaling"] is True
    group = _gpu_group(cluster)
    assert 0 == group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] > 0
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("gpu", 0, 0, 4)
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    gpus = res["limits"]["nvidia.com/gpu"]
    assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, "GPU requests must equal limits"
    assert res["limits"] == res["requests"] == {"cpu": "7", "memory": "24Gi", "nvidia.com/gpu": "1"}
    # No training or replicas on the head: it runs the control plane, job drivers and the Serve proxy.
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "metrics-export-port": "8080"}
    # One image everywhere, tagged with chatray's version, built FROM Ray's image of the cluster's rayVersion.
    images = {c["image"] for c in _containers(cluster)}
    assert len(images) == 1, f"containers use different images: {images}"
    assert images == {f"registry.example.com/chatray:{chatray.__version__}"}
    assert images.pop().endswith(f":{chatray.__version__}")
    assert _dockerfile()["base"].startswith(f"rayproject/ray:{cluster['rayVersion']}-")
    # The head exposes the ports clients and the operator use.
    ports = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    head_ports = {p["containerPort"] for p in ports}
    assert {6379, 8265, 8000} <= head_ports
    assert {p["name"]: p["containerPort"] for p in ports} == {"gcs-server": 6379, "dashboard": 8265, "client": 10001,
                                                                "serve": 8000, "metrics": 8080}


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_kuberay_ray_containers_get_chatrays_serve_data_plane(path: Path):
    for c in _containers(_cluster_spec(_load(path))):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, c["name"]
        assert env == {"AWS_REGION": "us-west-2", **SERVE_ENV}, c["name"]


def _secret_env_vars(runtime_env: dict[str, Any] | None) -> list[str]:
    return [k for k in ((runtime_env or {}).get("env_vars") or {}) if is_secret(k)]


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_kuberay_credentials_come_from_the_secret_never_from_a_job_or_app_spec(path: Path):
    doc = _load(path)
    for c in _containers(_cluster_spec(doc)):
        # Train workers and Serve replicas run in every Ray container: each reads the optional chatray-env Secret.
        assert c.get("envFrom") == [{"secretRef": {"name": "chatray-env", "optional": True}}], c["name"]
        assert not [e["name"] for e in c.get("env", []) if is_secret(e["name"])], c["name"]
    specs = [yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")]  # the RayJob's job
    if doc["kind"] == "RayService":
        specs += [a.get("runtime_env") for a in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]]
    assert not [k for spec in specs for k in _secret_env_vars(spec)], "the Jobs API and dashboard show these"


@pytest.mark.parametrize(("name", "config"), _serve_configs(), ids=[n for n, _ in _serve_configs()])
def test_serve_configs_carry_no_secret(name: str, config: dict[str, Any]):
    for app in config["applications"]:
        assert not _secret_env_vars(app.get("runtime_env")), f"{name}: Serve's REST API shows the runtime_env"
        assert app["args"]["api_key_env"] == "CHATRAY_API_KEY", "the key's variable name, read in the replicas"


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)


def test_launcher_yaml_matches_rays_cluster_schema():
    import json

    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema = pytest.importorskip("jsonschema")
    config = _load(LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # as written
    validate_config(prepare_config(copy.deepcopy(config)))  # after Ray's AWS defaults, as `ray up` does


def test_launcher_yaml_has_gpu_autoscaling_token_auth_and_installs_chatray():
    config = _load(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    gpu = [t for name, t in config["available_node_types"].items() if t.get("resources", {}).get("GPU")]
    assert len(gpu) == 1, "expected one GPU worker node type"
    gpu = gpu[0]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert (gpu["min_workers"], gpu["max_workers"], config["max_workers"]) == (0, 4, 4)
    assert "GPU" not in head.get("resources", {})
    assert (head["resources"], gpu["resources"]) == ({"CPU": 8}, {"CPU": 4, "GPU": 1})
    assert (head["node_config"]["InstanceType"], gpu["node_config"]["InstanceType"]) == ("m5.2xlarge", "g5.xlarge")
    # Every node authenticates with the same token, copied from the launching machine.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert config["file_mounts"] == {"~/chatray": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in config[key]), key
        # chatray's Serve data plane, exported before `ray start` on every node.
        start = next(c for c in config[key] if "ray start" in c)
        assert all(f"{k}={v}" in start.split("ray start")[0] for k, v in SERVE_ENV.items()), key
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    # The checkout is synced and installed on every node.
    local = [src for dst, src in config["file_mounts"].items() if not str(src).startswith("~")]
    for src in local:
        assert (REPO / src).exists(), f"file_mounts source {src} (relative to the repo root) does not exist"
    assert any("chatray" in c and "pip install" in c for c in config["setup_commands"])
    assert config["setup_commands"] == ['pip install -q -U "$HOME/chatray"']
    # The images are Ray's, at the same version as the KubeRay manifests.
    ray_version = _load(KUBERAY / "raycluster.yaml")["spec"]["rayVersion"]
    for key in ("image", "head_image"):
        assert config["docker"][key].startswith(f"rayproject/ray:{ray_version}-"), key
    assert config["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    assert config["docker"]["head_image"] == f"rayproject/ray:{ray_version}-py311"
    # The GPU job fits: a Train worker's CPUs on a GPU node, and CPUs somewhere for Ray Data.
    cfg = load_config(FinetuneConfig, REPO / "jobs" / "finetune_gpt2.yaml")
    assert gpu["resources"]["CPU"] >= cfg.scaling.cpus_per_worker
    assert gpu["resources"]["CPU"] > cfg.scaling.cpus_per_worker or head["resources"].get("CPU", 0) > 0
    assert cfg.scaling.num_workers <= gpu["max_workers"] * gpu["resources"]["GPU"]


def _start_command(command: str) -> tuple[dict[str, str], list[str]]:
    """The variables an ``export A=1 B=2; ...; ray start ...`` command sets, and its ``ray start`` argv."""
    parts = [p.strip() for p in command.split(";")]
    exports = dict(kv.split("=", 1) for p in parts if p.startswith("export ") for kv in p.split()[1:])
    (start,) = [shlex.split(p) for p in parts if p.startswith("ray start")]
    return exports, start


def test_launcher_yaml_starts_ray_with_token_auth_the_serve_data_plane_and_loopback_dashboard():
    config = _load(LAUNCHER)
    env = {"RAY_AUTH_MODE": "token", "AWS_REGION": config["provider"]["region"], **SERVE_ENV}
    assert config["provider"]["region"] == "us-west-2"
    head = ["ray", "start", "--head", "--port=6379", "--object-manager-port=8076",
            "--autoscaling-config=~/ray_bootstrap_config.yaml", "--dashboard-host=127.0.0.1", "--dashboard-port=8265",
            "--metrics-export-port=8080", "--disable-usage-stats"]
    worker = ["ray", "start", "--address=$RAY_HEAD_IP:6379", "--object-manager-port=8076", "--metrics-export-port=8080",
              "--disable-usage-stats"]
    for key, argv in (("head_start_ray_commands", head), ("worker_start_ray_commands", worker)):
        stop, start = config[key]
        assert stop == "ray stop", key
        assert _start_command(start) == (env, argv), key
        assert "ulimit -n 65536;" in start, key


# ---------------------------------------------------------------------------------------------------------------
# cluster/local scripts (not YAML, but shipped next to it)


@pytest.mark.parametrize("path", SCRIPTS, ids=_rel)
def test_local_cluster_script_is_valid_bash(path: Path, capsys):
    subprocess.run(["bash", "-n", str(path)], check=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not path.name.startswith("_"):
        assert lines[0] == "#!/usr/bin/env bash" and "launch" in lines[1].lower() and path.name in lines[1]
        assert lines[1].startswith(f"# Launch: cluster/local/{path.name}")
        # Each script runs the python -m chatray.localcluster subcommand of its name, which that CLI knows.
        command = path.stem
        assert lines[-3:] == ["set -euo pipefail", 'source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"',
                              f'exec "$PY" -m chatray.localcluster {command} "$@"']
        assert localcluster_main([command, "--help"]) == 0
        assert f"python -m chatray.localcluster {command} [" in capsys.readouterr().out
