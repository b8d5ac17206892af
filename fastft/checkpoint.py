"""Training checkpoints: safetensors + JSON only, written atomically, independent of the number of ranks.

Layout of <output_dir>/checkpoint-<step>/:
  adapter_model.safetensors, adapter_config.json   the LoRA adapter at that step (PEFT format, usable as is)
  optimizer.safetensors   per trainable parameter: fp32 master weight, exp_avg, exp_avg_sq (gathered from ZeRO)
  rng-rank<r>.safetensors  each rank's torch (and CUDA) RNG state, so dropout masks continue identically
  trainer_state.json      step, epoch, optimizer step count, losses so far
<output_dir>/latest names the newest complete checkpoint. A checkpoint is written to a temporary folder, fsynced and
renamed; `latest` is replaced by rename too. A kill at any moment leaves `latest` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
LATEST = "latest"


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(output_dir: Path) -> Path | None:
    marker = Path(output_dir) / LATEST
    if not marker.is_file():
        return None
    ckpt = Path(output_dir) / marker.read_text().strip()
    return ckpt if (ckpt / "trainer_state.json").is_file() else None


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _full_state(engine, param):
    """(fp32 master, exp_avg, exp_avg_sq) of one parameter, whatever the ZeRO stage. Collective under ZeRO."""
    master = _zero_master(param)
    if master is not None:
        from deepspeed.utils import safe_get_full_optimizer_state

        m, v = (safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq"))
        return master, m, v
    state = _base_optimizer(engine).state.get(param, {})  # no ZeRO, fp32: the torch optimizer holds the param itself
    return param.detach().float(), state.get("exp_avg"), state.get("exp_avg_sq")


def save(output_dir: Path, step: int, engine, named_params: dict, trainer_state: dict, save_adapter, rank: int,
         keep: int) -> Path:
    """Every rank calls this (ZeRO gathers are collective); rank 0 writes everything but its peers' RNG files."""
    output_dir = Path(output_dir)
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    final = output_dir / f"{PREFIX}{step}"
    tensors = {}
    for name, p in named_params.items():
        master, m, v = _full_state(engine, p)
        tensors[f"{name}.master"] = master.detach().float().cpu().contiguous()
        if m is not None:
            tensors[f"{name}.exp_avg"] = m.detach().float().cpu().contiguous()
            tensors[f"{name}.exp_avg_sq"] = v.detach().float().cpu().contiguous()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        _write(tmp, final, tensors, trainer_state, save_adapter, rank)
    except BaseException:  # a full disk: the partial copy would only hold the space a retry needs
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        _write_atomic(output_dir / LATEST, final.name)
        _prune(output_dir, keep)
    _barrier()
    return final


def _write(tmp: Path, final: Path, tensors: dict, trainer_state: dict, save_adapter, rank: int) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng-rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_adapter(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """fastft's checkpoint-<step> folders, oldest first. Other names that start with the prefix (a user's
    checkpoint-best copy, notes) are not fastft's: never pruned, never cleared."""
    steps = [(int(p.name[len(PREFIX):]), p) for p in Path(output_dir).glob(f"{PREFIX}*")
             if is_step_name(p.name) and p.is_dir()]
    return [p for _, p in sorted(steps)]


def is_step_name(name: str) -> bool:
    """checkpoint-<step>, fastft's name for a checkpoint folder (not checkpoint-best or other names a user gives)."""
    step = name[len(PREFIX):]
    return name.startswith(PREFIX) and step.isdigit() and step.isascii()


def _prune(output_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(ckpt: Path, engine, named_params: dict, rank: int) -> dict:
    """Restores master weights, Adam moments, step counts and this rank's RNG; returns trainer_state."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    base = _base_optimizer(engine)
    zero = _zero_master(next(iter(named_params.values()))) is not None  # ZeRO keeps its own masters
    if zero:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        _ensure_adam_state(engine)
    for name, p in named_params.items():
        master = tensors[f"{name}.master"]
        m, v = tensors.get(f"{name}.exp_avg"), tensors.get(f"{name}.exp_avg_sq")
        with torch.no_grad():
            p.copy_(master.to(p.dtype))
        if zero:
            safe_set_full_fp32_param(p, master.to(p.device))
            if m is not None:
                safe_set_full_optimizer_state(p, m.to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, v.to(p.device), "exp_avg_sq")
        elif m is not None:  # a fused AdamW keeps its step count on the parameter's device
            on = p.device if base.defaults.get("fused") else "cpu"
            base.state[p] = {"step": torch.tensor(float(state["optimizer_steps"]), device=on),
                             "exp_avg": m.to(p.device), "exp_avg_sq": v.to(p.device)}
    for s in base.state.values():
        if "step" in s:
            s["step"] = torch.full_like(torch.as_tensor(s["step"], dtype=torch.float32), float(state["optimizer_steps"]))
    rng_file = ckpt / f"rng-rank{rank}.safetensors"
    if not rng_file.exists():
        rng_file = ckpt / "rng-rank0.safetensors"
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def _zero_master(param):
    """The fp32 master ZeRO holds for this parameter (gathered: collective), or None: not under ZeRO, or no
    DeepSpeed installed (one process on fastft's own engine)."""
    if "deepspeed" not in sys.modules:  # never imported, so nothing is under ZeRO (and importing it takes seconds)
        return None
    try:
        from deepspeed.utils import safe_get_full_fp32_param
    except ImportError:
        return None
    return safe_get_full_fp32_param(param)


def _ensure_adam_state(engine) -> None:
    """Adam creates its state at the first step and ZeRO links its per-parameter views of it then; a resume
    happens before any step, so create the (zero) state and link it now, to be overwritten by the checkpoint."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for flat in group["params"]:
            if not base.state.get(flat):
                base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
