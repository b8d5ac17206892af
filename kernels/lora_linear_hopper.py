"""Hopper (sm_90) GEMM with 4-bit W decoded into wgmma's REGISTER operand (Gluon): lora_linear's ws path, and the
MoE's four expert GEMMs on MXFP4 (GROUPED, see below).

One launch computes, for a 4-bit W stored [N, K] (``in`` = K contiguous; MXFP4 hub packing or bitsandbytes NF4):
  forward (TRANS=False)  C[T, N] = X[T, K] deq(W)^T + bias + (s B) XA^T ... as  C^T = deq(W) X^T + (s B) XA^T
  dX      (TRANS=True)   C[T, K] = X[T, N] deq(W)   (+ C)  + (s A^T) G^T  ... as  C^T = deq(W)^T X^T + (s A^T) G^T
(XA = x A^T and G = dY B are the [T, r] LoRA inputs; add_c adds the C tile already there: the dropout LoRA dX term.)

Why swap A and B: wgmma takes its A operand from registers. With the weights there, the MMA warps decode a step's
raw bytes straight into the A fragment (each thread holds pairs of adjacent K values, i.e. one byte of MXFP4/NF4
per register), and the async wgmma of the previous step runs meanwhile; nothing decoded passes through shared
memory. Same-run scratch on the H200 at T=16384 (per GEMM, bit-identical outputs; ANALYSIS.md): MXFP4 q_proj
forward 603 us against 750 for moe_hopper's design (loader / decoder / MMA warps, decoded tiles through shared
memory) and 547 for cuBLAS on bf16; dX 769 / 837 / 521 (651-661 since the scale copies below). The dX orientation
pays more per value (the row relabelling's byte permutes, a scalar-store epilogue).

Warps: a TMA loader warp fills a STAGES-deep ring (X tile [BMT, BK] bf16 + raw W tile, one expect-tx barrier per
slot); two MMA warp groups (the default partition) own 64 weight rows each of a [BNW, BMT] = [128, 256] tile of C^T
(fp32 accumulator: 128 registers per thread). Persistent: programs walk tiles pid, pid + grid, ...; consecutive
tiles share the token block, so X is read once from HBM while the 4-bit W stays in L2. The epilogue writes C^T
transposed through shared memory (stmatrix .trans) and a TMA store that overlaps the next tile's main loop.

A fragments: two register sets used alternately (two K steps per loop trip). wgmma reads a register operand
asynchronously, so a set is overwritten only after the wait that retired the wgmma reading it (one group stays in
flight); ptxas does not enforce this by itself.

Scales: MXFP4's e8m0 (one per 32 values) and NF4's fp32 absmax (one per 64) are plain loads by the MMA warps, two
K steps ahead in the forward and one in dX (two spilled there), from a copy laid out per orientation so that a
thread's scales of a step are contiguous (scale_copy; the callers cache it): read from the stored [N, K / GW] rows,
dX's 16 scales per thread and step were 16 loads across 4-8 cache lines per warp, and the copy made dX 12-21 %
faster (H200, T=16384: MXFP4 q 750 -> 655 us, o 764 -> 606; NF4 q 911 -> 796, o 895 -> 756; the forward 1-5 %).
The NF4 code is looked up through L1 per value: a lookup with byte permutes instead (the table's four byte planes,
no loads) was bit-exact and 10-15 % slower (forward 689 -> 788 us at q).

dX orientation: the A fragment is deq(W)^T, rows = K features, reduction = N. A byte holds two adjacent K values,
which belong to two rows of the fragment; the rows are relabelled (fragment row 16g + 8h + r <-> feature
16g + 2r + h) so that a thread's two rows are one byte's two nibbles, and the epilogue undoes the relabelling.

GROUPED (moe._gemm, through grouped_gemm): tiles walk the MoE's routing tables (expert, first sorted row) with
moe_hopper.ws_gemm's contract and epilogues. The expert's raw rows and scale copy are offsets into the stacks; rows
of a tile past its expert's end are loaded (another expert's rows, or TMA's zero fill) and never stored, so the
epilogue stores through shared memory with masked 16-byte row stores (scattered through c_idx for the down forward
and gate_up dX) instead of a TMA box. The SwiGLU epilogue relabels the forward's rows like dX's, so that a thread
holds each gate/up pair. LoRA in bf16x3 (three wgmmas: ~fp32 products), as the gate_up clamp masks need. Against
moe_hopper's kernel (decoder warps, decoded tiles through shared memory), the same run on the H200 at T=16384 top-4
of 32: the block's four GEMMs 11.2 ms instead of 15.9 with LoRA (scratch profile; ANALYSIS.md).

Shared memory: STAGES * (BMT * BK * 2 + raw tile 4 KB) + the [BMT, BNW] bf16 C tile (64 KB) + the LoRA tile
[BMT, R_PAD]: 3 stages, 176 KB without LoRA and 184 KB at rank 16 (sm_90 builds; 227 KB per block at most). Those
builds are spill-free up to rank 16 (rank 32 in the forward); larger ranks spill a little. GROUPED adds a second
LoRA tile (bf16x3's low part): 192 KB at rank 16 (tests/test_moe_hopper.py builds every variant).
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

BNW, BMT, BK, STAGES, NUM_WARPS, LOAD_REGS = 128, 256, 64, 3, 8, 40
MAX_RANK = 64  # the LoRA tile [BMT, R_PAD] bf16 (32 KB at 64) beside the ring


def can_run(a: torch.Tensor, out: torch.Tensor, blocks: torch.Tensor, reduction: int, rank: int) -> bool:
    """sm_90 with Gluon (not under the interpreter), bf16 activations and output, TMA-addressable rows of a, out and
    the raw [N, K/2] bytes, the reduction in whole BK steps, a LoRA rank whose tile fits."""
    return (HAS_GLUON and a.is_cuda and not interpreting() and _is_sm90(a.device) and a.dtype == torch.bfloat16
            and out.dtype == torch.bfloat16 and tma_aligned(a) and tma_aligned(out) and tma_aligned(blocks)
            and reduction % BK == 0 and rank <= MAX_RANK)


if HAS_GLUON:

    @gluon.constexpr_function
    def _raw_layout(TRANS, RELABEL, BNW, BK, num_warps):
        # The raw bytes of a step as the MMA warps load them, built backwards from the bf16 A fragment
        # (DotOperandLayout(0, v3 mma with warps [num_warps, 1]), k_width=2: register bit 0 = reduction + 1, lanes
        # 0-1 = reduction 2, 4, lanes 2-4 = rows 1, 2, 4, register bit 1 = row 8, warps = rows 16, 32, ...).
        # fp4_to_fp turns byte column j into value columns 2j, 2j + 1 (its new register bit 0).
        nw = {1: 0, 2: 1, 4: 2, 8: 3}[num_warps]
        if not TRANS:
            # [BNW rows (N), BK / 2 bytes along K]: the byte's two values are a register pair of one row. RELABEL
            # (the SwiGLU epilogue): fragment row 16g + 8h + r holds feature 16g + 2r + h, so that a thread's two
            # rows r, r + 8 are one gate/up pair
            reg = [[1 if RELABEL else 8, 0]] + [[0, j] for j in (4, 8, 16, 32) if j < BK // 2]
            lanes = [[0, 1], [0, 2]] + ([[2, 0], [4, 0], [8, 0]] if RELABEL else [[1, 0], [2, 0], [4, 0]])
            warps = [[16 << w, 0] for w in range(nw)]
            reg += [[r, 0] for r in (64, 128, 256) if 16 << nw <= r < BNW]
            return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                              shape=[BNW, BK // 2])
        # [BK rows (N, the reduction), BNW / 2 bytes along K (the output features)]: a thread's two fragment rows
        # 16g + r and 16g + 8 + r are features 16g + 2r and 16g + 2r + 1, one byte (see the module docstring)
        reg = [[1, 0]] + [[n, 0] for n in (8, 16, 32) if n < BK]
        lanes = [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]]
        warps = [[0, 8 << w] for w in range(nw)]
        reg += [[0, j] for j in (32, 64, 128) if 8 << nw <= j < BNW // 2]
        return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                          shape=[BK, BNW // 2])

    @gluon.constexpr_function
    def _scale_layout(RAW_L, GW):
        # the decoded step [rows, 2 * bytes] viewed [rows, 2 * bytes / GW, GW], sliced along the GW values a scale
        # covers (fp4_to_fp prepends the within-byte value bit as register bit 0)
        def split(b):
            k = 2 * b[1]
            return [b[0], k // GW, k % GW]
        rows, cols = RAW_L.shape
        v3 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1]] + [split(b) for b in RAW_L.reg_bases],
                                        lane_bases=[split(b) for b in RAW_L.lane_bases],
                                        warp_bases=[split(b) for b in RAW_L.warp_bases], block_bases=[],
                                        shape=[rows, 2 * cols // GW, GW])
        return gl.SliceLayout(2, v3)

    @gluon.jit
    def _tile(t, num_n, tile_expert, tile_row, offsets, row_start, T, GROUPED: gl.constexpr, BNW: gl.constexpr,
              BMT: gl.constexpr):
        # tile t: (expert, first row, end of the expert's rows, first output feature, whether it has work). GROUPED
        # (the MoE): row tile t // num_n of the routing tables (expert -1: unused; tiles wholly below row_start:
        # already in place); its rows past the expert's end are loaded but never stored
        n0 = (t % num_n) * BNW
        if GROUPED:
            e = gl.load(tile_expert + t // num_n)
            row0 = gl.load(tile_row + t // num_n)
            row_end = gl.load(offsets + gl.maximum(e, 0) + 1)
            go = (e >= 0) & (gl.minimum(row0 + BMT, row_end) > row_start)
        else:
            e = 0
            row0 = (t // num_n) * BMT
            row_end = T
            go = True
        return e, row0, row_end, n0, go

    @gluon.jit
    def _loader(x_desc, w_desc, x_bufs, w_bufs, ready, empty, tile_expert, tile_row, offsets, row_start, T, N_ROWS,
                num_tiles, num_n, num_k, TRANS: gl.constexpr, GROUPED: gl.constexpr, BNW: gl.constexpr,
                BMT: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
        seq = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            e, row0, row_end, n0, go = _tile(t, num_n, tile_expert, tile_row, offsets, row_start, T, GROUPED, BNW,
                                             BMT)
            if go:
                w_row = e * N_ROWS  # the expert's first stored row (expert stacks: [E * N_ROWS, K / 2] bytes)
                for i in range(num_k):
                    s = seq % STAGES
                    mbarrier.wait(empty.index(s), ((seq // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(x_desc, [row0, i * BK], ready.index(s), x_bufs.index(s))
                    if TRANS:
                        tma.async_copy_global_to_shared(w_desc, [w_row + i * BK, n0 // 2], ready.index(s),
                                                        w_bufs.index(s))
                    else:
                        tma.async_copy_global_to_shared(w_desc, [w_row + n0, i * (BK // 2)], ready.index(s),
                                                        w_bufs.index(s))
                    seq += 1

    @gluon.constexpr_function
    def _scale_load_layout(TRANS, RELABEL, NF4, BNW, BK, num_warps):
        # the scales of one step as the MMA warps load them from scale_copy's layout: a thread's scales contiguous
        # (forward [BNW rows, G groups]: a row's G bytes of MXFP4; dX [G, 4, 16]: 16 values of one group and lane),
        # the other bases as the decode's slice layout (SL), which convert_layout then only renames registers into
        nw = {1: 0, 2: 1, 4: 2, 8: 3}[num_warps]
        GW = 64 if NF4 else 32
        if not TRANS:
            G = BK // GW
            reg = ([[0, 1]] if G > 1 else []) + [[1 if RELABEL else 8, 0]]
            reg += [[r, 0] for r in (64, 128) if 16 << nw <= r < BNW]
            rows = [[2, 0], [4, 0], [8, 0]] if RELABEL else [[1, 0], [2, 0], [4, 0]]
            return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[0, 0], [0, 0]] + rows,
                                              warp_bases=[[16 << w, 0] for w in range(nw)], block_bases=[],
                                              shape=[BNW, G])

        def group(byte_col):  # the scale group of a byte column (0: the same group as column 0)
            return [byte_col // (GW // 2), 0, 0]
        reg = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]]
        reg += [group(j) for j in (32, 64, 128) if 8 << nw <= j < BNW // 2]
        lanes = [[0, 1, 0], [0, 2, 0]] + [group(c) for c in (1, 2, 4)]
        warps = [group(8 << w) for w in range(nw)]
        return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                          shape=[BNW // GW, 4, 16])

    @gluon.jit
    def _load_scales(WS, i, n0, N_ROWS, S_COLS, TRANS: gl.constexpr, RELABEL: gl.constexpr, NF4: gl.constexpr,
                     BNW: gl.constexpr, BK: gl.constexpr, SL: gl.constexpr, num_warps: gl.constexpr):
        # the scales of step i in the decode's layout SL: [rows as stored, groups of this step's columns], read from
        # scale_copy's layout (forward [K / 64, N, G]; dX [K / GW, N / 64, 4, 16]); N_ROWS = N, S_COLS = K / GW;
        # int32 offsets (N * K / 32 < 2**31): fewer registers. The loads vectorise (one 16-byte load per thread and
        # step for dX's e8m0) when N is a multiple of 16, which the runtime specialises on
        GW: gl.constexpr = 64 if NF4 else 32
        LL: gl.constexpr = _scale_load_layout(TRANS, RELABEL, NF4, BNW, BK, num_warps)
        if TRANS:
            G: gl.constexpr = BNW // GW
            L2: gl.constexpr = gl.SliceLayout(2, LL)
            g = gl.minimum(n0 // GW + gl.arange(0, G, layout=gl.SliceLayout(1, L2)), S_COLS - 1)
            q = gl.arange(0, 4, layout=gl.SliceLayout(0, L2))
            j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, LL)))
            off = gl.expand_dims(gl.expand_dims(g * N_ROWS + i * BK, 1) + q[None, :] * 16, 2) + j[None, None, :]
            v = gl.load(WS + off)  # [G, lane q, j]: n = i BK + 2 q + 8 (j // 2) + j % 2
            v = gl.reshape(gl.permute(gl.reshape(v, [G, 4, 8, 2]), (2, 1, 3, 0)), [BK, G])
        else:
            G: gl.constexpr = BK // GW
            rr = gl.minimum(n0 + gl.arange(0, BNW, layout=gl.SliceLayout(1, LL)), N_ROWS - 1)
            cc = gl.arange(0, G, layout=gl.SliceLayout(0, LL))
            v = gl.load(WS + ((i * N_ROWS + rr[:, None]) * G + cc[None, :]))
        return gl.convert_layout(v, SL)

    @gluon.jit
    def _decode(w_bufs, sc, s, LUT, TRANS: gl.constexpr, RELABEL: gl.constexpr, NF4: gl.constexpr,
                BNW: gl.constexpr, BK: gl.constexpr, RAW_L: gl.constexpr, DOT_L: gl.constexpr):
        RR: gl.constexpr = BK if TRANS else BNW  # the raw tile [RR, RC / 2] as stored
        RC: gl.constexpr = BNW if TRANS else BK
        GW: gl.constexpr = 64 if NF4 else 32
        raw = w_bufs.index(s).load(RAW_L)
        if NF4:
            # bitsandbytes: element 2i in the HIGH nibble; value = bf16(code[nibble] * absmax) in fp32, as its
            # dequantize_4bit rounds (the 64-byte code table stays in L1)
            b = raw.to(gl.int32)
            v = gl.reshape(gl.join(gl.load(LUT + (b >> 4)), gl.load(LUT + (b & 15))), [RR, RC])
            v3 = gl.reshape(v, [RR, RC // GW, GW])
            v3 = (v3 * gl.expand_dims(gl.convert_layout(sc, gl.SliceLayout(2, v3.type.layout)), 2)).to(gl.bfloat16)
        else:
            v3 = gl.reshape(gl.fp4_to_fp(raw, gl.bfloat16, 1), [RR, RC // GW, GW])  # low nibble first (hub)
            scale = (sc.to(gl.int16) << 7).to(gl.bfloat16, bitcast=True)  # e8m0 -> 2**(s - 127), exact 1..254
            v3, scale = gl.broadcast(v3, gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(2, v3.type.layout)),
                                                        2))
            # two values per instruction (a bf16 `*` compiles to scalar multiplies)
            v3 = gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [v3, scale], dtype=gl.bfloat16,
                                           is_pure=True, pack=2)
        v = gl.reshape(v3, [RR, RC])
        if TRANS:  # [BK, BNW] (N, K) -> [BNW, BK]
            v = gl.permute(v, (1, 0))
        if RELABEL:  # fragment row 16g + 8h + r holds feature 16g + 2r + h (the layouts make this free)
            v = gl.reshape(gl.permute(gl.reshape(v, [BNW // 16, 8, 2, BK]), (0, 2, 1, 3)), [BNW, BK])
        return gl.convert_layout(v, DOT_L)

    @gluon.jit
    def _feature_rows(n0, BNW: gl.constexpr, RELABEL: gl.constexpr, layout: gl.constexpr):
        # the output feature of each accumulator row (see _decode's RELABEL)
        m = gl.arange(0, BNW, layout=layout)
        if RELABEL:
            m = (m // 16) * 16 + (m % 8) * 2 + (m // 8) % 2
        return n0 + m

    @gluon.jit
    def _feature_order(v):
        # a relabelled [BNW, BMT] accumulator tile (see _decode's RELABEL) with its rows back in feature order
        BNW: gl.constexpr = v.shape[0]
        BMT: gl.constexpr = v.shape[1]
        return gl.reshape(gl.permute(gl.reshape(v, [BNW // 16, 2, 8, BMT]), (0, 2, 1, 3)), [BNW, BMT])

    @gluon.jit
    def _store_rows(smem, v, C, s_cm, c_idx, row0, row_end, c0, n_cols, SCATTER: gl.constexpr, W: gl.constexpr,
                    num_warps: gl.constexpr):
        # v [W columns, BMT rows] (a C^T tile) -> C[row (or c_idx[row]), c0 + j] through shared memory, 16-byte
        # vectors along C's rows. Rows past the expert's end belong to another expert's tile: masked stores, which a
        # TMA store's box cannot express
        BMT: gl.constexpr = v.shape[1]
        gl.thread_barrier()  # every thread has read the previous tile out of smem
        smem.store(gl.permute(v, (1, 0)))
        gl.thread_barrier()
        OUT_L: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (W // 8), W // 8], [num_warps, 1], [1, 0])
        CH: gl.constexpr = 64  # rows per pass: few registers live (the epilogue runs next to the spill limit)
        cols = c0 + gl.arange(0, W, layout=gl.SliceLayout(0, OUT_L))
        for c in gl.static_range(BMT // CH):
            tile = smem.slice(c * CH, CH).load(OUT_L)
            rows = row0 + c * CH + gl.arange(0, CH, layout=gl.SliceLayout(1, OUT_L))
            rmask = rows < row_end
            if SCATTER:
                crow = gl.load(c_idx + rows, mask=rmask, other=0)
            else:
                crow = rows
            gl.store(C + crow.to(gl.int64)[:, None] * s_cm + cols[None, :], tile,
                     mask=rmask[:, None] & (cols < n_cols)[None, :])

    @gluon.jit
    def _grouped_epilogue(acc, c_smem, act_smem, C, s_cm, c_idx, AUX, s_xm, row0, row_end, n0, N_OUT, limit, alpha,
                          TRANS: gl.constexpr, EPI: gl.constexpr, SCATTER: gl.constexpr, BNW: gl.constexpr,
                          BMT: gl.constexpr, num_warps: gl.constexpr):
        # moe_hopper's two epilogues on a relabelled (see _decode) C^T tile, bias already in.
        # EPI 0: rows scattered through c_idx (SCATTER; the routing weight is moe._slot_sum's, after the GEMM).
        # EPI 1: h (gate/up interleaved) saved to AUX in bf16; act = clamped SwiGLU of h as saved -> C [rows, N/2]
        if EPI == 1:
            hq = acc.to(gl.bfloat16)  # the activation reads h rounded, as saved: backward's clamp masks match it
            hf = _feature_order(hq)
            _store_rows(c_smem, hf, AUX, s_xm, c_idx, row0, row_end, n0, N_OUT, False, BNW, num_warps)
            # a thread's fragment rows 16g + r and 16g + 8 + r are features 16g + 2r (gate) and 16g + 2r + 1 (up)
            gate, up = gl.split(gl.permute(gl.reshape(hq.to(gl.float32), [BNW // 16, 2, 8, BMT]), (0, 2, 3, 1)))
            gate = gl.minimum(gl.reshape(gate, [BNW // 2, BMT]), limit)
            up = gl.minimum(gl.maximum(gl.reshape(up, [BNW // 2, BMT]), -limit), limit)
            act = (up + 1.0) * (gate / (1.0 + gl.exp(-alpha * gate)))
            _store_rows(act_smem, act.to(gl.bfloat16), C, s_cm, c_idx, row0, row_end, n0 // 2, N_OUT // 2, False,
                        BNW // 2, num_warps)
        else:
            if TRANS:  # undo the row relabelling: feature order
                acc = _feature_order(acc)
            _store_rows(c_smem, acc.to(gl.bfloat16), C, s_cm, c_idx, row0, row_end, n0, N_OUT, SCATTER, BNW,
                        num_warps)

    @gluon.jit
    def _mma(x_bufs, w_bufs, c_smem, act_smem, l_smem, l2_smem, ready, empty, c_ready, c_desc, WS, N_ROWS, S_COLS,
             LUT, bias, s_be, L, s_lm, LF, s_lfe, s_lfn, s_lfr, lora_scale, R, T, N_OUT, num_tiles, num_n, num_k,
             tile_expert, tile_row, offsets, row_start, C, s_cm, c_idx, AUX, s_xm, limit, alpha,
             TRANS: gl.constexpr, NF4: gl.constexpr, HAS_BIAS: gl.constexpr, ADD_C: gl.constexpr,
             R_PAD: gl.constexpr, AHEAD2: gl.constexpr, GROUPED: gl.constexpr, EPI: gl.constexpr,
             SCATTER: gl.constexpr, LORA_X3: gl.constexpr, BNW: gl.constexpr, BMT: gl.constexpr, BK: gl.constexpr,
             STAGES: gl.constexpr, num_warps: gl.constexpr):
        RELABEL: gl.constexpr = TRANS or EPI == 1
        MMA_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BMT, 16])
        DOT_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_L, k_width=2)
        RAW_L: gl.constexpr = _raw_layout(TRANS, RELABEL, BNW, BK, num_warps)
        SL: gl.constexpr = _scale_layout(RAW_L, 64 if NF4 else 32)
        a0 = gl.zeros([BNW, BK], gl.bfloat16, layout=DOT_L)
        a1 = gl.zeros([BNW, BK], gl.bfloat16, layout=DOT_L)
        seq = 0
        tcount = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            e, row0, row_end, n0, go = _tile(t, num_n, tile_expert, tile_row, offsets, row_start, T, GROUPED, BNW,
                                             BMT)
            if go:
                WS_e = WS + e * (N_ROWS * S_COLS)  # the expert's scale copy
                if ADD_C:  # the C tile to add on, in flight while the main loop runs
                    tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                    mbarrier.expect(c_ready, c_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(c_desc, [row0, n0], c_ready, c_smem)
                if R_PAD > 0:  # this tile's rows of the LoRA input (XA or G, [T, r]) for the last wgmma (held in
                    # registers through the main loop, they made it spill)
                    LL: gl.constexpr = gl.BlockedLayout([1, R_PAD], [32, 1], [num_warps, 1], [1, 0])
                    rl = row0 + gl.arange(0, BMT, layout=gl.SliceLayout(1, LL))
                    jl = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, LL))
                    lv = gl.load(L + rl.to(gl.int64)[:, None] * s_lm + jl[None, :],
                                 mask=(rl < row_end)[:, None] & (jl < R)[None, :], other=0.0)
                    if LORA_X3:  # bf16 high and low parts (see below)
                        lv = lv.to(gl.float32)
                        l_hi = lv.to(gl.bfloat16)
                        l_smem.store(l_hi)
                        l2_smem.store((lv - l_hi.to(gl.float32)).to(gl.bfloat16))
                    else:
                        l_smem.store(lv.to(gl.bfloat16))
                    # each warp group's LoRA wgmma reads rows every warp stored: fenced, then one barrier (per tile)
                    fence_async_shared()
                    gl.thread_barrier()
                acc = gl.zeros([BNW, BMT], gl.float32, layout=MMA_L)
                # scales loaded two steps ahead (AHEAD2) or one (fewer registers)
                sc0 = _load_scales(WS_e, 0, n0, N_ROWS, S_COLS, TRANS, RELABEL, NF4, BNW, BK, SL, num_warps)
                sc1 = sc0
                if AHEAD2:
                    sc1 = _load_scales(WS_e, gl.minimum(1, num_k - 1), n0, N_ROWS, S_COLS, TRANS, RELABEL, NF4,
                                       BNW, BK, SL, num_warps)
                for j in range(num_k // 2):
                    i = 2 * j
                    if not AHEAD2:
                        sc1 = _load_scales(WS_e, i + 1, n0, N_ROWS, S_COLS, TRANS, RELABEL, NF4, BNW, BK, SL,
                                           num_warps)
                    else:
                        sc2 = _load_scales(WS_e, gl.minimum(i + 2, num_k - 1), n0, N_ROWS, S_COLS, TRANS, RELABEL,
                                           NF4, BNW, BK, SL, num_warps)
                        sc3 = _load_scales(WS_e, gl.minimum(i + 3, num_k - 1), n0, N_ROWS, S_COLS, TRANS, RELABEL,
                                           NF4, BNW, BK, SL, num_warps)
                    s = seq % STAGES
                    mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
                    a0 = _decode(w_bufs, sc0, s, LUT, TRANS, RELABEL, NF4, BNW, BK, RAW_L, DOT_L)
                    acc = warpgroup_mma(a0, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc, a0, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0, a1))  # step i - 1 retired
                    mbarrier.arrive(empty.index((seq + STAGES - 1) % STAGES), count=1, pred=i > 0)
                    seq += 1
                    s = seq % STAGES
                    mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
                    if not AHEAD2:
                        sc0 = _load_scales(WS_e, gl.minimum(i + 2, num_k - 1), n0, N_ROWS, S_COLS, TRANS, RELABEL,
                                           NF4, BNW, BK, SL, num_warps)
                    a1 = _decode(w_bufs, sc1, s, LUT, TRANS, RELABEL, NF4, BNW, BK, RAW_L, DOT_L)
                    acc = warpgroup_mma(a1, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc, a0, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0, a1))  # step i retired
                    mbarrier.arrive(empty.index((seq + STAGES - 1) % STAGES), count=1)
                    seq += 1
                    if AHEAD2:
                        sc0 = sc2
                        sc1 = sc3
                if num_k % 2 == 1:
                    s = seq % STAGES
                    mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
                    a0 = _decode(w_bufs, sc0, s, LUT, TRANS, RELABEL, NF4, BNW, BK, RAW_L, DOT_L)
                    acc = warpgroup_mma(a0, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc, a0, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0, a1))
                    mbarrier.arrive(empty.index((seq + STAGES - 1) % STAGES), count=1, pred=num_k > 1)
                    seq += 1
                if R_PAD > 0:
                    # LoRA as one more wgmma (K = R_PAD): A = the factor's [BNW, R_PAD] rows times s (B of the
                    # forward, A^T of dX; rows relabelled like the weight's), B = the LoRA input tile, transposed
                    fr = _feature_rows(n0, BNW, RELABEL, gl.SliceLayout(1, DOT_L))
                    fj = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, DOT_L))
                    lf = gl.load(LF + e * s_lfe + fr.to(gl.int64)[:, None] * s_lfn + fj[None, :] * s_lfr,
                                 mask=(fr < N_OUT)[:, None] & (fj < R)[None, :], other=0.0)
                    if LORA_X3:
                        # bf16x3 (hi hi + hi lo + lo hi: ~fp32 products, fp32 sums). The MoE's gate_up needs it: a
                        # bf16 LoRA term's error moves h across bf16 rounding boundaries at the +-7 clamps often
                        # enough to flip clamp masks that move dX by percents (moe.py's tf32x3 note)
                        lf = lf.to(gl.float32) * lora_scale
                        f_hi = lf.to(gl.bfloat16)
                        f_lo = (lf - f_hi.to(gl.float32)).to(gl.bfloat16)
                        acc = warpgroup_mma(f_hi, l_smem.permute((1, 0)), acc, is_async=True)
                        acc = warpgroup_mma(f_hi, l2_smem.permute((1, 0)), acc, is_async=True)
                        acc = warpgroup_mma(f_lo, l_smem.permute((1, 0)), acc, is_async=True)
                        acc, a0, a1, f_hi, f_lo = warpgroup_mma_wait(num_outstanding=0,
                                                                     deps=(acc, a0, a1, f_hi, f_lo))
                    else:
                        lf = (lf.to(gl.float32) * lora_scale).to(gl.bfloat16)
                        acc = warpgroup_mma(lf, l_smem.permute((1, 0)), acc, is_async=True)
                        acc, a0, a1, lf = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0, a1, lf))
                acc, a0, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a0, a1))
                mbarrier.arrive(empty.index((seq + STAGES - 1) % STAGES), count=1)  # the tile's last slot
                if HAS_BIAS:
                    fb = _feature_rows(n0, BNW, RELABEL, gl.SliceLayout(1, MMA_L))
                    acc += gl.expand_dims(gl.load(bias + e * s_be + fb, mask=fb < N_OUT, other=0.0).to(gl.float32),
                                          1)
                if GROUPED:
                    _grouped_epilogue(acc, c_smem, act_smem, C, s_cm, c_idx, AUX, s_xm, row0, row_end, n0, N_OUT,
                                      limit, alpha, TRANS, EPI, SCATTER, BNW, BMT, num_warps)
                else:
                    if TRANS:  # undo the row relabelling: feature order
                        acc = _feature_order(acc)
                    if ADD_C:
                        mbarrier.wait(c_ready, tcount & 1)
                        acc += c_smem.permute((1, 0)).load(acc.type.layout).to(gl.float32)
                        gl.thread_barrier()  # every thread has read the tile before any overwrites it
                    else:
                        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                    c_smem.store(gl.permute(acc.to(gl.bfloat16), (1, 0)))
                    fence_async_shared()
                    tma.async_copy_shared_to_global(c_desc, [row0, n0], c_smem)  # rows / columns past C: clipped
                tcount += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _gemm_kernel(x_desc, w_desc, c_desc, WS, N_ROWS, S_COLS, LUT, bias, s_be, L, s_lm, LF, s_lfe, s_lfn, s_lfr,
                     lora_scale, R, T, N_OUT, K_RED, row_tiles, tile_expert, tile_row, offsets, row_start,
                     C, s_cm, c_idx, AUX, s_xm, limit, alpha,
                     TRANS: gl.constexpr, NF4: gl.constexpr, HAS_BIAS: gl.constexpr, ADD_C: gl.constexpr,
                     R_PAD: gl.constexpr, AHEAD2: gl.constexpr, GROUPED: gl.constexpr, EPI: gl.constexpr,
                     SCATTER: gl.constexpr, LORA_X3: gl.constexpr, BNW: gl.constexpr, BMT: gl.constexpr,
                     BK: gl.constexpr, STAGES: gl.constexpr, LOAD_REGS: gl.constexpr, num_warps: gl.constexpr):
        num_n = gl.cdiv(N_OUT, BNW)
        num_tiles = row_tiles * num_n
        num_k = K_RED // BK
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BMT, BK], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        c_smem = gl.allocate_shared_memory(gl.bfloat16, [BMT, BNW],
                                           gl.NVMMASharedLayout.get_default_for([BMT, BNW], gl.bfloat16))
        # the SwiGLU epilogue's activation tile [BMT, BNW / 2] in the same bytes, after h's (_store_rows syncs)
        act_smem = c_smem._reinterpret(gl.bfloat16, [BMT, BNW // 2],
                                       gl.NVMMASharedLayout.get_default_for([BMT, BNW // 2], gl.bfloat16))
        LR: gl.constexpr = R_PAD if R_PAD > 0 else 16
        l_smem = gl.allocate_shared_memory(gl.bfloat16, [BMT, LR],
                                           gl.NVMMASharedLayout.get_default_for([BMT, LR], gl.bfloat16))
        if LORA_X3:
            l2_smem = gl.allocate_shared_memory(gl.bfloat16, [BMT, LR],
                                                gl.NVMMASharedLayout.get_default_for([BMT, LR], gl.bfloat16))
        else:
            l2_smem = l_smem
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        c_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(ready.index(j), count=1)  # TMA's expect-tx arrival
            mbarrier.init(empty.index(j), count=1)
        mbarrier.init(c_ready, count=1)
        gl.warp_specialize([
            (_mma, (x_bufs, w_bufs, c_smem, act_smem, l_smem, l2_smem, ready, empty, c_ready, c_desc, WS, N_ROWS,
                    S_COLS, LUT, bias, s_be, L, s_lm, LF, s_lfe, s_lfn, s_lfr, lora_scale, R, T, N_OUT, num_tiles,
                    num_n, num_k, tile_expert, tile_row, offsets, row_start, C, s_cm, c_idx, AUX, s_xm, limit, alpha,
                    TRANS, NF4, HAS_BIAS, ADD_C, R_PAD, AHEAD2, GROUPED, EPI, SCATTER, LORA_X3, BNW, BMT, BK, STAGES,
                    num_warps)),
            (_loader, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, tile_expert, tile_row, offsets, row_start, T,
                       N_ROWS, num_tiles, num_n, num_k, TRANS, GROUPED, BNW, BMT, BK, STAGES)),
        ], [1], [LOAD_REGS])


def scale_copy(scales: torch.Tensor, trans: bool, nf4: bool) -> torch.Tensor:
    """The scales [N, K / GW] (MXFP4: e8m0 bytes, GW = 32; NF4: fp32 absmax, GW = 64) laid out for one orientation's
    loads by the MMA warps.

    Forward [K / 64, N, 64 / GW]: a step's scales of consecutive rows adjacent (a warp's 16 rows: one 32-64 byte
    segment). dX [K / GW, N / 64, 4, 16]: in a 64-row step a thread needs rows 2q + 8m + e (q: its lane mod 4; m < 8,
    e < 2) of one group, stored together at [group, step, q, 2m + e] (one 16-byte load of e8m0, four of fp32).
    Straight from the [N, K / GW] rows (90 / 180 bytes apart at gpt-oss shapes) each warp-wide scale load of dX
    touched 4-8 cache lines, 16 loads per thread and step, on the L1 / shared-memory pipe that also feeds wgmma its
    shared-memory operand. Per orientation the copy is 6 % of the 4-bit bytes for MXFP4, 12.5 % for NF4's fp32
    absmax: lora_linear keeps its frozen projections' copies, grouped_gemm makes the experts' per call."""
    *lead, n, groups = scales.shape  # lead: an expert stack's E
    if trans:
        assert n % BK == 0
        return (scales.transpose(-1, -2).reshape(*lead, groups, n // BK, 8, 4, 2).transpose(-3, -2)
                .reshape(*lead, groups, n // BK, 4, 16))
    per_step = BK // (64 if nf4 else 32)
    return scales.reshape(*lead, n, groups // per_step, per_step).transpose(-3, -2).contiguous()


def _launch(a, blocks2d, scales_laid, N_w, s_cols, lut, trans, nf4, out, bmt, row_tiles, *, bias=None, s_be=0,
            lora=None, s_lfe=0, add_c=False, grouped=None, epi=0, c_idx=None, aux=None, limit=7.0, alpha=1.702,
            x3=False):
    """One launch of _gemm_kernel for gemm (one weight) and grouped_gemm (an expert stack: grouped = the routing
    tables and row_start); blocks2d [rows, K / 2] raw bytes with N_w rows per weight."""
    n_out = blocks2d.shape[1] * 2 if trans else N_w
    k_red = N_w if trans else blocks2d.shape[1] * 2
    x_desc = TensorDescriptor.from_tensor(a, [bmt, BK], gl.NVMMASharedLayout.get_default_for([bmt, BK], gl.bfloat16))
    w_box = [BK, BNW // 2] if trans else [BNW, BK // 2]
    w_desc = TensorDescriptor.from_tensor(blocks2d, w_box, gl.NVMMASharedLayout.get_default_for(w_box, gl.uint8))
    c_desc = TensorDescriptor.from_tensor(out, [bmt, BNW],
                                          gl.NVMMASharedLayout.get_default_for([bmt, BNW], gl.bfloat16))
    L, F, s_fn, s_fr, s_l = (lora if lora is not None else (out, out, 0, 0, 0.0))
    R = L.shape[1] if lora is not None else 0
    r_pad = max(16, triton.next_power_of_2(R)) if R else 0
    tile_expert, tile_row, offsets, row_start = grouped if grouped is not None else (out, out, out, 0)
    aux = aux if aux is not None else out
    tiles = row_tiles * triton.cdiv(n_out, BNW)
    _gemm_kernel[(min(tiles, sm_count(a.device)), )](
        x_desc, w_desc, c_desc, scales_laid, N_w, s_cols, lut, bias if bias is not None else out, s_be,
        L, L.stride(0), F, s_lfe, s_fn, s_fr, float(s_l), R, a.shape[0], n_out, k_red, row_tiles,
        tile_expert, tile_row, offsets, row_start, out, out.stride(0), c_idx if c_idx is not None else offsets,
        aux, aux.stride(0), float(limit), float(alpha),
        TRANS=trans, NF4=nf4, HAS_BIAS=bias is not None, ADD_C=add_c, R_PAD=r_pad, AHEAD2=not trans,
        GROUPED=grouped is not None, EPI=epi, SCATTER=c_idx is not None, LORA_X3=x3 and R > 0, BNW=BNW, BMT=bmt,
        BK=BK, STAGES=STAGES, LOAD_REGS=LOAD_REGS, num_warps=NUM_WARPS)
    return out


def gemm(a, blocks, scales, trans, out, *, nf4_code=None, bias=None, lora=None, add_c=False, scales_laid=None):
    """out = a deq(W)^T + bias (+ LoRA) (forward) or a deq(W) (+ out with add_c) (+ LoRA) (trans); check can_run.

    a [T, red] bf16; blocks [N, K/2] uint8 of W [N, K]; scales [N, K/32] e8m0 (MXFP4) or, with nf4_code
    (bitsandbytes' 16-value fp32 code), the fp32 absmax [N, K/64]; scales_laid: scale_copy(scales, trans, nf4) if
    the caller keeps one (else made here); out [T, K if trans else N] bf16; bias [N];
    lora = (L [T, r], F, s_fn, s_fr, s): adds s * L F^T, F [out features, r] read through strides (B of the
    forward: (B.stride(0), B.stride(1)); A of dX: (A.stride(1), A.stride(0)))."""
    T = a.shape[0]
    if T == 0:
        return out
    nf4 = nf4_code is not None
    if scales_laid is None:
        scales_laid = scale_copy(scales, trans, nf4)
    return _launch(a, blocks, scales_laid, blocks.shape[0], scales.shape[1], nf4_code if nf4 else scales, trans, nf4,
                   out, BMT, triton.cdiv(T, BMT), bias=bias, lora=lora, add_c=add_c)


def can_run_grouped(a: torch.Tensor, out: torch.Tensor, n_stored: int, reduction: int, bm: int, rank: int,
                    blocks: torch.Tensor) -> bool:
    """grouped_gemm serves this MoE GEMM: can_run's conditions (out: the unused C descriptor is built on it; blocks:
    the stack's raw bytes [E, -1]), n_stored (the experts' stored rows) in whole BK steps, a 128- or 256-row tile
    table, a LoRA rank whose two tiles fit beside the epilogue's."""
    return can_run(a, out, blocks, reduction, rank) and n_stored % BK == 0 and bm in (128, 256) and rank <= 32


