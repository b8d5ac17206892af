"""Loading GPT-OSS checkpoints: a local directory or a cached hub id, streamed tensor by tensor from safetensors.

Expert weights come either dense (``...experts.gate_up_proj``, as ``save_pretrained`` writes them) or in the hub's
MXFP4 layout (``...experts.gate_up_proj_blocks`` / ``_scales`` uint8, see fastft.mxfp4). MXFP4 experts are
dequantised on the target device one expert at a time (bounded scratch), or, with ``keep_mxfp4=True``, kept 4-bit as
MXFP4Tensor buffers (the model then never holds the dense weights).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fastft.assets import BUILTIN_MODELS
from fastft.backends import Backend
from fastft.model.config import ModelConfig
from fastft.model.gpt_oss import Experts, GptOssForTraining
from fastft.mxfp4 import BLOCK, MXFP4Tensor, dequantize_expert_param

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(Exception):
    """A model that cannot be loaded, for a reason the user can act on (the message says which)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No such local directory, and not a cached hub id."""


class CheckpointError(ModelLoadError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model directory, the built-in ``tiny`` model, or a hub id already in the local HF cache."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        if not (builtin / "config.json").is_file():
            raise ModelNotFoundError(f"the built-in {name} model is missing ({builtin}); reinstall fastft")
        return builtin
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"--model {name}: a file; pass the model directory (config.json + *.safetensors)")
    if _HUB_ID.match(name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name, local_files_only=True))
        except Exception as e:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
            raise ModelNotFoundError(
                f"{name!r} is not a local directory and not in the Hugging Face cache, and fastft never downloads "
                f"(this machine may have no network). Download it where there is network, e.g. "
                f"`hf download {name} --local-dir DIR`, then pass --model DIR; or use --model tiny. "
                f"({type(e).__name__})") from None
    raise ModelNotFoundError(f"--model {name}: no such directory (expected config.json + *.safetensors), and not a "
                            f"hub id of the form owner/name")


def weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single-file checkpoint."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            with open(index) as f:
                return dict(json.load(f)["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    single = model_dir / SINGLE
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{single}: unreadable safetensors file ({e}); is it truncated?") from None
    hint = " (pickled .bin checkpoints are not supported)" if any(model_dir.glob("*.bin")) else ""
    raise CheckpointError(f"{model_dir}: no {INDEX} or {SINGLE}{hint}")


def _sources(model: GptOssForTraining, wmap: dict) -> dict[str, tuple[str, ...]]:
    """model tensor name -> checkpoint tensor name(s): one for dense tensors and for experts kept 4-bit (their buffers
    carry the checkpoint's names), (blocks, scales) for MXFP4 experts to dequantise."""
    sources = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and model.config.tie_word_embeddings and name not in wmap:
            continue
        module, _, leaf = name.rpartition(".")
        if leaf in Experts.WEIGHTS and name not in wmap and f"{name}_blocks" in wmap:
            sources[name] = (f"{name}_blocks", f"{name}_scales")
        else:
            sources[name] = (name,)
    return sources


def _quantize_placeholders(model: GptOssForTraining, wmap: dict):
    """Turns the (meta) dense expert weights into MXFP4 buffers where the checkpoint is MXFP4."""
    found = False
    for mname, module in model.named_modules():
        if not isinstance(module, Experts):
            continue
        for w in Experts.WEIGHTS:
            if f"{mname}.{w}_blocks" not in wmap:
                continue
            E, fan_in, fan_out = module.weight_shape(w)
            blocks = torch.empty(E, fan_out, fan_in // BLOCK, BLOCK // 2, dtype=torch.uint8, device="meta")
            module.set_quantized(w, MXFP4Tensor(blocks, torch.empty(blocks.shape[:-1], dtype=torch.uint8,
                                                                    device="meta")))
            found = True
    if not found:
        raise CheckpointError("keep_mxfp4=True needs a checkpoint with MXFP4 experts (*_blocks / *_scales)")


def _read(f, shard: Path, key: str, shape: tuple, dtype=None) -> torch.Tensor:
    try:
        got = tuple(f.get_slice(key).get_shape())
        if got != tuple(shape):
            raise CheckpointError(f"{shard}: tensor {key} has shape {list(got)}, the model expects {list(shape)}")
        t = f.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{shard}: cannot read tensor {key} ({e}); is the file truncated?") from None
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"{shard}: tensor {key} is {t.dtype}, expected {dtype}")
    return t


@torch.no_grad()
def _dequantize_into(dst: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor):
    for e in range(dst.shape[0]):  # one expert at a time bounds the fp32 scratch
        b, s = blocks[e:e + 1].to(dst.device), scales[e:e + 1].to(dst.device)
        dst[e].copy_(dequantize_expert_param(b, s, torch.float32)[0])


@torch.no_grad()
def load_weights(model: GptOssForTraining, model_dir: Path, wmap: dict | None = None):
    """Fills every tensor of ``model`` (already allocated on its device) from the checkpoint, shard by shard."""
    wmap = weight_map(model_dir) if wmap is None else wmap
    origin = model_dir / (INDEX if (model_dir / INDEX).is_file() else SINGLE)
    state = model.state_dict()
    sources = _sources(model, wmap)
    missing = sorted({src for srcs in sources.values() for src in srcs if src not in wmap})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{origin}: missing tensor(s) {', '.join(missing[:5])}{more}")
    wanted = {src for srcs in sources.values() for src in srcs}
    unexpected = sorted(set(wmap) - wanted)
    if unexpected:
        warnings.warn(f"{origin}: ignoring {len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[0]}")

    by_shard = defaultdict(list)
    for src in wanted:
        by_shard[wmap[src]].append(src)
    pending = {}  # MXFP4 halves waiting for their partner (possibly in a later shard)
    target = {src: name for name, srcs in sources.items() for src in srcs}
    for shard_name in sorted(by_shard):
        shard = model_dir / shard_name
        if not shard.is_file():
            raise CheckpointError(f"{origin}: shard {shard_name} is listed but missing from {model_dir}")
        try:
            f = safe_open(shard, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard}: unreadable safetensors file ({e}); is it truncated?") from None
        with f:
            for src in sorted(by_shard[shard_name]):
                name = target[src]
                dst = state[name]
                if len(sources[name]) == 1:
                    dst.copy_(_read(f, shard, src, dst.shape))
                    continue
                E, fan_in, fan_out = dst.shape
                is_blocks = src.endswith("_blocks")
                shape = (E, fan_out, fan_in // BLOCK, BLOCK // 2) if is_blocks else (E, fan_out, fan_in // BLOCK)
                pending[src] = _read(f, shard, src, shape, torch.uint8)
                blocks_key, scales_key = sources[name]
                if blocks_key in pending and scales_key in pending:
                    _dequantize_into(dst, pending.pop(blocks_key), pending.pop(scales_key))


def load_model(name_or_path: str | Path, dtype=torch.float32, device="cpu", backend: Backend | None = None,
               keep_mxfp4: bool = False) -> GptOssForTraining:
    """A GPT-OSS checkpoint as a GptOssForTraining on ``device``: base weights in ``dtype`` (norms fp32), frozen
    later by apply_lora."""
    model_dir = resolve_model_path(name_or_path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json")
    try:
        cfg = ModelConfig.from_json(config_path)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    wmap = weight_map(model_dir)
    with torch.device("meta"):
        model = GptOssForTraining(cfg, backend)
    model.to_dtype(dtype)
    if keep_mxfp4:
        _quantize_placeholders(model, wmap)
    model.to_empty(device=device)  # allocates in dtype directly: a full-size model never exists in fp32
    load_weights(model, model_dir, wmap)
    model.source_dir = str(model_dir)
    return model


def load_tokenizer(name_or_path: str | Path):
    """The model directory's tokenizer (local files only, no remote code)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({e})") from None
