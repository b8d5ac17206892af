"""Longest single sequence fastft trains (forward + backward + optimizer step) on gpt-oss-20b under a memory cap.

For each cap (24 and 80 GiB by default) the allowed memory is set with torch.cuda.set_per_process_memory_fraction
and the length is found by bisection between --lo and --hi tokens (multiples of 1024); tokens/s at that length is
the time of one more step there.

    python benchmarks/bench_context.py [--caps 24,80] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_e2e import CONFIG, build_fastft  # noqa: E402
from benchmarks.common import record  # noqa: E402


def one_step(model, opt, length: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (length,), device="cuda")
    pos = torch.arange(length, device="cuda")
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(ids, pos, cu, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def fits(model, opt, length, vocab) -> float | None:
    try:
        return one_step(model, opt, length, vocab)
    except torch.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="24,80")
    ap.add_argument("--lo", type=int, default=4096)
    ap.add_argument("--hi", type=int, default=1 << 20)
    ap.add_argument("--quick", action="store_true", help="2 layers: a smoke run")
    ap.add_argument("--workload", default="W1-qv")
    args = ap.parse_args()
    cfg = json.loads(CONFIG.read_text())
    if args.quick:
        cfg["num_hidden_layers"], cfg["layer_types"] = 2, cfg["layer_types"][:2]
        args.hi = min(args.hi, 1 << 17)
    total = torch.cuda.get_device_properties(0).total_memory
    model, backend = build_fastft(cfg, args.workload)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for cap in (float(c) for c in args.caps.split(",")):
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
        lo, hi = 0, args.hi // 1024
        if fits(model, opt, args.lo, cfg["vocab_size"]) is None:
            best = 0
        else:
            lo = args.lo // 1024
            while lo < hi:  # largest multiple of 1024 that fits, in [lo, hi]
                mid = (lo + hi + 1) // 2
                if fits(model, opt, mid * 1024, cfg["vocab_size"]) is not None:
                    lo = mid
                else:
                    hi = mid - 1
                print(f"cap {cap:g} GiB: fits up to >= {lo * 1024} tokens, < {(hi + 1) * 1024}", flush=True)
            best = lo * 1024
        step_s = fits(model, opt, best, cfg["vocab_size"]) if best else None
        record("context", {"cap_gib": cap, "max_tokens": best, "tok_s": best / step_s if step_s else None,
                           "step_s": step_s, "workload": args.workload, "layers": cfg["num_hidden_layers"],
                           "kernels": backend.sources, "searched_up_to": args.hi})
    torch.cuda.set_per_process_memory_fraction(1.0)


if __name__ == "__main__":
    main()
