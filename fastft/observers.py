"""Training observers: the loop reports events, each observer turns them into one kind of output.

Only rank 0 gets observers. Events: start(info), step(metrics), eval(metrics), end(summary).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class Observer:
    def start(self, info: dict) -> None: ...
    def step(self, m: dict) -> None: ...
    def eval(self, m: dict) -> None: ...
    def end(self, summary: dict) -> None: ...


class ProgressBar(Observer):
    def start(self, info):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info["start_step"], unit="step", dynamic_ncols=True,
                        desc="training")

    def step(self, m):
        post = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}", "tok/s": f"{m['tokens_per_s']:,.0f}"}
        if m.get("gpu_mem_gib"):
            post["mem"] = f"{m['gpu_mem_gib']:.1f}G"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(m["step"] - self.bar.n)

    def eval(self, m):
        self.bar.write(f"step {m['step']}: eval loss {m['eval_loss']:.4f}")

    def end(self, summary):
        self.bar.close()


class MetricsLog(Observer):
    """metrics.jsonl: one line per step and per eval. On resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        kept = []
        if resume_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def _write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def step(self, m):
        self._write({"type": "train", **m})

    def eval(self, m):
        self._write({"type": "eval", **m})


class TensorBoard(Observer):
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def start(self, info):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir))

    def step(self, m):
        for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
            if m.get(key) is not None and math.isfinite(m[key]):
                self.writer.add_scalar(f"train/{key}", m[key], m["step"])

    def eval(self, m):
        self.writer.add_scalar("eval/loss", m["eval_loss"], m["step"])

    def end(self, summary):
        self.writer.close()


class LossPlot(Observer):
    """loss.png at the end, drawn from metrics.jsonl so a resumed run plots its whole history."""

    def __init__(self, metrics_path: Path, out_path: Path):
        self.metrics_path, self.out_path = metrics_path, out_path

    def end(self, summary):
        plot_loss(self.metrics_path, self.out_path)


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["type"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
