"""Process-group setup and the DeepSpeed config fastft generates.

`python fastft/train.py` runs as a single process: it sets the distributed environment itself, so the same code
path (deepspeed.initialize) serves one CPU, one GPU and `deepspeed --num_gpus N`.
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


def init_distributed(local_rank_arg: int = -1) -> Dist:
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
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def deepspeed_config(cfg, micro_batch: int, grad_accum: int, world_size: int, dtype: torch.dtype) -> dict:
    """The generated config; --deepspeed FILE overrides it key by key (batch sizes always follow the CLI)."""
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,  # fastft's observers report progress
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed:
        with open(cfg.deepspeed) as f:
            user = json.load(f)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            user.pop(key, None)
        ds.update(user)
    return ds
