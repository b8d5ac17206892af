"""Fused linear cross-entropy fwd+bwd at GPT-OSS's lm_head (H=2880, V=201088, bf16, frozen weight): fastft against
torch (bf16 matmul + fp32 cross_entropy) and Liger-Kernel's fused linear cross-entropy, one row per T.

    python benchmarks/bench_cross_entropy.py              # T = 4096, 16384, 65536 (a few minutes on an H200)
    python benchmarks/bench_cross_entropy.py --quick      # smoke run: T = 2048, few iterations, not recorded
    python benchmarks/bench_cross_entropy.py --sweep      # also print fastft at other block/slab/chunk sizes
    python benchmarks/bench_cross_entropy.py --method rows  # the row-chunk path (A/B; the default is "auto" =
                                                            # slabs for the frozen lm_head)
    python benchmarks/bench_cross_entropy.py --int8       # also fastft with the lm_head held int8 (Int8RowsTensor,
                                                            # what the trainer loads on CUDA), in the same rows

Extra memory is the peak above inputs, less the [T, H] hidden grad every method returns. A rival that is missing
(Liger not installed) or runs out of memory is recorded as null with a note.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_ms  # noqa: E402
from fastft.kernels import cross_entropy as ce  # noqa: E402
from fastft.kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402
from fastft.quant import Int8RowsTensor  # noqa: E402


def _torch_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)


def _liger_loss():
    """Liger's fused linear CE as fn(hidden, weight, labels) -> loss, or None with the reason."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fn
    except ImportError:
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F_
        except ImportError as e:
            return None, f"liger-kernel not importable: {e}"
        return (lambda h, w, y: _first(F_.apply(h, w, y))), None
    return (lambda h, w, y: _first(fn(h, w, y, ignore_index=-100, reduction="mean"))), None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _measure(loss_fn, hidden, weight, labels, warmup, iters):
    """(median ms, extra GiB beyond the hidden grad, loss value) of loss + backward, or Nones on OOM."""
    def step():
        hidden.grad = None
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        return loss

    try:
        loss = step().item()
        ms = time_ms(step, warmup=warmup, iters=iters)
        hidden.grad = None
        gib = extra_peak_gib(step) - hidden.numel() * hidden.element_size() / 2**30
        return ms, gib, loss, None
    except torch.cuda.OutOfMemoryError as e:
        return None, None, None, f"OOM: {str(e).splitlines()[0][:120]}"
    finally:
        hidden.grad = None
        gc.collect()
        torch.cuda.empty_cache()


def _sweep_slabs(hidden, weight, labels, warmup, iters):
    """Tuning aid, printed only: the slabs path vs rows per block and columns per slab (extra memory beside)."""
    T = hidden.shape[0]
    for block_rows in (1024, 2048, 3072, 4096):
        for slab_cols in (8192, 12288, 16384, 24576, 32768):
            fn = lambda h, w, y, b=block_rows, c=slab_cols: fused_linear_cross_entropy(  # noqa: E731
                h, w, y, method="slabs", block_rows=b, slab_cols=c)
            ms, gib, _, err = _measure(fn, hidden, weight, labels, warmup, iters)
            print(f"sweep slabs T={T} block_rows={block_rows} slab_cols={slab_cols}: {_r(ms)} ms, "
                  f"extra {_r(gib)} GiB {err or ''}", flush=True)


def _sweep(hidden, weight, labels, warmup, iters):
    """Tuning aid, printed only: whole op vs rows per chunk, then the row kernel alone vs its block and warps."""
    _sweep_slabs(hidden, weight, labels, warmup, iters)
    T, V = hidden.shape[0], weight.shape[0]
    for rows in (128, 192, 256, 384, 512):
        fn = lambda h, w, y, rows=rows: fused_linear_cross_entropy(h, w, y, method="rows", chunk_rows=rows)  # noqa: E731,E501
        ms, gib, _, err = _measure(fn, hidden, weight, labels, warmup, iters)
        print(f"sweep rows T={T} chunk_rows={rows}: {ms} ms, extra {gib} GiB {err or ''}", flush=True)
    rows = ce._chunk_rows(T, V, None)
    logits = torch.randn(rows, V, device="cuda")
    grad, loss = ce._grad_view(logits, torch.bfloat16), torch.empty(rows, device="cuda")
    gbytes = rows * V * (4 + 4 + 2) / 1e9  # two fp32 reads and one bf16 write per logit
    for block_v in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            ms = time_ms(lambda: ce._launch_rows(logits, grad, labels[:rows], loss, -100, True, block_v, warps))
            print(f"sweep kernel rows={rows} block_v={block_v} warps={warps}: {ms:.3f} ms, "
                  f"{gbytes / ms * 1e3:.0f} GB/s nominal", flush=True)
    gemm1 = time_ms(lambda: ce._logits_fp32(hidden[:rows].detach(), weight, logits))
    gemm2 = time_ms(lambda: torch.mm(grad, weight))
    flop = 2 * rows * V * hidden.shape[1]
    print(f"sweep gemms rows={rows}: logits {gemm1:.3f} ms ({flop / gemm1 / 1e9:.0f} TFLOP/s), "
          f"dH {gemm2:.3f} ms ({flop / gemm2 / 1e9:.0f} TFLOP/s)", flush=True)


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b is not None else None


