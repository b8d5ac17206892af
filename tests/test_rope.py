"""fastft.kernels.rope: the Triton half-split rotary embedding (forward, backward) against the torch code in fp64.

CPU: Triton interpreter, fp32 and bf16, odd token/head counts and head dims (a half of 3 and of 9 is masked), x as a
strided view of a fused projection, strided dy, the fp64 fallback, shape checks.
GPU (-m gpu): gpt-oss q [4096, 64, 64] and k [4096, 8, 64], bf16 and fp32, with the model's cos/sin tables.
"""

import pytest
import torch

from fastft.kernels.rope import _rotate, apply_rope, apply_rope_reference


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _tables(T, D, dtype, device="cpu"):
    """cos/sin of real rope angles times a YaRN-like scale, as GptOssForTraining.rope makes them."""
    inv_freq = 150000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    freqs = torch.randint(0, 4096, (T,), device=device).float()[:, None] * inv_freq
    return (freqs.cos() * 1.3).to(dtype), (freqs.sin() * 1.3).to(dtype)


def _check(x, cos, sin, dy, dtype):
    """Output and dx of apply_rope against autograd of the torch code in fp64 on the same (rounded) inputs."""
    y = apply_rope(x, cos, sin)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = apply_rope_reference(x64, cos.double(), sin.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    assert _rel(y, y64) <= TOL[dtype] and _rel(dx, dx64) <= TOL[dtype], (_rel(y, y64), _rel(dx, dx64))
    return y, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,heads,D", [(1, 1, 64), (7, 5, 64), (33, 3, 18), (5, 8, 6)])
def test_matches_fp64(dtype, T, heads, D):
    x = torch.randn(T, heads, D, dtype=dtype, requires_grad=True)
    cos, sin = _tables(T, D, dtype)
    _check(x, cos, sin, torch.randn(T, heads, D, dtype=dtype), dtype)


def test_fp32_equals_the_torch_code():
    """In fp32 the kernel and the torch code differ only by the kernel's fused rounding."""
    x = torch.randn(7, 5, 64)
    cos, sin = _tables(7, 64, torch.float32)
    torch.testing.assert_close(apply_rope(x, cos, sin), apply_rope_reference(x, cos, sin), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_of_a_fused_projection(dtype):
    """q and k as views of one [T, (Hq + 2 Hkv) * D] projection (token stride > heads * D), dy transposed."""
    T, Hq, Hkv, D = 9, 6, 2, 16
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, requires_grad=True)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _tables(T, D, dtype)
    _check(q, cos, sin, torch.randn(Hq, T, D, dtype=dtype).transpose(0, 1), dtype)
    _check(k, cos, sin, torch.randn(T, Hkv, D, dtype=dtype), dtype)
    # cos/sin as strided views too (a slice of a wider table)
    wide = torch.cat([cos, sin], dim=-1)
    _check(k, wide[:, : D // 2], wide[:, D // 2:], torch.randn(T, Hkv, D, dtype=dtype), dtype)


def test_backward_is_the_inverse_rotation():
    """With unit-norm cos/sin the map is orthogonal: backward(forward(x)) == x."""
    x = torch.randn(7, 3, 64)
    ang = torch.rand(7, 32) * 6.3
    cos, sin = ang.cos(), ang.sin()
    y = _rotate(x, cos, sin, inverse=False)
    back = _rotate(y, cos, sin, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_fp64_and_cpu_fall_back_to_the_reference(monkeypatch):
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    cos, sin = _tables(5, 16, torch.float64)
    assert torch.equal(apply_rope(x, cos, sin), apply_rope_reference(x, cos, sin))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xf, cf, sf = x.float(), cos.float(), sin.float()
    assert torch.equal(apply_rope(xf, cf, sf), apply_rope_reference(xf, cf, sf))


def test_bad_shapes():
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(torch.randn(5, 3, 16), torch.randn(5, 16), torch.randn(5, 16))
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(torch.randn(5, 3, 15), torch.randn(5, 7), torch.randn(5, 7))


def test_empty():
    x = torch.randn(0, 4, 16, requires_grad=True)
    y = apply_rope(x, torch.randn(0, 8), torch.randn(0, 8))
    (dx,) = torch.autograd.grad(y, x, torch.randn(0, 4, 16))
    assert y.shape == dx.shape == (0, 4, 16)


# ---------------------------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [64, 8])
def test_gpu_gpt_oss_shapes(dtype, heads):
    T, D = 4096, 64
    proj = torch.randn(T, heads * D, device="cuda", dtype=dtype, requires_grad=True)
    x = proj.view(T, heads, D)  # as Attention.forward passes q / k
    cos, sin = _tables(T, D, dtype, "cuda")
    _check(x, cos, sin, torch.randn(T, heads, D, device="cuda", dtype=dtype), dtype)


@pytest.mark.gpu
def test_gpu_strided_view():
    T, D = 4096, 64
    qkv = torch.randn(T, 80 * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = qkv[:, 64 * D: 72 * D].view(T, 8, D)
    cos, sin = _tables(T, D, torch.bfloat16, "cuda")
    _check(k, cos, sin, torch.randn(T, 8, D, device="cuda", dtype=torch.bfloat16), torch.bfloat16)
