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


def _sweep_row(n, fast_tok_s, fast_gib, ref_tok_s, ref_gib, git="abc123", note=None):
    m = {"tokens": n, "workload": "W1-qv", "layers": 24, "fastft_tok_s": fast_tok_s, "fastft_peak_gib": fast_gib,
         "reference_tok_s": ref_tok_s, "reference_peak_gib": ref_gib,
         "speedup_vs_reference": fast_tok_s / ref_tok_s if ref_tok_s else None}
    if note:
        m["note"] = note
    r = _row("context_sweep", "2026-01-05", m, git=git)
    r["command"] = f"python3 benchmarks/bench_context.py --sweep ({git})"
    return r


def test_context_sweep_table_and_plot_from_the_newest_run(tmp_path):
    old = [_sweep_row(2048, 1.0, 1.0, 1.0, 1.0, git="old111"), _sweep_row(262144, 1.0, 1.0, None, None, git="old111")]
    new = [_sweep_row(2048, 9000.0, 13.1, 2500.0, 41.0, git="new222"),
           _sweep_row(8192, 9500.0, 14.0, 2000.0, 60.5, git="new222"),
           _sweep_row(32768, 7000.0, 19.0, None, None, git="new222", note="reference: OOM")]
    results = tmp_path / "results.jsonl"
    _write(results, old + new)
    md = report.generate(results, tmp_path).read_text()
    assert (tmp_path / "plots" / "context_sweep.png").stat().st_size > 1000
    assert "![context_sweep](plots/context_sweep.png)" in md
    plotted = report._newest_run(report.load_rows(results))  # what the plot draws: the old run is not mixed in
    assert [r["metrics"]["tokens"] for r in plotted] == [2048, 8192, 32768]
    section = md.split("## context_sweep")[1]
    header = next(line for line in section.splitlines() if line.startswith("| date"))
    for col in ("tokens", "fastft_tok_s", "fastft_peak_gib", "reference_tok_s", "reference_peak_gib",
                "speedup_vs_reference", "note"):
        assert f" {col} " in header
    assert "reference: OOM" in section and "| 3.6 |" in section  # 9000 / 2500


def test_convergence_table_without_curves_and_plot(tmp_path):
    fast = [10.0 - 0.05 * i for i in range(100)]
    ref = [x * 1.001 for x in fast]
    m = {"steps": 100, "tokens_per_row": 1024, "layers": 24, "lr": 2e-4, "max_rel_diff": 0.001,
         "mean_rel_diff": 0.001, "raw_max_rel_diff": 0.001, "fastft_final_loss": fast[-1],
         "reference_final_loss": ref[-1], "fastft_curve": fast, "reference_curve": ref}
    results = tmp_path / "results.jsonl"
    _write(results, [_row("convergence", "2026-01-06", m)])
    md = report.generate(results, tmp_path).read_text()
    section = md.split("## convergence")[1]
    header = next(line for line in section.splitlines() if line.startswith("| date"))
    assert " max_rel_diff " in header and " fastft_final_loss " in header
    assert "curve" not in header and "[10.0" not in section  # lists are plotted, not tabled
    assert (tmp_path / "plots" / "convergence.png").stat().st_size > 1000
    assert "![convergence](plots/convergence.png)" in section


def test_special_benches_without_plottable_values_get_no_plot(tmp_path):
    results = tmp_path / "results.jsonl"
    _write(results, [_row("convergence", "2026-01-06", {"steps": 10, "max_rel_diff": None}),
                     _sweep_row(2048, 1.0, 1.0, None, None) | {"metrics": {"tokens": 2048, "fastft_tok_s": None}}])
    md = report.generate(results, tmp_path).read_text()
    assert "## convergence" in md and "## context_sweep" in md and "![" not in md
