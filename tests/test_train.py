"""End-to-end trainer tests on the built-in tiny model (CPU, gloo): outputs, learning, resume, launcher, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "fastft" / "train.py"
_port = [29600 + (os.getpid() % 200) * 10]


def next_port() -> str:
    _port[0] += 1
    return str(_port[0])


def write_data(path: Path, n: int = 48) -> Path:
    colours = ["red", "blue", "green", "amber", "violet", "silver"]
    with open(path, "w") as f:
        for i in range(n):
            c = colours[i % len(colours)]
            f.write(json.dumps({"question": f"What colour is box {i % 12}?",
                                "answer": f"Box {i % 12} is {c}. It has always been {c}."}) + "\n")
    return path


def train_env(env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"MASTER_PORT": next_port(), "PYTHONUNBUFFERED": "1"})
    env.update(env_extra or {})
    return env


def run_train(args, env_extra=None, timeout=600, check=True, cwd=None):
    r = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, env=train_env(env_extra),
                       timeout=timeout, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}")
    return r


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["type"] == "train"]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in train_rows(out)]


def start_train(args, out: Path, steps_done: int, checkpointed: bool, **popen) -> subprocess.Popen:
    """The trainer in the background, returned once ``steps_done`` steps are logged (and, if ``checkpointed``, a
    checkpoint exists)."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args, "--output-dir", str(out)], env=train_env(), **popen)
    deadline = time.time() + 300
    while time.time() < deadline:
        ready = (out / "latest").exists() or not checkpointed
        if ready and (out / "metrics.jsonl").exists() and len(losses(out)) >= steps_done:
            return proc
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before {steps_done} steps were logged")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {steps_done} steps logged in time")


COMMON = ["--model", "tiny", "--max-seq-len", "256", "--batch-size", "2", "--lora-targets", "attn", "--lora-r", "8",
          "--learning-rate", "3e-3", "--no-progress", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = write_data(tmp / "data.jsonl")
    out = tmp / "out"
    r = run_train([str(data), *COMMON, "--epochs", "4", "--eval-fraction", "0.1", "--output-dir", str(out)])
    return data, out, r


def test_outputs_are_complete(trained):
    _, out, r = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.json",
                 "metadata.json", "metrics.jsonl", "loss.png", "latest"):
        assert (out / name).exists(), name
    assert list((out / "runs").iterdir()), "no TensorBoard events"
    meta = json.loads((out / "metadata.json").read_text())
    for key in ("versions", "git_revision", "data", "steps", "wall_seconds", "tokens_per_s", "final_train_loss",
                "final_eval_loss"):
        assert key in meta, key
    assert meta["versions"]["torch"] and meta["data"]["files"]
    assert all(len(h) == 64 for h in meta["data"]["files"].values())
    assert meta["weights"] == {"experts": "dense", "linears": "dense", "embedding": "device", "lm_head": "bf16"}
    assert meta["engine"] == "fastft (one process)" and meta["zero_stage"] is None
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    assert "Adapter written to" in r.stdout


