"""varlen_attention (Triton) against the HF-eager reference: packed documents, sinks, sliding window, GQA, grads.

CPU: the kernels run under TRITON_INTERPRET=1 in fp32 with small odd shapes and tiny tiles (many block edges).
GPU (-m gpu): bf16 at gpt-oss-20b head shapes, relative error <= 1e-2, a 128K-token document, no host syncs and
CUDA-graph capture. Every case runs per-head tiles (heads=1) and GQA-packed tiles (heads=8: the query heads of a kv
head share a tile's rows; capped at the group size, so groups of 1, 2, 3 and 4 pack 1, 2, 3 and 4 heads).
"""

import math

import pytest
import torch

from fastft.kernels import attention
from fastft.kernels.attention import _tiles, _VarlenAttention, varlen_attention, varlen_attention_reference


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _inputs(T, Hq, Hkv, D, sink_scale, dtype=torch.float32, device="cpu"):
    q = torch.randn(T, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    sinks = None
    if sink_scale is not None:
        sinks = (torch.randn(Hq, device=device) * sink_scale).to(dtype).requires_grad_()
    return q, k, v, sinks


def _run(fn, q, k, v, cu, sinks, window, do):
    out = fn(q, k, v, cu, sinks, window)
    wrt = [t for t in (q, k, v, sinks) if t is not None]
    return [out] + list(torch.autograd.grad(out, wrt, do))


def _upcast(*tensors):
    return [None if t is None else t.detach().float().requires_grad_() for t in tensors]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _with_heads(config, heads):
    return {kernel: (*tile[:4], heads) for kernel, tile in config.items()}


@pytest.fixture(params=[1, 8], ids=["per_head", "packed"])
def heads(request, monkeypatch):
    """Runs the test with the default tiles, one query head per tile or up to 8 heads packed."""
    monkeypatch.setattr(attention, "INTERPRET_CONFIG", _with_heads(attention.INTERPRET_CONFIG, request.param))
    monkeypatch.setattr(attention, "GPU_CONFIG",
                        {layer: _with_heads(c, request.param) for layer, c in attention.GPU_CONFIG.items()})
    return request.param


CASES = {
    # name: (document lengths, Hq, Hkv, D, window, sink scale)
    "mixed_empty_len1": ([1, 37, 5, 0, 21, 1], 6, 2, 16, None, 1.0),
    "mixed_window": ([1, 37, 5, 0, 21, 1], 6, 2, 16, 7, 1.0),
    "window_longer_than_doc": ([13, 40, 2], 4, 1, 16, 100, None),
    "window_one": ([9, 30], 2, 2, 16, 1, 1.0),
    "tiny_docs": ([1, 2, 3, 1, 0, 2] * 30, 3, 1, 16, None, 1.0),
    "tiny_docs_window": ([1, 2, 3, 1, 0, 2] * 30, 3, 1, 16, 2, 1.0),
    "head_dim_64_no_sinks": ([50, 19], 4, 2, 64, None, None),
    "head_dim_24": ([45], 3, 3, 24, 17, 1.0),
    "big_sinks": ([33, 28], 4, 2, 16, 11, 10.0),
    "leading_trailing_empty": ([0, 0, 29, 0, 0], 2, 1, 16, None, 1.0),
    "group_8_len1_docs": ([1, 1, 19, 0, 1, 6], 8, 1, 16, None, 10.0),
    "group_4_tiny_docs_window": ([1, 2, 3, 1, 0, 2] * 6, 8, 2, 16, 3, 1.0),
}


# packed tiles for every case with GQA (a group of 1 packs nothing: its packed run is the per-head one)
@pytest.mark.parametrize("heads,name", [(1, name) for name in CASES] + [(8, name) for name in CASES
                                                                        if CASES[name][1] > CASES[name][2]],
                         indirect=["heads"])
def test_matches_reference(name, heads):
    lengths, Hq, Hkv, D, window, sink_scale = CASES[name]
    cu = _cu(lengths)
    q, k, v, sinks = _inputs(int(cu[-1]), Hq, Hkv, D, sink_scale)
    if name == "big_sinks":  # one head far below the scores, one far above
        with torch.no_grad():
            sinks[0], sinks[1] = -10.0, 10.0
    do = torch.randn(q.shape)
    got = _run(varlen_attention, q, k, v, cu, sinks, window, do)
    ref = _run(varlen_attention_reference, q, k, v, cu, sinks, window, do)
    for what, a, b in zip(["out", "dq", "dk", "dv", "dsinks"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


def test_reference_bf16_sums_dsinks_in_fp32():
    """Hundreds of documents: the bf16 reference's d sinks must not be summed over documents in bf16."""
    torch.manual_seed(4)
    cu = _cu([1, 2, 5, 3, 0] * 80)
    q, k, v, sinks = _inputs(int(cu[-1]), 2, 1, 16, 3.0, dtype=torch.bfloat16)
    do = torch.randn(q.shape, dtype=torch.bfloat16)
    ref = _run(varlen_attention_reference, q, k, v, cu, sinks, None, do)
    truth = _run(varlen_attention_reference, *_upcast(q, k, v), cu, *_upcast(sinks), None, do.float())
    assert _rel(ref[-1], truth[-1]) <= 1e-2, _rel(ref[-1], truth[-1])


def test_heads_per_tile():
    """heads is capped at the largest divisor of the group size that fits the tile."""
    assert _tiles((64, 32, 4, 3), 8) == (64, 32, 4, 3, 1)
    assert [_tiles((64, 32, 4, 3, 8), g)[4] for g in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 3, 4, 6, 8, 8]
    assert [_tiles((16, 32, 4, 3, 4), g)[4] for g in (3, 6, 8)] == [3, 3, 4]
    assert _tiles((4, 16, 1, 1, 8), 8)[4] == 4


# tile shapes that differ between kernels and from each other move the masked/unmasked run boundaries; packed tiles
# (last field) mix full packing, partial packing (dkdv walks the group in two passes) and per-head tiles
@pytest.mark.parametrize("config,Hkv", [
    ({"fwd": (32, 16, 1, 1), "dq": (16, 32, 1, 1), "dkdv": (32, 16, 1, 1)}, 2),
    ({"fwd": (16, 32, 1, 1), "dq": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1)}, 2),
    ({"fwd": (32, 16, 1, 1, 4), "dq": (16, 32, 1, 1, 2), "dkdv": (32, 16, 1, 1, 2)}, 1),
    ({"fwd": (16, 32, 1, 1, 8), "dq": (32, 16, 1, 1, 1), "dkdv": (16, 16, 1, 1, 4)}, 1),
], ids=["per_head_a", "per_head_b", "packed_a", "packed_b"])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_tile_shapes(config, Hkv, window):
    cu = _cu([70, 3, 0, 44, 1, 17])
    q, k, v, sinks = _inputs(int(cu[-1]), 4, Hkv, 16, 2.0)
    do = torch.randn(q.shape)
    scale = 0.3
    fn = lambda q, k, v, cu, s, w: _VarlenAttention.apply(q, k, v, cu, s, w, scale, config)  # noqa: E731
    ref = lambda q, k, v, cu, s, w: varlen_attention_reference(q, k, v, cu, s, w, softmax_scale=scale)  # noqa: E731
    for a, b in zip(_run(fn, q, k, v, cu, sinks, window, do), _run(ref, q, k, v, cu, sinks, window, do)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_frozen_sinks_and_strided_inputs(heads):
    cu = _cu([23, 18])
    T, Hq, Hkv, D = 41, 4, 2, 16
    qkv = torch.randn(T, Hq + 2 * Hkv, D, requires_grad=True)  # fused projection: q/k/v are strided views
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    sinks = torch.randn(Hq)  # frozen, as in fastft
    out = varlen_attention(q, k, v, cu, sinks, 6)
    ref = varlen_attention_reference(q, k, v, cu, sinks, 6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    do = torch.randn(out.shape)
    (g,) = torch.autograd.grad(out, qkv, do)
    (g_ref,) = torch.autograd.grad(ref, qkv, do)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_no_tokens_and_bad_window():
    q = torch.zeros(0, 2, 16)
    k = torch.zeros(0, 1, 16)
    assert varlen_attention(q, k, k, _cu([0])).shape == (0, 2, 16)
    with pytest.raises(ValueError):
        varlen_attention(torch.zeros(3, 2, 16), torch.zeros(3, 1, 16), torch.zeros(3, 1, 16), _cu([3]), window=0)


# ---------------------------------------------------------------------------------------------------------- GPU


def _lognormal_lengths(T, seed, mean=math.log(600), sigma=1.0):
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < T:
        n = int(torch.empty(1).log_normal_(mean, sigma, generator=g).clamp(1, T).item())
        lengths.append(min(n, T - sum(lengths)))
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("docs", ["lognormal", "edge"])
def test_gpu_bf16_gptoss_shapes(window, docs, heads):
    torch.manual_seed(1)
    if docs == "lognormal":
        lengths = _lognormal_lengths(3000, seed=3)
    else:  # length-1 docs, empty docs, hundreds of tiny docs, a window longer than a doc
        lengths = [1, 0, 1, 100, 0, 0, 77] + [1, 2, 5, 3, 0] * 100 + [700, 1]
    cu = _cu(lengths, "cuda")
    q, k, v, sinks = _inputs(int(cu[-1]), 64, 8, 64, 3.0, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        sinks[:2] = torch.tensor([-10.0, 10.0])
    do = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    got = _run(varlen_attention, q, k, v, cu, sinks, window, do)
    ref = _run(varlen_attention_reference, q, k, v, cu, sinks, window, do)
    # ground truth: the same bf16 values upcast, everything in fp32 (the bf16 reference rounds its results too)
    truth = _run(varlen_attention_reference, *_upcast(q, k, v), cu, *_upcast(sinks), window, do.float())
    errs = {}
    for what, a, b, t in zip(["out", "dq", "dk", "dv", "dsinks"], got, ref, truth):
        assert torch.isfinite(a).all(), what
        errs[what] = {"kernel": round(_rel(a, t), 5), "bf16_reference": round(_rel(b, t), 5)}
    print(errs)
    bad = [what for what, e in errs.items() if e["kernel"] > 1e-2]
    assert not bad, f"kernel vs fp32 truth above 1e-2 for {bad}; relative errors vs fp32 truth: {errs}"


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_128k_single_document(window, heads):
    """One 131072-token document: runs in O(T) memory; its last rows match a direct computation."""
    torch.manual_seed(2)
    T, Hq, Hkv, D = 131072, 64, 8, 64
    cu = _cu([T], "cuda")
    q, k, v, sinks = _inputs(T, Hq, Hkv, D, 1.0, dtype=torch.bfloat16, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = varlen_attention(q, k, v, cu, sinks, window)
    out.backward(torch.randn_like(out))
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert peak_gib < 8, peak_gib  # q/k/v/o/grads are ~2.5 GiB; a T x T tensor would be 2 TiB
    for t in (q.grad, k.grad, v.grad, sinks.grad, out):
        assert torch.isfinite(t).all()
    rows = torch.arange(T - 48, T, device="cuda")
    with torch.no_grad():
        kk = k.float().repeat_interleave(Hq // Hkv, 1)  # [T, Hq, D]
        vv = v.float().repeat_interleave(Hq // Hkv, 1)
        lo = 0 if window is None else T - 48 - window + 1
        s = torch.einsum("rhd,thd->hrt", q[rows].float(), kk[lo:]) / math.sqrt(D)
        j = torch.arange(lo, T, device="cuda")
        visible = (j[None, :] <= rows[:, None])
        if window is not None:
            visible &= rows[:, None] - j[None, :] < window
        s = s.masked_fill(~visible, float("-inf"))
        s = torch.cat([s, sinks.float().view(Hq, 1, 1).expand(Hq, len(rows), 1)], -1)
        p = torch.softmax(s, -1)[..., :-1]
        expect = torch.einsum("hrt,thd->rhd", p, vv[lo:])
    assert _rel(out[rows], expect) <= 1e-2


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph(heads):
    torch.manual_seed(3)
    cu = _cu(_lognormal_lengths(2048, seed=5), "cuda")
    q, k, v, sinks = _inputs(2048, 64, 8, 64, 1.0, dtype=torch.bfloat16, device="cuda")
    do = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    step = lambda: torch.autograd.grad(varlen_attention(q, k, v, cu, sinks, 128), (q, k, v, sinks), do)  # noqa: E731
    expect = step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(grads, expect):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_packed_tile_grid(window):
    """The packed tile shapes `bench_attention.py --sweep` may pick (8 heads x 2-32 tokens per tile, 32-128 keys),
    each against fp32 truth; a shape the GPU cannot launch (shared memory) is skipped, as the sweep does."""
    from triton.runtime.errors import OutOfResources

    torch.manual_seed(5)
    lengths = [1, 0, 300, 1, 77] + [1, 2, 5, 3, 0] * 20 + _lognormal_lengths(1500, seed=6)
    cu = _cu(lengths, "cuda")
    q, k, v, sinks = _inputs(int(cu[-1]), 64, 8, 64, 3.0, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        sinks[:2] = torch.tensor([-10.0, 10.0])
    do = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    truth = _run(varlen_attention_reference, *_upcast(q, k, v), cu, *_upcast(sinks), window, do.float())
    errs, skipped = {}, []
    for bm in (16, 32, 64, 128, 256):
        for bn in (32, 64, 128):
            tile = (bm, bn, 4 if bm <= 64 else 8, 2, 8)
            config = {"fwd": tile, "dq": tile, "dkdv": tile}
            fn = lambda q, k, v, cu, s, w: _VarlenAttention.apply(q, k, v, cu, s, w, 0.125, config)  # noqa: E731
            try:
                got = _run(fn, q, k, v, cu, sinks, window, do)
            except OutOfResources:
                skipped.append(tile)
                continue
            names = ["out", "dq", "dk", "dv", "dsinks"]
            errs[tile] = {what: round(_rel(a, t), 5) for what, a, t in zip(names, got, truth)}
    print(errs, "skipped:", skipped)
    assert len(errs) >= 10, skipped
    bad = {tile: e for tile, e in errs.items() if max(e.values()) > 1e-2}
    assert not bad, f"relative error vs fp32 truth above 1e-2: {bad}"
