"""What every benchmark shares: device-event timing, peak-memory measurement and the results.jsonl row.

Convention: each benchmark appends one JSON object per measurement to benchmarks/results.jsonl:
{"bench", "date", "device", "command", "git", "metrics"}, with fastft and its rivals measured in the same invocation
and their ratios inside "metrics". RESULTS.md and plots are generated from that file (benchmarks/report.py).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def git_rev() -> str:
    """HEAD of the checkout; on a machine that got the tree without .git, $FASTFT_GIT_REV (set by the caller)."""
    if os.environ.get("FASTFT_GIT_REV"):
        return os.environ["FASTFT_GIT_REV"]
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "") if rev.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of fn() in ms, from CUDA events around each call (CPU: perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_graph_ms(fn, warmup: int = 3, iters: int = 20, per_sample: int = 10):
    """Median GPU time of fn() in ms from replays of a CUDA graph of one call (per_sample replays between each pair
    of events), or None when fn cannot be captured. For steps whose kernels take less time than the host takes to
    launch them: eager timing then measures each implementation's Python dispatch, not its GPU work (METHOD.md)."""
    if not torch.cuda.is_available():
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's capture recipe asks
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - e.g. a host synchronisation inside fn
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_sample):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per_sample)
    del graph
    return statistics.median(times)


def extra_peak_gib(fn) -> float:
    """Peak GPU memory allocated by fn() above what was allocated before it, in GiB (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def command() -> str:
    """The exact command: the FASTFT_* settings that switch kernels (A/B runs; not FASTFT_GIT_REV), then argv."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith("FASTFT_") and k != "FASTFT_GIT_REV"]
    return " ".join(env + [shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv])


def record(bench: str, metrics: dict, path: Path = RESULTS) -> dict:
    row = {
        "bench": bench,
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "command": command(),
        "git": git_rev(),
        "metrics": metrics,
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row
