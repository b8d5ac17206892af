"""Hopper (sm_90) logits GEMM of the fused cross-entropy's slabs path, with the softmax step in its epilogue (Gluon).

For one block of rows and one vocabulary slab, z = h @ W_slab^T stays in fp32 registers and the epilogue writes what
``cross_entropy._logits_p_reference`` (pure torch, the contract the tests hold this kernel to) defines:

    P[r, c]      = exp(z - a[r, tile]) in the hidden dtype, 0 at the target column
    a[r, tile]   = the tile's anchor: the row's anchor m_in (from earlier slabs), or the tile's max when that passes
                   m_in by more than the headroom (or always in the row's first slab)
    s[r, tile]   = the tile's sum of P in fp32;   t[r] = the exact fp32 target logit when it lies in this slab

``cross_entropy._slab_fix_kernel`` then puts every row on one anchor. So the fp32 logits are never written nor read
back: the separate streaming pass of the unfused path (0.135 ms of a 0.70 ms slab at 2048 x 32768 x 2880) goes.

Why ping-pong: an epilogue after each tile's MMA, with nothing overlapping it, costs more than that streaming pass
(measured 0.74-0.76 ms per slab with one 256 x 128 tile per program). Here a persistent grid hands tiles alternately
to two consumer warp groups, 128 x 128 each, that share one TMA ring filled by a loader warp. One group's epilogue
(the softmax step, then P through shared memory and a TMA store) runs while the other's wgmma keeps the tensor cores
busy: a tile's MMA takes ~18 us, its epilogue less. Scratch A/B on an H200 at 2048 x 32768 x 2880 (bf16): 0.666 ms
per slab against 0.70 for cuBLAS + the streaming pass; cuBLAS' GEMM alone takes 0.55 (the whole op: results.jsonl,
bench cross_entropy from 79bdcd6 on). What is left is operand traffic: two 128 x 128 tiles load 4/3 of the bytes one
256 x 128 tile loads for the same work (about 9 TB/s out of L2).

The groups take turns at the tensor cores (an mbarrier pair): a tile's first MMA waits for the other group's last
one. That also keeps the ring's parity waits sound: a group never waits on a slot more than one fill ahead of the
loader. Unordered, the second group's first wait would pass on a fresh barrier's parity before any data arrived.

Shared memory: STAGES * (BM + BN) * BK * 2 + 2 * BM * BN * 2 = 4 * 32 KB + 2 * 32 KB = 192 KB of the 227 KB an
sm_90 block may have (scratch: 5 stages 0.71 ms per slab, 3 stages 0.77-0.83 ms).
"""

from __future__ import annotations

import torch

from fastft.kernels._env import interpreting, sm_count, tma_aligned
from fastft.kernels.moe_hopper import HAS_GLUON, _is_sm90

if HAS_GLUON:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from fastft.kernels.moe_hopper import _mma_layout

BM, BN, BK, STAGES, GROUP_M = 128, 128, 64, 4, 16  # (scratch: GROUP_M 8, 0.68 ms per slab)
MMA_REGS, LOAD_REGS = 232, 40


def can_run(h: torch.Tensor, w: torch.Tensor) -> bool:
    """sm_90, 2-byte hidden and weight of one dtype, rows TMA-addressable (16-byte aligned base and row stride)."""
    ok = (HAS_GLUON and h.is_cuda and not interpreting() and _is_sm90(h.device) and h.dtype == w.dtype
          and h.dtype in (torch.bfloat16, torch.float16))
    return ok and tma_aligned(h) and tma_aligned(w)


