"""fastft.kernels.rms_norm: the Triton RMSNorm (forward, dx, dw) against autograd of HF's formula in fp64.

CPU: Triton interpreter, fp32 and bf16, odd H and row counts (1, 7, 33; several rows per backward program and a
ragged last run), strided x and dy, weight grad on and off, the saved state, the fp64 fallback; the tiny model with
the norm and rope kernels against the torch backend.
GPU (-m gpu): gpt-oss shapes (T=4096, H=2880), bf16 and fp32, and the Triton backend's sources.
"""

import dataclasses

import pytest
import torch

from fastft.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference

EPS = 1e-5


def hf_rmsnorm(x, weight, eps):
    """HF GptOssRMSNorm, in fp64 when x is fp64."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(shape, dtype, device="cpu", weight_grad=True):
    x = (3 * torch.randn(shape, dtype=torch.float64, device=device) + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).requires_grad_(weight_grad)
    dy = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    return x, w, dy


def _check_against_fp64(fn, x, w, dy, dtype):
    """Output and grads of fn against autograd of the fp64 formula on the same (rounded) inputs."""
    wants = [x, w] if w.requires_grad else [x]
    y = fn(x, w, EPS)
    got = torch.autograd.grad(y, wants, dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(w.requires_grad)
    y64 = hf_rmsnorm(x64, w64, EPS)
    ref = torch.autograd.grad(y64, [x64, w64] if w.requires_grad else [x64], dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, y64) <= TOL[dtype]
    for g, r, t in zip(got, ref, wants):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert _rel(g, r) <= TOL[dtype], _rel(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (33, 48), (3, 5, 33)])
def test_matches_fp64(dtype, weight_grad, shape):
    x, w, dy = _inputs(shape, dtype, weight_grad=weight_grad)
    _check_against_fp64(rms_norm, x, w, dy, dtype)


def test_forward_matches_the_reference():
    """Same fp32 math in the same order: only the sum of squares' order differs."""
    x, w, _ = _inputs((33, 48), torch.float32)
    torch.testing.assert_close(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS), rtol=2e-7, atol=2e-7)
    xb = x.detach().bfloat16()
    torch.testing.assert_close(rms_norm(xb, w, EPS), rms_norm_reference(xb, w, EPS), rtol=8e-3, atol=0)


def test_strided_x_and_dy():
    base = torch.randn(33, 60, dtype=torch.float64).float()
    x = base[:, 5:53].requires_grad_()  # row stride 60: read in place
    w = (1 + 0.3 * torch.randn(48)).requires_grad_()
    dy = torch.randn(48, 33).t()  # column stride 33: copied
    _check_against_fp64(rms_norm, x, w, dy, torch.float32)
    xt = torch.randn(48, 7).t().requires_grad_()  # column stride 7
    _check_against_fp64(rms_norm, xt, w, torch.randn(7, 48), torch.float32)


def test_saves_only_x_weight_and_rstd():
    x, w, _ = _inputs((3, 5, 33), torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        RMSNormFunction.apply(x, w, EPS)
    assert [(t.dtype, t.numel()) for t in saved] == [
        (torch.bfloat16, x.numel()), (torch.float32, 33), (torch.float32, 15)]
    assert saved[0].data_ptr() == x.data_ptr()  # x itself, not a copy


def test_fp64_and_cpu_fall_back_to_the_reference(monkeypatch):
    x, w, _ = _inputs((7, 33), torch.float64)
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter
    xf = x.detach().float()
    assert torch.equal(rms_norm(xf, w, EPS), rms_norm_reference(xf, w, EPS))


def test_empty_rows():
    x = torch.randn(0, 48, requires_grad=True)
    w = torch.ones(48, requires_grad=True)
    y = rms_norm(x, w, EPS)
    gx, gw = torch.autograd.grad(y, [x, w], torch.randn(0, 48))
    assert y.shape == (0, 48) and gx.shape == (0, 48) and torch.equal(gw, torch.zeros(48))


def test_tiny_model_with_norm_and_rope_kernels_matches_torch_backend():
    """The model's wiring: Triton rms_norm and rope (the other ops torch) give the torch backend's loss and grads."""
    from fastft.backends import get_backend
    from fastft.kernels.rope import apply_rope
    from fastft.model import GptOssForTraining, LoraSettings, apply_lora
    from fastft.model.lora import trainable_parameters
    from fastft.model.testing import packed_batch, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    ref = GptOssForTraining.from_config(cfg)
    ours = GptOssForTraining.from_config(cfg, backend=dataclasses.replace(get_backend("torch"), rms_norm=rms_norm,
                                                                            rope=apply_rope))
    ours.load_state_dict(ref.state_dict())
    ids, pos, cu = packed_batch([5, 8], cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (ref, ours):
        apply_lora(m, LoraSettings(targets="all", r=2, dropout=0.0))
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n or n.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            m.model.norm.weight.requires_grad_(True)  # a trainable norm too: the dw path
        m.enable_gradient_checkpointing(True)
        loss = m(ids, pos, cu, ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad for _, p in trainable_parameters(m)] + [m.model.norm.weight.grad]))
    (la, ga), (lb, gb) = grads
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("T", [4096, 33])
def test_gpu_gpt_oss_shapes(dtype, weight_grad, T):
    x, w, dy = _inputs((T, 2880), dtype, "cuda", weight_grad)
    _check_against_fp64(rms_norm, x, w, dy, dtype)


@pytest.mark.gpu
def test_gpu_backend_reports_the_kernels():
    from fastft.backends import get_backend

    b = get_backend("auto", "cuda")
    assert b.sources["rms_norm"] == b.sources["rope"] == "triton"
    assert b.rms_norm is rms_norm
