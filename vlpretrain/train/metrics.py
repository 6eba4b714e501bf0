"""What a run leaves for people to watch: ``metrics.jsonl``, Accelerate trackers and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """One JSON object per logged step in ``run_dir/metrics.jsonl`` (main process) + the trackers."""

    def __init__(self, run_dir: str | Path, accelerator, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.last: dict[str, Any] | None = None  # the last training (non-eval) record
        if self.main and resume_step is not None and self.path.is_file():
            # a run killed after its last checkpoint logged steps it will now redo: drop them
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.main and resume_step is None:
            self.path.write_text("")

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if not any(k.startswith("eval/") for k in values):
            self.last = record
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numeric, step=step)
        return record


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(run_dir: str | Path) -> list[Path]:
    """``loss.png`` (total and per-objective losses) and ``eval.png`` (eval figures) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    written = []
    groups = {"loss.png": lambda k: k == "loss" or k.startswith("loss/"), "eval.png": lambda k: k.startswith("eval/")}
    for name, wanted in groups.items():
        keys = sorted({k for r in records for k in r if wanted(k) and isinstance(r[k], (int, float))})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax.plot(*zip(*pts), label=key, marker="o" if len(pts) < 20 else None)
        ax.set_xlabel("step")
        ax.set_title(name[:-4])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out = Path(run_dir) / name
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
