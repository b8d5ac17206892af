"""Fused linear cross-entropy: the loss of hidden @ weight^T without materialising [T, V] logits.

Design (GPT-OSS: H=2880, V=201088). The loss is the last op of the graph, so its upstream gradient is a scalar:
the forward computes the gradients too, and the backward only scales them. Rows are processed in chunks of C:

    logits[C, V] fp32 = h_c @ W^T          cuBLAS (bf16 inputs, fp32 accumulate and output), one reused buffer
    loss, G           = _lse_grad_kernel   Triton, one program per row: online log-sum-exp in fp32 (pass 1), then
                                           G = softmax - onehot in the input dtype, written over the logits (pass 2)
    dH[c]             = G @ W              cuBLAS; dW += G^T @ h_c (fp32) only when the weight needs a grad

so the op costs the two T*H*V GEMMs plus one streaming kernel (no recomputation GEMM), and the backward is a scale.
This "rows" path serves a trainable weight (dW) and A/B runs. Its GEMMs have M=C=256, ~600 TFLOP/s on an H200.

The frozen-weight default, "slabs", runs the GEMMs at M=2048 rows (near peak) by walking the vocabulary in slabs
of ~16k columns with an online softmax, as flash attention walks keys. Per block of S rows, per slab [v0, v1):

    z[S, w] fp32   = h_b @ W[v0:v1]^T                     cuBLAS, one reused buffer
    m, s, t        = _slab_kernel                         one streaming read of each row: anchor m, sum of
                                                          exp(z - m) without the target s, the exact fp32 target
                                                          logit t; P = exp(z - m) (target column zeroed) written
                                                          over z in bf16
    acc[S, H] fp32 = acc + P @ W[v0:v1]                   cuBLAS addmm with fp32 output

The anchor m is a lagging running max: it moves only when a chunk's max passes it by more than a headroom (16 for
bf16/fp32, 8 for fp16), so P <= e^16 never overflows, and the kernel itself rescales the P it already wrote for the
row (earlier chunks of this slab) and the row of acc by exp(m_old - m_new) when it does. In practice that happens in
a row's first chunks only: each logit is read once, and no per-slab pass rescales acc (measured: 2 ms of a 64 ms
op at T=16384 before).

and at the end of the block, with s_all = s + exp(t - m): loss = m + log(s_all) - t and
dH = acc / s_all - (s / s_all) * W[label], i.e. softmax - onehot with the target's p - 1 = -s / s_all never rounded.
Memory: S * w * 4 (128 MiB at S=2048, w=16384) + acc S * H * 4 (22.5 MiB) + the W[label] gather (11 MiB).

On sm_90 with bf16/fp16 inputs the first two steps are one kernel (cross_entropy_hopper.py): the logits GEMM's
epilogue takes P straight from its fp32 registers against per-tile anchors, so the fp32 logits never touch memory,
and _slab_fix_kernel puts every row on one anchor: one program per row reads its tile anchors and sums, and rewrites
P only in tiles whose anchor is below the row's (every tile but one in a row's first slab, rarely after). P is then
[S, w] in the hidden dtype, so the same 128 MiB holds twice the columns (w = 28800 at gpt-oss's vocabulary);
memory: P 112.5 MiB + the tile anchors and sums 2 * S * w / 128 * 4 (3.5 MiB) + acc + gather = ~150 MiB.

int8 weight (fastft.quant.Int8RowsTensor: codes [V, H] + one fp32 scale per row, a frozen lm_head at half of bf16's
bytes), slabs path only. Each slab is decoded before its GEMMs, W[v0:v1] = codes * scale[:, None] computed in fp32 and
rounded once to the hidden dtype, into one reused scratch [w, H]; the W[label] rows are decoded the same way into that
scratch (free by then) at the end of a block. So the op is exactly the dense op on ``weight.dequantize(hidden.dtype)``
plus one streaming pass over the codes per block of rows: V * H * 3 bytes moved (1.7 GB for gpt-oss, ~0.4 ms at an
H200's bandwidth) against ~7 ms of GEMMs per 2048-row block (bench_cross_entropy.py --int8 measures it). The scratch
is capped at _SCRATCH_BYTES (90 MiB: w <= 16384 at H=2880 in bf16). Blocks are 4096 rows (_INT8_PLAN: the decode is
per block); extra peak at gpt-oss shapes (S=4096, w=7552 after balancing; any T): logits 118 MiB + scratch 41.5 MiB +
acc 45 MiB (the W[label] rows decode into the scratch, free by then) = 205 MiB; with ignored labels the compacted
block's hidden rows (22.5 MiB) live through the block and the bf16 copy of its dH (22.5 MiB) is made at its end:
250 MiB, under 256 MiB at T=16384 or any other T. Codes in pinned host memory (``Int8RowsTensor.codes_to_host``,
fastft's default lm_head on CUDA) stream in per slab on a side stream while the previous slab's GEMMs run
(``_HostCodes``): bit-identical results, +53 MiB (two code buffers and the block's target rows), 0.54 GiB less
resident weight for gpt-oss-20b; in an e2e step the same time as device codes (0.2224 vs 0.2222 s, af7fa43 rows).

Precision: the logits are never rounded to bf16, so the loss is fp32-exact up to the GEMM's own accumulation (it
meets 1e-4 relative against fp64 even for peaked softmaxes, where bf16 logits miss by 1e-3). G is unscaled (values
in [-1, 1], safe in fp16; the slabs' P is at most e^8 in fp16); 1/n and the upstream gradient are applied to dH/dW in
backward.

Memory: extra = C * V * 4 bytes (the buffer; G lives inside it) + O(C * H). C is sized to keep the buffer under
_BUFFER_BYTES (200 MiB): C = 256 at V=201088 (196 MiB). The hidden grad [T, H] is the op's output, not counted.

Labels: one host sync per call (~tens of us against a ~50 ms op; skipped while a CUDA graph is being captured)
validates the labels and counts the non-ignored rows; ignored rows are then dropped from both GEMMs (prompt tokens in
SFT cost nothing). Under graph capture there is no sync and no compaction: ignored rows get zero loss and zero
gradient in the kernel, and an out-of-range label gives a NaN loss (never an out-of-bounds read).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton fall back to the reference
    triton = None

from fastft.kernels import cross_entropy_hopper as _hopper
from fastft.kernels._env import triton_runs
from fastft.quant import Int8RowsTensor

_BUFFER_BYTES = 200 * 2**20
# Slab path: rows per block (GEMMs with M=2048 run near peak) and the fp32 [block, slab] logits buffer's budget:
# 2048 x 16384 x 4 B = 128 MiB; with acc 2048 x 2880 x 4 B = 22.5 MiB and the W[label] gather (11.3 MiB bf16) the
# extra peak is ~165 MiB at any T.
_BLOCK_ROWS = 2048
_SLAB_BYTES = 128 * 2**20
_DENSE_PLAN = (_BLOCK_ROWS, _SLAB_BYTES)
# int8 weight: the decoded slab [w, H] in the hidden dtype is the extra buffer; its budget caps the slab width.
_SCRATCH_BYTES = 90 * 2**20
# int8 weight: every block of rows decodes the whole weight once (1.7 GB moved), so blocks are twice as tall, with a
# smaller logits buffer to stay under 256 MiB: 4096 x 7552 x 4 B = 118 MiB + scratch 41.5 + acc 45 + compaction 45 =
# 250 MiB. Measured at T=4096 on an H200 (an e2e step's loss): 18.6 ms vs 20.6 ms at 2048-row blocks.
_INT8_PLAN = (4096, 120 * 2**20)
# Slab kernel: columns per streamed chunk and warps (a row's chunks stream through one program); swept at T=16384
# on an H200 over 2048-16384 columns x 4-16 warps: within 5%, this the fastest (65.4 ms for the whole op).
_SLAB_BLOCK_V = 2048
_SLAB_WARPS = 4
# How far a chunk's max may pass the row's anchor before the anchor moves: P <= exp(headroom) must fit P's dtype
# (fp16 tops out at 65504 ~ e^11) and sums of 201k such terms stay far inside fp32.
_HEADROOM = {torch.float32: 16.0, torch.bfloat16: 16.0, torch.float16: 8.0}


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """Materialises fp32 logits [T, V]; "mean" divides by the count of non-ignored labels (0 if there are none).
    An Int8RowsTensor weight is dequantised to the hidden dtype first."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if isinstance(weight, Int8RowsTensor):
        weight = weight.dequantize(hidden.dtype)
    logits = (hidden @ weight.t()).float()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


