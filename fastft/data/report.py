"""The validation report: located errors, counted warnings, token statistics, packing efficiency."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SHOWN = 20  # errors (and example locations) printed; the counts are always exact


@dataclass(frozen=True)
class Issue:
    path: str
    line: int | None
    col: int | None
    message: str

    def __str__(self) -> str:
        if not self.path:  # about the data as a whole
            return self.message
        where = self.path + (f":{self.line}" if self.line is not None else "") + \
            (f":{self.col}" if self.col is not None and self.line is not None else "")
        return f"{where}: {self.message}"

    @property
    def skippable(self) -> bool:
        """A row's problem (--skip-invalid skips the row), not a file's or the whole data's."""
        return self.line is not None


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


@dataclass
class DataWarning:
    """One kind of warning with its exact count; `where` holds PATH:LINE examples."""
    code: str  # duplicate | overlong | ignored_keys | dropped_thinking | untrainable | repeated_path | no_eval
    count: int
    message: str  # says what was done about it and which flag changes that
    where: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        shown = ", ".join(self.where[:5]) + (f", ... ({len(self.where) - 5} more)" if len(self.where) > 5 else "")
        return f"{self.message}" + (f": {shown}" if shown else "")


@dataclass
class ValidationReport:
    max_seq_len: int
    files: list = field(default_factory=list)  # [(path, n_rows, sha256 | None)]
    n_rows: int = 0  # non-blank lines read, over all files
    n_valid: int = 0
    shape_counts: dict = field(default_factory=dict)  # shape -> valid rows
    errors: list[Issue] = field(default_factory=list)
    warnings: list[DataWarning] = field(default_factory=list)
    token_stats: dict | None = None  # min/median/p95/max tokens per valid row (before truncation)
    n_tokens: int = 0  # after the overlong policy
    n_trainable: int = 0
    n_used: int = 0  # rows that will be trained or evaluated on (after duplicate / overlong policies)
    packing_efficiency: float | None = None
    n_packed: int = 0
    skipped: list[Issue] | None = None  # set when --skip-invalid dropped rows with errors

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        """0 when the data can be trained on: no errors, or only row errors that --skip-invalid skips."""
        return 0 if self.ok or self.skipped is not None else 1

    @property
    def n_invalid(self) -> int:
        return self.n_rows - self.n_valid

    def warning(self, code: str) -> DataWarning | None:
        return next((w for w in self.warnings if w.code == code), None)

    def format(self) -> str:
        out = ["fastft data report"]
        for path, n, sha in self.files:
            out.append(f"  file {path}: {n:,} rows" + (f", sha256 {sha[:16]}" if sha else ""))
        out.append(f"  rows: {self.n_rows:,} read, {self.n_valid:,} valid, {self.n_invalid:,} with errors")
        if self.shape_counts:
            out.append("  shapes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.shape_counts.items())))
        out.append(f"  errors: {len(self.errors):,}")
        for issue in self.errors[:MAX_SHOWN]:
            out.append(f"    {issue}")
        if len(self.errors) > MAX_SHOWN:
            out.append(f"    ... and {len(self.errors) - MAX_SHOWN:,} more")
        out.append(f"  warnings: {sum(w.count for w in self.warnings):,}")
        for w in self.warnings:
            out.append(f"    {w}")
        if self.token_stats:
            s = self.token_stats
            out.append(f"  tokens per row: min {s['min']:,}, median {s['median']:,}, p95 {s['p95']:,}, "
                       f"max {s['max']:,}")
            share = 100.0 * self.n_trainable / max(self.n_tokens, 1)
            out.append(f"  tokens: {self.n_tokens:,} in {self.n_used:,} rows, {self.n_trainable:,} trained "
                       f"({share:.1f}%)")
        if self.packing_efficiency is not None:
            out.append(f"  packing efficiency: {100 * self.packing_efficiency:.1f}% at --max-seq-len "
                       f"{self.max_seq_len} ({self.n_used:,} rows -> {self.n_packed:,} packed rows)")
        if self.skipped is not None:
            out.append(f"  --skip-invalid: skipped {plural(len(self.skipped), 'row')} with errors"
                       + (f": {_locations(self.skipped)}" if self.skipped else ""))
        fatal = sum(not e.skippable for e in self.errors)
        if self.ok:
            out.append("  result: OK")
        elif self.skipped is not None:
            out.append(f"  result: {plural(len(self.errors), 'error')}; training on the "
                       f"{plural(self.n_used or self.n_valid, 'valid row')} (--skip-invalid)")
        elif fatal:
            out.append(f"  result: FAILED with {plural(len(self.errors), 'error')}; fix them ({fatal:,} of them "
                       f"about files or the data as a whole, which --skip-invalid does not skip)")
        else:
            out.append(f"  result: FAILED with {plural(len(self.errors), 'error')}; fix them, or pass "
                       f"--skip-invalid to train on the {plural(self.n_valid, 'valid row')}")
        return "\n".join(out)


def _locations(issues: list[Issue]) -> str:
    """PATH:LINE list, compact: 'a.jsonl:3,7,9 b.jsonl:2'."""
    by_path: dict[str, list[str]] = {}
    for i in issues:
        if i.line is not None:
            by_path.setdefault(i.path, []).append(str(i.line))
    return " ".join(f"{p}:{','.join(lines)}" for p, lines in by_path.items())
