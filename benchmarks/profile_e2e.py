"""Where a gpt-oss-20b training step spends its GPU time and memory (fastft, W1-qv by default): issue #8's breakdown.

Time: torch.profiler over --steps steps after warm-up; every GPU kernel is charged to the op whose CPU call launched
it, found by walking up the profiler's call tree to a ``fastft::<op>`` range (the four backend ops, wrapped below,
forward and recomputation) or to the autograd node of that op's backward; everything else (norms, rope, residuals,
router, embedding copy, optimizer) is "other". Memory: resident weights after the build, the step's peak, and the
allocations alive at the peak, replayed from the CUDA caching allocator's trace and grouped by the innermost
fastft/kernels source line that made them.

    python benchmarks/profile_e2e.py [--workload W1-qv] [--row-len 4096] [--quick] [build options of bench_e2e]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_e2e import CONFIG, build_fastft, fastft_step, token_stream  # noqa: E402
from benchmarks.common import record  # noqa: E402
from fastft.backends import OPS  # noqa: E402

# autograd node names of each op's backward (the Function class name + "Backward")
_BACKWARD_NODES = {"_VarlenAttention": "attention", "LoRALinearFunction": "lora_linear", "_MoEExperts": "moe",
                   "FusedLinearCrossEntropyFunction": "loss"}


def instrument(backend):
    """The same backend with each op inside a profiler range named fastft::<op>."""
    def wrap(op, fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"fastft::{op}"):
                return fn(*args, **kwargs)
        return run
    return dataclasses.replace(backend, **{op: wrap(op, getattr(backend, op)) for op in OPS})


def category(evt) -> str:
    node = evt
    while node is not None:
        name = node.name
        if name.startswith("fastft::"):
            return name.split("::", 1)[1]
        for fn, op in _BACKWARD_NODES.items():
            if fn in name and "Backward" in name:
                return op
        if "Optimizer.step" in name or "AdamW" in name:
            return "optimizer"
        node = node.cpu_parent
    return "other"


def time_breakdown(prof, steps: int) -> tuple[dict, list]:
    by_cat, by_kernel = collections.Counter(), collections.Counter()
    for evt in prof.events():
        for k in getattr(evt, "kernels", []):
            ms = k.duration / 1e3  # us -> ms
            by_cat[category(evt)] += ms / steps
            by_kernel[k.name[:90]] += ms / steps
    return dict(by_cat), by_kernel.most_common(20)


def live_at_peak(snapshot: dict, base: int, top: int = 15) -> tuple[float, list]:
    """Replays the allocator trace of one step: (peak GiB, [(source line, GiB alive at the peak)])."""
    live, cur, peak, at_peak = {}, base, base, {}
    for e in snapshot["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    groups = collections.Counter()
    for e in at_peak.values():
        frames = [f for f in e.get("frames", []) if "/fastft/" in f["filename"] or "/kernels/" in f["filename"]
                  or "/benchmarks/" in f["filename"]]
        where = f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"
        groups[where] += e["size"] / 2**30
    return peak / 2**30, [(k, round(v, 3)) for k, v in groups.most_common(top)]


def host_side(model, opt, rows, cfg, steps: int = 3) -> dict:
    """Is the step bound by the host? Wall time per step, the time the host takes to issue it (until the step
    function returns, before the final synchronize), and every host synchronisation inside it (torch's sync debug
    mode), grouped by the source line that asked for it."""
    walls, issues = [], []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fastft_step(model, opt, rows[i % len(rows)], cfg)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        issues.append(t1 - t0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fastft_step(model, opt, rows[0], cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return {"wall_ms": 1e3 * statistics.median(walls), "host_issue_ms": 1e3 * statistics.median(issues),
            "host_syncs": sum(syncs.values()), "host_syncs_by_line": syncs.most_common(10)}


def write_cprofile(path: Path, step):
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    path.write_text(buf.getvalue())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="W1-qv")
    ap.add_argument("--row-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 layers")
    ap.add_argument("--build", default="{}", help="JSON keyword options for bench_e2e.build_fastft")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="also write a cProfile of one step's host side (Python) to this text file")
    args = ap.parse_args()
    cfg = json.loads(CONFIG.read_text())
    if args.quick:
        cfg["num_hidden_layers"], cfg["layer_types"] = 2, cfg["layer_types"][:2]
    build_kw = json.loads(args.build)
    rows = token_stream(args.steps + 3, args.row_len, cfg["vocab_size"], seed=1)
    torch.cuda.reset_peak_memory_stats()
    model, backend = build_fastft(cfg, args.workload, **build_kw)
    model.set_backend(instrument(backend))
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    torch.cuda.reset_peak_memory_stats()
    for i in range(2):  # warm-up: autotuning and compilation happen here (their memory counts in first_steps_peak)
        fastft_step(model, opt, rows[i], cfg)
    torch.cuda.synchronize()
    first_peak = torch.cuda.max_memory_allocated()

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    replay_peak, top_live = None, []
    # python frames only: C++ unwinding at every allocation is slow, and the trace is only read for its source lines
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="alloc", stacks="python")
    try:
        fastft_step(model, opt, rows[2], cfg)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        replay_peak, top_live = live_at_peak(snap, base)
    except Exception as e:  # noqa: BLE001 - the time breakdown below is still worth having
        print(f"memory trace failed: {type(e).__name__}: {e}", flush=True)
        opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    steady_peak = torch.cuda.max_memory_allocated()

    host = host_side(model, opt, rows[3:], cfg)
    if args.cprofile:
        write_cprofile(args.cprofile, lambda: fastft_step(model, opt, rows[3], cfg))
    print(f"host: wall {host['wall_ms']:.1f} ms/step, issued in {host['host_issue_ms']:.1f} ms; "
          f"{host['host_syncs']} syncs: {host['host_syncs_by_line']}")

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.steps):
            fastft_step(model, opt, rows[3 + i % (len(rows) - 3)], cfg)
        torch.cuda.synchronize()
    by_cat, top_kernels = time_breakdown(prof, args.steps)
    total = sum(by_cat.values())
    print(f"GPU kernel time per step {total:.1f} ms")
    for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {v:8.1f} ms  {100 * v / total:5.1f} %")
    print("top kernels (ms/step):")
    for name, ms in top_kernels:
        print(f"  {ms:8.2f}  {name}")
    print(f"resident {resident / 2**30:.2f} GiB; peak first steps {first_peak / 2**30:.2f}, steady "
          f"{steady_peak / 2**30:.2f} (replayed {replay_peak}); alive at the peak, by source:")
    for where, gib in top_live:
        print(f"  {gib:7.3f} GiB  {where}")
    record("e2e_profile", {
        "workload": args.workload, "tokens_per_row": args.row_len, "layers": cfg["num_hidden_layers"],
        "build": build_kw, "gpu_ms_per_step": total, "ms_by_op": by_cat,
        "top_kernels_ms": [[n, round(ms, 3)] for n, ms in top_kernels],
        "resident_gib": resident / 2**30, "first_steps_peak_gib": first_peak / 2**30,
        "steady_peak_gib": steady_peak / 2**30, "alive_at_peak_gib": top_live, "kernels": backend.sources,
        **host,
    })


if __name__ == "__main__":
    main()
