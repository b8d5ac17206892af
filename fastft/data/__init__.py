"""fastft's data path: JSONL files -> validated conversations -> harmony tokens + loss masks -> packed rows.

Typical use (the trainer and CLI)::

    from fastft.data import DataConfig, validate, prepare, collate, DataError, UsageError

    cfg = DataConfig(paths=["a.jsonl", "b.jsonl.gz"], max_seq_len=4096, seed=0, eval_fraction=0.05)
    report = validate(cfg, tokenizer)          # --validate-only: print(report.format()); exit(report.exit_code)
    data = prepare(cfg, tokenizer)             # raises DataError(report text) on errors unless cfg.skip_invalid
    print(data.report.format())
    for epoch in range(epochs):
        rows = data.packed_rows("train", epoch=epoch)       # list[PackedRow], shuffled per (seed, epoch)
        for i in range(0, len(rows), rows_per_step):
            batch = collate(rows[i:i + rows_per_step])      # one token stream, see collate()

DataConfig fields (CLI flag in brackets; the report's messages name these flags):
  paths            .jsonl / .jsonl.gz files [positional]
  max_seq_len      packed row capacity = longest conversation [--max-seq-len, default 4096]
  train_on_all     train on every token, not only assistant output [--train-on-all]
  skip_invalid     train on the valid rows when some rows have errors [--skip-invalid]
  overlong         rows over max_seq_len: "truncate" (keep the head) | "drop" [--overlong]
  drop_duplicates  drop exact duplicate conversations (kept by default; counted either way) [--drop-duplicates]
  seed             packing order, per-epoch shuffles, eval split [--seed]
  eval_fraction    share of conversations held out [--eval-fraction]
  cache_dir        tokenisation cache [default $FASTFT_CACHE or ~/.cache/fastft; files under <dir>/data]
  reasoning_effort the harmony system message's "Reasoning:" (low | medium | high; default medium)

validate(cfg, tokenizer=None) -> ValidationReport
  Never raises for bad data (UsageError for impossible option values, e.g. --max-seq-len 0, a tokenizer
  without harmony tokens, or a cache folder that cannot be made, e.g. $FASTFT_CACHE naming a file). report.ok,
  .exit_code (0 clean, or only rows --skip-invalid skips / 1 errors), .errors (list[Issue]: str(issue) is
  "PATH:LINE[:COL]: message", or "PATH: message" for a file problem), .warnings (list[DataWarning]: code, exact
  count, message saying what was done and which flag changes it, PATH:LINE examples), .n_rows, .n_valid,
  .n_invalid, .shape_counts, .token_stats (min/median/p95/max tokens per valid row, before truncation), .n_tokens,
  .n_trainable, .packing_efficiency, .format() (the human report, ending in "packing efficiency: NN.N%").
  With tokenizer=None only the structure is checked (no token statistics).

prepare(cfg, tokenizer) -> PreparedData
  Runs the same checks. Errors -> DataError(report text), unless cfg.skip_invalid: then rows with errors are
  skipped and report.skipped lists them all (file problems - missing, directory, pipe, empty, no usable rows - are
  never skipped). Tokenises through datasets.map, cached at <cache>/data/tokens-<key>.arrow, key = file sha256s
  + tokenizer + chat template + max_seq_len + train_on_all + fastft's rendering version (data.cache_hit says
  whether it was reused; an unreadable cache file is rebuilt, with a warning on stderr). Then duplicates / overlong
  rows per policy, then a deterministic eval split by conversation (by seed and content, so duplicates share a
  split). Exposes .report, .data_hashes {path: sha256},
  .num_rows / .num_tokens / .num_trainable_tokens (train split), .num_eval_rows, .packing_efficiency and
  .num_packed_rows (train, epoch 0), .sources(split) [(path, line)], .packed_rows(split="train"|"eval", epoch).

PackedRow: numpy int32 input_ids [t], labels [t] (-100 = not trained; aligned with input_ids, NOT shifted),
  position_ids [t] (restart at 0 per document), int32 cu_seqlens [n_docs + 1], doc_indices [n_docs]; t <= max_seq_len.
collate(rows) -> {"input_ids", "labels", "position_ids": int64 [T], "cu_seqlens": int32 [n_docs + 1]}: the rows
  back to back as one stream. The model shifts labels within the stream; every document's first label is -100,
  so no position learns to predict across a document boundary.

Accepted row shapes and their rules: fastft.data.shapes. Rendering and what is trained: fastft.data.render
(the tokenizer's own chat template with the date pinned; trained: assistant content + its <|end|>/<|return|>,
and the final turn's thinking + <|end|>).
Packing: fastft.data.packing.
"""

from .config import DataConfig, DataError, UsageError
from .dataset import PreparedData, prepare, validate
from .packing import PackedRow, best_fit_decreasing, collate, pack
from .render import IGNORE_INDEX, PINNED_DATE, encode, harmony_text, render, segments
from .report import DataWarning, Issue, ValidationReport
from .shapes import ACCEPTED, Conversation, RowProblem, normalise

__all__ = [
    "ACCEPTED", "Conversation", "DataConfig", "DataError", "DataWarning", "IGNORE_INDEX", "Issue", "PINNED_DATE",
    "PackedRow", "PreparedData", "RowProblem", "UsageError", "ValidationReport", "best_fit_decreasing", "collate",
    "encode", "harmony_text", "normalise", "pack", "prepare", "render", "segments", "validate",
]
