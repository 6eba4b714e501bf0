"""Training throughput of vlpretrain's real trainer: one JSON line of figures.

    python tools/bench.py --config FILE [--warmup 10] [--log-every 1] [--eval] [key=value ...]

Runs ``vlpretrain.train.loop.train`` in this process on the config (``train.steps`` steps, logged
every step; no checkpoints but the final one, no export, no evaluation unless ``--eval``) and
reports, over the steps after the first ``--warmup``:

- ``samples_per_s``, ``tokens_per_s`` (image tokens + real caption tokens), ``step_p50_s``/``step_p90_s``
  (wall time of a step, data wait included; the mean of each log window with ``--log-every N``),
  ``data_wait_frac``;
- ``tflops_per_s`` and ``mfu`` (model FLOPs counted from the shapes that ran; the peak is the GPU's
  table value or this CPU's measured matmul rate, see ``vlpretrain.train.flops``);
- ``peak_rss_mb`` (this process's high-water mark), ``peak_rss_workers_mb`` (the largest data
  worker's), ``peak_gpu_mb`` on a GPU;
- ``eval`` (``--eval``): the final validation figures on ``data.val``;
- ``compiled`` (``train.compile``): dynamo's graphs and graph breaks, and inductor's count of graphs it
  ran without CUDA graphs under a CUDA-graph ``train.compile_mode`` (the reasons: ``TORCH_LOGS=cudagraphs``).

``python tools/bench.py --summarise A.json B.json ...`` prints one line per earlier run (its
``data.decode``, data-wait fraction, samples/s and MFU) to compare them side by side (tools/gpu_check.sh).

Not a test: it asserts nothing. For ratios against another trainer, see ``tools/compare_openclip.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarise(records: list[dict], warmup: int) -> dict:
    """Figures over the training records (one per log window of ``train.log_every`` steps) whose steps all
    come after the first ``warmup``; each record weighs by its window's time."""
    steps = [r for r in records if "step_time_s" in r and not any(k.startswith("eval/") for k in r)]
    windows, previous = [], 0
    for r in steps:
        windows.append((r, r["step"] - previous))
        previous = r["step"]
    timed = [r for r, n in windows if r["step"] - n >= warmup]
    weight = {id(r): r["step_time_s"] * n for r, n in windows}  # the window's seconds
    if not timed:
        raise SystemExit(f"only {previous} step(s) ran; raise train.steps above --warmup={warmup}.")
    total = sum(weight[id(r)] for r in timed)
    out = {
        "steps_timed": sum(n for r, n in windows if r in timed),
        "samples_per_s": sum(r["samples_per_s"] * weight[id(r)] for r in timed) / total,
        "tokens_per_s": sum(r["tokens_per_s"] * weight[id(r)] for r in timed) / total,
        "step_p50_s": percentile([r["step_time_s"] for r in timed], 50),
        "step_p90_s": percentile([r["step_time_s"] for r in timed], 90),
        "data_wait_frac": sum(r["data_wait_frac"] * weight[id(r)] for r in timed) / total,
        "final_loss": steps[-1]["loss"],
    }
    if all("tflops_per_s" in r for r in timed):
        out["tflops_per_s"] = sum(r["tflops_per_s"] * weight[id(r)] for r in timed) / total
    if all("mfu" in r for r in timed):  # (a window whose rate outran a measured CPU peak has none)
        out["mfu"] = sum(r["mfu"] * weight[id(r)] for r in timed) / total
    return out


def summary_line(path: str) -> str:
    """One earlier run's JSON line (this tool's output file) as ``data.decode=MODE: figures``."""
    try:
        figures = json.loads(Path(path).read_text().strip().splitlines()[-1])
        decode = next((o.split("=", 1)[1] for o in figures["overrides"] if o.startswith("data.decode=")), "cpu")
        mfu = f", mfu {figures['mfu']:.3f}" if "mfu" in figures else ""
        return (f"data.decode={decode}: data_wait_frac {figures['data_wait_frac']:.3f}, samples/s "
                f"{figures['samples_per_s']:.1f}{mfu} ({Path(path).name})")
    except (OSError, IndexError, KeyError, ValueError) as exc:
        return f"{Path(path).name}: no figures ({type(exc).__name__}: {exc})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print earlier runs' figures side by side")
    parser.add_argument("--config", help="experiment YAML (required unless --summarise)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures (default 10)")
    parser.add_argument("--log-every", type=int, default=1,
                        help="train.log_every (default 1): the trainer reads the device on the host at log steps "
                             "only, so on a GPU a larger value measures the loop as it runs unobserved")
    parser.add_argument("--eval", action="store_true", help="evaluate on data.val after the last step")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    if args.summarise:
        print("\n".join(summary_line(path) for path in args.summarise))
        return 0
    if not args.config:
        parser.error("--config is required (or --summarise JSON ...)")

    import torch

    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train
    from vlpretrain.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="vlpretrain-bench-") as tmp:
        fixed = [f"run.dir={tmp}/run", f"train.log_every={args.log_every}", "train.ckpt_every=0", "train.export=false",
                 "train.resume=null", "train.trackers=[]", "eval.every=0"]
        if not args.eval:
            fixed.append("data.val=null")
        cfg = load_config(args.config, [*args.overrides, *fixed])
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's notes: stdout holds the JSON line alone
            summary = train(cfg)
        figures = summarise(read_metrics(cfg.run.dir), args.warmup)
    figures.update(
        config=args.config, overrides=args.overrides, precision=cfg.train.precision, batch_size=cfg.train.batch_size,
        world_size=summary["world_size"], device="cuda" if torch.cuda.is_available() else "cpu",
        torch_threads=torch.get_num_threads(),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_rss_workers_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        skipped_samples=summary["skipped_samples"])
    if torch.cuda.is_available():
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if cfg.train.compile:  # what the compiler did: graphs, breaks, and graphs run without CUDA graphs
        from torch._dynamo.utils import counters

        figures["compiled"] = {"mode": cfg.train.compile_mode, "graphs": counters["stats"]["unique_graphs"],
                               "graph_breaks": sum(counters["graph_break"].values()),
                               "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if args.eval:
        figures["eval"] = {k: v for k, v in summary["eval"].items() if isinstance(v, (int, float))}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
