"""Reading and checking JSONL: every accepted shape, every error class with its exact PATH:LINE, the report."""

import gzip
import json

import pytest

from fastft.data import DataConfig, UsageError, normalise, validate
from fastft.data.shapes import RowProblem


def write(tmp_path, name, lines, raw=False):
    p = tmp_path / name
    if raw:
        p.write_bytes(lines)
    else:
        p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(p)


def check(paths, **kw):
    return validate(DataConfig(paths=paths if isinstance(paths, list) else [paths], **kw))


QA = {"question": "Q?", "answer": "A."}


# ------------------------------------------------------------------------------------------- accepted shapes

@pytest.mark.parametrize("row, shape, messages", [
    ({"question": "q", "answer": "a"}, "question/answer", [("user", "q"), ("assistant", "a")]),
    ({"user": "u", "assistant": "a"}, "user/assistant", [("user", "u"), ("assistant", "a")]),
    ({"prompt": "p\n", "completion": " c"}, "prompt/completion", [("user", "p\n"), ("assistant", " c")]),
    ({"instruction": "i", "output": "o"}, "instruction/output", [("user", "i"), ("assistant", "o")]),
    ({"instruction": "i", "input": "x", "output": "o"}, "instruction/output",
     [("user", "i\n\nx"), ("assistant", "o")]),
    ({"instruction": "i", "input": "", "output": "o"}, "instruction/output", [("user", "i"), ("assistant", "o")]),
    ({"instruction": "i", "input": None, "output": "o"}, "instruction/output", [("user", "i"), ("assistant", "o")]),
    ({"question": "q", "answer": "a", "system": "s"}, "question/answer",
     [("system", "s"), ("user", "q"), ("assistant", "a")]),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "messages",
     [("user", "u"), ("assistant", "a")]),
    ({"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                   {"role": "assistant", "content": "a2"}]}, "messages",
     [("developer", "d"), ("user", "u"), ("assistant", "a"), ("user", "u2"), ("assistant", "a2")]),
    ({"system": "s", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
     "messages", [("system", "s"), ("user", "u"), ("assistant", "a")]),
])
def test_accepted_shapes(row, shape, messages):
    conv = normalise(row)
    assert conv.shape == shape
    assert [(m["role"], m["content"]) for m in conv.messages] == messages


def test_thinking_kept_on_final_turn_only():
    conv = normalise({"messages": [
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "thinking": "t1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2", "thinking": "t2"}]})
    assert "thinking" not in conv.messages[1] and conv.messages[3]["thinking"] == "t2"
    assert conv.dropped_thinking
    assert "thinking" not in normalise({"messages": [{"role": "user", "content": "u"}, {
        "role": "assistant", "content": "a", "thinking": None}]}).messages[1]


# ------------------------------------------------------------------------------------------- row errors

@pytest.mark.parametrize("row, needle", [
    ({"foo": 1, "bar": 2}, "unknown row shape (keys found: bar, foo); accepted shapes: {question, answer}"),
    ({}, "unknown row shape (keys found: none)"),
    ({"question": "q", "prompt": "p", "answer": "a"}, "ambiguous row shape"),
    ({"question": "q", "response": "a"}, "question/answer row without 'answer' (keys found: question, response)"),
    ({"question": "q", "answer": ""}, "answer is empty"),
    ({"question": "  \n", "answer": "a"}, "question is only whitespace"),
    ({"question": "q", "answer": None}, "answer is null"),
    ({"question": "q", "answer": 3}, "answer must be a string, not a number"),
    ({"question": ["q"], "answer": "a"}, "question must be a string, not an array"),
    ({"question": "q", "answer": "a", "system": 5}, "system must be a string, not a number"),
    ({"instruction": "i", "input": {}, "output": "o"}, "input must be a string, not an object"),
    ({"question": "q\u0000", "answer": "a"}, "question contains a NUL character"),
    ({"question": "q", "answer": "a<|end|>b"}, "answer contains the special token <|end|>"),
    ({"question": "q\ud800", "answer": "a"}, "unpaired surrogate"),
    ({"messages": "hi"}, "messages must be a list of {role, content} objects, not a string"),
    ({"messages": []}, "messages is empty"),
    ({"messages": ["hi"]}, "messages[0] must be an object with role and content, not a string"),
    ({"messages": [{"from": "human", "value": "x"}]}, "messages[0] has no 'role' (keys found: from, value)"),
    ({"messages": [{"role": "bot", "content": "x"}]}, 'messages[0].role is "bot"; accepted roles: system'),
    ({"messages": [{"role": "user"}]}, "messages[0].content is missing"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content is null"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
     "messages[1].content is empty"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]},
     "messages[1].content is only whitespace"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": [{"text": "a"}]}]},
     "messages[1].content must be a string, not an array"),
    ({"messages": [{"role": "user", "content": "u", "thinking": "t"}, {"role": "assistant", "content": "a"}]},
     "messages[0].thinking is only allowed on assistant turns"),
    ({"messages": [{"role": "user", "content": "u"}]}, "no assistant turn"),
    ({"messages": [{"role": "system", "content": "s"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}]}, "must start with a user turn"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "u"}]}, "must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "messages[1]: a system message is only allowed first"),
    ({"system": "s", "messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"},
                                  {"role": "assistant", "content": "a"}]}, "both a top-level system and a developer"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}]}, "tool"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "tool_calls": []}]},
     "tool calls"),
])
def test_row_errors(row, needle):
    with pytest.raises(RowProblem) as e:
        normalise(row)
    assert needle in str(e.value)


