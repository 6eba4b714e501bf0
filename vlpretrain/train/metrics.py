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


def logged_eval(run_dir: str | Path, step: int) -> dict[str, Any] | None:
    """The evaluation metrics.jsonl already holds for ``step`` (its figures without ``eval/``), or None:
    what a finished run resumed at its last step reports instead of evaluating (and logging) again."""
    evals = [r for r in read_metrics(run_dir) if r.get("step") == step and any(k.startswith("eval/") for k in r)]
    if not evals:
        return None
    return {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")}


# eval.png: one panel per family of eval figures, so that figures share an axis only with their kind;
# counts (eval/samples) label the figure and never share an axis with a metric
EVAL_COUNTS = ("samples",)
EVAL_FAMILIES = {
    "retrieval (recall@k)": lambda k: "r@" in k or k.startswith("top"),
    "captions": lambda k: (k.startswith("caption_") and "loss" not in k) or k in ("bleu4", "cider"),
    "losses": lambda k: "loss" in k,
}


def eval_family(key: str) -> str | None:
    """The panel of eval figure ``key`` (without ``eval/``): a family of EVAL_FAMILIES, ``other``, or
    None for a count."""
    if key in EVAL_COUNTS:
        return None
    return next((family for family, member in EVAL_FAMILIES.items() if member(key)), "other")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the display
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def _draw(ax, records: list[dict[str, Any]], keys: list[str], title: str) -> None:
    for key in keys:
        pts = _series(records, key)
        ax.plot(*zip(*pts), label=key, marker="o" if len(pts) < 20 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def loss_figure(records: list[dict[str, Any]]):
    """The training losses (total and per objective) on one axis; None when there are none."""
    plt = _pyplot()

    keys = sorted({k for r in records for k in r if (k == "loss" or k.startswith("loss/")) and _series(records, k)})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _draw(ax, records, keys, "loss")
    fig.tight_layout()
    return fig


def eval_figure(records: list[dict[str, Any]]):
    """One panel per family of ``eval/*`` figures (:func:`eval_family`); the evaluated sample count goes
    in the title. None when nothing was evaluated."""
    plt = _pyplot()

    keys = sorted({k for r in records for k in r if k.startswith("eval/") and _series(records, k)})
    panels: dict[str, list[str]] = {}
    for key in keys:
        family = eval_family(key[len("eval/"):])
        if family is not None:
            panels.setdefault(family, []).append(key)
    if not panels:
        return None
    order = [f for f in (*EVAL_FAMILIES, "other") if f in panels]
    fig, axes = plt.subplots(1, len(order), figsize=(5 * len(order), 4), squeeze=False)
    for ax, family in zip(axes[0], order):
        _draw(ax, records, panels[family], family)
    counts = [f"{c} {_series(records, f'eval/{c}')[-1][1]}" for c in EVAL_COUNTS if _series(records, f"eval/{c}")]
    fig.suptitle("eval" + (f" (last: {', '.join(counts)})" if counts else ""))
    fig.tight_layout()
    return fig


def plot_curves(run_dir: str | Path) -> list[Path]:
    """``loss.png`` (:func:`loss_figure`) and ``eval.png`` (:func:`eval_figure`) from metrics.jsonl."""
    plt = _pyplot()
    records = read_metrics(run_dir)
    written = []
    for name, make in (("loss.png", loss_figure), ("eval.png", eval_figure)):
        fig = make(records)
        if fig is None:
            continue
        out = Path(run_dir) / name
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
