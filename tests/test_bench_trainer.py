"""benchmarks/bench_trainer.py end to end at its --quick size on the CPU: the CLI trains, the row is recorded."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_records_a_trainer_row(tmp_path):
    results = tmp_path / "results.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trainer.py"), "--quick", "--steps", "3",
                    "--keep", "off", "--results", str(results)], check=True, capture_output=True, timeout=600)
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    m = row["metrics"]
    assert row["bench"] == "trainer" and m["keep_activations"] == "off" and m["model"] == "tiny"
    assert m["trainer_steps_timed"] == 1 and m["tokens_per_step"] > 0
    assert m["trainer_tok_s"] == m["tokens_per_step"] / m["trainer_s_per_step"]