def test_an_integer_too_long_for_python_is_a_located_error(tmp_path):
    p = write(tmp_path, "d.jsonl", [QA, '{"question": "q", "answer": "a", "n": ' + "9" * 5000 + "}", QA])
    r = check(p)
    (err,) = [str(i) for i in r.errors]
    assert err == f"{p}:2: invalid JSON: a number too long to read"


def test_duplicate_keys_nan_and_a_bom_inside_are_located_errors(tmp_path):
    p = write(tmp_path, "d.jsonl", [QA, '{"question": "q", "answer": "first", "answer": "second"}',
                                    '{"question": "q", "answer": "a", "score": NaN}', "\ufeff" + json.dumps(QA)])
    got = [str(i) for i in check(p).errors]
    assert got == [f"{p}:2: field 'answer' given twice in one row", f"{p}:3: invalid JSON: NaN is not valid JSON",
                   f"{p}:4:1: invalid JSON: a byte-order mark inside the file (files joined together?)"]


def test_pretty_printed_json_is_one_file_error_and_cr_line_ends_read(tmp_path):
    arr = write(tmp_path, "rows.json", [json.dumps([QA, QA], indent=2)])
    (err,) = [str(i) for i in check(arr).errors]
    assert err.startswith(f"{arr}: the file is one JSON array over 10 lines, not JSON Lines") and "jq -c" in err
    cr = write(tmp_path, "cr.jsonl", (json.dumps(QA) + "\r" + json.dumps(QA) + "\r").encode(), raw=True)
    r = check(cr)
    assert r.ok and r.n_rows == 2, r.format()


def test_errors_located_by_line_and_column(tmp_path):
    p = write(tmp_path, "d.jsonl", [
        QA,                                   # 1 ok
        '{"question": "q", "answer": }',      # 2 JSON syntax: column 29
        "",                                   # 3 blank: skipped
        "[1, 2]",                             # 4 not an object
        {"foo": 1},                           # 5 unknown shape
        '"just a string"',                    # 6 not an object
        {"question": "q", "answer": ""},      # 7 empty field
        QA,                                   # 8 ok
    ])
    r = check(p)
    got = [str(i) for i in r.errors]
    assert got[0] == f"{p}:2:29: invalid JSON: Expecting value"
    assert got[1].startswith(f"{p}:4: expected a JSON object, got an array")
    assert got[2].startswith(f"{p}:5: unknown row shape (keys found: foo)")
    assert got[3] == f"{p}:6: expected a JSON object, got a string"
    assert got[4] == f"{p}:7: answer is empty"
    assert len(got) == 5 and (r.n_rows, r.n_valid, r.n_invalid) == (7, 2, 5)
    assert r.exit_code == 1 and not r.ok


def test_bom_crlf_blank_lines_long_lines_gzip(tmp_path):
    long_answer = "x " * 200_000
    body = "\ufeff" + json.dumps(QA) + "\r\n\r\n   \n" + json.dumps({"question": "q", "answer": long_answer}) + "\r\n"
    p1 = write(tmp_path, "bom.jsonl", body.encode("utf-8"), raw=True)
    p2 = str(tmp_path / "z.jsonl.gz")
    with gzip.open(p2, "wb") as f:
        f.write((json.dumps(QA) + "\n").encode())
    r = check([p1, p2])
    assert r.ok and r.exit_code == 0, r.format()
    assert (r.n_rows, r.n_valid) == (3, 3)
    assert [f[1] for f in r.files] == [2, 1]


def test_invalid_utf8_and_nul_bytes(tmp_path):
    lines = [json.dumps(QA).encode(), b'{"question": "caf\xe9", "answer": "a"}',
             b'{"question": "q\x00", "answer": "a"}']
    p = write(tmp_path, "bad.jsonl", b"\n".join(lines) + b"\n", raw=True)
    got = [str(i) for i in check(p).errors]
    assert got[0] == f"{p}:2:18: invalid UTF-8 (byte 0xe9); save the file as UTF-8"
    assert got[1].startswith(f"{p}:3:16: NUL byte")
    assert len(got) == 2


