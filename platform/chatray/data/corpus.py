"""The chatterbot-corpus dialogues shipped on PyPI: the offline default for demos and tests."""

from __future__ import annotations

from pathlib import Path

from chatray.errors import ChatrayError

__all__ = ["DEMO_INPUTS", "corpus_dir", "corpus_root", "expand_corpus_inputs"]

#: What ``chatray data prepare --demo`` reads: English and Chinese conversations.
DEMO_INPUTS = ["chatterbot:english", "chatterbot:chinese"]


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
    """Replace ``chatterbot:LANG`` entries by the corpus folder; leave paths unchanged."""
    return [str(corpus_dir(i.split(":", 1)[1])) if i.startswith("chatterbot:") else i for i in inputs]


def corpus_root() -> Path | None:
    """The installed corpus's data folder, or None when the package is absent."""
    try:
        import chatterbot_corpus
    except ImportError:
        return None
    return (Path(chatterbot_corpus.__file__).parent / "data").resolve()
