"""validate() and prepare(): files -> checked conversations -> cached tokens -> policies -> splits -> packed rows."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from .config import DataConfig, DataError, UsageError
from .packing import PackedRow, pack, packing_efficiency
from .reading import read_jsonl
from .render import IGNORE_INDEX, RENDER_VERSION, encode, tokenizer_fingerprint
from .report import DataWarning, Issue, ValidationReport, plural
from .shapes import Conversation, RowProblem, normalise


@dataclass
class _Checked:
    report: ValidationReport
    conversations: list[Conversation] = field(default_factory=list)
    sources: list[tuple[str, int]] = field(default_factory=list)
    row_errors: list[Issue] = field(default_factory=list)  # skippable with --skip-invalid
    data_hashes: dict = field(default_factory=dict)


def _check(cfg: DataConfig) -> _Checked:
    """Read and normalise every file; never raises for bad data."""
    report = ValidationReport(max_seq_len=cfg.max_seq_len)
    out = _Checked(report)
    seen_paths: dict[str, str] = {}  # the same file by any spelling (a.jsonl, ./a.jsonl) -> as first given
    ignored_where, thinking_where = [], []
    for path in cfg.paths:
        key = os.path.realpath(path)
        if key in seen_paths:
            first = seen_paths[key]
            same = f"{path} is given twice" if first == path else f"{path} is {first} again"
            report.warnings.append(DataWarning("repeated_path", 1, f"{same}; read once"))
            continue
        seen_paths[key] = path
        fr = read_jsonl(path)
        report.files.append((path, fr.n_lines, fr.sha256))
        if fr.sha256:
            out.data_hashes[path] = fr.sha256
        report.n_rows += fr.n_lines
        file_issues = [i for i in fr.issues if i.line is None]
        report.errors.extend(file_issues)
        row_issues = [i for i in fr.issues if i.line is not None]
        n_valid_here = 0
        for raw in fr.rows:
            try:
                conv = normalise(raw.obj)
            except RowProblem as e:
                row_issues.append(Issue(path, raw.line, None, str(e)))
                continue
            n_valid_here += 1
            out.conversations.append(conv)
            out.sources.append((path, raw.line))
            report.shape_counts[conv.shape] = report.shape_counts.get(conv.shape, 0) + 1
            if conv.ignored_keys:
                ignored_where.append((f"{path}:{raw.line}", conv.ignored_keys))
            if conv.dropped_thinking:
                thinking_where.append(f"{path}:{raw.line}")
        row_issues.sort(key=lambda i: i.line)
        report.errors.extend(row_issues)
        out.row_errors.extend(row_issues)
        report.n_valid += n_valid_here
        if fr.n_lines and not n_valid_here and not file_issues:  # (a file problem already says why)
            report.errors.append(Issue(path, None, None, f"no usable rows (all {fr.n_lines:,} rows have errors)"))
    if ignored_where:
        keys = sorted({k for _, ks in ignored_where for k in ks})
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        report.warnings.append(DataWarning(
            "ignored_keys", len(ignored_where), f"{plural(len(ignored_where), 'row')} with keys fastft ignores "
                                                f"({shown})",
            [w for w, _ in ignored_where]))
    if thinking_where:
        report.warnings.append(DataWarning(
            "dropped_thinking", len(thinking_where),
            f"{plural(len(thinking_where), 'row')} with thinking on an earlier assistant turn: not trained (as "
            f"gpt-oss's template, only the final assistant turn keeps its thinking)", thinking_where))
    return out


# ----------------------------------------------------------------------------------------------- tokenisation

def _encode_batch(batch, tokenizer, max_seq_len, train_on_all, reasoning_effort):
    convs = [json.loads(m) for m in batch["messages"]]
    ids, labels = encode(convs, tokenizer, train_on_all, reasoning_effort)
    # Truncation keeps the head: the prompt and the start of the answer; n_full keeps the true length for the report.
    return {"input_ids": [x[:max_seq_len] for x in ids], "labels": [y[:max_seq_len] for y in labels],
            "n_full": [len(x) for x in ids]}


def _cache_key(cfg: DataConfig, tokenizer, data_hashes: dict) -> str:
    key = {"fastft": __version__, "render": RENDER_VERSION, "data": [data_hashes.get(p) for p in cfg.paths],
           "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_len": cfg.max_seq_len,
           "train_on_all": cfg.train_on_all, "reasoning_effort": cfg.reasoning_effort}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _tokenise(checked: _Checked, cfg: DataConfig, tokenizer):
    """Tokens through datasets.map, cached on disk under the key above; returns (flat ids, flat labels, offsets,
    n_full, cache file, cache hit). A cache file that cannot be read (cut short by a kill or a full disk, or not
    ours) is rebuilt, with one warning."""
    # A tokenizer or template fastft cannot use fails here with a UsageError, not inside datasets.map.
    encode([checked.conversations[0].messages], tokenizer, cfg.train_on_all, cfg.reasoning_effort)
    cache_dir = cfg.make_cache_dir()
    key = _cache_key(cfg, tokenizer, checked.data_hashes)
    cache_file = cache_dir / f"tokens-{key}.arrow"
    hit = cache_file.exists()
    messages = [json.dumps(c.messages, ensure_ascii=False) for c in checked.conversations]

    def columns():
        return _columns(_map_cached(messages, cfg, tokenizer, cache_file, key), len(messages))

    try:
        return (*columns(), cache_file, hit)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, a short read an OSError
        if not hit:
            raise
        problem = f"{type(e).__name__}: {e}"
    print(f"fastft: warning: tokenisation cache {cache_file} is unreadable ({problem}); rebuilding it",
          file=sys.stderr)
    try:
        cache_file.unlink(missing_ok=True)
        return (*columns(), cache_file, False)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenisation cache {cache_file} is unreadable and could not be rebuilt ({e}); delete it "
                         f"and retry, or set FASTFT_CACHE to another folder") from None


def _map_cached(messages: list[str], cfg: DataConfig, tokenizer, cache_file, key: str):
    import datasets  # slow import, only needed here

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "n_full": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"messages": messages}).map(
        _encode_batch, batched=True, batch_size=1000, remove_columns=["messages"], features=features,
        cache_file_name=str(cache_file), load_from_cache_file=True, new_fingerprint=key,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_len": cfg.max_seq_len, "train_on_all": cfg.train_on_all,
                   "reasoning_effort": cfg.reasoning_effort}, desc="fastft: tokenising")


def _columns(ds, n_rows: int):
    """(ids, labels, offsets, n_full) as flat numpy arrays; ValueError for a file that does not hold our rows."""
    if len(ds) != n_rows:  # a foreign or stale file under our key
        raise ValueError(f"it holds {len(ds)} rows, not {n_rows}")
    ids_col = ds.data.column("input_ids").combine_chunks()
    labels_col = ds.data.column("labels").combine_chunks()
    offsets = np.asarray(ids_col.offsets, dtype=np.int64)
    if not np.array_equal(offsets, np.asarray(labels_col.offsets, dtype=np.int64)):
        raise ValueError("its token and label columns disagree")
    ids = np.asarray(ids_col.values, dtype=np.int32)
    labels = np.asarray(labels_col.values, dtype=np.int32)
    n_full = np.asarray(ds.data.column("n_full").combine_chunks(), dtype=np.int64)
    return ids, labels, offsets, n_full


def _gather(ids, labels, offsets, docs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The documents `docs` as a new flat (ids, labels, offsets)."""
    docs = np.asarray(docs, dtype=np.int64)
    lens = offsets[docs + 1] - offsets[docs]
    new_off = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    idx = np.arange(new_off[-1], dtype=np.int64) + np.repeat(offsets[docs] - new_off[:-1], lens)
    return ids[idx], labels[idx], new_off


