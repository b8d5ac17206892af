"""benchmarks/report.py on a synthetic results file."""

import json

import importlib.util
from pathlib import Path

# benchmarks/ is a folder of scripts, not an installed package: load the generator from its file.
_spec = importlib.util.spec_from_file_location(
    "benchmarks_report", Path(__file__).resolve().parent.parent / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _row(bench, date, metrics, git="abc123"):
    return {"bench": bench, "date": date, "device": "NVIDIA H200", "command": "python3 bench.py",
            "git": git, "metrics": metrics}


def _write(path, rows, extra_lines=()):
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")


def test_tables_newest_first_with_all_metric_columns_and_plot(tmp_path):
    rows = [
        _row("cross_entropy", "2026-01-01", {"T": 4096, "fastft_ms": 15.0, "torch_ms": 24.0, "fastft_extra_gib": 0.2},
             git="old111"),
        _row("cross_entropy", "2026-01-02", {"T": 4096, "fastft_ms": 13.5, "torch_ms": 24.1, "fastft_extra_gib": 0.19},
             git="new222"),
        _row("cross_entropy", "2026-01-02", {"T": 65536, "fastft_ms": 210.0, "torch_ms": None, "note": "torch: OOM"},
             git="new222"),
        _row("e2e", "2026-01-03", {"tokens_per_s": 12345.6, "config": "a|b"}),
    ]
    results = tmp_path / "results.jsonl"
    _write(results, rows, extra_lines=["", "{not json"])
    md = report.generate(results, tmp_path / "out").read_text()

    assert "## cross_entropy" in md and "## e2e" in md
    ce = md.split("## cross_entropy")[1].split("## e2e")[0]
    header = next(line for line in ce.splitlines() if line.startswith("| date"))
    for col in ("T", "fastft_ms", "torch_ms", "fastft_extra_gib", "note", "command"):
        assert f" {col} " in header
    body = [line for line in ce.splitlines() if line.startswith("| 2026")]
    assert len(body) == 3
    assert "65536" in body[0] and "old111" in body[2]  # newest first (same day: later line first)
    assert "—" in body[0]  # null rendered, not "None"
    assert "a\\|b" in md  # pipes inside cells escaped
    assert (tmp_path / "out" / "plots" / "cross_entropy.png").stat().st_size > 1000
    assert "plots/cross_entropy.png" in ce
    assert not (tmp_path / "out" / "plots" / "e2e.png").exists()  # no size axis, no plot


def test_single_size_gets_no_plot(tmp_path):
    results = tmp_path / "results.jsonl"
    _write(results, [_row("lora_linear", "2026-01-01", {"T": 16384, "fastft_ms": 1.0})])
    md = report.generate(results, tmp_path).read_text()
    assert "## lora_linear" in md and "![" not in md
