"""GPT-OSS MoE block: top-k router, experts with clamped SwiGLU, unmerged LoRA on the experts.

The pure-torch reference defines the math (equal to transformers' GptOssMLP with PEFT target_parameters LoRA on
the experts); below it, the Triton grouped-GEMM kernels, their autograd wrapper and the public ``moe``.

Expert LoRA layout (PEFT ``target_parameters`` on a 3-D parameter [E, in, out]):
  A: [r*E, in]  — expert e owns rows e*r : (e+1)*r                     (A.view(E, r, in)[e])
  B: [out, r*E] — expert e owns columns e, E+e, 2E+e, ... (strided)    (B.view(out, r, E)[:, :, e])
  delta W_e [in, out] = scaling * A_e^T @ B_e^T
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.backends import active_stash, is_output_unused
from fastft.kernels import lora_linear_hopper, moe_hopper
from fastft.kernels._env import interpreting
from fastft.kernels.lora_linear import dense_weight
from fastft.mxfp4 import MXFP4Tensor


def expert_lora_factors(lora, num_experts: int):
    """(A [E, r, in], B [E, out, r], scaling) from PEFT's flat layout."""
    A, B, scaling = lora
    A_e = A.view(num_experts, -1, A.shape[-1])
    B_e = B.view(B.shape[0], -1, num_experts).permute(2, 0, 1)
    return A_e, B_e, scaling


def route(x, router_weight, router_bias, top_k):
    """Top-k on raw logits, softmax over the kept values (in the logits' dtype, as HF)."""
    logits = F.linear(x, router_weight, router_bias)
    top_values, top_index = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_values, dim=-1, dtype=top_values.dtype), top_index


def clamped_swiglu(gate_up, limit=7.0, alpha=1.702):
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # interleaved: even = gate, odd = up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def moe_reference(x, router_weight, router_bias, top_k, gate_up, gate_up_bias, down, down_bias,
                  gate_up_lora=None, down_lora=None, limit=7.0, alpha=1.702):
    """Loop over experts (tests, CPU). x [T, H] -> [T, H]."""
    weights, index = route(x, router_weight, router_bias, top_k)
    return experts_reference(x, weights, index, gate_up, gate_up_bias, down, down_bias, gate_up_lora, down_lora,
                             limit, alpha)