if triton is not None:

    @triton.jit
    def _lse_grad_kernel(
        logits_ptr, logits_stride,  # [rows, V] fp32 logits
        grad_ptr, grad_stride,  # [rows, V] softmax - onehot, may alias the logits (see _grad_view)
        labels_ptr, loss_ptr,  # [rows] int64 in, [rows] fp32 out
        V, ignore_index,
        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        logits_row = logits_ptr + row * logits_stride
        n_blocks = tl.cdiv(V, BLOCK_V)

        # Pass 1, from the last block to the first: running max m and sum of exp(x - m), in fp32.
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for i in range(0, n_blocks):
            offs = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
            x = tl.load(logits_row + offs, mask=offs < V, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)

        # A bad label never reads out of bounds: it reads column 0 and yields a NaN loss.
        target_logit = tl.load(logits_row + tl.where(in_range, label, 0))
        loss = tl.where(in_range, lse - target_logit, float("nan"))
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

        if WRITE_GRAD:
            # Pass 2 runs first to last: it starts on the blocks pass 1 read last (likely still in L2). When the
            # gradient aliases the logits (2-byte grad over the first half of the fp32 row), block k's stores land
            # on logits of blocks <= k; the barrier makes every warp's reads of block k (and so of all earlier
            # blocks) happen before any warp stores block k, since warps are not otherwise in step.
            keep = tl.where(in_range & (label != ignore_index), 1.0, 0.0)
            target = tl.where(in_range, label, -1)
            grad_row = grad_ptr + row * grad_stride
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(logits_row + offs, mask=mask, other=0.0)
                g = (tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)) * keep
                tl.debug_barrier()  # after g: each thread has its loaded values in hand before anyone stores
                tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _scale_row(row_ptr, alpha, n, BLOCK: tl.constexpr):
        for i0 in range(0, n, BLOCK):
            o = i0 + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + o, mask=o < n)
            tl.store(row_ptr + o, x * alpha, mask=o < n)

    @triton.jit
    def _slab_kernel(
        z_ptr, z_stride,  # [rows, width] fp32 logits of vocabulary columns [col0, col0 + width)
        p_ptr, p_stride,  # [rows, width] exp(z - m), target column zeroed; may alias z (see _grad_view)
        acc_ptr, acc_stride,  # [rows, H] fp32 running dH numerator, rescaled here when a row's anchor moves
        labels_ptr, m_ptr, s_ptr, t_ptr,  # [rows]: labels; anchor m, sum of exp(z - m) without the target, target z
        col0, width, H, ignore_index, headroom,
        FIRST: tl.constexpr, WRITE_P: tl.constexpr, RESCALE_ACC: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # One streaming pass per row. P is taken against an anchor m that only moves when a chunk's max passes it
        # by more than `headroom` (P <= exp(headroom), no overflow in P's dtype nor in the fp32 sums), so the row
        # is read once and written once, and the [rows, H] accumulator is rescaled only for rows whose anchor
        # moved (rare after the first chunk) instead of by a whole-block pass per slab.
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row)
        tcol = tl.where(label == ignore_index, -1, label - col0)  # the target's column in this slab, if any
        in_slab = (tcol >= 0) & (tcol < width)
        z_row = z_ptr + row * z_stride
        p_row = p_ptr + row * p_stride
        # The target logit is read before any P store can overwrite it (P aliases the front of the fp32 row).
        t_here = tl.load(z_row + tl.where(in_slab, tcol, 0))
        if FIRST:
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.full([], 0.0, tl.float32)
            t_old = tl.full([], 0.0, tl.float32)
        else:
            m = tl.load(m_ptr + row)
            s = tl.load(s_ptr + row)
            t_old = tl.load(t_ptr + row)
        m_in = m
        s_vec = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, width, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < width
            x = tl.load(z_row + offs, mask=mask, other=float("-inf"))
            x_max = tl.max(x, 0)  # a CTA-wide reduction: every warp has read this chunk before anyone stores
            if x_max > m + headroom:  # move the anchor to this chunk's max; rescale what was summed and written
                f = tl.exp(m - x_max)
                s = s * f
                s_vec = s_vec * f
                if WRITE_P:  # this row's P columns [0, start): bytes below the unread logits, so no overlap
                    tl.debug_barrier()  # (rare path) every thread's earlier P stores are visible to all
                    for s0 in range(0, start, BLOCK_V):
                        o = s0 + tl.arange(0, BLOCK_V)
                        pv = tl.load(p_row + o).to(tl.float32)
                        tl.store(p_row + o, (pv * f).to(p_ptr.dtype.element_ty))
                m = x_max
            e = tl.where(offs == tcol, 0.0, tl.exp(x - m))
            s_vec += e
            if WRITE_P:
                tl.store(p_row + offs, e.to(p_ptr.dtype.element_ty), mask=mask)
        if RESCALE_ACC:  # the rows of acc were summed against m_in (earlier slabs)
            if m != m_in:
                _scale_row(acc_ptr + row * acc_stride, tl.exp(m_in - m), H, BLOCK_H)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s + tl.sum(s_vec, 0))
        tl.store(t_ptr + row, tl.where(in_slab, t_here, t_old))


    @triton.jit
    def _slab_fix_kernel(
        p_ptr, s_pm,  # [rows, width] P of the logits epilogue, rescaled here where a tile's anchor is below the row's
        ta_ptr, ts_ptr, s_tm,  # [rows, tiles] tile anchors and sums
        acc_ptr, s_am,  # [rows, H] fp32 running dH numerator, rescaled when the row's anchor moves
        labels_ptr, m_ptr, s_ptr, t_ptr,  # [rows]: labels; anchor, sum of exp(z - m) without the target, target z
        width, tiles, H, col0, ignore_index,
        FIRST: tl.constexpr, WRITE_P: tl.constexpr, RESCALE_ACC: tl.constexpr, BN: tl.constexpr,
        TILES_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # One program per row: the row's new anchor is the max of its tile anchors (each >= the old anchor), its
        # sum is rescaled onto it, and only tiles whose anchor is lower are touched in P (every tile but one in a
        # row's first slab, then rarely: an anchor moves only past the headroom).
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, TILES_P)
        ta = tl.load(ta_ptr + row * s_tm + j, mask=j < tiles, other=float("-inf"))
        ts = tl.load(ts_ptr + row * s_tm + j, mask=j < tiles, other=0.0)
        m = tl.max(ta, 0)
        s_new = tl.sum(ts * tl.exp(ta - m), 0)
        if FIRST:
            label = tl.load(labels_ptr + row)
            tcol = tl.where(label == ignore_index, -1, label - col0)
            if (tcol < 0) | (tcol >= width):  # no target logit yet (the logits kernel stored it if it was here)
                tl.store(t_ptr + row, 0.0)
        else:
            m_in = tl.load(m_ptr + row)
            s_new += tl.load(s_ptr + row) * tl.exp(m_in - m)
            if RESCALE_ACC:
                if m != m_in:
                    _scale_row(acc_ptr + row * s_am, tl.exp(m_in - m), H, BLOCK_H)
        if WRITE_P:
            if tl.min(tl.where(j < tiles, ta, float("inf")), 0) < m:  # tiles at the anchor get a factor of 1
                p_row = p_ptr + row * s_pm
                for v0 in range(0, width, BLOCK_V):
                    o = v0 + tl.arange(0, BLOCK_V)
                    f = tl.exp(tl.load(ta_ptr + row * s_tm + o // BN, mask=o < width, other=0.0) - m)
                    pv = tl.load(p_row + o, mask=o < width, other=0.0).to(tl.float32)
                    tl.store(p_row + o, (pv * f).to(p_ptr.dtype.element_ty), mask=o < width)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s_new)


def _chunk_rows(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:  # the fp32 logits buffer is the op's only large allocation
        chunk_rows = max(16, (_BUFFER_BYTES // (vocab * 4)) // 16 * 16)
    return max(1, min(chunk_rows, n_rows))


def _grad_view(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the kernel writes the gradient: over the logits themselves; a 2-byte dtype uses the first half of
    each fp32 row (row stride 2V), which cuBLAS reads as an ordinary strided matrix, so no second buffer."""
    if dtype == torch.float32:
        return buf
    return buf.view(dtype)[:, : buf.shape[1]]


def _launch_rows(logits, grad, labels, loss_out, ignore_index, write_grad, block_v=None, num_warps=None):
    rows, V = logits.shape
    # One program streams a whole row (804 KB at V=201088) with only ~2 programs per SM (C=256 rows), so each needs
    # many bytes in flight: 8192 fp32 per block over 16 warps = 32 KB per load step.
    block_v = block_v or min(8192, triton.next_power_of_2(V))
    num_warps = num_warps or (16 if block_v >= 8192 else 8 if block_v >= 2048 else 4)
    _lse_grad_kernel[(rows,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, loss_out, V, ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=num_warps,
    )


def _logits_fp32(h, weight, out):
    if h.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    elif h.is_cuda:  # cuBLAS accumulates in fp32 anyway; out_dtype keeps it (torch >= 2.8)
        torch.mm(h, weight.t(), out_dtype=torch.float32, out=out)
    else:  # CPU (interpreter tests only): same math, upcast first
        torch.mm(h.float(), weight.float().t(), out=out)


def _accumulate_weight_grad(grad_w, grad_logits, h):
    if grad_logits.dtype == torch.float32:
        grad_w.addmm_(grad_logits.t(), h)
    elif grad_w.is_cuda:
        torch.addmm(grad_w, grad_logits.t(), h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.addmm_(grad_logits.t().float(), h.float())


def _check_labels(hidden, labels, V, ignore_index):
    """(n_valid device scalar, rows): rows is None (every row, in order) or the indices of the non-ignored rows.
    One host sync validates the labels, skipped under CUDA graph capture (then rows is None)."""
    valid = labels != ignore_index
    n_valid = valid.sum()
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return n_valid, None
    n_bad, n = torch.stack([(valid & ((labels < 0) | (labels >= V))).sum(), n_valid]).tolist()
    if n_bad:
        bad = labels[valid & ((labels < 0) | (labels >= V))][:5].tolist()
        raise ValueError(f"{n_bad} labels outside [0, {V}) that are not ignore_index={ignore_index}, e.g. {bad}")
    return n_valid, (valid.nonzero().squeeze(1) if n < labels.numel() else None)


def _forward(hidden, weight, labels, ignore_index, need_dh, need_dw, chunk_rows=None, block_v=None, num_warps=None):
    """Row-chunk path. Returns (loss_sum fp32, n_valid, grad_hidden | None, grad_weight fp32 | None), unscaled."""
    T, H = hidden.shape
    V = weight.shape[0]
    n_valid, rows = _check_labels(hidden, labels, V, ignore_index)
    n_rows = T if rows is None else rows.numel()

    write_grad = need_dh or need_dw
    grad_h = None
    if need_dh:
        grad_h = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
    grad_w = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if need_dw else None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)

    chunk = _chunk_rows(n_rows, V, chunk_rows)
    buf = torch.empty(chunk, V, dtype=torch.float32, device=hidden.device) if n_rows else None
    grad_buf = _grad_view(buf, hidden.dtype) if n_rows else None
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        if rows is None:
            h, y = hidden[start:end], labels[start:end]
        else:
            idx = rows[start:end]
            h, y = hidden.index_select(0, idx), labels.index_select(0, idx)
        logits, grad = buf[: end - start], grad_buf[: end - start]
        _logits_fp32(h, weight, logits)
        _launch_rows(logits, grad, y, loss_rows[start:end], ignore_index, write_grad, block_v, num_warps)
        if need_dh:
            if rows is None:
                torch.mm(grad, weight, out=grad_h[start:end])
            else:
                grad_h.index_copy_(0, idx, grad @ weight)
        if need_dw:
            _accumulate_weight_grad(grad_w, grad, h)
    return loss_rows.sum(), n_valid, grad_h, grad_w


def _slab_plan(n_rows, vocab, block_rows, slab_cols, max_cols=None, defaults=None, elem_bytes=4):
    """(rows per block, columns per slab): blocks and slabs balanced so the last ones are not slivers. max_cols caps
    the default slab width (an int8 weight's decode scratch); defaults = (rows per block, logits buffer bytes);
    elem_bytes: the buffer's element size (fp32 logits, or P in the hidden dtype)."""
    default_rows, slab_bytes = defaults or _DENSE_PLAN
    block_rows = max(1, min(block_rows or default_rows, n_rows))
    block_rows = -(-n_rows // -(-n_rows // block_rows))
    if slab_cols is None:  # the [block, slab] buffer (fp32 logits, or P) is the big allocation
        slab_cols = max(128, slab_bytes // (block_rows * elem_bytes) // 128 * 128)
        if max_cols is not None:
            slab_cols = max(128, min(slab_cols, max_cols // 128 * 128))
    slab_cols = max(1, min(slab_cols, vocab))
    slab_cols = -(-vocab // -(-vocab // slab_cols))
    if slab_cols >= 128:  # 512-byte aligned fp32 rows for cuBLAS; rounding up never adds a slab
        slab_cols = min(-(-slab_cols // 128) * 128, vocab)
    return block_rows, slab_cols


def _forward_slabs(hidden, weight, labels, ignore_index, need_dh, block_rows=None, slab_cols=None, block_v=None,
                   num_warps=None, epilogue=None, tile_cols=None):
    """Frozen-weight path (online softmax over vocabulary slabs). Returns (loss_sum, n_valid, grad_hidden | None).
    weight: a dense [V, H] tensor in the hidden dtype, or an Int8RowsTensor decoded slab by slab. epilogue: how a
    slab's P is made: None picks the logits GEMM with the softmax in its epilogue where it runs (sm_90, bf16/fp16,
    16-byte aligned rows), else cuBLAS logits + _slab_kernel; False forces the latter; "reference" runs the
    epilogue's torch reference (tests: the fused algorithm on any device) with tiles tile_cols wide (default: the
    kernel's)."""
    T, H = hidden.shape
    V = weight.shape[0]
    int8 = isinstance(weight, Int8RowsTensor)
    dev = hidden.device
    n_valid, rows = _check_labels(hidden, labels, V, ignore_index)
    n_rows = T if rows is None else rows.numel()
    grad_h = None
    if need_dh:
        grad_h = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return loss_rows.sum(), n_valid, grad_h

    if epilogue is None:
        epilogue = "hopper" if _hopper.can_run(hidden, hidden if int8 else weight) else False
    bn = tile_cols if epilogue == "reference" and tile_cols else _hopper.BN
    logits_p = {"hopper": _hopper.logits_p, "reference": functools.partial(_logits_p_reference, bn=bn)}.get(epilogue)
    max_cols, plan = (_SCRATCH_BYTES // (H * hidden.element_size()), _INT8_PLAN) if int8 else (None, _DENSE_PLAN)
    # The epilogue's P buffer holds the hidden dtype instead of fp32 logits: twice the columns in the same bytes
    # (an int8 weight keeps its plan: its decode scratch grows with the width).
    p_bytes = hidden.element_size() if logits_p is not None and not int8 else 4
    S, W = _slab_plan(n_rows, V, block_rows, slab_cols, max_cols, defaults=plan, elem_bytes=p_bytes)
    block_v = block_v or min(_SLAB_BLOCK_V, triton.next_power_of_2(W))
    block_h = min(1024, triton.next_power_of_2(H))
    num_warps = num_warps or _SLAB_WARPS
    headroom = _HEADROOM[hidden.dtype]
    if logits_p is None:
        buf = torch.empty(S, W, dtype=torch.float32, device=dev)
        pbuf = _grad_view(buf, hidden.dtype)
    else:  # P straight from the GEMM's epilogue, with each row's per-tile anchors and sums
        pbuf = torch.empty(S, -(-W // 8) * 8, dtype=hidden.dtype, device=dev)  # 16-byte rows for TMA
        tile_stats = torch.empty(2, S, triton.cdiv(W, bn), dtype=torch.float32, device=dev)
    acc = torch.empty(S, H, dtype=torch.float32, device=dev) if need_dh else None
    stats = torch.empty(3, S, dtype=torch.float32, device=dev)  # anchor, sum-exp without the target, target logit
    scratch = torch.empty(W, H, dtype=hidden.dtype, device=dev) if int8 else None  # the decoded int8 slab
    host = _HostCodes(weight, labels if rows is None else labels.index_select(0, rows), S, W) \
        if int8 and weight.codes_on_host else None
    for start in range(0, n_rows, S):
        end = min(start + S, n_rows)
        r = end - start
        if rows is None:
            h, y = hidden[start:end], labels[start:end]
        else:
            idx = rows[start:end]
            h, y = hidden.index_select(0, idx), labels.index_select(0, idx)
        m, s, t = stats[:, :r]
        a = acc[:r] if need_dh else None
        for j, col0 in enumerate(range(0, V, W)):
            width = min(W, V - col0)
            if int8:
                codes = host.slab(start, j) if host is not None else None
                w_slab = weight.rows(slice(col0, col0 + width), out=scratch[:width], codes=codes)
                if host is not None:
                    host.decoded(j)
            else:
                w_slab = weight[col0:col0 + W]
            p = pbuf[:r, :width]
            if logits_p is None:
                z = buf[:r, :width]
                _logits_fp32(h, w_slab, z)
                _slab_kernel[(r,)](
                    z, z.stride(0), p, p.stride(0), z if a is None else a, 0 if a is None else a.stride(0),  # no dH
                    y, m, s, t, col0, width, H, ignore_index, headroom,
                    FIRST=col0 == 0, WRITE_P=need_dh, RESCALE_ACC=need_dh and col0 > 0, BLOCK_V=block_v,
                    BLOCK_H=block_h, num_warps=num_warps,
                )
            else:
                _epilogue_slab(logits_p, bn, h, w_slab, p, tile_stats, y, m, s, t, a, col0, ignore_index, headroom,
                               block_v, block_h, num_warps)
            if need_dh:  # the kernel rescaled the acc rows whose anchor moved
                _mm_fp32(p, w_slab, a, accumulate=col0 > 0)
        # softmax - onehot without rounding p_target - 1: the target's coefficient is -s_excl / s, exactly.
        in_range = (y >= 0) & (y < V)
        keep = (in_range & (y != ignore_index)).float()
        s_all = s + torch.exp(t - m)
        loss = torch.where(in_range, m + torch.log(s_all) - t, float("nan"))
        loss_rows[start:end] = torch.where(y == ignore_index, 0.0, loss)
        if need_dh:
            a.mul_((keep / s_all).unsqueeze(1))
            codes = host.label_rows(start) if host is not None else None
            w_label = _label_rows(weight, torch.where(in_range, y, 0), scratch, codes)
            a.addcmul_((-keep * s / s_all).unsqueeze(1), w_label)
            if rows is None:
                grad_h[start:end] = a
            else:
                grad_h.index_copy_(0, idx, a.to(grad_h.dtype))
    return loss_rows.sum(), n_valid, grad_h


def _epilogue_slab(logits_p, bn, h, w_slab, p, tile_stats, y, m, s, t, acc, col0, ignore_index, headroom, block_v,
                   block_h, num_warps):
    """One slab with P from the logits GEMM's epilogue (per-tile anchors), then one program per row puts the row on
    one anchor: its sum, the P tiles whose anchor was lower, and its acc row when the anchor moved (acc None: no dH,
    P is not needed past the sums)."""
    r, width = p.shape
    tiles = triton.cdiv(width, bn)
    ta, ts = tile_stats[0, :r, :tiles], tile_stats[1, :r, :tiles]
    first = col0 == 0
    logits_p(h, w_slab, p, ta, ts, y, m, t, col0, ignore_index, headroom, first)
    _slab_fix_kernel[(r, )](
        p, p.stride(0), ta, ts, ta.stride(0), p if acc is None else acc, 0 if acc is None else acc.stride(0),
        y, m, s, t, width, tiles, 0 if acc is None else acc.shape[1], col0, ignore_index,
        FIRST=first, WRITE_P=acc is not None, RESCALE_ACC=acc is not None and not first, BN=bn,
        TILES_P=triton.next_power_of_2(tiles), BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps)


class _HostCodes:
    """An Int8RowsTensor's codes streamed from pinned host memory while the loss runs: on a side stream, slab j + 1
    of the vocabulary goes into one of two device buffers while slab j's GEMMs run (0.58 GB per block of rows for
    gpt-oss: ~11 ms at 55 GB/s against ~19 ms of GEMMs for a 4096-row block), and each block's target rows are
    gathered on the host and copied with its first slab. The target rows need the labels on the host: one copy at
    the start (the label check has just synchronised), so this path cannot run under CUDA graph capture.
    Extra device memory: the two slab buffers (W x H int8 each) and the block's target rows (S x H int8)."""

    def __init__(self, weight, labels, S, W):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("an int8 lm_head with its codes in host memory cannot run under CUDA graph capture")
        self.data, self.W, self.V = weight.data, W, weight.shape[0]
        dev = weight.scale.device
        self.labels = labels.cpu()
        self.side = torch.cuda.Stream(dev)
        self.bufs = [torch.empty(W, self.data.shape[1], dtype=torch.int8, device=dev) for _ in range(2)]
        self.rows = torch.empty(min(S, labels.numel()), self.data.shape[1], dtype=torch.int8, device=dev)
        self.events, self.block = [None, None], None
        self.n_slabs = -(-self.V // W)

    def _copy(self, dst, src):
        """dst <- src on the side stream, after what the compute stream has queued (the last reader of dst)."""
        self.side.wait_stream(torch.cuda.current_stream(dst.device))
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            return self.side.record_event()

    def _issue(self, j):
        c0 = j * self.W
        w = min(self.W, self.V - c0)
        self.events[j % 2] = self._copy(self.bufs[j % 2][:w], self.data[c0:c0 + w])

    def slab(self, start, j):
        """Codes of slab j, on the device (a new block of rows starting at ``start`` restarts the stream)."""
        if self.block != start:
            self.block = start
            self._issue(0)
        torch.cuda.current_stream().wait_event(self.events[j % 2])
        return self.bufs[j % 2][: min(self.W, self.V - j * self.W)]

    def decoded(self, j):
        """Slab j's codes are decoded (queued): the copy of slab j + 1 into the other buffer overlaps its GEMMs."""
        if j + 1 < self.n_slabs:
            self._issue(j + 1)

    def label_rows(self, start):
        """The block's target rows. Gathered on the host once the block's slabs are queued, so the GPU runs their
        GEMMs meanwhile (gathered first, the GPU would wait: the label check has just synchronised)."""
        y = self.labels[start:start + self.rows.shape[0]]
        y = torch.where((y >= 0) & (y < self.V), y, 0)
        staged = torch.empty(y.numel(), self.data.shape[1], dtype=torch.int8, pin_memory=True)
        torch.index_select(self.data, 0, y, out=staged)
        torch.cuda.current_stream().wait_event(self._copy(self.rows[: y.numel()], staged))
        return self.rows[: y.numel()]


def _label_rows(weight, idx, scratch, codes=None):
    """W[idx]; an int8 weight's rows are decoded into the slab scratch (free at the end of a block) when they fit.
    ``codes``: those rows' int8 codes already on the device (streamed from host memory)."""
    if scratch is None:
        return weight.index_select(0, idx)
    out = scratch[: idx.numel()] if idx.numel() <= scratch.shape[0] else None
    return weight.rows(idx, dtype=scratch.dtype, out=out, codes=codes)


def _logits_p_reference(h, w_slab, p, ta, ts, labels, m, t, col0, ignore_index, headroom, first, bn=None):
    """What the logits GEMM with the softmax epilogue (cross_entropy_hopper.logits_p) writes for one slab, in torch:
    P = exp(z - tile anchor) in P's dtype with the target column zeroed, each (row, tile)'s anchor and sum of P, and
    the fp32 target logit where it lies in this slab. Tiles are bn columns wide. The tests hold the kernel to it; on
    other devices it lets the fused algorithm (and _slab_fix_kernel) run end to end."""
    bn = bn or _hopper.BN
    rows, width = p.shape
    z = torch.empty(rows, width, dtype=torch.float32, device=h.device)
    _logits_fp32(h, w_slab, z)
    tiles = -(-width // bn)
    zt = F.pad(z, (0, tiles * bn - width), value=float("-inf")).view(rows, tiles, bn)
    tmax = zt.amax(2)
    anchor = tmax if first else torch.where(tmax > m[:, None] + headroom, tmax, m[:, None])
    tcol = torch.where(labels == ignore_index, -1, labels - col0)
    here = (tcol >= 0) & (tcol < width)
    e = torch.exp(zt - anchor[:, :, None]).view(rows, -1)
    e[here, tcol[here]] = 0.0
    e = e.view(rows, tiles, bn)
    ta.copy_(anchor)
    ts.copy_(e.sum(2))
    p.copy_(e.view(rows, -1)[:, :width])
    t[here] = z[here, tcol[here]]


def _mm_fp32(a, b, out, accumulate=False):
    """out (+)= a @ b in fp32 from bf16/fp16/fp32 operands."""
    if a.dtype == torch.float32 or not a.is_cuda:
        a, b = a.float(), b.float()
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, need_dh, need_dw, method, tune):
        if method == "slabs":
            loss_sum, n_valid, grad_h = _forward_slabs(hidden, weight, labels, ignore_index, need_dh, **tune)
            grad_w = None
        else:
            loss_sum, n_valid, grad_h, grad_w = _forward(hidden, weight, labels, ignore_index, need_dh, need_dw,
                                                         **tune)
        inv_n = 1.0 / n_valid.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        # Kept as attributes, not saved tensors: backward drops them, so autograd can hand dH to .grad without a copy.
        ctx.grads, ctx.inv_n, ctx.weight_dtype = (grad_h, grad_w), inv_n, weight.dtype
        return loss_sum * inv_n

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:  # the gradients were scaled in place and handed over by the first backward
            raise RuntimeError("fused_linear_cross_entropy supports one backward per forward (no retain_graph reuse)")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        scale = grad_out.float() * ctx.inv_n
        dh = grad_h.mul_(scale) if grad_h is not None else None
        dw = grad_w.mul_(scale).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", *, method="auto",
                               chunk_rows=None, block_rows=None, slab_cols=None):
    """Cross-entropy of hidden [T, H] @ weight [V, H]^T against labels [T] -> fp32 scalar, never storing [T, V].

    "mean" averages over non-ignored labels (0 when all are ignored), "sum" sums them. Differentiable w.r.t. hidden,
    and w.r.t. weight only when it requires grad (a frozen lm_head costs no dW GEMM and no [V, H] buffer).
    weight: a tensor, or an Int8RowsTensor (frozen; the slabs path decodes it per slab to the hidden dtype, which
    must be bf16, fp16 or fp32). method: "slabs" (blocks of rows, online softmax over vocabulary slabs; frozen weight
    only), "rows" (row chunks over the whole vocabulary; also computes dW; dense weight only), "auto" (slabs unless
    the weight needs a grad). chunk_rows (rows path), block_rows and slab_cols (slabs path) override the defaults.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if method not in ("auto", "slabs", "rows"):
        raise ValueError(f"method must be 'auto', 'slabs' or 'rows', not {method!r}")
    int8 = isinstance(weight, Int8RowsTensor)
    if not int8 and not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a tensor or an Int8RowsTensor, not {type(weight).__name__}")
    if hidden.dim() != 2 or len(weight.shape) != 2 or labels.dim() != 1:
        raise ValueError(f"expected hidden [T, H], weight [V, H], labels [T]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)}")
    if int8:
        if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"an int8 weight decodes to the hidden dtype: bf16, fp16 or fp32, not {hidden.dtype}")
        if weight.device != hidden.device:
            raise ValueError(f"int8 weight on {weight.device}, hidden on {hidden.device}")
        if method == "rows":
            raise ValueError("an int8 weight runs on method='slabs' (or 'auto'): the rows path reads a dense weight")
    if not triton_runs(hidden):
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction)
    if not int8 and hidden.dtype != weight.dtype:  # cast the small operand; autograd casts its grad back
        hidden = hidden.to(weight.dtype)
    grad_on = torch.is_grad_enabled()
    # an int8 weight is frozen by definition (no dW) and goes in as it is; the slabs path decodes it
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and not int8 and weight.requires_grad
    if method == "slabs" and need_dw:
        raise ValueError("method='slabs' has no weight gradient; use 'rows' or 'auto' when the weight requires grad")
    if method == "auto":
        method = "rows" if need_dw else "slabs"
    tune = dict(block_rows=block_rows, slab_cols=slab_cols) if method == "slabs" else dict(chunk_rows=chunk_rows)
    return FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight if int8 else weight.contiguous(), labels.contiguous().long(), ignore_index,
        reduction, need_dh, need_dw, method, tune,
    )
