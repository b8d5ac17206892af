"""fastft.kernels.lora_linear: both paths (fused dequant + LoRA GEMM; slab decode + cuBLAS) against the
dequantise-then-matmul reference.

CPU: Triton interpreter, fp32, small odd shapes, all three weight formats, forward and backward (dX, dA, dB, db);
the slab path with a shrunk SLAB_BYTES so slabs are several and do not divide out / in.
GPU (-m gpu): bf16 at gpt-oss shapes on every path (fused, slabs, and ws on sm_90); dequantisation bit-exact vs
bitsandbytes and transformers (fused, slab and ws decodes); the slab GEMMs write column blocks in place (no hidden
copies); the ws path under CUDA-graph capture.
"""

import pytest
import torch
import torch.nn.functional as F

import fastft.kernels.lora_linear as mod
from fastft.kernels.lora_linear import LoRALinearFunction, dequantize_slabs, lora_linear, lora_linear_reference, lora_path
from fastft.mxfp4 import MXFP4Tensor
from fastft.quant import quantize_mxfp4

try:
    from fastft.quant import quantize_nf4
    import bitsandbytes.functional  # noqa: F401

    HAVE_BNB = True
except Exception:  # noqa: BLE001
    HAVE_BNB = False

FORMATS = ["dense", "mxfp4", "nf4"]


def _weight(fmt, out_f, in_f, device="cpu", dtype=torch.float32):
    w = torch.randn(out_f, in_f, device=device) / in_f**0.5
    if fmt == "dense":
        return w.to(dtype)
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    if not HAVE_BNB:
        pytest.skip("bitsandbytes is not importable here")
    return quantize_nf4(w.to(dtype))


def _grads(fn, x, A, B, bias, dy):
    for t in (x, A, B, bias):
        if t is not None:
            t.grad = None
    y = fn()
    y.backward(dy)
    return y.detach(), [t.grad.clone() if t is not None else None for t in (x, A, B, bias)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _auto_path(monkeypatch):
    # tests choose the path themselves; a developer's exported override must not flip them
    monkeypatch.delenv("FASTFT_LORA_PATH", raising=False)
    monkeypatch.delenv("FASTFT_LORA_SLAB_MIN_T", raising=False)
    monkeypatch.delenv("FASTFT_LORA_WS_MIN_T", raising=False)


@pytest.fixture(params=[False, True], ids=["ab", "swap_ab"])
def swap_ab(request, monkeypatch):
    monkeypatch.setitem(mod.INTERPRETER_META, "SWAP_AB", request.param)
    return request.param


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,in_f,out_f,r,with_bias", [(37, 96, 75, 5, True), (5, 160, 33, 16, False)])
def test_forward_backward_cpu(fmt, T, in_f, out_f, r, with_bias, swap_ab):
    # in_f = 96 with NF4 makes bnb's 64-blocks straddle rows; out_f odd and T odd leave ragged tiles
    w = _weight(fmt, out_f, in_f)
    x = torch.randn(2, T, in_f, requires_grad=True)
    A = (torch.randn(r, in_f) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r) * 0.1).requires_grad_()
    bias = torch.randn(out_f).requires_grad_() if with_bias else None
    dy = torch.randn(2, T, out_f)
    y, g = _grads(lambda: lora_linear(x, w, bias, A, B, 2.0), x, A, B, bias, dy)
    y_ref, g_ref = _grads(lambda: lora_linear_reference(x, w, bias, A, B, 2.0), x, A, B, bias, dy)
    assert y.shape == (2, T, out_f)
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(g, g_ref):
        if b is not None:
            assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("fmt", ["mxfp4", "nf4"])
