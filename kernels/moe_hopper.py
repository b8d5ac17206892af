"""Hopper (sm_90) path of the MoE expert GEMMs on MXFP4 weights: a warp-specialised grouped GEMM in Gluon.

Behind lora_linear_hopper's register-operand kernel since d68d455 (the MoE's GEMMs 11.2 ms there vs 15.9 here per
T=16384 block, H200): this kernel serves FASTFT_MOE_REGISTER=0 (A/B runs) and the calls that kernel refuses
(lora_linear's rows or raw bytes that TMA cannot address).

Same contract as ``fastft.kernels.moe._grouped_gemm_kernel`` for its two MXFP4 orientations (QUANT 1: forward,
W stored [N, K], 32-value scale groups along K; QUANT 2: backward dX, W stored [K, N], groups along N) and both
epilogues (EPI 0: bias, LoRA term, scatter; EPI 1: h = acc + bias saved, clamped SwiGLU). The pure
torch reference of the math is ``moe.experts_reference``; the Triton kernel is the portable path and the reference
these kernels are tested against on the GPU (tests/test_moe.py).

Why a second kernel: in the Triton kernel the MMA warps also decode the e2m1 bytes, so the tensor cores idle during
the decode: on the H200 its forward gate_up GEMM ran at ~350 TFLOP/s against ~515 with bf16 weights. Here three
warp groups overlap the three jobs of a K step (one output tile of one expert per program):

  loader  (LOAD_WARPS): cp.async of the gathered activation rows [BM, BK] into the A ring (NVMMA-swizzled: wgmma
          reads it in place) and of the raw MXFP4 bytes into the raw ring, signalled by cp.async.mbarrier.arrive
          (one arrival per loader thread). The e8m0 scales (2-4 bytes per row and step, rows 90 bytes apart: too
          small for cp.async) are plain loads stored next to the raw bytes (+1 arrival).
  decoder (DEC_WARPS): raw bytes -> bf16 (gl.fp4_to_fp, a byte-permute lookup) times the scale (bf16 bits s << 7 =
          2**(s - 127), exact for 1 <= s <= 254), stored into the B ring in wgmma's layout; frees the raw slot.
  MMA     (default partition, num_warps): waits for A and B of a step, issues an async wgmma with one group in
          flight and, once step i-1's group retired, frees that slot for loader and decoder; then the epilogue.

Measured on the H200 (prototype, gate_up forward without epilogue extras, T=16384 tokens top-4 of 32): 4.53 ms
against 6.13 ms for the Triton kernel with tl.dot_scaled and 4.25 ms for the Triton kernel on bf16 weights.

Barrier phases: a ring of depth D used at step i sits in slot i % D; consumers wait parity (i // D) & 1 on "ready",
producers ((i // D) & 1) ^ 1 on "empty" (a fresh mbarrier counts as having completed the phase before phase 0).
Every partition walks the same K // BK steps of one tile, so all counters start at 0.

The LoRA term (acc += s * L[rows, :R] @ LB_e[cols, :R]^T, R = 16) is R rank-1 fp32 updates of the accumulator in
the epilogue: exact fp32 (the Triton kernel needs tf32x3 to keep the clamp masks of h stable, see moe.py) and no
second [BM, BN] tile in registers. The loader stages both factors' tiles in shared memory once its K loop is done,
so the epilogue does not wait on global loads: read from global memory there, 16 dependent load rounds per tile
made the T=16384 block's four GEMMs 6.3 ms slower with LoRA than without (H200).

Shared memory per program (bf16 A ring of NUM_STAGES, B ring of B_STAGES, raw ring of RAW_STAGES): BM=256:
4 * 32 KB + 4 * 16 KB + 6 * 4 KB ~ 218 KB of the 227 KB an sm_90 block may have, so one program per SM; with LoRA,
3 stages + the 20 KB of factor tiles ~ 190 KB.
"""

from __future__ import annotations

import functools
import os

import torch

from fastft.kernels._env import interpreting, tma_aligned

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except ImportError:  # triton without Gluon (or no triton): the Triton kernel serves every GEMM
    HAS_GLUON = False