# ----------------------------------------------------------------------------------------------- policies

def _apply_policies(checked: _Checked, cfg: DataConfig, offsets, labels, n_full) -> np.ndarray:
    """Duplicate / overlong / untrainable rows -> counted warnings; returns the indices of the rows kept."""
    report, src = checked.report, checked.sources
    keep = np.ones(len(checked.conversations), dtype=bool)

    def where(rows) -> list[str]:
        return [f"{src[i][0]}:{src[i][1]}" for i in rows]

    first: dict[str, int] = {}
    dups = []
    for i, conv in enumerate(checked.conversations):
        d = conv.digest()
        if d in first:
            dups.append(i)
        else:
            first[d] = i
    if dups:
        if cfg.drop_duplicates:
            keep[dups] = False
        action = "dropped (--drop-duplicates)" if cfg.drop_duplicates else "kept (--drop-duplicates drops them)"
        report.warnings.append(DataWarning("duplicate", len(dups), f"{plural(len(dups), 'duplicate row')}: {action}",
                                           where(dups)))

    over = np.flatnonzero(n_full > cfg.max_seq_len)
    if over.size:
        if cfg.overlong == "drop":
            keep[over] = False
            action = "dropped (--overlong drop)"
        else:
            action = "truncated to their first tokens (--overlong drop drops them instead)"
        report.warnings.append(DataWarning(
            "overlong", int(over.size), f"{plural(over.size, 'row')} longer than --max-seq-len {cfg.max_seq_len} "
            f"tokens: {action}", where(over)))

    trained = np.add.reduceat(labels != IGNORE_INDEX, offsets[:-1]) if len(offsets) > 1 else np.zeros(0, int)
    untrainable = np.flatnonzero(keep & (trained == 0))
    if untrainable.size:
        keep[untrainable] = False
        report.warnings.append(DataWarning(
            "untrainable", int(untrainable.size), f"{plural(untrainable.size, 'row')} with no assistant tokens left "
            f"after truncation to {cfg.max_seq_len} tokens: dropped", where(untrainable)))
    return np.flatnonzero(keep)