def experts_reference(x, weights, index, gate_up, gate_up_bias, down, down_bias, gate_up_lora=None,
                      down_lora=None, limit=7.0, alpha=1.702, h_dtype=None):
    """The experts half of moe_reference, for given routing (weights [T, k], index [T, k]).

    h_dtype: round the gate_up pre-activation to this dtype before the activation (straight-through gradient), as
    a bf16 model stores it: the clamp masks then take the same decisions as in bf16 (tests of low-precision runs).
    """
    W_gu, W_d = dense_weight(gate_up, x.dtype), dense_weight(down, x.dtype)
    E = W_gu.shape[0]
    lora_gu = expert_lora_factors(gate_up_lora, E) if gate_up_lora is not None else None
    lora_d = expert_lora_factors(down_lora, E) if down_lora is not None else None
    out = torch.zeros_like(x)
    for e in range(E):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        h = x[token]
        gu = h @ W_gu[e] + gate_up_bias[e]
        if lora_gu is not None:
            A, B, s = lora_gu
            gu = gu + (h @ A[e].t().to(h.dtype)) @ B[e].t().to(h.dtype) * s
        if h_dtype is not None:
            gu = gu + (gu.to(h_dtype).to(gu.dtype) - gu).detach()
        act = clamped_swiglu(gu, limit, alpha)
        y = act @ W_d[e] + down_bias[e]
        if lora_d is not None:
            A, B, s = lora_d
            y = y + (act @ A[e].t().to(h.dtype)) @ B[e].t().to(h.dtype) * s
        out = out.index_add(0, token, (y * weights[token, slot, None]).to(x.dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton path.
#
# Shapes: T tokens, k = top_k, S = T*k (token, slot) pairs, E experts, H hidden, I intermediate, N1 = 2I, r rank.
# Pairs are sorted by expert on the device (torch.sort, then one small kernel for the offsets and tiles); every
# grouped kernel walks a tile table of static length ceil(S/BM) + E (expert, first row) built on the device, so
# nothing in forward or backward waits on the host. Rows are gathered inside the kernels through row_token
# (= pair // k; the register kernel gathers them into one transient sorted copy instead); outputs are scattered to
# pair order, and out[t] = sum_j w[t, j] Y[t k + j] (_slot_sum: deterministic, no atomics).
#
# Weights: dense in HF layout [E, in, out], or MXFP4 stored [E, out, in] (in contiguous, 32-value groups along in).
# Forward GEMMs reduce over `in` (MXFP4 groups run along K); backward dX GEMMs reduce over `out` and read the
# same bytes transposed (groups run along N). Either way a [BK, BN] tile is dequantised in registers, then bf16
# tl.dot with an fp32 accumulator; no dense copy of an expert exists anywhere. On sm_90 the MXFP4 GEMMs with bf16
# activations go to lora_linear_hopper's grouped register-operand kernel (Gluon; the weights decoded straight into
# wgmma's register operand), else to moe_hopper's (loader, decoder and MMA warps): the same tiles and epilogues.
#
# Saved for backward (bytes, T=16384, k=4, I=2880, r=16): gate_up pre-activation h [S, 2I] in x's dtype
# (2 B * 65536 * 5760 = 755 MB), xa = x A_gu^T and act_a = act A_d^T [S, r] fp32 (8 MB), the routing tables
# (~1 MB). The activation (377 MB) is recomputed from h in the SwiGLU backward; the down output y is never
# kept: d(routing weight) = <dOut, y> = <g, act> + <dOut, b_d> with g = dOut W_d^T + s (dOut B_d) A_d, and g is
# what the down GEMM's dX pass computes anyway.
# ----------------------------------------------------------------------------------------------------------------

_INTERPRET = interpreting()
# BN and BK are multiples of 32 (one MXFP4 scale group) and are tuned per GEMM shape on the GPU; the interpreter
# gets one small config. The row tile BM is chosen per call (the tile table is built for it): see _row_tile.
# FASTFT_MOE_BM fixes it (A/B runs), read once per process; the interpreter always uses 16.
_BM_FIXED = 16 if _INTERPRET else (int(os.environ["FASTFT_MOE_BM"]) if os.environ.get("FASTFT_MOE_BM") else None)


def _row_tile(S: int, E: int, register: bool = False) -> int:
    """BM for S sorted rows over E experts. 256 halves the in-loop dequantisation per MMA (each decoded W tile
    feeds twice the rows): on the H200, top-4 of 32 experts, the MoE block's fwd+bwd without LoRA went from 9.2 to
    8.8 ms at T=4096 and from 28.2 to 26.4 ms at T=16384 (with LoRA 12.4 -> 12.1, 37.2 -> 36.7). It pads each
    expert's last tile to 256 rows, so the Triton and moe_hopper kernels take it only once experts average >= 512
    rows. The register kernel (register: it serves this call's GEMMs) takes 256 at every S: its MMA warps decode each
    weight tile themselves, so a 128-row tile pays the same decode for half the rows (H200, fwd+bwd, same run: T=2048
    4.1-4.6 ms vs 4.6-4.9 with LoRA, 3.3-3.6 vs 4.1 without; T=4096 5.8-6.0 vs 7.3-7.4)."""
    if _BM_FIXED is not None:
        return _BM_FIXED
    return 256 if register or S >= 512 * E else 128


GROUP_M = 2 if _INTERPRET else 8
# SWAP_AB computes C^T = W^T A^T: the dequantised weight tile becomes wgmma's register operand, so it is not written
# to shared memory and read back each K step (the activations, loaded as they are, take the shared-memory side).
_GEMM_CONFIGS = [triton.Config(dict(BN=32, BK=32, SWAP_AB=False), num_warps=4, num_stages=1)] if _INTERPRET else [
    triton.Config(dict(BN=bn, BK=bk, SWAP_AB=swap), num_warps=w, num_stages=st)
    for bn, bk, w, st, swap in ((128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 64, 8, 4, False),
                                (64, 64, 4, 4, False), (128, 64, 8, 3, True), (64, 64, 8, 3, False))
]  # BN=256 and 4-warp BN=128 tiles were dropped: with the LoRA epilogue their sm_90 builds spill registers
# FASTFT_MOE_SWAP=0 or 1 keeps only that orientation (A/B runs); unset, the autotuner picks per GEMM.
_SWAP_ONLY = os.environ.get("FASTFT_MOE_SWAP")
# Forward GEMMs on MXFP4 experts with bf16 activations run tl.dot_scaled (QUANT 3: Triton loads the packed bytes
# straight into the MMA's register operand). On the H200 (T=16384 block) it times the same as the hand-written
# decode (QUANT 1) without LoRA and 0.9 ms faster with it. FASTFT_MOE_DOT_SCALED=0 keeps QUANT 1 for A/B runs.
# (Triton 3.6's interpreter has no dot_scaled: the CPU tests run QUANT 1, the GPU tests QUANT 3.)
_DOT_SCALED = not _INTERPRET and os.environ.get("FASTFT_MOE_DOT_SCALED", "1") != "0"
_FORCE_META = None  # tests: launch the kernel with these meta-parameters instead of autotuning
_TUNED = {}  # GEMM shape/dtypes -> the autotuner's pick (its meta-parameters and launch options)


def _prune_configs(configs, named_args, **kwargs):
    # A BM=256 tile's accumulator alone is 128 registers per thread at BN=128 over 8 warps.
    BM = kwargs["BM"]
    keep = [c for c in configs
            if not (kwargs["QUANT"] == 3 and c.kwargs["SWAP_AB"])  # dot_scaled orients the MMA itself
            and not (BM >= 256 and c.kwargs["BN"] * BM > 128 * 256)
            and (_SWAP_ONLY is None or c.kwargs["SWAP_AB"] == (_SWAP_ONLY == "1"))]
    return keep or configs[:1]


@triton.jit
def _e2m1_x2p14(c):
    """e2m1 codes (int32, 0..15) -> value * 2**-14 in fp32: the 3 magnitude bits land on fp16's exponent/mantissa
    boundary (exponent bias 15 instead of 1), subnormal 0.5 included, so no table and no branches."""
    bits = ((c & 8) << 12) | ((c & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _mx_scale(s):
    """e8m0 exponent (int32) -> 2**(s - 127 + 14) in fp32, built from bits (exact; s <= 240)."""
    return ((s + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_mx_k(W, WS, e, k0, n0, K, N, s_we, s_se, BK: tl.constexpr, BN: tl.constexpr):
    """The packed bytes [BN, BK/2] and e8m0 scales [BN, BK/32] of an MXFP4 [N, K] tile, as stored: tl.dot_scaled's
    operands (QUANT 3), or decoded by _load_w (QUANT 1). Zero bytes pad the edges (zero values whatever the scale)."""
    rn = n0 + tl.arange(0, BN)
    hk = k0 // 2 + tl.arange(0, BK // 2)
    b = tl.load(W + e.to(tl.int64) * s_we + rn[:, None] * (K // 2) + hk[None, :],
                mask=(rn[:, None] < N) & (hk[None, :] < K // 2), other=0)
    gk = k0 // 32 + tl.arange(0, BK // 32)
    s = tl.load(WS + e.to(tl.int64) * s_se + rn[:, None] * (K // 32) + gk[None, :],
                mask=(rn[:, None] < N) & (gk[None, :] < K // 32), other=0)
    return b, s


@triton.jit
def _load_w(W, WS, e, k0, n0, K, N, s_we, s_wk, s_wn, s_se,
            QUANT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """A [BK, BN] fp32 tile of expert e's operand, the GEMM being out[:, n] = sum_k a[:, k] * W[k, n].

    QUANT 0: dense, element (k, n) at k*s_wk + n*s_wn.
    QUANT 1: MXFP4 stored [N, K] (forward: K = in): bytes [e, n, k//2], scales [e, n, k//32].
    QUANT 2: MXFP4 stored [K, N] (backward: N = in): bytes [e, k, n//2], scales [e, k, n//32].
    """
    rk = k0 + tl.arange(0, BK)
    rn = n0 + tl.arange(0, BN)
    if QUANT == 0:
        ptr = W + e.to(tl.int64) * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn
        w = tl.load(ptr, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0).to(tl.float32)
    elif QUANT == 1:
        b, s = _load_mx_k(W, WS, e, k0, n0, K, N, s_we, s_se, BK, BN)
        b = b.to(tl.int32)
        v = tl.reshape(tl.join(_e2m1_x2p14(b & 15), _e2m1_x2p14(b >> 4)), (BN, BK))  # low nibble first
        v = tl.reshape(tl.reshape(v, (BN, BK // 32, 32)) * _mx_scale(s.to(tl.int32))[:, :, None], (BN, BK))
        w = tl.trans(v)
    else:
        hn = n0 // 2 + tl.arange(0, BN // 2)
        b = tl.load(W + e.to(tl.int64) * s_we + rk[:, None] * (N // 2) + hn[None, :],
                    mask=(rk[:, None] < K) & (hn[None, :] < N // 2), other=0).to(tl.int32)
        v = tl.reshape(tl.join(_e2m1_x2p14(b & 15), _e2m1_x2p14(b >> 4)), (BK, BN))
        gn = n0 // 32 + tl.arange(0, BN // 32)
        s = tl.load(WS + e.to(tl.int64) * s_se + rk[:, None] * (N // 32) + gn[None, :],
                    mask=(rk[:, None] < K) & (gn[None, :] < N // 32), other=0).to(tl.int32)
        w = tl.reshape(tl.reshape(v, (BK, BN // 32, 32)) * _mx_scale(s)[:, :, None], (BK, BN))
    return w


@triton.jit
def _tile(tile_expert, tile_row, offsets, pid_t, BM: tl.constexpr):
    e = tl.load(tile_expert + pid_t)
    row0 = tl.load(tile_row + pid_t)
    row_end = tl.load(offsets + e + 1, mask=e >= 0, other=0)
    return e, row0, row_end


@triton.autotune(configs=_GEMM_CONFIGS, key=["K", "N", "QUANT", "EPI", "HAS_LORA", "BM"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _grouped_gemm_kernel(
    A, a_idx, s_am,                       # activation rows: A[a_idx[i]] (GATHER_A) or A[i]
    W, WS, s_we, s_wk, s_wn, s_se,        # expert weights, see _load_w
    bias, s_be,                           # [E, N] (HAS_BIAS)
    L, s_lm, LB, s_lbe, s_lbn, s_lbr, lora_scale, R,   # LoRA: acc += s * L[i, :R] @ LB_e[n, :R]^T
    C, c_idx, s_cm,                       # output rows: C[c_idx[i]] (SCATTER_C) or C[i]
    AUX, s_xm,                            # EPI 1: h out [S, N]
    tile_expert, tile_row, offsets, num_tiles, row_start,   # rows below row_start are not computed
    K, N, limit, alpha,
    QUANT: tl.constexpr, EPI: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """One (BM rows of one expert) x (BN columns) tile of a grouped GEMM, with one of two epilogues:
    EPI 0: acc + bias -> C (the routing weight: _slot_sum, after the GEMM).
    EPI 1: h = acc + bias (interleaved gate/up columns) -> AUX; clamped SwiGLU(h) -> C [S, N/2].
    The SwiGLU backward is a separate kernel (_swiglu_backward_kernel): fused here as a third epilogue, its fp32
    [BM, BN] pieces held the down dX GEMM to spill-free BN <= 64 tiles at ~130 TFLOP/s on the H200 (8.4 ms of a
    24.5 ms block at T=16384), while the split costs one extra bf16 [S, I] round trip.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n  # programs sharing GROUP_M row tiles walk all column blocks: A stays in L2
    group = pid // width
    first_t = group * GROUP_M
    gsize = tl.minimum(num_tiles - first_t, GROUP_M)
    pid_t = first_t + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    e, row0, row_end = _tile(tile_expert, tile_row, offsets, pid_t, BM)
    if (e < 0) | (tl.minimum(row0 + BM, row_end) <= row_start):
        return
    rm = row0 + tl.arange(0, BM)
    mmask = rm < row_end
    if GATHER_A:
        arow = tl.load(a_idx + rm, mask=mmask, other=0).to(tl.int64)
    else:
        arow = rm.to(tl.int64)
    n0 = pid_n * BN
    rn = n0 + tl.arange(0, BN)
    nmask = rn < N

    SWAPPED: tl.constexpr = SWAP_AB and QUANT != 3  # dot_scaled orients its MMA itself
    if SWAPPED:
        acc_t = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(A + arow[:, None] * s_am + rk[None, :], mask=mmask[:, None] & (rk[None, :] < K), other=0.0)
        if QUANT == 3:
            b, s = _load_mx_k(W, WS, e, k0, n0, K, N, s_we, s_se, BK, BN)
            acc = tl.dot_scaled(a, None, "bf16", tl.trans(b), s, "e2m1", acc)
        else:
            w = _load_w(W, WS, e, k0, n0, K, N, s_we, s_wk, s_wn, s_se, QUANT, BK, BN)
            if SWAPPED:
                acc_t = tl.dot(tl.trans(w).to(a.dtype), tl.trans(a), acc_t)
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
    if SWAPPED:
        acc = tl.trans(acc_t)  # once per tile

    if HAS_LORA:
        rr = tl.arange(0, R_PAD)
        la = tl.load(L + rm[:, None].to(tl.int64) * s_lm + rr[None, :], mask=mmask[:, None] & (rr[None, :] < R),
                     other=0.0)
        lb = tl.load(LB + e.to(tl.int64) * s_lbe + rr[:, None] * s_lbr + rn[None, :] * s_lbn,
                     mask=(rr[:, None] < R) & nmask[None, :], other=0.0)
        # tf32x3 (~fp32): with plain tf32 the LoRA term's ~1e-3 error moves h across a bf16 rounding boundary
        # next to the +-7 clamps often enough to flip ~1e-4 of the clamp masks, i.e. ~1% of dX. Accumulating into
        # acc (scale folded into the [BM, r] factor) avoids a second [BM, BN] fp32 tile in registers.
        acc = tl.dot(la.to(tl.float32) * lora_scale, lb.to(tl.float32), acc, input_precision="tf32x3")
    if HAS_BIAS:
        acc += tl.load(bias + e * s_be + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]

    if EPI == 0:
        if SCATTER_C:
            crow = tl.load(c_idx + rm, mask=mmask, other=0).to(tl.int64)
        else:
            crow = rm.to(tl.int64)
        tl.store(C + crow[:, None] * s_cm + rn[None, :], acc.to(C.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])
    elif EPI == 1:
        # tile-local int32 offsets from an int64 tile base: the epilogue's [BM, BN] address tensors take half the
        # registers of int64 pointers (the SwiGLU epilogue runs close to the register limit)
        lr = tl.arange(0, BM)[:, None]
        h = acc.to(AUX.dtype.element_ty)
        tl.store(AUX + row0.to(tl.int64) * s_xm + n0 + (lr * s_xm + tl.arange(0, BN)[None, :]), h,
                 mask=mmask[:, None] & nmask[None, :])
        # the activation reads h as saved (rounded to x's dtype, as HF's bf16 gate_up output is): backward's clamp
        # masks, computed from the saved h, then belong to the same function the forward evaluated
        gate, up = tl.split(tl.reshape(h.to(tl.float32), (BM, BN // 2, 2)))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
        lh = tl.arange(0, BN // 2)[None, :]
        tl.store(C + row0.to(tl.int64) * s_cm + n0 // 2 + (lr * s_cm + lh), act.to(C.dtype.element_ty),
                 mask=mmask[:, None] & (n0 // 2 + lh < N // 2))


@triton.jit
def _swiglu_backward_kernel(G, s_gm, Hh, s_hm, rowscale, DH, s_dhm, DW, ACT, s_actm, S, I, limit, alpha,
                            STORE_ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """For BM sorted rows, walking the I columns: g = dL/d(act) before the routing weight (the down GEMM's dX),
    h the saved gate_up output (interleaved gate/up). dh = rowscale * g * d act/dh with the clamp masks -> DH
    [S, 2I] interleaved; DW[row] = <g, act> (the routing weight's gradient without the down-bias term); the
    recomputed act -> ACT (STORE_ACT: the down LoRA's dA needs it)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mmask = rm < S
    rows = rm.to(tl.int64)[:, None]
    scale = tl.load(rowscale + rm, mask=mmask, other=0.0)[:, None]
    dw = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, I, BN):
        rn = n0 + tl.arange(0, BN)[None, :]
        m = mmask[:, None] & (rn < I)
        r2 = 2 * n0 + tl.arange(0, 2 * BN)[None, :]
        m2 = mmask[:, None] & (r2 < 2 * I)
        g = tl.load(G + rows * s_gm + rn, mask=m, other=0.0).to(tl.float32)
        h = tl.load(Hh + rows * s_hm + r2, mask=m2, other=0.0).to(tl.float32)
        gate, up = tl.split(tl.reshape(h, (BM, BN, 2)))
        gate_c = tl.minimum(gate, limit)
        up_c = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(gate_c * alpha)
        glu = gate_c * sig
        act = (up_c + 1.0) * glu
        dw += tl.sum(g * act, axis=1)
        if STORE_ACT:
            tl.store(ACT + rows * s_actm + rn, act.to(ACT.dtype.element_ty), mask=m)
        dact = g * scale
        # torch.clamp passes the gradient where min <= x <= max (bounds included)
        d_up = tl.where((up >= -limit) & (up <= limit), dact * glu, 0.0)
        d_gate = tl.where(gate <= limit, dact * (up_c + 1.0) * (sig + glu * alpha * (1.0 - sig)), 0.0)
        dh = tl.reshape(tl.join(d_gate, d_up), (BM, 2 * BN))
        tl.store(DH + rows * s_dhm + r2, dh.to(DH.dtype.element_ty), mask=m2)
    tl.store(DW + rm, dw, mask=mmask)


def _swiglu_backward(g, h, rowscale, limit, alpha, store_act, in_place=False):
    """(dh [S, 2I] in h's dtype, dw [S] fp32, act [S, I] or None); see _swiglu_backward_kernel. in_place: dh
    overwrites h (each element is read before its program writes it)."""
    S, I = g.shape
    dh = h if in_place else torch.empty(S, 2 * I, device=g.device, dtype=h.dtype)
    dw = torch.empty(S, device=g.device, dtype=torch.float32)
    act = torch.empty(S, I, device=g.device, dtype=h.dtype) if store_act else dh
    BM, BN = (16, 32) if _INTERPRET else (16, 128)
    _swiglu_backward_kernel[(triton.cdiv(S, BM),)](
        g, g.stride(0), h, h.stride(0), rowscale, dh, dh.stride(0), dw, act, act.stride(0), S, I,
        float(limit), float(alpha), STORE_ACT=store_act, BM=BM, BN=BN, num_warps=4)
    return dh, dw, act if store_act else None


@triton.jit
def _lowrank_kernel(P, p_idx, s_pm, F, s_fe, s_fr, s_fk, O, tile_expert, tile_row, offsets, K, R,
                    GATHER_P: tl.constexpr, R_PAD: tl.constexpr, BM: tl.constexpr, SUB_M: tl.constexpr,
                    BK: tl.constexpr):
    """O[i, :R] = P[row i] @ F_e^T for SUB_M rows of one expert tile (program_id(1) picks which); F_e [R, K]
    strided (LoRA A or B^T). A skinny product that only streams P: one program per BM=256 tile kept ~260 programs
    walking K serially (4.2 ms for the four calls of a T=16384 block on the H200, ~8x the bytes' time)."""
    e, row0, row_end = _tile(tile_expert, tile_row, offsets, tl.program_id(0), BM)
    row0 += tl.program_id(1) * SUB_M
    if (e < 0) | (row0 >= row_end):
        return
    rm = row0 + tl.arange(0, SUB_M)
    mmask = rm < row_end
    if GATHER_P:
        prow = tl.load(p_idx + rm, mask=mmask, other=0).to(tl.int64)
    else:
        prow = rm.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((SUB_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        p = tl.load(P + prow[:, None] * s_pm + rk[None, :], mask=mmask[:, None] & (rk[None, :] < K), other=0.0)
        f = tl.load(F + e.to(tl.int64) * s_fe + rr[None, :] * s_fr + rk[:, None] * s_fk,
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc = tl.dot(p.to(tl.float32), f.to(tl.float32), acc, input_precision="tf32x3")  # see the LoRA epilogue
    tl.store(O + rm[:, None].to(tl.int64) * R + rr[None, :], acc, mask=mmask[:, None] & (rr[None, :] < R))


@triton.jit
def _wgrad_kernel(P, p_idx, s_pm, Q, q_idx, s_qm, rowscale, O, offsets, DP, DQ,
                  GATHER_P: tl.constexpr, GATHER_Q: tl.constexpr, ROWSCALE: tl.constexpr,
                  BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    """O[e] [DP, DQ] = sum over expert e's rows i of rowscale[i] * P[row i]^T Q[row i] (a LoRA factor's grad).
    One program owns one output block and walks all rows of its expert: deterministic, no atomics."""
    e = tl.program_id(0)
    rp = tl.program_id(1) * BP + tl.arange(0, BP)
    rq = tl.program_id(2) * BQ + tl.arange(0, BQ)
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rm = m0 + tl.arange(0, BM)
        mmask = rm < end
        if GATHER_P:
            prow = tl.load(p_idx + rm, mask=mmask, other=0).to(tl.int64)
        else:
            prow = rm.to(tl.int64)
        if GATHER_Q:
            qrow = tl.load(q_idx + rm, mask=mmask, other=0).to(tl.int64)
        else:
            qrow = rm.to(tl.int64)
        p = tl.load(P + prow[:, None] * s_pm + rp[None, :], mask=mmask[:, None] & (rp[None, :] < DP),
                    other=0.0).to(tl.float32)
        if ROWSCALE:
            p *= tl.load(rowscale + rm, mask=mmask, other=0.0)[:, None]
        q = tl.load(Q + qrow[:, None] * s_qm + rq[None, :], mask=mmask[:, None] & (rq[None, :] < DQ),
                    other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(p), q, acc)
    tl.store(O + e.to(tl.int64) * DP * DQ + rp[:, None] * DQ + rq[None, :], acc,
             mask=(rp[:, None] < DP) & (rq[None, :] < DQ))


def _routing_tables_reference(index, num_experts, BM):
    """Torch version of the routing tables (tests); see _routing_tables for what they are."""
    k = index.shape[-1]
    flat = index.reshape(-1)
    S = flat.numel()
    sorted_e, pair = torch.sort(flat, stable=True)
    ar = torch.arange(num_experts + 1, device=flat.device, dtype=sorted_e.dtype)
    offsets = torch.searchsorted(sorted_e, ar)  # offsets[e] = first row of expert e
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(S, BM) + num_experts  # static bound: every expert wastes at most one partial tile
    t = torch.arange(max_tiles, device=flat.device, dtype=tile_end.dtype)
    te = torch.searchsorted(tile_end, t, right=True)
    te_c = te.clamp(max=num_experts - 1)
    tile_row = offsets[te_c] + (t - (tile_end - tiles)[te_c]) * BM
    tile_expert = torch.where(te < num_experts, te, -1)
    return ((pair // k).to(torch.int32), pair.to(torch.int32), offsets.to(torch.int32),
            tile_expert.to(torch.int32), torch.where(te < num_experts, tile_row, 0).to(torch.int32))


@triton.jit
def _lower_bound(sorted_e, S, target):
    """First index i with sorted_e[i] >= target (S if none), for a vector of targets: a fixed 32-step binary search
    (S < 2**31), lanes that have converged stay put."""
    lo = tl.zeros_like(target)
    hi = tl.zeros_like(target) + S
    for _ in range(32):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(sorted_e + mid, mask=active & (mid < S), other=0)
        right = active & (v < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _routing_kernel(sorted_e, pair_in, weights, row_token, pair_out, rowscale, offsets, tile_expert, tile_row,
                    S, TOP_K, E, num_tiles, BM: tl.constexpr, E_PAD: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """Every program converts one block of sorted rows (pair -> int32, token, routing weight); program 0 also
    writes the per-expert offsets and the tile table (E experts and ceil(S/BM) + E tiles: small)."""
    pid = tl.program_id(0)
    rs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    m = rs < S
    p = tl.load(pair_in + rs, mask=m, other=0)
    tl.store(pair_out + rs, p.to(tl.int32), mask=m)
    tl.store(row_token + rs, (p // TOP_K).to(tl.int32), mask=m)
    tl.store(rowscale + rs, tl.load(weights + p, mask=m, other=0.0).to(tl.float32), mask=m)
    if pid == 0:
        e = tl.arange(0, E_PAD)
        first = _lower_bound(sorted_e, S, e)  # offsets[e] for e <= E
        tl.store(offsets + e, first, mask=e <= E)
        tiles = tl.where(e < E, (_lower_bound(sorted_e, S, e + 1) - first + BM - 1) // BM, 0)
        tile_end = tl.cumsum(tiles, 0)
        tile_start = tile_end - tiles
        for t0 in range(0, num_tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            te = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)  # experts whose tiles end by t
            pick = e[None, :] == te[:, None]
            row = tl.sum(tl.where(pick, first[None, :] + (t[:, None] - tile_start[None, :]) * BM, 0), axis=1)
            used = te < E
            tl.store(tile_expert + t, tl.where(used, te, -1), mask=t < num_tiles)
            tl.store(tile_row + t, tl.where(used, row, 0), mask=t < num_tiles)


def _routing_tables(index, weights, num_experts, BM):
    """Sort (token, slot) pairs by expert and build the tile table, all on the device (no host sync): one sort and
    one small kernel (the torch version, _routing_tables_reference, issues ~15 launches per call).

    Returns row_token [S] int32 (token of each sorted row), pair [S] int32 (its flat pair index t*k + j),
    offsets [E+1] int32, tile_expert / tile_row [ceil(S/BM) + E] int32 (expert -1 marks an unused tile); and the
    routing weight (weights [T, k]) of each sorted row, fp32 [S].
    """
    k = index.shape[-1]
    flat = index.reshape(-1)
    S = flat.numel()
    sorted_e, pair = torch.sort(flat, stable=True)
    max_tiles = triton.cdiv(S, BM) + num_experts  # static bound: every expert wastes at most one partial tile
    dev = flat.device
    row_token, pair32 = (torch.empty(S, device=dev, dtype=torch.int32) for _ in range(2))
    offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int32)
    tile_expert, tile_row = (torch.empty(max_tiles, device=dev, dtype=torch.int32) for _ in range(2))
    rowscale = torch.empty(S, device=dev, dtype=torch.float32)
    block_s = 1024
    _routing_kernel[(max(1, triton.cdiv(S, block_s)),)](
        sorted_e, pair, weights.detach().reshape(-1), row_token, pair32, rowscale, offsets,
        tile_expert, tile_row, S, k, num_experts, max_tiles, BM=BM,
        E_PAD=triton.next_power_of_2(num_experts + 1), BLOCK_S=block_s, BLOCK_T=64, num_warps=4)
    return (row_token, pair32, offsets, tile_expert, tile_row), rowscale


def _weight_args(w, dtype, forward):
    """(tensor, scales, QUANT, s_we, s_wk, s_wn, s_se, K, N) for a GEMM over one expert stack.

    forward: out = a @ W_e with K = in, N = out; backward: out = a @ W_e^T with K = out, N = in.
    """
    if isinstance(w, MXFP4Tensor):
        E, out_f, in_f = w.stored_shape
        blocks, scales = w.blocks.view(E, -1), w.scales.view(E, -1)
        if forward:
            return blocks, scales, 1, blocks.stride(0), 0, 0, scales.stride(0), in_f, out_f
        return blocks, scales, 2, blocks.stride(0), 0, 0, scales.stride(0), out_f, in_f
    if not isinstance(w, torch.Tensor):
        w = w.dequantize(dtype)  # other quantized holders (e.g. NF4): densified here, not in the kernel
    w = w.to(dtype)  # HF layout [E, in, out]
    if forward:
        return w, w, 0, w.stride(0), w.stride(1), w.stride(2), 0, w.shape[1], w.shape[2]
    return w, w, 0, w.stride(0), w.stride(2), w.stride(1), 0, w.shape[2], w.shape[1]


def _r_pad(r):
    return max(16, triton.next_power_of_2(r))


def _gemm(a, a_idx, w_args, tables, bm, out, *, c_idx=None, bias=None, lora=None, epi=0, aux=None, limit=7.0,
          alpha=1.702, row_start=0):
    """Launch _grouped_gemm_kernel (or, for MXFP4 weights on sm_90, a Hopper kernel: see the section's header).
    lora = (L [S, r], LB, s_lbe, s_lbn, s_lbr, scaling). Row tiles that end at or below sorted row ``row_start`` are
    skipped (their output is already in place); a tile straddling it is computed whole."""
    W, WS, quant, s_we, s_wk, s_wn, s_se, K, N = w_args
    rank = lora[0].shape[1] if lora is not None else 0
    if quant in (1, 2) and _FORCE_META is None and moe_hopper.can_run(a, out, K, bm, rank):
        n_w = N if quant == 1 else K  # the experts' stored rows
        if _register_path() and lora_linear_hopper.can_run_grouped(a, out, n_w, K, bm, rank, W):
            E = W.shape[0]
            return lora_linear_hopper.grouped_gemm(
                a, a_idx, W.view(E, n_w, -1), WS.view(E, n_w, -1), quant == 2, tables, bm, out, c_idx=c_idx,
                bias=bias, lora=lora, epi=epi, aux=aux, limit=limit, alpha=alpha, row_start=row_start)
        return moe_hopper.ws_gemm(a, a_idx, W, WS, quant == 2, K, N, tables, bm, out, c_idx=c_idx, bias=bias,
                                  lora=lora, epi=epi, aux=aux, limit=limit, alpha=alpha,
                                  row_start=row_start)
    if quant == 1 and a.dtype == torch.bfloat16 and _DOT_SCALED:
        quant = 3
    _, _, offsets, tile_expert, tile_row = tables
    num_tiles = tile_expert.numel()
    dummy = out
    L, LB, s_lbe, s_lbn, s_lbr, scaling = lora if lora is not None else (dummy, dummy, 0, 0, 0, 0.0)
    R = L.shape[1] if lora is not None else 1
    grid = lambda meta: (num_tiles * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    if _FORCE_META is not None:
        kernel, meta = _grouped_gemm_kernel.fn, _FORCE_META
    else:
        # after the first launch of a GEMM shape, launch its tuned config directly: the autotuner's per-call key
        # building is host time the step pays ~5 times per layer and pass
        key = (K, N, quant, epi, lora is not None, bm, a.dtype, W.dtype, out.dtype)
        meta = _TUNED.get(key)
        kernel = _grouped_gemm_kernel if meta is None else _grouped_gemm_kernel.fn
        meta = meta or {}
    kernel[grid](
        a, a_idx if a_idx is not None else offsets, a.stride(0),
        W, WS, s_we, s_wk, s_wn, s_se,
        bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
        L, L.stride(0), LB, s_lbe, s_lbn, s_lbr, float(scaling), R,
        out, c_idx if c_idx is not None else offsets, out.stride(0),
        aux if aux is not None else dummy, aux.stride(0) if aux is not None else 0,
        tile_expert, tile_row, offsets, num_tiles, row_start, K, N, float(limit), float(alpha),
        QUANT=quant, EPI=epi, GATHER_A=a_idx is not None, SCATTER_C=c_idx is not None,
        HAS_BIAS=bias is not None, HAS_LORA=lora is not None,
        R_PAD=_r_pad(R), BM=bm, GROUP_M=GROUP_M, **meta,
    )
    if kernel is _grouped_gemm_kernel:
        _TUNED[key] = _grouped_gemm_kernel.best_config.all_kwargs()
    return out


def _register_serves(x, *weights) -> bool:
    """Whether the register kernel will serve these experts' GEMMs, as _gemm decides (a rank or shape it refuses
    falls back per GEMM)."""
    return (all(isinstance(w, MXFP4Tensor) for w in weights) and _register_path()
            and moe_hopper.can_run(x, x, moe_hopper.BK, 256))


def _register_path() -> bool:
    """FASTFT_MOE_REGISTER=0 sends the sm_90 MXFP4 GEMMs to moe_hopper's kernel instead of lora_linear_hopper's
    grouped register-operand kernel (A/B runs); read per call (tests switch it)."""
    return os.environ.get("FASTFT_MOE_REGISTER", "1") != "0"


def _lowrank(p, p_idx, factor, tables, S, bm, out=None):
    """[S, r] fp32 = P[rows] @ F_e^T, factor = (F, s_fe, s_fr, s_fk, r, K); the tables' row tile is bm."""
    F_, s_fe, s_fr, s_fk, r, K = factor
    _, _, offsets, tile_expert, tile_row = tables
    out = torch.empty(S, r, device=p.device, dtype=torch.float32) if out is None else out
    sub = min(bm, 16 if _INTERPRET else 64)  # 64 rows x BK 64, 4 stages: the best of 7 shapes swept on the H200
    _lowrank_kernel[(tile_expert.numel(), bm // sub)](
        p, p_idx if p_idx is not None else offsets, p.stride(0), F_, s_fe, s_fr, s_fk, out,
        tile_expert, tile_row, offsets, K, r, GATHER_P=p_idx is not None, R_PAD=_r_pad(r),
        BM=bm, SUB_M=sub, BK=32 if _INTERPRET else 64, num_warps=4, num_stages=1 if _INTERPRET else 4)
    return out


def _wgrad(p, p_idx, q, q_idx, rowscale, offsets, E):
    """[E, DP, DQ] fp32 = per-expert sum of rowscale * P[rows]^T Q[rows]."""
    DP, DQ = p.shape[1], q.shape[1]
    out = torch.empty(E, DP, DQ, device=p.device, dtype=torch.float32)
    BP, BQ = (_r_pad(d) if d <= 64 else (32 if _INTERPRET else 128) for d in (DP, DQ))
    grid = (E, triton.cdiv(DP, BP), triton.cdiv(DQ, BQ))
    _wgrad_kernel[grid](p, p_idx if p_idx is not None else offsets, p.stride(0),
                        q, q_idx if q_idx is not None else offsets, q.stride(0),
                        rowscale if rowscale is not None else out, out, offsets, DP, DQ,
                        GATHER_P=p_idx is not None, GATHER_Q=q_idx is not None, ROWSCALE=rowscale is not None,
                        BM=16 if _INTERPRET else 64, BP=BP, BQ=BQ, num_warps=4)
    return out


@triton.jit
def _route_grad_kernel(DW, dOut, s_dom, DB, s_dbe, row_token, pair, offsets, O, S, H, E,
                       E_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """O[pair[i]] = DW[i] + <dOut[token i], DB[expert of i]> for a block of sorted rows, in fp32, rounded once to
    O's dtype: the routing weight's gradient <dOut, y + b_d> (DW[i] = <g, act> = <dOut, y>, from the SwiGLU
    backward)."""
    ri = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = ri < S
    e_idx = tl.arange(0, E_PAD)
    ends = tl.load(offsets + 1 + e_idx, mask=e_idx < E, other=2147483647)
    e = tl.sum((ends[None, :] <= ri[:, None]).to(tl.int32), axis=1)  # expert of each sorted row
    acc = tl.load(DW + ri, mask=m, other=0.0)
    rc = tl.arange(0, BLOCK_C)
    tok = tl.load(row_token + ri, mask=m, other=0).to(tl.int64)
    for h0 in range(0, H, BLOCK_C):
        hm = m[:, None] & (h0 + rc[None, :] < H)
        g = tl.load(dOut + tok[:, None] * s_dom + h0 + rc[None, :], mask=hm, other=0.0).to(tl.float32)
        b = tl.load(DB + e[:, None].to(tl.int64) * s_dbe + h0 + rc[None, :], mask=hm, other=0.0).to(tl.float32)
        acc += tl.sum(g * b, axis=1)
    tl.store(O + tl.load(pair + ri, mask=m, other=0), acc.to(O.dtype.element_ty), mask=m)


def _route_grad(dw, d_out, d_b, tables, dtype):
    """Gradient of the routing weights in pair order ([S] in dtype); one launch (it was ~9 torch ops and an fp32
    copy of dOut)."""
    row_token, pair, offsets = tables[:3]
    S, E = row_token.numel(), d_b.shape[0]
    out = torch.empty(S, device=d_out.device, dtype=dtype)
    d_b = d_b.contiguous()
    block_r = 16 if _INTERPRET else 32
    _route_grad_kernel[(triton.cdiv(S, block_r),)](
        dw, d_out, d_out.stride(0), d_b, d_b.stride(0), row_token, pair, offsets, out, S, d_out.shape[1], E,
        E_PAD=triton.next_power_of_2(E), BLOCK_R=block_r, BLOCK_C=32 if _INTERPRET else 128, num_warps=4)
    return out


def _a_factor(A, E):
    """LoRA A [r*E, K] as F_e [r, K]: (F, s_fe, s_fr, s_fk, r, K)."""
    r = A.shape[0] // E
    return A, r * A.stride(0), A.stride(0), A.stride(1), r, A.shape[1]


def _bt_factor(B, E):
    """LoRA B [N, r*E] (expert e owns columns e, E+e, ...) as F_e = B_e^T [r, N], copied to [E, r, N] so the
    low-rank kernel's factor tiles load contiguously (read in place, each [BK, r] tile touched BK*r scattered
    words: the T=16384 dh B_gu product ran at ~0.5 TB/s); the copy is N*r*E floats (<= 12 MB at gpt-oss shape)."""
    N, rE = B.shape
    r = rE // E
    F_ = B.view(N, r, E).permute(2, 1, 0).contiguous()
    return F_, r * N, N, 1, r, N


def _b_epilogue(B, E, L, scaling):
    """LoRA term L @ B_e^T for the GEMM epilogue: LB_e[n, j] = B[n, j*E + e]."""
    return (L, B, B.stride(1), B.stride(0), E * B.stride(1), scaling)


def _a_epilogue(A, E, L, scaling):
    """LoRA term L @ A_e for the backward epilogue: LB_e[n, j] = A[e*r + j, n]."""
    r = A.shape[0] // E
    return (L, A, r * A.stride(0), A.stride(1), A.stride(0), scaling)


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, index, gu_b, d_b, A_gu, B_gu, A_d, B_d, gate_up, down, s_gu, s_d, limit, alpha,
                skip_output, stash):
        T, H = x.shape
        k = index.shape[1]
        E = gu_b.shape[0]
        S = T * k
        bm = _row_tile(S, E, register=_register_serves(x, gate_up, down))
        tables, rowscale = _routing_tables(index, weights, E, bm)  # rowscale: routing weight of each sorted row
        row_token, pair, offsets = tables[:3]
        gu_args = _weight_args(gate_up, x.dtype, True)
        d_args = _weight_args(down, x.dtype, True)
        N1 = gu_args[8]
        I = N1 // 2
        # A recompute (skip_output) whose forward stashed h and the LoRA products has nothing left to compute: the
        # routing above is deterministic, so the stashed rows are in this call's order.
        kept = stash.get("h") if skip_output and stash is not None else None
        if kept is not None:
            h, xa, act_a = kept, stash.get("xa"), stash.get("act_a")
            rows = stash.rows("h")  # a stash spilled to host memory brings back only h's first rows
            if rows < S:  # the rest: the gate_up GEMM over the row tiles past them, written in place
                lora_gu = _b_epilogue(B_gu, E, xa, s_gu) if A_gu is not None else None
                _gemm(x, row_token, gu_args, tables, bm, torch.empty(S, N1 // 2, device=x.device, dtype=x.dtype),
                      bias=gu_b, lora=lora_gu, epi=1, aux=h, limit=limit, alpha=alpha, row_start=rows)
        else:
            keep = stash if not skip_output else None

            def new(name, shape, dtype):
                if keep is None:
                    return torch.empty(shape, device=x.device, dtype=dtype)
                return keep.buffer(name, shape, dtype, x.device, partial=name == "h")

            xa = act_a = lora_gu = lora_d = None
            if A_gu is not None:
                xa = _lowrank(x, row_token, _a_factor(A_gu, E), tables, S, bm,
                              out=new("xa", (S, A_gu.shape[0] // E), torch.float32))
                lora_gu = _b_epilogue(B_gu, E, xa, s_gu)
            h = new("h", (S, N1), x.dtype)
            act = torch.empty(S, I, device=x.device, dtype=x.dtype)
            _gemm(x, row_token, gu_args, tables, bm, act, bias=gu_b, lora=lora_gu, epi=1, aux=h, limit=limit,
                  alpha=alpha)
            if A_d is not None:
                act_a = _lowrank(act, None, _a_factor(A_d, E), tables, S, bm,
                                 out=new("act_a", (S, A_d.shape[0] // E), torch.float32))
                lora_d = _b_epilogue(B_d, E, act_a, s_d)
        if skip_output:  # a checkpoint recompute (backends.output_unused): backward needs only what is saved below
            out = x.new_zeros(T, H)
        else:
            y = torch.empty(S, H, device=x.device, dtype=x.dtype)
            _gemm(act, None, d_args, tables, bm, y, c_idx=pair, bias=d_b, lora=lora_d)
            out = _slot_sum(y, k, weights)
        ctx.save_for_backward(x, weights, index, gu_b, d_b, A_gu, B_gu, A_d, B_d, h, xa, act_a, rowscale, *tables)
        ctx.gate_up, ctx.down, ctx.s_gu, ctx.s_d, ctx.limit, ctx.alpha = gate_up, down, s_gu, s_d, limit, alpha
        ctx.bm = bm
        ctx.h_scratch = skip_output  # a recompute's graph is walked once: its backward may overwrite h
        return out

    @staticmethod
    def backward(ctx, d_out):
        (x, weights, index, gu_b, d_b, A_gu, B_gu, A_d, B_d, h, xa, act_a, rowscale, *tables) = ctx.saved_tensors
        row_token, pair, offsets = tables[:3]
        T, H = x.shape
        k = index.shape[1]
        E = gu_b.shape[0]
        S = T * k
        d_out = d_out.contiguous().to(x.dtype)
        bm = ctx.bm
        gu_args = _weight_args(ctx.gate_up, x.dtype, False)
        d_args = _weight_args(ctx.down, x.dtype, False)
        I = d_args[8]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = [None] * 17

        # down projection: g = dOut W_d^T + s (dOut B_d) A_d over the I columns (in x's dtype, as autograd's
        # bf16 gradient of HF's down-projection input is), then the SwiGLU backward
        lora_d = d_outB = None
        if A_d is not None:
            d_outB = _lowrank(d_out, row_token, _bt_factor(B_d, E), tables, S, bm)
            lora_d = _a_epilogue(A_d, E, d_outB, ctx.s_d)
        g = torch.empty(S, I, device=x.device, dtype=x.dtype)
        _gemm(d_out, row_token, d_args, tables, bm, g, lora=lora_d)
        dh, dw, act = _swiglu_backward(g, h, rowscale, ctx.limit, ctx.alpha, store_act=A_d is not None,
                                       in_place=ctx.h_scratch)
        del g, h

        if need_w:
            grads[1] = _route_grad(dw, d_out, d_b, tables, weights.dtype).view(T, k)

        if A_d is not None:
            grads[7] = (_wgrad(d_outB, None, act, None, rowscale, offsets, E) * ctx.s_d).reshape(A_d.shape).to(A_d.dtype)
            dB = _wgrad(d_out, row_token, act_a, None, rowscale, offsets, E) * ctx.s_d  # [E, H, r]
            grads[8] = dB.permute(1, 2, 0).reshape(B_d.shape).to(B_d.dtype)
        if ctx.needs_input_grad[4]:
            dy = d_out[row_token.long()].float() * rowscale[:, None]
            grads[4] = torch.zeros(E, H, device=x.device, dtype=torch.float32).index_add_(
                0, _row_expert(offsets, S), dy).to(d_b.dtype)
        if ctx.needs_input_grad[3]:
            grads[3] = torch.zeros(E, 2 * I, device=x.device, dtype=torch.float32).index_add_(
                0, _row_expert(offsets, S), dh.float()).to(gu_b.dtype)

        # gate_up projection: dX = dh W_gu^T + s (dh B_gu) A_gu, scattered to pair order and summed per token
        lora_gu = dhB = None
        if A_gu is not None:
            dhB = _lowrank(dh, None, _bt_factor(B_gu, E), tables, S, bm)
            lora_gu = _a_epilogue(A_gu, E, dhB, ctx.s_gu)
            grads[5] = (_wgrad(dhB, None, x, row_token, None, offsets, E) * ctx.s_gu).reshape(A_gu.shape).to(A_gu.dtype)
            dB = _wgrad(dh, None, xa, None, None, offsets, E) * ctx.s_gu  # [E, 2I, r]
            grads[6] = dB.permute(1, 2, 0).reshape(B_gu.shape).to(B_gu.dtype)
        if need_x:
            dxs = torch.empty(S, H, device=x.device, dtype=x.dtype)
            _gemm(dh, None, gu_args, tables, bm, dxs, c_idx=pair, lora=lora_gu)
            grads[0] = _slot_sum(dxs, k)
        return tuple(grads)


@triton.jit
def _slot_sum_kernel(Y, W, O, H, K: tl.constexpr, WEIGHTED: tl.constexpr, BH: tl.constexpr):
    """O[t, h] = sum_j W[t, j] * Y[t K + j, h] (or the plain sum) for one token and BH columns, in fp32."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    m = h < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(K):
        y = tl.load(Y + (t * K + j) * H + h, mask=m, other=0.0).to(tl.float32)
        if WEIGHTED:
            y *= tl.load(W + t * K + j).to(tl.float32)
        acc += y
    tl.store(O + t * H + h, acc.to(O.dtype.element_ty), mask=m)


def _slot_sum(y, k, weights=None):
    """[T * k, H] rows in pair order -> [T, H]: out[t] = sum_j weights[t, j] y[t k + j] (weights [T, k]; None: the
    plain sum), fp32 inside, rounded once. The down projection's routing weight is applied here, not in its GEMM's
    epilogue, so y is rounded once before it (the register kernel could only scale its rounded tile: a second
    rounding); and torch's sum over the middle dim of [T, k, H] ran at ~1.2-2.4 TB/s on the H200."""
    T, H = y.shape[0] // k, y.shape[1]
    y = y.contiguous()  # the kernel's row stride is H (no copy for the callers' fresh buffers)
    weights = weights.contiguous() if weights is not None else None
    out = torch.empty(T, H, device=y.device, dtype=y.dtype)
    if T:
        bh = 256 if _INTERPRET else 1024
        _slot_sum_kernel[(T, triton.cdiv(H, bh))](y, weights if weights is not None else y, out, H, K=k,
                                                  WEIGHTED=weights is not None, BH=bh, num_warps=4)
    return out


def _row_expert(offsets, S):
    rows = torch.arange(S, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:], rows, right=True)


def _lora_parts(lora):
    if lora is None:
        return None, None, 0.0
    A, B, scaling = lora
    return A, B, float(scaling)


def moe(x, router_weight, router_bias, top_k, gate_up, gate_up_bias, down, down_bias,
        gate_up_lora=None, down_lora=None, limit=7.0, alpha=1.702):
    """Triton MoE block, same contract and math as moe_reference. x [..., H] -> [..., H].

    Experts: dense tensors [E, in, out] or MXFP4Tensor (read 4-bit inside the GEMMs); other quantized holders
    (NF4) are densified through their .dequantize() per call. The router runs in torch (autograd carries the
    routing weights' gradient through softmax, top-k and the router linear into x).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    weights, index = route(x2, router_weight, router_bias, top_k)
    A_gu, B_gu, s_gu = _lora_parts(gate_up_lora)
    A_d, B_d, s_d = _lora_parts(down_lora)
    out = _MoEExperts.apply(x2, weights, index, gate_up_bias, down_bias, A_gu, B_gu, A_d, B_d,
                            gate_up, down, s_gu, s_d, float(limit), float(alpha),
                            torch.is_grad_enabled() and is_output_unused(), active_stash())
    return out.view(shape)
