"""Linear with an unmerged LoRA term, over dense or 4-bit weights: y = x W^T + b + s * (dropout(x) A^T) B^T.

Three execution paths behind one autograd Function (same saved tensors); ``lora_path(T)`` picks one per call
(the third, "ws", is opt-in: see the ws section below):

fused (T < SLAB_MIN_T = 1024, memory-bound): one Triton GEMM serves both directions; W is dequantised tile by tile
inside its main loop and is never densified, so W costs 4 bits per weight of HBM traffic:
  forward  Y[T, out] = X[T, in]  . W^T  (+ b)  + s * XA[T, r] . B^T       XA = dropout(x) A^T, computed first
  backward dX[T, in] = dY[T, out] . W          + s * (dY B)[T, r] . A  (* dropout mask / keep)
The LoRA term is an extra K=r dot in the epilogue, so the [T, out] LoRA output never round-trips through memory.

slabs (T >= 1024, compute-bound: in-loop dequantisation then costs ALU that cuBLAS does not pay): a small Triton
kernel decodes ONE SLAB of W at a time (the same ``_w_tile`` decode as the fused GEMM, so bit-exact with it) into a
reused scratch buffer of at most SLAB_BYTES = 24 MiB, and cuBLAS consumes the slab. At gpt-oss shapes every projection
is one slab (q_proj's 23.6 MB of bf16 fit): one decode and one GEMM per direction, fewer launches for the host to
issue; larger weights are cut into slabs.
  forward  y = b + s * XA . B^T (one addmm, K=r); then per slab of output features y[:, n0:n1] += X . W[n0:n1]^T
  backward dX = s * (dY B) . A (* mask / keep); then per block of input features dX[:, k0:k1] += dY . W[:, k0:k1]
Each slab GEMM writes a column block of the row-major y / dX in place (a valid cuBLAS matrix with ld = out / in,
which torch passes without a copy); this keeps each output element a single full-K reduction, so no fp32 accumulator
over K-slabs is needed. Dense weights skip the decode (cuBLAS reads them directly) unless their dtype differs from x.

dA = s (dY B)^T dropout(x) and dB = s dY^T XA are [r, *] GEMMs over T, left to cuBLAS on both paths, except with
dropout: then XA, dA and the slab path's dX LoRA term come from two small Triton kernels that apply the bool mask
as x streams in (_masked_down_kernel, _masked_up_kernel), so dropout(x) is never materialised.

Weight formats read in-kernel (W's stored orientation is [out, in], ``in`` contiguous in all three):
  dense  bf16/fp16/fp32 tensor;
  NF4    bitsandbytes' packing: flat row-major, element 2i in the HIGH nibble of byte i, fp32 absmax per flat block of
         64 (double quantisation undone once per call in torch: out*in/64 floats, 0.7 MB for q_proj);
  MXFP4  hub packing: element 2i in the LOW nibble, one e8m0 scale per 32 along ``in``.
A packed tile is unpacked into its two nibble halves [rows, cols/2] and interleaved back with join+reshape.

Memory: forward saves x (and a bool dropout mask when dropout is on) plus XA [T, r]; no [T, out] LoRA temporaries;
backward allocates dX and, with dropout, fp32 partial sums of dA (chunks x r x in, ~2 MB at gpt-oss shapes). The slab
path adds the scratch (<= 24 MiB) in each direction and nothing else.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton use the reference
    triton = None

from fastft.kernels import lora_linear_hopper, moe_hopper
from fastft.kernels._env import FLOAT_DTYPES, interpreting, sm_count, tma_aligned, triton_runs
from fastft.mxfp4 import MXFP4Tensor


def dense_weight(weight, dtype=None):
    """A dense [out, in] tensor from a tensor or a quantized weight object exposing .dequantize()."""
    w = weight.dequantize() if hasattr(weight, "dequantize") and not isinstance(weight, torch.Tensor) else weight
    return w if dtype is None else w.to(dtype)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout=0.0, training=False):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, exactly PEFT's lora.Linear order of operations."""
    y = F.linear(x, dense_weight(weight, x.dtype), bias)
    if lora_A is not None:
        xd = F.dropout(x, p=dropout, training=training) if dropout > 0 else x
        y = y + F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scaling
    return y


FMT_DENSE, FMT_NF4, FMT_MXFP4 = 0, 1, 2

