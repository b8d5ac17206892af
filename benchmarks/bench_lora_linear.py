"""lora_linear fwd+bwd at gpt-oss attention shapes: fastft's fused dequant+LoRA kernel vs stock QLoRA and bf16.

Rivals, measured in the same invocation, same x / dy / adapters (bf16, rank --rank, with bias as gpt-oss has):
  bnb_peft: bitsandbytes.matmul_4bit over its NF4 weight + PEFT's two LoRA matmuls (what bnb Linear4bit wrapped by
            peft's LoRA runs);  bf16: cuBLAS F.linear over a bf16 weight + the same LoRA matmuls.
One row per projection x fastft weight format (nf4, mxfp4). Usage:
  python benchmarks/bench_lora_linear.py [--quick] [--T 16384] [--rank 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_ms  # noqa: E402
from fastft.kernels.lora_linear import lora_linear  # noqa: E402
from fastft.quant import quantize_mxfp4, quantize_nf4  # noqa: E402

SHAPES = {"q": (2880, 4096), "k": (2880, 512), "v": (2880, 512), "o": (4096, 2880)}  # (in, out)


def _fwd_bwd(fn, x, params, dy):
    def step():
        for p in (x, *params):
            p.grad = None
        fn().backward(dy)
    return step


def _peft_lora(x, A, B, s):
    return F.linear(F.linear(x, A), B) * s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T=2048, q and o only, few iterations (smoke run)")
    ap.add_argument("--T", type=int, default=None, help="tokens (default 16384, 2048 with --quick)")
    ap.add_argument("--shapes", default=None, help="comma list of q,k,v,o (default all; q,o with --quick)")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_lora_linear needs a CUDA GPU")
    T = args.T or (2048 if args.quick else 16384)
    shapes = args.shapes.split(",") if args.shapes else (["q", "o"] if args.quick else list(SHAPES))
    iters, warm = (5, 2) if args.quick else (20, 5)
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        bnb = None
        print(f"bitsandbytes not importable ({e!r}): bnb_peft columns will be null", file=sys.stderr)

    dev, dt, s = args.device, torch.bfloat16, 2.0
    torch.manual_seed(0)
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
        bf16_ms = time_ms(bf16_step, warm, iters)
        bnb_ms = None
        if bnb is not None:
            wq, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            bnb_step = _fwd_bwd(lambda: bnb.matmul_4bit(x, wq.t(), quant_state=qs, bias=bias)
                                + _peft_lora(x, A, B, s), x, params, dy)
            bnb_ms = time_ms(bnb_step, warm, iters)

        for fmt in ("nf4", "mxfp4"):
            if fmt == "nf4" and bnb is None:
                continue
            wf = quantize_nf4(w) if fmt == "nf4" else quantize_mxfp4(w)
            step = _fwd_bwd(lambda: lora_linear(x, wf, bias, A, B, s), x, params, dy)
            # correctness vs the same dequantised weight in fp32, before timing
            step()
            got = (x.grad.float(), A.grad.float())
            xf, Af, Bf = (t.detach().float().requires_grad_() for t in (x, A, B))
            yf = xf @ wf.dequantize(torch.float32).t() + bias.float() + s * (xf @ Af.t()) @ Bf.t()
            yf.backward(dy.float())
            rel_dx = ((got[0] - xf.grad).norm() / xf.grad.norm()).item()
            rel_dA = ((got[1] - Af.grad).norm() / Af.grad.norm()).item()
            fastft_ms = time_ms(step, warm, iters)
            metrics = {
                "shape": f"{proj}:{in_f}->{out_f}", "format": fmt, "T": T, "rank": args.rank,
                "fastft_ms": round(fastft_ms, 4), "bnb_peft_ms": round(bnb_ms, 4) if bnb_ms else None,
                "bf16_ms": round(bf16_ms, 4),
                "speedup_vs_bnb_peft": round(bnb_ms / fastft_ms, 3) if bnb_ms else None,
                "ratio_vs_bf16": round(fastft_ms / bf16_ms, 3),
                "fastft_extra_peak_gib": round(extra_peak_gib(step), 4),
                "bf16_extra_peak_gib": round(extra_peak_gib(bf16_step), 4),
                "rel_err_dx": rel_dx, "rel_err_dA": rel_dA,
            }
            if args.no_record:
                print(metrics)
            else:
                record("lora_linear", metrics)


if __name__ == "__main__":
    main()
