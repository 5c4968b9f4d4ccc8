"""A quiet terminal: chatray's tagged lines shown, Ray's output in a log file, --verbose keeps it all."""

from __future__ import annotations

import inspect
import io
import logging
import warnings

import pytest

from chatray import raylogs
from chatray.raylogs import QuietOutput, chatray_text, filter_log_lines, quiet_terminal


@pytest.fixture(autouse=True)
def _logs_here(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRAY_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("CHATRAY_VERBOSE", raising=False)


def test_chatray_lines_lose_rays_prefix_and_colours():
    line = "\x1b[36m(RayTrainWorker pid=24910)\x1b[0m [chatray train] step 10/40 | loss 7.98"
    assert chatray_text(line) == "[chatray train] step 10/40 | loss 7.98"
    assert chatray_text("(SplitCoordinator pid=1) Execution plan of Dataset train_0: ...") is None


def test_a_log_is_split_between_the_terminal_and_the_file():
    log = io.StringIO()
    shown = filter_log_lines([
        "2026-12-04 23:55:11,983\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
        "(RayTrainWorker pid=7) [chatray train] step 1/2 | loss 5.0",
        "(TrainController pid=8) Attempting to start training worker group of size 1",
        "error: data.path: no such dataset", "hint: run chatray data prepare first", "summary: {}",
    ], log)
    assert shown == ["[chatray train] step 1/2 | loss 5.0", "error: data.path: no such dataset",
                     "hint: run chatray data prepare first"]
    assert log.getvalue().count("\n") == 6  # the file has every line


def test_quiet_output_sends_ray_loggers_warnings_and_worker_lines_to_the_file(capsys):
    ray_logger = logging.getLogger("ray.chatray_test")
    ray_logger.addHandler(logging.StreamHandler())  # a terminal handler, as Ray's loggers have
    ray_logger.setLevel(logging.INFO)
    with quiet_terminal("unit") as out:
        assert raylogs.active_output() is out
        out.start()
        ray_logger.warning("Token authentication is enabled for this Ray cluster")
        warnings.warn("ExecutionOptions.exclude_resources is deprecated", UserWarning, stacklevel=1)
        out._worker_lines({"pid": 42, "actor_name": "RayTrainWorker", "is_err": False,
                           "lines": ["Moving model to device: cpu", "[chatray train] step 3/9 | loss 4.2"]})
        path = out.path
    captured = capsys.readouterr()
    assert raylogs.active_output() is None
    assert captured.out == "[chatray train] step 3/9 | loss 4.2\n"
    assert captured.err == f"[chatray] Ray's own output goes to {path} (--verbose shows it here)\n"
    text = path.read_text()
    for expected in ("Token authentication is enabled", "exclude_resources is deprecated",
                     "(RayTrainWorker pid=42) Moving model to device: cpu",
                     "(RayTrainWorker pid=42) [chatray train] step 3/9"):
        assert expected in text
    # Stopped: Ray's logger has its terminal handler back, and nothing of ours.
    assert [type(h) for h in ray_logger.handlers] == [logging.StreamHandler]


def test_verbose_leaves_everything_on_the_terminal(monkeypatch):
    monkeypatch.setenv("CHATRAY_VERBOSE", "1")
    out = QuietOutput("unit").start()
    assert not out.active and out.path is None


def test_old_log_files_are_pruned(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    for i in range(raylogs._KEEP_LOGS + 5):
        (folder / f"old-{i:03d}.log").write_text("x")
    raylogs.new_log_file("unit")
    assert len(list(folder.glob("*.log"))) == raylogs._KEEP_LOGS


@pytest.fixture
def dispatcher(monkeypatch):
    """Ray's stdstream dispatcher with no handler (a Ray that another test started here keeps its own)."""
    from ray._private import worker

    monkeypatch.setattr(worker.global_worker_stdstream_dispatcher, "handlers", [])
    return worker.global_worker_stdstream_dispatcher


def test_the_installed_ray_still_routes_worker_output_through_the_dispatcher(dispatcher):
    """QuietOutput swaps a handler of an internal of Ray's: fail here, not silently, if an upgrade changes it."""
    from ray._private import worker

    source = inspect.getsource(worker)
    assert f'"{raylogs._DISPATCHER_HANDLER}"' in source and "global_worker_stdstream_dispatcher.emit" in source
    for name in raylogs._RAY_PRINTERS:  # called by name at print time, so replacing the attribute reroutes them
        assert callable(getattr(worker, name)) and f"{name}(" in source
    seen = []
    dispatcher.add_handler("chatray-test", seen.append)
    try:
        dispatcher.emit({"lines": ["x"]})
    finally:
        dispatcher.remove_handler("chatray-test")
    assert seen == [{"lines": ["x"]}]


def test_rays_error_channel_is_rerouted_while_quiet_and_restored_after(capsys, dispatcher):
    from ray._private import worker

    originals = {name: getattr(worker, name) for name in raylogs._RAY_PRINTERS}
    rays_printer = []
    dispatcher.add_handler(raylogs._DISPATCHER_HANDLER, rays_printer.append)
    with quiet_terminal("unit") as out:
        out.start()
        out.attach_workers()
        worker.print_to_stdstream({"lines": ["Task ServeController.graceful_shutdown failed."], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
        dispatcher.emit({"lines": ["[chatray serve] replica ready"], "pid": 3, "actor_name": "ServeReplica",
                         "is_err": False})
        path = out.path
    assert capsys.readouterr().out == "[chatray serve] replica ready\n"
    assert "(worker pid=raylet) Task ServeController.graceful_shutdown failed." in path.read_text()
    assert {name: getattr(worker, name) for name in raylogs._RAY_PRINTERS} == originals
    assert rays_printer == []  # Ray's printer saw nothing while quiet...
    dispatcher.emit({"lines": ["after"]})
    assert rays_printer == [{"lines": ["after"]}]  # ...and has its lines back after
