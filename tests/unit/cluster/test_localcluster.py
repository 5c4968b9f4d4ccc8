"""chatray.localcluster without Ray: which processes belong to a local cluster, stopping exactly those, the state
file, settings from the environment. Real processes (``sleep``, small Pythons) stand in for Ray's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port

from chatray.errors import ChatrayError
from chatray.localcluster import (
    MARKER_ENV,
    LocalCluster,
    add_local_worker,
    cluster_processes,
    resources_from_env,
    start_local_cluster,
    stop_cluster_processes,
    stop_local_cluster,
    worker_node,
)
from chatray.localcluster.processes import kill_node, node_processes, psutil_module
from chatray.localcluster.settings import NODE_ENV, state_file
from chatray.localcluster.start import _settle_host, _warn_if_exposed, _worker_command
from chatray.localcluster.state import read_state, record_cluster, write_env_file

SLEEP = "import time; time.sleep(300)"


def cli_source() -> str:
    """The installed Ray's ``ray start`` source file, found without importing Ray."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    return str(Path(list(spec.submodule_search_locations)[0]) / "scripts" / "scripts.py")


@pytest.fixture
def spawn() -> Iterator:
    """spawn(args, marker=None, **popen_kwargs) -> Popen; every process is killed at the end."""
    procs: list[subprocess.Popen] = []

    def _spawn(args: list[str], marker: Path | None = None, **kw) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        if marker is not None:
            env[MARKER_ENV] = str(marker)
        p = subprocess.Popen(args, env=env, **kw)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """CHATRAY_HOME in tmp_path (the state file) and a token in the environment (no ~/.ray/auth_token written)."""
    monkeypatch.setenv("CHATRAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "test-token")
    for name in ("RAY_AUTH_MODE", "CHATRAY_RAY_TEMP_DIR", "CHATRAY_RAY_PORT", "CHATRAY_DASHBOARD_PORT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def _running(pid: int) -> bool:
    psutil = psutil_module()
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pids(procs) -> set[int]:
    return {p.pid for p in procs}


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_stops_the_clusters_processes_and_their_children_and_nothing_else(tmp_path, spawn):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # A's marked process with a child that lost the marker (Ray's workers rename themselves and their environ).
    a_parent = spawn(["bash", "-c", f"env -u {MARKER_ENV} sleep 300 & echo $!; wait"], marker=a,
                     stdout=subprocess.PIPE, text=True)
    a_child = int(a_parent.stdout.readline())
    # An unmarked Ray process of A, naming it as Ray does (--temp_dir=..., --session-dir=...).
    a_flag = spawn([sys.executable, "-c", SLEEP, f"--session-dir={a}/session_2026-01-01_00-00-00_000000_1"])
    b_marked = spawn(["sleep", "300"], marker=b)
    # Names A, but not as Ray's dirs: someone tailing a log is not part of the cluster.
    tail = spawn([sys.executable, "-c", SLEEP, f"--follow={a}/session_latest/logs/raylet.out", str(a)])
    unmarked = spawn(["sleep", "300"])
    _wait_until(lambda: all(_running(p) for p in (a_child, a_flag.pid, b_marked.pid, tail.pid, unmarked.pid)))

    assert _pids(cluster_processes(a)) == {a_parent.pid, a_child, a_flag.pid}
    assert _pids(cluster_processes(b)) == {b_marked.pid}

    stopped, killed = stop_cluster_processes(a, grace_s=3.0)

    assert (stopped, killed) == (3, [])
    assert not any(_running(pid) for pid in (a_parent.pid, a_child, a_flag.pid))
    assert all(_running(pid) for pid in (b_marked.pid, tail.pid, unmarked.pid))
    assert cluster_processes(a) == []


def test_sigkill_after_the_grace_period(tmp_path, spawn):
    stubborn = spawn([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('ready', flush=True); time.sleep(300)"], marker=tmp_path, stdout=subprocess.PIPE,
                     text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on

    t = time.monotonic()
    stopped, killed = stop_cluster_processes(tmp_path, grace_s=0.9)

    assert stopped == 1 and len(killed) == 1 and time.monotonic() - t < 10
    assert stubborn.wait(timeout=5) == -9


def test_the_temp_dir_matches_through_a_symlink(tmp_path, spawn):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    p = spawn(["sleep", "300"], marker=tmp_path / "link")
    _wait_until(lambda: _running(p.pid))
    assert p.pid in _pids(cluster_processes(real))


def test_rays_shared_default_temp_dir_matches_by_marker_only(spawn):
    # Every ray.init() on the machine names /tmp/ray: only processes marked by chatray count there.
    flagged = spawn([sys.executable, "-c", SLEEP, "--temp-dir=/tmp/ray"])
    marked = spawn(["sleep", "300"], marker=Path("/tmp/ray"))
    _wait_until(lambda: _running(flagged.pid) and _running(marked.pid))
    found = _pids(cluster_processes("/tmp/ray"))  # listed only, nothing is stopped
    assert marked.pid in found and flagged.pid not in found


def test_never_the_caller_or_its_ancestors(tmp_path):
    # A marked process (a job on the cluster) that asks for the cluster's processes is not among them.
    code = ("import os; from chatray.localcluster import cluster_processes as c; "
            f"print(os.getpid() in {{p.pid for p in c({str(tmp_path)!r})}})")
    env = {**os.environ, MARKER_ENV: str(tmp_path)}
    out = subprocess.run(["bash", "-c", f'{sys.executable} -c "{code}"; true'], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_down_stops_a_recorded_cluster_and_forgets_it(tmp_path, home, spawn):
    cluster = LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), temp_dir=str(tmp_path / "ray"))
    cluster.ray_temp_dir.mkdir()
    cluster.env_file.write_text("export RAY_AUTH_MODE=token\n")
    record_cluster(cluster)
    ours = spawn(["sleep", "300"], marker=cluster.ray_temp_dir)
    other = spawn(["sleep", "300"], marker=tmp_path / "other")
    _wait_until(lambda: _running(ours.pid) and _running(other.pid))

    lines = stop_local_cluster(cluster=cluster, grace_s=3.0)

    assert any("1 processes of" in line for line in lines), lines
    assert not _running(ours.pid) and _running(other.pid)
    assert not state_file().exists() and not cluster.env_file.exists()


def test_down_without_a_record_leaves_the_processes_unless_forced(tmp_path, home, spawn):
    cluster = LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), temp_dir=str(tmp_path / "ray"))
    p = spawn(["sleep", "300"], marker=cluster.ray_temp_dir)
    _wait_until(lambda: _running(p.pid))

    lines = stop_local_cluster(cluster=cluster, grace_s=3.0)
    assert _running(p.pid) and "--force" in lines[0]

    stop_local_cluster(cluster=cluster, force=True, grace_s=3.0)
    assert not _running(p.pid)


def test_down_reads_the_recorded_addresses_of_the_configured_temp_dir(tmp_path, home, spawn, monkeypatch):
    temp = tmp_path / "ray"
    record_cluster(LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), temp_dir=str(temp)))
    monkeypatch.setenv("CHATRAY_RAY_TEMP_DIR", str(temp))
    p = spawn(["sleep", "300"], marker=temp)
    _wait_until(lambda: _running(p.pid))

    stop_local_cluster(grace_s=3.0)  # `chatray down`

    assert not _running(p.pid) and not state_file().exists()


