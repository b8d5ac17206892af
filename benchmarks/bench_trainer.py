"""trainer: what a user of ``python fastft/train.py`` gets per step, against bench_e2e's bare loop, in one invocation.

bench_e2e times the model and a torch AdamW step in a bare loop. A user runs the CLI, which adds what a training run
needs around the same model: its engine (fused AdamW on the fp32 LoRA weights, gradient clipping; DeepSpeed's
with several GPUs), the non-finite-loss check, per-step metrics, data collation. Here the CLI trains on a synthetic
gpt-oss-20b checkpoint in the hub layout (benchmarks/bench_weights.py writes it; random weights, the built-in tiny
model's tokenizer) and a generated JSONL file that packs into full --max-seq-len rows, one row per optimizer step (W1-qv: LoRA r16 on
q_proj, v_proj, dropout 0.1, the CLI's defaults). Each step's time comes from the run's own metrics.jsonl; the median
skips the first two steps (kernel autotuning, CUDA graph capture). In the same invocation bench_e2e's loop is
timed on rows of the same length with the same memory mode. One ``trainer`` row per --keep value:

  trainer_tok_s, trainer_s_per_step   median over the steps after the first two (tokens: the packed rows' lengths)
  loop_tok_s, loop_s_per_step         bench_e2e's measure() of the same build (offload, graphs, keep)
  trainer_vs_loop                     trainer_tok_s / loop_tok_s: below 1 by the packing too (the trainer pads each
                                      row to --max-seq-len and counts only its real tokens; the loop's rows are full),
                                      so loop_s_per_step against trainer_s_per_step is the step-time comparison
  trainer_peak_gib                    metadata.json's peak_gpu_memory_gib; kept_activation_layers from there too

    python benchmarks/bench_trainer.py [--keep off,auto] [--steps 10] [--quick]

--quick: the built-in tiny model, 256-token rows, no loop (runs on CPU; the test suite uses it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SKIP_STEPS = 2  # step 1 runs eagerly and autotunes the kernels, step 2 captures the CUDA graphs


def write_data(path: Path, rows: int, words: int, seed: int = 0) -> None:
    """Question/answer rows of random words: long answers, so a packed row holds a few documents."""
    rnd = random.Random(seed)
    vocab = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(500)]
    with open(path, "w") as f:
        for _ in range(rows):
            q = " ".join(rnd.choices(vocab, k=12)) + "?"
            a = " ".join(rnd.choices(vocab, k=words)) + "."
            f.write(json.dumps({"question": q, "answer": a}) + "\n")


def synthetic_checkpoint(path: Path) -> Path:
    """gpt-oss-20b in the hub layout with random weights (a child process of bench_weights) + the tiny tokenizer,
    saved the way the trainer saves it into its outputs."""
    from fastft.model import load_tokenizer

    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_weights.py"), "--write-only", str(path),
                    "--shards", "3"], check=True)
    load_tokenizer("tiny").save_pretrained(path)
    return path


def run_trainer(model: str, data: Path, out: Path, row_len: int, steps: int, keep: str) -> dict:
    cmd = [sys.executable, str(ROOT / "fastft" / "train.py"), str(data), "--model", model, "--output-dir", str(out),
           "--overwrite", "--max-seq-len", str(row_len), "--batch-size", "1", "--max-steps", str(steps),
           "--offload-activations", "--keep-activations", keep, "--save-every", str(10**6), "--no-progress"]
    print("[trainer] " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("type") == "train"]
    timed = train[SKIP_STEPS:] or train
    meta = json.loads((out / "metadata.json").read_text())
    step_s = statistics.median(r["step_s"] for r in timed)
    tokens = statistics.median(r["tokens"] for r in timed)
    return {"trainer_s_per_step": step_s, "trainer_tok_s": tokens / step_s, "tokens_per_step": tokens,
            "trainer_steps_timed": len(timed), "trainer_step_s": [round(r["step_s"], 4) for r in train],
            "trainer_peak_gib": meta.get("peak_gpu_memory_gib"), "cuda_graphs": meta.get("cuda_graphs"),
            "kept_activation_layers": meta.get("kept_activation_layers"), "zero_stage": meta.get("zero_stage"),
            "trainer_final_loss": meta.get("final_train_loss")}


def run_loop(row_len: int, keep: str, steps: int) -> dict:
    """bench_e2e's loop on the same build, in a child process (a fresh GPU, as the trainer had)."""
    done = subprocess.run([sys.executable, __file__, "--loop-child", json.dumps([row_len, keep, steps])],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return {"note": f"bench_e2e's loop failed (exit {done.returncode}, its stderr above)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def loop_child(row_len: int, keep: str, steps: int) -> None:
    from benchmarks.bench_e2e import CONFIG, build_fastft, fastft_step, measure, token_stream

    cfg = json.loads(CONFIG.read_text())
    rows = token_stream(3, row_len, cfg["vocab_size"], seed=1)
    keep_gib = 0 if keep == "off" else keep if keep == "auto" else float(keep)  # as the CLI's --keep-activations
    model, _ = build_fastft(cfg, "W1-qv", offload_activations=True, layer_graphs=True, keep_gib=keep_gib,
                            lm_head="int8-host")  # the trainer's default layout on CUDA
    m = measure(fastft_step, model, rows, cfg, steps, warmup=2)
    print(json.dumps({"loop_s_per_step": m["step_s"], "loop_tok_s": row_len / m["step_s"],
                      "loop_peak_gib": m["peak_gib"]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", default="off,auto", help="--keep-activations values, one row each")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per trainer run (the first two not timed)")
    ap.add_argument("--row-len", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="the tiny model, 256-token rows, no loop (CPU)")
    ap.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/results.jsonl)")
    ap.add_argument("--loop-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop_child:
        loop_child(*json.loads(args.loop_child))
        return
    from benchmarks.common import RESULTS, record

    row_len = 256 if args.quick else args.row_len
    with tempfile.TemporaryDirectory(prefix="fastft-bench-trainer-") as tmp:
        root = Path(tmp)
        # ~9 tokens per random word with the tiny tokenizer: documents of ~row_len / 4 tokens, rows for every step
        words = max(20, row_len // 36)
        write_data(root / "data.jsonl", rows=8 * (args.steps + 2), words=words)
        model = "tiny" if args.quick else str(synthetic_checkpoint(root / "gpt-oss-20b"))
        for keep in args.keep.split(","):
            metrics = {"model": "tiny" if args.quick else "gpt-oss-20b (synthetic, hub layout)", "workload": "W1-qv",
                       "tokens_per_row": row_len, "keep_activations": keep, "offload_activations": True,
                       **run_trainer(model, root / "data.jsonl", root / f"out-{keep}", row_len, args.steps, keep)}
            print(f"[trainer] {json.dumps(metrics)}", flush=True)
            if not args.quick:
                metrics.update(run_loop(row_len, keep, args.steps))
                if "loop_tok_s" in metrics:
                    metrics["trainer_vs_loop"] = metrics["trainer_tok_s"] / metrics["loop_tok_s"]
            record("trainer", metrics, path=args.results or RESULTS)


if __name__ == "__main__":
    main()
