"""weights_memory: gpt-oss-20b loaded the way the trainer loads it, from a synthetic full-size checkpoint.

A checkpoint in the exact hub layout (tensor names, dtypes, shapes, several shards + model.safetensors.index.json;
MXFP4 experts as uint8 ``*_blocks`` / ``*_scales`` with random content, bf16 everything else) is written to a temp
dir by a child process, one tensor at a time (its host memory stays ~1.2 GB: the largest tensor, the embedding).
A second child process runs ``load_model(..., device="cuda", experts="mxfp4", linears="nf4", lm_head="int8",
offload_embedding=True)`` (``--lm-head bf16``: the dense lm_head) and measures it; this one records a
``weights_memory`` row:
  resident_gib        torch.cuda.memory_allocated() after the load (issue #6 bar: <= 11 GiB)
  load_peak_host_gib  peak anonymous RSS (/proc/self/status RssAnon, sampled every ~10 ms by a thread) above the
                      pre-load baseline; file-backed mmap pages are page cache and not counted (bar: <= 4 GiB)
  load_seconds        wall time of load_model (page cache warm unless --cold)
  experts_gib, attention_gib, lm_head_gib, other_gib, embedding_gib (on the GPU), embedding_host_gib
With --bf16 a second row loads a checkpoint whose experts are dense bf16 (38.2 GB, as save_pretrained writes
dequantised weights): the quantise-while-streaming path. The MXFP4 checkpoint is deleted first (disk).

    python benchmarks/bench_weights.py [--quick] [--bf16] [--cold] [--dir DIR] [--keep] [--lm-head int8|bf16]

--quick: 2 layers (the embedding and lm_head stay full size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = Path(__file__).resolve().parent / "configs" / "gpt-oss-20b.json"
GIB = 2**30
_ST_DTYPES = {torch.bfloat16: "BF16", torch.uint8: "U8", torch.float32: "F32"}


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic checkpoint


def hub_config(layers: int | None = None, mxfp4: bool = True, path: Path = CONFIG) -> dict:
    cfg = json.loads(path.read_text())
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        cfg["layer_types"] = cfg["layer_types"][:layers]
    if mxfp4:  # what the hub's config.json says about its MXFP4 experts
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return cfg


def hub_layout(cfg: dict, dense_experts: bool = False) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every tensor of a gpt-oss checkpoint, in file order (layer by layer)."""
    H, V, D = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    Hq, Hkv, E, I = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_local_experts"], \
        cfg["intermediate_size"]
    bf16, u8 = torch.bfloat16, torch.uint8
    out = [("model.embed_tokens.weight", (V, H), bf16)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,), bf16), (p + "post_attention_layernorm.weight", (H,), bf16)]
        for proj, fan_out, fan_in in (("q", Hq * D, H), ("k", Hkv * D, H), ("v", Hkv * D, H), ("o", H, Hq * D)):
            out += [(f"{p}self_attn.{proj}_proj.weight", (fan_out, fan_in), bf16),
                    (f"{p}self_attn.{proj}_proj.bias", (fan_out,), bf16)]
        out += [(p + "self_attn.sinks", (Hq,), bf16), (p + "mlp.router.weight", (E, H), bf16),
                (p + "mlp.router.bias", (E,), bf16)]
        for w, fan_in, fan_out in (("gate_up_proj", H, 2 * I), ("down_proj", I, H)):
            if dense_experts:  # HF parameter layout [E, in, out]
                out.append((f"{p}mlp.experts.{w}", (E, fan_in, fan_out), bf16))
            else:  # hub MXFP4: stored [E, out, in], 32 values per block, two per byte
                out += [(f"{p}mlp.experts.{w}_blocks", (E, fan_out, fan_in // 32, 16), u8),
                        (f"{p}mlp.experts.{w}_scales", (E, fan_out, fan_in // 32), u8)]
            out.append((f"{p}mlp.experts.{w}_bias", (E, fan_out), bf16))
    out += [("model.norm.weight", (H,), bf16), ("lm_head.weight", (V, H), bf16)]
    return out


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def synthetic_tensor(name: str, shape: tuple, dtype: torch.dtype, seed: int, device="cpu") -> torch.Tensor:
    """Plausible random content: uniform MXFP4 codes with scales 2^-9..2^-3 (weights up to ~0.05, the range of the
    released experts), N(0, 0.02) weights, small biases, unit-ish norms, N(0, 1) sinks."""
    g = torch.Generator(device=device).manual_seed(seed)
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=device)
    if name.endswith("_scales"):
        return torch.randint(118, 125, shape, generator=g, dtype=torch.uint8, device=device)
    t = torch.randn(shape, generator=g, dtype=dtype, device=device)  # in place from here: one copy in memory
    if name.endswith("norm.weight"):
        return t.mul_(0.1).add_(1.0)
    if name.endswith("sinks"):
        return t
    return t.mul_(0.01 if name.endswith("bias") else 0.02)


def _write_safetensors(path: Path, entries: list, make) -> None:
    """A safetensors file written tensor by tensor (safetensors' own writers serialise the whole dict in memory)."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            t = make(name, shape, dtype).contiguous().cpu()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def write_checkpoint(out: Path, cfg: dict, dense_experts: bool = False, shards: int = 3, seed: int = 0,
                     device="cpu", log=None) -> int:
    """Writes config.json, model.safetensors.index.json and ``shards`` shards of about equal size; returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    layout = hub_layout(cfg, dense_experts)
    sizes = [_nbytes(s, d) for _, s, d in layout]
    total, per, groups, acc = sum(sizes), sum(sizes) / shards, [[]], 0
    for entry, n in zip(layout, sizes):
        if acc >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(entry)
        acc += n
    seeds = {name: seed * 100_003 + i for i, (name, _, _) in enumerate(layout)}
    weight_map, t0 = {}, time.perf_counter()
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_safetensors(out / fname, group, lambda n, s, d: synthetic_tensor(n, s, d, seeds[n], device))
        weight_map.update({name: fname for name, _, _ in group})
        if log:
            log(f"{fname}: {(out / fname).stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def _evict(path: Path) -> None:
    """Flushes the files and drops them from the page cache, so the load reads the disk (--cold)."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak(threading.Thread):
    """Peak RssAnon (KiB) while running, sampled every ``period`` s. The loader spends its time in native code that
    drops the GIL or in short Python steps, so the thread gets to sample."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period, self.peak, self._done = period, _status_kib("RssAnon"), threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(self.period)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))
        return self.peak


def measure_load(path: Path, device: str = "cuda", lm_head: str = "int8") -> dict:
    """Loads ``path`` as the trainer does on CUDA and measures it (in a fresh process: see ``_child``). device="cpu"
    is for the smoke test only (nothing is resident on a GPU there)."""
    import gc

    import bitsandbytes  # noqa: F401  (its CUDA libraries load here, not inside the measured window)

    from fastft.backends import get_backend
    from fastft.model import load_model
    from fastft.quant import weight_bytes

    cuda = device == "cuda"
    backend = get_backend("triton" if cuda else "torch", device)
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    if cuda:
        torch.zeros(1, device="cuda")  # CUDA context and allocator up before the baseline
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    base_alloc = allocated()
    base_anon, base_shmem = _status_kib("RssAnon"), _status_kib("RssShmem")
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    model = load_model(path, dtype=torch.bfloat16, device=device, backend=backend, experts="mxfp4", linears="nf4",
                       lm_head=lm_head, offload_embedding=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_anon = sampler.stop()
    parts = weight_bytes(model)
    resident = allocated() - base_alloc
    metrics = {
        "resident_gib": round(resident / GIB, 3),
        "load_peak_host_gib": round((peak_anon - base_anon) / 2**20, 3),
        "load_seconds": round(seconds, 2),
        "load_peak_gpu_gib": round((torch.cuda.max_memory_allocated() - base_alloc) / GIB, 3) if cuda else 0.0,
        **{f"{k}_gib": round(v / GIB, 3) for k, v in parts.items()},
        "host_after_load_gib": round((_status_kib("RssAnon") + _status_kib("RssShmem") - base_anon - base_shmem)
                                     / 2**20, 3),
        # allocator rounding and anything the breakdown misses
        "unaccounted_gib": round((resident - sum(v for k, v in parts.items() if k != "embedding_host")) / GIB, 3),
    }
    return metrics


def _child(*args: str) -> float:
    """Runs this script in a child process: the writer's allocations and each load's CUDA context, pinned-memory cache
    and heap stay out of every other measurement. Returns its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, *args], check=True)
    return time.perf_counter() - t0


def bench(args, root: Path, dense_experts: bool):
    from benchmarks.common import record

    layers = 2 if args.quick else None
    kind = "bf16" if dense_experts else "mxfp4"
    path = root / f"gpt-oss-20b-{kind}"
    shards = max(3, round(sum(_nbytes(s, d) for _, s, d in hub_layout(hub_config(layers), dense_experts)) / 5e9))
    print(f"[weights] writing the synthetic {kind} checkpoint to {path} ({shards} shards)", flush=True)
    write = ["--write-only", str(path), "--shards", str(shards)]
    write += ["--layers", str(layers)] if layers is not None else []
    write_s = _child(*write, *(["--dense-experts"] if dense_experts else []))
    if args.cold:
        _evict(path)
    ckpt_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
    print(f"[weights] wrote {ckpt_gb:.2f} GB in {write_s:.1f} s; loading", flush=True)
    out = root / f"metrics-{kind}.json"
    _child("--measure", str(path), "--metrics-out", str(out), "--lm-head", args.lm_head)
    metrics = json.loads(out.read_text())
    metrics.update(checkpoint=kind, layers=layers or hub_config()["num_hidden_layers"], checkpoint_gb=round(ckpt_gb, 2),
                   write_seconds=round(write_s, 1), page_cache="cold" if args.cold else "warm", experts="mxfp4",
                   linears="nf4", lm_head=args.lm_head, offload_embedding=True, quick=args.quick)
    if not args.quick:
        metrics["resident_le_11gib"] = metrics["resident_gib"] <= 11.0
        metrics["host_peak_le_4gib"] = metrics["load_peak_host_gib"] <= 4.0
    record("weights_memory", metrics)
    if not args.keep:
        shutil.rmtree(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers: a smoke run")
    ap.add_argument("--bf16", action="store_true", help="also the bf16-experts checkpoint (38 GB of disk writes)")
    ap.add_argument("--cold", action="store_true", help="drop the checkpoint from the page cache before loading")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--lm-head", choices=("int8", "bf16"), default="int8",
                    help="lm_head storage (int8: what the trainer loads on CUDA)")
    ap.add_argument("--write-only", type=Path, default=None, help=argparse.SUPPRESS)  # child modes
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--metrics-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dense-experts", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_only is not None:
        cfg = hub_config(args.layers, mxfp4=not args.dense_experts)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU generates random bytes far faster
        write_checkpoint(args.write_only, cfg, args.dense_experts, args.shards, device=device,
                         log=lambda m: print(f"[weights]   {m}", flush=True))
        return
    if args.measure is not None:
        args.metrics_out.write_text(json.dumps(measure_load(args.measure, lm_head=args.lm_head)))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_weights needs a CUDA GPU")
    root = Path(tempfile.mkdtemp(prefix="fastft-weights-", dir=args.dir))
    need = (14e9 + 42e9 if args.keep else 42e9) if args.bf16 else 14e9
    free = shutil.disk_usage(root).free
    if not args.quick and free < need:
        sys.exit(f"{root}: {free / 1e9:.0f} GB free, the checkpoint needs {need / 1e9:.0f} GB (pass --dir)")
    try:
        bench(args, root, dense_experts=False)
        if args.bf16:
            bench(args, root, dense_experts=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
