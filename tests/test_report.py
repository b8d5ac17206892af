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


def _goal_lines(md):
    """goal text -> (measured, met, date, git, command) from the Goals table."""
    section = md.split("## Goals")[1].split("\n## ")[0]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_goals_met_unmet_missing_and_newest_row(tmp_path):
    e2e = {"workload": "W1-qv", "reference_tok_s": 1000.0, "speedup_vs_reference": 9.5, "mfu": 0.3, "peak_gib": 11.4,
           "kept_activation_layers": 0, "layers_without_recompute": 0}
    rows = [
        _row("e2e", "2026-01-01", e2e | {"speedup_vs_reference": 1.0}, git="old111"),
        _row("e2e", "2026-01-02", e2e, git="new222"),
        _row("e2e", "2026-01-02", e2e | {"kept_activation_layers": 24, "peak_gib": 15.6}, git="new222"),  # same run
        _row("e2e", "2026-01-03", {"workload": "W1-qv", "mfu": 0.9, "peak_gib": 5.0}),  # no reference: not counted
        _row("context", "2026-01-01", {"cap_gib": 24.0, "max_tokens": 131072}),
        _row("context", "2026-01-02", {"cap_gib": 24.0, "max_tokens": 65536}),  # the newest counts, even if worse
        _row("cross_entropy", "2026-01-02", {"T": 65536, "speedup_vs_torch": None, "speedup_vs_liger": 1.2,
                                             "note": "torch: OOM"}),
        _row("moe", "2026-01-02", {"T": 16384, "lora": True, "experts": "mxfp4", "speedup_vs_peft": 3.5}),
        _row("moe", "2026-01-03", {"T": 16384, "lora": True, "experts": "mxfp4", "speedup_vs_peft": 0.1,
                                   "quick": True}),  # smoke run
        _row("moe", "2026-01-04", {"T": 16384, "lora": True, "experts": "bf16", "speedup_vs_peft": 0.2}),  # not 4-bit
        _row("convergence", "2026-01-02", {"within_2pct": False, "max_rel_diff": 0.031}),
    ]
    results = tmp_path / "results.jsonl"
    _write(results, rows)
    md = report.generate(results, tmp_path).read_text()
    assert md.index("## Goals") < md.index("## context")
    lines = _goal_lines(md)
    # one line per goal at least; the three W1-qv goals have a second memory mode here
    assert len(lines) == sum(len(report._goal_rows(g, [])) for g in report.GOALS) + 3
    qv = "e2e (workload=W1-qv, reference_tok_s measured, kept_activation_layers=0, layers_without_recompute=0): "
    assert lines[qv + "`speedup_vs_reference` ≥ 8"][:3] == ["9.5", "yes", "2026-01-02"]
    assert lines[qv + "`speedup_vs_reference` ≥ 8"][3] == "new222"
    assert lines[qv + "`mfu` ≥ 0.4"][:2] == ["0.3", "**no**"]
    assert lines[qv + "`peak_gib` ≤ 11.5"][:2] == ["11.4", "yes"]
    assert lines[qv.replace("layers=0", "layers=24") + "`peak_gib` ≤ 11.5"][:2] == ["15.6", "**no**"]  # per memory mode
    assert lines["context (cap_gib=24): `max_tokens` ≥ 131072"][:2] == ["65536", "**no**"]
    assert lines["context (cap_gib=80): `max_tokens` ≥ 500000"] == ["—", "not measured", "—", "—", "—"]
    torch_65k = lines["cross_entropy (T=65536): `speedup_vs_torch` > 1"]
    assert torch_65k[:2] == ["— (torch: OOM)", "not measured"] and torch_65k[2] == "2026-01-02"
    assert lines["cross_entropy (T=65536): `speedup_vs_liger` > 1"][:2] == ["1.2", "yes"]
    assert lines["cross_entropy (T=4096): `speedup_vs_torch` > 1"][1] == "not measured"
    assert lines["moe (T=16384, lora=true, experts=mxfp4): `speedup_vs_peft` ≥ 3"][:2] == ["3.5", "yes"]
    assert lines["moe (T=16384, lora=false, experts=mxfp4): `speedup_vs_grouped_mm` ≥ 1.5"][1] == "not measured"
    assert lines["convergence: `within_2pct` = true"][:2] == ["false; max_rel_diff 0.031", "**no**"]
    assert lines["weights_memory: `resident_gib` ≤ 11"][1] == "not measured"
    met = [v[1] for v in lines.values()]
    assert f"{met.count('yes')} of {len(met)} met, {met.count('**no**')} not met" in md


