"""Process-group setup, the DeepSpeed config fastft generates, and the engine of a single process.

`python fastft/train.py` runs as a single process: it sets the distributed environment itself, so the same code
serves one CPU, one GPU and `deepspeed --num_gpus N`. Several ranks train through DeepSpeed's engine (ZeRO-2 by
default). One process has nothing to partition or reduce, and there DeepSpeed's engine cost a fifth of a gpt-oss-20b
step on an H200 (scratch profile): its optimizer wrapper checks every gradient for inf/NaN with ~7 small kernels each
and reads the result on the host mid-step, so the GPU waited ~45 ms per step while the host issued the rest of the
step one small kernel at a time. ``LocalEngine`` does the same math without a host sync: the LoRA weights are fp32
already (they are the master copy), the gradient norm and clipping are a few multi-tensor kernels, and the fused
AdamW skips a step whose gradients are not finite on the device (as DeepSpeed skips it). `--zero-stage` or
`--deepspeed CFG.json` on one process still select DeepSpeed's engine. benchmarks/bench_trainer.py measures the
trainer against bench_e2e's bare loop.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank_arg: int = -1, cfg=None) -> Dist:
    """The process group; through DeepSpeed's init only where its engine will train (``uses_deepspeed``: several
    ranks, or cfg's --zero-stage / --deepspeed). Elsewhere torch's alone: on a CPU DeepSpeed's init builds its shm
    extension, 30-70 s the first time, for an engine one process does not use."""
    if "RANK" not in os.environ:  # plain `python fastft/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(max(local_rank_arg, 0)))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg >= 0 else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        why = f"{world} ranks" if world > 1 else "--zero-stage / --deepspeed"
        deepspeed = import_deepspeed(why) if (uses_deepspeed(cfg, world) if cfg else world > 1) else None
        if deepspeed is None:  # fastft's own engine: torch's process group is all it needs
            torch.distributed.init_process_group(backend, rank=rank, world_size=world)
        else:
            deepspeed.init_distributed(dist_backend=backend)
    return Dist(rank, world, local_rank, device)


class DeepSpeedMissing(ImportError):
    """DeepSpeed is not installed but the run needs its engine (several ranks, --zero-stage, --deepspeed)."""

    def __init__(self, why: str):
        super().__init__(f"{why} train through DeepSpeed, which is not installed: install it (DS_BUILD_OPS=0 pip "
                         f"install --no-build-isolation deepspeed, after torch), or train on one process without "
                         f"--zero-stage / --deepspeed")


def import_deepspeed(why: str):
    """The deepspeed module; DeepSpeedMissing(why) when it is not installed."""
    try:
        import deepspeed
    except ImportError:
        raise DeepSpeedMissing(why) from None
    return deepspeed


def shutdown_distributed():
    """Ends the process group init_distributed started: left open, torch warns at exit on every GPU run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def uses_deepspeed(cfg, world_size: int) -> bool:
    """DeepSpeed's engine for several ranks, or when a ZeRO stage or a DeepSpeed config is asked for."""
    return world_size > 1 or cfg.zero_stage is not None or cfg.deepspeed is not None


class LocalEngine:
    """The part of DeepSpeed's engine interface the trainer uses, for one process: ``engine(**batch)``,
    ``backward(loss)`` (scaled by 1 / grad_accum), ``step()`` (an optimizer step every grad_accum calls: gradient
    norm, clipping, AdamW, then the schedule), ``get_global_grad_norm()``, ``global_steps``, ``optimizer``."""

    def __init__(self, module, params, optimizer, scheduler, grad_accum: int, max_grad_norm: float):
        self.module, self.params, self.optimizer, self.scheduler = module, list(params), optimizer, scheduler
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self.micro_steps = self.global_steps = 0
        self._norm = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def backward(self, loss):
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        grads = [p for p in self.params if p.grad is not None]
        # max_norm inf: the norm for the log, gradients left as they are (clipping multiplies by min(1, max / norm))
        self._norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm or float("inf"), foreach=True)
        if self.optimizer.defaults.get("fused"):  # a non-finite gradient skips this step, decided on the device
            self.optimizer.found_inf = (~torch.isfinite(self._norm)).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_steps += 1

    def get_global_grad_norm(self):
        return self._norm


def adamw(params, cfg, fused: bool):
    """The optimizer of both engines: AdamW on the fp32 LoRA weights. fused (CUDA, the local engine: one kernel for
    all of them, and its found_inf skip); DeepSpeed's engine keeps torch's default implementation, which its ZeRO
    state handling (and fastft's checkpoint resume under ZeRO) expects."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                             eps=1e-8, fused=fused)


def deepspeed_config(cfg, micro_batch: int, grad_accum: int, world_size: int, dtype: torch.dtype,
                     warn=None) -> dict:
    """The generated config; --deepspeed FILE overrides it key by key (batch sizes always follow the CLI: a file
    that sets one otherwise is told so through ``warn``)."""
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": 2 if cfg.zero_stage is None else cfg.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,  # fastft's observers report progress
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed:
        with open(cfg.deepspeed) as f:
            user = json.load(f)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            value = user.pop(key, None)
            if value is not None and value != "auto" and value != ds[key] and warn is not None:
                warn(f"--deepspeed {cfg.deepspeed}: {key} {value} is replaced by {ds[key]} (the batch follows "
                     f"--batch-size / --batch-tokens and --micro-batch-size)")
        ds.update(user)
    return ds