def test_grouped_scale_read_cpu(fmt, monkeypatch):
    # 64-wide tiles: NF4's 64-blocks and MXFP4's 32-groups are whole per row, so both directions take the grouped
    # read (one scale load per group, 3-D byte tile); in_f = 192 leaves a ragged last K tile in the forward
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        monkeypatch.setitem(mod.INTERPRETER_META, key, 64)
    T, in_f, out_f, r = 9, 192, 67, 4
    assert mod._group(mod.FMT_NF4 if fmt == "nf4" else mod.FMT_MXFP4, 64, in_f) > 0
    w = _weight(fmt, out_f, in_f)
    x = torch.randn(T, in_f, requires_grad=True)
    A = (torch.randn(r, in_f) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r) * 0.1).requires_grad_()
    dy = torch.randn(T, out_f)
    y, g = _grads(lambda: lora_linear(x, w, None, A, B, 2.0), x, A, B, None, dy)
    y_ref, g_ref = _grads(lambda: lora_linear_reference(x, w, None, A, B, 2.0), x, A, B, None, dy)
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(g, g_ref):
        if b is not None:
            assert _rel(a, b) < 1e-5


def _check_bf16_io(w, T, in_f, out_f, r):
    """bf16 x, bias and dy with fp32 adapters (as PEFT often keeps them) against an fp32 reference."""
    x = torch.randn(T, in_f, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, in_f) * 0.1).requires_grad_()  # fp32 adapters, as PEFT often keeps them
    B = (torch.randn(out_f, r) * 0.1).requires_grad_()
    bias = torch.randn(out_f, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(T, out_f, dtype=torch.bfloat16)
    y, g = _grads(lambda: lora_linear(x, w, bias, A, B, 2.0), x, A, B, bias, dy)
    assert y.dtype == torch.bfloat16 and g[0].dtype == torch.bfloat16 and g[1].dtype == torch.float32
    xf, Af, Bf, bf = (t.detach().float().requires_grad_() for t in (x, A, B, bias))
    wd = w.float() if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)
    y_ref, g_ref = _grads(lambda: xf @ wd.t() + bf + 2.0 * (xf @ Af.t()) @ Bf.t(), xf, Af, Bf, bf, dy.float())
    assert _rel(y, y_ref) < 1e-2
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-2


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_io_cpu(fmt, swap_ab):
    # bf16 loads/stores and the cast of the dequantised tile (the interpreter does the dot itself in fp32)
    T, in_f, out_f, r = 21, 64, 48, 8
    w = _weight(fmt, out_f, in_f, dtype=torch.bfloat16)
    _check_bf16_io(w, T, in_f, out_f, r)