def test_logged_lr_is_the_steps_own(tmp_path, trained):
    out = tmp_path / "out"
    run_train([str(trained[0]), *COMMON, "--max-steps", "3", "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["type"] == "train"]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] > 0  # no warm-up: step 1 runs at the peak; the cosine ends after


def test_loss_falls(trained):
    _, out, _ = trained
    curve = losses(out)
    assert len(curve) >= 8
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.7 * first, curve


def test_adapter_reloads_in_stock_peft(trained):
    """The trained adapter, loaded by stock PEFT on stock transformers, reproduces fastft's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastft.backends import get_backend
    from fastft.model import load_adapter, load_model, resolve_model_path

    tiny_model_path = lambda: str(resolve_model_path("tiny"))  # noqa: E731

    _, out, _ = trained
    ids = torch.randint(0, 500, (40,))
    pos = torch.arange(40)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    ours = load_model(tiny_model_path(), dtype=torch.float32, device="cpu", backend=get_backend("torch"))
    load_adapter(ours, out)
    ours.eval()
    with torch.no_grad():
        mine = ours.logits(ids, pos, cu)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids[None]).logits[0]
    assert (mine - theirs).norm() / theirs.norm() < 1e-5


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, trained):
    data = trained[0]
    args = [str(data), *COMMON, "--epochs", "3", "--save-every", "3", "--lora-dropout", "0.1"]
    ref_out = tmp_path / "ref"
    run_train(args + ["--output-dir", str(ref_out)])
    out = tmp_path / "killed"
    # killed hard once a checkpoint exists and training went past it
    proc = start_train(args, out, 5, checkpointed=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_train(args + ["--output-dir", str(out), "--resume"])
    assert losses(out) == pytest.approx(losses(ref_out), rel=1e-5, abs=1e-6)
    # metadata.json totals the whole run: the killed segment up to the checkpoint resumed from, then the resumed one
    meta = json.loads((out / "metadata.json").read_text())
    first, second = meta["segments"]
    assert first["start_step"] == 0 and first["end_step"] == second["start_step"] > 0
    assert second["end_step"] == meta["steps"] == len(losses(ref_out))
    assert meta["tokens_processed"] == sum(r["tokens"] for r in train_rows(out))
    # Adam's step count is the run's, not the resumed segment's: a second resume from this checkpoint stays exact
    state = json.loads((out / (out / "latest").read_text() / "trainer_state.json").read_text())
    assert state["optimizer_steps"] == state["step"]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_by_signal_saves_and_exits_with_the_shells_status(tmp_path, trained, sig, status):
    """Ctrl-C / SIGTERM: the step finishes, a checkpoint is saved, the last line says that the run stopped early and
    how to continue, and the exit status is the shell's for that signal (a script must not take the run for
    finished). --resume then finishes it, and metadata.json describes both segments and their totals."""
    args = [str(trained[0]), *COMMON, "--epochs", "100"]  # far more steps than it takes to send the signal
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = start_train(args, out, 2, checkpointed=False, stdout=subprocess.DEVNULL, stderr=err)
        proc.send_signal(sig)
        assert proc.wait(timeout=300) == status, log.read_text()[-3000:]
    stderr = log.read_text()
    stopped = int((out / "latest").read_text().removeprefix("checkpoint-"))
    assert "Traceback" not in stderr and len(losses(out)) == stopped
    last = [line for line in stderr.splitlines() if line.startswith("fastft: ")][-1]  # (torch may warn after it)
    assert re.fullmatch(re.escape(f"fastft: stopped early by {sig.name} at step {stopped}/") + r"\d+ " + re.escape(
        f"(checkpoint {out}/checkpoint-{stopped}); to continue, run the same command with --resume added (same data "
        f"and options, --output-dir {out})"), last)

    run_train(args + ["--max-steps", str(stopped + 2), "--output-dir", str(out), "--resume"])
    meta = json.loads((out / "metadata.json").read_text())
    segments = meta["segments"]
    assert [(s["start_step"], s["end_step"]) for s in segments] == [(0, stopped), (stopped, stopped + 2)]
    assert meta["steps"] == stopped + 2 and len(losses(out)) == stopped + 2
    assert meta["tokens_processed"] == sum(s["tokens"] for s in segments) == sum(r["tokens"] for r in train_rows(out))
    for key in ("wall_seconds", "train_loop_seconds"):
        assert meta[key] == pytest.approx(sum(s[key] for s in segments))
    assert all(s["wall_seconds"] > s["train_loop_seconds"] > 0 for s in segments)
    assert meta["tokens_per_s"] == pytest.approx(meta["tokens_processed"] / meta["train_loop_seconds"])


def test_run_totals_add_segments_up():
    from fastft.train import run_totals

    segments = [{"start_step": 0, "end_step": 4, "wall_seconds": 10.0, "train_loop_seconds": 8.0, "tokens": 400,
                 "peak_gpu_memory_gib": 3.0},
                {"start_step": 4, "end_step": 6, "wall_seconds": 5.0, "train_loop_seconds": 2.0, "tokens": 200,
                 "peak_gpu_memory_gib": 4.5}]
    assert run_totals(segments) == {"wall_seconds": 15.0, "train_loop_seconds": 10.0, "tokens_processed": 600,
                                    "tokens_per_s": 60.0, "peak_gpu_memory_gib": 4.5}
    cpu = [dict(s, peak_gpu_memory_gib=None) for s in segments]
    assert run_totals(cpu)["peak_gpu_memory_gib"] is None


def test_second_resume_matches_uninterrupted(tmp_path, trained):
    """A checkpoint written by a resumed run resumes exactly too: from a copy of step 3's checkpoint to step 6, from
    a copy of that run's step 6 to the end, the losses are those of one uninterrupted run."""
    import shutil

    args = [str(trained[0]), *COMMON, "--max-steps", "9", "--save-every", "3", "--keep-checkpoints", "5"]
    ref = tmp_path / "ref"
    run_train(args + ["--output-dir", str(ref)])

    def resume_from(src: Path, step: int, dst: Path):
        dst.mkdir()
        shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
        shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
        (dst / "latest").write_text(f"checkpoint-{step}")
        run_train(args + ["--output-dir", str(dst), "--resume"])

    resume_from(ref, 3, tmp_path / "once")
    resume_from(tmp_path / "once", 6, tmp_path / "twice")
    assert losses(tmp_path / "twice") == pytest.approx(losses(ref), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("change, message", [
    (["--lora-r", "4"], "LoRA"),
    (["--max-seq-len", "128"], "--max-seq-len"),
])
def test_resume_with_other_options_is_refused(tmp_path, trained, change, message):
    out = tmp_path / "out"
    run_train([str(trained[0]), *COMMON, "--max-steps", "2", "--output-dir", str(out)])
    r = run_train([str(trained[0]), *COMMON, "--max-steps", "4", "--output-dir", str(out), "--resume", *change],
                  check=False)
    assert r.returncode == 1 and message in r.stderr and "different run" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_overwrite_keeps_the_old_run_until_training_starts(tmp_path, trained):
    out = tmp_path / "out"
    run_train([str(trained[0]), *COMMON, "--max-steps", "2", "--output-dir", str(out)])
    r = run_train([str(tmp_path / "missing.jsonl"), *COMMON, "--output-dir", str(out), "--overwrite"], check=False)
    assert r.returncode != 0 and "missing.jsonl" in r.stderr
    assert (out / "latest").exists() and list(out.glob("checkpoint-*"))
    (out / "checkpoint-best").mkdir()  # the user's, not fastft's: --overwrite leaves them
    (out / "checkpoint-notes.txt").write_text("mine")
    run_train([str(trained[0]), *COMMON, "--max-steps", "1", "--output-dir", str(out), "--overwrite"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-best",
                                                                "checkpoint-notes.txt"]
    assert len(list((out / "runs").iterdir())) == 1  # the older run's TensorBoard events are gone


FASTFT_STATE = '{"step": 2, "plan": {}, "run": {}}'  # the keys fastft's trainer_state.json has (HF's has others)


def make_old_run(out: Path) -> None:
    """What a finished older run leaves (by name and content), as fastft.output_dir recognises it."""
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text(FASTFT_STATE)
    (out / "latest").write_text("checkpoint-2")
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.1.host.1.0").write_text("old")
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 9.0}\n')
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_config.json", "loss.png",
                 "tokenizer.json"):
        (out / name).write_text("old")
    (out / "metadata.json").write_text(json.dumps({"written_by": "fastft", "outputs": [
        "adapter_model.safetensors", "adapter_config.json", "training_config.json", "metadata.json", "loss.png",
        "metrics.jsonl", "tokenizer.json"]}))


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_sets_only_fastfts_outputs_aside_and_deletes_them_once_the_new_run_completes(tmp_path):
    from fastft import output_dir

    make_old_run(tmp_path)
    for mine in ("checkpoint-best/x", "checkpoint-notes.txt", "notes.txt", "runs-mine/events.out.tfevents.x"):
        (tmp_path / mine).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / mine).write_text("mine")
    # fastft's names, but not its checkpoints: no trainer_state.json, or Hugging Face Trainer's
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "trainer_state.json").write_text('{"global_step": 500, "log_history": []}')
    with pytest.raises(output_dir.OutputDirError, match="checkpoint-500, checkpoint-7, which fastft cannot tell"):
        output_dir.prepare(TrainConfigFor(tmp_path, overwrite=True))
    (tmp_path / "checkpoint-7").rmdir()
    (tmp_path / "checkpoint-500").rename(tmp_path / "hf-checkpoint-500")
    before = tree(tmp_path)
    run, resume_from = output_dir.prepare(TrainConfigFor(tmp_path, overwrite=True))
    assert resume_from is None and tree(tmp_path) == before  # nothing moves before the run writes
    run.begin()
    mine = ["checkpoint-best", "checkpoint-notes.txt", "hf-checkpoint-500", "notes.txt", "runs-mine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output_dir.ASIDE, *mine])
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(FASTFT_STATE)
    run.saved()  # resumable now, not finished: the older run stays aside
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output_dir.ASIDE, "checkpoint-1", *mine])
    run.completed()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint-1", *mine])
    output_dir.finish()  # nothing left to undo
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint-1", *mine])


