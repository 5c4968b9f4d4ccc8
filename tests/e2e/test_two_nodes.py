"""Two Ray nodes on this machine (a head and ``worker-1``, both on 127.0.0.1): training across them, a checkpoint
written on one node and resumed on the other, a node lost during training, storage lost during a checkpoint, and
a node lost during serving.

One cluster for the whole module (start-ups cost seconds each on 2 cores): the head and the worker node offer 2
logical CPUs each and a custom resource naming them (``head_node``, ``worker_node``) that pins a run's workers or a
Serve deployment to one of them. Checkpoints go to S3: the moto server behind a :class:`FlakyProxy`, which is the
cluster's S3 endpoint and can take storage away in the middle of an upload. Killing a node is SIGKILL to every
process of it, by PID (:func:`chatray.localcluster.processes.kill_node`); ``add_local_worker`` brings it back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.flaky_proxy import FlakyProxy
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "train"))

pytestmark = pytest.mark.e2e

WORKER = "worker-1"
# train_slot: one per node, so that a run asking one per worker gets at most one worker per node, also elastically.
WORKER_ARGS = ["--num-cpus", "2", "--resources", '{"worker_node": 100, "train_slot": 1}']
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.micro_batch_size=8", "train.log_every=1",
        "eval.max_batches=2", "eval.sample_max_tokens=4", "train.seed=3", "train.lr=3e-3", "train.warmup_steps=2"]
# Eval loss of a run that lost a node vs the same run without a failure. A resumed run restores weights, optimizer,
# RNG and data position, so the two follow the same trajectory up to float summation order.
EVAL_ATOL = 2e-3
# The run-to-run spread of that run without failure, measured over train.seed 3, 4, 5, 6: final eval loss 4.2615,
# 4.1999, 4.1055, 4.1441 (range 0.156). An elastic restart changes the batches (one worker, data from the epoch's
# start), so its eval loss is held to half that range around the run without failure.
ELASTIC_ATOL = 0.08
FIXED_SETS = ("checkpoint.every=4", "eval.every=4", "scaling.placement_strategy=STRICT_SPREAD",
              "scaling.cpus_per_worker=1", "run.max_failures=2")


@pytest.fixture(scope="module")
def nodes(s3_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Yields dict(cluster, env, storage, data, proxy): a head and worker-1, S3 through the proxy."""
    from train_helpers import make_dataset

    from chatray.localcluster import LocalCluster, add_local_worker, start_local_cluster, stop_local_cluster
    from chatray.rayenv import ray_auth_env

    work = tmp_path_factory.mktemp("two-nodes")
    home = work / "home"
    old_home = os.environ.get("CHATRAY_HOME")
    os.environ["CHATRAY_HOME"] = str(home)
    proxy = FlakyProxy(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    s3_env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                         "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    s3_env["AWS_ENDPOINT_URL"] = proxy.endpoint  # the cluster's S3 goes through the proxy; the test reads moto
    cluster = LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), agent_port=free_port(),
                           client_port=free_port(), temp_dir=tempfile.mkdtemp(prefix="cr-2n-", dir="/tmp"))
    try:
        cluster, started = start_local_cluster(
            cluster, num_cpus=2, ray_args=["--resources", '{"head_node": 100, "train_slot": 1}'],
            extra_env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **s3_env})
        assert started
        add_local_worker(cluster, ray_args=WORKER_ARGS, name=WORKER)
        env = {**ray_auth_env(), **s3_env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO / "platform")}
        for key in ("CHATRAY_FAULT_AT_STEP", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            env.pop(key, None)
        yield {"cluster": cluster, "env": env, "storage": f"s3://{s3_server['bucket']}/two-nodes", "proxy": proxy,
               "data": make_dataset(work / "data", n_train=200, n_eval=16, max_length=64), "work": work}
    finally:
        proxy.close()
        stop_local_cluster(force=True, cluster=cluster, grace_s=6.0)
        if old_home is None:
            os.environ.pop("CHATRAY_HOME", None)
        else:
            os.environ["CHATRAY_HOME"] = old_home


def _train(nodes: dict, name: str, steps: int, *sets: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`chatray train` as a driver on this machine, connected to the head (its Train controller runs there)."""
    args = [sys.executable, "-m", "chatray.cli", "train", "--config", "jobs/finetune_tiny.yaml", "--data",
            str(nodes["data"]), "--storage", nodes["storage"], "--name", name, "--max-steps", str(steps),
            "--no-progress", *extra]
    for item in (*TINY, *sets):
        args += ["--set", item]
    log = open(nodes["work"] / f"train-{name}-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (read at the end)
    proc = subprocess.Popen(args, cwd=REPO, env=nodes["env"], stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 420) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    proc.log.seek(0)
    return rc, proc.log.read()


def _logged_steps(run_uri: str) -> list[int]:
    from chatray.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(run_uri) if r.get("loss") is not None]


def _final_eval(run_uri: str) -> float:
    from chatray.train.metrics import read_metrics

    return [r for r in read_metrics(run_uri) if r.get("eval_loss") is not None][-1]["eval_loss"]


def _wait_for_checkpoint(run_uri: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    from chatray.storage.checkpoints import list_checkpoints

    deadline = time.monotonic() + timeout
    while not any(c.step >= step for c in list_checkpoints(run_uri) if c.valid):
        assert proc.poll() is None, _finish(proc)[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout} s"
        time.sleep(0.5)


def _nodes_of(nodes: dict) -> dict[str, str]:
    """{node id: "head" | "worker"} of the alive nodes, from Ray's state API."""
    from chatray.localcluster.probes import get_json

    status, body = get_json(f"{nodes['cluster'].dashboard_url}/api/v0/nodes?limit=100", timeout=10)
    assert status == 200, body
    return {n["node_id"]: "head" if n["is_head_node"] else "worker" for n in body["data"]["result"]["result"]
            if n["state"] == "ALIVE"}


def _train_worker_nodes(nodes: dict) -> list[str]:
    """Node ids of the alive Ray Train workers (RayTrainWorker actors)."""
    from chatray.localcluster.probes import get_json

    url = (f"{nodes['cluster'].dashboard_url}/api/v0/actors?limit=1000&detail=true&filter_keys=class_name"
           "&filter_predicates=%3D&filter_values=RayTrainWorker")
    status, body = get_json(url, timeout=10)
    assert status == 200, body
    return [a["node_id"] for a in body["data"]["result"]["result"] if a["state"] == "ALIVE"]


def _bring_back(nodes: dict) -> None:
    from chatray.localcluster import add_local_worker

    add_local_worker(nodes["cluster"], ray_args=WORKER_ARGS, name=WORKER)


def _kill_worker(nodes: dict) -> list[int]:
    from chatray.localcluster.processes import kill_node

    pids = kill_node(nodes["cluster"].ray_temp_dir, WORKER)
    assert pids, "the worker node was not running"
    return pids


def test_checkpoint_written_on_the_worker_node_resumes_on_the_head(nodes):
    """Rank 0 on worker-1 writes the checkpoints to S3; the same run, rerun with its worker on the head, resumes."""
    t0 = time.monotonic()
    run_uri = f"{nodes['storage']}/hop"
    proc = _train(nodes, "hop", 6, "checkpoint.every=3", "eval.every=3",
                  "scaling.resources_per_worker={worker_node: 1}")
    _wait_for_checkpoint(run_uri, 3, proc)
    where = _nodes_of(nodes)
    assert [where[n] for n in _train_worker_nodes(nodes)] == ["worker"], "rank 0 runs on the worker node"
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
    rc, out = _finish(_train(nodes, "hop", 9, "checkpoint.every=3", "eval.every=3",
                             "scaling.resources_per_worker={head_node: 1}"))
    assert rc == 0, out[-3000:]
    assert f"resumed from {run_uri}/checkpoint_00000006" in out
    assert _logged_steps(run_uri) == list(range(1, 10))
    print(f"checkpoint hop worker -> head: {time.monotonic() - t0:.0f} s")


def _calm_eval(nodes: dict) -> float:
    """Final eval loss of the two-worker run without a failure (run once for the module)."""
    from chatray.storage.checkpoints import latest_checkpoint

    run_uri = f"{nodes['storage']}/calm"
    if latest_checkpoint(run_uri) is None or latest_checkpoint(run_uri).step != 16:
        rc, out = _finish(_train(nodes, "calm", 16, *FIXED_SETS, extra=("--num-workers", "2")))
        assert rc == 0, out[-3000:]
    return _final_eval(run_uri)


def test_a_node_lost_during_training_restarts_from_the_last_checkpoint_once_back(nodes):
    """Two workers, one per node (STRICT_SPREAD). worker-1 is killed after the step-8 checkpoint: the run waits for
    two nodes, resumes from its last checkpoint when worker-1 is back, and ends where a run without failure ends."""
    t0 = time.monotonic()
    calm = _calm_eval(nodes)
    t_calm = time.monotonic() - t0
    run_uri = f"{nodes['storage']}/lost"
    proc = _train(nodes, "lost", 16, *FIXED_SETS, extra=("--num-workers", "2"))
    _wait_for_checkpoint(run_uri, 8, proc)
    where = _nodes_of(nodes)
    assert sorted(where[n] for n in _train_worker_nodes(nodes)) == ["head", "worker"], "one worker per node"
    _kill_worker(nodes)
    time.sleep(15)  # the run cannot place two workers on one node: it waits
    assert proc.poll() is None, _finish(proc)[1][-3000:]
    _bring_back(nodes)
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
    steps = _logged_steps(run_uri)
    assert steps == list(range(1, 17)), f"a lost or repeated step: {steps}"
    assert "resumed from" in out
    lost = _final_eval(run_uri)
    assert abs(calm - lost) <= EVAL_ATOL, (calm, lost)
    print(f"node loss in training: calm run {t_calm:.0f} s, eval {calm:.5f}; lost-node run eval {lost:.5f}; "
          f"test {time.monotonic() - t0:.0f} s")


def test_storage_lost_during_a_checkpoint_upload(nodes):
    """S3 goes away for 12 s as the step-8 checkpoint uploads its weights. :latest/:best never name a torn checkpoint;
    the run goes on once storage is back, or fails naming the storage (what Ray 2.60 does: its Train controller's
    own write to storage fails, which max_failures does not retry), and a rerun of the name resumes from the last
    complete checkpoint."""
    from chatray.storage.checkpoints import best_checkpoint, latest_checkpoint, list_checkpoints

    t0 = time.monotonic()
    run_uri = f"{nodes['storage']}/outage"
    proxy = nodes["proxy"]
    proxy.trip_on(b"outage/checkpoint_00000008/model.safetensors", down_s=12)
    proc = _train(nodes, "outage", 12, "checkpoint.every=4", "eval.every=4", "run.max_failures=3",
                  "scaling.resources_per_worker={head_node: 1}")
    seen: list[str] = []
    while proc.poll() is None:  # during the outage and after: what :latest and :best resolve to is complete
        for info in (latest_checkpoint(run_uri), best_checkpoint(run_uri)):
            if info is not None:
                assert info.valid, info
                seen.append(info.uri)
        time.sleep(0.5)
    rc, out = _finish(proc)
    assert proxy.tripped.is_set(), "the outage never started:\n" + out[-3000:]
    print(f"storage outage: run exit {rc}; :latest/:best seen {sorted(set(seen))}")
    if rc != 0:
        assert f"error: training run outage ({run_uri}) failed" in out, out[-3000:]  # the error names the storage
        assert proxy.restored.wait(30), "storage never came back"
        last = latest_checkpoint(run_uri)
        assert last is not None and last.valid
        torn = [c for c in list_checkpoints(run_uri) if not c.valid]
        print(f"storage outage: resuming from {last.uri}; torn checkpoints left: {[c.uri for c in torn]}")
        assert {c.step for c in torn} <= {8} and last.step == 4  # the cut upload is the only torn one, skipped
        rc, out = _finish(_train(nodes, "outage", 12, "checkpoint.every=4", "eval.every=4",
                                 "scaling.resources_per_worker={head_node: 1}"))
        assert rc == 0 and f"resumed from {last.uri} " in out, out[-3000:]
    assert _logged_steps(run_uri) == list(range(1, 13))
    latest = latest_checkpoint(run_uri)
    assert latest is not None and latest.valid and latest.step == 12
    print(f"storage outage test: {time.monotonic() - t0:.0f} s")


def test_a_node_lost_during_elastic_training_goes_on_with_fewer_workers(nodes):
    """`--num-workers 1-2`, one worker per node (train_slot): worker-1 is killed after the step-8 checkpoint and
    stays down. The run restarts from that checkpoint with one worker instead of waiting, and finishes."""
    t0 = time.monotonic()
    run_uri = f"{nodes['storage']}/elastic"
    proc = _train(nodes, "elastic", 16, "checkpoint.every=4", "eval.every=4", "scaling.cpus_per_worker=1",
                  "scaling.resources_per_worker={train_slot: 1}", "run.max_failures=2", extra=("--num-workers", "1-2"))
    try:
        _wait_for_checkpoint(run_uri, 8, proc)
        where = _nodes_of(nodes)
        assert sorted(where[n] for n in _train_worker_nodes(nodes)) == ["head", "worker"], "two workers at first"
        _kill_worker(nodes)
        rc, out = _finish(proc)
    finally:
        _bring_back(nodes)
    assert rc == 0, out[-3000:]
    assert "resumed from" in out
    steps = _logged_steps(run_uri)
    assert steps == list(range(1, 17)), f"a lost or repeated step: {steps}"
    elastic, calm = _final_eval(run_uri), _calm_eval(nodes)
    assert abs(elastic - calm) <= ELASTIC_ATOL, (calm, elastic)
    print(f"elastic node loss: eval {elastic:.5f} (without failure {calm:.5f}); test {time.monotonic() - t0:.0f} s")


def _serve_config(nodes: dict, port: int) -> Path:
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"].update(checkpoint=f"{nodes['storage']}/hop:latest", max_tokens=8, temperature=0.0)
    app["args"].pop("api_key_env", None)
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":  # on the head, with the proxy: the worker node holds a Generator only
            dep["ray_actor_options"] = {"num_cpus": 0.1, "resources": {"head_node": 1}}
        else:
            dep.pop("autoscaling_config", None)
            dep.update(num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5})
    path = nodes["work"] / "serve_two_nodes.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _generator_nodes(nodes: dict) -> list[str]:
    """Node ids of the RUNNING Generator replicas."""
    from chatray.localcluster.probes import get_json

    status, body = get_json(f"{nodes['cluster'].dashboard_url}/api/serve/applications/", timeout=10)
    if status != 200 or not body:
        return []
    deps = body.get("applications", {}).get("chatray", {}).get("deployments", {})
    return [r["node_id"] for r in deps.get("Generator", {}).get("replicas", []) if r.get("state") == "RUNNING"]


class _Load:
    """Steady load: two client threads, each sending one chat request after the other; every outcome is kept."""

    def __init__(self, url: str) -> None:
        self.url, self.stop = url, threading.Event()
        self.outcomes: list[tuple[float, str]] = []  # (time, "200" | other status | exception name)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        body = {"model": "chatray", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    code = str(client.post(f"{self.url}/v1/chat/completions", json=body).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                self.outcomes.append((time.monotonic(), code))

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def since(self, t: float) -> Counter:
        return Counter(code for when, code in self.outcomes if when >= t)


def test_a_node_lost_during_serving(nodes):
    """One Generator replica per node under steady load; worker-1 is killed, then comes back. Requests in flight on it
    may fail (counted); the head's replica keeps answering; Serve places a replica on the new node; never a 500."""
    t0 = time.monotonic()
    port = free_port()
    serve = str(Path(sys.executable).parent / "serve")
    dash = nodes["cluster"].dashboard_url
    r = subprocess.run([serve, "deploy", str(_serve_config(nodes, port)), "-a", dash], env=nodes["env"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while sorted(_nodes_of(nodes).get(n, "?") for n in _generator_nodes(nodes)) != ["head", "worker"]:
            assert time.monotonic() < deadline, subprocess.run([serve, "status", "-a", dash], env=nodes["env"],
                                                               capture_output=True, text=True).stdout
            time.sleep(2)
        with _Load(url) as load:
            time.sleep(8)
            before = load.since(0)
            t_kill = time.monotonic()
            _kill_worker(nodes)
            time.sleep(20)
            t_after = time.monotonic()
            time.sleep(10)
            during = load.since(t_kill)
            settled = load.since(t_after)
            _bring_back(nodes)
            deadline = time.monotonic() + 240
            while sorted(_nodes_of(nodes).get(n, "?") for n in _generator_nodes(nodes)) != ["head", "worker"]:
                assert time.monotonic() < deadline, "Serve placed no replica on the node that came back"
                time.sleep(2)
            t_back = time.monotonic()
            time.sleep(8)
            back = load.since(t_back)
        every = Counter(code for _, code in load.outcomes)
        print(f"serving node loss: before {dict(before)}; from the kill on {dict(during)}; 20 s after it "
              f"{dict(settled)}; replica back after {t_back - t_kill:.0f} s, then {dict(back)}; all {dict(every)}")
        assert "500" not in every, every
        assert set(before) == {"200"} and before["200"] >= 4, before
        assert set(settled) == {"200"} and settled["200"] >= 4, settled  # the head's replica answers
        assert set(back) == {"200"} and back["200"] >= 4, back
    finally:
        subprocess.run([serve, "shutdown", "-y", "-a", dash], env=nodes["env"], capture_output=True, timeout=120)
    print(f"serving node-loss test: {time.monotonic() - t0:.0f} s")
