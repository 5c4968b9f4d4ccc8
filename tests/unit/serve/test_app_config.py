"""serve_config.yaml is a valid Ray Serve config for chatray's app; build_app names bad args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatray.errors import ChatrayError
from chatray.serve.app import ServeArgs, build_app, model_name_from_checkpoint, parse_args

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "serve_config.yaml"


def test_serve_config_is_valid_and_documented():
    from ray.serve.schema import ServeDeploySchema

    from chatray.serve.launch import _deployment_options, load_serve_config

    text = CONFIG.read_text(encoding="utf-8")
    assert text.startswith("# Launch") and "chatray serve --config serve_config.yaml" in text.splitlines()[0]
    assert "serve deploy serve_config.yaml" in text
    data = load_serve_config(CONFIG)
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.request_timeout_s
    (app,) = schema.applications
    assert app.import_path == "chatray.serve.app:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.checkpoint.endswith(":best") and args.api_key_env
    opts = _deployment_options(data["applications"][0])
    assert set(opts) == {"Ingress", "Generator"}
    gen = opts["Generator"]
    auto = gen["autoscaling_config"]
    assert auto["min_replicas"] < auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    assert gen["max_queued_requests"] > 0 and gen["max_ongoing_requests"] >= args.max_batch_size
    assert "num_gpus: 1" in text  # the commented GPU profile
    assert {"health_check_period_s", "health_check_timeout_s", "ray_actor_options"} <= set(gen)
    # the app's Ingress timeout fires before the proxy's, so clients get an OpenAI-shaped 408
    assert args.request_timeout_s < schema.http_options.request_timeout_s
    # every option is one that Deployment.options accepts
    app_obj = __import__("chatray.serve.app", fromlist=["build_app_with_options"]).build_app_with_options(
        {"checkpoint": "/tmp/x"}, opts)
    assert type(app_obj).__name__ == "Application"


def test_build_app_returns_an_application_without_ray_running():
    app = build_app({"checkpoint": "/some/run:best", "temperature": 0.2})
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize(("args", "words"), [
    ({"temperature": 3}, "args.temperature"),
    ({"max_batch_size": 0}, "args.max_batch_size"),
    ({"checkpiont": "x"}, "args.checkpiont: unknown arg"),
    ({"checkpoint": "  "}, "args.checkpoint"),
    ({"api_key_env": "NOT A NAME"}, "args.api_key_env"),
    ({"dtype": "int8"}, "args.dtype"),
    ({"top_p": "high"}, "args.top_p"),
    ({"max_body_bytes": 3 << 20}, "args.max_body_bytes"),  # over what Serve's gRPC hop carries
])
def test_bad_args_are_named(args, words):
    with pytest.raises(ChatrayError, match=words.replace(".", r"\.")):
        build_app(args)


def test_bad_config_file_is_reported(tmp_path):
    from chatray.serve.launch import load_serve_config

    data = yaml.safe_load(CONFIG.read_text())
    data["applications"][0]["args"]["max_tokens"] = -5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ChatrayError, match=r"applications\[0\].*args\.max_tokens"):
        load_serve_config(bad)
    data["http_options"]["port"] = "eighty"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ChatrayError, match="http_options.port"):
        load_serve_config(bad)
    with pytest.raises(ChatrayError, match="not found"):
        load_serve_config(tmp_path / "missing.yaml")


def test_model_names():
    assert model_name_from_checkpoint("/x/checkpoints/tiny-demo:best") == "tiny-demo"
    assert model_name_from_checkpoint("s3://b/p/tiny-demo/checkpoint_000003/") == "tiny-demo"
    assert model_name_from_checkpoint("/x/my-model") == "my-model"
    assert parse_args({"checkpoint": "a"}).model_name is None
