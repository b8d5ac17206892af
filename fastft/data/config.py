"""DataConfig and the two exceptions whose message is the text the user sees."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class UsageError(Exception):
    """A bad option value (the CLI prints the message and exits 2)."""


class DataError(Exception):
    """The data has errors and training must not start (the CLI prints the message, the full report, and exits 1)."""


OVERLONG_POLICIES = ("truncate", "drop")
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass
class DataConfig:
    paths: list = field(default_factory=list)  # .jsonl / .jsonl.gz files, read in order
    max_seq_len: int = 4096  # packed row capacity, and the longest a single conversation may be
    train_on_all: bool = False  # train on every token, not just assistant output
    skip_invalid: bool = False  # train on the valid rows when some have errors (they are listed, not hidden)
    overlong: str = "truncate"  # rows longer than max_seq_len: "truncate" (keep the head) or "drop"
    drop_duplicates: bool = False  # exact duplicate conversations: keep (default) or drop; counted either way
    seed: int = 0  # packing order, per-epoch shuffles and the eval split
    eval_fraction: float = 0.0  # share of conversations held out for evaluation
    cache_dir: str | None = None  # default $FASTFT_CACHE or ~/.cache/fastft
    reasoning_effort: str = "medium"  # the "Reasoning:" line of the harmony system message

    def check(self) -> "DataConfig":
        """Raise UsageError for option values no data could make right; returns self with paths as strings."""
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        self.paths = [os.fspath(p) for p in self.paths]
        if not self.paths:
            raise UsageError("no data files given: pass one or more .jsonl files")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 16:
            raise UsageError(f"--max-seq-len must be an integer >= 16, not {self.max_seq_len!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise UsageError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, not {self.overlong!r}")
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise UsageError(f"--eval-fraction must be in [0, 1), not {self.eval_fraction!r}")
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise UsageError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"not {self.reasoning_effort!r}")
        return self

    def resolved_cache_dir(self) -> Path:
        return self._cache_root()[1] / "data"

    def make_cache_dir(self) -> Path:
        """The tokenisation cache folder, created if need be. One that cannot be (a file in the way, no permission)
        is a UsageError that says where the folder came from: $FASTFT_CACHE is set far from the command line."""
        where, root = self._cache_root()
        folder = root / "data"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
            reason = f"{blocker} is a file, not a folder" if blocker else f"cannot create {folder} ({e.strerror or e})"
            fix = ("pass another cache_dir" if self.cache_dir else
                   "set FASTFT_CACHE to a folder fastft may write its dataset cache to")
            raise UsageError(f"{where}: {reason}; {fix}") from None
        return folder

    def _cache_root(self) -> tuple[str, Path]:
        """(where the root was set, for messages; the root)."""
        if self.cache_dir:
            return f"cache_dir {self.cache_dir}", Path(self.cache_dir).expanduser()
        if os.environ.get("FASTFT_CACHE"):
            return f"FASTFT_CACHE={os.environ['FASTFT_CACHE']}", Path(os.environ["FASTFT_CACHE"]).expanduser()
        default = Path.home() / ".cache" / "fastft"
        return f"the default cache folder {default}", default