def test_foreign_files_under_fastfts_names_stop_overwrite_before_anything_changes(tmp_path, trained):
    out = tmp_path / "out"
    make_old_run(out)
    (out / "metadata.json").write_text('{"mine": true}')  # the user's: so are the files only it would vouch for
    before = tree(out)
    r = run_train([str(trained[0]), *COMMON, "--max-steps", "1", "--output-dir", str(out), "--overwrite"],
                  check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (f"fastft: --overwrite: {out} holds adapter_config.json, adapter_model.safetensors, metadata.json, "
            f"tokenizer.json, training_config.json, which fastft cannot tell it wrote") in r.stderr
    assert tree(out) == before


def TrainConfigFor(out: Path, **options):
    from fastft.config import TrainConfig

    return TrainConfig(data=["x.jsonl"], output_dir=str(out), **options)


def main_in_process(args, monkeypatch) -> int:
    """fastft.train.main(args) in this process (so a test may replace a function), with the environment restored
    afterwards (init_distributed sets the process group's variables)."""
    from fastft.train import main

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": next_port()}.items():
        monkeypatch.setenv(key, value)
    return main(args)


def test_overwrite_run_that_fails_before_its_first_checkpoint_puts_the_older_run_back(tmp_path, trained,
                                                                                       monkeypatch, capsys):
    """A second Ctrl-C (or any failure) during the first step: the new run's files go, the older run's come back
    exactly, the user's files are untouched; then a plain run into a fresh folder that fails leaves nothing that
    would block running it again."""
    from fastft import checkpoint

    out = tmp_path / "out"
    make_old_run(out)
    (out / "notes.txt").write_text("mine")
    before = tree(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", interrupted)
    args = [str(trained[0]), *COMMON, "--max-steps", "1"]
    assert main_in_process([*args, "--output-dir", str(out), "--overwrite"], monkeypatch) == 130
    assert tree(out) == before and (out / "checkpoint-2").is_dir()
    assert "the older run's outputs are back" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main_in_process([*args, "--output-dir", str(fresh)], monkeypatch) == 130
    assert not fresh.exists()  # no metrics.jsonl or runs/ left to make the re-run ask for --overwrite


def test_a_run_killed_before_its_first_checkpoint_is_undone_by_the_next_start(tmp_path):
    from fastft import output_dir

    make_old_run(tmp_path)
    before = tree(tmp_path)
    output_dir.prepare(TrainConfigFor(tmp_path, overwrite=True))[0].begin()
    output_dir._HELD.clear()  # SIGKILL: nothing undoes it in this process
    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 3.0}\n{"type": "tr')
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "events.out.tfevents.2.host.2.0").write_text("new")
    run, resume_from = output_dir.prepare(TrainConfigFor(tmp_path, resume=True))
    assert tree(tmp_path) == before and resume_from == tmp_path / "checkpoint-2"


@pytest.fixture
def unwritable_dir(tmp_path):
    """An empty folder no file can be created in, root or not (root ignores the mode bits: the immutable flag)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
        folder.chmod(0o755)
        return
    (folder / "probe").unlink()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        folder.chmod(0o755)
        pytest.skip("no way to make a folder unwritable here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)])
    folder.chmod(0o755)


def test_an_unwritable_output_dir_is_one_message_before_the_model_loads(unwritable_dir, trained):
    r = run_train([str(trained[0]), *COMMON, "--output-dir", str(unwritable_dir)], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"fastft: --output-dir {unwritable_dir}: cannot write into it (" in r.stderr
    assert "fastft data report" not in r.stdout  # before anything was read or loaded


def test_a_full_disk_while_training_says_what_was_saved_last(tmp_path, trained, monkeypatch, capsys):
    import errno

    from fastft import checkpoint

    real_save = checkpoint.save

    def full_at_step_2(output_dir, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir / ".tmp-checkpoint-2"))
        return real_save(output_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", full_at_step_2)
    out = tmp_path / "out"
    args = [str(trained[0]), *COMMON, "--max-steps", "3", "--save-every", "1", "--output-dir", str(out)]
    assert main_in_process(args, monkeypatch) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"fastft: cannot write {out}/.tmp-checkpoint-2 (No space left on device); the last complete checkpoint is "
        f"{out}/checkpoint-1: once that is fixed, run the same command with --resume added")



def test_overwrite_run_failing_after_a_checkpoint_keeps_the_older_run_aside(tmp_path, trained, monkeypatch, capsys):
    """A full disk at the second checkpoint, as safetensors reports it (its own error type): one message, no
    traceback; the new run is resumable and the older run waits aside, deleted only once --resume finishes."""
    from safetensors import SafetensorError

    from fastft import checkpoint, output_dir

    real_save_file = checkpoint.save_file

    def full_at_checkpoint_2(tensors, path, *a, **k):
        if "checkpoint-2" in path:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                  'space left on device" })')
        return real_save_file(tensors, path, *a, **k)

    out = tmp_path / "out"
    make_old_run(out)
    older = tree(out)
    monkeypatch.setattr(checkpoint, "save_file", full_at_checkpoint_2)
    args = [str(trained[0]), *COMMON, "--max-steps", "3", "--save-every", "1", "--output-dir", str(out)]
    assert main_in_process([*args, "--overwrite"], monkeypatch) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    assert f"the last complete checkpoint is {out}/checkpoint-1: once that is fixed, run the same command" in err
    assert f"the older run's outputs stay in {out}/{output_dir.ASIDE} until this run finishes" in err
    assert tree(out / output_dir.ASIDE) == older
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    assert main_in_process([*args, "--resume"], monkeypatch) == 0
    assert not (out / output_dir.ASIDE).exists() and (out / "checkpoint-3").is_dir()



def test_a_set_aside_that_fails_half_way_moves_everything_back(tmp_path, monkeypatch):
    """os.replace failing on one entry (a busy mount point, a read-only subfolder): the entries already moved come
    back, nothing is deleted, and the run's failure is the error."""
    from fastft import output_dir

    make_old_run(tmp_path)
    before = tree(tmp_path)
    real_replace = os.replace

    def busy_runs(src, dst):
        if Path(src).name == "runs":
            raise OSError(16, "Device or resource busy", str(src))
        return real_replace(src, dst)

    run, _ = output_dir.prepare(TrainConfigFor(tmp_path, overwrite=True))
    monkeypatch.setattr(output_dir.os, "replace", busy_runs)
    with pytest.raises(OSError, match="busy"):
        run.begin()
    monkeypatch.setattr(output_dir.os, "replace", real_replace)
    output_dir.finish()
    assert tree(tmp_path) == before and not (tmp_path / output_dir._GATHERING).exists()


def test_a_full_disk_before_training_is_one_message(tmp_path, trained, monkeypatch, capsys):
    """The tokenisation cache written on a full disk (a cache miss): the path and the reason, no traceback."""
    import errno

    import fastft.data

    cache_file = str(tmp_path / "cache" / "tokens-x.arrow")

    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), cache_file)

    monkeypatch.setattr(fastft.data, "prepare", full)
    out = tmp_path / "out"
    assert main_in_process([str(trained[0]), *COMMON, "--output-dir", str(out)], monkeypatch) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"fastft: {cache_file}: No space left on device"
    assert not out.exists()