if HAS_GLUON:

    @gluon.jit
    def _tile(tile, num_m, num_n, GROUP_M: gl.constexpr):
        group = GROUP_M * num_n  # GROUP_M row tiles walk the slab's columns together: the hidden rows stay in L2
        first_m = (tile // group) * GROUP_M
        gsize = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % group) % gsize, (tile % group) // gsize

    @gluon.jit
    def _loader(h_desc, w_desc, a_bufs, b_bufs, ready, empty, rows, width, K,
                BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        num_m = gl.cdiv(rows, BM)
        num_n = gl.cdiv(width, BN)
        seq = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
            for k in range(gl.cdiv(K, BK)):  # a last partial K step is zero-filled by TMA
                s = seq % STAGES
                mbarrier.wait(empty.index(s), ((seq // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), (BM + BN) * BK * 2)
                tma.async_copy_global_to_shared(h_desc, [pid_m * BM, k * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BN, k * BK], ready.index(s), b_bufs.index(s))
                seq += 1

    @gluon.jit
    def _consumer(ROLE: gl.constexpr, a_bufs, b_bufs, ready, empty, turn, p_desc, p_buf, ta_ptr, ts_ptr, s_tm,
                  labels_ptr, m_ptr, t_ptr, rows, width, K, col0, ignore_index, headroom,
                  FIRST: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr):
        MMA_L: gl.constexpr = _mma_layout(BM, BN, 4)
        num_m = gl.cdiv(rows, BM)
        num_n = gl.cdiv(width, BN)
        ksteps = gl.cdiv(K, BK)
        nprog = gl.num_programs(0)
        i = 0
        for tile in range(gl.program_id(0) + ROLE * nprog, num_m * num_n, 2 * nprog):  # this program's 2i + ROLE-th
            pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
            m0 = pid_m * BM
            n0 = pid_n * BN
            seq0 = (2 * i + ROLE) * ksteps
            mbarrier.wait(turn.index(ROLE), (i & 1) ^ (1 - ROLE))  # group 0 goes first
            acc = gl.zeros([BM, BN], gl.float32, layout=MMA_L)
            for k in range(ksteps):
                seq = seq0 + k
                s = seq % STAGES
                mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                # one group in flight: once it is down to one, step k-1's group has retired and its slot is free
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((seq + STAGES - 1) % STAGES), count=1, pred=k > 0)
            mbarrier.arrive(turn.index(1 - ROLE), count=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((seq0 + ksteps - 1) % STAGES), count=1)

            # the epilogue, in the accumulator's own layout (rows live in one warp: no shared-memory reductions)
            rm = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, MMA_L))
            rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, MMA_L))
            rmask = rm < rows
            label = gl.load(labels_ptr + rm, mask=rmask, other=ignore_index)
            tcol = gl.where(label == ignore_index, -1, label - col0)
            is_t = gl.expand_dims(rn, 0) == gl.expand_dims(tcol, 1)
            here = (tcol >= n0) & (tcol < n0 + BN) & (tcol < width)
            gl.store(t_ptr + rm, gl.sum(gl.where(is_t, acc, 0.0), axis=1), mask=rmask & here)
            z = gl.where(gl.expand_dims(rn < width, 0), acc, float("-inf"))
            tmax = gl.max(z, axis=1)
            if FIRST:
                anchor = tmax
            else:
                m_in = gl.load(m_ptr + rm, mask=rmask, other=0.0)
                anchor = gl.where(tmax > m_in + headroom, tmax, m_in)
            e = gl.where(is_t, 0.0, gl.exp(z - gl.expand_dims(anchor, 1)))
            gl.store(ta_ptr + rm * s_tm + pid_n, anchor, mask=rmask)
            gl.store(ts_ptr + rm * s_tm + pid_n, gl.sum(e, axis=1), mask=rmask)
            tma.store_wait(pendings=0)  # this group's previous P has left p_buf
            p_buf.store(e.to(p_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(p_desc, [m0, n0], p_buf)  # rows and columns past the slab are clipped
            i += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _logits_p_kernel(h_desc, w_desc, p_desc, ta_ptr, ts_ptr, s_tm, labels_ptr, m_ptr, t_ptr,
                         rows, width, K, col0, ignore_index, headroom,
                         FIRST: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                         STAGES: gl.constexpr, GROUP_M: gl.constexpr, MMA_REGS: gl.constexpr,
                         LOAD_REGS: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(h_desc.dtype, [STAGES, BM, BK], h_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        p_bufs = gl.allocate_shared_memory(p_desc.dtype, [2, BM, BN], p_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(ready.index(j), count=1)  # TMA's expect-tx arrival
            mbarrier.init(empty.index(j), count=1)
        for j in gl.static_range(2):
            mbarrier.init(turn.index(j), count=1)
        # (argument tuples written out in full: built by concatenation, triton 3.6 did not compile the partitions)
        gl.warp_specialize([
            (_consumer, (0, a_bufs, b_bufs, ready, empty, turn, p_desc, p_bufs.index(0), ta_ptr, ts_ptr, s_tm,
                         labels_ptr, m_ptr, t_ptr, rows, width, K, col0, ignore_index, headroom, FIRST, BM, BN, BK,
                         STAGES, GROUP_M)),
            (_consumer, (1, a_bufs, b_bufs, ready, empty, turn, p_desc, p_bufs.index(1), ta_ptr, ts_ptr, s_tm,
                         labels_ptr, m_ptr, t_ptr, rows, width, K, col0, ignore_index, headroom, FIRST, BM, BN, BK,
                         STAGES, GROUP_M)),
            (_loader, (h_desc, w_desc, a_bufs, b_bufs, ready, empty, rows, width, K, BM, BN, BK, STAGES, GROUP_M)),
        ], [4, 1], [MMA_REGS, LOAD_REGS])



def logits_p(h, w_slab, p, ta, ts, labels, m, t, col0, ignore_index, headroom, first):
    """Launch for one slab (check can_run first): h [rows, K], w_slab [width, K], p [rows, width] (row stride a
    multiple of 8); ta / ts [rows, cdiv(width, BN)] fp32 sharing one row stride; labels, m, t [rows]. m is read
    unless first; t is written only where the target lies in this slab."""
    rows, K = h.shape
    width = w_slab.shape[0]
    dt = gl.bfloat16 if h.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for
    h_desc = TensorDescriptor.from_tensor(h, [BM, BK], layout([BM, BK], dt))
    w_desc = TensorDescriptor.from_tensor(w_slab, [BN, BK], layout([BN, BK], dt))
    p_desc = TensorDescriptor.from_tensor(p, [BM, BN], layout([BM, BN], dt))
    tiles = triton.cdiv(rows, BM) * triton.cdiv(width, BN)
    _logits_p_kernel[(min(sm_count(h.device), tiles), )](
        h_desc, w_desc, p_desc, ta, ts, ta.stride(0), labels, m, t, rows, width, K, col0, ignore_index,
        float(headroom), FIRST=first, BM=BM, BN=BN, BK=BK, STAGES=STAGES, GROUP_M=GROUP_M, MMA_REGS=MMA_REGS,
        LOAD_REGS=LOAD_REGS, num_warps=4)
