"""Tokenizers and the chat template.

Two kinds of tokenizer, one template:
  * ``train:VOCAB`` trains a byte-level BPE (HF ``tokenizers``) on the dialogue texts, for the offline
    ``tiny`` model; role markers are single special tokens.
  * ``gpt2`` / hub id / local folder loads a pretrained GPT-2-family tokenizer (role markers are plain
    text there, so no embedding resize is needed).

The chat template is stored in the tokenizer (``tokenizer.chat_template``) so that
``apply_chat_template``, vLLM and TGI format prompts exactly as training did. :func:`render_chat` is the
same template in Python, returning the character spans that carry loss; a unit test pins the two
together.

Rendered form (one message)::

    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}<|endoftext|>\\n
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.errors import ChatrayError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "EOS",
    "ROLE_TOKENS",
    "load_pretrained_tokenizer",
    "load_tokenizer_spec",
    "render_chat",
    "tokenizer_fingerprint",
    "train_tokenizer",
]

EOS = "<|endoftext|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False,
                train_on_all: bool = False) -> tuple[str, list[tuple[int, int]], list[int]]:
    """Render ``messages`` exactly as :data:`CHAT_TEMPLATE` does.

    Returns:
        (text, loss_spans, message_starts): the text; the ``[start, end)`` character spans whose tokens
        carry loss (each assistant content plus its EOS; the whole text with ``train_on_all``); and the
        character offset where each message starts (split points for over-long conversations).
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    starts: list[int] = []
    pos = 0
    for m in messages:
        starts.append(pos)
        head = f"<|{m['role']}|>\n"
        parts.append(head)
        pos += len(head)
        if m["role"] == "assistant":
            body = m["content"] + EOS
            spans.append((pos, pos + len(body)))
            parts.append(body + "\n")
            pos += len(body) + 1
        else:
            parts.append(m["content"] + "\n")
            pos += len(m["content"]) + 1
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    text = "".join(parts)
    if train_on_all:
        spans = [(0, len(text))]
    return text, spans, starts


def _finish(tok: PreTrainedTokenizerFast, max_length: int | None) -> PreTrainedTokenizerFast:
    if tok.eos_token is None:
        tok.eos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = CHAT_TEMPLATE
    # Keep text exactly as written: no " ." -> "." clean-up, so decode(encode(x)) == x.
    tok.clean_up_tokenization_spaces = False
    if max_length:
        tok.model_max_length = max_length
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, *, min_frequency: int = 2,
                    max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (for the offline ``tiny`` model).

    Args:
        texts: training texts (rendered conversations work best: role markers are special tokens).
        vocab_size: target vocabulary size, special tokens included (at least 300: 256 bytes + specials).
        min_frequency: a merge needs at least this many occurrences.
        max_length: stored as ``model_max_length``.

    Returns:
        A ``PreTrainedTokenizerFast`` with EOS/BOS/PAD ``<|endoftext|>`` and the chat template set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ChatrayError(f"tokenizer vocab size must be at least 300, got {vocab_size}")
    specials = [EOS, *ROLE_TOKENS.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                  unk_token=None, additional_special_tokens=list(ROLE_TOKENS.values()))
    return _finish(tok, max_length)


def load_pretrained_tokenizer(name_or_path: str, max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Load a GPT-2-family tokenizer from a hub id (needs network) or a local folder, with chatray's template.

    Raises:
        ChatrayError: when it cannot be loaded (names the id/path and whether the hub was reachable).
    """
    try:
        cls = _tokenizer_class(name_or_path)
        # use_fast only where AutoTokenizer takes it: a concrete class would store it in tokenizer_config.json.
        tok = cls.from_pretrained(name_or_path, **({"use_fast": True} if cls.__name__ == "AutoTokenizer" else {}))
    except Exception as e:  # OSError, ValueError, hub errors: all mean "could not load"
        raise ChatrayError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}",
                           hint="use a local folder (save_pretrained) or check network access to the model hub; "
                           "offline, use --tokenizer train:VOCAB") from e
    if not getattr(tok, "is_fast", False):
        raise ChatrayError(f"tokenizer {name_or_path!r} has no fast (Rust) version; chatray needs one")
    return _finish(tok, max_length)


def _tokenizer_class(name_or_path: str) -> Any:
    """The class to load ``name_or_path`` with: for a local folder of a GPT-2-family fast tokenizer, that class
    itself (importing ``AutoTokenizer`` imports torch: seconds that ``data prepare`` does not need to spend);
    otherwise ``AutoTokenizer``."""
    folder = Path(name_or_path).expanduser()
    try:
        cls = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        cls = None
    if (folder / "tokenizer.json").is_file():
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):  # the same class in transformers 5
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast
        if cls in ("GPT2Tokenizer", "GPT2TokenizerFast"):
            from transformers import GPT2TokenizerFast

            return GPT2TokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer_spec(spec: str, texts: Iterable[str] | None = None,
                        max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Resolve a ``--tokenizer`` value: ``train[:VOCAB]`` (needs ``texts``), ``gpt2``, a hub id or a folder."""
    if spec == "train" or spec.startswith("train:"):
        vocab = 8000
        if ":" in spec:
            try:
                vocab = int(spec.split(":", 1)[1])
            except ValueError as e:
                raise ChatrayError(f"--tokenizer {spec!r}: VOCAB must be an integer, e.g. train:8000") from e
        if texts is None:
            raise ChatrayError("--tokenizer train needs the dialogue texts")
        return train_tokenizer(texts, vocab, max_length=max_length)
    return load_pretrained_tokenizer(spec, max_length=max_length)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A stable hash of the vocabulary and special tokens: a model trained with one tokenizer must be
    served and fine-tuned with a tokenizer of the same fingerprint."""
    vocab = tok.get_vocab()
    payload = json.dumps({"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "eos": tok.eos_token,
                          "pad": tok.pad_token}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
