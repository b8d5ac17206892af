"""--output-dir: checks before a run starts, and how a run replaces an older one without losing it on the way.

fastft only ever moves or deletes what it can tell it wrote itself (``owned_entries``): checkpoint-<step> folders
holding fastft's trainer_state.json (told by its keys: Hugging Face's Trainer uses the same names), ``latest`` naming
one, a metrics.jsonl of its rows, a runs/ of TensorBoard event files only, and the files a metadata.json of fastft's
lists. Everything else in the folder is the user's and stays as it is; a file of the user's where a run would write
one of its outputs stops the run before it starts.

--overwrite: when the new run first writes, the older run's outputs move into ``.fastft-previous-run/`` in the same
folder (renames: instant, no space needed; gathered under a temporary name first, so a set-aside cut short is never
mistaken for a whole one). They are deleted once the new run has written its final outputs: a new run stopped or
failing after a checkpoint leaves both (--resume finishes the new run; the older run waits aside until then). A run
that stops or fails before its first checkpoint removes what it wrote and moves the older run back (``finish``). A run
killed outright (SIGKILL, power) is sorted out by the next start in that folder (``_recover``): a set-aside or a
put-back cut short is completed, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from fastft import checkpoint

ASIDE = ".fastft-previous-run"
_GATHERING = ASIDE + ".tmp"  # a set-aside in progress
_DELETING = ASIDE + ".delete"  # a set-aside whose deletion was cut short
_PUTTING_BACK = ".putting-back"  # inside ASIDE: its entries are on their way back to the top
_PROBE = ".fastft-write-test-"
# What a finished run leaves at the top besides its logs; metadata.json lists them (older fastft: these names)
FINAL_OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "training_config.json", "metadata.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LOGS = ("metrics.jsonl", "loss.png")


class OutputDirError(Exception):
    """--output-dir cannot be used as it is (one message, exit 1)."""


def prepare(cfg) -> tuple["RunOutputs", Path | None]:
    """(this run's hold on --output-dir, checkpoint to resume from), or OutputDirError before anything is loaded."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output-dir {out} exists and is not a folder")
    if out.is_dir():
        _recover(out)
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
    probe = out / f"{_PROBE}{os.getpid()}"
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
    return p.name in (*FINAL_OUTPUTS, *TOKENIZER_FILES, *LOGS, checkpoint.LATEST) or checkpoint.is_step_name(p.name)


# ---- what fastft wrote -----------------------------------------------------------------------------------------

def owned_entries(out: Path) -> list[Path]:
    """The entries at the top of ``out`` that fastft wrote, as far as their contents show."""
    out = Path(out)
    owned = [p for p in out.iterdir() if checkpoint.is_step_name(p.name.removeprefix(".tmp-")) and _is_checkpoint(p)]
    owned += [out / n for n in (checkpoint.LATEST, checkpoint.LATEST + ".tmp") if _names_checkpoint(out / n)]
    if _is_runs(out / "runs"):
        owned.append(out / "runs")
    meta = fastft_metadata(out)
    listed = set(meta.get("outputs") or (*FINAL_OUTPUTS, *TOKENIZER_FILES, *LOGS)) if meta else set()
    if not (out / "metadata.json").exists() and out / checkpoint.LATEST in owned:  # died writing its last outputs
        listed.update((*FINAL_OUTPUTS, *TOKENIZER_FILES, *LOGS))
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
    """A checkpoint folder of fastft's (a half-written one: its own .tmp- name). Hugging Face's Trainer writes
    checkpoint-<step>/trainer_state.json too; fastft's state has its own keys."""
    if not p.is_dir() or p.is_symlink():
        return False
    if p.name.startswith(".tmp-"):
        return True
    try:
        state = json.loads((p / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and {"step", "plan", "run"} <= state.keys()


def _names_checkpoint(p: Path) -> bool:
    try:
        name = p.read_text().strip() if p.is_file() and p.stat().st_size < 100 else ""
    except (OSError, UnicodeDecodeError):
        return False
    return checkpoint.is_step_name(name) and _is_checkpoint(p.parent / name)


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
_HELD: list["RunOutputs"] = []  # runs that began writing and have not finished


class RunOutputs:
    """``begin`` before the run's first write, ``saved`` after each checkpoint, ``completed`` once its final outputs
    are written; ``finish`` (main, at exit) undoes a run that saved no checkpoint and reports one that stopped after."""

    def __init__(self, path: Path, replaces: bool, resumed: bool):
        self.path, self.replaces = path, replaces
        self.checkpointed = resumed  # a resumed run's checkpoints are on disk already

    def begin(self) -> None:
        """--overwrite: the older run's outputs move aside (a failure half-way moves them back)."""
        if self.replaces:
            olds = owned_entries(self.path)
            if (self.path / ASIDE).is_dir():
                # An --overwrite run stopped after a checkpoint sits at the top, the finished run before it aside:
                # the unfinished one is what this run replaces; the finished one stays aside until this one finishes.
                for p in olds:
                    _remove(p)
            elif olds:
                gathering = self.path / _GATHERING
                gathering.mkdir()
                try:
                    for p in olds:
                        os.replace(p, gathering / p.name)
                except BaseException:
                    _move_back(gathering, self.path)
                    raise
                os.replace(gathering, self.path / ASIDE)
        _HELD.append(self)

    def saved(self) -> None:
        self.checkpointed = True

    def completed(self) -> None:
        """The final outputs are written: this is the run in this folder now; an older one set aside goes."""
        if self in _HELD:
            _HELD.remove(self)
        _delete_aside(self.path)

    def stopped(self) -> None:
        """The run ends unfinished (a stop, an error). Without a checkpoint nothing in its files could be resumed
        and they would block a plain re-run: they go, and the older run comes back. With one, both stay."""
        if self.checkpointed:
            if (self.path / ASIDE).is_dir():
                print(f"fastft: the older run's outputs stay in {self.path / ASIDE} until this run finishes "
                      f"(--resume)", file=sys.stderr)
            return
        mine = owned_entries(self.path)
        for p in mine:
            _remove(p)
        if _put_back(self.path):
            print(f"fastft: {self.path} is as it was before this run (it saved no checkpoint): the older run's "
                  f"outputs are back", file=sys.stderr)
        elif mine:
            print(f"fastft: this run saved no checkpoint; the files it had written in {self.path} were removed",
                  file=sys.stderr)


def _delete_aside(out: Path) -> None:
    aside = out / ASIDE
    if aside.is_dir():
        try:
            os.replace(aside, out / _DELETING)  # from here the older run is gone in intent: never put back
        except OSError:
            shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(out / _DELETING, ignore_errors=True)


def _put_back(out: Path) -> bool:
    aside = out / ASIDE
    if not aside.is_dir():
        return False
    (aside / _PUTTING_BACK).touch()  # a put-back cut short is completed by the next start, not undone
    if not _move_back(aside, out, skip=_PUTTING_BACK):  # a name the user has taken meanwhile: theirs stays
        print(f"fastft: warning: {aside} still holds part of the older run (its names are taken in {out})",
              file=sys.stderr)
    return True


def _move_back(folder: Path, out: Path, skip: str = "") -> bool:
    """The entries of ``folder`` back to the top of ``out`` (none over an existing name); the folder (and the marker
    ``skip``) goes when nothing else is left in it. Returns whether it did."""
    for p in sorted(folder.iterdir()):
        if p.name != skip and not (out / p.name).exists():
            os.replace(p, out / p.name)
    if any(p.name != skip for p in folder.iterdir()):
        return False  # (the marker stays with what is left)
    shutil.rmtree(folder)
    return True


def _recover(out: Path) -> None:
    """What a run killed outright (SIGKILL, power) left half done, sorted out before anything else."""
    for probe in out.glob(_PROBE + "*"):  # a write check cut short
        probe.unlink(missing_ok=True)
    shutil.rmtree(out / _DELETING, ignore_errors=True)
    if (out / _GATHERING).is_dir():  # a set-aside cut short: all of it is the older run; the new one wrote nothing
        _move_back(out / _GATHERING, out)
    aside = out / ASIDE
    if not aside.is_dir():
        return
    if (aside / _PUTTING_BACK).exists():  # everything at the top of fastft's is the older run's by now
        _put_back(out)
    elif checkpoint.latest_checkpoint(out) is None:  # the new run was killed before its first checkpoint
        for p in owned_entries(out):
            _remove(p)
        _put_back(out)
        print(f"fastft: note: a run killed before its first checkpoint had set the older run in {out} aside "
              f"({ASIDE}); it is back", file=sys.stderr)


def finish() -> None:
    """At exit: a run that did not finish is stopped (see RunOutputs.stopped), then output folders this process
    made and left empty go (a run that failed before writing leaves no empty folder)."""
    while _HELD:
        _HELD.pop().stopped()
    while _MADE_DIRS:
        try:
            _MADE_DIRS.pop().rmdir()  # only an empty folder goes
        except OSError:
            pass
