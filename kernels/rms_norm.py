"""RMSNorm (GPT-OSS / HF GptOssRMSNorm): y = (weight * (x.float() * rstd)).to(x.dtype), rstd = rsqrt(mean(x^2) + eps).

Two implementations with the same saved state (x in its own dtype, the weight, rstd [rows] fp32):

- ``rms_norm_reference`` (the torch backend, the CPU path): torch ops over blocks of ~2**24 elements, so its fp32
  temporaries stay ~64 MB at any T. Autograd of the plain formula would keep fp32 [T, H] copies instead (x.float()
  and the normalised x: 1.5 GB each at 128K tokens for gpt-oss).
- ``rms_norm`` (Triton): one launch per forward and one per backward (plus a [P, H] sum when the weight needs a grad).
  Forward: one program per row; the row is loaded once (bf16 H=2880: 5.6 KB), reduced in fp32, scaled, stored.
  Backward: each of P programs walks a contiguous run of rows, recomputes xhat = x * rstd and writes
      dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * weight
  and, when the weight needs a grad, accumulates dw += dy * xhat in fp32 registers and stores one partial row; the
  [P, H] fp32 partials (P = 4 x SMs: 132 x 4 x 2880 x 4 B = 6 MB on an H200) are summed by torch (no atomics, so the
  result is deterministic). Without a weight grad P = rows, one row each.
  Extra memory: rstd [rows] fp32 (saved) and the partials; no [rows, H] fp32 temporary in either pass.

Precision: both compute in fp32 (fp64 for fp64 x, which the Triton entry point hands to the reference) and round once
on store; the forward applies rstd then the weight in the reference's order, so outputs match it up to the order of
the fp32 sum of squares.
"""

from __future__ import annotations

import torch

from fastft.kernels._env import FLOAT_DTYPES, sm_count, triton_runs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton fall back to the reference
    triton = None


class RMSNormReferenceFunction(torch.autograd.Function):
    """The lean-memory torch RMSNorm: rows in blocks of BLOCK_ELEMS elements; backward recomputes xhat from x and
    rstd (fp32; fp64 for an fp64 x)."""

    BLOCK_ELEMS = 1 << 24

    @staticmethod
    def forward(ctx, x, weight, eps):
        compute = torch.promote_types(x.dtype, torch.float32)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=compute, device=x.device)
        for s in _row_blocks(x2, RMSNormReferenceFunction.BLOCK_ELEMS):
            xf = x2[s].to(compute)
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            y[s] = (weight * (xf * r)).to(x.dtype)
            rstd[s] = r.squeeze(-1)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
        w = weight.to(rstd.dtype)
        dx = torch.empty_like(x2) if need_x else None
        dw = torch.zeros_like(w) if need_w else None
        for s in _row_blocks(x2, RMSNormReferenceFunction.BLOCK_ELEMS):
            r = rstd[s, None]
            xhat = x2[s].to(r.dtype) * r
            g = dy2[s].to(r.dtype)
            if need_w:
                dw += (g * xhat).sum(0)
            if need_x:
                gw = g * w  # d(loss)/d(xhat); rstd's own dependence on x gives the projection term
                dx[s] = (r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return (dx.view(x.shape) if need_x else None), (dw.to(weight.dtype) if need_w else None), None


def _row_blocks(x2, block_elems):
    rows = max(1, block_elems // max(1, x2.shape[1]))
    return [slice(s, s + rows) for s in range(0, x2.shape[0], rows)]


def rms_norm_reference(x, weight, eps):
    """HF GptOssRMSNorm's math, (weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps))).to(x.dtype) (fp64
    for fp64 x), with the lean memory of RMSNormReferenceFunction. x [..., H], weight [H] (fp32 in the model)."""
    return RMSNormReferenceFunction.apply(x, weight, eps)


# ---------------------------------------------------------------------------------------------------------------------
# Triton

def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 8192 else 16


def _programs(device: torch.device) -> int:
    """Programs of the weight-grad backward: enough to fill the GPU (4 per SM); 4 under the interpreter, so CPU tests
    cover several rows per program and a ragged last run."""
    return 4 * sm_count(device)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, H, eps,
                             BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        y = w * (x * rstd)  # the reference's order: normalise, then scale
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(x_ptr, dy_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride_x, stride_dy, stride_dx,
                             n_rows, H, rows_per_program,
                             BLOCK_H: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        col_mask = cols < H
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = pid.to(tl.int64) * rows_per_program + i
            mask = col_mask & (row < n_rows)  # the last program's run may pass the end: masked rows add zero
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
            xhat = x * rstd
            if NEED_DX:
                g = dy * w
                dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / H))
                tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw += dy * xhat
        if NEED_DW:
            tl.store(dw_ptr + pid * H + cols, dw, mask=col_mask)


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    """[rows, H] view with unit column stride (a copy only for an odd layout)."""
    t2 = t.reshape(-1, H)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        x2 = _rows(x, H)
        rows = x2.shape[0]
        y = torch.empty(rows, H, dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(H)
        if rows:
            _rms_norm_fwd_kernel[(rows,)](x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), H, eps,
                                          BLOCK_H=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if not (need_x or need_w):
            return None, None, None
        rows, H = x2.shape
        dy2 = _rows(dy, H)
        dx = torch.empty_like(x2) if need_x else None
        programs = max(1, min(rows, _programs(x2.device))) if need_w else max(1, rows)
        per = triton.cdiv(rows, programs) if rows else 0
        partial = torch.empty(programs, H, dtype=torch.float32, device=x2.device) if need_w else None
        block = triton.next_power_of_2(H)
        if rows:
            _rms_norm_bwd_kernel[(programs,)](
                x2, dy2, weight.contiguous(), rstd, dx if need_x else x2, partial if need_w else rstd,
                x2.stride(0), dy2.stride(0), dx.stride(0) if need_x else 0, rows, H, per,
                BLOCK_H=block, NEED_DX=need_x, NEED_DW=need_w, num_warps=_num_warps(block))
        dw = None
        if need_w:
            dw = (partial.sum(0) if rows else torch.zeros(H, device=x2.device)).to(weight.dtype)
        return (dx.view(ctx.shape) if need_x else None), dw, None


def rms_norm(x, weight, eps):
    """The backend contract: x [..., H] (bf16/fp16/fp32; other dtypes and CPU without the interpreter take the
    reference), weight [H] -> [..., H] in x's dtype; differentiable in x and weight."""
    if not triton_runs(x, FLOAT_DTYPES):
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))


if triton is None:  # no kernel to offer: the backend registry then reports (and runs) the reference
    rms_norm = None  # noqa: F811
