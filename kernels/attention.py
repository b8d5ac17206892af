"""Varlen attention for GPT-OSS: packed documents, attention sinks, sliding window, GQA (forward and backward).

Layout: q [T, Hq, D], k/v [T, Hkv, D] over the packed tokens; ``cu_seqlens`` int32 [B+1] marks the documents.
Query i of a document sees key j iff ``lo_i <= j <= i`` with ``lo_i = max(doc_start(i), i - W + 1)`` (W = window,
or unbounded). That single lower bound per row carries causality, document isolation and the sliding window, so the
kernels tile the packed token axis directly (blocks may straddle documents) and need only two int32 [T] tables,
doc_start and doc_end, built on the device with torch ops: no host synchronisation, CUDA-graph safe, and hundreds of
tiny documents cost no more than one long one.

Each program loops only over the key (or query) blocks that its rows can see; only blocks on the diagonal or at the
low edge (document start / window edge) pay for the mask, decided per block at run time (one loop body keeps
register pressure down). A window layer therefore costs O(T * W) and a full layer O(sum of L^2 / 2).

Softmax is online (FlashAttention-2) in base 2: scores are pre-multiplied by scale * log2(e). The sink joins the
denominator by starting each row with max = sink * log2(e) and sum = 1, i.e. exp2(sink2 - m) carried like any key
with no value. Forward stores LSE2 = m + log2(l) (fp32, [Hq, T], log2 units, sink included) for the backward.

GQA head packing (the ``heads`` field of a tile config): the rows of a query tile are (token, head) pairs,
r = token * PACK + head, for PACK query heads that share one kv head, so a BLOCK_M-row tile covers BLOCK_M / PACK
tokens. Each K/V block is then loaded once for PACK heads, and the masked-out work at diagonals, window edges and
document edges shrinks to BLOCK_M / PACK tokens. With q contiguous the PACK heads of a token are one PACK * D run,
so the tile load stays coalesced. PACK = 1 is the per-head tiling. Masks, lo_i and the block walk work per token,
sinks and the [Hq, T] LSE / delta rows per head.

Memory (T tokens, Hq heads): forward saves O plus LSE (4 * Hq * T bytes); backward adds delta (4 * Hq * T bytes)
and dq/dk/dv. Nothing is O(T^2).

Backward, FlashAttention-2 style, two kernels: (1) dQ over query tiles, each program first computing
delta = rowsum(dO * O) for its rows (stored for (2); no separate delta pass); (2) dK/dV over key blocks, each program
walking the query tiles of the Hq / Hkv heads of its kv head (PACK at a time) so GQA needs no atomics.
dsinks, when asked for, is -sum_i P_sink(i, h) * delta(i, h), a cheap torch reduction over [Hq, T].
"""

from __future__ import annotations

import math

import torch

from fastft.tensor_memo import TensorMemo

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch backend still works
    triton = None

LOG2E = 1.4426950408889634


def varlen_attention_reference(q, k, v, cu_seqlens, sinks=None, window=None, softmax_scale=None):
    """HF-eager GPT-OSS attention over packed documents; materialises [Hq, L, L] per document (tests, CPU)."""
    T, Hq, D = q.shape
    groups = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    bounds = cu_seqlens.tolist()
    # upcast once: a per-document .float() would sum d sinks over the documents in the sinks' dtype (bf16: ~3%
    # error over hundreds of documents)
    sinks32 = sinks.float() if sinks is not None else None
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        L = end - start
        if L == 0:
            continue
        qd = q[start:end].transpose(0, 1).float()  # [Hq, L, D]
        kd = k[start:end].transpose(0, 1).float().repeat_interleave(groups, 0)
        vd = v[start:end].transpose(0, 1).float().repeat_interleave(groups, 0)
        scores = (qd @ kd.transpose(1, 2)) * scale
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        visible = j <= i
        if window is not None:
            visible &= (i - j) < window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks32.view(Hq, 1, 1).expand(Hq, L, 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :L]
        outs.append((probs @ vd).transpose(0, 1).to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)


