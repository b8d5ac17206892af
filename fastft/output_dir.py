"""--output-dir: checks before a run starts, and how a run replaces an older one without losing it on the way.

fastft only ever moves or deletes what it can tell it wrote itself (``owned_entries``): checkpoint-<step> folders
holding a trainer_state.json, ``latest`` naming one, a metrics.jsonl of its rows, a runs/ of TensorBoard event files
only, and the files a metadata.json of fastft's lists. Everything else in the folder is the user's and stays as it is;
a file of the user's where a run would write one of its outputs stops the run before it starts.

--overwrite: when the new run first writes, the older run's outputs move into ``.fastft-previous-run/`` in the same
folder (renames: instant, no space needed). They are deleted once the new run's first checkpoint is on disk; a run
that fails or is interrupted before that removes what it wrote and moves them back (``finish``). A run killed
outright (SIGKILL, power) leaves the hidden folder, and the next run in that folder puts it back first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from fastft import checkpoint

ASIDE = ".fastft-previous-run"
# What a finished run leaves at the top besides its logs; metadata.json lists them (older fastft: these names)
FINAL_OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "training_config.json", "metadata.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LOGS = ("metrics.jsonl", "loss.png")
_CHECKPOINT = re.compile(r"(\.tmp-)?" + re.escape(checkpoint.PREFIX) + r"[0-9]+")


class OutputDirError(Exception):
    """--output-dir cannot be used as it is (one message, exit 1)."""


def prepare(cfg) -> tuple["RunOutputs", Path | None]:
    """(this run's hold on --output-dir, checkpoint to resume from), or OutputDirError before anything is loaded."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output-dir {out} exists and is not a folder")
    if (out / ASIDE).is_dir():
        _restore_killed_run(out)
    resume_from = checkpoint.latest_checkpoint(out) if out.exists() else None
    if cfg.resume:
        if resume_from is None:
            raise OutputDirError(f"--resume: no complete checkpoint in {out} (looked for {out}/{checkpoint.LATEST})")
        _check_writable(out)
        return RunOutputs(out, replaces=False, resumed=True), resume_from
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        hint = " (it holds a checkpoint: add --resume to continue)" if resume_from else ""
        raise OutputDirError(f"--output-dir {out} is not empty{hint}; pass --overwrite to train into it anyway (it "
                             f"replaces only what an older fastft run wrote there)")
    if out.exists():
        _refuse_foreign_outputs(out)
    _make(out)
    _check_writable(out)
    return RunOutputs(out, replaces=cfg.overwrite, resumed=False), None


def _make(out: Path) -> None:
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"--output-dir {out}: cannot create it ({e.strerror or e})") from None
    if made:
        _MADE_DIRS.append(out)


def _check_writable(out: Path) -> None:
    """Before the model loads (minutes): a folder the run could not write into fails now. A real file, not
    os.access: root passes that check on a read-only mount or an immutable folder."""
    probe = out / f".fastft-write-test-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f"--output-dir {out}: cannot write into it ({e.strerror or e}); choose a folder you "
                             f"can write to, or fix its permissions") from None


def _refuse_foreign_outputs(out: Path) -> None:
    """--overwrite replaces fastft's outputs; a user's file under one of their names would be overwritten."""
    owned = set(owned_entries(out))
    foreign = [p for p in out.iterdir() if _is_output_name(p) and p not in owned]
    if foreign:
        names = ", ".join(sorted(p.name for p in foreign))
        raise OutputDirError(f"--overwrite: {out} holds {names}, which fastft cannot tell it wrote, and this run "
                             f"would write over them; move or rename them, or choose another --output-dir")


def _is_output_name(p: Path) -> bool:
    if p.name == "runs":  # new event files go beside a user's: only a non-folder is in the way
        return not p.is_dir()
    return p.name in (*FINAL_OUTPUTS, *TOKENIZER_FILES, *LOGS, checkpoint.LATEST) or bool(
        re.fullmatch(re.escape(checkpoint.PREFIX) + r"[0-9]+", p.name))


# ---- what fastft wrote -----------------------------------------------------------------------------------------

def owned_entries(out: Path) -> list[Path]:
    """The entries at the top of ``out`` that fastft wrote, as far as their contents show."""
    out = Path(out)
    owned = [p for p in out.iterdir() if _CHECKPOINT.fullmatch(p.name) and _is_checkpoint(p)]
    owned += [out / n for n in (checkpoint.LATEST, checkpoint.LATEST + ".tmp") if _names_checkpoint(out / n)]
    if _is_runs(out / "runs"):
        owned.append(out / "runs")
    meta = fastft_metadata(out)
    listed = set(meta.get("outputs") or (*FINAL_OUTPUTS, *TOKENIZER_FILES, *LOGS)) if meta else set()
    if _is_metrics_log(out / "metrics.jsonl"):
        listed.update(LOGS)  # loss.png is drawn from it
    owned += [out / n for n in sorted(listed) if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
              and (out / n).exists()]
    return list(dict.fromkeys(owned))


