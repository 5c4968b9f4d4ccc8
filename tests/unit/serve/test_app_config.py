"""serve_config.yaml is a valid Ray Serve config for chatray's app; build_app names bad args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatray.errors import ChatrayError
from chatray.serve.app import ServeArgs, build_app, model_name_from_checkpoint, parse_args
from chatray.serve.settings import GeneratorSettings, IngressSettings, SamplingDefaults, ServedModel

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "serve_config.yaml"


def test_serve_config_is_valid_and_documented(tiny_checkpoint):
    from ray.serve.schema import ServeDeploySchema

    from chatray.serve.launch import _deployment_options, load_serve_config

    text = CONFIG.read_text(encoding="utf-8")
    assert text.startswith("# Launch") and "chatray serve --config serve_config.yaml" in text.splitlines()[0]
    assert "serve deploy serve_config.yaml" in text
    data = load_serve_config(CONFIG)
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.request_timeout_s == 120
    (app,) = schema.applications
    assert app.import_path == "chatray.serve.app:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.checkpoint == ".demo/checkpoints/tiny-demo:best" and args.api_key_env == "CHATRAY_API_KEY"
    opts = _deployment_options(data["applications"][0])
    assert set(opts) == {"Ingress", "Generator"}
    gen = opts["Generator"]
    auto = gen["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 2, 8)
    assert (gen["max_queued_requests"], gen["max_ongoing_requests"], args.max_batch_size) == (64, 32, 16)
    assert gen["max_ongoing_requests"] >= args.max_batch_size  # a full batch plus as many waiting
    assert "num_gpus: 1" in text  # the commented GPU profile
    assert (gen["health_check_period_s"], gen["health_check_timeout_s"]) == (10, 30)
    assert gen["ray_actor_options"] == {"num_cpus": 1}
    # the app's Ingress timeout fires before the proxy's, so clients get an OpenAI-shaped 408
    assert (args.request_timeout_s, schema.http_options.request_timeout_s) == (100, 120)
    assert args.request_timeout_s < schema.http_options.request_timeout_s
    # every option is one that Deployment.options accepts
    app_obj = __import__("chatray.serve.app", fromlist=["build_app_with_options"]).build_app_with_options(
        {"checkpoint": str(tiny_checkpoint)}, opts)
    assert type(app_obj).__name__ == "Application"


def test_build_app_returns_an_application_without_ray_running(tiny_checkpoint):
    app = build_app({"checkpoint": str(tiny_checkpoint), "temperature": 0.2})
    assert type(app).__name__ == "Application"


def test_build_app_names_a_checkpoint_that_is_not_there(tmp_path):
    with pytest.raises(ChatrayError, match=r"checkpoint not found: .*/nowhere:best"):
        build_app({"checkpoint": str(tmp_path / "nowhere") + ":best"})


@pytest.mark.parametrize(("args", "words"), [
    ({"temperature": 3}, "args.temperature"),
    ({"max_batch_size": 0}, "args.max_batch_size"),
    ({"checkpiont": "x"}, "args.checkpiont: unknown arg"),
    ({"checkpoint": "  "}, "args.checkpoint"),
    ({"api_key_env": "NOT A NAME"}, "args.api_key_env"),
    ({"api_key_file": "keys/api_key"}, "args.api_key_file: must be an absolute path"),
    ({"dtype": "int8"}, "args.dtype"),
    ({"top_p": "high"}, "args.top_p"),
    ({"max_body_bytes": 3 << 20}, "args.max_body_bytes"),  # over what Serve's gRPC hop carries
    ({"max_n": 0}, "args.max_n"),
    ({"max_batch_size": 64, "max_num_batched_tokens": 64}, "args.max_num_batched_tokens: must exceed max_batch_size"),
    ({"gpu_memory_utilization": 1.5}, "args.gpu_memory_utilization"),
    ({"max_model_len": 2}, "args.max_model_len"),
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


def test_each_deployment_gets_typed_settings_built_from_the_args(tmp_path, monkeypatch):
    """What serve_config.yaml's args give each part of the app (the values `chatray serve` users get)."""
    from support.checkpoints import make_checkpoint

    monkeypatch.chdir(tmp_path)  # a relative checkpoint is resolved where the app is built
    make_checkpoint(tmp_path / ".demo/checkpoints/tiny-demo/checkpoint_00000001")
    monkeypatch.setenv("CHATRAY_API_KEY", "secret")
    args = ServeArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])
    sampling = SamplingDefaults(max_tokens=128, temperature=0.7, top_p=0.95, top_k=0, repetition_penalty=1.1)
    assert args.sampling_defaults() == sampling
    pinned = ServedModel(requested=".demo/checkpoints/tiny-demo:best", kind="checkpoint",
                         location=str(tmp_path / ".demo/checkpoints/tiny-demo/checkpoint_00000001"),
                         run="tiny-demo", step=1, eval_loss=5.0)
    assert args.generator_settings() == GeneratorSettings(
        model=pinned, model_name="tiny-demo", cache_dir=None,
        device="auto", dtype="auto", max_batch_size=16, max_model_len=None, max_num_batched_tokens=2048,
        gpu_memory_utilization=0.9, cuda_graphs=True, batch_wait_timeout_s=0.0, step_delay_s=0.0,
        sampling=sampling, max_n=4)
    # The key's whereabouts travel, never the key: seen here, it is required in the replicas.
    assert args.ingress_settings() == IngressSettings(
        api_key_env="CHATRAY_API_KEY", api_key_file=None, require_api_key=True, max_body_bytes=1 << 20,
        request_timeout_s=100.0, retry_after_s=1.0, model_name="tiny-demo")
    assert "secret" not in repr(args.ingress_settings())
    monkeypatch.setenv("CHATRAY_API_KEY", "")
    assert args.ingress_settings().require_api_key is False  # empty = no auth


def test_an_api_key_file_is_required_in_the_replicas_and_its_content_never_read_here(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATRAY_API_KEY", raising=False)
    missing = tmp_path / "nowhere" / "api_key"  # may exist only on the replicas' nodes
    settings = parse_args({"checkpoint": "/c", "api_key_file": f" {missing} "}).ingress_settings()
    assert (settings.api_key_file, settings.require_api_key) == (str(missing), True)
    assert parse_args({"checkpoint": "/c", "api_key_file": "~/key"}).api_key_file == "~/key"  # the replica's home


def test_args_left_out_get_the_serve_args_defaults(tiny_checkpoint):
    args = parse_args({"checkpoint": str(tiny_checkpoint), "api_key_env": None})
    assert args.generator_settings() == GeneratorSettings(
        model=ServedModel(requested=str(tiny_checkpoint), kind="checkpoint", location=str(tiny_checkpoint),
                          run=tiny_checkpoint.parent.name, step=1, eval_loss=5.0),
        model_name=tiny_checkpoint.name, cache_dir=None, device="auto",
        dtype="auto", max_batch_size=16, max_model_len=None, max_num_batched_tokens=2048,
        gpu_memory_utilization=0.9, cuda_graphs=True, batch_wait_timeout_s=0.0, step_delay_s=0.0,
        sampling=SamplingDefaults(max_tokens=256, temperature=0.7, top_p=1.0, top_k=0, repetition_penalty=1.0),
        max_n=4)
    assert args.ingress_settings() == IngressSettings(api_key_env=None, api_key_file=None, require_api_key=False,
                                                      max_body_bytes=1 << 20, request_timeout_s=100.0,
                                                      retry_after_s=1.0, model_name=tiny_checkpoint.name)
    assert parse_args(args) is args  # validated once: a ServeArgs passes through as it is
