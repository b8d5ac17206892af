"""Best-fit-decreasing packing of tokenised conversations into rows of at most max_seq_len tokens.

Each packed row is a few whole documents back to back, with position_ids restarting at 0 per document and
cu_seqlens (int32) marking the boundaries, so varlen attention keeps documents apart. Labels stay aligned with
input_ids (the model shifts them); each document's first label is already -100 (render.py), so the last token of a
document never learns to predict the first token of the next.

Best fit: each document (longest first) goes into the open row with the least room that still fits it, else a new
row. With many short documents this fills rows to ~99.9 %; it is O(n log n) plus a memmove per document on a
sorted Python list of open rows, i.e. ~100k documents per second. Memory: the packed rows are views of one copy of
the token data per call (input_ids, labels, position_ids as int32: 12 bytes per token).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np
import torch

_SHIFT = 32  # open rows are kept as one int: remaining_room << 32 | row_index, so bisect orders by room


@dataclass
class PackedRow:
    input_ids: np.ndarray  # [t] int32 (collate widens to int64; int32 keeps an epoch's rows 3x smaller)
    labels: np.ndarray  # [t] int32, -100 where not trained
    position_ids: np.ndarray  # [t] int32, 0.. per document
    cu_seqlens: np.ndarray  # [n_docs + 1] int32, 0 .. t
    doc_indices: np.ndarray  # [n_docs] int64, which documents (rows of the split) this row holds

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trainable(self) -> int:
        return int((self.labels != -100).sum())


def best_fit_decreasing(lengths: np.ndarray, capacity: int, rng: np.random.Generator | None = None
                        ) -> list[list[int]]:
    """Bins of document indices, each bin's lengths summing to <= capacity. rng breaks ties between equal lengths
    (so epochs differ); without it, ties keep input order. Every length must be in [1, capacity]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"document lengths must be in [1, {capacity}]")
    perm = rng.permutation(lengths.size) if rng is not None else np.arange(lengths.size)
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    bins: list[list[int]] = []
    open_rows: list[int] = []  # sorted keys: room << 32 | bin index
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect_left(open_rows, n << _SHIFT)
        if k == len(open_rows):
            b, room = len(bins), capacity - n
            bins.append([i])
        else:
            key = open_rows.pop(k)
            b, room = key & ((1 << _SHIFT) - 1), (key >> _SHIFT) - n
            bins[b].append(i)
        if room > 0:
            insort(open_rows, (room << _SHIFT) | b)
    return bins


def packing_efficiency(lengths: np.ndarray, capacity: int) -> tuple[float, int]:
    """(real tokens / row capacity, number of rows) for best-fit-decreasing packing of these lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 0.0, 0
    n_rows = len(best_fit_decreasing(lengths, capacity))
    return float(lengths.sum()) / (n_rows * capacity), n_rows


def pack(ids_flat: np.ndarray, labels_flat: np.ndarray, offsets: np.ndarray, capacity: int,
         rng: np.random.Generator | None = None) -> list[PackedRow]:
    """Documents given as one flat token array with offsets [n_docs + 1] -> packed rows, in shuffled order when
    rng is given (else in packing order)."""
    lengths = np.diff(offsets)
    bins = best_fit_decreasing(lengths, capacity, rng)
    if rng is not None:
        bins = [bins[i] for i in rng.permutation(len(bins))]
    # One vectorised gather for all rows, then per-row slices of it.
    doc_order = np.fromiter((d for docs in bins for d in docs), dtype=np.int64, count=len(lengths))
    lens = lengths[doc_order]
    ends = np.cumsum(lens)
    starts = ends - lens
    idx = np.arange(int(ends[-1]) if lens.size else 0, dtype=np.int64) + np.repeat(offsets[doc_order] - starts, lens)
    ids, labels = ids_flat[idx].astype(np.int32), labels_flat[idx].astype(np.int32)
    pos = (np.arange(idx.size, dtype=np.int64) - np.repeat(starts, lens)).astype(np.int32)
    rows, d0 = [], 0
    for docs in bins:
        d1 = d0 + len(docs)
        t0, t1 = int(starts[d0]), int(ends[d1 - 1])
        cu = np.concatenate([[0], ends[d0:d1] - t0]).astype(np.int32)
        rows.append(PackedRow(ids[t0:t1], labels[t0:t1], pos[t0:t1], cu, doc_order[d0:d1]))
        d0 = d1
    return rows


def collate(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    """Packed rows -> one token stream: input_ids/labels/position_ids [T] int64, cu_seqlens [n_docs + 1] int32.
    Documents never cross rows, so the rows' boundaries are among the documents' boundaries."""
    if not rows:
        raise ValueError("collate needs at least one packed row")
    starts = np.cumsum([0] + [r.num_tokens for r in rows[:-1]])
    cu = np.concatenate([np.zeros(1, np.int64)] + [r.cu_seqlens[1:].astype(np.int64) + s
                                                   for r, s in zip(rows, starts)])
    return {
        "input_ids": torch.from_numpy(np.concatenate([r.input_ids for r in rows]).astype(np.int64)),
        "labels": torch.from_numpy(np.concatenate([r.labels for r in rows]).astype(np.int64)),
        "position_ids": torch.from_numpy(np.concatenate([r.position_ids for r in rows]).astype(np.int64)),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
    }
