"""Vocabulary padding: zero rows while training, the tokenizer-sized model everywhere else."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from chatray.errors import ChatrayError
from chatray.model import build_model, load_model, save_model, tiny_config
from chatray.model.vocab import pad_vocab, padded_rows, padded_vocab_size, real_vocab_size, unpadded_vocab

VOCAB = 300  # not a multiple of 128: padding adds 84 rows


def _model(vocab: int = VOCAB):
    return build_model("tiny", vocab_size=vocab, block_size=32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32, seed=0)


def test_padded_size():
    assert [padded_vocab_size(v, 128) for v in (50257, 50304, 1, 128)] == [50304, 50304, 128, 128]
    assert padded_vocab_size(50257, 1) == 50257


def test_pad_adds_zero_rows_shared_by_input_and_output():
    model = _model()
    before = model.get_input_embeddings().weight.detach().clone()
    assert pad_vocab(model, 128) == 384
    w = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is w and w.shape == (384, 32)
    assert model.config.vocab_size == 384 and real_vocab_size(model) == VOCAB
    assert padded_rows(model) is w
    torch.testing.assert_close(w[:VOCAB].detach(), before, rtol=0, atol=0)
    assert not w[VOCAB:].any()
    ids = torch.randint(0, VOCAB, (2, 16))
    assert model(input_ids=ids).logits.shape == (2, 16, 384)


def test_pad_leaves_an_aligned_vocab_alone_and_repads_from_the_real_rows():
    model = _model(256)
    w = model.get_input_embeddings().weight
    assert pad_vocab(model, 128) == 256 and model.get_input_embeddings().weight is w and padded_rows(model) is None
    model = _model()
    pad_vocab(model, 128)
    assert pad_vocab(model, 64) == 320 and real_vocab_size(model) == VOCAB
    assert model.get_input_embeddings().weight.shape[0] == 320


def test_unpadded_block_trims_then_restores():
    model = _model()
    pad_vocab(model, 128)
    full = model.get_input_embeddings().weight
    ids = torch.randint(0, VOCAB, (1, 8))
    padded_logits = model(input_ids=ids).logits
    with unpadded_vocab(model) as m:
        assert m.config.vocab_size == VOCAB and m.get_output_embeddings().weight.shape[0] == VOCAB
        torch.testing.assert_close(m(input_ids=ids).logits, padded_logits[..., :VOCAB])
    assert model.get_input_embeddings().weight is full and model.get_output_embeddings().weight is full
    assert model.config.vocab_size == 384


def test_untied_output_layer_cannot_be_padded():
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(tiny_config(VOCAB, 32, eos_token_id=0, n_layer=1, n_head=2, n_embd=32,
                                        tie_word_embeddings=False))
    with pytest.raises(ChatrayError, match="pad the vocabulary"):
        pad_vocab(model, 128)
    with pytest.raises(ValueError, match=">= 1"):
        pad_vocab(_model(), 0)


def test_a_padded_model_is_saved_tokenizer_sized(tmp_path):
    model = _model()
    pad_vocab(model, 128)
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB:] = 1.0  # whatever the padding holds, it is not saved
    save_model(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == VOCAB
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if "wte" in k or "lm_head" in k}
    assert shapes and all(s[0] == VOCAB for s in shapes.values()), shapes
    assert model.config.vocab_size == 384  # the training model stays padded
    loaded = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits[..., :VOCAB])
