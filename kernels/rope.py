"""Rotary position embedding, half-split (GPT-OSS / HF rotate_half, not interleaved), forward and backward.

x [T, heads, D] (q or k: often a view of a projection output), cos/sin [T, D/2] in x's dtype, already scaled by the
rope's attention factor; with x = (x1, x2) split at D/2:

    out = (x1 * cos - x2 * sin,  x2 * cos + x1 * sin)

The map is a rotation in each (x1[i], x2[i]) plane (times the scale), so its backward is the transposed rotation:
dx1 = dy1 * cos + dy2 * sin, dx2 = dy2 * cos - dy1 * sin, i.e. the same kernel with -sin. cos/sin are position tables
and get no gradient; nothing but the two tables is saved for backward.

Triton: one launch per forward and per backward. Rows r = t * heads + h are taken BLOCK_R at a time as [BLOCK_R, D/2]
tiles of each half; cos/sin rows are gathered per token (heads rows share one, from cache). The output is a new
contiguous [T, heads, D]; x may have any token and head strides with unit stride in D. Extra memory: the output only
(the torch code makes three [T, heads, D/2]-sized temporaries per half before its cat).

Rounding: the kernel computes in fp32 and rounds once per output element; the torch reference in bf16 rounds after
every multiply and add (x1 * cos, x2 * sin, their difference), so bf16 results differ by ~1 bf16 ulp (the kernel's are
the closer to exact). fp32 agrees to fp32 rounding.
"""

from __future__ import annotations

import torch

from fastft.kernels._env import FLOAT_DTYPES, triton_runs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton fall back to the reference
    triton = None


def apply_rope_reference(x, cos, sin):
    """Half-split rotation (not interleaved); x [T, heads, D], cos/sin [T, D/2] already times attention_scaling."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# elements per half-tile: 128 rows x 32 (gpt-oss D/2) = 4096, 16 per thread at 4 warps
_TILE = 4096

if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, stride_xt, stride_xh, stride_ct, stride_st,
                     HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     INVERSE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        t = rows // HEADS  # HEADS is a constexpr: a shift for powers of two
        h = rows % HEADS
        d = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (d < HALF)[None, :]
        src = x_ptr + (t * stride_xt + h * stride_xh)[:, None] + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + (t * stride_ct)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + (t * stride_st)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            s = -s
        dst = out_ptr + (rows * (2 * HALF))[:, None] + d[None, :]  # out is contiguous [T, HEADS, 2 * HALF]
        tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x, cos, sin, inverse: bool):
    T, heads, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    out = torch.empty(T, heads, D, dtype=x.dtype, device=x.device)
    n_rows, half = T * heads, D // 2
    block_d = triton.next_power_of_2(half)
    block_r = max(1, min(_TILE // block_d, triton.next_power_of_2(n_rows)))
    if n_rows:
        _rope_kernel[(triton.cdiv(n_rows, block_r),)](
            x, cos, sin, out, n_rows, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            HEADS=heads, HALF=half, BLOCK_R=block_r, BLOCK_D=block_d, INVERSE=inverse, num_warps=4)
    return out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, inverse=True), None, None


def apply_rope(x, cos, sin):
    """The backend contract (see apply_rope_reference); fp64 and CPU without the interpreter take the reference."""
    T, _, D = x.shape
    if D % 2 or cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"rope: x {tuple(x.shape)} needs cos/sin [{T}, {D // 2}], got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if not triton_runs(x, FLOAT_DTYPES):
        return apply_rope_reference(x, cos, sin)
    return RopeFunction.apply(x, cos, sin)


if triton is None:  # no kernel to offer: the backend registry then reports (and runs) the reference
    apply_rope = None  # noqa: F811
