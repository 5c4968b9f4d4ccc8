"""TrainStep without Ray: loss falls, accumulation is exact, state round-trips, schedule shape, vocab padding."""

from __future__ import annotations

import io
import math

import pytest
import torch

from chatray.config import FinetuneConfig, from_dict
from chatray.model import build_model, load_model, save_model
from chatray.train.batches import iter_local_batches
from chatray.train.state import rng_state, set_rng_state
from chatray.train.step import StepConfig, TrainStep, lr_multiplier, make_train_step

CPU = torch.device("cpu")


def _model(vocab: int, seed: int = 0):
    return build_model("tiny", vocab_size=vocab, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32,
                       seed=seed)


def _step_cfg(pad_vocab_multiple: int | str = "auto", **train) -> StepConfig:
    """Step settings of a run whose ``train`` section sets ``train`` (the rest: the section's defaults)."""
    return StepConfig.from_config(from_dict(FinetuneConfig, {"train": train,
                                                             "model": {"pad_vocab_multiple": pad_vocab_multiple}}))


def _batches(ds, micro: int = 4, n: int | None = None):
    import json

    vocab = json.loads((ds / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    bs = list(iter_local_batches(str(ds), "train", packing="pack", block_size=32, micro_batch_size=micro, pad_id=0))
    return vocab, bs[:n] if n else bs


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = _step_cfg(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.55)
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg) == pytest.approx(0.1)


def test_loss_falls(small_dataset):
    vocab, batches = _batches(small_dataset)
    step = TrainStep(_model(vocab), _step_cfg(lr=3e-3, warmup_steps=2, max_steps=40), torch.device("cpu"))
    first = step.evaluate(batches[:4])[0]
    for i in range(40):
        step([batches[i % len(batches)]])
    last = step.evaluate(batches[:4])[0]
    assert last < first - 1.0, (first, last)
    assert step.step == 40
    assert math.isfinite(step.flush_loss())


def test_grad_accumulation_matches_one_big_batch(small_dataset):
    """Token-weighted normalisation: 2 micro-batches of 4 == 1 batch of 8 (same update, float tolerance)."""
    vocab, b4 = _batches(small_dataset, micro=4, n=4)
    _, b8 = _batches(small_dataset, micro=8, n=2)
    a = TrainStep(_model(vocab), _step_cfg(grad_accum=2, warmup_steps=0), torch.device("cpu"))
    b = TrainStep(_model(vocab), _step_cfg(grad_accum=1, warmup_steps=0), torch.device("cpu"))
    a([b4[0], b4[1]])
    b([b8[0]])
    for pa, pb in zip(a.raw_model.parameters(), b.raw_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_exhausted_micro_batches(small_dataset):
    vocab, batches = _batches(small_dataset, n=2)
    step = TrainStep(_model(vocab), _step_cfg(grad_accum=2), torch.device("cpu"))
    assert step([None, None]) is None and step.step == 0  # nobody has data: nothing happens
    res = step([batches[0], None])  # data ran out mid-step: the empty slot adds nothing
    assert res is not None and res.loss_tokens == batches[0].n_loss and step.step == 1


def test_state_round_trip_continues_identically(small_dataset):
    """Save after 3 steps, restore into a fresh model: the next 2 steps match the uninterrupted run."""
    vocab, batches = _batches(small_dataset, n=6)
    cfg = _step_cfg(lr=2e-3, warmup_steps=2, max_steps=10)
    run = TrainStep(_model(vocab), cfg, torch.device("cpu"))
    for b in batches[:3]:
        run([b])
    buf = io.BytesIO()
    torch.save({"trainer": run.state_dict(), "rng": rng_state(), "model": run.raw_model.state_dict()}, buf)
    for b in batches[3:5]:
        run([b])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = _model(vocab, seed=123)
    model.load_state_dict(saved["model"])
    resumed = TrainStep(model, cfg, torch.device("cpu"))
    resumed.load_state_dict(saved["trainer"])
    set_rng_state(saved["rng"])
    assert resumed.step == 3
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * lr_multiplier(3, cfg))
    for b in batches[3:5]:
        resumed([b])
    for pa, pb in zip(run.raw_model.parameters(), resumed.raw_model.parameters()):
        torch.testing.assert_close(pa, pb)


def test_step_config_comes_from_the_run_config():
    cfg = from_dict(FinetuneConfig, {"train": {"lr": 3e-4, "global_batch_size": 32, "micro_batch_size": 4,
                                               "grad_clip": 0.5}, "scaling": {"num_workers": 2},
                                     "model": {"compile": True}})
    step_cfg = StepConfig.from_config(cfg)
    assert (step_cfg.lr, step_cfg.grad_clip, step_cfg.grad_accum, step_cfg.compile) == (3e-4, 0.5, 4, True)
    defaults = FinetuneConfig().train
    for name in ("min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2"):
        assert getattr(step_cfg, name) == getattr(defaults, name), name
    assert (step_cfg.precision, StepConfig.from_config(cfg, "cuda").precision) == ("fp32", "bf16")  # auto
    fp32 = from_dict(FinetuneConfig, {"train": {"precision": "fp32"}})
    assert StepConfig.from_config(fp32, "cuda").precision == "fp32"


def test_vocab_padding_setting_resolves_per_device():
    auto = from_dict(FinetuneConfig, {})
    assert (StepConfig.from_config(auto).pad_vocab_multiple, StepConfig.from_config(auto, "cuda").pad_vocab_multiple) \
        == (1, 128)
    assert _step_cfg(pad_vocab_multiple=64).pad_vocab_multiple == 64
    with pytest.raises(ValueError, match="pad_vocab_multiple must be >= 1"):
        from_dict(FinetuneConfig, {"model": {"pad_vocab_multiple": 0}})
    with pytest.raises(ValueError, match="pad_vocab_multiple"):
        from_dict(FinetuneConfig, {"model": {"pad_vocab_multiple": "big"}})


def test_padded_vocab_trains_like_the_unpadded_model(small_dataset):
    """Padding rows change the shapes, not the math: same loss, gradient norm and updates (float tolerance)."""
    vocab, batches = _batches(small_dataset, n=4)
    plain = make_train_step(_model(vocab), _step_cfg(lr=2e-3, warmup_steps=0), CPU)
    padded = make_train_step(_model(vocab), _step_cfg(128, lr=2e-3, warmup_steps=0), CPU)
    assert padded.raw_model.config.vocab_size == -(-vocab // 128) * 128 > vocab == padded.vocab_size
    torch.testing.assert_close(padded.loss_sum(batches[0]), plain.loss_sum(batches[0]))
    for b in batches[:3]:
        plain([b])
        padded([b])
    torch.testing.assert_close(padded.grad_norm, plain.grad_norm, rtol=1e-4, atol=1e-6)
    assert padded.flush_loss() == pytest.approx(plain.flush_loss(), rel=1e-6)
    for pa, pb in zip(padded.raw_model.parameters(), plain.raw_model.parameters()):
        torch.testing.assert_close(pa[: pb.shape[0]], pb, rtol=1e-4, atol=1e-5)
    assert not padded.raw_model.get_input_embeddings().weight[vocab:].any(), "the padding rows got no update"
    assert padded.evaluate(batches)[0] == pytest.approx(plain.evaluate(batches)[0], rel=1e-5)


def test_padded_run_saves_tokenizer_sized_state_and_resumes_padded_or_not(small_dataset, tmp_path):
    """A padded run's weights and optimizer state resume a padded step (a GPU) or an unpadded one (a CPU)."""
    vocab, batches = _batches(small_dataset, n=5)
    cfg = _step_cfg(128, lr=2e-3, warmup_steps=2, max_steps=10)
    run = make_train_step(_model(vocab), cfg, CPU)
    for b in batches[:3]:
        run([b])
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    save_model(run.raw_model, None, tmp_path)
    matrices = [t.shape for s in run.state_dict()["optimizer"]["state"].values() for t in s.values() if t.dim() == 2]
    assert (vocab, 32) in matrices and all(shape[0] != run.raw_model.config.vocab_size for shape in matrices)
    for b in batches[3:5]:
        run([b])

    for step_cfg in (cfg, _step_cfg(lr=2e-3, warmup_steps=2, max_steps=10)):
        buf.seek(0)
        resumed = make_train_step(load_model(tmp_path), step_cfg, CPU)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert resumed.step == 3
        for b in batches[3:5]:
            resumed([b])
        for pa, pb in zip(run.raw_model.parameters(), resumed.raw_model.parameters()):
            torch.testing.assert_close(pa[: pb.shape[0]], pb[: pa.shape[0]], rtol=1e-4, atol=1e-5)


def test_one_worker_group_steps_without_collectives(small_dataset, tmp_path, monkeypatch):
    """Ray Train sets up a process group even for one worker: its steps must not wait on collectives."""
    import torch.distributed as dist

    vocab, batches = _batches(small_dataset, n=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        step = TrainStep(_model(vocab), _step_cfg(), CPU)
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("a collective in a one-worker step"))
        res = step([batches[0]])
        assert res is not None and res.loss_tokens == batches[0].n_loss
        assert math.isfinite(step.flush_loss()) and step.evaluate(batches[1:])[1] == batches[1].n_loss
    finally:
        dist.destroy_process_group()


def test_traced_forward_uses_causal_sdpa_without_a_mask(small_dataset):
    """What torch.compile captures of the step's forward calls SDPA with is_causal and no mask: flash-eligible."""
    vocab, batches = _batches(small_dataset, n=1)
    step = make_train_step(_model(vocab), _step_cfg(), CPU)
    b = batches[0]
    calls = [node.kwargs for g in torch._dynamo.explain(step._loss_impl)(b.input_ids, b.targets).graphs
             for node in g.graph.nodes if "scaled_dot_product_attention" in str(node.target)]
    torch._dynamo.reset()
    assert calls and all(c.get("is_causal") is True and c.get("attn_mask") is None for c in calls), calls
