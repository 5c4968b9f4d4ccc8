"""Chat template, label mask, over-length rule and Unicode round trips."""

from __future__ import annotations

import numpy as np
import pytest

from chatray.data.dataset import IGNORE_INDEX
from chatray.data.encode import EncodeStats, _windows, encode_batch
from chatray.data.tokenizer import (
    CHAT_TEMPLATE,
    EOS,
    load_pretrained_tokenizer,
    render_chat,
    tokenizer_fingerprint,
    train_tokenizer,
)

CONVS = [
    [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field of computer science."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你喜欢什么运动?"},
     {"role": "assistant", "content": "我喜欢足球。"}, {"role": "user", "content": "为什么?"},
     {"role": "assistant", "content": "因为很有趣。"}],
    [{"role": "user", "content": "trailing space "}, {"role": "assistant", "content": " leading space"}],
]
TEXTS = [render_chat(c)[0] for c in CONVS] * 20 + ["hello world, how are you doing today?"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A GPT-2-style tokenizer folder made with save_pretrained (no hub access)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    d = tmp_path_factory.mktemp("gpt2tok")
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS).save_pretrained(d)
    return d


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("gen", [False, True])
def test_python_renderer_matches_jinja_template(tok, conv, gen):
    assert tok.chat_template == CHAT_TEMPLATE
    assert render_chat(conv, add_generation_prompt=gen)[0] == tok.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=gen)