BK = 64
GROUP_M = 8  # programs sharing GROUP_M row tiles walk all column blocks (A stays in L2), as in moe.py
# Per row tile BM (the routing tables are built for one) and LoRA or not: BN=128 tiles; 4 loader and 4 decoder
# warps at 56-64 registers leave the MMA warps 256 (BM=128, one warp group) or 200 (BM=256, two) registers,
# spill-free. At BM=256 the LoRA tiles (20 KB) fit beside 3 stages only, and the loader, which also stages them,
# needs 72 registers not to spill in its K loop (sm_90 builds, tests/test_moe_hopper.py).
META = {
    (128, False): dict(BN=128, NUM_STAGES=4, B_STAGES=4, RAW_STAGES=6, LOAD_WARPS=4, DEC_WARPS=4, LOAD_REGS=56,
                       DEC_REGS=64, num_warps=4),
    (256, False): dict(BN=128, NUM_STAGES=4, B_STAGES=4, RAW_STAGES=6, LOAD_WARPS=4, DEC_WARPS=4, LOAD_REGS=56,
                       DEC_REGS=56, num_warps=8),
}
META[128, True] = META[128, False]
META[256, True] = dict(META[256, False], NUM_STAGES=3, B_STAGES=3, LOAD_REGS=72, DEC_REGS=48)
# lora_linear's projections (one expert, LoRA as a wgmma: 12 KB of factor tiles): two more weight stages, so the
# decoder runs further ahead (H200, T=16384, forward + LoRA: q 742 vs 787 us, o 797 vs 829; dX unchanged).
# NF4: its decode is a code-table gather per value, so 8 decoder warps (o_proj: forward 1068 vs 1160 us with 4
# warps, dX 1107 vs 1198); 48 loader and 40 decoder registers leave the MMA warps enough not to spill (sm_90
# builds; the loader only issues copies now that the activations come through TMA).
LINEAR_META = dict(META)
LINEAR_META[256, True] = dict(META[256, True], B_STAGES=5)
NF4_META = {key: dict(m, DEC_WARPS=8, DEC_REGS=40, LOAD_REGS=48) for key, m in LINEAR_META.items()}
# NF4's fp32 scale ring is 4.5 KB larger: 5 weight stages leave no room for rank 32; at 4, 56 loader / 32 decoder
# registers are what keeps the MMA warps' main loop spill-free (sm_90 builds)
NF4_META[256, True].update(B_STAGES=4, LOAD_REGS=56, DEC_REGS=32)


def enabled() -> bool:
    """FASTFT_MOE_WS=0 keeps every GEMM on the Triton kernel (A/B runs); read per call (tests switch it)."""
    return HAS_GLUON and os.environ.get("FASTFT_MOE_WS", "1") != "0"


@functools.lru_cache(maxsize=None)
def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


# LoRA rank bound: the epilogue's factor tiles take R_PAD * (4 * BM + 2 * BN) bytes of shared memory, 40 KB at
# R_PAD = 32 and BM = 256 beside the 3-stage rings (~215 KB of 227); rank 64 would not fit.
MAX_RANK = 32


def can_run(a: torch.Tensor, out: torch.Tensor, K: int, bm: int, rank: int = 0) -> bool:
    """Whether this kernel serves a GEMM: sm_90 (not under Triton's interpreter, which has no Gluon), bf16
    activations and output, K in whole BK steps, a known row tile, a LoRA rank whose tiles fit. (4-bit weights
    are the caller's check.)"""
    return (enabled() and a.is_cuda and not interpreting() and _is_sm90(a.device)
            and a.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and a.stride(1) == 1
            and out.stride(1) == 1 and K % BK == 0 and (bm, False) in META and rank <= MAX_RANK)


