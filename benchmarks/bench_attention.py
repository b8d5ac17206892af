"""Varlen GPT-OSS attention, forward + backward: fastft's Triton kernel vs torch.compile'd flex_attention.

gpt-oss-20b shapes (64 q heads, 8 kv heads, head_dim 64, bf16, sinks frozen as in fastft; grads for q, k, v), at
T tokens packed from lognormal documents (fixed seed) and as one document, for a full layer and a window-128 layer.
The rival is flex_attention with a document + causal (+ window) BlockMask and sinks applied by LSE renormalisation,
out * sigmoid(lse - sink), which is how transformers runs GPT-OSS on flex; BlockMask creation is not timed.
TFLOP/s counts visible (i, j) pairs only: forward 4 * D FLOPs per pair per head, backward 2.5x the forward.

    python benchmarks/bench_attention.py            # T=16384
    python benchmarks/bench_attention.py --quick    # smoke run (T=4096, packed only)
    python benchmarks/bench_attention.py --sweep    # time tile configs per kernel (prints, records nothing)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_ms  # noqa: E402
from fastft.kernels import attention  # noqa: E402
from fastft.kernels.attention import varlen_attention  # noqa: E402

HQ, HKV, D, WINDOW = 64, 8, 64, 128
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on an H200


def lognormal_lengths(T: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = int(min(T - total, max(16, math.exp(6.5 + 0.8 * torch.randn(1, generator=g).item()))))
        lengths.append(n)
        total += n
    return lengths


def visible_pairs(lengths: list[int], window: int | None) -> int:
    pairs = 0
    for L in lengths:
        if window is None or window >= L:
            pairs += L * (L + 1) // 2
        else:  # first `window` rows are a triangle, the rest see `window` keys each
            pairs += window * (window + 1) // 2 + (L - window) * window
    return pairs


def make_flex(lengths: list[int], window: int | None, T: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    try:
        from torch.nn.attention.flex_attention import AuxRequest
        lse_kwargs = {"return_aux": AuxRequest(lse=True)}
    except ImportError:
        lse_kwargs = {"return_lse": True}

    doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))

    def mask_mod(b, h, qi, kj):
        keep = (doc[qi] == doc[kj]) & (qi >= kj)
        if window is not None:
            keep = keep & (qi - kj < window)
        return keep

    block_mask = create_block_mask(mask_mod, None, None, T, T, device="cuda", _compile=True)

    def attend(q, k, v, sinks):  # q [1, Hq, T, D], k/v [1, Hkv, T, D]
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, **lse_kwargs)
        out, lse = (out[0], out[1].lse) if "return_aux" in lse_kwargs else out
        renorm = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # exp(lse) / (exp(lse) + exp(sink))
        return out * renorm.unsqueeze(-1).to(out.dtype)

    return torch.compile(attend, dynamic=False)


def bench_case(T: int, layer: str, packed: bool, iters: int) -> dict:
    window = WINDOW if layer == "window" else None
    lengths = lognormal_lengths(T) if packed else [T]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    sinks = torch.randn(HQ, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)

    # flex runs in [B, H, T, D]; its inputs are transposed once, outside the timed region
    qf, kf, vf = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
    dof = do.transpose(0, 1).unsqueeze(0).contiguous()
    flex = make_flex(lengths, window, T)

    fast_fwd = lambda: varlen_attention(q, k, v, cu, sinks, window)  # noqa: E731
    flex_fwd = lambda: flex(qf, kf, vf, sinks)  # noqa: E731
    fast_step = lambda: torch.autograd.grad(fast_fwd(), (q, k, v), do)  # noqa: E731
    flex_step = lambda: torch.autograd.grad(flex_fwd(), (qf, kf, vf), dof)  # noqa: E731

    with torch.no_grad():
        ref = flex_fwd()[0].transpose(0, 1).float()
        got = fast_fwd().float()
    rel_err = ((got - ref).norm() / ref.norm()).item()

    fast_ms, flex_ms = time_ms(fast_step, iters=iters), time_ms(flex_step, iters=iters)
    with torch.no_grad():
        fast_fwd_ms, flex_fwd_ms = time_ms(fast_fwd, iters=iters), time_ms(flex_fwd, iters=iters)
    flops_fwd = 4 * D * HQ * visible_pairs(lengths, window)
    return {
        "T": T, "layer": layer, "docs": len(lengths), "window": window,
        "fastft_ms": round(fast_ms, 3), "flex_ms": round(flex_ms, 3), "speedup_vs_flex": round(flex_ms / fast_ms, 3),
        "fastft_tflops": round(3.5 * flops_fwd / fast_ms / 1e9, 1),
        "flex_tflops": round(3.5 * flops_fwd / flex_ms / 1e9, 1),
        "fastft_mfu": round(3.5 * flops_fwd / fast_ms / 1e9 / PEAK_TFLOPS, 3),
        "fastft_fwd_ms": round(fast_fwd_ms, 3), "flex_fwd_ms": round(flex_fwd_ms, 3),
        "fastft_fwd_tflops": round(flops_fwd / fast_fwd_ms / 1e9, 1),
        "fastft_peak_gib": round(extra_peak_gib(fast_step), 3), "flex_peak_gib": round(extra_peak_gib(flex_step), 3),
        "out_rel_err_vs_flex": round(rel_err, 5), "config": {k: list(c) for k, c in attention.GPU_CONFIG.items()},
    }


# (block_m, block_n, num_warps, num_stages); all compile for sm_90 with no register spills (ptxas -v) but dkdv
# (64, 128, 8, 2), which spills 16 bytes
SWEEP = {
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
    "dkdv": [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 3)],
}


def sweep(T: int, iters: int):
    """Vary one kernel's tiles at a time (the others at GPU_CONFIG): fwd timed alone, dq/dkdv as fwd+bwd."""
    import json
    lengths = lognormal_lengths(T)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(HQ, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    best = {}
    for layer, window in (("full", None), ("window", WINDOW)):
        for kernel, candidates in SWEEP.items():
            times = {}
            for cand in candidates:
                config = dict(attention.GPU_CONFIG, **{kernel: cand})
                fwd = lambda: attention._VarlenAttention.apply(q, k, v, cu, sinks, window, D**-0.5, config)  # noqa
                if kernel == "fwd":
                    with torch.no_grad():
                        times[cand] = time_ms(fwd, iters=iters)
                else:
                    times[cand] = time_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), do), iters=iters)
                print(json.dumps({"layer": layer, "kernel": kernel, "config": cand, "ms": round(times[cand], 3)}))
            best[f"{layer}/{kernel}"] = min(times, key=times.get)
    print("best per layer/kernel (block_m, block_n, num_warps, num_stages):", json.dumps(
        {key: list(val) for key, val in best.items()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=4096, packed documents only")
    ap.add_argument("--sweep", action="store_true", help="time tile configs per kernel instead of the rival")
    ap.add_argument("--T", type=int, default=16384)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    if args.sweep:
        return sweep(4096 if args.quick else args.T, 5 if args.quick else 10)
    T = 4096 if args.quick else args.T
    iters = 5 if args.quick else 20
    cases = [(True, "full"), (True, "window")] + ([] if args.quick else [(False, "full"), (False, "window")])
    for packed, layer in cases:
        record("attention", bench_case(T, layer, packed, iters))


if __name__ == "__main__":
    main()