if triton is not None:

    @triton.jit
    def _e2m1_to_f32(c):
        # e2m1 (s e e m) placed in an fp16's sign / exponent top bits / mantissa top bit is the same number times
        # 2**-14 (both have a subnormal for e = 0), so one bitcast and one multiply decode it without a table.
        bits = ((c & 8) << 12) | ((c & 7) << 9)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0

    @triton.jit
    def _decode(b, scale, code_ptr, FMT: tl.constexpr):
        """fp32 (first, second) elements of packed bytes b (int32), times scale (broadcastable to b)."""
        if FMT == 1:
            # one 8-byte gather per byte from the [256] pair table: low word = even element (bnb: high nibble)
            pair = tl.load(code_ptr + b)
            first = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True) * scale
            second = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True) * scale
        else:
            first = _e2m1_to_f32(b & 15) * scale  # hub: even element in the low nibble
            second = _e2m1_to_f32(b >> 4) * scale
        return first, second

    @triton.jit
    def _scale(aux, FMT: tl.constexpr):
        if FMT == 1:
            return aux
        # 2**(e - 127) built from its bits; e = 0 (2**-127, subnormal) reads as 0
        return (aux.to(tl.int32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _packed_grouped(w_ptr, aux_ptr, code_ptr, offs_n, k0, N, K,
                        FMT: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        # [ROWS, COLS/G, G/2] bytes: each scale (one per G elements of a row) is loaded once and broadcast
        NG: tl.constexpr = COLS // G
        GB: tl.constexpr = G // 2
        offs_g = k0 // G + tl.arange(0, NG)
        byte_col = offs_g[None, :, None] * GB + tl.arange(0, GB)[None, None, :]
        rows = offs_n[:, None, None]
        b = tl.load(w_ptr + rows * (K // 2) + byte_col, mask=(rows < N) & (byte_col < K // 2), other=0)
        gmask = (offs_n[:, None] < N) & (offs_g[None, :] < K // G)
        aux = tl.load(aux_ptr + offs_n[:, None] * (K // G) + offs_g[None, :], mask=gmask, other=0)
        first, second = _decode(b.to(tl.int32), _scale(aux, FMT)[:, :, None], code_ptr, FMT)
        return tl.reshape(tl.join(first, second), (ROWS, COLS))

    @triton.jit
    def _packed_flat(w_ptr, aux_ptr, code_ptr, offs_n, k0, N, K,
                     FMT: tl.constexpr, NF4_BS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs_p = k0 // 2 + tl.arange(0, COLS // 2)  # byte columns; K is even for both packed formats
        mask = (offs_n[:, None] < N) & (offs_p[None, :] < K // 2)
        byte = offs_n[:, None] * (K // 2) + offs_p[None, :]
        b = tl.load(w_ptr + byte, mask=mask, other=0).to(tl.int32)
        if FMT == 1:  # bnb's blocks run over the flat array and may straddle rows
            aux = tl.load(aux_ptr + (byte * 2) // NF4_BS, mask=mask, other=0.0)
        else:
            aux = tl.load(aux_ptr + offs_n[:, None] * (K // 32) + offs_p[None, :] // 16, mask=mask, other=0)
        first, second = _decode(b, _scale(aux, FMT), code_ptr, FMT)
        return tl.reshape(tl.join(first, second), (ROWS, COLS))

    @triton.jit
    def _w_tile(w_ptr, aux_ptr, code_ptr, offs_n, k0, N, K, stride_wn, stride_wk,
                FMT: tl.constexpr, NF4_BS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                GROUP: tl.constexpr):
        """fp32 W[offs_n, k0:k0+COLS] as [ROWS, COLS], zero outside W. GROUP > 0: every row of W holds whole scale
        groups of GROUP elements (and k0 is a multiple of COLS), so a tile whose COLS is a multiple of GROUP takes
        the grouped read."""
        if FMT == 0:
            offs_k = k0 + tl.arange(0, COLS)
            mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
            w = w.to(tl.float32)
        else:
            if GROUP > 0:
                if COLS % GROUP == 0:
                    w = _packed_grouped(w_ptr, aux_ptr, code_ptr, offs_n, k0, N, K, FMT, GROUP, ROWS, COLS)
                else:
                    w = _packed_flat(w_ptr, aux_ptr, code_ptr, offs_n, k0, N, K, FMT, NF4_BS, ROWS, COLS)
            else:
                w = _packed_flat(w_ptr, aux_ptr, code_ptr, offs_n, k0, N, K, FMT, NF4_BS, ROWS, COLS)
        return w

    @triton.jit
    def _lora_gemm_kernel(
        a_ptr, w_ptr, aux_ptr, code_ptr, bias_ptr, p_ptr, q_ptr, mask_ptr, c_ptr,
        M, N_OUT, K_RED, N_W, K_W, R, scaling, inv_keep,
        stride_am, stride_ak, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn,
        stride_mm, stride_mn, stride_cm, stride_cn,
        FMT: tl.constexpr, NF4_BS: tl.constexpr, GROUP: tl.constexpr, TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
    ):
        """C[M, N_OUT] = A[M, K_RED] . op(W) (+ bias) + scaling * (P[M, R] . Q[R, N_OUT]) (* mask * inv_keep).

        op(W) = W^T (forward: N_OUT = out, K_RED = in) or W (TRANS_W, backward dX: N_OUT = in, K_RED = out).
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N_OUT, BLOCK_N)
        # grouped order: GROUP_M row-tiles share each W column panel while it is hot in L2
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        if SWAP_AB:  # C^T = op(W)^T . A^T: the dequantised tile is wgmma's A operand, which may stay in registers
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_RED, BLOCK_K):
            ks = k0 + offs_k
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=(offs_m[:, None] < M) & (ks[None, :] < K_RED),
                        other=0.0)
            if TRANS_W:  # rows of W are the reduction: the tile W[k0:k0+BK, n-tile] is op(W)'s [BK, BN]
                w = _w_tile(w_ptr, aux_ptr, code_ptr, ks, pid_n * BLOCK_N, N_W, K_W, stride_wn, stride_wk,
                            FMT, NF4_BS, BLOCK_K, BLOCK_N, GROUP)
                w_kn = w
                w_nk = tl.trans(w)
            else:  # W[n-tile, k0:k0+BK] is op(W)^T's [BN, BK]
                w = _w_tile(w_ptr, aux_ptr, code_ptr, offs_n, k0, N_W, K_W, stride_wn, stride_wk,
                            FMT, NF4_BS, BLOCK_N, BLOCK_K, GROUP)
                w_kn = tl.trans(w)
                w_nk = w
            if IEEE:  # fp32 inputs, and always in the interpreter (its bf16 dot is wrong)
                if SWAP_AB:
                    acc_t = tl.dot(w_nk, tl.trans(a.to(tl.float32)), acc_t, input_precision="ieee")
                else:
                    acc = tl.dot(a.to(tl.float32), w_kn, acc, input_precision="ieee")
            else:
                if SWAP_AB:
                    acc_t = tl.dot(w_nk.to(a.dtype), tl.trans(a), acc_t)
                else:
                    acc = tl.dot(a, w_kn.to(a.dtype), acc)
        if SWAP_AB:
            acc = tl.trans(acc_t)  # once per tile

        mask_mn = (offs_m[:, None] < M) & (offs_n[None, :] < N_OUT)
        if HAS_LORA:
            offs_r = tl.arange(0, BLOCK_R)
            p = tl.load(p_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr,
                        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
            q = tl.load(q_ptr + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                        mask=(offs_r[:, None] < R) & (offs_n[None, :] < N_OUT), other=0.0)
            if IEEE:
                lora = tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                lora = tl.dot(p, q.to(p.dtype))
            lora = lora * scaling
            if HAS_MASK:
                keep = tl.load(mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn,
                               mask=mask_mn, other=0)
                lora = lora * (keep.to(tl.float32) * inv_keep)
            acc += lora
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N_OUT, other=0.0).to(tl.float32)[None, :]
        c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_mn)

    @triton.jit
    def _decode_slab_kernel(
        w_ptr, aux_ptr, code_ptr, out_ptr, n0, k0, SLAB_ROWS, SLAB_COLS, N_W, K_W, stride_wn, stride_wk, stride_on,
        FMT: tl.constexpr, NF4_BS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """out[SLAB_ROWS, SLAB_COLS] (row-major, leading dim stride_on) = W[n0:, k0:] in out's dtype, through the same
        _w_tile decode as the GEMM. k0 is a multiple of BLOCK_C, so the grouped scale read stays valid."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        w = _w_tile(w_ptr, aux_ptr, code_ptr, n0 + r, k0 + pid_c * BLOCK_C, N_W, K_W, stride_wn, stride_wk,
                    FMT, NF4_BS, BLOCK_R, BLOCK_C, GROUP)
        dst = out_ptr + r[:, None].to(tl.int64) * stride_on + c[None, :]
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=(r[:, None] < SLAB_ROWS) & (c[None, :] < SLAB_COLS))

    # The two LoRA dropout kernels below apply the bool keep-mask while x streams in, so dropout(x) [T, in] is never
    # written: torch would write it in forward, again in the recompute, and read it back for dA; and the slab path's
    # dX LoRA term would take a second pass for the mask. (H200, W1-qv step: those passes were 190 of its
    # elementwise launches, 7.9 ms.)

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b: exact fp32 products when IEEE (fp32 inputs, and always in the interpreter, whose bf16 dot is
        wrong), else a tensor-core dot with b cast to a's dtype."""
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        return acc

    @triton.jit
    def _masked_down_kernel(x_ptr, m_ptr, a_ptr, out_ptr, T, K, R, stride_xt, stride_mt, stride_ar, stride_ot, scale,
                            IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[T, R] = scale * (x * keep) @ A^T for BLOCK_T rows (x [T, K], keep bool [T, K], A [R, K])."""
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rr = tl.arange(0, BLOCK_R)
        t_in = rt < T
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            tk = t_in[:, None] & (rk < K)[None, :]
            x = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_xt + rk[None, :], mask=tk, other=0.0)
            keep = tl.load(m_ptr + rt[:, None].to(tl.int64) * stride_mt + rk[None, :], mask=tk, other=0)
            x = tl.where(keep, x, tl.zeros_like(x))
            a = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None], mask=(rr < R)[None, :] & (rk < K)[:, None],
                        other=0.0)  # [BLOCK_K, BLOCK_R]
            acc = _dot(x, a, acc, IEEE)
        dst = out_ptr + rt[:, None].to(tl.int64) * stride_ot + rr[None, :]
        tl.store(dst, (acc * scale).to(out_ptr.dtype.element_ty), mask=t_in[:, None] & (rr < R)[None, :])

    @triton.jit
    def _masked_up_kernel(g_ptr, a_ptr, m_ptr, x_ptr, dx_ptr, part_ptr, T, K, R, rows_per_chunk, stride_gt,
                          stride_ar, stride_mt, stride_xt, stride_dt, scale, WRITE_DX: tl.constexpr,
                          NEED_DA: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr):
        """One column block of K and one chunk of rows: dX[rows, cols] = scale * (G @ A[:, cols]) * keep (when
        WRITE_DX) and part[chunk, :, cols] = scale * G[rows]^T @ (x * keep)[rows, cols] in fp32 (when NEED_DA; the
        caller reduces the chunks without atomics: deterministic). G [T, R], A [R, K], keep and x [T, K]."""
        rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        chunk = tl.program_id(1)
        rr = tl.arange(0, BLOCK_R)
        k_in = rk < K
        r_in = rr < R
        if WRITE_DX:
            a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :], mask=r_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        t_end = tl.minimum(T, (chunk + 1) * rows_per_chunk)
        for t0 in range(chunk * rows_per_chunk, t_end, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            t_in = rt < t_end
            tk = t_in[:, None] & k_in[None, :]
            g = tl.load(g_ptr + rt[:, None].to(tl.int64) * stride_gt + rr[None, :], mask=t_in[:, None] & r_in[None, :],
                        other=0.0)
            keep = tl.load(m_ptr + rt[:, None].to(tl.int64) * stride_mt + rk[None, :], mask=tk, other=0)
            if NEED_DA:
                x = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_xt + rk[None, :], mask=tk, other=0.0)
                acc = _dot(tl.trans(g), tl.where(keep, x, tl.zeros_like(x)), acc, IEEE)
            if WRITE_DX:
                d = _dot(g, a, tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), IEEE)
                d = tl.where(keep, d * scale, 0.0)
                tl.store(dx_ptr + rt[:, None].to(tl.int64) * stride_dt + rk[None, :], d.to(dx_ptr.dtype.element_ty),
                         mask=tk)
        if NEED_DA:
            dst = part_ptr + (chunk * R + rr[:, None]).to(tl.int64) * K + rk[None, :]
            tl.store(dst, acc * scale, mask=r_in[:, None] & k_in[None, :])


def _gpu_configs():
    """Hopper candidates. In-loop dequantisation costs ALU per W element per M-tile, so tall M tiles (amortising it
    over more MMA work) and the swapped orientation (dequantised tile as the register operand) are in the set; the
    autotuner measures which wins for each shape, format and direction (8 compiles per key, cached on disk)."""
    def cfg(bm, bn, bk, warps, stages, swap=False):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": swap},
                             num_warps=warps, num_stages=stages)
    return [
        cfg(128, 256, 64, 8, 3), cfg(256, 128, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 128, 64, 4, 4),
        cfg(256, 128, 64, 8, 3, True), cfg(128, 128, 64, 4, 4, True), cfg(256, 64, 64, 4, 4, True),
        cfg(128, 64, 128, 4, 3, True),
    ]


# Interpreter tiles: small so CPU tests stay fast (tests flip SWAP_AB to cover both orientations).
INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SWAP_AB": False}
_kernel_cache = {}


def _kernel():
    """(launcher, fixed meta): autotuned on GPU (keyed on the weight shape, format and direction, not on T, so a
    varying token count never re-tunes); fixed tiles in the interpreter."""
    if interpreting():
        return _lora_gemm_kernel, INTERPRETER_META
    if "k" not in _kernel_cache:
        tuned = triton.autotune(_gpu_configs(), key=["N_OUT", "K_RED", "FMT", "TRANS_W", "HAS_LORA", "IEEE"])
        _kernel_cache["k"] = tuned(_lora_gemm_kernel)
    return _kernel_cache["k"], {}


def _group(fmt, nf4_bs, k_w):
    """Scale-group size for the grouped tile read (0: per-byte scale gathers). FASTFT_LORA_GROUPED=0 forces the
    per-byte path (A/B timing)."""
    if fmt == FMT_DENSE or os.environ.get("FASTFT_LORA_GROUPED", "1") == "0":
        return 0
    g = nf4_bs if fmt == FMT_NF4 else 32
    return g if k_w % g == 0 and g >= 2 and (g & (g - 1)) == 0 else 0


_pair_cache = {}


def _nf4_pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256] int64: for byte b, the fp32 bits of code[b >> 4] (bnb's even element) in the low word and of
    code[b & 15] in the high word, so the kernel decodes both nibbles with one 8-byte gather."""
    key = (code.device, code.data_ptr())
    if key not in _pair_cache:
        b = torch.arange(256, device=code.device)
        bits = code.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
        _pair_cache[key] = (code, (bits[b >> 4] & 0xFFFFFFFF) | (bits[b & 15] << 32))  # code pins the address
    return _pair_cache[key][1]


def _weight_fields(weight):
    """(FMT, data, aux, code, nf4_blocksize, out, in) for the kernel, or None when it cannot read this weight.

    A quantized holder keeps its tuple after the first call (``_lora_fields``): it is frozen, and rebuilding the views
    costs ~10 us of host time three times per linear per step (the step is host-bound at short rows)."""
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2 or weight.requires_grad:
            return None  # a trainable base weight needs dW: the reference (autograd) handles it
        return FMT_DENSE, weight, weight, weight, 64, weight.shape[0], weight.shape[1]
    cached = getattr(weight, "_lora_fields", None)
    if cached is not None:
        return cached
    fields = _quantized_fields(weight)
    if fields is not None:
        weight._lora_fields = fields
    return fields


def _quantized_fields(weight):
    if isinstance(weight, MXFP4Tensor):
        if weight.blocks.dim() != 3:
            return None
        n, k = weight.stored_shape
        return FMT_MXFP4, weight.blocks.reshape(n, k // 2), weight.scales.reshape(n, k // 32), weight.scales, 64, n, k
    if type(weight).__name__ == "NF4Tensor" and hasattr(weight, "absmax_fp32"):
        shape = tuple(weight.shape)
        if len(shape) != 2 or shape[1] % 2 or weight.blocksize % 2:
            return None
        code = weight.code.to(device=weight.device, dtype=torch.float32)
        return (FMT_NF4, weight.data.reshape(-1), weight.absmax_fp32(), _nf4_pair_table(code), weight.blocksize,
                shape[0], shape[1])
    return None


def _gemm(a, fields, trans_w, bias=None, p=None, q=None, scaling=0.0, mask=None, inv_keep=1.0, out_dtype=None):
    """a [M, K_RED] times W^T (or W when trans_w) with the fused epilogue; q is indexed as [R, N_OUT]."""
    fmt, w, aux, code, nf4_bs, n_w, k_w = fields
    M = a.shape[0]
    n_out = k_w if trans_w else n_w
    c = torch.empty(M, n_out, device=a.device, dtype=out_dtype or a.dtype)
    R = p.shape[1] if p is not None else 0
    block_r = _block_r(R) if R else 16
    kernel, fixed = _kernel()
    dummy = c
    sw = (w.stride(0), w.stride(1)) if fmt == FMT_DENSE else (0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    kernel[grid](
        a, w, aux, code, bias if bias is not None else dummy, p if p is not None else dummy,
        q if q is not None else dummy, mask if mask is not None else dummy, c,
        M, n_out, a.shape[1], n_w, k_w, R, float(scaling), float(inv_keep),
        a.stride(0), a.stride(1), sw[0], sw[1],
        p.stride(0) if p is not None else 0, p.stride(1) if p is not None else 0,
        q.stride(0) if q is not None else 0, q.stride(1) if q is not None else 0,
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        c.stride(0), c.stride(1),
        FMT=fmt, NF4_BS=nf4_bs, GROUP=_group(fmt, nf4_bs, k_w), TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_LORA=p is not None,
        HAS_MASK=mask is not None, IEEE=_ieee(a), BLOCK_R=block_r, **fixed,
    )
    return c


# ---------------------------------------------------------------------------------------------------------------------
# Slab path (large T): one slab of W at a time is decoded into a reused scratch buffer and consumed by cuBLAS.

# Scratch bound, bytes. Memory math (bf16): q_proj's W is 4096 x 2880 x 2 B = 23.6 MB (22.5 MiB) dense, so 24 MiB
# holds every gpt-oss projection whole: one decode + one cuBLAS GEMM per direction. With 8 MiB (3 slabs for q/o)
# the host issued 4 more launches per q/o call and direction, ~11% of the wall time of a host-bound W1-qv step
# (H200, 4096-token rows: 466 -> 413 ms median); the extra 16 MiB of transient scratch did not move the peak.
SLAB_BYTES = 24 << 20
SLAB_MIN_T = 1024
# Decode tiles. Slabs along ``in`` are cut at multiples of BLOCK_C, so every tile starts on a scale-group boundary
# (the grouped read's precondition) and every slab on a 16-byte-aligned address.
DECODE_META = {"BLOCK_R": 64, "BLOCK_C": 128}
INTERPRETER_DECODE_META = {"BLOCK_R": 16, "BLOCK_C": 64}


def lora_path(num_tokens: int, ws_ok: bool = False) -> str:
    """The path a call over num_tokens rows takes: "fused" (in-loop dequant, reads 4 bits per weight: wins while
    memory-bound), "slabs" (cuBLAS: wins once compute-bound) or, where ``ws_ok`` (a 4-bit weight, bf16, sm_90:
    see _ws_ok), "ws": lora_linear_hopper's GEMM, in-loop dequant into wgmma's register operand, W never densified.
    ws is opt-in (FASTFT_LORA_PATH=ws, or FASTFT_LORA_WS_MIN_T=<tokens>): on the H200 slabs stay faster (WS_MIN_T
    says by how much). FASTFT_LORA_PATH=fused|slabs|ws forces one (A/B
    timing; ws only where it can run, otherwise the choice below); otherwise slabs from FASTFT_LORA_SLAB_MIN_T
    tokens up (default SLAB_MIN_T)."""
    forced = os.environ.get("FASTFT_LORA_PATH", "auto")
    if forced in ("fused", "slabs"):
        return forced
    if forced not in ("auto", "ws"):
        raise ValueError(f"FASTFT_LORA_PATH must be auto, fused, slabs or ws, not {forced!r}")
    ws_min = _ws_min_t()
    if ws_ok and ws_min is not None and num_tokens >= ws_min:
        return "ws"
    return "slabs" if num_tokens >= int(os.environ.get("FASTFT_LORA_SLAB_MIN_T", SLAB_MIN_T)) else "fused"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _slab_len(total: int, other: int, elt: int, quantum: int) -> int:
    """Length of the slabs cutting `total` (each slab spans all of `other`): as few as SLAB_BYTES allows, of
    near-equal length rounded up to `quantum`. When even one quantum exceeds SLAB_BYTES it is used anyway."""
    cap = max(quantum, SLAB_BYTES // (other * elt) // quantum * quantum)
    return min(cap, _cdiv(_cdiv(total, _cdiv(total, cap)), quantum) * quantum)


def _slabs(fields, dtype, along_in: bool):
    """Yields (s0, s1, slab): W[s0:s1, :] as [s1-s0, in] (along_in False) or W[:, s0:s1] as [out, s1-s0] (along_in
    True), row-major in dtype. A dense weight already in dtype comes whole (cuBLAS reads it as it is). Every other
    slab is decoded into the same scratch buffer, so its consumer must be done with it before the next one is
    asked for; it is, since decode and GEMM run in one stream's order."""
    fmt, w, aux, code, nf4_bs, n_w, k_w = fields
    total, other = (k_w, n_w) if along_in else (n_w, k_w)
    if fmt == FMT_DENSE and w.dtype == dtype:
        yield 0, total, w
        return
    meta = INTERPRETER_DECODE_META if interpreting() else DECODE_META
    step = _slab_len(total, other, torch.finfo(dtype).bits // 8, meta["BLOCK_C"])
    scratch = torch.empty(step * other, device=w.device, dtype=dtype)
    sw = (w.stride(0), w.stride(1)) if fmt == FMT_DENSE else (0, 0)
    group = _group(fmt, nf4_bs, k_w)
    for s0 in range(0, total, step):
        s1 = min(total, s0 + step)
        rows, cols = (n_w, s1 - s0) if along_in else (s1 - s0, k_w)
        slab = scratch[: rows * cols].view(rows, cols)
        grid = (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))
        _decode_slab_kernel[grid](
            w, aux, code, slab, 0 if along_in else s0, s0 if along_in else 0, rows, cols, n_w, k_w, sw[0], sw[1],
            slab.stride(0), FMT=fmt, NF4_BS=nf4_bs, GROUP=group, **meta,
        )
        yield s0, s1, slab


def dequantize_slabs(weight, dtype=torch.float32, along_in=False) -> torch.Tensor:
    """The whole [out, in] W assembled from the slab path's slabs (tests: bit-exactness of the slab decode)."""
    fields = _weight_fields(weight)
    n_w, k_w = fields[5], fields[6]
    out = torch.empty(n_w, k_w, device=fields[1].device, dtype=dtype)
    for s0, s1, slab in _slabs(fields, dtype, along_in):
        (out[:, s0:s1] if along_in else out[s0:s1]).copy_(slab)
    return out


def _forward_slabs(x2d, fields, bias, xa, B, scaling):
    """y = x W^T + b + s xa B^T: y starts as the K=r LoRA GEMM (+ b), then each slab of output features adds its
    y[:, n0:n1] += x . Wslab^T in place. A column block of the row-major y is a valid cuBLAS C (ld = out), and torch
    hands it over without a copy (its strides pass addmm's ld checks: stride 1 along columns, out >= block width)."""
    T, n_w = x2d.shape[0], fields[5]
    if xa is not None:
        if bias is not None:
            y = torch.addmm(bias.to(x2d.dtype), xa, B.t(), alpha=scaling)
        else:
            y = torch.empty(T, n_w, device=x2d.device, dtype=x2d.dtype).addmm_(xa, B.t(), beta=0, alpha=scaling)
    elif bias is not None:
        y = bias.to(x2d.dtype).expand(T, n_w).contiguous()
    else:
        y = torch.empty(T, n_w, device=x2d.device, dtype=x2d.dtype)
    beta = 0 if xa is None and bias is None else 1
    for n0, n1, w in _slabs(fields, x2d.dtype, along_in=False):
        y[:, n0:n1].addmm_(x2d, w.t(), beta=beta)
    return y


def _dx_slabs(dy, fields, lora_dx):
    """dX = dY W + lora_dx: starting from the LoRA term [T, in] (or None), per column block of W (all its rows,
    in-features [k0:k1]) dX[:, k0:k1] += dY . Wcols, again into a column block of the row-major dX."""
    T, k_w = dy.shape[0], fields[6]
    dx = lora_dx if lora_dx is not None else torch.empty(T, k_w, device=dy.device, dtype=dy.dtype)
    beta = 0 if lora_dx is None else 1
    for k0, k1, w in _slabs(fields, dy.dtype, along_in=True):
        dx[:, k0:k1].addmm_(dy, w, beta=beta)
    return dx


# ---------------------------------------------------------------------------------------------------------------------
# ws path (sm_90): W decoded inside the GEMM's main loop, never densified. lora_linear_hopper's kernel decodes each
# K step's raw bytes straight into wgmma's register operand (weights as the A side of C^T = W X^T); the LoRA term is
# one more wgmma, the bias and the dropout LoRA dX term are in its epilogue. (moe_hopper's grouped GEMM, decoder
# warps and tiles through shared memory, same results bit for bit, remains behind it for what can_run refuses.)
# Not chosen automatically (None): on the H200 at T=16384 the register-operand kernel runs the forward at 1.05-1.2x
# cuBLAS's bf16 time and dX at 1.1-1.35x (MXFP4 / NF4, per GEMM; scratch, see ANALYSIS.md). Whole projections
# (bench lora_linear, e1ddf85): ws beats bnb + PEFT on every projection in both formats (NF4 q 1.645 ms vs 1.679,
# o 1.639 vs 1.713, k / v 0.288 vs 0.376), yet the slab path (decode, then cuBLAS) stays faster for q and o (1.41 ms
# NF4); ws is faster only for k / v (NF4 0.288 vs 0.31 ms), where the slab decode is a larger share.
WS_MIN_T = None
_ws_tables_cache = {}


def _ws_min_t():
    """Token count from which lora_path takes ws: 0 when FASTFT_LORA_PATH=ws, else FASTFT_LORA_WS_MIN_T or WS_MIN_T;
    None: never."""
    if os.environ.get("FASTFT_LORA_PATH") == "ws":
        return 0
    ws_min = os.environ.get("FASTFT_LORA_WS_MIN_T", WS_MIN_T)
    return None if ws_min is None else int(ws_min)


def _ws_ok(x2d, fields, rank) -> bool:
    """The ws path is asked for (_ws_min_t; checked first: the default call pays no more host time) and its kernel
    reads this call: MXFP4, or NF4 in 64-value blocks that start every row; K of both directions (in, out) in whole
    64-column steps; a rank whose LoRA tiles fit its shared memory."""
    if _ws_min_t() is None:
        return False
    fmt, _, _, _, nf4_bs, n_w, k_w = fields
    return ((fmt == FMT_MXFP4 or (fmt == FMT_NF4 and nf4_bs == 64)) and n_w % moe_hopper.BK == 0
            and moe_hopper.can_run(x2d, x2d, k_w, 256, rank))


def _kept(cache: dict, key, make):
    """cache[key], made by make() the first time. Not kept when made inside a CUDA-graph capture: its kernels run only
    in the graph's replays, so a later eager call would read a tensor nothing has filled."""
    value = cache.get(key)
    if value is None:
        value = make()
        if not torch.cuda.is_current_stream_capturing():
            cache[key] = value
    return value


def _ws_tables(T, bm, device):
    """moe_hopper's routing tables for one expert over T rows: tile starts every bm rows, cached per (T, bm)."""
    def make():
        rows = torch.arange(0, T, bm, device=device, dtype=torch.int32)
        return (None, None, torch.arange(0, 2 * T, T, device=device, dtype=torch.int32),  # offsets [0, T]
                torch.zeros_like(rows), rows)
    return _kept(_ws_tables_cache, (T, bm, device), make)


def _nf4_code(weight):
    """bitsandbytes' 16-value fp32 code on the weight's device, kept on the holder (frozen)."""
    code = getattr(weight, "_lora_code", None)
    if code is None:
        code = weight._lora_code = weight.code.to(device=weight.device, dtype=torch.float32).contiguous()
    return code


def _ws_scales(weight, scales, trans, nf4):
    """lora_linear_hopper.scale_copy of the holder's scales for one orientation, kept on the holder (frozen; per
    orientation 1/32 byte per weight for MXFP4, 1/16 for NF4's fp32 absmax: ~80 MB for both orientations of
    gpt-oss-20b's NF4 attention, on the opt-in ws path only)."""
    if getattr(weight, "_ws_scale_copies", None) is None:
        weight._ws_scale_copies = {}
    return _kept(weight._ws_scale_copies, trans, lambda: lora_linear_hopper.scale_copy(scales, trans, nf4))


def _ws_gemm(a, weight, fields, trans, out, bias=None, lora=None, add_c=False):
    """out = a W^T (forward; or a W with trans) + bias + the LoRA term lora = (L [T, r], factor, 0, s_n, s_r, s) of
    moe_hopper.ws_gemm (+ out itself with add_c); a, out bf16 [T, *] with unit column stride (T = 0: nothing to do)."""
    fmt, w, aux, _, _, n_w, k_w = fields
    T = a.shape[0]
    if T == 0:
        return out
    blocks = w.reshape(n_w, k_w // 2)
    if not tma_aligned(a):  # a rare view: one aligned copy (moe_hopper's cp.async variant for it does not compile,
        a = a.clone(memory_format=torch.contiguous_format)  # triton 3.6)
    if lora_linear_hopper.can_run(a, out, blocks, n_w if trans else k_w, lora[0].shape[1] if lora else 0):
        scales = aux.reshape(n_w, -1)
        return lora_linear_hopper.gemm(a, blocks, scales, trans, out,
                                       nf4_code=_nf4_code(weight) if fmt == FMT_NF4 else None, bias=bias,
                                       lora=(lora[0], lora[1], lora[3], lora[4], lora[5]) if lora else None,
                                       add_c=add_c, scales_laid=_ws_scales(weight, scales, trans, fmt == FMT_NF4))
    bm = 256 if T > 128 else 128
    K, N = (n_w, k_w) if trans else (k_w, n_w)
    return moe_hopper.ws_gemm(a, None, w.reshape(1, -1), aux.reshape(1, -1), trans, K, N, _ws_tables(T, bm, a.device),
                              bm, out, bias=bias, lora=lora, add_c=add_c, linear=True,
                              nf4_code=_nf4_code(weight) if fmt == FMT_NF4 else None)


def _scaled_mm(a, b, alpha):
    """alpha * a @ b with the scale applied inside the GEMM: one launch and one rounding instead of a matmul then a
    scaling pass."""
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=alpha)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _ieee(t: torch.Tensor) -> bool:
    """The kernels' IEEE flag: exact fp32 dots for fp32 inputs, and always in the interpreter."""
    return t.dtype == torch.float32 or interpreting()


def _masked_down(x2d, mask, A, scale):
    """scale * (x * mask) @ A^T, [T, r] in x's dtype: the LoRA input with dropout, mask applied on the fly."""
    T, K = x2d.shape
    x2d, mask, A = x2d.contiguous(), mask.contiguous(), A.contiguous()  # the kernel reads rows with unit stride
    out = torch.empty(T, A.shape[0], device=x2d.device, dtype=x2d.dtype)
    if T == 0:
        return out
    bt, bk = (16, 32) if interpreting() else (32, 128)  # 32 rows: 128 programs at T=4096, each streams its rows once
    _masked_down_kernel[(triton.cdiv(T, bt),)](
        x2d, mask, A, out, T, K, A.shape[0], x2d.stride(0), mask.stride(0), A.stride(0), out.stride(0), float(scale),
        IEEE=_ieee(x2d), BLOCK_T=bt, BLOCK_K=bk, BLOCK_R=_block_r(A.shape[0]),
        num_warps=4)
    return out


def _masked_lora_grads(g, A, mask, x2d, scale, write_dx, need_da=True):
    """(dX LoRA term | None, dA fp32 | None) of the dropout LoRA in one pass over x and the mask: dX = scale * (G A)
    * mask and dA = scale * G^T (x * mask), G = dY B [T, r]. Rows are cut into chunks (~4 programs per SM over the
    column blocks) whose fp32 partial dA are summed by torch afterwards (no atomics: deterministic)."""
    T, K = x2d.shape
    R = A.shape[0]
    if T == 0:
        return (torch.empty_like(x2d) if write_dx else None), (x2d.new_zeros(R, K, dtype=torch.float32)
                                                                if need_da else None)
    g, A, mask, x2d = g.contiguous(), A.contiguous(), mask.contiguous(), x2d.contiguous()
    bt, bk = (16, 32) if interpreting() else (64, 64)
    n_k = triton.cdiv(K, bk)
    chunks = max(1, min(triton.cdiv(T, bt), triton.cdiv(4 * sm_count(x2d.device), n_k)))
    rows = triton.cdiv(triton.cdiv(T, chunks), bt) * bt
    chunks = triton.cdiv(T, rows)
    dx = torch.empty_like(x2d) if write_dx else None
    part = torch.empty(chunks if need_da else 1, R, K, device=x2d.device, dtype=torch.float32)
    _masked_up_kernel[(n_k, chunks)](
        g, A, mask, x2d, dx if write_dx else part, part, T, K, R, rows, g.stride(0), A.stride(0), mask.stride(0),
        x2d.stride(0), dx.stride(0) if write_dx else 0, float(scale), WRITE_DX=write_dx, NEED_DA=need_da,
        IEEE=_ieee(x2d), BLOCK_T=bt, BLOCK_K=bk, BLOCK_R=_block_r(R), num_warps=4)
    return dx, (part.sum(0) if need_da else None)


class LoRALinearFunction(torch.autograd.Function):
    """x2d [T, in]; weight frozen (tensor or 4-bit holder); mask: bool [T, in] dropout keep-mask or None."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, scaling, mask, dropout):
        fields = _weight_fields(weight)
        inv_keep = 1.0 / (1.0 - dropout) if mask is not None else 1.0
        xa = A = B = None
        if lora_A is not None:
            A = lora_A if lora_A.dtype == x2d.dtype else lora_A.to(x2d.dtype)
            B = lora_B if lora_B.dtype == x2d.dtype else lora_B.to(x2d.dtype)
            # [T, r]: tiny, the epilogue adds s * xa B^T
            xa = _scaled_mm(x2d, A.t(), 1.0) if mask is None else _masked_down(x2d, mask, A, inv_keep)
        ctx.path = lora_path(x2d.shape[0], _ws_ok(x2d, fields, A.shape[0] if A is not None else 0))
        if ctx.path == "slabs":
            y = _forward_slabs(x2d, fields, bias, xa, B, scaling)
        elif ctx.path == "ws":
            y = x2d.new_empty(x2d.shape[0], fields[5])
            _ws_gemm(x2d, weight, fields, False, y, bias=bias.to(x2d.dtype) if bias is not None else None,
                     lora=(xa, B, 0, B.stride(0), B.stride(1), scaling) if xa is not None else None)
        else:
            y = _gemm(x2d, fields, False, bias=bias, p=xa, q=B.t() if B is not None else None, scaling=scaling)
        ctx.save_for_backward(x2d if lora_A is not None else None, mask, xa, A, B)
        ctx.weight, ctx.scaling, ctx.inv_keep = weight, scaling, inv_keep
        ctx.lora_dtypes = (lora_A.dtype, lora_B.dtype) if lora_A is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, mask, xa, A, B = ctx.saved_tensors
        s, inv_keep = ctx.scaling, ctx.inv_keep
        need_dx, need_dA = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dy = dy.contiguous()
        g = dy @ B if B is not None else None  # [T, r]
        dx = d_bias = dA = dB = lora_dx = None
        dx_apart = need_dx and ctx.path in ("slabs", "ws")  # the dropout LoRA dX term comes first, the GEMM adds
        if mask is not None and (need_dA or dx_apart):
            lora_dx, dA = _masked_lora_grads(g, A, mask, x2d, s * inv_keep, write_dx=dx_apart, need_da=need_dA)
        if need_dx:
            fields = _weight_fields(ctx.weight)
            if ctx.path == "slabs":
                if g is not None and lora_dx is None:
                    lora_dx = _scaled_mm(g, A, s)
                dx = _dx_slabs(dy, fields, lora_dx)
            elif ctx.path == "ws":
                if lora_dx is not None:
                    dx = _ws_gemm(dy, ctx.weight, fields, True, lora_dx, add_c=True)
                else:
                    dx = _ws_gemm(dy, ctx.weight, fields, True, dy.new_empty(dy.shape[0], fields[6]),
                                  lora=(g, A, 0, A.stride(1), A.stride(0), s) if g is not None else None)
            else:
                dx = _gemm(dy, fields, True, p=g, q=A, scaling=s, mask=mask, inv_keep=inv_keep)
        if ctx.needs_input_grad[2]:
            d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype)  # fp32 accumulation without an fp32 copy of dY
        if need_dA:
            dA = (dA if dA is not None else _scaled_mm(g.t(), x2d, s)).to(ctx.lora_dtypes[0])
        if ctx.needs_input_grad[4]:
            dB = _scaled_mm(dy.t(), xa, s).to(ctx.lora_dtypes[1])
        return dx, None, d_bias, dA, dB, None, None, None


def _kernel_can_run(x, weight) -> bool:
    return triton_runs(x, FLOAT_DTYPES) and _weight_fields(weight) is not None


def lora_linear(x, weight, bias=None, lora_A=None, lora_B=None, scaling=1.0, dropout=0.0, training=False):
    """The contract of fastft.backends: x [..., in] -> [..., out]; falls back to the reference for weights the
    kernel does not read (3-D, trainable, unknown holders) and off-GPU without the interpreter."""
    if not _kernel_can_run(x, weight):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    mask = None
    if lora_A is not None and training and dropout > 0:
        mask = torch.empty_like(x2d, dtype=torch.bool).bernoulli_(1.0 - dropout)
    y = LoRALinearFunction.apply(x2d, weight, bias, lora_A, lora_B, scaling, mask, dropout)
    return y.reshape(*lead, y.shape[-1])