if HAS_GLUON:

    @gluon.constexpr_function
    def _mma_layout(BM, BN, num_warps):
        # wgmma atom: 4 warps x 16 rows; warps split along M first (each warp group owns BM / groups rows)
        wm, wn = 4, 1
        while wm * wn < num_warps:
            if BM > 16 * wm:
                wm *= 2
            else:
                wn *= 2
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[wm, wn], instr_shape=[16, BN // wn, 16])

    @gluon.constexpr_function
    def _rows_layout(width, elem_bytes, num_warps):
        # [rows, width] tile, 16-byte vectors along a row, lanes across the row first, then across rows
        vec = 16 // elem_bytes
        tk = max(1, min(32, width // vec))
        return gl.BlockedLayout([1, vec], [32 // tk, tk], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _raw_layout(G, num_warps):
        # raw bytes viewed [rows, G, 16]: one thread holds one 32-value scale group (16 bytes) of one row
        return gl.BlockedLayout([1, 1, 16], [32 // G, G, 1], [num_warps, 1, 1], [2, 1, 0])

    @gluon.jit
    def _loader(A, a_desc, a_idx, s_am, W, WS, s_we, s_wr, s_se, s_sr, L, s_lm, LBt, lora_scale, R, e, row0,
                row_end, n0, K, N, a_bufs, raw_bufs, sc_bufs, l_smem, lb_smem, a_ready, a_empty, raw_ready,
                raw_empty, lora_ready, TRANS: gl.constexpr, GS: gl.constexpr, GATHER_A: gl.constexpr,
                TMA_A: gl.constexpr, LEAD: gl.constexpr, R_PAD: gl.constexpr, LORA_MMA: gl.constexpr,
                BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                RAW_STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr):
        RR: gl.constexpr = BK if TRANS else BN  # raw tile [RR, RC/2] bytes: rows as stored, RC values per row
        RC: gl.constexpr = BN if TRANS else BK
        G: gl.constexpr = RC // 32  # 32-value chunks per stored row and step, one scale each (NF4's 64-value
        # groups are read once per chunk: the decoder then handles both formats' scales alike)
        # Activation rows (cp.async; TMA_A: a descriptor's boxes, rows past the tensor zero-filled). Rows past the
        # expert's end read a valid row and are never stored, so the copies need no mask (K % BK == 0 is the
        # launcher's check).
        A_L: gl.constexpr = _rows_layout(BK, 2, LOAD_WARPS)
        rm = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, A_L))
        if GATHER_A:
            arow = gl.load(a_idx + rm, mask=rm < row_end, other=0)
        else:
            arow = gl.where(rm < row_end, rm, row0)
        a_ptr = A + arow.to(gl.int64)[:, None] * s_am + gl.arange(0, BK, layout=gl.SliceLayout(0, A_L))[None, :]
        R_L: gl.constexpr = _rows_layout(RC // 2, 1, LOAD_WARPS)
        rr = gl.arange(0, RR, layout=gl.SliceLayout(1, R_L))
        rc = gl.arange(0, RC // 2, layout=gl.SliceLayout(0, R_L))
        S_L: gl.constexpr = gl.BlockedLayout([1, G], [32, 1], [LOAD_WARPS, 1], [1, 0])
        sr = gl.arange(0, RR, layout=gl.SliceLayout(1, S_L))
        sg = gl.arange(0, G, layout=gl.SliceLayout(0, S_L))
        w_base = W + e.to(gl.int64) * s_we
        s_base = WS + e.to(gl.int64) * s_se
        if TRANS:
            # rows: K (the forward's output features), BK more per step; columns: this tile's N/2 bytes, the ones
            # past N zero-filled (16-byte runs: N/2 is a multiple of 16, so a run is all in or all out)
            nh = gl.multiple_of((n0 // BN) * (BN // 2), BN // 2)
            w_ptr = w_base + rr.to(gl.int64)[:, None] * s_wr + (nh + rc)[None, :]
            w_mask = (rr[:, None] >= 0) & ((nh + rc) < s_wr)[None, :]
            w_step = BK * s_wr
            s_ptr = s_base + sr.to(gl.int64)[:, None] * s_sr + gl.minimum((n0 + 32 * sg) // GS, s_sr - 1)[None, :]
            s_step = BK * s_sr
        else:
            # rows: this tile's N output features (past N: clamped to N - 1, never stored); columns: K, BK per step
            rn = gl.minimum(n0 + rr, N - 1)
            w_ptr = w_base + rn.to(gl.int64)[:, None] * s_wr + rc[None, :]
            w_mask = None
            w_step = BK // 2
            rs = gl.minimum(n0 + sr, N - 1)
            s_ptr = s_base + rs.to(gl.int64)[:, None] * s_sr + ((32 * sg) // GS)[None, :]
            s_step = BK // GS
        num_k = K // BK
        sc = gl.load(s_ptr)
        # The raw bytes of step t go out LEAD steps before its activations: they still pass the decoder, and with
        # both copies of a step issued together the raw ones waited on a free activation slot (NUM_STAGES deep),
        # so the decoder met their full latency (H200, lora_linear dX at T=16384: 944 us with the raw copies
        # and no decode vs 583 without either). LEAD <= RAW_STAGES - 2 keeps the rings deadlock-free: the raw
        # slot of step t frees once the decoder is past step t - RAW_STAGES, which needs only the MMA of earlier
        # steps, whose activations were issued before. (LEAD = 0: both copies of a step together, the MoE's order:
        # its block measured 10 % slower with lead + TMA + bf16x2 together, H200 T=16384, not yet bisected.)
        for t in range(num_k + LEAD):
            if t < num_k:
                r = t % RAW_STAGES
                sc_next = gl.load(s_ptr + (t + 1) * s_step, mask=t + 1 < num_k, other=0)
                mbarrier.wait(raw_empty.index(r), ((t // RAW_STAGES) & 1) ^ 1)
                async_copy.async_copy_global_to_shared(raw_bufs.index(r), w_ptr + t * w_step, mask=w_mask)
                sc_bufs.index(r).store(sc)
                async_copy.mbarrier_arrive(raw_ready.index(r), increment_count=False)  # LOAD_WARPS * 32 arrivals
                mbarrier.arrive(raw_ready.index(r), count=1)  # + 1 for the scales (after a partition barrier)
                sc = sc_next
            i = t - LEAD
            if i >= 0:
                s = i % NUM_STAGES
                mbarrier.wait(a_empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
                if TMA_A:
                    mbarrier.expect(a_ready.index(s), BM * BK * 2)
                    tma.async_copy_global_to_shared(a_desc, [row0, i * BK], a_ready.index(s), a_bufs.index(s))
                else:
                    async_copy.async_copy_global_to_shared(a_bufs.index(s), a_ptr + i * BK)
                    async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
        if LORA_MMA:
            # LoRA as one more wgmma (K = R_PAD): [BM, R_PAD] of s * L and [R_PAD, BN] of LBt, bf16 in wgmma's
            # layouts; rows past the end read a valid row, ranks past R are zero, columns are clamped
            LL: gl.constexpr = _rows_layout(R_PAD, 2, LOAD_WARPS)
            rl = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, LL))
            jl = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, LL))
            lv = gl.load(L + gl.where(rl < row_end, rl, row0).to(gl.int64)[:, None] * s_lm + jl[None, :],
                         mask=(rl >= 0)[:, None] & (jl < R)[None, :], other=0.0)
            l_smem.store((lv.to(gl.float32) * lora_scale).to(gl.bfloat16))
            LBL: gl.constexpr = _rows_layout(BN, 2, LOAD_WARPS)
            jb = gl.arange(0, R_PAD, layout=gl.SliceLayout(1, LBL))
            cb = gl.minimum(n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, LBL)), N - 1)
            lbv = gl.load(LBt + e.to(gl.int64) * R * N + jb[:, None] * N + cb[None, :],
                          mask=(jb < R)[:, None] & (cb >= 0)[None, :], other=0.0)
            lb_smem.store(lbv.to(gl.bfloat16))
            mbarrier.arrive(lora_ready, count=1)
        elif R_PAD > 0:
            # LoRA tiles, transposed ([R, BM] scaled L, [R, BN] of LBt = [E, R, N]) so the epilogue reads one
            # rank's row and column vectors at a time; rows past the end read a valid row, columns are clamped
            V: gl.constexpr = gl.BlockedLayout([1], [32], [LOAD_WARPS], [0])
            rl = row0 + gl.arange(0, BM, layout=V)
            l_ptr = L + gl.where(rl < row_end, rl, row0).to(gl.int64) * s_lm
            lb_ptr = LBt + e.to(gl.int64) * R * N + gl.minimum(n0 + gl.arange(0, BN, layout=V), N - 1)
            for j in gl.static_range(R_PAD):
                l_smem.index(j).store(gl.load(l_ptr + j, mask=j < R, other=0.0).to(gl.float32) * lora_scale)
                lb_smem.index(j).store(gl.load(lb_ptr + j * N, mask=j < R, other=0.0))
            mbarrier.arrive(lora_ready, count=1)

    @gluon.jit
    def _decoder(raw_bufs, sc_bufs, b_bufs, b_empty, raw_ready, raw_empty, b_ready, K, LUT,
                 TRANS: gl.constexpr, NF4: gl.constexpr, MUL_X2: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 B_STAGES: gl.constexpr, RAW_STAGES: gl.constexpr, DEC_WARPS: gl.constexpr):
        RR: gl.constexpr = BK if TRANS else BN
        RC: gl.constexpr = BN if TRANS else BK
        G: gl.constexpr = RC // 32
        ROWS: gl.constexpr = (32 // G) * DEC_WARPS  # one 16-byte group per thread and chunk: few registers
        R3: gl.constexpr = _raw_layout(G, DEC_WARPS)
        for i in range(K // BK):
            r = i % RAW_STAGES
            s = i % B_STAGES
            mbarrier.wait(raw_ready.index(r), (i // RAW_STAGES) & 1)
            mbarrier.wait(b_empty.index(s), ((i // B_STAGES) & 1) ^ 1)
            for c in gl.static_range(RR // ROWS):
                raw = raw_bufs.index(r).reshape([RR, G, 16]).slice(c * ROWS, ROWS).load(R3)
                if NF4:
                    # bitsandbytes: element 2i in the HIGH nibble; value = bf16(code[nibble] * absmax) in fp32,
                    # as its dequantize_4bit rounds (the 64-byte code table stays in L1: one line per gather)
                    b = raw.to(gl.int32)
                    sc = gl.expand_dims(sc_bufs.index(r).slice(c * ROWS, ROWS).load(gl.SliceLayout(2, R3)), 2)
                    first = (gl.load(LUT + (b >> 4)) * sc).to(gl.bfloat16)
                    second = (gl.load(LUT + (b & 15)) * sc).to(gl.bfloat16)
                    b_bufs.index(s).slice(c * ROWS, ROWS).store(gl.reshape(gl.join(first, second), [ROWS, RC]))
                else:
                    v = gl.fp4_to_fp(raw, gl.bfloat16, 2)  # [ROWS, G, 32], low nibble first (hub packing)
                    sc = sc_bufs.index(r).slice(c * ROWS, ROWS).load(gl.SliceLayout(2, v.type.layout))
                    scale = (sc.to(gl.int16) << 7).to(gl.bfloat16, bitcast=True)  # e8m0 -> bf16 2**(s - 127)
                    if MUL_X2:
                        v, scale = gl.broadcast(v, gl.expand_dims(scale, 2))
                        # two values per instruction (a bf16 `*` compiles to scalar multiplies + register moves)
                        v = gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [v, scale],
                                                      dtype=gl.bfloat16, is_pure=True, pack=2)
                    else:
                        v = v * gl.expand_dims(scale, 2)
                    b_bufs.index(s).slice(c * ROWS, ROWS).store(gl.reshape(v, [ROWS, RC]))
            mbarrier.arrive(raw_empty.index(r), count=1)
            fence_async_shared()  # generic-proxy shared-memory writes -> async-proxy wgmma reads
            mbarrier.arrive(b_ready.index(s), count=1)

    @gluon.jit
    def _mma(bias, s_be, R, C, c_idx, s_cm, AUX, s_xm, e, row0, row_end, n0, K, N, limit, alpha,
             a_bufs, b_bufs, l_smem, lb_smem, a_ready, a_empty, b_ready, b_empty, lora_ready,
             TRANS: gl.constexpr, EPI: gl.constexpr, SCATTER_C: gl.constexpr, HAS_BIAS: gl.constexpr,
             ADD_C: gl.constexpr, R_PAD: gl.constexpr, LORA_MMA: gl.constexpr,
             BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
             NUM_STAGES: gl.constexpr, B_STAGES: gl.constexpr, num_warps: gl.constexpr):
        MMA_L: gl.constexpr = _mma_layout(BM, BN, num_warps)
        acc = gl.zeros([BM, BN], gl.float32, layout=MMA_L)
        for i in range(K // BK):
            s = i % NUM_STAGES
            sb = i % B_STAGES
            mbarrier.wait(a_ready.index(s), (i // NUM_STAGES) & 1)
            mbarrier.wait(b_ready.index(sb), (i // B_STAGES) & 1)
            fence_async_shared()  # A was written by cp.async (generic proxy); wgmma reads through the async proxy
            if TRANS:
                b = b_bufs.index(sb)  # [BK, BN], N contiguous
            else:
                b = b_bufs.index(sb).permute((1, 0))  # stored [BN, BK], K contiguous
            acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True)
            # one group in flight: after this wait step i-1's group has retired, so its slot is free
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(a_empty.index((i + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=i > 0)
            mbarrier.arrive(b_empty.index((i + B_STAGES - 1) % B_STAGES), count=1, pred=i > 0)
        if LORA_MMA:
            mbarrier.wait(lora_ready, 0)
            fence_async_shared()  # the loader's plain stores -> wgmma's async-proxy reads
            acc = warpgroup_mma(l_smem, lb_smem, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        # (the last slot is never released: nobody waits for it in a one-tile-per-program kernel)

        rm = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, MMA_L))
        mmask = rm < row_end
        rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, MMA_L))
        nmask = rn < N
        if R_PAD > 0 and not LORA_MMA:  # LoRA: R rank-1 fp32 updates (a rolled loop: unrolled, it spills)
            mbarrier.wait(lora_ready, 0)
            for j in range(R):
                lo = l_smem.index(j).load(gl.SliceLayout(1, MMA_L))
                lb = lb_smem.index(j).load(gl.SliceLayout(0, MMA_L)).to(gl.float32)
                acc += gl.expand_dims(lo, 1) * gl.expand_dims(lb, 0)
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(bias + e * s_be + rn, mask=nmask, other=0.0).to(gl.float32), 0)
        if EPI == 0:
            if SCATTER_C:
                crow = gl.load(c_idx + rm, mask=mmask, other=0).to(gl.int64)
            else:
                crow = rm.to(gl.int64)
            c_ptr = C + crow[:, None] * s_cm + rn[None, :]
            if ADD_C:  # C holds a term computed before (lora_linear's dropout LoRA dX): read, add, write back
                acc += gl.load(c_ptr, mask=mmask[:, None] & nmask[None, :], other=0.0).to(gl.float32)
            gl.store(c_ptr, acc.to(C.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
        else:
            # h (interleaved gate/up columns) saved in x's dtype; the activation reads h as saved, so backward's
            # clamp masks belong to the function the forward evaluated (as in moe.py)
            h = acc.to(AUX.dtype.element_ty)
            gl.store(AUX + rm.to(gl.int64)[:, None] * s_xm + rn[None, :], h, mask=mmask[:, None] & nmask[None, :])
            gate, up = gl.split(gl.reshape(h.to(gl.float32), [BM, BN // 2, 2]))
            gate = gl.minimum(gate, limit)
            up = gl.minimum(gl.maximum(up, -limit), limit)
            act = (up + 1.0) * (gate / (1.0 + gl.exp(-alpha * gate)))
            ACT_L: gl.constexpr = act.type.layout
            ra = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ACT_L))
            ca = n0 // 2 + gl.arange(0, BN // 2, layout=gl.SliceLayout(0, ACT_L))
            gl.store(C + ra.to(gl.int64)[:, None] * s_cm + ca[None, :], act.to(C.dtype.element_ty),
                     mask=(ra < row_end)[:, None] & (ca < N // 2)[None, :])

    @gluon.jit
    def _ws_gemm_kernel(A, a_desc, a_idx, s_am, W, WS, LUT, s_we, s_wr, s_se, s_sr, bias, s_be,
                        L, s_lm, LBt, lora_scale, R, C, c_idx, s_cm, AUX, s_xm,
                        tile_expert, tile_row, offsets, num_tiles, row_start, K, N, limit, alpha,
                        TRANS: gl.constexpr, NF4: gl.constexpr, GS: gl.constexpr, EPI: gl.constexpr,
                        GATHER_A: gl.constexpr, TMA_A: gl.constexpr, LEAD: gl.constexpr, MUL_X2: gl.constexpr,
                        SCATTER_C: gl.constexpr, HAS_BIAS: gl.constexpr,
                        ADD_C: gl.constexpr, R_PAD: gl.constexpr, LORA_MMA: gl.constexpr, TILES: gl.constexpr,
                        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr,
                        NUM_STAGES: gl.constexpr, B_STAGES: gl.constexpr, RAW_STAGES: gl.constexpr,
                        LOAD_WARPS: gl.constexpr, DEC_WARPS: gl.constexpr, LOAD_REGS: gl.constexpr,
                        DEC_REGS: gl.constexpr, num_warps: gl.constexpr):
        # TILES (see ws_gemm): 0 (ALL_TILES) every tile of the table, built for BM rows; 1 (LONG_TILES) those
        # with more than BM / 2 rows; 2 (SHORT_TAILS) one tile per expert (num_tiles = E): its last tile of a table
        # built for 2 * BM rows, when that tile has at most BM rows. 1 and 2 cover a table only as a pair (BM=256
        # then BM=128 over the same 256-row table), as ws_gemm launches them.
        pid = gl.program_id(0)
        num_n = gl.cdiv(N, BN)
        width = GROUP * num_n
        first_t = (pid // width) * GROUP
        gsize = gl.minimum(num_tiles - first_t, GROUP)
        pid_t = first_t + (pid % width) % gsize
        pid_n = (pid % width) // gsize
        if TILES == 2:
            e = pid_t
            start = gl.load(offsets + e)
            row_end = gl.load(offsets + e + 1)
            row0 = start + gl.maximum(row_end - start - 1, 0) // (2 * BM) * (2 * BM)
            go = (row_end > start) & (row_end - row0 <= BM)
        else:
            e = gl.load(tile_expert + pid_t)
            row0 = gl.load(tile_row + pid_t)
            row_end = gl.load(offsets + gl.maximum(e, 0) + 1)
            go = e >= 0
            if TILES == 1:
                go = go & (row_end - row0 > BM // 2)
        go = go & (gl.minimum(row0 + BM, row_end) > row_start)  # rows below row_start: already in place
        if go:
            n0 = pid_n * BN
            RR: gl.constexpr = BK if TRANS else BN
            RC: gl.constexpr = BN if TRANS else BK
            a_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BM, BK],
                                               gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
            b_bufs = gl.allocate_shared_memory(gl.bfloat16, [B_STAGES, RR, RC],
                                               gl.NVMMASharedLayout.get_default_for([RR, RC], gl.bfloat16))
            raw_bufs = gl.allocate_shared_memory(gl.uint8, [RAW_STAGES, RR, RC // 2],
                                                 gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
            sc_bufs = gl.allocate_shared_memory(WS.dtype.element_ty, [RAW_STAGES, RR, RC // 32],
                                                gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
            a_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
            a_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
            b_ready = gl.allocate_shared_memory(gl.int64, [B_STAGES, 1], mbarrier.MBarrierLayout())
            b_empty = gl.allocate_shared_memory(gl.int64, [B_STAGES, 1], mbarrier.MBarrierLayout())
            raw_ready = gl.allocate_shared_memory(gl.int64, [RAW_STAGES, 1], mbarrier.MBarrierLayout())
            raw_empty = gl.allocate_shared_memory(gl.int64, [RAW_STAGES, 1], mbarrier.MBarrierLayout())
            lora_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            # the LoRA tiles (a token allocation without LoRA)
            LR: gl.constexpr = R_PAD if R_PAD > 0 else 1
            vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
            if LORA_MMA:
                l_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, R_PAD],
                                                   gl.NVMMASharedLayout.get_default_for([BM, R_PAD], gl.bfloat16))
                lb_smem = gl.allocate_shared_memory(gl.bfloat16, [R_PAD, BN],
                                                    gl.NVMMASharedLayout.get_default_for([R_PAD, BN], gl.bfloat16))
            else:
                l_smem = gl.allocate_shared_memory(gl.float32, [LR, BM if R_PAD > 0 else 32], vec_layout)
                lb_smem = gl.allocate_shared_memory(LBt.dtype.element_ty, [LR, BN if R_PAD > 0 else 32], vec_layout)
            for j in gl.static_range(NUM_STAGES):
                # one cp.async arrival per loader thread, or TMA's expect-tx arrival
                mbarrier.init(a_ready.index(j), count=1 if TMA_A else LOAD_WARPS * 32)
                mbarrier.init(a_empty.index(j), count=1)
            for j in gl.static_range(B_STAGES):
                mbarrier.init(b_ready.index(j), count=1)
                mbarrier.init(b_empty.index(j), count=1)
            for j in gl.static_range(RAW_STAGES):
                mbarrier.init(raw_ready.index(j), count=LOAD_WARPS * 32 + 1)  # + the scale stores' arrival
                mbarrier.init(raw_empty.index(j), count=1)
            mbarrier.init(lora_ready, count=1)

            gl.warp_specialize([
                (_mma, (bias, s_be, R, C, c_idx, s_cm, AUX, s_xm, e, row0, row_end, n0, K, N, limit,
                        alpha, a_bufs, b_bufs, l_smem, lb_smem, a_ready, a_empty, b_ready, b_empty, lora_ready,
                        TRANS, EPI, SCATTER_C, HAS_BIAS, ADD_C, R_PAD, LORA_MMA, BM, BN, BK,
                        NUM_STAGES, B_STAGES, num_warps)),
                (_loader, (A, a_desc, a_idx, s_am, W, WS, s_we, s_wr, s_se, s_sr, L, s_lm, LBt, lora_scale, R, e,
                           row0, row_end, n0, K, N, a_bufs, raw_bufs, sc_bufs, l_smem, lb_smem, a_ready, a_empty,
                           raw_ready, raw_empty, lora_ready, TRANS, GS, GATHER_A, TMA_A, LEAD, R_PAD, LORA_MMA, BM,
                           BN, BK, NUM_STAGES, RAW_STAGES, LOAD_WARPS)),
                (_decoder, (raw_bufs, sc_bufs, b_bufs, b_empty, raw_ready, raw_empty, b_ready, K, LUT,
                            TRANS, NF4, MUL_X2, BN, BK, B_STAGES, RAW_STAGES, DEC_WARPS)),
            ], [LOAD_WARPS, DEC_WARPS], [LOAD_REGS, DEC_REGS])


ALL_TILES, LONG_TILES, SHORT_TAILS = 0, 1, 2  # the kernel's TILES


def split_tails() -> bool:
    """FASTFT_MOE_TAILS=0 runs BM=256 tables as one launch, short tails included (A/B runs); read per call."""
    return os.environ.get("FASTFT_MOE_TAILS", "1") != "0"


def ws_gemm(a, a_idx, blocks, scales, trans, K, N, tables, bm, out, *, c_idx=None, bias=None, lora=None,
            epi=0, aux=None, limit=7.0, alpha=1.702, row_start=0, nf4_code=None, add_c=False,
            linear=False, meta=None):
    """moe._gemm's launch for 4-bit weights on sm_90 (check can_run first). blocks / scales: the expert stack's
    uint8 bytes [E, out * in / 2] and scales, MXFP4's e8m0 [E, out * in / 32] or, with nf4_code (bitsandbytes'
    16-value fp32 code), NF4's fp32 absmax [E, out * in / 64] (lora_linear's projections, E = 1); trans: the
    backward orientation (QUANT 2). add_c: the epilogue adds the tile of ``out`` to the product (EPI 0).
    linear: lora_linear's kernel. Its tile tables (LINEAR_META / NF4_META); its loader and decoder (activations
    through TMA, raw bytes RAW_STAGES - 2 steps ahead, bf16x2 scale multiplies: per GEMM 2-8 % faster there, but
    the MoE block measured 10 % slower with all three); the LoRA term as one more wgmma over bf16 s * L and LB
    (rounded to bf16, as PEFT's bf16 LoRA is) instead of R exact fp32 rank-1 updates in the epilogue (the MoE's
    gate_up keeps those: its clamp masks). meta: tile tables in place of the default ones (A/B sweeps).

    With 256-row tables, an expert's last tile holds 1-256 rows: a BM=256 program for a few rows pays the MMA
    work of 256. So the tiles with more than 128 rows go to the BM=256 kernel and the short tails (at most 128
    rows, one per expert) to a second launch of the BM=128 kernel. At T=4096 tokens (top-4 of 32: ~512 rows per
    expert, so about half the experts end in a tail of a few rows) ~16 of ~80 row tiles are such tails, yet the
    MoE block gained only 1-2 % (H200, fwd+bwd, interleaved A/B: T=4096 5.47 vs 5.59 ms without LoRA, 6.52 vs
    6.55 with; T=16384 17.39 vs 17.66, 20.08 vs 20.31): a BM=128 tile costs more than half of a BM=256 one
    (each decoded weight tile feeds half the rows), and the second launch adds a partial wave."""
    _, _, offsets, tile_expert, tile_row = tables
    L, LBt, R, scaling = out, out, 0, 0.0
    if lora is not None:
        L, LB, s_lbe, s_lbn, s_lbr, scaling = lora
        R = L.shape[1]
        # the expert factor as [E, R, N], N contiguous (<= 6 MB at gpt-oss shape): the loader reads rank rows
        LBt = torch.as_strided(LB, (blocks.shape[0], R, N), (s_lbe, s_lbr, s_lbn)).contiguous()
    s_wr = (N if trans else K) // 2  # bytes per stored row (the forward's input features / 2)
    group = 64 if nf4_code is not None else 32  # values per scale
    # dense activation rows (not gathered) go through TMA: one thread issues a step's copy instead of 16 cp.async
    # per loader thread (the loader's instruction stream was part of the step time)
    tma_a = linear and a_idx is None and tma_aligned(a)
    args = (a_idx if a_idx is not None else offsets, a.stride(0),
            blocks, scales, nf4_code if nf4_code is not None else scales,
            blocks.stride(0), s_wr, scales.stride(0), 2 * s_wr // group,
            bias if bias is not None else out, bias.stride(0) if bias is not None else 0,
            L, L.stride(0), LBt, float(scaling), R,
            out, c_idx if c_idx is not None else offsets, out.stride(0),
            aux if aux is not None else out, aux.stride(0) if aux is not None else 0,
            tile_expert, tile_row, offsets)
    flags = dict(TRANS=trans, NF4=nf4_code is not None, GS=group, EPI=epi, GATHER_A=a_idx is not None, TMA_A=tma_a,
                 MUL_X2=linear,
                 SCATTER_C=c_idx is not None, HAS_BIAS=bias is not None, ADD_C=add_c,
                 R_PAD=(max(16, triton.next_power_of_2(R)) if linear else triton.next_power_of_2(R)) if R else 0,
                 LORA_MMA=linear and R > 0, BK=BK, GROUP=GROUP_M)
    tables_meta = meta or ((NF4_META if nf4_code is not None else LINEAR_META) if linear else META)

    def launch(tile_m, num_tiles, tiles):
        m = tables_meta[tile_m, lora is not None]
        a_desc = a
        if tma_a:
            a_desc = TensorDescriptor.from_tensor(
                a, [tile_m, BK], gl.NVMMASharedLayout.get_default_for([tile_m, BK], gl.bfloat16))
        _ws_gemm_kernel[(num_tiles * triton.cdiv(N, m["BN"]), )](
            a, a_desc, *args, num_tiles, row_start, K, N, float(limit), float(alpha), TILES=tiles, BM=tile_m,
            LEAD=m["RAW_STAGES"] - 2 if linear else 0, **flags, **m)

    if bm == 256 and split_tails():
        launch(256, tile_expert.numel(), LONG_TILES)
        launch(128, offsets.numel() - 1, SHORT_TAILS)
    else:
        launch(bm, tile_expert.numel(), ALL_TILES)
    return out