def test_a_start_completes_what_a_killed_run_left_half_done(tmp_path):
    """SIGKILL in the middle of setting the older run aside, or of putting it back: the next start finishes the
    move, and deletes nothing of the older run; a run killed after its checkpoint keeps both runs."""
    from fastft import output_dir

    def start(out):
        output_dir.prepare(TrainConfigFor(out, overwrite=True))

    # cut short while gathering: part of the older run in the temporary folder, the rest still at the top
    out = tmp_path / "a"
    make_old_run(out)
    older = tree(out)
    (out / output_dir._GATHERING).mkdir()
    for name in ("checkpoint-2", "latest", "runs"):
        os.replace(out / name, out / output_dir._GATHERING / name)
    start(out)
    assert tree(out) == older and sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint-2", "latest", "runs", "metrics.jsonl", "metadata.json", "adapter_model.safetensors",
         "adapter_config.json", "training_config.json", "loss.png", "tokenizer.json"])
    # cut short while putting back: latest already back, the rest aside
    out = tmp_path / "b"
    make_old_run(out)
    older = tree(out)
    aside = out / output_dir.ASIDE
    aside.mkdir()
    for p in list(out.iterdir()):
        if p.name not in (output_dir.ASIDE, "latest", "checkpoint-2"):
            os.replace(p, aside / p.name)
    (aside / output_dir._PUTTING_BACK).touch()
    start(out)
    assert tree(out) == older and not aside.exists()
    # killed after its first checkpoint: the new run at the top, the older one aside, both kept
    out = tmp_path / "c"
    make_old_run(out / output_dir.ASIDE)
    older = tree(out / output_dir.ASIDE)
    make_old_run(out)
    start(out)
    assert tree(out / output_dir.ASIDE) == older and (out / "latest").is_file()

def test_a_signal_while_the_run_starts_stops_it_at_once_and_changes_nothing(tmp_path, trained, monkeypatch,
                                                                             capsys):
    """Ctrl-C or SIGTERM while the data is read (or the model loads) stops there, with the shell's status, and
    --overwrite has not touched the older run."""
    import fastft.data

    out = tmp_path / "out"
    make_old_run(out)
    before = tree(out)
    for sig in (signal.SIGTERM, signal.SIGINT):
        monkeypatch.setattr(fastft.data, "prepare", lambda *a: os.kill(os.getpid(), sig) or time.sleep(30))
        status = main_in_process([str(trained[0]), *COMMON, "--output-dir", str(out), "--overwrite"], monkeypatch)
        assert status == 128 + sig
        assert capsys.readouterr().err.splitlines()[-1] == (f"fastft: stopped by {sig.name} before training "
                                                            f"started; nothing was changed in {out}")
        assert tree(out) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handlers are gone again



