"""Model presets, HF save/load round trip (safetensors only), clear errors for bad model names."""

from __future__ import annotations

import pytest
import torch

from chatray.errors import ChatrayError
from chatray.model import (
    GPT2_ARCH,
    build_model,
    config_context_length,
    load_model,
    load_model_tokenizer,
    model_context_length,
    resolve_dtype,
    save_model,
    tiny_config,
)


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
    # greedy decoding by hand on the original model: argmax, stopping after EOS (id 0) or 3 new tokens
    want = x[0, :4].tolist()
    for _ in range(3):
        want.append(int(model(torch.tensor([want])).logits[0, -1].argmax()))
        if want[-1] == 0:
            break
    assert out[0].tolist() == want


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


def test_load_model_dtype_device_and_eval_mode(tmp_path):
    model = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32)
    save_model(model, None, tmp_path / "m")
    fp32 = load_model(tmp_path / "m")  # what training's resume gets
    assert (fp32.dtype, fp32.device.type, fp32.training) == (torch.float32, "cpu", False)
    half = load_model(tmp_path / "m", device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    auto = load_model(tmp_path / "m", device="auto", dtype="auto")
    assert auto.dtype == resolve_dtype("auto", auto.device.type)
    with pytest.raises(ValueError, match="dtype must be auto, float32, float16 or bfloat16, got 'int8'"):
        load_model(tmp_path / "m", dtype="int8")


def test_dtype_rule():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bfloat16", "cuda:1") == torch.bfloat16
    if torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_config_context_length_reads_either_name():
    from transformers import GPT2Config, LlamaConfig

    assert config_context_length(GPT2Config(n_positions=256)) == 256
    assert config_context_length(LlamaConfig(max_position_embeddings=4096)) == 4096


def test_loader_refuses_pickled_weights(tmp_path):
    folder = tmp_path / "pickled"
    model = build_model("tiny", vocab_size=300, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32)
    save_model(model, None, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (folder / "train_state.pt").write_bytes(b"optimizer state, not weights")
    with pytest.raises(ChatrayError, match=r"refusing to load pickled weights pytorch_model.bin from "):
        load_model(folder)
    with pytest.raises(ChatrayError, match="no config.json"):
        load_model(tmp_path / "missing")
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ChatrayError, match="no model.safetensors"):
        load_model(folder)


def test_tokenizer_is_loaded_from_the_model_folder(tmp_path):
    from support.checkpoints import make_checkpoint

    folder = make_checkpoint(tmp_path / "ckpt")
    tok = load_model_tokenizer(folder)
    assert tok.chat_template and tok.eos_token_id is not None
    assert tok.decode(tok("hello, how are you?", add_special_tokens=False)["input_ids"]) == "hello, how are you?"
    with pytest.raises(ChatrayError, match="cannot load the tokenizer"):
        load_model_tokenizer(tmp_path / "missing")