def test_utf16_file(tmp_path):
    p = write(tmp_path, "u16.jsonl", (json.dumps(QA) + "\n").encode("utf-16"), raw=True)
    assert [str(i) for i in check(p).errors] == [f"{p}: file is UTF-16 encoded; save it as UTF-8"]


def test_file_problems(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    empty = write(tmp_path, "empty.jsonl", b"", raw=True)
    blank = write(tmp_path, "blank.jsonl", b"\n  \r\n", raw=True)
    bad = write(tmp_path, "bad.jsonl", ["{", {"x": 1}])
    badgz = write(tmp_path, "bad.jsonl.gz", b"\x1f\x8bnot gzip", raw=True)
    r = check([missing, str(tmp_path), empty, blank, bad, badgz])
    got = [str(i) for i in r.errors]
    assert f"{missing}: no such file" in got
    assert f"{tmp_path}: is a directory; pass the .jsonl files in it instead" in got
    assert f"{empty}: file is empty" in got and f"{blank}: file is empty" in got
    assert f"{bad}: no usable rows (all 2 rows have errors)" in got
    assert any(g.startswith(f"{badgz}: not a valid gzip file") for g in got)
    assert "which --skip-invalid does not skip" in r.format()
    assert r.exit_code == 1


def test_pipes_and_devices_are_a_file_error_not_a_hang(tmp_path):
    """A FIFO would block until a writer comes and /dev/zero never ends: neither is opened."""
    import os

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    r = check([str(fifo), "/dev/zero"])
    assert [str(i) for i in r.errors] == [
        f"{p}: is not a regular file (a pipe, device or socket); write the data to a .jsonl file and pass that"
        for p in (fifo, "/dev/zero")]
    assert r.exit_code == 1


def test_usage_errors():
    with pytest.raises(UsageError, match="no data files"):
        validate(DataConfig(paths=[]))
    for kw, needle in [({"max_seq_len": 0}, "--max-seq-len"), ({"overlong": "cut"}, "--overlong"),
                       ({"eval_fraction": 1.5}, "--eval-fraction")]:
        with pytest.raises(UsageError, match=needle):
            validate(DataConfig(paths=["x.jsonl"], **kw))


def test_report_counts_and_warnings(tmp_path):
    rows = [QA, QA, {"user": "u", "assistant": "a", "id": 7}, {"prompt": "p", "completion": "c"},
            {"instruction": "i", "output": "o"}, {"messages": [{"role": "user", "content": "u"},
                                                              {"role": "assistant", "content": "a"}]},
            {"bad": 1}, {"messages": [{"role": "user", "content": "u", "name": "n"},
                                      {"role": "assistant", "content": "a2", "thinking": "t"},
                                      {"role": "user", "content": "u"}, {"role": "assistant", "content": "a3"}]}]
    p = write(tmp_path, "mix.jsonl", rows)
    r = check(p)
    assert r.shape_counts == {"question/answer": 2, "user/assistant": 1, "prompt/completion": 1,
                              "instruction/output": 1, "messages": 2}
    assert (r.n_rows, r.n_valid, len(r.errors)) == (8, 7, 1)
    ignored = r.warning("ignored_keys")
    assert ignored.count == 2 and ignored.where == [f"{p}:3", f"{p}:8"] and "id, messages[0].name" in ignored.message
    assert r.warning("dropped_thinking").where == [f"{p}:8"]
    text = r.format()
    assert f"{p}:7: unknown row shape" in text and "rows: 8 read, 7 valid, 1 with errors" in text
    assert "FAILED with 1 error;" in text and "--skip-invalid" in text


def test_report_shows_first_20_errors(tmp_path):
    p = write(tmp_path, "many.jsonl", [{"nope": i} for i in range(30)])
    r = check(p)
    assert len(r.errors) == 31  # 30 rows + "no usable rows"
    text = r.format()
    assert f"{p}:20: unknown" in text and f"{p}:21: unknown" not in text and "... and 11 more" in text


def test_one_file_given_under_two_spellings_is_read_once(tmp_path, monkeypatch):
    p = write(tmp_path, "d.jsonl", [QA])
    monkeypatch.chdir(tmp_path)
    r = check(["d.jsonl", "./d.jsonl", p])
    assert r.n_rows == 1 and [f[0] for f in r.files] == ["d.jsonl"]
    w = r.warning("repeated_path")
    assert w is not None and "./d.jsonl is d.jsonl again" in str(w), r.format()
