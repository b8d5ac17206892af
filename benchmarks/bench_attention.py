"""Varlen GPT-OSS attention, forward + backward: fastft's Triton kernel vs torch.compile'd flex_attention.

gpt-oss-20b shapes (64 q heads, 8 kv heads, head_dim 64, bf16, sinks frozen as in fastft; grads for q, k, v), at
T tokens packed from lognormal documents (fixed seed) and as one document, for a full layer and a window-128 layer.
The rival is flex_attention with a document + causal (+ window) BlockMask and sinks applied by LSE renormalisation,
out * sigmoid(lse - sink), which is how transformers runs GPT-OSS on flex; BlockMask creation is not timed.
TFLOP/s counts visible (i, j) pairs only: forward 4 * D FLOPs per pair per head, backward 2.5x the forward.
Forward-only times are taken with grad enabled (a training forward), so flex compiles only its training graph, once
per mask kind; a progress line is printed and each row appended to results.jsonl as soon as it is measured.

    python benchmarks/bench_attention.py            # T=16384
    python benchmarks/bench_attention.py --quick    # smoke run (T=4096, packed only)
    python benchmarks/bench_attention.py --sweep    # time tile configs per kernel (prints, records nothing)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_ms  # noqa: E402
from fastft.kernels import attention  # noqa: E402
from fastft.kernels.attention import varlen_attention  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

try:
    from torch.nn.attention.flex_attention import AuxRequest  # torch >= 2.9; return_lse is deprecated there
except ImportError:
    AuxRequest = None

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


def _flex_attend(q, k, v, sinks, block_mask):  # q [1, Hq, T, D], k/v [1, Hkv, T, D]
    if AuxRequest is not None:
        out, aux = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
    renorm = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # exp(lse) / (exp(lse) + exp(sink))
    return out * renorm.unsqueeze(-1).to(out.dtype)


# One compiled function for every case: the block mask is an argument, so dynamo compiles once per mask_mod (one per
# mask kind) and the packed and single-document cases of a kind reuse it. Every call runs with grad enabled, so no
# second (inference) graph is compiled either.
flex_attend = torch.compile(_flex_attend, dynamic=False)


class FlexMask:
    """Document + causal (+ window) BlockMask for one mask kind; the mask_mod (and so the compiled flex) is reused."""

    def __init__(self, T: int, window: int | None, device: str):
        self.T, self.device = T, device
        self.doc = doc = torch.zeros(T, dtype=torch.int32, device=device)  # document id per token, refilled in place
        if window is None:
            def mask_mod(b, h, qi, kj):
                return (doc[qi] == doc[kj]) & (qi >= kj)
        else:
            def mask_mod(b, h, qi, kj):
                return (doc[qi] == doc[kj]) & (qi >= kj) & (qi - kj < window)
        self.mask_mod = mask_mod

    def block_mask(self, lengths: list[int]):
        ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
        self.doc.copy_(ids)
        # eager, not compiled: a few GiB of T x T temporaries at 16K for well under a second, versus one more compile
        return create_block_mask(self.mask_mod, None, None, self.T, self.T, device=self.device)


def log(t0: float, msg: str):
    print(f"[bench_attention {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def bench_case(T: int, layer: str, packed: bool, iters: int, flex_mask: FlexMask, t0: float,
               device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    window = WINDOW if layer == "window" else None
    lengths = lognormal_lengths(T) if packed else [T]
    name = f"T={T} {layer} {'packed' if packed else 'one document'} ({len(lengths)} docs)"
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(T, HQ, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(T, HKV, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(T, HKV, D, device=device, dtype=dtype, generator=g).requires_grad_()
    sinks = torch.randn(HQ, device=device, dtype=dtype, generator=g)
    do = torch.randn(T, HQ, D, device=device, dtype=dtype, generator=g)

    # flex runs in [B, H, T, D]; its inputs are transposed once, outside the timed region
    qf, kf, vf = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
    dof = do.transpose(0, 1).unsqueeze(0).contiguous()
    block_mask = flex_mask.block_mask(lengths)

    # forwards run with grad enabled (as in training), so timing them reuses the compiled training graph
    fast_fwd = lambda: varlen_attention(q, k, v, cu, sinks, window)  # noqa: E731
    flex_fwd = lambda: flex_attend(qf, kf, vf, sinks, block_mask)  # noqa: E731
    fast_step = lambda: torch.autograd.grad(fast_fwd(), (q, k, v), do)  # noqa: E731
    flex_step = lambda: torch.autograd.grad(flex_fwd(), (qf, kf, vf), dof)  # noqa: E731

    fast_step()
    log(t0, f"{name}: fastft compiled and ran")
    flex_step()
    log(t0, f"{name}: flex compiled (or reused) and ran")
    ref = flex_fwd().detach()[0].transpose(0, 1).float()
    got = fast_fwd().detach().float()
    rel_err = ((got - ref).norm() / ref.norm()).item()

    fast_ms, flex_ms = time_ms(fast_step, warmup=2, iters=iters), time_ms(flex_step, warmup=2, iters=iters)
    fast_fwd_ms, flex_fwd_ms = time_ms(fast_fwd, warmup=2, iters=iters), time_ms(flex_fwd, warmup=2, iters=iters)
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
        "out_rel_err_vs_flex": round(rel_err, 5), "config": {k: list(c) for k, c in attention.GPU_CONFIG[layer].items()},
    }


# (block_m, block_n, num_warps, num_stages) candidates per kernel, tried for each layer kind; a candidate that fails
# to compile (or spills into an error) is reported and skipped
SWEEP = {
    "fwd": [(128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 2, 3), (32, 32, 2, 3),
            (32, 64, 4, 3), (64, 16, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 2, 3), (32, 32, 2, 3), (32, 64, 4, 3),
           (64, 16, 4, 3), (64, 32, 4, 4)],
    "dkdv": [(32, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3), (32, 64, 4, 3), (16, 32, 2, 3), (16, 64, 2, 3),
             (32, 32, 2, 3), (16, 32, 4, 3), (64, 64, 4, 4), (32, 64, 4, 4)],
}


def sweep(T: int, iters: int, layers=("full", "window")):
    """Vary one kernel's tiles at a time (the others at the layer's GPU_CONFIG): fwd timed alone, dq/dkdv as
    fwd+bwd; then time the per-kernel winners together against the current config."""
    import json
    lengths = lognormal_lengths(T)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(HQ, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    best = {}
    for layer in layers:
        window = WINDOW if layer == "window" else None
        current = attention.GPU_CONFIG[layer]

        def step_ms(config, fwd_only=False):
            fwd = lambda: attention._VarlenAttention.apply(q, k, v, cu, sinks, window, D**-0.5, config)  # noqa
            if fwd_only:
                with torch.no_grad():
                    return time_ms(fwd, iters=iters)
            return time_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), do), iters=iters)

        winners = {}
        for kernel, candidates in SWEEP.items():
            times = {}
            for cand in candidates:
                try:
                    times[cand] = step_ms(dict(current, **{kernel: cand}), fwd_only=kernel == "fwd")
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is skipped, not fatal
                    print(json.dumps({"layer": layer, "kernel": kernel, "config": cand, "error": repr(e)[:200]}))
                    continue
                print(json.dumps({"layer": layer, "kernel": kernel, "config": cand, "ms": round(times[cand], 3)}))
            winners[kernel] = min(times, key=times.get)
        combined = dict(current, **winners)
        best[layer] = {kern: list(c) for kern, c in combined.items()}
        print(json.dumps({"layer": layer, "current": {kk: list(c) for kk, c in current.items()},
                          "current_ms": round(step_ms(current), 3), "best": best[layer],
                          "best_ms": round(step_ms(combined), 3)}))
    print("best per layer (block_m, block_n, num_warps, num_stages):", json.dumps(best))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=4096, packed documents only")
    ap.add_argument("--sweep", action="store_true", help="time tile configs per kernel instead of the rival")
    ap.add_argument("--T", type=int, default=16384)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    sys.stdout.reconfigure(line_buffering=True)  # rows show up as they are recorded, even under a pipe + timeout
    if args.sweep:
        return sweep(4096 if args.quick else args.T, 5 if args.quick else 10)
    t0 = time.perf_counter()
    T = 4096 if args.quick else args.T
    iters = 5 if args.quick else 10
    # grouped by mask kind, so each kind's flex compile is paid once; each row is appended as soon as it is measured
    for layer in ("full", "window"):
        flex_mask = FlexMask(T, WINDOW if layer == "window" else None, "cuda")
        for packed in (True,) if args.quick else (True, False):
            record("attention", bench_case(T, layer, packed, iters, flex_mask, t0))
    log(t0, "done")


if __name__ == "__main__":
    main()
