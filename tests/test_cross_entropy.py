"""fused_linear_cross_entropy against an fp64 reference (CPU: Triton interpreter at tiny odd shapes; GPU: real shape)."""

import pytest
import torch

from fastft.kernels import cross_entropy as ce
from fastft.kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference


def _inputs(T, H, V, dtype, device="cpu", ignore_frac=0.0, gen=None):
    hidden = torch.randn(T, H, generator=gen, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device) * H**-0.5 * 2).to(dtype)
    labels = torch.randint(0, V, (T,), generator=gen, device=device)
    if ignore_frac:
        labels[torch.rand(T, generator=gen, device=device) < ignore_frac] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels, reduction="mean", need_dw=False):
    """fp64 loss and grads of the upcast inputs."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(need_dw)
    loss = linear_cross_entropy_reference(h, w, labels, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, (w.grad if need_dw else None)


def _run(hidden, weight, labels, reduction="mean", need_dw=False, method="auto", **forward_kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(need_dw)
    if forward_kw:  # small blocks and chunks so that tiny shapes still exercise the loops and the chunking
        loss_sum, n, gh, gw = ce._forward(h.detach(), w.detach(), labels, -100, True, need_dw, **forward_kw)
        scale = 1.0 / n.clamp(min=1).double() if reduction == "mean" else 1.0
        return (loss_sum * scale).float(), gh.double() * scale, (gw.double() * scale if need_dw else None)
    loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, method=method)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


SMALL = dict(chunk_rows=5, block_v=32, num_warps=1)


@pytest.mark.parametrize("T,H,V", [(1, 48, 97), (13, 48, 131), (37, 33, 250)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_matches_fp64_reference(T, H, V, dtype, ignore_frac):
    hidden, weight, labels = _inputs(T, H, V, dtype, ignore_frac=ignore_frac)
    if (labels == -100).all():
        labels[0] = 3
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    loss, gh, _ = _run(hidden, weight, labels, **SMALL)
    assert loss.dtype == torch.float32
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-2)
    assert abs(loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= tol_grad
    assert torch.all(gh[labels == -100] == 0)


@pytest.mark.parametrize("reduction,dtype", [("mean", torch.bfloat16), ("sum", torch.bfloat16), ("mean", torch.float16)])
def test_public_api_and_weight_grad(reduction, dtype):
    hidden, weight, labels = _inputs(11, 48, 103, dtype, ignore_frac=0.3)
    labels[0] = 5
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, reduction, need_dw=True)
    loss, gh, gw = _run(hidden, weight, labels, reduction, need_dw=True)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= 1e-2 and _rel(gw, ref_gw) <= 1e-2


def test_upstream_gradient_scales_and_frozen_weight_gets_none():
    hidden, weight, labels = _inputs(7, 48, 61, torch.float32)
    h = hidden.clone().requires_grad_()
    (fused_linear_cross_entropy(h, weight, labels) * 3.0).backward()
    _, ref_gh, _ = _reference(hidden, weight, labels)
    assert _rel(h.grad, 3.0 * ref_gh) <= 1e-5
    assert weight.grad is None


def test_second_backward_is_refused():
    hidden, weight, labels = _inputs(5, 48, 40, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, labels = _inputs(9, 48, 77, torch.bfloat16)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_no_grad_forward_matches():
    hidden, weight, labels = _inputs(6, 48, 89, torch.float32, ignore_frac=0.3)
    labels[0] = 1
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, reduction="sum")
    ref = linear_cross_entropy_reference(hidden.double(), weight.double(), labels, reduction="sum")
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("bad", [89, -1, 10**6])
def test_out_of_range_label_is_a_clear_error(bad):
    hidden, weight, labels = _inputs(4, 48, 89, torch.float32)
    labels[2] = bad
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(hidden, weight, labels)


def test_kernel_is_memory_safe_on_bad_labels_without_validation():
    # What graph capture gets (no host-side check): a NaN loss for the bad row, zero loss/grad for ignored rows.
    hidden, weight, labels = _inputs(3, 48, 70, torch.float32)
    labels[0], labels[1] = 70, -100
    logits = hidden @ weight.t()
    loss = torch.empty(3)
    ce._launch_rows(logits, logits, labels, loss, -100, True, 32, 1)
    assert torch.isnan(loss[0]) and loss[1] == 0 and torch.isfinite(loss[2])
    assert torch.all(logits[:2] == 0)


def test_rejects_bad_reduction_and_shapes():
    hidden, weight, labels = _inputs(4, 48, 50, torch.float32)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(hidden, weight[:, :40], labels)


# ---------------------------------------------------------------- slabs path (frozen weight: online softmax over V)
def _run_slabs(hidden, weight, labels, need_dh=True, **kw):
    loss_sum, n, gh = ce._forward_slabs(hidden, weight, labels, -100, need_dh, **kw)
    scale = 1.0 / n.clamp(min=1).double()
    return (loss_sum * scale).float(), (gh.double() * scale if need_dh else None)


@pytest.mark.parametrize("T,H,V,dtype,ignore_frac,kw", [
    (13, 48, 131, torch.float32, 0.0, dict(block_rows=5, slab_cols=40, block_v=16)),   # 4 slabs of 33, 3 chunks
    (13, 48, 131, torch.bfloat16, 0.4, dict(block_rows=4, slab_cols=40, block_v=64)),  # one chunk per slab row
    (37, 33, 250, torch.bfloat16, 0.0, dict(block_rows=16, slab_cols=77, block_v=32)),  # 4 slabs of 63
    (1, 48, 97, torch.float16, 0.0, dict(slab_cols=30, block_v=8)),
    (9, 48, 300, torch.bfloat16, 0.2, dict(block_rows=3, slab_cols=160, block_v=256)),  # 2 slabs, 128-rounded
])
def test_slabs_match_fp64_reference(T, H, V, dtype, ignore_frac, kw):
    hidden, weight, labels = _inputs(T, H, V, dtype, ignore_frac=ignore_frac)
    labels[0] = V - 1  # the last column of the last (partial) slab
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    loss, gh = _run_slabs(hidden, weight, labels, num_warps=1, **kw)
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-2)
    assert abs(loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= tol_grad
    assert torch.all(gh[labels == -100] == 0)
    no_grad_loss, _ = _run_slabs(hidden, weight, labels, need_dh=False, num_warps=1, **kw)
    assert abs(no_grad_loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())


@pytest.mark.parametrize("block_v", [4, 32])
def test_slabs_target_at_every_column(block_v):
    # Every slab position holds a target (first, last, middle columns of each slab), with a peaked softmax where
    # p_target ~ 1 so the exact -s_excl/s coefficient matters.
    V = 70
    hidden, weight, labels = _inputs(V, 48, V, torch.float32)
    labels = torch.randperm(V)
    weight[labels] += hidden * 0.3
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    loss, gh = _run_slabs(hidden, weight, labels, block_rows=16, slab_cols=16, block_v=block_v, num_warps=1)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= 1e-4


# Both ways of making a slab's P: cuBLAS logits + _slab_kernel, and the GEMM epilogue's per-tile anchors (its torch
# reference here, with 9-column tiles) + _slab_fix_kernel.
EPILOGUES = [dict(), dict(epilogue="reference", tile_cols=9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", EPILOGUES)
def test_slabs_anchor_moves_within_and_across_slabs(dtype, kw):
    # Logits climbing ~1 per column over a 120-wide range (past every dtype's headroom several times inside a slab
    # and across slabs) for half of the rows, falling for the other half: the kernel moves the anchor, rescales the
    # P it already wrote and the rows of the dH accumulator (with tiles: the fix-up rescales P tiles, the row's sum
    # and acc rows). Exact against fp64 only if every rescale is right.
    T, H, V = 10, 48, 120
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    hidden, weight, labels = _inputs(T, H, V, torch.float32, gen=g)
    u = torch.randn(H, generator=g)
    u /= u.norm()
    ramp = torch.linspace(-60, 60, V)
    weight = weight * 0.1 + ramp[:, None] * u / 8
    hidden = hidden * 0.1 + u * 8 * torch.where(torch.arange(T) % 2 == 0, 1.0, -1.0)[:, None]
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    loss, gh = _run_slabs(hidden, weight, labels, block_rows=4, slab_cols=50, block_v=8, num_warps=1, **kw)
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-2)
    assert abs(loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= tol_grad


@pytest.mark.parametrize("kw", EPILOGUES)
def test_slabs_without_compaction_zero_ignored_rows_and_nan_bad_labels(monkeypatch, kw):
    # What CUDA graph capture gets: no host check, ignored rows (a whole block of them here) stay in the GEMMs.
    hidden, weight, labels = _inputs(11, 48, 90, torch.float32)
    labels[:4] = -100
    labels[6] = -100
    monkeypatch.setattr(ce, "_check_labels", lambda h, y, V, ii: ((y != ii).sum(), None))
    kw = dict(block_rows=4, slab_cols=25, block_v=8, num_warps=1, **kw)
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    loss, gh = _run_slabs(hidden, weight, labels, **kw)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= 1e-4 and torch.all(gh[labels == -100] == 0)
    for bad in (90, 200, -3):  # past the last slab's end, past the vocabulary, negative
        labels[0] = bad
        assert torch.isnan(_run_slabs(hidden, weight, labels, **kw)[0])


def test_slabs_all_ignored_and_method_keyword():
    hidden, weight, labels = _inputs(9, 48, 77, torch.bfloat16)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, method="slabs")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)
    with pytest.raises(ValueError, match="no weight gradient"):
        fused_linear_cross_entropy(h, weight.clone().requires_grad_(), labels, method="slabs")
    with pytest.raises(ValueError, match="method"):
        fused_linear_cross_entropy(h, weight, labels, method="fast")


# The epilogue path (sm_90: the logits GEMM writes P against per-tile anchors; _slab_fix_kernel puts each row on one
# anchor), run with the epilogue's torch reference so that tiny tiles exercise the fix-up on CPU.
@pytest.mark.parametrize("T,H,V,dtype,ignore_frac,kw", [
    (13, 48, 131, torch.float32, 0.0, dict(block_rows=5, slab_cols=40, block_v=16, tile_cols=16)),  # 3 tiles a slab
    (13, 48, 131, torch.bfloat16, 0.4, dict(block_rows=4, slab_cols=40, block_v=64, tile_cols=8)),
    (37, 33, 250, torch.float16, 0.0, dict(block_rows=16, slab_cols=77, block_v=32, tile_cols=32)),
    (1, 48, 97, torch.bfloat16, 0.0, dict(slab_cols=30, block_v=8, tile_cols=7)),
    (9, 48, 300, torch.bfloat16, 0.2, dict(block_rows=3, slab_cols=160, block_v=256, tile_cols=128)),
])
def test_slabs_epilogue_matches_fp64_reference(T, H, V, dtype, ignore_frac, kw):
    hidden, weight, labels = _inputs(T, H, V, dtype, ignore_frac=ignore_frac)
    labels[0] = V - 1
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-2)
    loss, gh = _run_slabs(hidden, weight, labels, num_warps=1, epilogue="reference", **kw)
    assert abs(loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= tol_grad
    assert torch.all(gh[labels == -100] == 0)
    no_grad_loss, _ = _run_slabs(hidden, weight, labels, need_dh=False, num_warps=1, epilogue="reference", **kw)
    assert abs(no_grad_loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())


@pytest.mark.parametrize("method", ["auto", "slabs", "rows"])
def test_public_api_methods_agree(method):
    hidden, weight, labels = _inputs(10, 48, 157, torch.bfloat16, ignore_frac=0.3)
    labels[0] = 2
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels, "sum")
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, reduction="sum", method=method, slab_cols=50, chunk_rows=3)
    (loss * 0.5).backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert _rel(h.grad, 0.5 * ref_gh) <= 1e-2


def test_slab_plan_fits_the_memory_budget():
    T, H, V = 16384, 2880, 201088
    S, W = ce._slab_plan(T, V, None, None)
    assert S == 2048 and W % 128 == 0 and -(-V // W) * W - V < W
    assert S * W * 4 + S * H * 4 + S * H * 2 <= 200 * 2**20  # logits slab + acc + W[label] gather
    assert ce._slab_plan(5000, V, None, None)[0] == 1667  # balanced blocks, no sliver
    assert ce._slab_plan(1, 97, None, None) == (1, 97)
    S, W = ce._slab_plan(T, V, None, None, elem_bytes=2)  # the epilogue path: P in bf16 instead of fp32 logits
    assert S == 2048 and W == 28800
    tiles = -(-W // 128)
    assert S * W * 2 + 2 * S * tiles * 4 + S * H * 4 + S * H * 2 <= 200 * 2**20  # P + tile stats + acc + gather


# ------------------------------------------------------------------------- int8 weight (Int8RowsTensor, slabs path)
def _int8(weight):
    from fastft.quant import Int8RowsTensor

    return Int8RowsTensor.quantize(weight.float())


def _run_frozen(hidden, weight, labels, **kw):
    """(loss, dH) of the public API with a frozen weight: a tensor or an Int8RowsTensor."""
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, **kw)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("T,H,V,dtype,ignore_frac,kw", [
    (13, 48, 131, torch.float32, 0.3, dict(block_rows=5, slab_cols=40)),   # 4 slabs, 3 blocks, compaction
    (37, 33, 250, torch.bfloat16, 0.0, dict(block_rows=16, slab_cols=77)),  # W[label] decoded into the scratch
    (13, 48, 131, torch.bfloat16, 0.4, dict(block_rows=16, slab_cols=5)),   # scratch smaller than a block
    (1, 48, 97, torch.float16, 0.0, dict()),                                 # defaults: one slab
])
def test_int8_weight_matches_fp64_reference_on_the_dequantized_weight(T, H, V, dtype, ignore_frac, kw):
    hidden, weight, labels = _inputs(T, H, V, dtype, ignore_frac=ignore_frac)
    labels[0] = V - 1
    q = _int8(weight)
    ref_loss, ref_gh, _ = _reference(hidden, q.dequantize(dtype), labels)  # the weight the kernel decodes
    loss, gh = _run_frozen(hidden, q, labels, **kw)
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-2)
    assert loss.dtype == torch.float32 and gh.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= tol_grad
    assert torch.all(gh[labels == -100] == 0)
    with torch.no_grad():
        no_grad = fused_linear_cross_entropy(hidden, q, labels, reduction="sum", **kw)
    assert abs(no_grad.item() - ref_loss.item() * (labels != -100).sum().item()) <= tol_loss * abs(no_grad.item())


def test_int8_weight_equals_the_dense_path_on_its_decoded_weight():
    # Same decoded values, same GEMMs and kernel: the int8 path is the dense path plus a decode.
    hidden, weight, labels = _inputs(11, 48, 90, torch.bfloat16, ignore_frac=0.2)
    labels[0] = 3
    q = _int8(weight)
    kw = dict(block_rows=4, slab_cols=25, block_v=8, num_warps=1)
    loss_q, gh_q = _run_slabs(hidden, q, labels, **kw)
    loss_d, gh_d = _run_slabs(hidden, q.dequantize(torch.bfloat16), labels, **kw)
    assert loss_q.item() == loss_d.item() and torch.equal(gh_q, gh_d)


def test_int8_weight_all_ignored_and_reference():
    hidden, weight, labels = _inputs(9, 48, 77, torch.bfloat16)
    q = _int8(weight)
    ref = linear_cross_entropy_reference(hidden, q, labels)
    assert ref.item() == linear_cross_entropy_reference(hidden, q.dequantize(torch.bfloat16), labels).item()
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, q, labels)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss) and torch.all(h.grad == 0)


def test_int8_weight_errors():
    from fastft.quant import Int8RowsTensor

    hidden, weight, labels = _inputs(4, 48, 50, torch.float32)
    q = _int8(weight)
    with pytest.raises(ValueError, match="slabs"):
        fused_linear_cross_entropy(hidden, q, labels, method="rows")
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        fused_linear_cross_entropy(hidden.double(), q, labels)
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_linear_cross_entropy(hidden[:, :40], q, labels)
    with pytest.raises(ValueError, match="tensor or an Int8RowsTensor"):
        fused_linear_cross_entropy(hidden, object(), labels)
    meta = Int8RowsTensor(torch.empty(50, 48, dtype=torch.int8, device="meta"), torch.empty(50, device="meta"))
    with pytest.raises(ValueError, match="int8 weight on meta"):
        fused_linear_cross_entropy(hidden, meta, labels)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(hidden, q, torch.tensor([0, 1, 50, 2]))


def test_int8_slab_plan_caps_the_scratch():
    T, H, V = 16384, 2880, 201088
    max_cols = ce._SCRATCH_BYTES // (H * 2)
    for n_rows in (T, 8193, 4096, 2049, 1025, 7):
        S, W = ce._slab_plan(n_rows, V, None, None, max_cols, defaults=ce._INT8_PLAN)
        assert W * H * 2 <= ce._SCRATCH_BYTES and W % 128 == 0
        # logits slab + scratch + acc + (compaction) the block's hidden rows + the larger of the int8 label rows
        # (freed once decoded, unless they do not fit the scratch) and the block's dH copy
        label_rows = S * H if S > W else 0
        assert S * W * 4 + W * H * 2 + S * H * 4 + S * H * 2 + max(label_rows, S * H * 2) <= 256 * 2**20, (n_rows, S, W)
    assert ce._slab_plan(T, V, None, None, max_cols, defaults=ce._INT8_PLAN) == (4096, 7552)
    assert ce._slab_plan(T, V, None, None, max_cols) == ce._slab_plan(T, V, None, None)  # 15488 either way
    assert ce._slab_plan(T, V, None, 30000, max_cols)[1] > max_cols  # an explicit width is the caller's


# ----------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", [None, False])  # sm_90: the GEMM epilogue's P, then cuBLAS + _slab_kernel
def test_gpu_slabs_anchor_moves(epilogue):
    # The anchor-moving paths at the GPU's default chunk and warps (4 warps share a row: the rescale of P already
    # written by other warps, and the acc rows across slabs), on logits climbing ~0.02 per column over +-200.
    T, H, V = 64, 256, 20000
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    hidden, weight, labels = _inputs(T, H, V, torch.float32, device="cuda", gen=g)
    u = torch.randn(H, device="cuda", generator=g)
    u /= u.norm()
    ramp = torch.linspace(-200, 200, V, device="cuda")
    weight = weight * 0.1 + ramp[:, None] * u / 8
    hidden = hidden * 0.1 + u * 8 * torch.where(torch.arange(T, device="cuda") % 2 == 0, 1.0, -1.0)[:, None]
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels)
    loss, gh = _run_slabs(hidden, weight, labels, slab_cols=6000, epilogue=epilogue)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert _rel(gh, ref_gh) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,K,first,dtype", [
    (300, 1000, 2880, True, torch.bfloat16),  # partial row and column tiles
    (129, 4104, 200, False, torch.float16),  # K not a multiple of the 64-wide K step
    (2048, 28800, 2880, False, torch.bfloat16),  # a gpt-oss slab: 3600 tiles over the persistent grid
    (1, 8, 64, True, torch.bfloat16),
])
def test_gpu_epilogue_kernel_matches_its_reference(rows, width, K, first, dtype):
    from fastft.kernels import cross_entropy_hopper as hopper

    g = torch.Generator(device="cuda").manual_seed(rows + width)
    h = torch.randn(rows, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(width, K, device="cuda", generator=g) * 2 / K**0.5).to(dtype)
    if not hopper.can_run(h, w):
        pytest.skip("the Gluon epilogue kernel runs on sm_90 only")
    y = torch.randint(-50, width + 50, (rows,), device="cuda", generator=g)  # some targets outside the slab
    y[::5] = -100
    m = torch.randn(rows, device="cuda", generator=g) * 3  # earlier slabs' anchors, some passed by > headroom
    tiles = -(-width // hopper.BN)
    outs = []
    for fn in (hopper.logits_p, ce._logits_p_reference):
        p = torch.full((rows, width), 9.0, device="cuda", dtype=dtype)
        ta, ts = torch.full((2, rows, tiles), 9.0, device="cuda")
        t = torch.full((rows, ), 9.0, device="cuda")
        fn(h, w, p, ta, ts, y, m, t, 0, -100, 1.0, first)
        outs.append((p.float(), ta, ts, t))
    (p, ta, ts, t), (rp, rta, rts, rt) = outs
    torch.testing.assert_close(ta, rta, rtol=0, atol=1e-4)
    torch.testing.assert_close(t, rt, rtol=0, atol=1e-4)
    torch.testing.assert_close(ts, rts, rtol=1e-4, atol=0)
    torch.testing.assert_close(p, rp, rtol=1e-2, atol=1e-6)  # one rounding of P to bf16/fp16


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["slabs", "rows"])
@pytest.mark.parametrize("T,ignore_frac", [(1, 0.0), (1000, 0.0), (4099, 0.5)])
def test_gpu_real_vocab_against_fp64(T, ignore_frac, method):
    gen = torch.Generator(device="cuda").manual_seed(T)
    hidden, weight, labels = _inputs(T, 2880, 201088, torch.bfloat16, "cuda", ignore_frac, gen)
    loss, gh, _ = _run(hidden, weight, labels, method=method)
    # fp64 reference in row chunks (the full [T, V] fp64 would not fit)
    ref_sum, ref_gh = 0.0, torch.empty(T, 2880, dtype=torch.float64, device="cuda")
    n = max(int((labels != -100).sum()), 1)
    w = weight.double()
    for s in range(0, T, 256):
        h = hidden[s:s + 256].double().requires_grad_()
        part = linear_cross_entropy_reference(h, w, labels[s:s + 256], reduction="sum")
        part.backward()
        ref_sum += part.item()
        ref_gh[s:s + 256] = h.grad / n
    ref = ref_sum / n
    assert abs(loss.item() - ref) <= 1e-4 * abs(ref)
    assert _rel(gh, ref_gh) <= 1e-2


@pytest.mark.gpu
def test_gpu_weight_grad_and_fp32():
    gen = torch.Generator(device="cuda").manual_seed(1)
    for dtype, tol_loss, tol_grad in [(torch.bfloat16, 1e-4, 1e-2), (torch.float32, 1e-5, 1e-4)]:
        hidden, weight, labels = _inputs(777, 2880, 50001, dtype, "cuda", 0.2, gen)
        ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, need_dw=True)
        loss, gh, gw = _run(hidden, weight, labels, need_dw=True)
        assert abs(loss.item() - ref_loss.item()) <= tol_loss * abs(ref_loss.item())
        assert _rel(gh, ref_gh) <= tol_grad and _rel(gw, ref_gw) <= tol_grad


def _extra_peak_bytes(hidden, weight, labels) -> int:
    """Peak memory of the loss's forward+backward beyond its inputs and the hidden grad, after a warm-up call
    (cuBLAS workspace, autotuning)."""
    hidden.requires_grad_()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    hidden.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - hidden.grad.numel() * hidden.grad.element_size()


@pytest.mark.gpu
def test_gpu_extra_memory_at_16k():
    T, H, V = 16384, 2880, 201088
    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden, weight, labels = _inputs(T, H, V, torch.bfloat16, "cuda", 0.0, gen)
    extra = _extra_peak_bytes(hidden, weight, labels)
    assert extra <= 256 * 2**20, f"extra peak {extra / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_gpu_all_ignored_and_cuda_graph_capture():
    gen = torch.Generator(device="cuda").manual_seed(3)
    hidden, weight, labels = _inputs(300, 2880, 4097, torch.bfloat16, "cuda", 0.5, gen)
    ref = linear_cross_entropy_reference(hidden.double(), weight.double(), labels)
    static = hidden.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_linear_cross_entropy(static, weight, labels)  # warm up (Triton compile) outside the capture
        with torch.cuda.graph(graph, stream=s):
            out = fused_linear_cross_entropy(static, weight, labels)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    torch.cuda.synchronize()
    assert abs(out.item() - ref.item()) <= 1e-4 * abs(ref.item())
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_gpu_int8_weight_at_real_shape(ignore_frac):
    from fastft.quant import Int8RowsTensor

    T, H, V = 4096, 2880, 201088
    gen = torch.Generator(device="cuda").manual_seed(4)
    hidden, weight, labels = _inputs(T, H, V, torch.bfloat16, "cuda", ignore_frac, gen)
    q = Int8RowsTensor.quantize(weight)
    assert q.device.type == "cuda" and q.nbytes() == V * H + V * 4
    dense = q.dequantize(torch.bfloat16)
    loss_q, gh_q = _run_frozen(hidden, q, labels)
    loss_d, gh_d = _run_frozen(hidden, dense, labels)  # the bf16-dequantized weight through the dense slabs path
    assert abs(loss_q.item() - loss_d.item()) <= 1e-3 * abs(loss_d.item())
    assert _rel(gh_q, gh_d) <= 1e-2
    loss_w, _ = _run_frozen(hidden, weight, labels)  # the unquantised weight: int8's own error on the loss
    assert abs(loss_q.item() - loss_w.item()) <= 1e-3 * abs(loss_w.item())
    # the quantiser on the GPU gives the CPU's codes
    cpu = Int8RowsTensor.quantize(weight[:4096].cpu())
    assert torch.equal(Int8RowsTensor.quantize(weight[:4096]).data.cpu(), cpu.data)


@pytest.mark.gpu
def test_gpu_int8_extra_memory_at_16k():
    from fastft.quant import Int8RowsTensor

    T, H, V = 16384, 2880, 201088
    gen = torch.Generator(device="cuda").manual_seed(5)
    hidden, weight, labels = _inputs(T, H, V, torch.bfloat16, "cuda", 0.1, gen)
    q = Int8RowsTensor.quantize(weight)
    del weight
    extra = _extra_peak_bytes(hidden, q, labels)
    assert extra <= 256 * 2**20, f"extra peak {extra / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("T,ignore_frac,kw", [
    (4096, 0.3, dict()),  # gpt-oss shape, one block, compaction
    (9001, 0.0, dict(block_rows=4000)),  # three blocks (the stream restarts per block), uneven
    (37, 0.5, dict(block_rows=16, slab_cols=3000)),  # tiny blocks, many slabs
])
def test_gpu_int8_codes_in_host_memory_equal_the_device_codes(T, ignore_frac, kw):
    """Codes streamed from pinned host memory (codes_to_host) give the device codes' loss and dH, bit for bit;
    an out-of-range label is refused before anything streams; the device holds only the scales."""
    from fastft.quant import Int8RowsTensor

    H, V = 2880, 201088
    gen = torch.Generator(device="cuda").manual_seed(6)
    hidden, weight, labels = _inputs(T, H, V, torch.bfloat16, "cuda", ignore_frac, gen)
    labels[0] = V - 1
    q = Int8RowsTensor.quantize(weight)
    del weight
    host = q.codes_to_host()
    assert host.codes_on_host and host.device == q.device and host.nbytes() == V * 4
    loss_d, gh_d = _run_frozen(hidden, q, labels, **kw)
    loss_h, gh_h = _run_frozen(hidden, host, labels, **kw)
    assert loss_h.item() == loss_d.item() and torch.equal(gh_h, gh_d)
    with torch.no_grad():
        assert fused_linear_cross_entropy(hidden, host, labels, **kw).item() == loss_d.item()
    with pytest.raises(ValueError, match="outside"):  # checked before any streaming
        fused_linear_cross_entropy(hidden, host, torch.full_like(labels, V), **kw)
