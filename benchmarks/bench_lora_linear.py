"""lora_linear fwd+bwd at gpt-oss attention shapes: fastft (auto, fused and slab paths) vs stock QLoRA and bf16.

Rivals, measured in the same invocation, same x / dy / adapters (bf16, rank --rank, with bias as gpt-oss has):
  bnb_peft: bitsandbytes.matmul_4bit over its NF4 weight + PEFT's two LoRA matmuls (what bnb Linear4bit wrapped by
            peft's LoRA runs);  bf16: cuBLAS F.linear over a bf16 weight + the same LoRA matmuls.
fastft is timed four ways: auto (fastft_ms: what users get; `path` says which path it chose at this T), and each
path forced through FASTFT_LORA_PATH (fastft_fused_ms, fastft_slabs_ms, fastft_ws_ms: the warp-specialised in-loop
decode GEMM, sm_90 only, null elsewhere). rel_err_* is the worst of them against an fp32 reference over the same
dequantised weight. One row per T x projection x fastft weight format.

Timing (`timing` column): every contender's step is captured once in a CUDA graph and its replays are timed
("cuda_graph": GPU time); the k/v steps (~0.3 ms of kernels at T=16384) are host-bound when launched eagerly, so
eager timing ranks the implementations' Python dispatch rather than their GPU work (METHOD.md). The eager medians
stay in *_eager_ms. If any contender fails to capture, the row falls back to eager times ("eager"). Usage:
  python benchmarks/bench_lora_linear.py [--quick] [--T 4096,16384] [--shapes q,k,v,o] [--rank 16] [--slab-mib 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_graph_ms, time_ms  # noqa: E402
import fastft.kernels.lora_linear as lora_mod  # noqa: E402
from fastft.kernels.lora_linear import lora_linear, lora_path  # noqa: E402
from fastft.quant import quantize_mxfp4, quantize_nf4  # noqa: E402

SHAPES = {"q": (2880, 4096), "k": (2880, 512), "v": (2880, 512), "o": (4096, 2880)}  # (in, out)
PATHS = ("auto", "fused", "slabs", "ws")


def _fwd_bwd(fn, x, params, dy):
    def step():
        for p in (x, *params):
            p.grad = None
        fn().backward(dy)
    return step


def _peft_lora(x, A, B, s):
    return F.linear(F.linear(x, A), B) * s


class _forced_path:
    """FASTFT_LORA_PATH for the duration of a block (None: auto); lora_linear reads it on every call."""

    def __init__(self, path):
        self.path = None if path == "auto" else path

    def __enter__(self):
        self.saved = os.environ.pop("FASTFT_LORA_PATH", None)
        if self.path:
            os.environ["FASTFT_LORA_PATH"] = self.path

    def __exit__(self, *exc):
        os.environ.pop("FASTFT_LORA_PATH", None)
        if self.saved is not None:
            os.environ["FASTFT_LORA_PATH"] = self.saved


def _times(step, warm, iters):
    """(eager median ms, CUDA-graph replay median ms or None) of one contender's step."""
    return time_ms(step, warm, iters), time_graph_ms(step, warmup=warm, iters=max(5, iters // 5))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T=2048, q and o only, few iterations (smoke run)")
    ap.add_argument("--T", default=None, help="comma list of token counts (default 4096,16384; 2048 with --quick)")
    ap.add_argument("--shapes", default=None, help="comma list of q,k,v,o (default all; q,o with --quick)")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slab-mib", type=float, default=None,
                    help="slab scratch bound (default: the module's SLAB_BYTES, 24 MiB)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_lora_linear needs a CUDA GPU")
    Ts = [int(t) for t in args.T.split(",")] if args.T else ([2048] if args.quick else [4096, 16384])
    shapes = args.shapes.split(",") if args.shapes else (["q", "o"] if args.quick else list(SHAPES))
    # the k/v steps are host-bound (~0.3 ms of GPU work): their medians jitter ~25 % at 20 samples, so take 100
    iters, warm = (5, 2) if args.quick else (100, 10)
    if args.slab_mib is not None:
        lora_mod.SLAB_BYTES = int(args.slab_mib * 2**20)  # an A/B knob for the bound; the module default stays 24 MiB
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        bnb = None
        print(f"bitsandbytes not importable ({e!r}): bnb_peft columns will be null", file=sys.stderr)

    dev, dt, s = args.device, torch.bfloat16, 2.0
    torch.manual_seed(0)
    for T in Ts:
        for proj in shapes:
            in_f, out_f = SHAPES[proj]
            w = (torch.randn(out_f, in_f, device=dev) / in_f**0.5).to(dt)
            bias = torch.randn(out_f, device=dev, dtype=dt) * 0.01
            x = torch.randn(T, in_f, device=dev, dtype=dt, requires_grad=True)
            A = (torch.randn(args.rank, in_f, device=dev, dtype=dt) * 0.02).requires_grad_()
            B = (torch.randn(out_f, args.rank, device=dev, dtype=dt) * 0.02).requires_grad_()
            dy = torch.randn(T, out_f, device=dev, dtype=dt)
            params = (A, B)

            bf16_step = _fwd_bwd(lambda: F.linear(x, w, bias) + _peft_lora(x, A, B, s), x, params, dy)
            bf16_t = _times(bf16_step, warm, iters)
            bnb_t = None
            if bnb is not None:
                wq, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                bnb_step = _fwd_bwd(lambda: bnb.matmul_4bit(x, wq.t(), quant_state=qs, bias=bias)
                                    + _peft_lora(x, A, B, s), x, params, dy)
                bnb_t = _times(bnb_step, warm, iters)
                del wq, qs, bnb_step

            for fmt in ("nf4", "mxfp4"):
                if fmt == "nf4" and bnb is None:
                    continue
                wf = quantize_nf4(w) if fmt == "nf4" else quantize_mxfp4(w)
                step = _fwd_bwd(lambda: lora_linear(x, wf, bias, A, B, s), x, params, dy)
                # fp32 reference over the same dequantised weight, once; each path is checked against it
                xf, Af, Bf = (t.detach().float().requires_grad_() for t in (x, A, B))
                yf = xf @ wf.dequantize(torch.float32).t() + bias.float() + s * (xf @ Af.t()) @ Bf.t()
                yf.backward(dy.float())
                ref_dx, ref_dA = xf.grad, Af.grad
                del xf, Af, Bf, yf
                times, peak, err_dx, err_dA = {}, {}, 0.0, 0.0
                with _forced_path("ws"):
                    ws_ok = lora_mod._ws_ok(x.detach(), lora_mod._weight_fields(wf), args.rank)
                for path in PATHS:
                    if path == "ws" and not ws_ok:
                        continue
                    with _forced_path(path):
                        if path == "auto":
                            chosen = lora_path(T, ws_ok)
                        step()
                        err_dx = max(err_dx, _rel(x.grad.float(), ref_dx))
                        err_dA = max(err_dA, _rel(A.grad.float(), ref_dA))
                        times[path] = _times(step, warm, iters)
                        peak[path] = extra_peak_gib(step)
                del ref_dx, ref_dA
                contenders = [bf16_t, *times.values()] + ([bnb_t] if bnb_t else [])
                timing = "cuda_graph" if all(t[1] is not None for t in contenders) else "eager"
                pick = 1 if timing == "cuda_graph" else 0
                ms = {path: t[pick] for path, t in times.items()}
                bf16_ms, bnb_ms = bf16_t[pick], bnb_t[pick] if bnb_t else None
                fastft_ms = ms["auto"]
                metrics = {
                    "shape": f"{proj}:{in_f}->{out_f}", "format": fmt, "T": T, "rank": args.rank,
                    "path": chosen,
                    "fastft_ms": round(fastft_ms, 4), "bnb_peft_ms": round(bnb_ms, 4) if bnb_ms else None,
                    "bf16_ms": round(bf16_ms, 4),
                    "speedup_vs_bnb_peft": round(bnb_ms / fastft_ms, 3) if bnb_ms else None,
                    "ratio_vs_bf16": round(fastft_ms / bf16_ms, 3),
                    "fastft_fused_ms": round(ms["fused"], 4), "fastft_slabs_ms": round(ms["slabs"], 4),
                    "fastft_ws_ms": round(ms["ws"], 4) if "ws" in ms else None,
                    "ws_speedup_vs_bnb_peft": round(bnb_ms / ms["ws"], 3) if bnb_ms and "ws" in ms else None,
                    "ws_ratio_vs_bf16": round(ms["ws"] / bf16_ms, 3) if "ws" in ms else None,
                    "slabs_speedup_vs_bnb_peft": round(bnb_ms / ms["slabs"], 3) if bnb_ms else None,
                    "slabs_ratio_vs_bf16": round(ms["slabs"] / bf16_ms, 3),
                    "fastft_extra_peak_gib": round(peak["auto"], 4),
                    "fastft_fused_extra_peak_gib": round(peak["fused"], 4),
                    "fastft_slabs_extra_peak_gib": round(peak["slabs"], 4),
                    "fastft_ws_extra_peak_gib": round(peak["ws"], 4) if "ws" in peak else None,
                    "bf16_extra_peak_gib": round(extra_peak_gib(bf16_step), 4),
                    "slab_mib": round(lora_mod.SLAB_BYTES / 2**20, 2),
                    "timing": timing,
                    "fastft_eager_ms": round(times["auto"][0], 4), "bf16_eager_ms": round(bf16_t[0], 4),
                    "bnb_peft_eager_ms": round(bnb_t[0], 4) if bnb_t else None,
                    "rel_err_dx": err_dx, "rel_err_dA": err_dA,
                }
                print(f"T={T} {metrics['shape']} {fmt}: auto({metrics['path']}) {fastft_ms:.3f} ms, fused "
                      f"{ms['fused']:.3f}, slabs {ms['slabs']:.3f}, ws {ms.get('ws', float('nan')):.3f}, "
                      f"bnb+peft {bnb_ms or float('nan'):.3f}, "
                      f"bf16 {bf16_ms:.3f}", file=sys.stderr, flush=True)
                if args.no_record:
                    print(metrics)
                else:
                    record("lora_linear", metrics)
                del wf, step
            del w, bias, x, A, B, dy, bf16_step
            if dev == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