@pytest.mark.parametrize("text", ["{}", "null", "[]", '{"clusters": []}', '{"address": "127.0.0.1:6379"}', "{bad"])
def test_a_state_file_chatray_did_not_write_records_no_cluster(home, text):
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(text, encoding="utf-8")
    assert read_state() == {}
    cluster = LocalCluster(temp_dir=str(home / "ray"))
    record_cluster(cluster)  # and the next record replaces it
    assert list(read_state()) == [str(cluster.ray_temp_dir)]


def test_settings_from_the_environment():
    c = LocalCluster.from_env({"CHATRAY_RAY_PORT": "6380", "CHATRAY_DASHBOARD_PORT": "8266",
                               "CHATRAY_RAY_TEMP_DIR": "/tmp/x", "CHATRAY_DASHBOARD_HOST": "0.0.0.0"})
    assert (c.address, c.dashboard_url, c.ray_temp_dir) == ("127.0.0.1:6380", "http://127.0.0.1:8266", Path("/tmp/x"))
    assert LocalCluster.from_env({}).address == "127.0.0.1:6379"
    with pytest.raises(ValueError, match="CHATRAY_RAY_PORT must be a TCP port.*'x'.*CHATRAY_DASHBOARD_PORT"):
        LocalCluster.from_env({"CHATRAY_RAY_PORT": "x", "CHATRAY_DASHBOARD_PORT": "70000"})


