"""``chatray data inspect``: a manifest summary and one example with its loss-bearing tokens marked."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from chatray.data.dataset import IGNORE_INDEX, load_tokenizer, read_manifest, split_files
from chatray.storage.uri import filesystem_for

__all__ = ["show_dataset"]


def _render_example(tok: Any, input_ids: list[int], labels: list[int], *, color: bool) -> str:
    """Decode a row, marking loss-bearing runs of tokens as ``[[...]]`` (or green when ``color``)."""
    out: list[str] = []
    for loss, run in groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tok.decode([i for i, _ in run], skip_special_tokens=False)
        out.append((f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]") if loss else text)
    return "".join(out)


def show_dataset(uri: str, *, split: str = "train", index: int = 0, color: bool = False) -> str:
    """A human-readable summary of the dataset at ``uri`` plus row ``index`` of ``split``."""
    import pyarrow.parquet as pq

    m = read_manifest(uri)
    c = m["counts"]
    lines = [
        f"dataset      {uri}",
        f"created      {m.get('created_at', '?')} by {m.get('created_by', '?')}",
        f"tokenizer    {m['tokenizer']['source']}  vocab={m['tokenizer']['vocab_size']}  "
        f"fingerprint={m['tokenizer']['fingerprint']}",
        f"max_length   {m['max_length']}   loss on {'all tokens' if m.get('train_on_all') else 'assistant turns only'}",
        f"conversations {c['conversations']:,} (invalid skipped {c.get('invalid_skipped', 0)}, "
        f"split {c.get('split_conversations', 0)}, truncated messages {c.get('truncated_messages', 0)}, "
        f"windows dropped {c.get('dropped_windows_without_loss', 0)})",
    ]
    for name, s in m["splits"].items():
        share = s["loss_tokens"] / s["tokens"] if s["tokens"] else 0
        lines.append(f"{name:<12} {s['rows']:,} rows  {s['tokens']:,} tokens  {s['loss_tokens']:,} loss tokens "
                     f"({share:.0%})  {len(s['files'])} shard(s)")
    files = split_files(uri, split, m)
    tok = load_tokenizer(uri)
    row = None
    seen = 0
    for f in files:
        fs, path = filesystem_for(f)
        t = pq.read_table(path, filesystem=fs)
        if index < seen + t.num_rows:
            row = t.slice(index - seen, 1).to_pylist()[0]
            break
        seen += t.num_rows
    if row is None:
        lines.append(f"\n({split} has no row {index})")
    else:
        mark = "green" if color else "[[...]]"
        lines.append(f"\n{split} row {index} ({row['length']} tokens; loss-bearing text in {mark}):")
        lines.append(_render_example(tok, row["input_ids"], row["labels"], color=color))
    return "\n".join(lines)
