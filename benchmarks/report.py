"""Turn benchmarks/results.jsonl into benchmarks/RESULTS.md and PNG plots under benchmarks/plots/.

    python benchmarks/report.py [--results benchmarks/results.jsonl] [--out benchmarks]

RESULTS.md, top to bottom:
  Goals                 one line per goal in GOALS below (the project's targets): the measured value, the row it came
                        from (date, git, command) and whether it is met. Each goal reads the newest row of its bench
                        that matches its filters (one per distinct value of its `per` metrics); rows of --quick smoke
                        runs never count. A goal without such a row, or whose row lacks the metric (rival OOM, not
                        run), says "not measured".
  Where the time goes   the newest e2e_profile rows (newest profiled commit, one per configuration): GPU ms per step,
                        each op's ms and share of it, host-side timings and memory.
  one section per bench a table (newest row first; columns date, device, git, then every metric the bench ever
                        recorded, then the command). A bench whose rows carry a size axis (T, tokens, seq_len, ...)
                        with at least two values also gets a plot: the newest measurement at each size of every *_ms
                        metric (log-log), and the *_gib metrics beside them (log scale).
  Analysis              benchmarks/ANALYSIS.md (hand-written), verbatim, when that file exists.
Numbers come only from the rows; the only arithmetic here is the goal comparison and the per-op percentages.

Some benches get their own plot instead, always from their newest run (rows sharing date, device, git and command):
  context_sweep  tokens/s and peak allocated GiB against sequence length, fastft vs the reference (log2 x axis)
  convergence    the per-step loss curves of fastft and the reference (a pair per learning rate), and their
                 relative difference
List-valued metrics (loss curves) are plotted, not tabled.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
X_AXES = ("T", "tokens", "seq_len", "seqlen", "batch_tokens", "context", "N")
MEASURED = "measured"  # a `where` value: the metric must be present and not null


class Goal(NamedTuple):
    bench: str
    where: dict  # metric -> required value (or MEASURED); rows not matching are ignored
    metric: str
    op: str  # one of OPS
    target: float | bool
    per: tuple = ()  # one line per distinct value of these metrics, each from its newest row
    show: tuple = ()  # further metrics of the row printed beside the value
    newest_run: bool = False  # only the rows of the newest invocation count
    label: tuple = ()  # metrics of the row named in the goal text (which variant was measured)


# The project's targets (from its issues). The table in RESULTS.md is computed from these and the rows, never typed.
E2E_QV = {"workload": "W1-qv", "reference_tok_s": MEASURED}  # reference measured in the same invocation
# one line per memory mode of the newest run: layers keeping activations (0 = everything recomputed, least memory),
# layers never recomputed, and where the lm_head lives (int8 on the device or its codes in host memory)
E2E = dict(per=("kept_activation_layers", "layers_without_recompute", "build.lm_head"), newest_run=True)
CE_T = (4096, 16384, 65536)
GOALS = [
    #   bench   which rows (metric filters)   metric   op   target   [options]
    Goal("e2e", E2E_QV, "speedup_vs_reference", ">=", 8, **E2E),
    Goal("e2e", E2E_QV, "mfu", ">=", 0.40, **E2E),
    Goal("e2e", E2E_QV, "peak_gib", "<=", 11.5, **E2E),
    Goal("e2e", {"workload": "W1-all", "reference_tok_s": MEASURED}, "speedup_vs_reference", ">=", 8, **E2E),
    Goal("context", {"cap_gib": 24}, "max_tokens", ">=", 131072),
    Goal("context", {"cap_gib": 80}, "max_tokens", ">=", 500000),
    Goal("convergence", {}, "within_2pct", "==", True, show=("max_rel_diff",)),
    Goal("cross_entropy", {"T": 16384}, "fastft_ms", "<=", 55),
    *[Goal("cross_entropy", {"T": t}, "speedup_vs_torch", ">", 1) for t in CE_T],
    *[Goal("cross_entropy", {"T": t}, "speedup_vs_liger", ">", 1) for t in CE_T],
    Goal("cross_entropy", {"T": 16384}, "fastft_extra_gib", "<=", 0.25),
    Goal("moe", {"T": 16384, "lora": True, "experts": "mxfp4"}, "speedup_vs_peft", ">=", 3),  # experts stay 4-bit
    Goal("moe", {"T": 16384, "lora": False, "experts": "mxfp4"}, "speedup_vs_grouped_mm", ">=", 1.5),
    Goal("attention", {"T": 16384}, "speedup_vs_flex", ">=", 2, per=("layer", "docs"), newest_run=True),
    Goal("lora_linear", {"T": 16384}, "speedup_vs_bnb_peft", ">", 1, per=("shape", "format"), label=("path",)),
    Goal("lora_linear", {"T": 16384}, "ratio_vs_bf16", "<=", 1.3, per=("shape", "format"), label=("path",)),
    Goal("weights_memory", {}, "resident_gib", "<=", 11),
    Goal("weights_memory", {}, "load_peak_host_gib", "<=", 4),
]
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
OP_TEXT = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "==": "="}
PROFILE_CONFIG = ("workload", "tokens_per_row", "build", "env")  # what makes two e2e_profile rows comparable


def load_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
            continue
        if isinstance(row, dict) and "bench" in row and isinstance(row.get("metrics"), dict):
            row["_order"] = n
            rows.append(row)
    return rows


def _newest_first(rows: list[dict]) -> list[dict]:
    # dates are ISO days; within a day the later line in the file is the newer one
    return sorted(rows, key=lambda r: (str(r.get("date", "")), r["_order"]), reverse=True)


def _columns(rows: list[dict]) -> list[str]:
    cols = []
    for row in sorted(rows, key=lambda r: r["_order"]):
        cols += [k for k in row["metrics"] if k not in cols and not isinstance(row["metrics"][k], list)]
    return cols


def _newest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest invocation (same date, device, git and command as the newest row), in file order."""
    key = lambda r: (r.get("date"), r.get("device"), r.get("git"), r.get("command"))  # noqa: E731
    newest = key(_newest_first(rows)[0])
    return sorted((r for r in rows if key(r) == newest), key=lambda r: r["_order"])


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, bench: str) -> Path:
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}.png"
    fig.savefig(path, dpi=110)
    return path


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _x_axis(rows: list[dict]) -> str | None:
    for key in X_AXES:
        values = [r["metrics"].get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) > 1:
            return key
    return None