def test_cpus_and_gpus_from_the_environment(monkeypatch):
    monkeypatch.delenv("CHATRAY_NUM_GPUS", raising=False)
    monkeypatch.setenv("CHATRAY_NUM_CPUS", " 2 ")
    assert resources_from_env() == {"num_cpus": 2, "num_gpus": None}
    monkeypatch.setenv("CHATRAY_NUM_GPUS", "1.5")
    with pytest.raises(ChatrayError, match=r"CHATRAY_NUM_GPUS must be a whole number, got '1.5'"):
        resources_from_env()


def test_start_refuses_to_turn_token_auth_off(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ChatrayError, match="always uses token authentication"):
        start_local_cluster(LocalCluster(gcs_port=free_port(), dashboard_port=free_port()))


def test_start_refuses_a_temp_dir_too_long_for_rays_sockets(home):
    long_dir = "/tmp/" + "x" * 60
    with pytest.raises(ChatrayError, match="too long"):
        start_local_cluster(LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), temp_dir=long_dir))
    assert not Path(long_dir).exists()


def test_a_second_node_needs_a_head_that_answers(home):
    with pytest.raises(ChatrayError, match="no Ray cluster answers") as e:
        add_local_worker(LocalCluster(gcs_port=free_port(), dashboard_port=free_port()))
    assert "start the head first" in e.value.hint


def test_a_worker_node_of_a_loopback_head_starts_through_the_relaxed_cli(tmp_path):
    """On loopback the node joins through chatray.localcluster.worker_node (Ray's CLI refuses it otherwise), with
    the node address 127.0.0.1; an exposed head gets plain `ray start`."""
    cmd = _worker_command(LocalCluster(gcs_port=6390, temp_dir=str(tmp_path)), ["--num-cpus", "1"])
    assert cmd[:2] == [sys.executable, worker_node.__file__]
    assert "--address=127.0.0.1:6390" in cmd and "--node-ip-address=127.0.0.1" in cmd and cmd[-2:] == ["--num-cpus",
                                                                                                         "1"]
    exposed = _worker_command(LocalCluster(host="192.168.1.5", temp_dir=str(tmp_path)), [])
    assert exposed[1] == "start" and "--node-ip-address=192.168.1.5" in exposed


def test_the_relaxed_cli_keeps_ray_on_loopback():
    """Only `ray start`'s own view of the switch changes: the module that picks the node's address (and so where its
    servers bind) still sees local-only mode. Fails when a Ray upgrade moves the check this relies on."""
    code = ("import ray._private.ray_constants as c, ray._private.services as s, ray.scripts.scripts as cli\n"
            "from chatray.localcluster.worker_node import relax_worker_check\n"
            "assert not cli.ray_constants.ENABLE_RAY_CLUSTER\n"
            "relax_worker_check()\n"
            "print(cli.ray_constants.ENABLE_RAY_CLUSTER, c.ENABLE_RAY_CLUSTER, s.get_node_ip_address(),\n"
            "      s.resolve_ip_for_localhost('127.0.0.1'),\n"
            "      cli.ray_constants.NUM_PORT_RETRIES == c.NUM_PORT_RETRIES)\n")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "127.0.0.1", "127.0.0.1", "True"]
    source = Path(cli_source()).read_text()
    assert "if not ray_constants.ENABLE_RAY_CLUSTER:" in source  # the one refusal that worker_node relaxes