@pytest.mark.parametrize("T,K,r", [(77, 70, 5), (33, 160, 16), (1, 40, 3), (0, 24, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_lora_kernels_cpu(T, K, r, dtype):
    # the dropout LoRA kernels against fp64: several row chunks and column blocks, ragged edges, r < 16, no rows
    _check_masked_lora_kernels(T, K, r, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("T,K", [(4096, 2880), (2053, 4096), (5, 2880)])
def test_masked_lora_kernels_gpu(T, K):
    _check_masked_lora_kernels(T, K, 16, torch.bfloat16, "cuda")


def _check_masked_lora_kernels(T, K, r, dtype, dev):
    x = torch.randn(T, K, device=dev).to(dtype)
    mask = torch.rand(T, K, device=dev) >= 0.3
    A = (torch.randn(r, K, device=dev) * 0.1).to(dtype)
    g = torch.randn(T, r, device=dev).to(dtype)
    xd = x.double() * mask
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    xa = mod._masked_down(x, mask, A, 1.25)
    assert xa.dtype == dtype and xa.shape == (T, r)
    if T:
        assert _rel(xa, 1.25 * xd @ A.double().t()) < tol
    for write_dx, need_da in ((True, True), (False, True), (True, False)):
        dx, dA = mod._masked_lora_grads(g, A, mask, x, 0.75, write_dx=write_dx, need_da=need_da)
        assert (dA is not None) == need_da
        if need_da:
            assert dA.dtype == torch.float32 and dA.shape == (r, K)
            if T:
                assert _rel(dA, 0.75 * g.double().t() @ xd) < tol
            else:
                assert not dA.any()
        assert (dx is not None) == write_dx
        if write_dx and T:
            assert dx.dtype == dtype
            assert _rel(dx, 0.75 * (g.double() @ A.double()) * mask) < tol
            assert not dx[~mask].any()


@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_dropout_mask_cpu(fmt):
    T, in_f, out_f, r, p = 19, 64, 41, 4, 0.3
    w = _weight(fmt, out_f, in_f)
    x = torch.randn(T, in_f, requires_grad=True)
    A = (torch.randn(r, in_f) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r) * 0.1).requires_grad_()
    mask = torch.rand(T, in_f) >= p
    dy = torch.randn(T, out_f)

    def ref():
        wd = w.dequantize() if fmt != "dense" else w
        return x @ wd.t() + 1.5 * ((x * mask / (1 - p)) @ A.t()) @ B.t()

    y, g = _grads(lambda: LoRALinearFunction.apply(x, w, None, A, B, 1.5, mask, p), x, A, B, None, dy)
    y_ref, g_ref = _grads(ref, x, A, B, None, dy)
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(g[:3], g_ref[:3]):
        assert _rel(a, b) < 1e-5
    # public entry: eval ignores dropout, training draws a fresh mask (only its statistics are checkable)
    assert _rel(lora_linear(x, w, None, A, B, 1.5, dropout=p, training=False),
                lora_linear_reference(x, w, None, A, B, 1.5)) < 1e-5
    y_train = lora_linear(x, w, None, A, B, 1.5, dropout=p, training=True)
    assert y_train.shape == (T, out_f) and torch.isfinite(y_train).all()


def test_no_lora_and_fallbacks_cpu():
    w = _weight("mxfp4", 24, 64)
    x = torch.randn(7, 64)
    assert _rel(lora_linear(x, w, None, None, None, 1.0), x @ w.dequantize().t()) < 1e-5
    # a trainable dense weight and a 3-D holder go to the reference (autograd), still correct
    wt = torch.randn(24, 64, requires_grad=True)
    assert torch.allclose(lora_linear(x, wt), x @ wt.t())


# ---------------------------------------------------------------------------------------------------------------------
# Slab path (CPU). The interpreter's decode tiles are 64 wide, so slabs come in multiples of 64; SLAB_BYTES is shrunk
# per case so each direction cuts W into several slabs, the last one short.


def _slab_counts(out_f, in_f, elt=4):
    q = mod.INTERPRETER_DECODE_META["BLOCK_C"]
    return (-(-out_f // mod._slab_len(out_f, in_f, elt, q)), -(-in_f // mod._slab_len(in_f, out_f, elt, q)))


@pytest.mark.parametrize("fmt", ["mxfp4", "nf4"])
def test_slab_decode_bit_exact_cpu(fmt, monkeypatch):
    # every slab, both orientations, equals the holder's own dequantisation bit for bit (out 75 -> 64 + 11 rows;
    # in 192 -> 128 + 64 columns, NF4 and MXFP4 both on the grouped read)
    monkeypatch.setattr(mod, "SLAB_BYTES", 128 * 75 * 4)
    assert _slab_counts(75, 192) == (2, 2)
    w = _weight(fmt, 75, 192)
    ref = w.dequantize(torch.float32)
    assert torch.equal(dequantize_slabs(w, torch.float32, along_in=False), ref)
    assert torch.equal(dequantize_slabs(w, torch.float32, along_in=True), ref)


# (T, in, out, r, bias, slab_bytes): 192/75 -> 2 + 2 slabs on the grouped read; 96/130 -> 3 row slabs (64, 64, 2)
# and 2 column slabs (64, 32), NF4 blocks straddling rows (flat read), T = 1
SLAB_CASES = [(37, 192, 75, 5, True, 128 * 75 * 4), (1, 96, 130, 16, False, 64 * 96 * 4)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,in_f,out_f,r,with_bias,slab_bytes", SLAB_CASES)
def test_slabs_forward_backward_cpu(fmt, T, in_f, out_f, r, with_bias, slab_bytes, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_PATH", "slabs")
    monkeypatch.setattr(mod, "SLAB_BYTES", slab_bytes)
    assert min(_slab_counts(out_f, in_f)) >= 2
    w = _weight(fmt, out_f, in_f)
    x = torch.randn(T, in_f, requires_grad=True)
    A = (torch.randn(r, in_f) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r) * 0.1).requires_grad_()
    bias = torch.randn(out_f).requires_grad_() if with_bias else None
    dy = torch.randn(T, out_f)
    y, g = _grads(lambda: lora_linear(x, w, bias, A, B, 2.0), x, A, B, bias, dy)
    y_ref, g_ref = _grads(lambda: lora_linear_reference(x, w, bias, A, B, 2.0), x, A, B, bias, dy)
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(g, g_ref):
        if b is not None:
            assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_slabs_dropout_and_no_lora_cpu(fmt, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_PATH", "slabs")
    monkeypatch.setattr(mod, "SLAB_BYTES", 64 * 96 * 4)
    T, in_f, out_f, r, p = 19, 96, 130, 4, 0.3
    w = _weight(fmt, out_f, in_f)
    x = torch.randn(T, in_f, requires_grad=True)
    A = (torch.randn(r, in_f) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r) * 0.1).requires_grad_()
    bias = torch.randn(out_f)
    mask = torch.rand(T, in_f) >= p
    dy = torch.randn(T, out_f)
    wd = w.dequantize() if fmt != "dense" else w
    y, g = _grads(lambda: LoRALinearFunction.apply(x, w, bias, A, B, 1.5, mask, p), x, A, B, None, dy)
    y_ref, g_ref = _grads(lambda: x @ wd.t() + bias + 1.5 * ((x * mask / (1 - p)) @ A.t()) @ B.t(), x, A, B, None, dy)
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(g[:3], g_ref[:3]):
        assert _rel(a, b) < 1e-5
    # a frozen A (no dA): the dX LoRA term alone
    A.requires_grad_(False)
    y, g = _grads(lambda: LoRALinearFunction.apply(x, w, bias, A, B, 1.5, mask, p), x, None, B, None, dy)
    y_ref, g_ref = _grads(lambda: x @ wd.t() + bias + 1.5 * ((x * mask / (1 - p)) @ A.t()) @ B.t(), x, None, B, None,
                          dy)
    assert _rel(g[0], g_ref[0]) < 1e-5 and _rel(g[2], g_ref[2]) < 1e-5
    # no LoRA: bias only (y starts as b) and neither (the first write of each block overwrites)
    for b in (bias, None):
        y, g = _grads(lambda: lora_linear(x, w, b), x, None, None, None, dy)
        y_ref, g_ref = _grads(lambda: F.linear(x, wd, b), x, None, None, None, dy)
        assert _rel(y, y_ref) < 1e-5 and _rel(g[0], g_ref[0]) < 1e-5


@pytest.mark.parametrize("fmt", ["dense", "nf4"])
def test_slabs_bf16_io_cpu(fmt, monkeypatch):
    # bf16 x with an fp32 dense weight: the dense weight goes through the decode kernel too (a cast per slab)
    monkeypatch.setenv("FASTFT_LORA_PATH", "slabs")
    monkeypatch.setattr(mod, "SLAB_BYTES", 64 * 128 * 2)
    T, in_f, out_f, r = 21, 128, 75, 8
    w = _weight(fmt, out_f, in_f, dtype=torch.float32 if fmt == "dense" else torch.bfloat16)
    _check_bf16_io(w, T, in_f, out_f, r)


def test_path_choice_cpu(monkeypatch):
    assert lora_path(1023) == "fused" and lora_path(1024) == "slabs"
    # ws (sm_90 kernel) only on request, and only where it can run
    assert lora_path(10**6, ws_ok=True) == "slabs"
    monkeypatch.setenv("FASTFT_LORA_WS_MIN_T", "100")
    assert lora_path(100, ws_ok=True) == "ws" and lora_path(99, ws_ok=True) == "fused"
    assert lora_path(100, ws_ok=False) == "fused"
    monkeypatch.delenv("FASTFT_LORA_WS_MIN_T")
    monkeypatch.setenv("FASTFT_LORA_PATH", "ws")
    assert lora_path(5, ws_ok=True) == "ws" and lora_path(5000, ws_ok=False) == "slabs"
    monkeypatch.delenv("FASTFT_LORA_PATH")
    monkeypatch.setenv("FASTFT_LORA_SLAB_MIN_T", "8")
    assert lora_path(7) == "fused" and lora_path(8) == "slabs"
    monkeypatch.setenv("FASTFT_LORA_PATH", "fused")
    assert lora_path(10**6) == "fused"
    monkeypatch.setenv("FASTFT_LORA_PATH", "slabs")
    assert lora_path(1) == "slabs"
    monkeypatch.setenv("FASTFT_LORA_PATH", "cublas")
    with pytest.raises(ValueError):
        lora_path(1)
    # the auto choice reaches the autograd Function: T = 9 >= 8 runs the slabs forward and backward
    monkeypatch.delenv("FASTFT_LORA_PATH")
    calls = []
    for name in ("_forward_slabs", "_dx_slabs"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    x = torch.randn(9, 64, requires_grad=True)
    lora_linear(x, _weight("dense", 24, 64)).sum().backward()
    assert calls == ["_forward_slabs", "_dx_slabs"]


def test_slab_memory_math():
    # gpt-oss projections in bf16: every one is a single slab per direction within the 24 MiB scratch, and slab
    # starts are multiples of the GPU decode tile width
    q = mod.DECODE_META["BLOCK_C"]
    for in_f, out_f in GPT_OSS_SHAPES.values():
        for total, other in ((out_f, in_f), (in_f, out_f)):
            step = mod._slab_len(total, other, 2, q)
            assert step * other * 2 <= mod.SLAB_BYTES == 24 << 20
            assert step % q == 0 and step >= total


# ---------------------------------------------------------------------------------------------------------------------
# GPU

GPT_OSS_SHAPES = {"q": (2880, 4096), "k": (2880, 512), "v": (2880, 512), "o": (4096, 2880)}


def test_ws_scale_copy_layouts():
    # the register kernel's scale loads assume these index maps (forward: [step, row, group in step]; dX: [group,
    # step, q, 2m + e] holding row 64 step + 2q + 8m + e); fresh random scales, both formats
    from fastft.kernels import lora_linear_hopper as llh

    for nf4, gw in ((False, 32), (True, 64)):
        n, k = 192, 320
        scales = torch.rand(n, k // gw) if nf4 else torch.randint(0, 255, (n, k // gw), dtype=torch.uint8)
        fwd, dx = llh.scale_copy(scales, False, nf4), llh.scale_copy(scales, True, nf4)
        per = 64 // gw
        i, r, t = torch.meshgrid(torch.arange(k // 64), torch.arange(n), torch.arange(per), indexing="ij")
        assert torch.equal(fwd, scales[r, i * per + t])
        g, i, q, j = torch.meshgrid(torch.arange(k // gw), torch.arange(n // 64), torch.arange(4), torch.arange(16),
                                    indexing="ij")
        assert torch.equal(dx, scales[64 * i + 2 * q + 8 * (j // 2) + j % 2, g])
        # an expert stack [E, n, k / gw] (the MoE's grouped GEMMs): each expert's copy, stacked
        stack = torch.stack([scales, scales.flip(0), scales.roll(1, 0)])
        for trans in (False, True):
            assert torch.equal(llh.scale_copy(stack, trans, nf4),
                               torch.stack([llh.scale_copy(e, trans, nf4) for e in stack]))


def _needs_ws():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not mod.moe_hopper.HAS_GLUON:
        pytest.skip("the ws path runs on sm_90 with Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1037, 77])
@pytest.mark.parametrize("path", ["fused", "slabs", "ws"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("proj", list(GPT_OSS_SHAPES))
def test_gpt_oss_shapes_gpu(fmt, proj, path, T, monkeypatch):
    # T = 1037: 256-row tiles and a 13-row tail (the ws path's second launch); T = 77: one 128-row tile
    if path == "ws":
        if fmt == "dense":
            pytest.skip("dense weights go to cuBLAS")
        _needs_ws()
        calls = []
        real = mod._ws_gemm
        monkeypatch.setattr(mod, "_ws_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    elif T != 1037:
        pytest.skip("the small T is the ws path's BM=128 case")
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    in_f, out_f = GPT_OSS_SHAPES[proj]
    r = 32
    dev, dt = "cuda", torch.bfloat16
    w = _weight(fmt, out_f, in_f, dev, dt)
    x = torch.randn(T, in_f, device=dev, dtype=dt, requires_grad=True)
    A = (torch.randn(r, in_f, device=dev) * 0.02).requires_grad_()  # PEFT keeps adapters in fp32 often
    B = (torch.randn(out_f, r, device=dev) * 0.02).requires_grad_()
    bias = torch.randn(out_f, device=dev, dtype=dt).requires_grad_()
    dy = torch.randn(T, out_f, device=dev, dtype=dt)
    y, g = _grads(lambda: lora_linear(x, w, bias, A, B, 2.0), x, A, B, bias, dy)
    # reference in fp32 from the same dequantised weight
    xf, Af, Bf, bf = (t.detach().float().requires_grad_() for t in (x, A, B, bias))
    wd = (w.dequantize(torch.float32) if fmt != "dense" else w.float())
    y_ref, g_ref = _grads(lambda: xf @ wd.t() + bf + 2.0 * (xf @ Af.t()) @ Bf.t(), xf, Af, Bf, bf, dy.float())
    assert _rel(y, y_ref) < 1e-2
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-2
    if path == "ws":
        assert len(calls) == 2  # forward and dX ran the ws kernel


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["slabs", "ws"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nf4"])
@pytest.mark.parametrize("proj", ["q", "o"])
def test_slabs_dropout_gpu(fmt, proj, path, monkeypatch):
    # the dropout mask on the slab / ws path's dX LoRA term (computed first; the GEMM adds onto it), bf16 at
    # gpt-oss shapes
    if path == "ws":
        _needs_ws()
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    in_f, out_f = GPT_OSS_SHAPES[proj]
    T, r, p, dev, dt = 2053, 16, 0.1, "cuda", torch.bfloat16
    w = _weight(fmt, out_f, in_f, dev, dt)
    x = torch.randn(T, in_f, device=dev, dtype=dt, requires_grad=True)
    A = (torch.randn(r, in_f, device=dev, dtype=dt) * 0.02).requires_grad_()
    B = (torch.randn(out_f, r, device=dev, dtype=dt) * 0.02).requires_grad_()
    mask = torch.rand(T, in_f, device=dev) >= p
    dy = torch.randn(T, out_f, device=dev, dtype=dt)
    y, g = _grads(lambda: LoRALinearFunction.apply(x, w, None, A, B, 2.0, mask, p), x, A, B, None, dy)
    xf, Af, Bf = (t.detach().float().requires_grad_() for t in (x, A, B))
    wd = w.dequantize(torch.float32)
    y_ref, g_ref = _grads(lambda: xf @ wd.t() + 2.0 * ((xf * mask / (1 - p)) @ Af.t()) @ Bf.t(), xf, Af, Bf, None,
                          dy.float())
    assert _rel(y, y_ref) < 1e-2
    for a, b in zip(g[:3], g_ref[:3]):
        assert _rel(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("proj", ["q", "o"])
def test_slabs_write_in_place_gpu(proj):
    # If torch copied a column block of y / dX before handing it to cuBLAS (and back after), each slab GEMM would
    # allocate T x slab-width (>= 16 MB here). The peak above the outputs must stay within the scratch (+ slack for
    # xa / dY B and the caching allocator's rounding).
    from fastft.kernels.lora_linear import _dx_slabs, _forward_slabs, _weight_fields

    in_f, out_f = GPT_OSS_SHAPES[proj]
    T, r, dev, dt = 8192, 16, "cuda", torch.bfloat16
    w = _weight("mxfp4", out_f, in_f, dev, dt)
    fields = _weight_fields(w)
    x = torch.randn(T, in_f, device=dev, dtype=dt)
    dy = torch.randn(T, out_f, device=dev, dtype=dt)
    A = torch.randn(r, in_f, device=dev, dtype=dt) * 0.02
    B = torch.randn(out_f, r, device=dev, dtype=dt) * 0.02
    xa, g = x @ A.t(), dy @ B
    slack = mod.SLAB_BYTES + (2 << 20)
    # no bias: its addmm may take cuBLASLt's epilogue, whose workspace handling is not what is measured here;
    # with LoRA the blocks accumulate (beta = 1), without it they overwrite (beta = 0)
    for fn, out_bytes in ((lambda: _forward_slabs(x, fields, None, xa, B, 2.0), T * out_f * 2),
                          (lambda: _forward_slabs(x, fields, None, None, None, 2.0), T * out_f * 2),
                          (lambda: _dx_slabs(dy, fields, mod._scaled_mm(g, A, 2.0)), T * in_f * 2),
                          (lambda: _dx_slabs(dy, fields, None), T * in_f * 2)):
        fn()
        ref = fn()  # warm: compiles, cuBLAS workspace
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = fn()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= out_bytes + slack
        assert torch.equal(got, ref)
        del ref, got


@pytest.mark.gpu
def test_slab_decode_bit_exact_gpu():
    # the slab decode (fp32 and bf16, both orientations) equals transformers' MXFP4 and bitsandbytes' NF4 decoding
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dev = "cuda"
    blocks = torch.randint(0, 256, (1, 4096, 90, 16), dtype=torch.uint8, device=dev)
    scales = torch.randint(100, 140, (1, 4096, 90), dtype=torch.uint8, device=dev)
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[0].t()  # [out, in]
    w = MXFP4Tensor(blocks[0], scales[0])
    for along_in in (False, True):
        assert torch.equal(dequantize_slabs(w, torch.float32, along_in), hf)
        assert torch.equal(dequantize_slabs(w, torch.bfloat16, along_in), hf.to(torch.bfloat16))
    if HAVE_BNB:
        import bitsandbytes.functional as bnbf

        q = quantize_nf4(torch.randn(2880, 4096, device=dev, dtype=torch.bfloat16))
        ref = bnbf.dequantize_4bit(q.data, q.quant_state)
        for along_in in (False, True):
            assert torch.equal(dequantize_slabs(q, torch.float32, along_in), q.decode(torch.float32))
            assert torch.equal(dequantize_slabs(q, torch.bfloat16, along_in), ref)


@pytest.mark.gpu
def test_dequant_bit_exact_gpu(monkeypatch):
    # the fused kernel with an identity input returns W^T exactly (fp32 path): its dequantisation is bnb's /
    # transformers' (T = 2880 would choose the slab path, whose decode test_slab_decode_bit_exact_gpu covers)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    monkeypatch.setenv("FASTFT_LORA_PATH", "fused")

    dev = "cuda"
    eye = torch.eye(2880, device=dev)
    blocks = torch.randint(0, 256, (1, 512, 90, 16), dtype=torch.uint8, device=dev)
    scales = torch.randint(100, 140, (1, 512, 90), dtype=torch.uint8, device=dev)
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[0]  # [in, out]
    w = MXFP4Tensor(blocks[0], scales[0])
    assert torch.equal(lora_linear(eye, w), hf)
    if HAVE_BNB:
        import bitsandbytes.functional as bnbf

        q = quantize_nf4(torch.randn(512, 2880, device=dev, dtype=torch.bfloat16))
        ref = bnbf.dequantize_4bit(q.data, q.quant_state).float()
        assert torch.equal(q.decode(torch.float32).to(torch.bfloat16), ref.to(torch.bfloat16))
        assert torch.equal(lora_linear(eye, q).t(), q.decode(torch.float32))


@pytest.mark.gpu
def test_ws_decode_bit_exact_gpu():
    # the ws kernel's in-loop decode, both orientations: an identity on either side returns W^T (forward) or W (dX)
    # exactly, equal to transformers' MXFP4 and bitsandbytes' NF4 decoding in bf16
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _needs_ws()
    dev, dt = "cuda", torch.bfloat16
    blocks = torch.randint(0, 256, (1, 512, 90, 16), dtype=torch.uint8, device=dev)
    scales = torch.randint(100, 140, (1, 512, 90), dtype=torch.uint8, device=dev)
    weights = [(MXFP4Tensor(blocks[0], scales[0]), convert_moe_packed_tensors(blocks, scales, dtype=dt)[0].t())]
    if HAVE_BNB:
        import bitsandbytes.functional as bnbf

        q = quantize_nf4(torch.randn(512, 2880, device=dev, dtype=dt))
        weights.append((q, bnbf.dequantize_4bit(q.data, q.quant_state)))
    for w, ref in weights:  # ref: [out, in] = [512, 2880]
        fields = mod._weight_fields(w)
        y = mod._ws_gemm(torch.eye(2880, device=dev, dtype=dt), w, fields, False, torch.empty(2880, 512, device=dev,
                                                                                               dtype=dt))
        assert torch.equal(y.t(), ref)
        dx = mod._ws_gemm(torch.eye(512, device=dev, dtype=dt), w, fields, True, torch.empty(512, 2880, device=dev,
                                                                                              dtype=dt))
        assert torch.equal(dx, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nf4"])
def test_ws_register_kernel_and_fallback_gpu(fmt, monkeypatch):
    # the ws path's register-operand kernel (lora_linear_hopper) against moe_hopper's kernel (same contract), both
    # orientations: bit-identical without LoRA; with bias, LoRA and add_c within bf16 rounding (the kernels round
    # s * L and s * B respectively); activations off TMA's 16-byte alignment are copied, same result
    from fastft.kernels import lora_linear_hopper

    _needs_ws()
    dev, dt, T = "cuda", torch.bfloat16, 1037
    w = _weight(fmt, 512, 2880, dev, dt)
    fields = mod._weight_fields(w)
    calls = []
    real = lora_linear_hopper.gemm
    monkeypatch.setattr(lora_linear_hopper, "gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_can_run, use = lora_linear_hopper.can_run, {"register": True}
    monkeypatch.setattr(lora_linear_hopper, "can_run", lambda *a, **k: use["register"] and real_can_run(*a, **k))

    def unaligned(t):  # same values, base 2 bytes off 16 (TMA needs 16): _ws_gemm copies it
        buf = torch.empty(t.numel() + 1, device=dev, dtype=dt)
        u = buf[1:].view_as(t)
        u.copy_(t)
        return u

    for trans in (False, True):
        red, n_out = (512, 2880) if trans else (2880, 512)
        a = torch.randn(T, red, device=dev, dtype=dt)
        L = torch.randn(T, 16, device=dev, dtype=dt)
        F_ = torch.randn(n_out, 16, device=dev, dtype=dt) * 0.1
        lora = (L, F_, 0, F_.stride(0), F_.stride(1), 0.5)
        bias = torch.randn(n_out, device=dev, dtype=dt) if not trans else None
        c0 = torch.randn(T, n_out, device=dev, dtype=dt)
        for kw in ({}, dict(bias=bias, lora=lora), dict(add_c=True) if trans else dict(bias=bias)):
            outs = []
            for x, register in ((a, True), (unaligned(a), True), (a, False)):
                out = c0.clone() if kw.get("add_c") else torch.empty(T, n_out, device=dev, dtype=dt)
                n = len(calls)
                use["register"] = register
                outs.append(mod._ws_gemm(x, w, fields, trans, out, **kw))
                assert len(calls) == n + register
            assert torch.equal(outs[0], outs[1])
            if "lora" in kw:
                assert _rel(outs[0], outs[2]) < 1e-2
            else:
                assert torch.equal(outs[0], outs[2])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nf4"])
def test_ws_cuda_graph_gpu(fmt, monkeypatch):
    # a token count first seen inside a capture: the routing tables are built in the graph (not cached), so the
    # replays equal an eager step
    _needs_ws()
    monkeypatch.setenv("FASTFT_LORA_PATH", "ws")
    dev, dt = "cuda", torch.bfloat16
    T, in_f, out_f, r = 3001, 2880, 512, 16
    w = _weight(fmt, out_f, in_f, dev, dt)
    x = torch.randn(T, in_f, device=dev, dtype=dt, requires_grad=True)
    A = (torch.randn(r, in_f, device=dev, dtype=dt) * 0.02).requires_grad_()
    B = (torch.randn(out_f, r, device=dev, dtype=dt) * 0.02).requires_grad_()
    dy = torch.randn(T, out_f, device=dev, dtype=dt)

    def step():
        y = lora_linear(x, w, None, A, B, 2.0)
        return (y, *torch.autograd.grad(y, (x, A, B), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        step()  # compiles outside the capture
        torch.cuda.synchronize()
        mod._ws_tables_cache.clear()
        del w._ws_scale_copies  # the scale copies too are made inside the capture
        with torch.cuda.graph(graph):
            got = step()
    torch.cuda.current_stream().wait_stream(side)
    assert (T, 256, torch.device(dev, torch.cuda.current_device())) not in mod._ws_tables_cache
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, step()):
        assert torch.equal(a, b)
