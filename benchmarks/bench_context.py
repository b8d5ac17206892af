"""Long single sequences on gpt-oss-20b: how long fastft can go under a memory cap, and how it scales against HF+PEFT.

Bisection mode (default, bench "context"): for each cap (24 and 80 GiB by default) the allowed memory is set with
torch.cuda.set_per_process_memory_fraction and the longest sequence that trains (forward + backward + optimizer step)
is found by bisection between --lo and --hi tokens (multiples of 1024); tokens/s at that length is the time of one
more step there. With --lo equal to --hi only that length is tried, and its one step is the measurement. A 4096-token
warm-up step first keeps autotuning and compilation out of the timed steps.

Sweep mode (--sweep, bench "context_sweep"): one sequence per step at each of --lengths; step time (median of 2 steps
after 1 warm-up) and peak allocated GiB for fastft (W1-qv) and for the reference (HF eager + PEFT, dict masks). The
reference stops at its first out-of-memory or at a step over 60 s, and the whole sweep at --budget-s; lengths not
measured are recorded as null. Each model is built once and freed (gc + empty_cache) before the other is built.
Rows are recorded at the end, one per length (both sides at once, so the ratio lives in the row).

    python benchmarks/bench_context.py [--caps 24,80] [--quick]
    python benchmarks/bench_context.py --sweep [--lengths 2048,...,131072] [--budget-s 420] [--cap-gib 80] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_e2e import CONFIG, build_fastft, build_reference, hf_masks  # noqa: E402
from benchmarks.common import record  # noqa: E402

SWEEP_LENGTHS = "2048,4096,8192,16384,32768,65536,131072"
REFERENCE_STEP_LIMIT_S = 60.0


def _batch(length: int, vocab: int):
    ids = torch.randint(0, vocab, (length,), device="cuda")
    pos = torch.arange(length, device="cuda")
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    return ids, pos, cu


def one_step(model, opt, length: int, vocab: int) -> float:
    ids, pos, cu = _batch(length, vocab)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(ids, pos, cu, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def reference_step(model, opt, length: int, vocab: int, window: int) -> float:
    ids, pos, cu = _batch(length, vocab)
    masks = hf_masks(pos, cu, window, torch.bfloat16)  # built outside the timed region, as a collator would
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(input_ids=ids[None], position_ids=pos[None], labels=ids[None], attention_mask=masks)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _free():
    gc.collect()  # PEFT models hold reference cycles: without this their weights outlive them
    torch.cuda.empty_cache()


def fits(model, opt, length, vocab) -> float | None:
    try:
        return one_step(model, opt, length, vocab)
    except torch.OutOfMemoryError:
        return None
    finally:
        _free()


def set_cap(cap_gib: float | None):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * 2**30 / total))


def bisect(args, cfg):
    model, backend = build_fastft(cfg, args.workload, **args.build)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    one_step(model, opt, 4096, cfg["vocab_size"])  # warm-up: autotuning happens here, not in a measured step
    for cap in (float(c) for c in args.caps.split(",")):
        set_cap(cap)
        lo, hi = 0, args.hi // 1024
        first = fits(model, opt, args.lo, cfg["vocab_size"])
        single = args.lo == args.hi  # one length checked: its single step is the measurement (500K takes minutes)
        if first is None:
            best, step_s = 0, None
        elif single:
            best, step_s = args.lo, first
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
            step_s = fits(model, opt, best, cfg["vocab_size"])
        record("context", {"cap_gib": cap, "max_tokens": best, "tok_s": best / step_s if step_s else None,
                           "step_s": step_s, **({"timed_steps": 1} if single else {}),
                           "workload": args.workload, "layers": cfg["num_hidden_layers"],
                           "kernels": backend.sources, "searched_from": args.lo, "searched_up_to": args.hi,
                           "build": args.build})
    set_cap(None)


def sweep_side(name: str, step, model, lengths: list[int], deadline: float, step_limit_s: float | None) -> dict:
    """length -> {"step_s", "peak_gib"} or {"error"}; stops at the first OOM, a step over step_limit_s, or the
    deadline (checked before each length and each step). Lengths after a stop are absent."""
    model.train()  # HF checkpoints layers only in training mode
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out = {}
    for n in lengths:
        if time.monotonic() > deadline:
            print(f"{name}: time budget spent before {n} tokens", flush=True)
            break
        _free()
        torch.cuda.reset_peak_memory_stats()
        times, error = [], None
        try:
            for i in range(3):  # 1 warm-up + 2 timed
                if i and time.monotonic() > deadline:
                    break
                times.append(step(model, opt, n))
                if step_limit_s is not None and times[-1] > step_limit_s:
                    break
        except torch.OutOfMemoryError as e:
            error = f"OOM: {str(e).splitlines()[0]}"[:160]
        peak = torch.cuda.max_memory_allocated() / 2**30
        opt.zero_grad(set_to_none=True)
        _free()
        if error is not None:
            out[n] = {"error": error}
            print(f"{name} {n}: {error}", flush=True)
            break
        # Only timed steps make a step time; a lone warm-up (cut by the budget or the step limit) is kept apart.
        out[n] = {"step_s": statistics.median(times[1:]) if len(times) > 1 else None, "first_step_s": times[0],
                  "peak_gib": peak, "timed_steps": len(times) - 1}
        print(f"{name} {n}: {out[n]}", flush=True)
        if step_limit_s is not None and max(times) > step_limit_s:
            print(f"{name}: a step took {max(times):.0f} s > {step_limit_s:.0f} s; stopping", flush=True)
            break
    del opt
    return out


def sweep(args, cfg):
    lengths = sorted(int(x) for x in args.lengths.split(","))
    vocab, window = cfg["vocab_size"], cfg["sliding_window"]
    deadline = time.monotonic() + args.budget_s
    set_cap(args.cap_gib)
    _free()
    model, backend = build_fastft(cfg, "W1-qv", **args.build)
    # Keep a reserve for the reference: its short lengths are the ones the comparison needs.
    fast_deadline = deadline - (0 if args.skip_reference else args.reference_reserve_s)
    fast = sweep_side("fastft", lambda m, o, n: one_step(m, o, n, vocab), model, lengths, fast_deadline, None)
    del model
    _free()
    ref = {}
    if not args.skip_reference:
        try:
            model = build_reference(cfg, "W1-qv")
            ref = sweep_side("reference", lambda m, o, n: reference_step(m, o, n, vocab, window), model, lengths,
                             deadline, REFERENCE_STEP_LIMIT_S)
            del model
        except torch.OutOfMemoryError as e:
            print(f"reference: OOM while building: {e}"[:200], flush=True)
        _free()
    set_cap(None)
    for n in lengths:
        f, r = fast.get(n, {}), ref.get(n, {})
        fs, rs = f.get("step_s"), r.get("step_s")
        m = {"tokens": n, "workload": "W1-qv", "layers": cfg["num_hidden_layers"], "cap_gib": args.cap_gib,
             "fastft_tok_s": n / fs if fs else None, "fastft_step_s": fs, "fastft_peak_gib": f.get("peak_gib"),
             "reference_tok_s": n / rs if rs else None, "reference_step_s": rs,
             "reference_peak_gib": r.get("peak_gib"), "speedup_vs_reference": rs / fs if fs and rs else None,
             "kernels": backend.sources, "build": args.build}
        notes = []
        for side, d in (("fastft", f), ("reference", r)):
            if "error" in d:
                notes.append(f"{side}: {d['error']}")
            elif not d and not (side == "reference" and args.skip_reference):
                notes.append(f"{side}: not run (an earlier length stopped it, or the time budget)")
            elif d and d["timed_steps"] < 2:
                notes.append(f"{side}: {d['timed_steps']} timed step(s); first step {d['first_step_s']:.1f} s")
                if not d["step_s"]:
                    m[f"{side}_first_step_s"] = d["first_step_s"]
        if notes:
            m["note"] = "; ".join(notes)
        record("context_sweep", m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="24,80", help="bisection: memory caps in GiB")
    ap.add_argument("--lo", type=int, default=4096)
    ap.add_argument("--hi", type=int, default=1 << 20)
    ap.add_argument("--quick", action="store_true", help="2 layers: a smoke run")
    ap.add_argument("--workload", default="W1-qv")
    ap.add_argument("--sweep", action="store_true", help="fastft vs reference at fixed lengths (bench context_sweep)")
    ap.add_argument("--lengths", default=SWEEP_LENGTHS)
    ap.add_argument("--budget-s", type=float, default=420.0, help="sweep: stop measuring after this many seconds")
    ap.add_argument("--reference-reserve-s", type=float, default=120.0,
                    help="sweep: fastft stops this long before the budget ends, leaving time to the reference")
    ap.add_argument("--cap-gib", type=float, default=None, help="sweep: optional memory cap for both sides")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--build", default=None,
                    help='JSON options for bench_e2e.build_fastft (default: {"offload_activations": true} when '
                         'bisecting, the e2e layout for --sweep)')
    args = ap.parse_args()
    args.build = json.loads(args.build) if args.build else ({} if args.sweep else {"offload_activations": True})
    cfg = json.loads(CONFIG.read_text())
    if args.quick:
        cfg["num_hidden_layers"], cfg["layer_types"] = 2, cfg["layer_types"][:2]
        args.hi = min(args.hi, 1 << 17)
        if args.sweep and args.lengths == SWEEP_LENGTHS:
            args.lengths = "2048,8192,32768"
            args.budget_s = min(args.budget_s, 120.0)
            args.reference_reserve_s = min(args.reference_reserve_s, 40.0)
    if args.sweep:
        sweep(args, cfg)
    else:
        bisect(args, cfg)


if __name__ == "__main__":
    main()