def test_kill_node_kills_that_nodes_processes_and_no_other(tmp_path):
    """A node's processes carry CHATRAY_LOCAL_NODE; their children (Ray's workers) go with them."""
    temp = tmp_path / "ray"
    base = {k: v for k, v in os.environ.items() if k not in (MARKER_ENV, NODE_ENV)}
    parent = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);" \
             " time.sleep(300)"
    procs = [subprocess.Popen([sys.executable, "-c", parent], env={**base, MARKER_ENV: str(temp), NODE_ENV: "w-1"}),
             subprocess.Popen([sys.executable, "-c", SLEEP], env={**base, MARKER_ENV: str(temp)}),
             subprocess.Popen([sys.executable, "-c", SLEEP], env={**base, MARKER_ENV: str(temp), NODE_ENV: "w-2"})]
    try:
        _wait_until(lambda: len(psutil_module().Process(procs[0].pid).children()) == 1)
        child = psutil_module().Process(procs[0].pid).children()[0].pid
        assert _pids(node_processes(temp, "w-1")) == {procs[0].pid, child}
        assert sorted(kill_node(temp, "w-1")) == sorted([procs[0].pid, child])
        procs[0].wait(timeout=10)
        _wait_until(lambda: not _running(child))
        assert _running(procs[1].pid) and _running(procs[2].pid)
        assert kill_node(temp, "w-1") == []
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_env_file_keeps_clients_of_a_loopback_cluster_on_loopback(home, tmp_path):
    """A client without Ray's local-only switch swaps 127.0.0.1 for the machine's IP, where nothing listens."""
    text = write_env_file(LocalCluster(temp_dir=str(tmp_path / "ray"))).read_text()
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n" in text and "export RAY_ADDRESS=127.0.0.1:6379\n" in text
    text = write_env_file(LocalCluster(host="192.168.1.5", temp_dir=str(tmp_path / "ray"))).read_text()
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1\n" in text and "export RAY_ADDRESS=192.168.1.5:6379\n" in text


def test_an_exposed_cluster_is_warned_about_in_one_line_each(capsys):
    _warn_if_exposed(LocalCluster())
    assert capsys.readouterr().err == ""  # loopback: nothing to say
    _warn_if_exposed(LocalCluster(host="192.168.1.5", dashboard_host="0.0.0.0"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: ") for line in lines)
    assert "(address 192.168.1.5)" in lines[0] and "dashboard" in lines[1] and "(address 0.0.0.0)" in lines[1]


@pytest.mark.parametrize("host", ["localhost", "127.0.1.1", "::1"])
def test_every_loopback_name_becomes_127_0_0_1(host):
    """Ray binds its gRPC servers to loopback only for a node address of exactly 127.0.0.1."""
    cluster = LocalCluster(host=host)
    _settle_host(cluster)
    assert cluster.host == "127.0.0.1"


def test_a_wildcard_host_advertises_this_machines_address():
    given = LocalCluster(host="192.168.1.5")
    _settle_host(given)
    assert given.host == "192.168.1.5"  # an address given is kept
    cluster = LocalCluster(host="0.0.0.0")
    try:
        _settle_host(cluster)
    except ChatrayError as e:  # a machine without a default route: said, with the way out
        assert "CHATRAY_RAY_HOST=<this machine's address>" in e.hint
        return
    assert cluster.host not in ("0.0.0.0", "127.0.0.1") and cluster.host.count(".") == 3
