"""prepare(): refusal on errors, --skip-invalid, policies, eval split, on-disk cache reuse, determinism."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from fastft.assets import resolve_model
from fastft.data import IGNORE_INDEX, DataConfig, DataError, UsageError, collate, prepare, validate
from fastft.data import dataset as dataset_mod

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sample.jsonl"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("tiny"))


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def cfg(tmp_path, paths, **kw):
    kw.setdefault("max_seq_len", 256)
    return DataConfig(paths=paths, cache_dir=str(tmp_path / "cache"), **kw)


def qa(i):
    return {"question": f"What is item {i}?", "answer": f"Item {i} is a thing number {i}."}


def test_sample_validates_clean(tok, tmp_path):
    r = validate(cfg(tmp_path, [str(SAMPLE)], max_seq_len=4096), tok)
    assert r.ok and r.exit_code == 0 and not r.warnings, r.format()
    assert r.n_valid == r.n_rows >= 150 and len(r.shape_counts) == 5
    text = r.format()
    assert "packing efficiency: " in text and "tokens per row: min " in text and "result: OK" in text
    assert SAMPLE.stat().st_size < 400_000


def test_refuses_on_errors_and_skip_invalid_lists_what_it_skipped(tok, tmp_path):
    p = write(tmp_path, "d.jsonl", [qa(1), "{oops", qa(2), {"question": "q"}, qa(3)])
    with pytest.raises(DataError) as e:
        prepare(cfg(tmp_path, [p]), tok)
    assert f"{p}:2:2: invalid JSON" in str(e.value) and "--skip-invalid" in str(e.value)
    data = prepare(cfg(tmp_path, [p], skip_invalid=True), tok)
    assert data.num_rows == 3
    assert [(i.path, i.line) for i in data.report.skipped] == [(p, 2), (p, 4)]
    assert f"skipped 2 rows with errors: {p}:2,4" in data.report.format()
    assert [s[1] for s in data.sources()] == [1, 3, 5]


def test_validate_gives_the_training_verdict_with_skip_invalid(tok, tmp_path):
    """--validate-only --skip-invalid: the rows training would skip are listed, and the exit code says the data can
    be trained on; a file problem still fails."""
    p = write(tmp_path, "d.jsonl", [qa(1), "{oops", qa(2)])
    plain = validate(cfg(tmp_path, [p]), tok)
    assert plain.exit_code == 1 and plain.skipped is None
    r = validate(cfg(tmp_path, [p], skip_invalid=True), tok)
    assert r.exit_code == 0 and [(i.path, i.line) for i in r.skipped] == [(p, 2)]
    assert "training on the 2 valid rows (--skip-invalid)" in r.format()
    missing = validate(cfg(tmp_path, [p, str(tmp_path / "missing.jsonl")], skip_invalid=True), tok)
    assert missing.exit_code == 1 and missing.skipped is None


def test_file_problems_are_not_skippable(tok, tmp_path):
    p = write(tmp_path, "d.jsonl", [qa(1)])
    with pytest.raises(DataError, match="no such file"):
        prepare(cfg(tmp_path, [p, str(tmp_path / "missing.jsonl")], skip_invalid=True), tok)


def test_duplicates_counted_and_policy_explicit(tok, tmp_path):
    p = write(tmp_path, "d.jsonl", [qa(1), qa(2), qa(1), qa(1), {"user": "What is item 2?",
                                                                  "assistant": "Item 2 is a thing number 2."}])
    kept = prepare(cfg(tmp_path, [p]), tok)
    w = kept.report.warning("duplicate")
    assert w.count == 3 and w.where == [f"{p}:3", f"{p}:4", f"{p}:5"] and "kept" in w.message
    assert kept.num_rows == 5
    dropped = prepare(cfg(tmp_path, [p], drop_duplicates=True), tok)
    assert dropped.num_rows == 2 and "dropped" in dropped.report.warning("duplicate").message


def test_overlong_truncate_or_drop(tok, tmp_path):
    long = {"question": "Tell me everything.", "answer": "word " * 400}
    long_prompt = {"question": "word " * 400, "answer": "short"}
    p = write(tmp_path, "d.jsonl", [qa(1), long, long_prompt])
    t = prepare(cfg(tmp_path, [p], max_seq_len=128), tok)
    w = t.report.warning("overlong")
    assert w.count == 2 and w.where == [f"{p}:2", f"{p}:3"] and "truncated" in w.message
    # the long prompt leaves no assistant token inside 128 tokens: dropped, and said so
    assert t.report.warning("untrainable").where == [f"{p}:3"]
    assert t.num_rows == 2 and max(r.num_tokens for r in t.packed_rows()) <= 128
    assert t.report.token_stats["max"] > 400
    d = prepare(cfg(tmp_path, [p], max_seq_len=128, overlong="drop"), tok)
    assert d.num_rows == 1 and "dropped" in d.report.warning("overlong").message


def test_all_rows_dropped_is_an_error(tok, tmp_path):
    p = write(tmp_path, "d.jsonl", [{"question": "q", "answer": "word " * 400}])
    r = validate(cfg(tmp_path, [p], max_seq_len=64, overlong="drop"), tok)
    assert not r.ok and "no rows left to train on" in r.format()
    assert "the shortest row has" in r.format() and "raise --max-seq-len above 64" in r.format()


def test_cache_reused_and_keyed(tok, tmp_path, monkeypatch):
    p = write(tmp_path, "d.jsonl", [qa(i) for i in range(20)])
    first = prepare(cfg(tmp_path, [p]), tok)
    assert not first.cache_hit and Path(first.cache_file).exists()

    def boom(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(dataset_mod, "_encode_batch", boom)
    second = prepare(cfg(tmp_path, [p]), tok)
    assert second.cache_hit and second.cache_file == first.cache_file
    assert [r.input_ids.tolist() for r in second.packed_rows()] == [r.input_ids.tolist() for r in first.packed_rows()]
    monkeypatch.undo()
    # another max length, train_on_all or data -> another cache file
    files = {first.cache_file, prepare(cfg(tmp_path, [p], max_seq_len=512), tok).cache_file,
             prepare(cfg(tmp_path, [p], train_on_all=True), tok).cache_file}
    write(tmp_path, "d.jsonl", [qa(i) for i in range(21)])
    files.add(prepare(cfg(tmp_path, [p]), tok).cache_file)
    assert len(files) == 4


@pytest.mark.parametrize("damage", ["cut", "empty", "foreign"])
def test_an_unreadable_cache_file_is_rebuilt_with_one_warning(tok, tmp_path, capsys, damage):
    """A cache file cut short (a kill or a full disk while it was written), empty, or another file under our key."""
    p = write(tmp_path, "d.jsonl", [qa(i) for i in range(20)])
    first = prepare(cfg(tmp_path, [p]), tok)
    cache = Path(first.cache_file)
    if damage == "foreign":
        other = prepare(cfg(tmp_path, [write(tmp_path, "e.jsonl", [qa(i) for i in range(5)])]), tok)
        cache.write_bytes(Path(other.cache_file).read_bytes())
    else:
        cache.write_bytes(cache.read_bytes()[:len(cache.read_bytes()) // 2 if damage == "cut" else 0])
    capsys.readouterr()
    again = prepare(cfg(tmp_path, [p]), tok)
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith(f"fastft: warning: tokenisation cache {cache} is unreadable (")
    assert warning.endswith("; rebuilding it") and not again.cache_hit
    assert [r.input_ids.tolist() for r in again.packed_rows()] == [r.input_ids.tolist() for r in first.packed_rows()]
    assert prepare(cfg(tmp_path, [p]), tok).cache_hit  # the rebuilt file serves the next run


def test_data_hashes_and_counts(tok, tmp_path):
    p = write(tmp_path, "d.jsonl", [qa(i) for i in range(10)])
    data = prepare(cfg(tmp_path, [p]), tok)
    assert data.data_hashes == {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()}
    rows = data.packed_rows()
    assert sum(r.num_tokens for r in rows) == data.num_tokens
    assert sum(r.num_trainable for r in rows) == data.num_trainable_tokens > 0
    assert data.report.n_tokens == data.num_tokens
    assert 0 < data.packing_efficiency <= 1


def test_eval_split_deterministic_by_conversation(tok, tmp_path):
    p = write(tmp_path, "d.jsonl", [qa(i) for i in range(40)])
    a = prepare(cfg(tmp_path, [p], eval_fraction=0.2, seed=1), tok)
    b = prepare(cfg(tmp_path, [p], eval_fraction=0.2, seed=1), tok)
    c = prepare(cfg(tmp_path, [p], eval_fraction=0.2, seed=2), tok)
    assert a.num_eval_rows == 8 and a.num_rows == 32
    assert a.sources("eval") == b.sources("eval") != c.sources("eval")
    assert not set(a.sources("eval")) & set(a.sources("train"))
    assert sum(len(r.doc_indices) for r in a.packed_rows("eval")) == 8
    assert [r.doc_indices.tolist() for r in a.packed_rows("eval", 0)] == \
        [r.doc_indices.tolist() for r in a.packed_rows("eval", 3)]


def test_packed_rows_deterministic_per_epoch_and_collate(tok, tmp_path):
    data = prepare(cfg(tmp_path, [str(SAMPLE)], max_seq_len=512), tok)
    e0, e0b, e1 = data.packed_rows(epoch=0), data.packed_rows(epoch=0), data.packed_rows(epoch=1)
    assert [r.doc_indices.tolist() for r in e0] == [r.doc_indices.tolist() for r in e0b]
    assert [r.doc_indices.tolist() for r in e0] != [r.doc_indices.tolist() for r in e1]
    assert sorted(np.concatenate([r.doc_indices for r in e1]).tolist()) == list(range(data.num_rows))
    batch = collate(e0[:3])
    cu = batch["cu_seqlens"].tolist()
    assert all(batch["labels"][s] == IGNORE_INDEX for s in cu[:-1])
    ret = tok.convert_tokens_to_ids("<|return|>")
    assert all(batch["input_ids"][e - 1] == ret for e in cu[1:])  # every document ends with <|return|>


def test_foreign_chat_template_is_a_usage_error(tmp_path):
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    tok.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    p = write(tmp_path, "d.jsonl", [qa(1)])
    with pytest.raises(UsageError, match="chat template"):
        prepare(cfg(tmp_path, [p]), tok)


@pytest.mark.parametrize("via_env", [True, False])
def test_cache_folder_that_is_a_file_is_a_usage_error(tok, tmp_path, monkeypatch, via_env):
    """$FASTFT_CACHE (or cache_dir) naming a file: a UsageError naming where the folder came from and the file, not
    the OSError of a mkdir deep in tokenisation."""
    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    p = write(tmp_path, "d.jsonl", [qa(1), qa(2)])
    monkeypatch.setenv("FASTFT_CACHE", str(blocker))
    config = DataConfig(paths=[p], max_seq_len=256, cache_dir=None if via_env else str(blocker))
    where = f"FASTFT_CACHE={blocker}" if via_env else f"cache_dir {blocker}"
    fix = "set FASTFT_CACHE to a folder" if via_env else "pass another cache_dir"
    message = f"{where}: {blocker} is a file, not a folder; {fix}"
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        prepare(config, tok)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "fresh"))  # a folder that does not exist yet is made
    assert prepare(DataConfig(paths=[p], max_seq_len=256), tok).cache_file.startswith(str(tmp_path / "fresh" / "data"))
