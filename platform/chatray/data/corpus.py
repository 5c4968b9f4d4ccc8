"""The dialogues the demo trains on, all offline: the chatterbot-corpus package (English and Chinese) and the
conversation chatray was founded on, bundled with the package (``founding.jsonl``).

The founding conversation is stored as written and once more from its question on, so that a chat which opens
with that question (as the demo's does) has an example in the data.
"""

from __future__ import annotations

from pathlib import Path

from chatray.errors import ChatrayError

__all__ = ["DEMO_INPUTS", "FOUNDING", "corpus_dir", "corpus_root", "expand_corpus_inputs"]

#: What ``chatray data prepare --demo`` reads: chatterbot's English and Chinese, and the founding conversation.
DEMO_INPUTS = ["chatterbot:english", "chatterbot:chinese", "chatray:founding"]
#: The founding conversation (turn lists, JSONL).
FOUNDING = Path(__file__).with_name("founding.jsonl")


def corpus_dir(language: str) -> Path:
    """The folder of YAML files for ``language`` in the installed ``chatterbot-corpus`` package.

    Raises:
        ChatrayError: the package is not installed, or has no such language.
    """
    try:
        import chatterbot_corpus
    except ImportError as e:
        raise ChatrayError("the chatterbot-corpus package is not installed",
                           hint="pip install chatterbot-corpus") from e
    base = Path(chatterbot_corpus.__file__).parent / "data"
    d = base / language
    if not d.is_dir():
        langs = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise ChatrayError(f"chatterbot-corpus has no language {language!r}", hint=f"available: {', '.join(langs)}")
    return d


def expand_corpus_inputs(inputs: list[str]) -> list[str]:
    """Replace ``chatterbot:LANG`` entries by the corpus folder and ``chatray:founding`` by the bundled file;
    leave paths unchanged."""
    return [str(corpus_dir(i.split(":", 1)[1])) if i.startswith("chatterbot:")
            else str(FOUNDING) if i == "chatray:founding" else i for i in inputs]


def corpus_root() -> Path | None:
    """The installed corpus's data folder, or None when the package is absent."""
    try:
        import chatterbot_corpus
    except ImportError:
        return None
    return (Path(chatterbot_corpus.__file__).parent / "data").resolve()