def _r(x, nd=3):
    return round(x, nd) if x is not None else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run at T=2048, not recorded")
    parser.add_argument("--sweep", action="store_true", help="also time fastft at other chunk sizes")
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--method", choices=("auto", "slabs", "rows"), default="auto",
                        help="fastft path (auto: slabs, since the benchmarked lm_head is frozen)")
    parser.add_argument("--int8", action="store_true",
                        help="also time fastft with the weight held int8 (per-row absmax; slabs path)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cross_entropy needs a CUDA GPU")

    H, V = 2880, 201088
    tokens = args.tokens or ([2048] if args.quick else [4096, 16384, 65536])
    warmup, iters = (1, 3) if args.quick else (3, 10)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(V, H, device="cuda", generator=gen) * 0.02).bfloat16()  # frozen lm_head
    liger, liger_note = _liger_loss()
    weight_q = Int8RowsTensor.quantize(weight) if args.int8 else None  # 0.54 GiB beside the bf16 weight
    method = "slabs" if args.method == "auto" else args.method  # what auto picks for a frozen weight
    print(f"fastft method: {method}", flush=True)
    ours_fn = lambda h, w, y: fused_linear_cross_entropy(h, w, y, method=method)  # noqa: E731

    for T in tokens:
        hidden = torch.randn(T, H, device="cuda", generator=gen).bfloat16().requires_grad_()
        labels = torch.randint(0, V, (T,), device="cuda", generator=gen)
        notes = []
        ours = _measure(ours_fn, hidden, weight, labels, warmup, iters)
        ref = _measure(_torch_loss, hidden, weight, labels, warmup, iters)
        lig = _measure(liger, hidden, weight, labels, warmup, iters) if liger else (None, None, None, liger_note)
        q8 = _measure(fused_linear_cross_entropy, hidden, weight_q, labels, warmup, iters) if args.int8 else None
        for name, res in (("fastft", ours), ("torch", ref), ("liger", lig), ("fastft_int8", q8 or (None,) * 4)):
            if res[3]:
                notes.append(f"{name}: {res[3]}")
        metrics = {
            "T": T, "H": H, "V": V, "dtype": "bf16", "fastft_method": method,
            "fastft_ms": _r(ours[0]), "torch_ms": _r(ref[0]), "liger_ms": _r(lig[0]),
            "fastft_extra_gib": _r(ours[1]), "torch_extra_gib": _r(ref[1]), "liger_extra_gib": _r(lig[1]),
            "speedup_vs_torch": _ratio(ref[0], ours[0]), "speedup_vs_liger": _ratio(lig[0], ours[0]),
            "loss_rel_diff_vs_torch": (abs(ours[2] - ref[2]) / abs(ref[2]) if ours[2] is not None and ref[2] else None),
            "tflops_fastft": _r(2 * 2 * T * H * V / ours[0] / 1e9, 1) if ours[0] else None,
        }
        if q8 is not None:
            metrics.update({
                "fastft_int8_ms": _r(q8[0]), "fastft_int8_extra_gib": _r(q8[1]),
                "int8_time_vs_bf16": _ratio(q8[0], ours[0]), "int8_speedup_vs_torch": _ratio(ref[0], q8[0]),
                # int8's own effect on the loss, against the bf16 weight it was quantised from (same kernel path)
                "int8_loss_rel_diff_vs_bf16": (abs(q8[2] - ours[2]) / abs(ours[2])
                                               if q8[2] is not None and ours[2] else None),
                "int8_weight_gib": round(weight_q.nbytes() / 2**30, 3),
                "bf16_weight_gib": round(weight.numel() * weight.element_size() / 2**30, 3),
            })
        if notes:
            metrics["note"] = "; ".join(notes)
        if args.quick:
            print(metrics)
        else:
            record("cross_entropy", metrics)
        if args.sweep:
            _sweep(hidden, weight, labels, warmup, iters)
        del hidden, labels
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