def test_goals_one_line_per_group_newest_run_and_label(tmp_path):
    def attn(layer, docs, speedup, git):
        r = _row("attention", "2026-01-02", {"T": 16384, "layer": layer, "docs": docs, "speedup_vs_flex": speedup},
                 git=git)
        r["command"] = f"python3 bench_attention.py ({git})"
        return r

    def lora(shape, fmt, speedup, ratio, **extra):
        return _row("lora_linear", "2026-01-02", {"shape": shape, "format": fmt, "T": 16384,
                                                  "speedup_vs_bnb_peft": speedup, "ratio_vs_bf16": ratio} | extra)

    rows = [attn("full", 1, 0.5, "old111"), attn("window", 1, 0.5, "old111"),  # older run: only the newest counts
            attn("full", 1, 2.5, "new222"), attn("full", 22, 1.5, "new222"),
            lora("q", "nf4", 0.5, 3.0), lora("q", "nf4", 1.1, 1.2, path="slabs"), lora("q", "mxfp4", 0.9, 1.4),
            lora("q", "nf4", 9.0, 0.1) | {"metrics": {"shape": "q", "format": "nf4", "T": 4096,
                                                      "speedup_vs_bnb_peft": 9.0}}]  # other T: ignored
    results = tmp_path / "results.jsonl"
    _write(results, rows)
    lines = _goal_lines(report.generate(results, tmp_path).read_text())
    attention = {k: v for k, v in lines.items() if k.startswith("attention")}
    assert attention == {
        "attention (T=16384, layer=full, docs=1): `speedup_vs_flex` ≥ 2":
            ["2.5", "yes", "2026-01-02", "new222", "`python3 bench_attention.py (new222)`"],
        "attention (T=16384, layer=full, docs=22): `speedup_vs_flex` ≥ 2":
            ["1.5", "**no**", "2026-01-02", "new222", "`python3 bench_attention.py (new222)`"]}
    assert lines["lora_linear (T=16384, shape=q, format=nf4, path=slabs): `speedup_vs_bnb_peft` > 1"][:2] == [
        "1.1", "yes"]
    q_nf4 = "lora_linear (T=16384, shape=q, format=nf4, path=slabs): "
    assert lines[q_nf4 + "`ratio_vs_bf16` ≤ 1.3"][:2] == ["1.2", "yes"]
    assert lines["lora_linear (T=16384, shape=q, format=mxfp4): `ratio_vs_bf16` ≤ 1.3"][:2] == ["1.4", "**no**"]
    assert len([k for k in lines if k.startswith("lora_linear")]) == 4


def _profile_row(git, tokens, gpu_ms, ms_by_op, build=None, **extra):
    m = {"workload": "W1-qv", "tokens_per_row": tokens, "layers": 24, "build": build or {},
         "gpu_ms_per_step": gpu_ms, "ms_by_op": ms_by_op, "top_kernels_ms": [["k", 1.0]],
         "resident_gib": 10.4, "steady_peak_gib": 11.2} | extra
    return _row("e2e_profile", "2026-01-02", m, git=git)


def test_where_the_time_goes_from_the_newest_profiled_commit(tmp_path):
    ops = {"other": 10.0, "moe": 60.0, "attention": 20.0, "loss": 10.0}
    rows = [_profile_row("new222", 4096, 100.0, ops | {"moe": 1.0}),  # superseded by the later line, same config
            _profile_row("old111", 2048, 50.0, ops),  # older commit: not shown
            _profile_row("new222", 4096, 100.0, ops, wall_ms=120.0, host_issue_ms=95.5, host_syncs=9),
            _profile_row("new222", 1024, 40.0, {"moe": 30.0, "other": 10.0}, build={"offload_activations": True}),
            _row("e2e_profile", "2026-01-03", {"workload": "W1-qv", "gpu_ms_per_step": 1.0}, git="nobreak")]
    results = tmp_path / "results.jsonl"
    _write(results, rows)
    md = report.generate(results, tmp_path).read_text()
    section = md.split("## Where the time goes")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    header = table[0]
    assert header.index("moe ms (%)") < header.index("attention ms (%)") < header.index("loss ms (%)") \
        < header.index("other ms (%)")  # heaviest first, catch-all last
    for col in ("workload", "tokens_per_row", "build", "gpu_ms_per_step", "wall_ms", "host_issue_ms", "host_syncs",
                "steady_peak_gib", "resident_gib"):
        assert f" {col} " in header
    body = table[1:]
    assert len(body) == 2 and "| 1024 |" in body[0] and "| 4096 |" in body[1]
    assert "| 60.0 (60%) | 20.0 (20%) | 10.0 (10%) | 10.0 (10%) | 120 | 95.5 | 9 | 11.2 | 10.4 |" in body[1]
    assert "| 30.0 (75%) | — | — | 10.0 (25%) | — | — | — |" in body[0]
    assert '{"offload_activations": true}' in body[0]
    assert "old111" not in section and "git new222" in section


def test_no_profile_rows_no_section_and_analysis_appended_verbatim(tmp_path):
    results = tmp_path / "results.jsonl"
    _write(results, [_row("e2e", "2026-01-01", {"workload": "W1-qv"})])
    md = report.generate(results, tmp_path).read_text()
    assert "## Where the time goes" not in md and "## Analysis" not in md
    text = "MoE is 65% of the step (see *Where the time goes*, row 1).\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    (tmp_path / "ANALYSIS.md").write_text(text)
    md = report.generate(results, tmp_path).read_text()
    head, tail = md.split("## Analysis (hand-written; cites the rows above)\n\n")
    assert tail.rstrip("\n") == text.rstrip("\n") and "## e2e" in head
