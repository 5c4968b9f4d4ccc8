"""`data prepare` through Ray Data on a local Ray; read back with ray.data.read_parquet; S3 via moto."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatray.data.dataset import IGNORE_INDEX, load_tokenizer, read_manifest, split_files
from chatray.data.prepare import prepare_dataset
from chatray.data.tokenizer import CHAT_TEMPLATE, tokenizer_fingerprint
from chatray.errors import ChatrayError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("prep") / "demo"
    m = prepare_dataset(["chatterbot:english", "chatterbot:chinese"], str(out), tokenizer="train:1500",
                        max_length=96, eval_fraction=0.1, shards=3, seed=7, progress=False)
    return out, m


def test_layout_manifest_and_read_back_with_ray_data(demo_dataset, ray_session):
    import ray

    out, m = demo_dataset
    assert (out / "manifest.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert [Path(f).name for f in m["splits"]["train"]["files"]] == [f"part-0000{i}.parquet" for i in range(3)]
    ds = ray.data.read_parquet(str(out / "train"))
    assert ds.count() == m["splits"]["train"]["rows"] > 1000
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert str(schema.field("input_ids").type) == "list<element: int32>"
    assert str(schema.field("labels").type) == "list<element: int32>"
    assert str(schema.field("length").type) == "int32"
    rows = ds.take(200)
    tok = load_tokenizer(str(out))
    for r in rows:
        assert 0 < r["length"] == len(r["input_ids"]) == len(r["labels"]) <= 96
        loss = [i for i, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE_INDEX]
        # Every assistant turn ends with EOS, except a single message truncated to max_length (counted).
        assert loss and (tok.eos_token_id in loss or r["length"] == 96)
    c = m["counts"]
    assert c["conversations"] == m["splits"]["train"]["conversations"] + m["splits"]["eval"]["conversations"]
    assert c["rows"] == m["splits"]["train"]["rows"] + m["splits"]["eval"]["rows"]
    assert c["invalid_skipped"] >= 1  # the bundled corpus has a malformed record, counted not fatal
    assert c["invalid_skipped"] == sum(s["skipped"] for s in m["sources"]) == len(m["invalid_examples"])
    assert c["shards"] == 3 and len(m["splits"]["eval"]["files"]) == 2
    assert read_manifest(str(out)) == m
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok) and m["chat_template"] == CHAT_TEMPLATE
    assert m["format_version"] == 1 and m["max_length"] == 96 and m["seed"] == 7


def test_chinese_round_trips_through_dataset(demo_dataset):
    out, _ = demo_dataset
    tok = load_tokenizer(str(out))
    texts = []
    for f in split_files(str(out), "train") + split_files(str(out), "eval"):
        for r in pq.read_table(f).to_pylist():
            texts.append(tok.decode(r["input_ids"]))
    assert any("运动" in t for t in texts)
    assert "你喜欢什么运动?" == tok.decode(tok.encode("你喜欢什么运动?", add_special_tokens=False))
    # The saved tokenizer formats prompts exactly like training rows.
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|assistant|>\n")


def test_show_dataset_marks_exactly_the_loss_tokens(demo_dataset):
    """`chatray data inspect`: the manifest summary, and the row decoded with each run of loss tokens in [[...]]."""
    from chatray.data.show import show_dataset

    out, m = demo_dataset
    text = show_dataset(str(out), split="eval", index=1, color=False)
    head, example = text.split("\n\n", 1)
    assert f"vocab={m['tokenizer']['vocab_size']}" in head and m["tokenizer"]["fingerprint"] in head
    assert f"eval         {m['splits']['eval']['rows']:,} rows" in head
    row = pq.read_table(out / m["splits"]["eval"]["files"][0]).slice(1, 1).to_pylist()[0]
    tok = load_tokenizer(str(out))
    assert example.startswith(f"eval row 1 ({row['length']} tokens; loss-bearing text in [[...]]):\n")
    rendered = example.split("\n", 1)[1]
    marked = [seg.split("]]")[0] for seg in rendered.split("[[")[1:]]
    loss_runs, run = [], []
    for i, lab in zip(row["input_ids"] + [0], row["labels"] + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX:
            run.append(i)
        elif run:
            loss_runs.append(tok.decode(run))
            run = []
    assert marked == loss_runs and marked
    assert rendered.replace("[[", "").replace("]]", "") == tok.decode(row["input_ids"])
    colored = show_dataset(str(out), split="eval", index=1, color=True)
    assert colored.count("\x1b[32m") == len(loss_runs) and "[[" not in colored
    assert show_dataset(str(out), split="eval", index=10**6).endswith("(eval has no row 1000000)")


def test_deterministic_for_a_seed(demo_dataset, tmp_path, ray_session):
    out, m = demo_dataset
    again = tmp_path / "again"
    prepare_dataset(["chatterbot:english", "chatterbot:chinese"], str(again), tokenizer="train:1500",
                    max_length=96, eval_fraction=0.1, shards=3, seed=7, progress=False)
    for split in ("train", "eval"):
        for f in m["splits"][split]["files"]:
            assert pq.read_table(out / f).equals(pq.read_table(again / f)), f


def test_no_overwrite_without_flag_and_atomic_replace(tmp_path, ray_session):
    src = tmp_path / "d.jsonl"
    rec = {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]}
    src.write_text("\n".join(json.dumps(rec) for _ in range(30)))
    out = tmp_path / "ds"
    prepare_dataset([str(src)], str(out), tokenizer="train:300", max_length=32, progress=False)
    before = (out / "manifest.json").read_text()
    with pytest.raises(ChatrayError, match="already exists"):
        prepare_dataset([str(src)], str(out), tokenizer="train:300", max_length=32, progress=False)
    assert (out / "manifest.json").read_text() == before
    # A failing run (bad record) with --overwrite leaves the old dataset intact and no staging folder.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n{oops\n")
    with pytest.raises(ChatrayError, match="bad.jsonl:line 2"):
        prepare_dataset([str(bad)], str(out), overwrite=True, tokenizer="train:300", max_length=32, progress=False)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d.jsonl", "ds"]
    m = prepare_dataset([str(src)], str(out), overwrite=True, tokenizer="train:300", max_length=32, seed=1,
                        progress=False)
    assert m["seed"] == 1 and json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d.jsonl", "ds"]


def test_skip_invalid_counts_in_manifest(tmp_path, ray_session):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = tmp_path / "mix.jsonl"
    f.write_text("\n".join([json.dumps(good)] * 20 + ["{oops", '{"messages": []}']))
    m = prepare_dataset([str(f)], str(tmp_path / "o"), tokenizer="train:300", max_length=32, skip_invalid=True,
                        progress=False)
    assert m["counts"]["invalid_skipped"] == 2 and m["counts"]["conversations"] == 20
    assert [e.split(": ", 1)[0] for e in m["invalid_examples"]] == [f"{f}:line 21", f"{f}:line 22"]


def test_s3_output_and_read_back(s3_server, ray_session, tmp_path):
    import ray

    from chatray.storage.uri import filesystem_for

    uri = f"s3://{s3_server['bucket']}/datasets/en"
    m = prepare_dataset(["chatterbot:english"], uri, tokenizer="train:800", max_length=64, shards=2, progress=False)
    got = read_manifest(uri)
    assert got["splits"] == m["splits"]
    tok = load_tokenizer(uri)
    assert tok.chat_template == CHAT_TEMPLATE and len(tok) == m["tokenizer"]["vocab_size"]
    assert tokenizer_fingerprint(tok) == m["tokenizer"]["fingerprint"]
    fs, path = filesystem_for(uri)
    ds = ray.data.read_parquet(f"{path}/train", filesystem=fs)
    assert ds.count() == m["splits"]["train"]["rows"]
    with pytest.raises(ChatrayError, match="already exists"):
        prepare_dataset(["chatterbot:english"], uri, tokenizer="train:800", max_length=64, progress=False)


def test_exact_shard_count_balanced_and_nothing_lost(tmp_path, ray_session):
    recs = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(22)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs))
    m = prepare_dataset([str(src)], str(tmp_path / "o"), tokenizer="train:300", max_length=32, shards=5,
                        eval_fraction=0.0, progress=False)
    files = m["splits"]["train"]["files"]
    assert files == [f"train/part-0000{i}.parquet" for i in range(5)]
    sizes = [pq.read_metadata(tmp_path / "o" / f).num_rows for f in files]
    assert sum(sizes) == 22 and min(sizes) >= 4  # 22 over 5 shards: 4 or 5 each, none empty
    assert m["splits"]["eval"]["rows"] == 0
    assert pq.read_table(tmp_path / "o" / "eval" / "part-00000.parquet").num_rows == 0
    tok = load_tokenizer(str(tmp_path / "o"))
    got = sorted(tok.decode(r["input_ids"]) for f in files for r in pq.read_table(tmp_path / "o" / f).to_pylist())
    assert got == sorted(f"<|user|>\nquestion {i}\n<|assistant|>\na{i}<|endoftext|>\n" for i in range(22))


def test_large_inputs_are_read_by_ray_tasks_with_the_same_result(tmp_path, ray_session, monkeypatch):
    """Inputs over LOCAL_READ_BYTES are cut into line runs read by Ray tasks: same dataset as the driver-side read,
    and a bad record is still reported with the file's own line number, publishing nothing."""
    import chatray.data.prepare as prep

    src = tmp_path / "d.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"question {i} 第{i}个"},
                          {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}]} for i in range(400)]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    kw = dict(tokenizer="train:400", max_length=48, shards=3, seed=3, progress=False)
    local = prepare_dataset([str(src)], str(tmp_path / "local"), **kw)
    monkeypatch.setattr(prep, "LOCAL_READ_BYTES", 0)
    split_calls: list[int] = []
    real_split = prep.split_parts

    def spy(files, fmt, part_bytes=None):
        parts = real_split(files, fmt, part_bytes=None if part_bytes is None else 4096)
        split_calls.append(len(parts))
        return parts

    monkeypatch.setattr(prep, "split_parts", spy)
    remote = prepare_dataset([str(src)], str(tmp_path / "remote"), **kw)
    assert split_calls and split_calls[0] > 5  # really read in several Ray tasks
    for key in ("counts", "splits", "sources", "tokenizer"):
        assert remote[key] == local[key], key
    for split in ("train", "eval"):
        for f in local["splits"][split]["files"]:
            assert pq.read_table(tmp_path / "local" / f).equals(pq.read_table(tmp_path / "remote" / f)), f

    lines = src.read_text(encoding="utf-8").splitlines()
    lines[350] = '{"messages": [{"role": "user", "content": "a"}]}'
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ChatrayError, match=r"d.jsonl:line 351: conversation has no assistant turn"):
        prepare_dataset([str(src)], str(tmp_path / "bad"), **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "local", "remote"]  # no staging left