@pytest.mark.parametrize("delay", [0.25, 0.3, 1.0])  # in torch's import, in transformers', in main()
def test_ctrl_c_while_python_starts_is_never_a_traceback(tmp_path, delay):
    """Ctrl-C while torch imports (before main() can handle it) or just after: one line, status 130, nothing
    written."""
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(TRAIN), str(data), *COMMON, "--output-dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=train_env())
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("fastft: stopped by SIGINT before training started; nothing was changed")
    assert not out.exists()

def test_resume_from_an_unreadable_checkpoint_is_one_message(tmp_path, trained):
    out = tmp_path / "out"
    run_train([str(trained[0]), *COMMON, "--max-steps", "2", "--output-dir", str(out)])
    state = out / (out / "latest").read_text().strip() / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # cut short
    r = run_train([str(trained[0]), *COMMON, "--max-steps", "3", "--output-dir", str(out), "--resume"], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is not a readable checkpoint" in r.stderr and "--overwrite" in r.stderr


def test_triton_kernels_on_cpu_are_a_clear_usage_error(tmp_path, trained):
    r = run_train([str(trained[0]), *COMMON, "--kernels", "triton", "--output-dir", str(tmp_path / "o")],
                  env_extra={"TRITON_INTERPRET": "0"}, check=False)
    assert r.returncode == 2 and "--kernels triton needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_zero_stage_on_one_process_trains_through_deepspeed_and_resumes_locally(tmp_path, trained):
    """--zero-stage selects DeepSpeed's engine on one process too; its checkpoints resume on fastft's own engine
    (the checkpoint format belongs to neither) to the losses of one uninterrupted run."""
    args = [str(trained[0]), *COMMON, "--max-steps", "6", "--save-every", "3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_train(args + ["--output-dir", str(ref)])
    run_train(args + ["--output-dir", str(out), "--zero-stage", "2"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["zero_stage"] == 2
    assert losses(out) == pytest.approx(losses(ref), rel=1e-4, abs=1e-5)  # same math, another implementation
    (out / "latest").write_text("checkpoint-3")
    run_train(args + ["--output-dir", str(out), "--resume"])
    assert losses(out)[3:] == pytest.approx(losses(ref)[3:], rel=1e-4, abs=1e-5)


def test_non_empty_output_dir_is_refused(tmp_path, trained):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_train([str(trained[0]), "--model", "tiny", "--output-dir", str(out)], check=False)
    assert r.returncode == 1 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message, code", [
    (["--epochs", "0"], "--epochs", 2),
    (["--learning-rate", "abc"], "--learning-rate", 2),
    (["--lora-dropout", "1.5"], "--lora-dropout", 2),
    (["--keep-activations", "lots"], "--keep-activations", 2),
    (["--kernels", "cuda"], "--kernels", 2),
    (["--bogus"], "--bogus", 2),
    (["--lora-targets", "nonsense_proj"], "nonsense_proj", 2),
    (["--batch-size", "3", "--micro-batch-size", "2"], "--batch-size", 2),
    (["--seed", "-1"], "--seed", 2),
])
def test_bad_cli_values_are_clear(tmp_path, trained, args, message, code):
    r = run_train([str(trained[0]), "--model", "tiny", "--output-dir", str(tmp_path / "o"), *args], check=False)
    assert r.returncode == code, r
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was made


def test_a_step_never_takes_a_row_twice():
    """A batch larger than the data: the step takes each packed row once (as many as split into ranks x
    micro-batches), with a warning; too few rows for even one micro-batch per rank is one message."""
    from fastft.config import TrainConfig
    from fastft.train import TrainingError, batch_plan

    said = []
    plan = batch_plan(TrainConfig(data="x.jsonl", batch_size=10**12, max_seq_len=256), 1, 7, said.append)
    assert plan["rows_per_step"] == 7 and plan["grad_accum"] == 7 and plan["steps_per_epoch"] == 1
    assert said == ["--batch-size 1000000000000 asks for 1,000,000,000,000 packed rows per step, but the data packs "
                    "into 7 of --max-seq-len 256: a step takes 7, each row once"]
    plan = batch_plan(TrainConfig(data="x.jsonl", batch_tokens=4096 * 4000, micro_batch_size=2), 2, 7, said.append)
    assert plan["rows_per_step"] == 4 and plan["grad_accum"] == 1 and said[-1].startswith("--batch-tokens")
    assert batch_plan(TrainConfig(data="x.jsonl", batch_size=4), 1, 7, said.append)["rows_per_step"] == 4
    assert len(said) == 2  # a batch the data holds: no warning
    with pytest.raises(TrainingError, match="packs into 3 row.* fewer than one step's 2 rank.* x --micro-batch-size 2"):
        batch_plan(TrainConfig(data="x.jsonl", batch_size=8, micro_batch_size=2), 2, 3, said.append)


def test_a_huge_batch_trains_on_each_row_once(tmp_path, trained):
    out = tmp_path / "o"
    r = run_train([str(trained[0]), *COMMON, "--max-seq-len", "4096", "--batch-size", "100000000", "--max-steps", "1",
                   "--output-dir", str(out)])
    assert "a step takes 2, each row once" in r.stderr
    assert json.loads((out / "metadata.json").read_text())["plan"]["rows_per_step"] == 2


@pytest.mark.parametrize("text, kind", [("[1]", "an array"), ('"zero"', "a string"), ("null", "null")])
def test_a_deepspeed_file_that_is_not_a_json_object_is_a_command_line_error(tmp_path, text, kind):
    from fastft.config import CliError, parse_args

    f = tmp_path / "ds.json"
    f.write_text(text)
    with pytest.raises(CliError) as e:
        parse_args(["x.jsonl", "--deepspeed", str(f)])
    assert str(e.value) == (f'--deepspeed {f}: expected a JSON object of DeepSpeed settings ({{"zero_optimization": '
                            f'...}}), got {kind}')


@pytest.mark.parametrize("mode", [["--validate-only"], []])
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "3", "--micro-batch-size", "2"], "a step of 3 rows does not split into 1 rank(s) x micro-"),
    (["--max-seq-len", "200000"], "--max-seq-len 200,000 is longer than --model tiny's context "
                                  "(max_position_embeddings 131,072); use at most that"),
])
def test_validate_only_refuses_what_training_refuses(tmp_path, trained, mode, args, message):
    r = run_train([str(trained[0]), "--model", "tiny", "--output-dir", str(tmp_path / "o"), *args, *mode],
                  check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"fastft: error: {message}" in r.stderr and not (tmp_path / "o").exists()



def test_a_batch_that_does_not_split_names_the_option_to_change():
    from fastft.data import UsageError
    from fastft.train import rows_per_step

    with pytest.raises(UsageError, match="micro-batches of 4; choose --batch-size as a multiple of 4$"):
        rows_per_step(TrainConfigFor(Path("o"), batch_size=6, micro_batch_size=4), 1)
    with pytest.raises(UsageError, match="--batch-tokens 3000 asks for 3 rows of --max-seq-len 1024: choose "
                                         "--batch-tokens as a multiple of 2048$"):
        rows_per_step(TrainConfigFor(Path("o"), batch_tokens=3000, max_seq_len=1024, micro_batch_size=2), 1)

def test_data_errors_print_the_report_without_a_doubled_prefix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    r = run_train([str(bad), "--model", "tiny", "--output-dir", str(tmp_path / "o")], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "fastft data report" in r.stderr.splitlines() and f"{bad}:2:2: invalid JSON" in r.stderr
    assert "fastft: fastft" not in r.stderr
    assert not (tmp_path / "o").exists()  # the folder made for the run went again: nothing was written into it


@pytest.mark.parametrize("mode", [["--validate-only"], ["--max-steps", "1"]])
def test_a_pipe_as_data_is_refused_at_once(tmp_path, mode):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    r = run_train([str(fifo), "--model", "tiny", "--output-dir", str(tmp_path / "o"), *mode], check=False, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"{fifo}: is not a regular file (a pipe, device or socket)" in r.stderr + r.stdout


def test_fastft_cache_naming_a_file_is_a_one_line_usage_error(tmp_path, trained):
    blocker = tmp_path / "cache"
    blocker.write_text("")
    r = run_train([str(trained[0]), *COMMON, "--output-dir", str(tmp_path / "o")],
                  env_extra={"FASTFT_CACHE": str(blocker)}, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        f"fastft: error: FASTFT_CACHE={blocker}: {blocker} is a file, not a folder; set FASTFT_CACHE to a folder "
        f"fastft may write its dataset cache to"]


def test_model_folder_without_config_json_says_so(tmp_path, trained):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    r = run_train([str(trained[0]), *COMMON, "--model", str(folder), "--output-dir", str(tmp_path / "o")], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cannot load the tokenizer" not in r.stderr
    assert f"fastft: {folder} has no config.json: --model expects a Hugging Face model folder" in r.stderr, r.stderr


def test_adapter_names_a_local_base_by_its_absolute_path(tmp_path, trained, monkeypatch):
    """--model ../models/tiny-copy (relative): adapter_config.json stores the folder's absolute path, so PEFT finds
    the base from any working directory."""
    import shutil

    from peft import AutoPeftModelForCausalLM

    from fastft.model import resolve_model_path

    base = tmp_path / "models" / "tiny-copy"
    shutil.copytree(resolve_model_path("tiny"), base)
    work = tmp_path / "work"
    work.mkdir()
    run_train([str(trained[0]), *COMMON, "--model", "../models/tiny-copy", "--max-steps", "1", "--output-dir", "out"],
              cwd=work)
    for folder in (work / "out", work / "out" / "checkpoint-1"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    monkeypatch.chdir(tmp_path)  # elsewhere: ../models/tiny-copy would not be found from here
    model = AutoPeftModelForCausalLM.from_pretrained(str(work / "out"))
    assert model.peft_config["default"].base_model_name_or_path == str(base)


def test_options_without_effect_on_cpu_warn_once_each(tmp_path, trained):
    """A GPU command line run on a CPU (a demo): it trains, with one warning line per option that changes nothing."""
    flags = ["--cuda-graphs", "on", "--keep-activations", "2", "--offload-activations", "--embedding", "host"]
    r = run_train([str(trained[0]), *COMMON, "--max-steps", "1", "--output-dir", str(tmp_path / "o"), *flags],
                  env_extra={"CUDA_VISIBLE_DEVICES": ""})
    warnings = [line for line in r.stderr.splitlines() if line.startswith("fastft: warning: ")]
    assert [w.split(":")[2].strip() for w in warnings] == ["--cuda-graphs on", "--keep-activations 2",
                                                            "--offload-activations", "--embedding host"], warnings
    assert all(w.endswith("; ignored") for w in warnings)


def test_ignored_options_only_where_they_change_nothing():
    from fastft.config import TrainConfig
    from fastft.train import ignored_options

    def named(device, graphs, **options):
        return [w.split(":")[0] for w in ignored_options(TrainConfig(data="x.jsonl", **options), device, graphs)]

    assert named("cpu", False) == [] and named("cuda", True) == []  # the defaults never warn
    assert named("cpu", False, keep_activations="off", cuda_graphs="off") == []
    gpu_line = dict(cuda_graphs="on", keep_activations=6.0, offload_activations=True, embedding="host",
                    lm_head="int8-host")
    assert named("cuda", True, **gpu_line) == []
    assert named("cpu", False, **gpu_line) == ["--cuda-graphs on", "--keep-activations 6", "--offload-activations",
                                               "--embedding host", "--lm-head int8-host"]
    assert named("cuda", False, keep_activations=6.0) == ["--keep-activations 6"]  # torch kernels: no graphs
    assert named("cuda", False, gradient_checkpointing=False, cuda_graphs="on", offload_activations=True) == [
        "--cuda-graphs on", "--offload-activations"]
    assert named("cuda", True, eval_every=5) == ["--eval-every 5"] and named("cuda", True, eval_every=5,
                                                                             eval_fraction=0.1) == []
    assert named("cpu", False, overwrite=True, resume=True) == ["--overwrite"]


def test_help_explains_every_option_with_its_default():
    from fastft.config import build_parser

    parser = build_parser()
    text = parser.format_help()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    for noise in ("(default: False)", "(default: True)", "(default: None)"):  # flags and options without a default
        assert noise not in text
    for option, default in [("--output-dir DIR", "fastft-out"), ("--epochs N", "3"), ("--learning-rate LR", "0.0001"),
                            ("--seed SEED", "42"), ("--lora-r R", "16"), ("--keep-checkpoints N", "2"),
                            ("--log-every N", "1"), ("--model ID|DIR", "openai/gpt-oss-20b")]:
        entry = " ".join(text.split(f"  {option}", 1)[1].split("\n  -", 1)[0].split())
        assert entry.endswith(f"(default: {default})"), (option, entry)
    assert "130 / 143 stopped by Ctrl-C / SIGTERM" in " ".join(text.split())


def test_validate_only_reports_and_exits_zero(trained):
    r = run_train([str(trained[0]), "--model", "tiny", "--validate-only"])
    assert "packing efficiency" in r.stdout


def test_deepspeed_launcher_two_ranks(tmp_path, trained):
    """`deepspeed --num_gpus 2 fastft/train.py` on CPU: two gloo ranks train one adapter."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    out = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", next_port(), str(TRAIN), str(trained[0]),
                        *COMMON, "--epochs", "1", "--output-dir", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["world_size"] == 2


def test_deepspeed_file_batch_keys_follow_the_cli_and_say_so(tmp_path):
    import torch

    from fastft.config import TrainConfig
    from fastft.engine import deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": "auto",
                             "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5}))
    said = []
    ds = deepspeed_config(TrainConfig(data="x.jsonl", deepspeed=str(f)), 2, 4, 2, torch.float32, warn=said.append)
    batch = ("train_batch_size", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu")
    assert [ds[k] for k in batch] == [16, 4, 2]
    assert ds["gradient_clipping"] == 0.5  # other keys: the file's
    assert len(said) == 1 and "train_batch_size 64 is replaced by 16" in said[0]


def test_nf4_without_bitsandbytes_is_a_clear_usage_error(monkeypatch):
    import fastft.train as train_mod
    from fastft.data import UsageError

    layout = {"experts": "mxfp4", "linears": "nf4", "embedding": "host", "lm_head": "int8-host"}
    monkeypatch.setattr(train_mod, "_have_bitsandbytes", lambda: False)
    with pytest.raises(UsageError, match="--linears nf4 .* need bitsandbytes.*--linears dense"):
        train_mod.check_layout_installed(layout)
    train_mod.check_layout_installed(dict(layout, linears="dense"))  # nothing NF4: nothing to install
    monkeypatch.setattr(train_mod, "_have_bitsandbytes", lambda: True)
    train_mod.check_layout_installed(layout)


def test_weight_layout_auto_and_explicit():
    from types import SimpleNamespace

    from fastft.config import TrainConfig
    from fastft.train import weight_layout

    gpu = SimpleNamespace(sources={"moe": "triton"})
    ref = SimpleNamespace(sources={"moe": "torch"})
    assert weight_layout(TrainConfig(data="x.jsonl"), gpu, "cuda") == {"experts": "mxfp4", "linears": "nf4",
                                                                        "embedding": "host", "lm_head": "int8-host"}
    assert weight_layout(TrainConfig(data="x.jsonl"), gpu, "cpu") == {"experts": "dense", "linears": "dense",
                                                                       "embedding": "device", "lm_head": "bf16"}
    assert weight_layout(TrainConfig(data="x.jsonl"), ref, "cuda")["experts"] == "dense"
    assert weight_layout(TrainConfig(data="x.jsonl"), ref, "cuda")["lm_head"] == "bf16"
    assert weight_layout(TrainConfig(data="x.jsonl"), gpu, "cuda", tied=True)["lm_head"] == "bf16"
    explicit = TrainConfig(data="x.jsonl", experts="nf4", linears="dense", embedding="device")
    assert weight_layout(explicit, gpu, "cuda") == {"experts": "nf4", "linears": "dense", "embedding": "device",
                                                    "lm_head": "int8-host"}


@pytest.mark.parametrize("flag,device,want", [("auto", "cuda", "int8-host"), ("auto", "cpu", "bf16"),
                                              ("bf16", "cuda", "bf16"), ("int8", "cpu", "int8"),
                                              ("int8-host", "cuda", "int8-host")])
def test_lm_head_flag_resolution(flag, device, want):
    from types import SimpleNamespace

    from fastft.config import TrainConfig, parse_args
    from fastft.train import weight_layout

    gpu = SimpleNamespace(sources={"moe": "triton"})
    cfg = TrainConfig(data="x.jsonl")
    if hasattr(cfg, "lm_head"):  # --lm-head reaches the config (fastft.config owns the option)
        cfg = parse_args(["x.jsonl", "--lm-head", flag])
        assert cfg.to_json()["lm_head"] == flag
    else:  # a fastft.config without the option: the trainer reads the field with getattr (default auto)
        cfg.lm_head = flag
    assert weight_layout(cfg, gpu, device)["lm_head"] == want


def test_ties_lm_head_reads_the_config(tmp_path):
    from fastft.train import ties_lm_head

    assert ties_lm_head(tmp_path) is False  # no config.json: load_model reports it, not this
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert ties_lm_head(tmp_path) is True
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert ties_lm_head(tmp_path) is False


def test_cuda_graphs_flag_resolution():
    from types import SimpleNamespace

    from fastft.config import TrainConfig
    from fastft.train import use_cuda_graphs

    def dist(device, world=1):
        return SimpleNamespace(device=SimpleNamespace(type=device), world_size=world)

    tri, ref = SimpleNamespace(name="triton"), SimpleNamespace(name="torch")
    auto = TrainConfig(data="x.jsonl")
    assert use_cuda_graphs(auto, tri, dist("cuda"))
    assert not use_cuda_graphs(auto, tri, dist("cuda", world=2))  # ZeRO gradient hooks: eager unless asked
    assert not use_cuda_graphs(auto, ref, dist("cuda")) and not use_cuda_graphs(auto, tri, dist("cpu"))
    assert use_cuda_graphs(TrainConfig(data="x.jsonl", cuda_graphs="on"), ref, dist("cuda", world=2))
    assert not use_cuda_graphs(TrainConfig(data="x.jsonl", cuda_graphs="off"), tri, dist("cuda"))
    assert not use_cuda_graphs(TrainConfig(data="x.jsonl", gradient_checkpointing=False), tri, dist("cuda"))


def test_graph_tokens_one_size_per_micro_batch():
    from fastft.config import TrainConfig
    from fastft.train import graph_tokens

    assert graph_tokens(TrainConfig(data="x.jsonl")) == 4096
    assert graph_tokens(TrainConfig(data="x.jsonl", max_seq_len=4000)) == 4096
    assert graph_tokens(TrainConfig(data="x.jsonl", max_seq_len=100, micro_batch_size=3)) == 512


@pytest.mark.gpu
def test_cuda_graphs_train_like_eager_layers(tmp_path):
    """On a GPU the trainer replays its layers from CUDA graphs by default (keeping the experts' activations); without
    dropout (so both runs draw nothing) its losses follow the eager run's step for step (only the token padding may
    change GEMM rounding)."""
    data = write_data(tmp_path / "data.jsonl")
    curves = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        run_train([str(data), *COMMON, "--epochs", "2", "--lora-dropout", "0", "--cuda-graphs", mode,
                   "--output-dir", str(out)])
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["cuda_graphs"] is (mode == "on")
        assert any(map(sum, meta["kept_activation_layers"].values())) is (mode == "on")  # auto keeps where graphs run
        if mode == "on":  # every step padded to one size (256 tokens per micro-batch): one set of graphs
            assert list(meta["kept_activation_layers"]) == ["256"]
        curves[mode] = losses(out)
    assert len(curves["on"]) == len(curves["off"]) > 4
    for a, b in zip(curves["on"], curves["off"]):
        assert abs(a - b) <= 2e-2 * abs(b), (curves["on"], curves["off"])


def test_shutdown_distributed_closes_the_process_group():
    """main() ends the process group it started (torch warns at exit about one left open); twice is harmless."""
    import torch.distributed as tdist

    from fastft.engine import shutdown_distributed

    if not tdist.is_initialized():
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{next_port()}", rank=0, world_size=1)
    shutdown_distributed()
    assert not tdist.is_initialized()
    shutdown_distributed()


def deepspeed_that_raises(tmp_path: Path, error: str) -> dict:
    """The environment of a trainer whose `import deepspeed` raises ``error`` (a stub package first on the path)."""
    stub = tmp_path / "stub" / "deepspeed"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f"raise {error}\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))}


def test_one_process_trains_and_resumes_without_deepspeed(tmp_path, trained):
    """DeepSpeed serves several ranks and --zero-stage / --deepspeed; one process (a plain `pip install .`, no [gpu]
    extra) trains, checkpoints and resumes without it, and asking for ZeRO without it is one message."""
    env = deepspeed_that_raises(tmp_path, "ImportError('deepspeed is not installed here')")
    out = tmp_path / "out"
    args = [str(trained[0]), *COMMON, "--save-every", "2", "--output-dir", str(out)]
    run_train([*args, "--max-steps", "2"], env_extra=env)
    r = run_train([*args, "--max-steps", "3", "--resume"], env_extra=env)
    assert "resumed from" in r.stdout and len(losses(out)) == 3
    assert "Warning" not in r.stderr, r.stderr  # (torch's lr_scheduler.step() order warning, once)
    assert json.loads((out / "metadata.json").read_text())["engine"] == "fastft (one process)"
    r = run_train([*args, "--max-steps", "1", "--zero-stage", "2", "--overwrite"], env_extra=env, check=False)
    assert r.returncode == 1 and "DeepSpeed, which is not installed" in r.stderr and "Traceback" not in r.stderr


def test_one_process_never_imports_deepspeed_even_where_it_is_installed(tmp_path, trained):
    """DeepSpeed's init builds its shm extension on a CPU (30-70 s the first time) for an engine one process without
    --zero-stage / --deepspeed does not use: a DeepSpeed that fails when imported does not stop such a run."""
    env = deepspeed_that_raises(tmp_path, "RuntimeError('one process imported deepspeed')")
    out = tmp_path / "out"
    args = [str(trained[0]), *COMMON, "--save-every", "1", "--output-dir", str(out)]
    run_train([*args, "--max-steps", "1"], env_extra=env)
    run_train([*args, "--max-steps", "2", "--resume"], env_extra=env)