def grouped_gemm(a, a_idx, blocks, scales, trans, tables, bm, out, *, c_idx=None, bias=None, lora=None, epi=0,
                 aux=None, limit=7.0, alpha=1.702, row_start=0):
    """moe._gemm's contract (moe_hopper.ws_gemm's epilogues, without the routing weight: moe._slot_sum applies it)
    on this kernel, for MXFP4 expert stacks (check can_run_grouped first): blocks [E, N_w, K_w / 2] uint8, scales
    [E, N_w, K_w / 32] e8m0, W_e stored [N_w, K_w] (forward: out = a W_e^T, trans: out = a W_e). lora = (L [S, r],
    LB, s_lbe, s_lbn, s_lbr, s) as moe's.

    a_idx (gathered rows) is served by one gathered copy of a ([S, K] bf16, made here and freed after the launch:
    377 MB at 16384 tokens top-4, H = 2880; all S rows even when row_start skips most tiles): TMA cannot gather rows
    on sm_90, and cp.async from the loader would need more loader warps than the MMA warps' registers leave room
    for. The scale copies (scale_copy per expert, 1/32 byte per weight) are made per call:
    ~25 MB per layer and orientation at gpt-oss-20b's shape, cheaper to redo than to keep for 24 layers."""
    if a_idx is not None:
        a = a.index_select(0, a_idx)
    E, N_w, half = blocks.shape
    if a.shape[0] == 0:
        return out
    _, _, offsets, tile_expert, tile_row = tables
    s_lfe = lora[2] if lora is not None else 0
    if lora is not None:  # (L, factor, s_n, s_r, s) as gemm's, the factor's expert stride apart
        lora = (lora[0], lora[1], lora[3], lora[4], lora[5])
    return _launch(a, blocks.reshape(E * N_w, half), scale_copy(scales, trans, False), N_w, scales.shape[2], scales,
                   trans, False, out, bm, tile_expert.numel(), bias=bias,
                   s_be=bias.stride(0) if bias is not None else 0, lora=lora, s_lfe=s_lfe,
                   grouped=(tile_expert, tile_row, offsets, row_start), epi=epi, c_idx=c_idx, aux=aux, limit=limit,
                   alpha=alpha, x3=True)