if triton is not None:

    @triton.jit
    def _tile_rows(BLOCK_M: tl.constexpr, PACK: tl.constexpr):
        """Rows of a query tile are (token, head) pairs, r = token * PACK + head: BLOCK_M // PACK tokens of PACK
        heads. Returns each row's token offset, head offset, and whether the row is used (PACK need not divide
        BLOCK_M: a group of 3 heads in 16 rows leaves the last row idle)."""
        r = tl.arange(0, BLOCK_M)
        if PACK == 1:  # one head per tile: the index math of per-head tiles, nothing to divide
            tok, hoff = r, r * 0
        else:
            tok, hoff = r // PACK, r % PACK
        return tok, hoff, r < (BLOCK_M // PACK) * PACK

    @triton.jit
    def _row_offsets(tok, hoff, offs_d, stride_t, stride_h):
        """Element offsets of a query tile's rows (token offset tok, head offset hoff) x head dims offs_d, relative to
        the tile's first token and head."""
        return (tok * stride_t + hoff * stride_h)[:, None] + offs_d[None, :]

    @triton.jit
    def _query_tile(T, GROUPS: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr):
        """The query tile of this program (forward and dq): its first head h0 (PACK heads of kv head kvh), first token
        m0, and per row the token and head offsets, the token itself and whether the row is live. Heads vary fastest
        (program axis 0); tiles run last-first (axis 1), since late tokens see the most keys."""
        h0 = tl.program_id(0) * PACK
        m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * (BLOCK_M // PACK)
        tok, hoff, used = _tile_rows(BLOCK_M, PACK)
        offs_m = m0 + tok
        return h0, m0, h0 // GROUPS, tok, hoff, offs_m, used & (offs_m < T)

    @triton.jit
    def _key_walk(DOC_START, offs_m, row_ok, m0, T, window, TOK: tl.constexpr, BLOCK_N: tl.constexpr):
        """Per-row lower bound lo_i, the key range [k_start, k_end) of the query tile holding tokens m0 .. m0+TOK-1
        (offs_m: each row's token), and the tile's unmasked run."""
        last = tl.minimum(m0 + TOK, T) - 1
        lo = tl.maximum(tl.load(DOC_START + offs_m, mask=row_ok, other=0), offs_m - window + 1)
        k_start = tl.maximum(tl.load(DOC_START + m0), m0 - window + 1)  # lo grows with the token
        lo_last = tl.maximum(tl.load(DOC_START + last), last - window + 1)
        # key blocks on the grid k_start + t * BLOCK_N skip the mask in [n_full_lo, n_full_hi): every row sees them
        n_full_lo = k_start + tl.cdiv(lo_last - k_start, BLOCK_N) * BLOCK_N
        n_full_hi = n_full_lo + tl.maximum(m0 + 1 - n_full_lo, 0) // BLOCK_N * BLOCK_N
        return lo, k_start, last + 1, n_full_lo, n_full_hi

    @triton.jit
    def _kv_block(kb, vb, offs_n, offs_nb, offs_d, stride_kt, stride_vt, T, HEAD_DIM: tl.constexpr):
        """One [BLOCK_N, D] block of K and V from the block bases kb / vb (rows past T read as 0)."""
        kv_mask = (offs_n < T)[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(kb + offs_nb[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vb + offs_nb[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def _fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, lo, offs_nb, offs_d,
                  n_begin, n_end, n_full_lo, n_full_hi, T, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
        # int64 block bases advanced per step: token * stride overflows int32 past ~500K tokens
        kb = k_ptr + n_begin.to(tl.int64) * stride_kt
        vb = v_ptr + n_begin.to(tl.int64) * stride_vt
        for n in range(n_begin, n_end, BLOCK_N):
            offs_n = n + offs_nb
            k, v = _kv_block(kb, vb, offs_n, offs_nb, offs_d, stride_kt, stride_vt, T, HEAD_DIM)
            kb += BLOCK_N * stride_kt
            vb += BLOCK_N * stride_vt
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if (n < n_full_lo) | (n >= n_full_hi):  # only blocks on a diagonal or a low edge pay for the mask
                visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= lo[:, None])
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, SINKS, DOC_START, T, window, qk_scale,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                  GROUPS: tl.constexpr, PACK: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        # a program owns PACK heads (of one kv head) x TOK tokens; with PACK < Hq/Hkv the programs sharing a kv head
        # run together (heads vary fastest), so K/V stay in L2
        TOK: tl.constexpr = BLOCK_M // PACK
        h0, m0, kvh, tok, hoff, offs_m, row_ok = _query_tile(T, GROUPS, PACK, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_nb = tl.arange(0, BLOCK_N)
        lo, k_start, k_end, n_full_lo, n_full_hi = _key_walk(DOC_START, offs_m, row_ok, m0, T, window, TOK, BLOCK_N)

        io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        # with q contiguous, the PACK heads of one token are one PACK * D run: the packed load stays coalesced
        q_rows = _row_offsets(tok, hoff, offs_d, stride_qt, stride_qh)
        q = tl.load(Q + m0.to(tl.int64) * stride_qt + h0 * stride_qh + q_rows, mask=io_mask, other=0.0)
        if HAS_SINKS:
            m_i = tl.load(SINKS + h0 + hoff).to(tl.float32) * 1.4426950408889634
            l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
        else:
            # finite, so a row whose first visited block is fully masked keeps alpha = exp2(0) instead of NaN
            m_i = tl.zeros([BLOCK_M], tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K + kvh * stride_kh, V + kvh * stride_vh, stride_kt, stride_vt,
                                  offs_m, lo, offs_nb, offs_d, k_start, k_end, n_full_lo, n_full_hi, T, qk_scale,
                                  BLOCK_N, HEAD_DIM, DOT_PREC)
        l_safe = tl.where(row_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_rows = _row_offsets(tok, hoff, offs_d, stride_ot, stride_oh)
        tl.store(O + m0.to(tl.int64) * stride_ot + h0 * stride_oh + o_rows, out.to(O.dtype.element_ty), mask=io_mask)
        # LSE is [Hq, T]; hoff * T stays in int32 for T < 2^31 / PACK
        tl.store(LSE + h0.to(tl.int64) * T + hoff * T + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)

    @triton.jit
    def _dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, lo, offs_nb, offs_d,
                 n_begin, n_end, n_full_lo, n_full_hi, T, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
        # int64 block bases advanced per step: token * stride overflows int32 past ~500K tokens
        kb = k_ptr + n_begin.to(tl.int64) * stride_kt
        vb = v_ptr + n_begin.to(tl.int64) * stride_vt
        for n in range(n_begin, n_end, BLOCK_N):
            offs_n = n + offs_nb
            k, v = _kv_block(kb, vb, offs_n, offs_nb, offs_d, stride_kt, stride_vt, T, HEAD_DIM)
            kb += BLOCK_N * stride_kt
            vb += BLOCK_N * stride_vt
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if (n < n_full_lo) | (n >= n_full_hi):
                visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= lo[:, None])
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, DOC_START, T, window, qk_scale, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     stride_dot, stride_doh, stride_dqt, stride_dqh,
                     GROUPS: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        # same tiles and block walk as the forward; runs first and also computes delta = rowsum(dO * O) for its
        # rows, stored for the dK/dV kernel (every row of every head lies in exactly one tile)
        TOK: tl.constexpr = BLOCK_M // PACK
        h0, m0, kvh, tok, hoff, offs_m, row_ok = _query_tile(T, GROUPS, PACK, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_nb = tl.arange(0, BLOCK_N)
        lo, k_start, k_end, n_full_lo, n_full_hi = _key_walk(DOC_START, offs_m, row_ok, m0, T, window, TOK, BLOCK_N)

        io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q_rows = _row_offsets(tok, hoff, offs_d, stride_qt, stride_qh)
        do_rows = _row_offsets(tok, hoff, offs_d, stride_dot, stride_doh)
        q = tl.load(Q + m0.to(tl.int64) * stride_qt + h0 * stride_qh + q_rows, mask=io_mask, other=0.0)
        do = tl.load(DO + m0.to(tl.int64) * stride_dot + h0 * stride_doh + do_rows, mask=io_mask, other=0.0)
        o_rows = _row_offsets(tok, hoff, offs_d, stride_ot, stride_oh)
        o = tl.load(O + m0.to(tl.int64) * stride_ot + h0 * stride_oh + o_rows, mask=io_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        stat_rows = h0.to(tl.int64) * T + hoff * T + offs_m
        tl.store(DELTA + stat_rows, delta, mask=row_ok)
        lse = tl.load(LSE + stat_rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _dq_loop(dq, q, do, lse, delta, K + kvh * stride_kh, V + kvh * stride_vh, stride_kt, stride_vt, offs_m,
                      lo, offs_nb, offs_d, k_start, k_end, n_full_lo, n_full_hi, T, qk_scale,
                      BLOCK_N, HEAD_DIM, DOT_PREC)
        dq_rows = _row_offsets(tok, hoff, offs_d, stride_dqt, stride_dqh)
        tl.store(DQ + m0.to(tl.int64) * stride_dqt + h0 * stride_dqh + dq_rows,
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)

    @triton.jit
    def _dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, doc_start_ptr, stride_qt, stride_dot,
                   q_rows, do_rows, stat_rows, tok, used, offs_n, offs_d, m_begin, m_end, m_full_lo, m_full_hi,
                   T, window, qk_scale, TOK: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
        # transposed tiles ([keys, query rows]) so dk/dv accumulate without transposing them; a query tile is TOK
        # tokens x PACK heads, its rows addressed by q_rows / do_rows / stat_rows from the tile's first token
        qb = q_ptr + m_begin.to(tl.int64) * stride_qt
        dob = do_ptr + m_begin.to(tl.int64) * stride_dot
        for m in range(m_begin, m_end, TOK):
            offs_m = m + tok
            row_ok = used & (offs_m < T)
            io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(qb + q_rows, mask=io_mask, other=0.0)
            do = tl.load(dob + do_rows, mask=io_mask, other=0.0)
            qb += TOK * stride_qt
            dob += TOK * stride_dot
            # rows past T (or idle) get lse = +inf, so their probabilities vanish without a mask
            lse = tl.load(lse_ptr + stat_rows + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + stat_rows + offs_m, mask=row_ok, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            pT = tl.math.exp2(sT - lse[None, :])
            if (m < m_full_lo) | (m >= m_full_hi):
                lo = tl.maximum(tl.load(doc_start_ptr + offs_m, mask=row_ok, other=0), offs_m - window + 1)
                visible = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] >= lo[None, :])
                pT = tl.where(visible, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DOC_START, DOC_END, T, window, qk_scale, sm_scale,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                       GROUPS: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        # a program owns one key block of one kv head and walks the query tiles of its GROUPS heads, PACK heads per
        # tile (GROUPS / PACK passes), so GQA needs no atomics
        TOK: tl.constexpr = BLOCK_M // PACK
        kvh = tl.program_id(0)
        n0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        key_ok = offs_n < T
        kv_mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        cols = tl.arange(0, BLOCK_N)[:, None]
        k = tl.load(K + n0.to(tl.int64) * stride_kt + kvh * stride_kh + cols * stride_kt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + n0.to(tl.int64) * stride_vt + kvh * stride_vh + cols * stride_vt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        # queries that see key j: j <= i < min(doc_end(j), j + W); both bounds grow with j
        j_last = tl.minimum(n0 + BLOCK_N, T) - 1
        q_hi = tl.minimum(tl.load(DOC_END + j_last), j_last + window)
        q_full_hi = tl.minimum(tl.load(DOC_END + n0), n0 + window)  # tokens below it see every key >= n0
        # query tiles on the grid n0 + t * TOK skip the mask once past the diagonal and before q_full_hi
        m_full_lo = n0 + tl.cdiv(BLOCK_N - 1, TOK) * TOK
        m_full_hi = n0 + (q_full_hi - n0) // TOK * TOK
        tok, hoff, used = _tile_rows(BLOCK_M, PACK)
        q_rows = _row_offsets(tok, hoff, offs_d, stride_qt, stride_qh)
        do_rows = _row_offsets(tok, hoff, offs_d, stride_dot, stride_doh)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g0 in range(0, GROUPS, PACK):
            h0 = kvh * GROUPS + g0
            dk, dv = _dkdv_loop(dk, dv, k, v, Q + h0 * stride_qh, DO + h0 * stride_doh, LSE + h0.to(tl.int64) * T,
                                DELTA + h0.to(tl.int64) * T, DOC_START, stride_qt, stride_dot, q_rows, do_rows,
                                hoff * T, tok, used, offs_n, offs_d, n0, q_hi, m_full_lo, m_full_hi, T, window,
                                qk_scale, TOK, HEAD_DIM, DOT_PREC)
        tl.store(DK + n0.to(tl.int64) * stride_dkt + kvh * stride_dkh + cols * stride_dkt + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + n0.to(tl.int64) * stride_dvt + kvh * stride_dvh + cols * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


# Tile configs per layer kind and kernel on a GPU: (block_m, block_n, num_warps, num_stages[, heads]). block_m counts
# query-tile rows; heads (default 1) packs that many query heads of one kv head into a tile's rows, r = token * heads
# + head, so a tile covers block_m // heads tokens: every K/V block is loaded once for all of them (heads x less K/V
# traffic) and the masked-out waste at diagonals, window and document edges shrinks to block_m // heads tokens.
# heads is capped at the largest divisor of Hq / Hkv not above it or block_m (a group of 3 packs 3 heads into 16 rows
# and leaves a row idle; Hq == Hkv runs per-head tiles). A full layer is compute-bound (big tiles), a window layer
# visits only ~W / block keys per row, so its tiles trade MMA size for less masked-out work and more programs in
# flight. Each compiles for sm_90 at D=64 without register spills (ptxas -v); `benchmarks/bench_attention.py --sweep`
# times the alternatives, packed and not. Small tiles in the interpreter keep CPU tests fast and cross many edges.
GPU_CONFIG = {
    "full": {"fwd": (128, 64, 8, 3, 8), "dq": (64, 32, 4, 3, 1), "dkdv": (64, 64, 4, 3, 1)},
    "window": {"fwd": (64, 32, 4, 3, 8), "dq": (64, 32, 4, 3, 8), "dkdv": (64, 64, 4, 3, 8)},
}
INTERPRET_CONFIG = {"fwd": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 1), "dkdv": (16, 16, 1, 1, 1)}


def _config(device: torch.device, window) -> dict:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    return GPU_CONFIG["full" if window is None else "window"]


def _tiles(tile, groups: int):
    """(block_m, block_n, num_warps, num_stages, pack) for a launch: pack = heads actually packed per tile."""
    bm, bn, warps, stages = tile[:4]
    want = max(1, min(tile[4] if len(tile) > 4 else 1, groups, bm))
    pack = max(p for p in range(1, want + 1) if groups % p == 0)
    return bm, bn, warps, stages, pack


def _doc_tables(cu_seqlens: torch.Tensor, T: int):
    """doc_start[t], doc_end[t] (int32 [T]) of the document holding token t, with device ops only; built once per
    cu_seqlens tensor (every layer of a step passes the same one, forward and recompute)."""
    return _DOC_TABLES.get(cu_seqlens, (T, cu_seqlens.device), lambda: _build_doc_tables(cu_seqlens, T))


_DOC_TABLES = TensorMemo()


def _build_doc_tables(cu_seqlens: torch.Tensor, T: int):
    cu = cu_seqlens.to(torch.int32)
    tok = torch.arange(T, device=cu.device, dtype=torch.int32)
    # right=True skips empty documents (repeated boundaries): a token belongs to the last doc starting at or before it
    idx = (torch.searchsorted(cu, tok, right=True) - 1).clamp_(0, cu.numel() - 2)
    return cu[idx].contiguous(), cu[idx + 1].contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests) ask for exact products; bf16/fp16 tensor-core dots ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, sinks, window, softmax_scale, config):
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        doc_start, doc_end = _doc_tables(cu_seqlens, T)
        win = T if window is None else min(int(window), T)  # unbounded window == T keeps int32 math in range
        block_d = max(16, triton.next_power_of_2(D))
        o = torch.empty_like(q)
        lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
        bm, bn, warps, stages, pack = _tiles(config["fwd"], Hq // Hkv)
        qk_scale = softmax_scale * LOG2E
        if T > 0:
            _attn_fwd[(Hq // pack, triton.cdiv(T, bm // pack))](
                q, k, v, o, lse, sinks if sinks is not None else lse, doc_start, T, win, qk_scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
                GROUPS=Hq // Hkv, PACK=pack, HAS_SINKS=sinks is not None, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm,
                BLOCK_N=bn, DOT_PREC=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end, sinks)
        ctx.meta = (win, softmax_scale, config, sinks is not None)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_start, doc_end, sinks = ctx.saved_tensors
        win, softmax_scale, config, has_sinks = ctx.meta
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        do = do.contiguous() if do.stride(-1) != 1 else do
        block_d = max(16, triton.next_power_of_2(D))
        prec = _dot_precision(q.dtype)
        qk_scale = softmax_scale * LOG2E
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
        if T > 0:
            bm, bn, warps, stages, pack = _tiles(config["dq"], Hq // Hkv)
            _attn_bwd_dq[(Hq // pack, triton.cdiv(T, bm // pack))](
                q, k, v, o, do, dq, lse, delta, doc_start, T, win, qk_scale, softmax_scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                GROUPS=Hq // Hkv, PACK=pack, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
                num_warps=warps, num_stages=stages)
            bm, bn, warps, stages, pack = _tiles(config["dkdv"], Hq // Hkv)
            _attn_bwd_dkdv[(Hkv, triton.cdiv(T, bn))](
                q, k, v, do, dk, dv, lse, delta, doc_start, doc_end, T, win, qk_scale, softmax_scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                GROUPS=Hq // Hkv, PACK=pack, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
                num_warps=warps, num_stages=stages)
        dsinks = None
        if has_sinks and ctx.needs_input_grad[4]:
            # d sink_h = -sum_i P_sink(i, h) * delta(i, h), with P_sink = exp2(sink * log2e - lse2); lse and delta
            # are fp32, so the products and the long sum over T are fp32 too; only the result takes sinks' dtype
            p_sink = torch.exp2(sinks.float()[:, None] * LOG2E - lse)
            dsinks = (-(p_sink * delta).sum(1)).to(sinks.dtype)
        return dq, dk, dv, None, dsinks, None, None, None


def varlen_attention(q, k, v, cu_seqlens, sinks=None, window=None, softmax_scale=None):
    """GPT-OSS attention over packed documents (Triton); same contract as ``varlen_attention_reference``.

    q [T, Hq, D], k/v [T, Hkv, D] (query head h reads kv head h // (Hq // Hkv)), cu_seqlens int32 [B+1] with
    cu_seqlens[0] == 0 and cu_seqlens[-1] == T, sinks [Hq] or None, window W >= 1 or None. Differentiable in q, k, v
    and sinks. Runs without host synchronisation.
    """
    if triton is None:
        raise ImportError("varlen_attention needs triton")
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, not {window}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if sinks is not None:
        sinks = sinks.contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, sinks, window, scale, _config(q.device, window))