def test_label_mask_exact_positions(tok):
    conv = CONVS[0]
    ids, labels, stats = encode_batch(tok.backend_tokenizer, [conv], max_length=512)
    ids, labels = list(ids[0]), list(labels[0])
    # Same ids as apply_chat_template: serving formats prompts exactly like training did.
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    # Expected: prefix "<|user|>\nWhat is AI?\n<|assistant|>\n" carries no loss; the answer + EOS do; "\n" does not.
    prefix = tok("<|user|>\nWhat is AI?\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    answer = tok("A field of computer science.<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids[: len(prefix)] == prefix
    loss_pos = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert loss_pos == list(range(len(prefix), len(prefix) + len(answer)))
    assert [ids[i] for i in loss_pos] == answer and ids[loss_pos[-1]] == tok.eos_token_id
    assert all(labels[i] == ids[i] for i in loss_pos)
    assert stats.loss_tokens == len(answer)


def test_mask_matches_hf_generation_mask(tok):
    for conv in CONVS:
        ids, labels, _ = encode_batch(tok.backend_tokenizer, [conv], max_length=512)
        ref = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(ids[0]) == ref["input_ids"]
        assert [int(lab != IGNORE_INDEX) for lab in labels[0]] == list(ref["assistant_masks"])


def test_every_assistant_turn_ends_with_eos(tok):
    ids, labels, _ = encode_batch(tok.backend_tokenizer, [CONVS[1]], max_length=512)
    lab = labels[0]
    ends = [i for i in range(len(lab)) if lab[i] != IGNORE_INDEX and (i + 1 == len(lab) or lab[i + 1] == IGNORE_INDEX)]
    assert len(ends) == 2 and all(ids[0][i] == tok.eos_token_id for i in ends)


def test_train_on_all(tok):
    ids, labels, _ = encode_batch(tok.backend_tokenizer, [CONVS[1]], max_length=512, train_on_all=True)
    assert (labels[0] != IGNORE_INDEX).all() and np.array_equal(labels[0], ids[0])


def test_overlength_windows_rule():
    # message token starts at 0, 10, 30, 35; total 50; max 20: [30, 50) fits whole
    w, trunc = _windows(np.array([0, 10, 30, 35]), 50, 20)
    assert w == [(0, 10), (10, 30), (30, 50)] and trunc == 0
    w, trunc = _windows(np.array([0, 5, 40]), 45, 20)  # message 1 (35 tokens) alone is too long
    assert w == [(0, 5), (5, 25), (40, 45)] and trunc == 1


def test_overlength_conversation_split_and_counted(tok):
    long = [{"role": "user", "content": "hello world " * 3}, {"role": "assistant", "content": "how are you " * 3}] * 6
    stats_ids, labels, stats = encode_batch(tok.backend_tokenizer, [long], max_length=40)
    assert stats.split_conversations == 1 and stats.rows == len(stats_ids) > 1
    assert stats.truncated_messages == 0  # every message fits the window alone
    assert all(len(r) <= 40 for r in stats_ids)
    assert all((lab != IGNORE_INDEX).any() for lab in labels)
    full_ids, full_labels, _ = encode_batch(tok.backend_tokenizer, [long], max_length=10_000)
    full, full_lab = list(full_ids[0]), list(full_labels[0])
    # Windows are whole messages cut from the conversation, in order: each starts at a role marker and is the next
    # slice of the full row, labels included (nothing lost beyond the counted drops).
    role_ids = {tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>")}
    pos = 0
    for r, lab in zip(stats_ids, labels):
        r = list(r)
        assert r[0] in role_ids
        start = next(i for i in range(pos, len(full) - len(r) + 1) if full[i:i + len(r)] == r)
        assert list(lab) == full_lab[start:start + len(r)]
        pos = start + len(r)
    kept = sum(len(r) for r in stats_ids)
    assert stats.tokens == kept and (kept == len(full) if stats.dropped_windows == 0 else kept < len(full))
    assert stats.loss_tokens == sum(int((lab != IGNORE_INDEX).sum()) for lab in labels)
    assert isinstance(stats, EncodeStats)


UNICODE = ["你喜欢什么运动?", "Ça va? naïve café", "emoji 🤖 ok", "日本語とEnglish mixed  spaces .",
           "tabs\tand\nnewlines"]


@pytest.mark.parametrize("text", UNICODE)
def test_unicode_round_trip_trained(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", UNICODE)
def test_unicode_round_trip_gpt2_folder(gpt2_folder, text):
    g = load_pretrained_tokenizer(str(gpt2_folder))
    assert g.decode(g.encode(text, add_special_tokens=False)) == text
    assert g.chat_template == CHAT_TEMPLATE and g.pad_token == EOS


def test_gpt2_folder_label_mask(gpt2_folder):
    g = load_pretrained_tokenizer(str(gpt2_folder))
    for conv in CONVS:
        ids, labels, _ = encode_batch(g.backend_tokenizer, [conv], max_length=512)
        ref = g.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(ids[0]) == ref["input_ids"]
        assert [int(lab != IGNORE_INDEX) for lab in labels[0]] == list(ref["assistant_masks"])


def test_fingerprint_stable_and_distinct(tok, gpt2_folder, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    from transformers import PreTrainedTokenizerFast

    again = PreTrainedTokenizerFast.from_pretrained(tmp_path / "t")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_pretrained_tokenizer(str(gpt2_folder))) != tokenizer_fingerprint(tok)


def test_missing_pretrained_tokenizer_is_clear(tmp_path):
    from chatray.errors import ChatrayError

    with pytest.raises(ChatrayError, match="cannot load tokenizer"):
        load_pretrained_tokenizer(str(tmp_path / "nope"))


@pytest.mark.parametrize("text", [render_chat(c)[0] for c in CONVS] + [
    "emoji 🙂🙃 and 漢字 split into byte tokens, then  two  spaces\n\n\nand newlines",
    "<|user|>\n \u00e9t\u00e9 caf\u00e9 \u0928\u092e\u0938\u094d\u0924\u0947<|endoftext|>\n",
])
def test_first_token_at_matches_full_offsets(tok, text):
    """The mask asks the Rust Encoding about a few tokens per boundary; check it against every token's offsets."""
    from chatray.data.encode import _first_token_at

    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    starts = np.array([o[0] for o in enc.offsets])
    for pos in range(len(text) + 2):
        want = int(np.searchsorted(starts, pos, side="left")) if pos < len(text) else len(enc.ids)
        assert _first_token_at(enc, pos, len(text), len(enc.ids)) == want, (text, pos)


def test_folder_tokenizers_load_like_autotokenizer(tok, gpt2_folder, tmp_path):
    """Local folders load with their own class (no torch import), giving what AutoTokenizer gives: same class, same
    saved files."""
    import json

    from transformers import AutoTokenizer

    from chatray.data.tokenizer import _finish

    trained = tmp_path / "trained"
    tok.save_pretrained(trained)
    for folder in (trained, gpt2_folder):
        ours = load_pretrained_tokenizer(str(folder), max_length=64)
        auto = _finish(AutoTokenizer.from_pretrained(str(folder), use_fast=True), 64)
        assert type(ours) is type(auto), folder
        ours.save_pretrained(tmp_path / "ours")
        auto.save_pretrained(tmp_path / "auto")
        for name in ("tokenizer_config.json", "tokenizer.json"):
            a = json.loads((tmp_path / "ours" / name).read_text())
            b = json.loads((tmp_path / "auto" / name).read_text())
            assert a == b, (folder, name)
