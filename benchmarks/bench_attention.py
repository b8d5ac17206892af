"""Varlen GPT-OSS attention, forward + backward: fastft's Triton kernel vs torch.compile'd flex_attention.

gpt-oss-20b shapes (64 q heads, 8 kv heads, head_dim 64, bf16, sinks frozen as in fastft; grads for q, k, v), at
T tokens packed from lognormal documents (fixed seed) and as one document, for a full layer and a window-128 layer.
The rival is flex_attention with a document + causal (+ window) BlockMask and sinks applied by LSE renormalisation,
out * sigmoid(lse - sink), which is how transformers runs GPT-OSS on flex; BlockMask creation is not timed.
TFLOP/s counts visible (i, j) pairs only: forward 4 * D FLOPs per pair per head, backward 2.5x the forward.
Forward-only times are taken with grad enabled (a training forward), so flex compiles only its training graph, once
per mask kind; a progress line is printed and each row appended to results.jsonl as soon as it is measured.
Timing (`timing` column): each contender's step (and forward) is captured once in a CUDA graph and its replays are
timed, since a window layer's kernels take less time than the host takes to issue them (eager timing then ranks the
Python dispatch of each implementation, and moved by 15% between two H200 hosts on the same code). The eager medians
stay in *_eager_ms and speedup_vs_flex_eager; if either contender fails to capture, the row falls back to eager.

    python benchmarks/bench_attention.py            # T=16384
    python benchmarks/bench_attention.py --quick    # smoke run (T=4096, packed only)
    python benchmarks/bench_attention.py --sweep    # time tile configs per kernel (prints, records nothing)
    python benchmarks/bench_attention.py --heads 8  # GPU_CONFIG's tiles with GQA head packing, vs flex
    python benchmarks/bench_attention.py --config '{"full": {"fwd": [64, 64, 4, 3, 8], ...}, ...}'  # --sweep's pick
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import extra_peak_gib, record, time_graph_ms, time_ms  # noqa: E402
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

    timed = {"fast": fast_step, "flex": flex_step, "fast_fwd": fast_fwd, "flex_fwd": flex_fwd}
    eager = {name: time_ms(fn, warmup=2, iters=iters) for name, fn in timed.items()}
    graph = {name: time_graph_ms(fn, warmup=2, iters=max(5, iters // 5)) for name, fn in timed.items()}
    timing = "cuda_graph" if all(t is not None for t in graph.values()) else "eager"
    times = graph if timing == "cuda_graph" else eager
    fast_ms, flex_ms, fast_fwd_ms, flex_fwd_ms = times["fast"], times["flex"], times["fast_fwd"], times["flex_fwd"]
    flops_fwd = 4 * D * HQ * visible_pairs(lengths, window)
    return {
        "T": T, "layer": layer, "docs": len(lengths), "window": window, "timing": timing,
        "fastft_ms": round(fast_ms, 3), "flex_ms": round(flex_ms, 3), "speedup_vs_flex": round(flex_ms / fast_ms, 3),
        "fastft_eager_ms": round(eager["fast"], 3), "flex_eager_ms": round(eager["flex"], 3),
        "speedup_vs_flex_eager": round(eager["flex"] / eager["fast"], 3),
        "fastft_tflops": round(3.5 * flops_fwd / fast_ms / 1e9, 1),
        "flex_tflops": round(3.5 * flops_fwd / flex_ms / 1e9, 1),
        "fastft_mfu": round(3.5 * flops_fwd / fast_ms / 1e9 / PEAK_TFLOPS, 3),
        "fastft_fwd_ms": round(fast_fwd_ms, 3), "flex_fwd_ms": round(flex_fwd_ms, 3),
        "fastft_fwd_tflops": round(flops_fwd / fast_fwd_ms / 1e9, 1),
        "fastft_peak_gib": round(extra_peak_gib(fast_step), 3), "flex_peak_gib": round(extra_peak_gib(flex_step), 3),
        "out_rel_err_vs_flex": round(rel_err, 5), "config": {k: list(c) for k, c in attention.GPU_CONFIG[layer].items()},
    }


# Candidates per variant and kernel: (block_m, block_n, num_warps, num_stages[, heads]); a candidate that fails to
# compile or launch (too much shared memory) is reported and skipped. "per_head": one query head per tile, block_m
# tokens. "packed": the 8 query heads of a kv head share a tile's rows, block_m // 8 tokens per tile. The packed grid
# is block_m {64, 128, 256} x block_n {32, 64, 128} x warps {4, 8} x stages {2, 3}, plus 16/32-row dkdv tiles (the
# per-head winners' shape) and 32 x 32 fwd/dq tiles for the window, less the configs whose sm_90 build spills
# registers (ptxas stack > 0 at D=64, compiled offline with triton 3.6): they cannot win and only cost sweep time.
_GRID = [(bm, bn, w, s) for bm in (16, 32, 64, 128, 256) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
_SPILLS = {
    "fwd": {(128, 128, 4), (256, 32, 4), (256, 64, 4), (256, 128, 4), (256, 128, 8)},
    "dq": {(128, 128, 4), (256, 32, 4), (256, 64, 4), (256, 128, 4), (256, 128, 8)},
    "dkdv": {(32, 128, 4), (64, 128, 4), (128, 32, 4), (128, 64, 4), (128, 128, 4), (128, 128, 8), (256, 32, 4),
             (256, 32, 8), (256, 64, 4), (256, 64, 8), (256, 128, 4), (256, 128, 8)},
}
SWEEP = {
    "per_head": {
        "fwd": [(128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 2, 3), (32, 32, 2, 3),
                (32, 64, 4, 3), (64, 16, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 2, 3), (32, 32, 2, 3), (32, 64, 4, 3),
               (64, 16, 4, 3), (64, 32, 4, 4)],
        "dkdv": [(32, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3), (32, 64, 4, 3), (16, 32, 2, 3), (16, 64, 2, 3),
                 (32, 32, 2, 3), (16, 32, 4, 3), (64, 64, 4, 4), (32, 64, 4, 4)],
    },
    "packed": {
        kernel: [(*c, 8) for c in _GRID
                 if c[:3] not in spills and (c[0] >= 64 or kernel == "dkdv" or c[:3] == (32, 32, 4))]
        for kernel, spills in _SPILLS.items()
    },
}


def _tiles_json(config: dict) -> dict:
    return {kernel: list(tile) for kernel, tile in config.items()}


def sweep(T: int, iters: int, layers, docs, quick: bool):
    """Per layer kind and variant, vary one kernel's tiles at a time (the others at the layer's GPU_CONFIG): fwd timed
    alone, dq/dkdv as fwd+bwd. A candidate's score is its time relative to GPU_CONFIG's, averaged over the document
    layouts asked for (packed lognormal, one document), so neither dominates. Then the winners of each variant are
    timed together, and the mix (per kernel, the better variant's winner); the fastest of these and the current
    config is printed as a --config line for the flex comparison, and is what GPU_CONFIG should get."""
    layouts = {"packed": lognormal_lengths(T), "one document": [T]}
    layouts = {name: lengths for name, lengths in layouts.items() if docs in ("both", name.split()[0])}
    cus = {name: torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
           for name, lengths in layouts.items()}
    q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(HQ, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    best = {}
    for layer in layers:
        window = WINDOW if layer == "window" else None
        current = attention.GPU_CONFIG[layer]

        def step_ms(config, fwd_only=False):  # {layout: ms}
            out = {}
            for name, cu in cus.items():
                fwd = lambda: attention._VarlenAttention.apply(q, k, v, cu, sinks, window, D**-0.5, config)  # noqa
                if fwd_only:
                    with torch.no_grad():
                        out[name] = time_ms(fwd, iters=iters)
                else:
                    out[name] = time_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), do), iters=iters)
            return out

        base = {"fwd": step_ms(current, fwd_only=True), "step": step_ms(current)}
        score = lambda ms, ref: sum(ms[n] / ref[n] for n in ms) / len(ms)  # noqa: E731
        winners, win_score = {}, {}
        for variant, kernels in SWEEP.items():
            winners[variant] = {}
            for kernel, candidates in kernels.items():
                ref = base["fwd" if kernel == "fwd" else "step"]
                scores = {}
                for cand in candidates[:2] if quick else candidates:
                    row = {"layer": layer, "variant": variant, "kernel": kernel, "config": cand}
                    try:
                        ms = step_ms(dict(current, **{kernel: cand}), fwd_only=kernel == "fwd")
                    except Exception as e:  # noqa: BLE001 - a config the compiler or launcher rejects is skipped
                        print(json.dumps(dict(row, error=repr(e)[:200])))
                        continue
                    scores[cand] = score(ms, ref)
                    print(json.dumps(dict(row, ms={n: round(t, 3) for n, t in ms.items()},
                                          vs_current=round(scores[cand], 3))))
                if scores:
                    winners[variant][kernel] = min(scores, key=scores.get)
                    win_score[variant, kernel] = scores[winners[variant][kernel]]
        summary = {"layer": layer, "current": _tiles_json(current),
                   "current_ms": {n: round(t, 3) for n, t in base["step"].items()}}
        combos = {variant: dict(current, **chosen) for variant, chosen in winners.items()}
        # the mix: per kernel, the winner of the variant that scored better alone
        combos["mix"] = dict(current, **{
            kernel: winners[min((var for var in winners if (var, kernel) in win_score),
                                key=lambda var: win_score[var, kernel])][kernel]
            for kernel in current if any((var, kernel) in win_score for var in winners)})
        picks = {"current": (current, 1.0)}
        for name, combined in combos.items():
            ms = step_ms(combined)
            picks[name] = (combined, score(ms, base["step"]))
            summary[name] = {"best": _tiles_json(combined), "best_ms": {n: round(t, 3) for n, t in ms.items()},
                             "vs_current": round(picks[name][1], 3)}
        summary["pick"] = min(picks, key=lambda name: picks[name][1])
        best[layer] = picks[summary["pick"]][0]
        print(json.dumps(summary))
    picked = json.dumps({layer: _tiles_json(config) for layer, config in best.items()})
    print("best per layer (block_m, block_n, num_warps, num_stages, heads); try it against flex with:")
    print(f"  python benchmarks/bench_attention.py --config '{picked}'")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=4096, packed documents only")
    ap.add_argument("--sweep", action="store_true", help="time tile configs per kernel instead of the rival")
    ap.add_argument("--layer", choices=("full", "window", "both"), default="both", help="layer kinds to run")
    ap.add_argument("--docs", choices=("packed", "one", "both"), default="both",
                    help="--sweep: document layouts that score a config")
    ap.add_argument("--heads", type=int, help="GQA-pack this many query heads per tile (GPU_CONFIG's tiles)")
    ap.add_argument("--config", help="JSON {layer: {kernel: [block_m, block_n, warps, stages, heads]}} overriding "
                                     "GPU_CONFIG (the line --sweep prints)")
    ap.add_argument("--T", type=int, default=16384)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    sys.stdout.reconfigure(line_buffering=True)  # rows show up as they are recorded, even under a pipe + timeout
    if args.config:
        for layer, tiles in json.loads(args.config).items():
            attention.GPU_CONFIG[layer] = {kernel: tuple(tile) for kernel, tile in tiles.items()}
    if args.heads:
        for layer, tiles in attention.GPU_CONFIG.items():
            attention.GPU_CONFIG[layer] = {kernel: (*tile[:4], args.heads) for kernel, tile in tiles.items()}
    layers = ("full", "window") if args.layer == "both" else (args.layer,)
    if args.sweep:
        return sweep(4096 if args.quick else args.T, 5 if args.quick else 10, layers, args.docs, args.quick)
    t0 = time.perf_counter()
    T = 4096 if args.quick else args.T
    iters = 5 if args.quick else 10
    # grouped by mask kind, so each kind's flex compile is paid once; each row is appended as soon as it is measured
    for layer in layers:
        flex_mask = FlexMask(T, WINDOW if layer == "window" else None, "cuda")
        for packed in (True,) if args.quick else (True, False):
            record("attention", bench_case(T, layer, packed, iters, flex_mask, t0))
    log(t0, "done")


if __name__ == "__main__":
    main()