def fastft_metadata(out: Path) -> dict | None:
    """metadata.json if fastft wrote it (its marker; older fastft: its versions table), else None."""
    try:
        meta = json.loads((Path(out) / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    older = isinstance(meta.get("versions"), dict) and "fastft" in meta["versions"]
    return meta if meta.get("written_by") == "fastft" or older else None


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p.name.startswith(".tmp-") or (p / "trainer_state.json").is_file())


def _names_checkpoint(p: Path) -> bool:
    try:
        return p.is_file() and p.stat().st_size < 100 and bool(
            re.fullmatch(re.escape(checkpoint.PREFIX) + r"[0-9]+", p.read_text().strip()))
    except (OSError, UnicodeDecodeError):
        return False


def _is_runs(p: Path) -> bool:
    """TensorBoard's SummaryWriter writes event files straight into runs/, and nothing else."""
    return p.is_dir() and all(f.is_file() and f.name.startswith("events.out.tfevents.") for f in p.iterdir())


def _is_metrics_log(p: Path) -> bool:
    """fastft's rows ({"type": "train" | "eval", "step": ...}); the last line may be cut short by a kill."""
    try:
        lines = [line for line in p.read_text().splitlines() if line.strip()] if p.is_file() else None
    except (OSError, UnicodeDecodeError):
        return False
    if lines is None:
        return False
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue
            return False
        if not (isinstance(row, dict) and row.get("type") in ("train", "eval") and "step" in row):
            return False
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


# ---- one run's hold on the folder --------------------------------------------------------------------------------

_MADE_DIRS: list[Path] = []  # output folders this process created (removed again if left empty)
_HELD: list["RunOutputs"] = []  # runs that began writing and have no checkpoint yet


class RunOutputs:
    """``begin`` before the run's first write, ``saved`` after each checkpoint; ``finish`` (main, at exit) undoes
    a run that saved none."""

    def __init__(self, path: Path, replaces: bool, resumed: bool):
        self.path, self.replaces, self.resumed = path, replaces, resumed
        self.checkpointed = False

    def begin(self) -> None:
        """--overwrite: the older run's outputs move aside. A resumed run keeps everything (its checkpoints are
        this run's), so it has nothing to undo."""
        if self.resumed:
            return
        if self.replaces:
            olds = owned_entries(self.path)
            if olds:
                aside = self.path / ASIDE
                aside.mkdir()
                for p in olds:
                    os.replace(p, aside / p.name)
        _HELD.append(self)

    def saved(self) -> None:
        """A checkpoint of this run is on disk: from now on it is the run in this folder."""
        if self.checkpointed:
            return
        self.checkpointed = True
        if self in _HELD:
            _HELD.remove(self)
        shutil.rmtree(self.path / ASIDE, ignore_errors=True)

    def undo(self) -> None:
        """This run's files (it saved no checkpoint: nothing in them could be resumed, and they would block a
        plain re-run) go; the older run's come back."""
        mine = owned_entries(self.path)
        for p in mine:
            _remove(p)
        if _put_back(self.path):
            print(f"fastft: {self.path} is as it was before this run (it saved no checkpoint): the older run's "
                  f"outputs are back", file=sys.stderr)
        elif mine:
            print(f"fastft: this run saved no checkpoint; the files it had written in {self.path} were removed",
                  file=sys.stderr)


def _put_back(out: Path) -> bool:
    aside = out / ASIDE
    if not aside.is_dir():
        return False
    for p in sorted(aside.iterdir()):
        if not (out / p.name).exists():
            os.replace(p, out / p.name)
    try:
        aside.rmdir()
    except OSError:  # a name the user has taken meanwhile: theirs stays, the older run's stays aside
        print(f"fastft: warning: {aside} still holds part of the older run (its names are taken in {out})",
              file=sys.stderr)
    return True


def _restore_killed_run(out: Path) -> None:
    """A run with --overwrite that was killed before its first checkpoint: its files go, the older run's come back.
    One killed while it deleted them, its checkpoint saved (``latest`` went aside with the older run), keeps its own."""
    if checkpoint.latest_checkpoint(out) is not None:
        shutil.rmtree(out / ASIDE, ignore_errors=True)
        return
    for p in owned_entries(out):
        _remove(p)
    _put_back(out)
    print(f"fastft: note: a run killed before its first checkpoint had set the older run in {out} aside "
          f"({ASIDE}); it is back", file=sys.stderr)


def active() -> "RunOutputs | None":
    """The run that is writing and has not saved a checkpoint yet, if any."""
    return _HELD[-1] if _HELD else None


def finish() -> None:
    """At exit: undo a run that saved no checkpoint, then remove output folders this process made and left empty
    (a run that failed before writing leaves no empty folder)."""
    while _HELD:
        _HELD.pop().undo()
    while _MADE_DIRS:
        try:
            _MADE_DIRS.pop().rmdir()  # only an empty folder goes
        except OSError:
            pass