def _eval_split(checked: _Checked, kept: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic by seed and content (not position): identical conversations land in the same split."""
    n = len(kept)
    n_eval = min(max(1, round(n * cfg.eval_fraction)), n - 1) if cfg.eval_fraction > 0 and n >= 2 else 0
    if cfg.eval_fraction > 0 and n_eval == 0:
        checked.report.warnings.append(DataWarning("no_eval", 1, f"--eval-fraction {cfg.eval_fraction}: too few "
                                                                 f"rows ({n}) to hold any out; no eval set"))
    if n_eval == 0:
        return kept, kept[:0]
    score = [hashlib.sha256(f"{cfg.seed}:{checked.conversations[i].digest()}".encode()).hexdigest() for i in kept]
    order = np.argsort(np.asarray(score), kind="stable")
    is_eval = np.zeros(n, dtype=bool)
    is_eval[order[:n_eval]] = True
    return kept[~is_eval], kept[is_eval]


# ----------------------------------------------------------------------------------------------- public API

@dataclass
class _Split:
    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    sources: list[tuple[str, int]]

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trainable(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class PreparedData:
    """Tokenised, policy-applied, split data. packed_rows() packs on demand (deterministic per seed + epoch)."""

    def __init__(self, cfg: DataConfig, report: ValidationReport, splits: dict, data_hashes: dict,
                 cache_file: str, cache_hit: bool):
        self.cfg = cfg
        self.report = report
        self.data_hashes = data_hashes  # {path: sha256 of the file's bytes}
        self.cache_file = cache_file
        self.cache_hit = cache_hit  # tokens came from the on-disk cache
        self._splits = splits
        train = splits["train"]
        self.num_rows = train.num_rows  # conversations in the train split
        self.num_tokens = train.num_tokens
        self.num_trainable_tokens = train.num_trainable
        self.num_eval_rows = splits["eval"].num_rows
        self.packing_efficiency, self.num_packed_rows = packing_efficiency(np.diff(train.offsets),
                                                                           cfg.max_seq_len)

    def sources(self, split: str = "train") -> list[tuple[str, int]]:
        """(path, line) of each conversation of the split, in the order PackedRow.doc_indices refers to."""
        return self._split(split).sources

    def packed_rows(self, split: str = "train", epoch: int = 0) -> list[PackedRow]:
        """The split packed into rows of <= max_seq_len tokens. Train: document ties and row order shuffled by
        (seed, epoch); eval: one fixed packing, same for every epoch."""
        s = self._split(split)
        if s.num_rows == 0:
            return []
        rng = np.random.default_rng([self.cfg.seed, epoch]) if split == "train" else None
        return pack(s.ids, s.labels, s.offsets, self.cfg.max_seq_len, rng)

    def _split(self, split: str) -> _Split:
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        return self._splits[split]


def _build(cfg: DataConfig, tokenizer):
    cfg.check()
    checked = _check(cfg)
    report = checked.report
    if tokenizer is None or not checked.conversations:
        return checked, None
    ids, labels, offsets, n_full, cache_file, hit = _tokenise(checked, cfg, tokenizer)
    kept = _apply_policies(checked, cfg, offsets, labels, n_full)
    report.token_stats = {"min": int(n_full.min()), "median": int(np.median(n_full)),
                          "p95": int(np.percentile(n_full, 95, method="higher")), "max": int(n_full.max())}
    lengths = np.diff(offsets)[kept]
    report.n_used = len(kept)
    report.n_tokens = int(lengths.sum())
    trained = np.add.reduceat(labels != IGNORE_INDEX, offsets[:-1])
    report.n_trainable = int(trained[kept].sum())
    report.packing_efficiency, report.n_packed = packing_efficiency(lengths, cfg.max_seq_len)
    if not len(kept):
        shortest = report.token_stats["min"]
        hint = (f" (the shortest row has {shortest:,} tokens, prompt and chat format included: raise --max-seq-len "
                f"above {cfg.max_seq_len:,})" if shortest >= cfg.max_seq_len else "")
        report.errors.append(Issue("", None, None, f"no rows left to train on after the warnings' policies{hint}"))
    splits = {}
    for name, docs in zip(("train", "eval"), _eval_split(checked, kept, cfg)):
        sids, slabels, soff = _gather(ids, labels, offsets, docs)
        splits[name] = _Split(sids, slabels, soff, [checked.sources[i] for i in docs])
    return checked, (splits, str(cache_file), hit)


def validate(cfg: DataConfig, tokenizer=None) -> ValidationReport:
    """Check the data and report on it; never raises for bad data (UsageError for bad option values).
    Without a tokenizer, token statistics and packing efficiency are left out."""
    checked, _ = _build(cfg, tokenizer)
    _apply_skip_invalid(cfg, checked)
    return checked.report


def _apply_skip_invalid(cfg: DataConfig, checked) -> bool:
    """--skip-invalid: when every error is about a row (not a file or the data as a whole), those rows are
    skipped and listed. True when the data can be trained on. The same verdict for --validate-only and training."""
    report = checked.report
    fatal = any(not e.skippable for e in report.errors)
    if report.errors and cfg.skip_invalid and not fatal:
        report.skipped = list(checked.row_errors)
    return not fatal and (not report.errors or cfg.skip_invalid)


def prepare(cfg: DataConfig, tokenizer) -> PreparedData:
    """validate(), then the data ready for training. Raises DataError(report text) when there are errors, unless
    cfg.skip_invalid, which trains on the valid rows and lists the skipped ones in the report. Errors about files
    themselves (missing, a directory, empty, no usable rows) are never skipped."""
    checked, built = _build(cfg, tokenizer)
    report = checked.report
    if not _apply_skip_invalid(cfg, checked) or built is None:
        raise DataError(report.format())
    splits, cache_file, hit = built
    return PreparedData(cfg, report, splits, dict(checked.data_hashes), cache_file, hit)
