"""Checkpoints are atomic: a crash while one is written leaves `latest` on the previous complete checkpoint."""

import types

import pytest
import torch

from fastft import checkpoint


def _engine(param):
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    return types.SimpleNamespace(optimizer=opt)


def test_crash_during_write_keeps_the_last_complete_checkpoint(tmp_path):
    p = torch.nn.Parameter(torch.randn(4, 3))
    engine = _engine(p)
    good = checkpoint.save(tmp_path, 1, engine, {"w": p}, {"step": 1, "optimizer_steps": 1, "history": {}},
                           lambda d: (d / "adapter_config.json").write_text("{}"), rank=0, keep=2)
    assert checkpoint.latest_checkpoint(tmp_path) == good

    def crash(d):
        (d / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, engine, {"w": p}, {"step": 2, "optimizer_steps": 2, "history": {}}, crash,
                        rank=0, keep=2)
    assert checkpoint.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / f"{checkpoint.PREFIX}2").exists()
    assert not (tmp_path / f".tmp-{checkpoint.PREFIX}2").exists()  # (on a full disk, the space a retry needs)
    state = checkpoint.load(good, engine, {"w": p}, rank=0)
    assert state["step"] == 1


def test_old_checkpoints_are_pruned(tmp_path):
    p = torch.nn.Parameter(torch.randn(2))
    engine = _engine(p)
    for step in range(1, 5):
        checkpoint.save(tmp_path, step, engine, {"w": p}, {"step": step, "optimizer_steps": step, "history": {}},
                        lambda d: None, rank=0, keep=2)
    assert sorted(d.name for d in tmp_path.glob(f"{checkpoint.PREFIX}*")) == ["checkpoint-3", "checkpoint-4"]


def test_prune_leaves_what_is_not_a_checkpoint_step(tmp_path):
    """A user's checkpoint-best copy or checkpoint-notes.txt is neither pruned nor a crash."""
    p = torch.nn.Parameter(torch.randn(2))
    engine = _engine(p)
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-notes.txt").write_text("mine")
    for step in (9, 10, 11):
        checkpoint.save(tmp_path, step, engine, {"w": p}, {"step": step, "optimizer_steps": step, "history": {}},
                        lambda d: None, rank=0, keep=2)
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-10", "checkpoint-11"]
    assert (tmp_path / "checkpoint-best").is_dir() and (tmp_path / "checkpoint-notes.txt").read_text() == "mine"
