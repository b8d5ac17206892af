"""RMSNorm and RoPE forward + backward at gpt-oss-20b's shapes: fastft's Triton kernels against the torch code they
replace (the lean row-block RMSNorm and the chunk/mul/cat rope of fastft.kernels.*_reference), one row per op and T.

    python benchmarks/bench_norm_rope.py           # T = 4096, 16384 (well under a minute on an H200)
    python benchmarks/bench_norm_rope.py --quick   # smoke run: T = 4096, few iterations, printed, not recorded

Ops: rms_norm (x [T, 2880] bf16, fp32 weight without grad, as in LoRA training), rope_q (x [T, 64, 64] bf16) and
rope_k (x [T, 8, 64] bf16), both with bf16 cos/sin [T, 32]. Timed: forward alone (with autograd on, as a training
forward runs) and forward + backward. gbps_fastft is the bytes the fused passes must move (rms_norm: x, y; x, dy, dx;
rope: x, out; dy, dx; 2 bytes each) over fastft's fwd+bwd time.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_ms  # noqa: E402
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from fastft.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402

H, HEAD_DIM, Q_HEADS, KV_HEADS, EPS = 2880, 64, 64, 8, 1e-5


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _measure(fn, x, dy, warmup, iters):
    """(fwd ms, fwd+bwd ms, extra GiB of fwd+bwd above inputs and the returned dx, output, dx)."""
    def fwd():
        return fn(x)

    def step():
        x.grad = None
        fn(x).backward(dy)

    fwd_ms = time_ms(fwd, warmup=warmup, iters=iters)
    ms = time_ms(step, warmup=warmup, iters=iters)
    x.grad = None
    gib = extra_peak_gib(step) - x.numel() * x.element_size() / 2**30
    out = fn(x).detach()
    x.grad = None
    fn(x).backward(dy)
    dx = x.grad
    x.grad = None
    return fwd_ms, ms, gib, out, dx


def _cases(T, gen):
    """(op, elements, fastft fn, torch fn, x, dy) per op at T tokens."""
    x = torch.randn(T, H, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = 1 + 0.1 * torch.randn(H, device="cuda", generator=gen)  # fp32, frozen
    yield ("rms_norm", T * H, lambda t: rms_norm(t, w, EPS), lambda t: rms_norm_reference(t, w, EPS),
           x, torch.randn(T, H, device="cuda", generator=gen).bfloat16())
    pos = torch.arange(T, device="cuda").float()[:, None]
    freqs = pos * 150000.0 ** (-torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
    for op, heads in (("rope_q", Q_HEADS), ("rope_k", KV_HEADS)):
        proj = torch.randn(T, heads * HEAD_DIM, device="cuda", generator=gen).bfloat16().requires_grad_()
        # the model passes a view of the projection output: time the op on that view
        yield (op, T * heads * HEAD_DIM,
               lambda t, h=heads: apply_rope(t.view(T, h, HEAD_DIM), cos, sin),
               lambda t, h=heads: apply_rope_reference(t.view(T, h, HEAD_DIM), cos, sin),
               proj, torch.randn(T, heads, HEAD_DIM, device="cuda", generator=gen).bfloat16())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run at T=4096, printed, not recorded")
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_norm_rope needs a CUDA GPU")
    tokens = args.tokens or ([4096] if args.quick else [4096, 16384])
    warmup, iters = (2, 5) if args.quick else (10, 50)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for T in tokens:
        for op, elems, ours_fn, ref_fn, x, dy in _cases(T, gen):
            ours = _measure(ours_fn, x, dy, warmup, iters)
            ref = _measure(ref_fn, x, dy, warmup, iters)
            moved = elems * 2 * (5 if op == "rms_norm" else 4)  # bytes of the fused fwd + bwd passes
            metrics = {
                "op": op, "T": T, "dtype": "bf16", "shape": list(dy.shape),
                "fastft_ms": round(ours[1], 4), "torch_ms": round(ref[1], 4),
                "speedup_vs_torch": round(ref[1] / ours[1], 3),
                "fastft_fwd_ms": round(ours[0], 4), "torch_fwd_ms": round(ref[0], 4),
                "fwd_speedup_vs_torch": round(ref[0] / ours[0], 3),
                "fastft_extra_gib": round(ours[2], 4), "torch_extra_gib": round(ref[2], 4),
                "gbps_fastft": round(moved / ours[1] / 1e6, 1),
                "out_rel_diff_vs_torch": _rel(ours[3], ref[3]), "dx_rel_diff_vs_torch": _rel(ours[4], ref[4]),
            }
            if args.quick:
                print(metrics, flush=True)
            else:
                record("norm_rope", metrics)
            del x, dy
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
