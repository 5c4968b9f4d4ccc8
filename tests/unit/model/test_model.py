"""Model presets, HF save/load round trip (safetensors only), clear errors for bad model names."""

from __future__ import annotations

import pytest
import torch

from chatray.errors import ChatrayError
from chatray.model import GPT2_ARCH, build_model, load_model, model_context_length, save_model, tiny_config


def test_tiny_config_shape_and_special_ids():
    cfg = tiny_config(1000, 128, eos_token_id=3)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (4, 4, 256, 128, 1000)
    assert cfg.eos_token_id == cfg.bos_token_id == cfg.pad_token_id == 3
    assert cfg.resid_pdrop == 0.0
    big = tiny_config(50257, 1024, eos_token_id=50256, arch="gpt2")
    assert (big.n_layer, big.n_head, big.n_embd) == GPT2_ARCH["gpt2"][:3]


def test_build_save_load_round_trip(tmp_path):
    model = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32)
    assert model.config._attn_implementation == "sdpa"
    save_model(model, None, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    back = load_model(tmp_path / "m")
    x = torch.randint(0, 300, (2, 16))
    model.eval()
    torch.testing.assert_close(model(x).logits, back(x).logits)
    assert back.generation_config.eos_token_id == 0
    out = back.generate(x[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] <= 7


def test_seeded_init_is_reproducible():
    a = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32, seed=5)
    b = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    model = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ChatrayError, match="safetensors only"):
        load_model(folder)
    with pytest.raises(ChatrayError, match="safetensors only"):
        build_model(str(folder), vocab_size=300, block_size=32, eos_token_id=0)


def test_pretrained_folder_context_is_checked(tmp_path):
    small = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32)
    save_model(small, None, tmp_path / "ctx32")
    assert model_context_length(str(tmp_path / "ctx32")) == 32
    assert model_context_length("gpt2") == 1024
    assert model_context_length("tiny") is None
    with pytest.raises(ChatrayError, match="block size 64 exceeds the context"):
        build_model(str(tmp_path / "ctx32"), vocab_size=300, block_size=64, eos_token_id=0)
    m = build_model(str(tmp_path / "ctx32"), vocab_size=300, block_size=32, eos_token_id=0, dropout=0.2)
    assert m.config.resid_pdrop == 0.2


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ChatrayError, match="model folder not found"):
        build_model(str(tmp_path / "nope"), vocab_size=300, block_size=32, eos_token_id=0)
    with pytest.raises(ChatrayError, match="cannot load model 'no-such-org/no-such-model'"):
        build_model("no-such-org/no-such-model", vocab_size=300, block_size=32, eos_token_id=0)  # HF_HUB_OFFLINE=1
