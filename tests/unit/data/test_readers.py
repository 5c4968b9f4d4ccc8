"""Readers: every input form, auto-detection, and exact error locations for bad records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from chatray.data.formats import DataError
from chatray.data.readers import collect_files, iter_conversations, read_file
from chatray.errors import ChatrayError


def _write(p: Path, text: str | bytes) -> Path:
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def test_openai_jsonl(tmp_path):
    f = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
    ]))
    convs, src = read_file(f)
    assert src.format == "openai" and src.conversations == 2 and src.skipped == 0
    assert src.sha256 == hashlib.sha256(f.read_bytes()).hexdigest() and src.path == str(f)
    assert convs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert convs[1].messages[1]["content"] == "你好！"
    assert convs[1].source.endswith("a.jsonl:line 2")


def test_sharegpt_json_and_jsonl(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    f1 = _write(tmp_path / "s.json", json.dumps([rec, rec]))
    f2 = _write(tmp_path / "s.jsonl", json.dumps(rec) + "\n")
    for f, n in ((f1, 2), (f2, 1)):
        convs, src = read_file(f)
        assert src.format == "sharegpt" and len(convs) == n
        assert [m["role"] for m in convs[0].messages] == ["user", "assistant"]


def test_turn_lists(tmp_path):
    f = _write(tmp_path / "t.json", json.dumps([["hi", "hello", "how are you?", "fine"], ["q", "a"]]))
    convs, src = read_file(f)
    assert src.format == "turns"
    assert convs[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]
    assert convs[1].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert convs[1].source.endswith("t.json: record 1")


def test_one_line_jsonl_turn_list_is_one_conversation(tmp_path):
    """A JSONL file with a single line of turns is read by lines, as a file of several lines is."""
    f = _write(tmp_path / "one.jsonl", json.dumps(["你好,我是小明。", "你好,我是小红。"], ensure_ascii=False) + "\n")
    convs, src = read_file(f)
    assert src.format == "turns" and src.conversations == 1
    assert convs[0].messages == [{"role": "user", "content": "你好,我是小明。"},
                                 {"role": "assistant", "content": "你好,我是小红。"}]
    assert convs[0].source.endswith("one.jsonl:line 1")


def test_chatterbot_yaml(tmp_path):
    f = _write(tmp_path / "c.yml",
               "categories:\n- x\nconversations:\n- - 你喜欢什么运动?\n  - 我喜欢足球。\n- - yes\n  - 42\n")
    convs, src = read_file(f)
    assert src.format == "chatterbot" and len(convs) == 2
    assert convs[0].messages[0]["content"] == "你喜欢什么运动?"
    assert convs[1].messages[1]["content"] == "42"  # YAML scalars coerced back to text


def test_bundled_corpus_reads():
    convs, sources = iter_conversations(["chatterbot:english", "chatterbot:chinese"])
    assert len(convs) > 2000 and len(sources) > 30
    assert {s.format for s in sources} == {"chatterbot"} and sum(s.conversations for s in sources) == len(convs)
    assert sum(s.skipped for s in sources) >= 1  # the corpus's own malformed records: skipped and counted
    assert all(m["role"] == ("user", "assistant")[j % 2] and m["content"].strip()
               for c in convs for j, m in enumerate(c.messages))
    assert any("运动" in m["content"] for c in convs for m in c.messages)


def test_demo_inputs_include_the_founding_conversation():
    from chatray.data.corpus import DEMO_INPUTS, FOUNDING

    convs, sources = iter_conversations(DEMO_INPUTS)
    founding = [c for c in convs if c.source.startswith(str(FOUNDING))]
    turns = ["你好,我是小明。", "你好,我是小红。", "你喜欢什么运动?", "我喜欢打篮球。", "你呢?", "我喜欢跑步。"]
    assert [[m["content"] for m in c.messages] for c in founding] == [turns, turns[2:]]
    assert all(m["role"] == ("user", "assistant")[j % 2] for c in founding for j, m in enumerate(c.messages))
    assert sources[-1].path == str(FOUNDING) and sources[-1].format == "turns"


@pytest.mark.parametrize(
    "name, content, where, reason",
    [
        ("bad.jsonl",
         '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n',
         "bad.jsonl:line 2", "malformed JSON"),
        ("norole.jsonl", '{"messages": [{"content": "a"}]}\n', "norole.jsonl:line 1", "message 0: missing 'role'"),
        ("nocontent.jsonl", '{"messages": [{"role": "user"}]}\n', "nocontent.jsonl:line 1", "missing 'content'"),
        ("role.jsonl", '{"messages": [{"role": "robot", "content": "a"}]}\n', "role.jsonl:line 1",
         "unknown role 'robot'"),
        ("listrole.jsonl", '{"messages": [{"role": ["user"], "content": "a"}]}\n', "listrole.jsonl:line 1",
         "unknown role ['user']"),
        ("notobj.jsonl", '{"messages": ["hi"]}\n', "notobj.jsonl:line 1", "message 0: expected an object"),
        ("nan.jsonl", '{"messages": [{"role": "user", "content": NaN}]}\n', "nan.jsonl:line 1",
         "content must be a string, got float"),
        ("empty.jsonl", '{"messages": []}\n', "empty.jsonl:line 1", "empty conversation"),
        ("noasst.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', "noasst.jsonl:line 1",
         "no assistant turn"),
        ("blank.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}\n',
         "blank.jsonl:line 1", "empty content"),
        ("speaker.json", '[{"conversations": [{"from": "alien", "value": "x"}]}]', "speaker.json: record 0",
         "unknown speaker 'alien'"),
        ("turn.json", '[["hi", 3]]', "turn.json: record 0", "turn 1: expected a string"),
        ("single.json", '[["hi"]]', "single.json: record 0", "no assistant turn"),
        ("bad.yml", "conversations:\n- - a\n  - [b\n", "bad.yml:line", "malformed YAML"),
        ("empty.jsonl", "", "empty.jsonl", "file is empty"),
    ],
)
def test_bad_records_name_file_line_and_reason(tmp_path, name, content, where, reason):
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError) as ei:
        read_file(f)
    msg = str(ei.value)
    assert where in msg and reason in msg, msg


def test_wrong_encoding_names_line(tmp_path):
    f = _write(tmp_path / "latin.jsonl", b'{"messages": []}\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:line 2: not valid UTF-8"):
        read_file(f)


def test_skip_invalid_counts_and_keeps_good(tmp_path):
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    f = _write(tmp_path / "mix.jsonl", "\n".join([good, "{oops", good, '{"messages": []}']))
    errors: list[str] = []
    convs, src = read_file(f, skip_invalid=True, errors=errors)
    assert len(convs) == 2 and src.skipped == 2
    assert "mix.jsonl:line 2" in errors[0] and "mix.jsonl:line 4" in errors[1]


def test_collect_files_and_missing(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    _write(tmp_path / "d" / "a.jsonl", "{}")
    _write(tmp_path / "d" / "sub" / "b.yml", "x")
    _write(tmp_path / "d" / "notes.txt", "x")
    files = collect_files([str(tmp_path / "d")])
    assert [f.name for f in files] == ["a.jsonl", "b.yml"]
    with pytest.raises(ChatrayError, match="input not found"):
        collect_files([str(tmp_path / "nope.jsonl")])
    (tmp_path / "e").mkdir()
    with pytest.raises(ChatrayError, match="no dialogue files"):
        collect_files([str(tmp_path / "e")])


def test_explicit_format_mismatch_is_reported(tmp_path):
    f = _write(tmp_path / "a.jsonl", '{"conversations": [{"from": "human", "value": "x"}]}\n')
    with pytest.raises(DataError, match="expected an object with a 'messages' list"):
        read_file(f, "openai")


def test_data_errors_cross_process_boundaries_intact():
    """A DataError raised in a Ray task or a child process arrives with its message, location and hint."""
    import pickle

    err = DataError("dialogs.jsonl:line 7", "message 0: unknown role 'robot'")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DataError and str(back) == str(err) == "dialogs.jsonl:line 7: message 0: unknown role 'robot'"
    assert (back.where, back.reason, back.hint) == (err.where, err.reason, err.hint)


def _split_read(f: Path, part_bytes: int, fmt: str = "auto", skip_invalid: bool = False):
    from chatray.data.readers import InputFile, merge_parts, read_part, split_parts

    files = [InputFile(f, f.read_bytes(), skip_invalid)]
    parts = split_parts(files, fmt, part_bytes=part_bytes)
    results = [read_part(p) for p in parts]
    errors: list[str] = []
    (src,) = merge_parts(files, parts, results, errors)
    return parts, [c for r in results for c in r.conversations], src, errors


@pytest.mark.parametrize("bom", [False, True])
def test_large_jsonl_split_into_line_runs_reads_like_the_whole_file(tmp_path, bom):
    """Parallel readers get runs of whole lines; together they give exactly what reading the file whole gives,
    with the file's own line numbers (blank lines included) and one sha256 for the file."""
    lines = []
    for i in range(200):
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"问题 {i}"},
                                              {"role": "assistant", "content": f"answer {i} " + "x" * (i % 17)}]},
                                ensure_ascii=False))
        if i % 9 == 0:
            lines.append("")
    f = _write(tmp_path / "big.jsonl", (b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode())
    whole, src_whole = read_file(f)
    parts, convs, src, _ = _split_read(f, part_bytes=700)
    assert len(parts) > 10 and all(p.lines_only and p.fmt == "openai" for p in parts)
    assert all(p.data.endswith(b"\n") for p in parts[:-1])  # cut after a newline: whole lines only
    assert [c.messages for c in convs] == [c.messages for c in whole]
    assert [c.source for c in convs] == [c.source for c in whole]
    assert convs[-1].source.endswith(f"big.jsonl:line {len(lines)}")
    assert src == src_whole


def test_split_reading_reports_the_files_line_numbers(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    lines = [good] * 150
    lines[120] = '{"messages": [{"role": "robot", "content": "a"}]}'
    lines[130] = "{oops"
    f = _write(tmp_path / "late.jsonl", "\n".join(lines))
    with pytest.raises(DataError, match=r"late.jsonl:line 121: message 0: unknown role 'robot'"):
        _split_read(f, part_bytes=500)
    parts, convs, src, errors = _split_read(f, part_bytes=500, skip_invalid=True)
    assert len(parts) > 5 and len(convs) == 148 and src.skipped == 2
    assert ["late.jsonl:line 121" in errors[0], "late.jsonl:line 131" in errors[1]] == [True, True]
    bad = _write(tmp_path / "enc.jsonl", ("\n".join([good] * 100) + "\n").encode() + b'{"x": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"enc.jsonl:line 101: not valid UTF-8"):
        _split_read(bad, part_bytes=500)


def test_json_documents_and_yaml_are_never_split(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    for name, text in (("a.json", json.dumps([rec] * 50)), ("b.jsonl", json.dumps([rec] * 50, indent=1)),
                       ("c.yml", "conversations:\n" + "- - hi\n  - hello\n" * 50)):
        parts, convs, src, _ = _split_read(_write(tmp_path / name, text), part_bytes=100)
        assert len(parts) == 1 and len(convs) == 50, name


def test_jsonl_line_ends(tmp_path):
    """Lines end at \\n, \\r\\n or \\r; U+2028 and U+0085 are legal unescaped inside JSON strings and end nothing."""
    odd = "line\u2028separator, next\x85line"
    recs = [{"messages": [{"role": "user", "content": odd}, {"role": "assistant", "content": "ok"}]}] * 2
    lines = [json.dumps(r, ensure_ascii=False) for r in recs] + ['{"a": "abc']
    assert "\u2028" in lines[0] and "\x85" in lines[0]  # written raw
    errors = {}
    for name, sep in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        f = _write(tmp_path / f"{name}.jsonl", sep.join(lines) + sep)
        with pytest.raises(DataError, match=rf"{name}.jsonl:line 3: malformed JSON") as ei:
            read_file(f)
        errors[name] = ei.value.reason
        convs, src = read_file(f, skip_invalid=True)
        assert src.conversations == 2 and convs[1].messages[0]["content"] == odd
        assert convs[1].source.endswith(f"{name}.jsonl:line 2")
    assert errors["lf"] == errors["crlf"] == errors["cr"]  # same message, same column


def test_orjson_reads_report_what_the_standard_library_would(tmp_path):
    """orjson turns integers past 64 bits into floats; the error still names them as the standard library reads them."""
    f = _write(tmp_path / "big.jsonl", '{"messages": [{"role": "user", "content": 18446744073709551616}]}\n')
    with pytest.raises(DataError, match=r"big.jsonl:line 1: message 0: content must be a string, got int"):
        read_file(f)


def test_split_parts_utf8_error_names_the_files_byte_and_comes_first(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    lines = [good] * 120
    lines[10] = '{"messages": []}'  # a record error in an early part...
    data = ("\n".join(lines) + "\n").encode() + b'{"x": "caf\xe9"}\n'  # ...and invalid UTF-8 in the last one
    f = _write(tmp_path / "enc.jsonl", data)
    bad_byte = data.index(b"\xe9")
    for part_bytes in (None, 500):
        with pytest.raises(DataError) as ei:
            _split_read(f, part_bytes=part_bytes) if part_bytes else read_file(f)
        assert str(ei.value).startswith(f"{f}:line 121: not valid UTF-8 (byte {bad_byte}:"), str(ei.value)


def test_large_json_document_or_blank_jsonl_is_never_split(tmp_path):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = _write(tmp_path / "doc.jsonl", " \n" * 100 + json.dumps([rec] * 40, indent=1))
    parts, convs, _, _ = _split_read(f, part_bytes=200)
    assert len(parts) == 1 and len(convs) == 40
    blank = _write(tmp_path / "blank.jsonl", " \n" * 500)
    with pytest.raises(DataError, match="blank.jsonl: file is empty"):
        _split_read(blank, part_bytes=100, fmt="openai")


def test_unreadable_input_is_a_clear_error(tmp_path, monkeypatch):
    from chatray.data.readers import load_inputs

    f = _write(tmp_path / "a.jsonl", "{}")
    real = Path.read_bytes

    def deny(self):
        if self.name == "a.jsonl":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ChatrayError, match=r"a.jsonl: cannot read \(Permission denied\)"):
        load_inputs([str(f)])
