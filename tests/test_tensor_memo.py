"""fastft.tensor_memo.TensorMemo: a cached value lives exactly as long as its tensor stays the same and unmodified."""

import gc

import torch

from fastft.kernels.attention import _build_doc_tables, _doc_tables
from fastft.tensor_memo import TensorMemo


def test_memo_hits_misses_and_dies_with_the_tensor():
    memo, calls = TensorMemo(), []

    def make(t):
        return lambda: calls.append(1) or t.sum().item()

    t = torch.arange(5)
    assert memo.get(t, "k", make(t)) == 10 and memo.get(t, "k", make(t)) == 10 and len(calls) == 1
    assert memo.get(t, "other key", make(t)) == 10 and len(calls) == 2
    t.add_(1)  # in place: the version counter moves
    assert memo.get(t, "other key", make(t)) == 15 and len(calls) == 3
    u = t.clone()  # equal values, another tensor
    assert memo.get(u, "other key", make(u)) == 15 and len(calls) == 4
    del t
    gc.collect()
    assert len(memo._entries) == 1  # t's entry went with t
    with torch.inference_mode():
        v = torch.ones(3)
    assert memo.get(v, "k", make(v)) == 3 and memo.get(v, "k", make(v)) == 3 and len(calls) == 6  # never cached


def test_attention_doc_tables_follow_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32)
    first = _doc_tables(cu, 10)
    assert _doc_tables(cu, 10) is first  # the next layer reuses them
    cu[1] = 2  # edited in place: rebuilt
    for got, want in zip(_doc_tables(cu, 10), _build_doc_tables(cu, 10)):
        assert torch.equal(got, want)
    assert not torch.equal(_doc_tables(cu, 10)[0], first[0])