def plot_bench(bench: str, rows: list[dict], x: str, out: Path) -> Path:
    plt = _pyplot()
    newest = {}  # x value -> newest row measured there
    for row in _newest_first(rows):
        newest.setdefault(row["metrics"][x], row)
    xs = sorted(newest)
    cols = _columns(rows)
    groups = [("time (ms)", [c for c in cols if c.endswith("_ms")]),
              ("extra memory (GiB)", [c for c in cols if c.endswith("_gib")])]
    groups = [(label, keys) for label, keys in groups if keys]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.2), squeeze=False)
    for ax, (label, keys) in zip(axes[0], groups):
        for key in keys:
            pts = [(v, newest[v]["metrics"].get(key)) for v in xs]
            pts = [(a, b) for a, b in pts if isinstance(b, (int, float)) and b > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # rivals differ by orders of magnitude in memory, and time grows with the size
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    devices = sorted({str(newest[v].get("device", "?")) for v in xs})
    fig.suptitle(f"{bench} ({', '.join(devices)}; newest run at each {x})")
    path = _save(fig, out, bench)
    plt.close(fig)
    return path


def plot_context_sweep(bench: str, rows: list[dict], out: Path) -> Path | None:
    """tokens/s and peak allocated GiB vs sequence length, fastft vs reference, from the newest run."""
    run = _newest_run(rows)
    panels = [("tokens/s", "_tok_s", "linear"), ("peak allocated (GiB)", "_peak_gib", "linear")]
    sides = [("fastft", "o-"), ("reference", "s--")]
    keys = [f"{side}{suffix}" for side, _ in sides for _, suffix, _ in panels]
    if not any(_number(r["metrics"].get(k)) for r in run for k in keys):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (label, suffix, yscale) in zip(axes, panels):
        for side, style in sides:
            pts = sorted((r["metrics"]["tokens"], r["metrics"].get(f"{side}{suffix}")) for r in run
                         if _number(r["metrics"].get("tokens")))
            pts = [(a, b) for a, b in pts if _number(b) and b > 0]
            if pts:
                ax.plot(*zip(*pts), style, label=side)
        untried = [r["metrics"]["tokens"] for r in run if not _number(r["metrics"].get(f"reference{suffix}"))]
        if untried and suffix == "_peak_gib":
            ax.annotate(f"reference: no result from {min(untried):,} tokens (OOM, too slow or not run)",
                        xy=(0.02, 0.96), xycoords="axes fraction", va="top", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale(yscale)
        ax.set_xlabel("sequence length (tokens, one sequence per step)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if suffix == "_peak_gib" else "best")
    head = run[0]
    layers = head["metrics"].get("layers")
    fig.suptitle(f"{bench}: {head['metrics'].get('workload', '')} {layers} layers "
                 f"({head.get('device', '?')}, {head.get('date', '?')}, git {head.get('git', '?')})")
    path = _save(fig, out, bench)
    plt.close(fig)
    return path


def plot_convergence(bench: str, rows: list[dict], out: Path) -> Path | None:
    """The newest run's loss curves (fastft vs reference, one pair per learning rate) and their per-step relative
    difference."""
    with_curves = [r for r in rows if isinstance(r["metrics"].get("fastft_curve"), list)
                   and isinstance(r["metrics"].get("reference_curve"), list)]
    if not with_curves:
        return None
    run = _newest_run(with_curves)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, row in enumerate(run):
        m, color = row["metrics"], f"C{k}"
        fast, ref = m["fastft_curve"], m["reference_curve"]
        tag = f"lr {m['lr']:g}" if _number(m.get("lr")) else f"run {k + 1}"
        axes[0].plot(range(1, len(ref) + 1), ref, "-", color=color, linewidth=3, alpha=0.35,
                     label=f"reference (HF + PEFT), {tag}")
        axes[0].plot(range(1, len(fast) + 1), fast, "--", color=color, label=f"fastft, {tag}")
        rel = [abs(a - b) / abs(b) * 100 if _number(a) and _number(b) and b else float("nan")
               for a, b in zip(fast, ref)]
        smooth = m.get("max_rel_diff")
        axes[1].plot(range(1, len(rel) + 1), rel, ".-", color=color, markersize=3,
                     label=f"{tag}: per step; smoothed max {_cell(smooth * 100 if _number(smooth) else None)} %")
    axes[0].set_ylabel("training loss")
    axes[1].axhline(2.0, color="red", linestyle=":", label="2 % bar (on the 5-step moving average)")
    axes[1].set_ylabel("|fastft - reference| / reference (%)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    head = run[0]
    m = head["metrics"]
    fig.suptitle(f"{bench}: {m.get('layers', '?')} layers, {m.get('tokens_per_row', '?')} tokens/row "
                 f"({head.get('device', '?')}, {head.get('date', '?')}, git {head.get('git', '?')})")
    path = _save(fig, out, bench)
    plt.close(fig)
    return path


PLOTTERS = {"context_sweep": plot_context_sweep, "convergence": plot_convergence}


def _matches(value, wanted) -> bool:
    if wanted == MEASURED:
        return value is not None
    if isinstance(wanted, bool) or isinstance(value, bool):  # True must not match 1
        return value is wanted
    return value == wanted


def _key(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _metric(metrics: dict, name: str):
    """A metric by name; "a.b" reads key b of the dict metric a (e.g. build.lm_head)."""
    head, _, rest = name.partition(".")
    value = metrics.get(head)
    return value.get(rest) if rest and isinstance(value, dict) else (None if rest else value)


def _goal_rows(goal: Goal, rows: list[dict]) -> list[tuple[dict, dict | None]]:
    """(the `per` values, the newest row with them) for each line of the goal; one (.., None) line when no row."""
    found = [r for r in rows if r["bench"] == goal.bench and r["metrics"].get("quick") is not True
             and all(_matches(r["metrics"].get(k), v) for k, v in goal.where.items())]
    if goal.newest_run and found:
        found = _newest_run(found)
    newest = {}
    for row in _newest_first(found):
        newest.setdefault(tuple(_key(_metric(row["metrics"], k)) for k in goal.per), row)
    if not newest:
        return [({}, None)]
    lines = sorted(newest.values(), key=lambda r: r["_order"])  # in the order the bench measured them
    return [({k: _metric(row["metrics"], k) for k in goal.per}, row) for row in lines]


def _goal_text(goal: Goal, per: dict, row: dict | None) -> str:
    where = [f"{k} {v}" if v == MEASURED else f"{k}={_cell(v)}" for k, v in goal.where.items()]
    where += [f"{k}={_cell(v)}" for k, v in per.items() if v is not None or not k.count(".")]
    where += [f"{k}={_cell(row['metrics'].get(k))}" for k in goal.label if row and k in row["metrics"]]
    scope = f" ({', '.join(where)})" if where else ""
    return f"{goal.bench}{scope}: `{goal.metric}` {OP_TEXT[goal.op]} {_cell(goal.target)}"


def _verdict(goal: Goal, value) -> bool | None:
    """True/False when the value was measured, None when it was not."""
    measured = isinstance(value, bool) if isinstance(goal.target, bool) else _number(value)
    return bool(OPS[goal.op](value, goal.target)) if measured else None


def _goal_line(goal: Goal, per: dict, row: dict | None) -> tuple[list[str], bool | None]:
    m = row["metrics"] if row else {}
    value = m.get(goal.metric)
    met = _verdict(goal, value)
    if met is None:
        shown = "—" + (f" ({_cell(m['note'])[:60]})" if m.get("note") else "")
    else:
        shown = _cell(value) + "".join(f"; {k} {_cell(m.get(k))}" for k in goal.show)
    source = [_cell(row.get("date")), _cell(row.get("git")), f"`{_cell(row.get('command'))}`"] if row else ["—"] * 3
    verdict = {True: "yes", False: "**no**", None: "not measured"}[met]
    return [_goal_text(goal, per, row), shown, verdict] + source, met


def goals_section(rows: list[dict], goals=GOALS) -> list[str]:
    table, verdicts = [], []
    for goal in goals:
        for per, row in _goal_rows(goal, rows):
            cells, met = _goal_line(goal, per, row)
            table.append("| " + " | ".join(cells) + " |")
            verdicts.append(met)
    summary = (f"{verdicts.count(True)} of {len(verdicts)} met, {verdicts.count(False)} not met, "
               f"{verdicts.count(None)} not measured. Each line reads the newest matching row (not --quick runs).")
    header = ["| goal | measured | met | date | git | command |", "|---|---|---|---|---|---|"]
    return ["## Goals", "", summary, ""] + header + table + [""]


def _profile_rows(rows: list[dict]) -> list[dict]:
    """The newest profiled commit's e2e_profile rows that break the step down by op, newest per configuration."""
    found = [r for r in rows if r["bench"] == "e2e_profile" and isinstance(r["metrics"].get("ms_by_op"), dict)]
    if not found:
        return []
    git = _newest_first(found)[0].get("git")
    newest = {}
    for row in _newest_first([r for r in found if r.get("git") == git]):
        newest.setdefault(tuple(_key(row["metrics"].get(k)) for k in PROFILE_CONFIG), row)
    return list(newest.values())


def _ops(rows: list[dict]) -> list[str]:
    # heaviest op first (in the newest row), the catch-all last
    ms = {}
    for row in reversed(rows):
        ms |= row["metrics"]["ms_by_op"]
    return sorted(ms, key=lambda op: (op == "other", -(ms[op] if _number(ms[op]) else 0)))


def _op_cell(ms, total) -> str:
    if not _number(ms):
        return "—"
    return f"{ms:.1f} ({ms / total:.0%})" if _number(total) and total > 0 else f"{ms:.1f}"


def profile_section(rows: list[dict]) -> list[str]:
    prof = _profile_rows(rows)
    if not prof:
        return []
    ops = _ops(prof)
    extras = [k for k in ("wall_ms", "host_issue_ms", "host_syncs", "steady_peak_gib", "resident_gib")
              if any(k in r["metrics"] for r in prof)]
    header = ["workload", "tokens_per_row", "build", "gpu_ms_per_step"] + [f"{op} ms (%)" for op in ops] + extras
    lines = ["## Where the time goes", "",
             f"From the newest profiled commit (git {_cell(prof[0].get('git'))}), one row per configuration; "
             "% is the share of gpu_ms_per_step.", "",
             "| " + " | ".join(header + ["date", "command"]) + " |", "|" + "---|" * (len(header) + 2)]
    for row in prof:
        m = row["metrics"]
        build = _cell(m.get("build")) + (f" env {_cell(m['env'])}" if m.get("env") else "")
        cells = [_cell(m.get("workload")), _cell(m.get("tokens_per_row")), build, _cell(m.get("gpu_ms_per_step"))]
        cells += [_op_cell(m["ms_by_op"].get(op), m.get("gpu_ms_per_step")) for op in ops]
        cells += [_cell(m.get(k)) for k in extras] + [_cell(row.get("date")), f"`{_cell(row.get('command'))}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def analysis_section(path: Path) -> list[str]:
    if not path.exists():
        return []
    return ["## Analysis (hand-written; cites the rows above)", "", path.read_text().rstrip("\n"), ""]


def generate(results: Path, out_dir: Path, analysis: Path | None = None) -> Path:
    """Write out_dir/RESULTS.md (and plots); analysis defaults to out_dir/ANALYSIS.md, appended when it exists."""
    rows = load_rows(results)
    benches = sorted({r["bench"] for r in rows})
    lines = ["# Benchmark results", "",
             f"Generated by `benchmarks/report.py` from `{Path(results).name}` ({len(rows)} rows). "
             "Newest first; — means not measured (missing rival or out of memory, see the note column).", ""]
    lines += goals_section(rows) + profile_section(rows)
    for bench in benches:
        bench_rows = _newest_first([r for r in rows if r["bench"] == bench])
        cols = _columns(bench_rows)
        lines += [f"## {bench}", ""]
        if bench in PLOTTERS:
            png = PLOTTERS[bench](bench, bench_rows, out_dir / "plots")
        else:
            x = _x_axis(bench_rows)
            png = plot_bench(bench, bench_rows, x, out_dir / "plots") if x else None
        if png:
            lines += [f"![{bench}](plots/{png.name})", ""]
        header = ["date", "device", "git"] + cols + ["command"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in bench_rows:
            cells = [_cell(r.get("date")), _cell(r.get("device")), _cell(r.get("git"))]
            cells += [_cell(r["metrics"].get(c)) for c in cols]
            cells.append(f"`{_cell(r.get('command'))}`" if r.get("command") else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += analysis_section(analysis or out_dir / "ANALYSIS.md")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and plots/")
    args = parser.parse_args()
    if not args.results.exists():
        sys.exit(f"no results file at {args.results}")
    print(generate(args.results, args.out))


if __name__ == "__main__":
    main()
