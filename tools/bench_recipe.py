"""The SigLIP 2 recipe's benefit: the full recipe vs its image-text losses alone, at equal steps.

    python tools/bench_recipe.py [--config configs/siglip2-base-debug.yaml] [--steps 300] [--seeds 1] [key=value ...]

Two arms train through the real trainer (``vlpretrain.train.loop.train``, in this process) from the same
seed, on the same synthetic shards, for the same steps:

- ``full``: the config's objectives as they stand (siglip2: sigmoid + captioning from step 0,
  self_distillation and masked_prediction against the EMA teacher from 80% of ``train.steps``);
- ``base``: the same config with only the objectives that run from step 0 and need no teacher
  (sigmoid + captioning). Until the first delayed start both arms are the same run (same model, heads,
  data order and updates: ``pre_start_loss_max_diff`` checks it), so the figures compare what the new
  objectives did after their start.

Each export is evaluated with the eval suite (``vlpretrain.eval.suite.evaluate_model``) on held-out
labelled shards of synthetic scenes (the ``probe`` split: its own random stream, disjoint from train and
val): retrieval R@1/R@5 both ways, and a linear probe (logistic regression on the frozen pooled image
features, first half fits, second half tests) for three labels of each scene: ``shape`` and ``color``
of its dominant object (the largest; ties go to the leftmost) and ``count`` (1-3 objects).

With ``--seeds N`` both arms repeat with ``run.seed`` = seed, seed + 1, ...; the figures are then the
mean and the sample standard deviation over seeds, and each delta (full - base, paired by seed) its mean,
standard deviation and the number of seeds where the full recipe came out ahead. Differences inside the
seed spread (or inside a probe's own standard error, ``probe_se``) are noise, not a benefit.

Prints a table and, last, one JSON line of figures (also written to ``--out``). The dataset and probe
shards are generated once under ``--work`` and reused. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ("shape", "color", "count")
RETRIEVAL = ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
BASE_ARM = "base"
FULL_ARM = "full"


# ---- labelled probe shards


def dominant(scene: dict) -> dict:
    """The scene's largest object; among equally large ones, the leftmost (then the topmost)."""
    return min(scene["objects"], key=lambda o: (-o["r"], o["x"], o["y"]))


def scene_labels(scene: dict) -> dict[str, int]:
    """The class index of each of :data:`LABELS` for one synthetic scene."""
    from vlpretrain.data.synthetic import COLORS, SHAPES

    main = dominant(scene)
    return {"shape": SHAPES.index(main["shape"]), "color": list(COLORS).index(main["color"]),
            "count": len(scene["objects"]) - 1}


def class_names(label: str) -> list[str]:
    from vlpretrain.data.synthetic import COLORS, SHAPES

    return {"shape": list(SHAPES), "color": list(COLORS), "count": ["one", "two", "three"]}[label]


def write_probe_sets(out: Path, samples: int, image_size: int, seed: int) -> dict[str, Path]:
    """``out/LABEL/`` shards for each label: the same ``samples`` scenes (``probe`` split of the synthetic
    generator), each with ``.cls`` = that label. Reused when complete; written aside and renamed whole."""
    from vlpretrain.data.synthetic import captions, random_scene, render
    from vlpretrain.data.writer import ShardWriter, encode_jpeg

    paths = {label: out / label for label in LABELS}
    if all((p / "sizes.json").is_file() for p in paths.values()):
        return paths
    work = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    writers = {label: ShardWriter(work / label, samples_per_shard=max(samples // 4, 1), mtime=0) for label in LABELS}
    for i in range(samples):
        scene = random_scene(random.Random(f"synth/{seed}/probe/{i}"))
        caps, labels = captions(scene), scene_labels(scene)
        members = {"jpg": encode_jpeg(render(scene, image_size), quality=90), "txt": caps[0].encode(),
                   "json": json.dumps({"captions": caps, "scene": scene}).encode()}
        for label, writer in writers.items():
            writer.write_members(f"probe{i:08d}", {**members, "cls": str(labels[label]).encode()})
    for label, writer in writers.items():
        writer.close()
        (work / label / "classnames.json").write_text(json.dumps(class_names(label)))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    work.rename(out)
    return paths


# ---- the two arms


def split_arms(entries: list[dict], total_steps: int) -> tuple[list[dict], int]:
    """The base arm's objectives (those starting at step 0 that need no teacher) and the first start step of
    the rest; a clear error when the config has nothing to compare."""
    from vlpretrain.objectives.registry import objective_class
    from vlpretrain.objectives.schedule import resolve_start

    def delayed(entry: dict) -> bool:
        return resolve_start(entry.get("start", 0) or 0, total_steps) > 0 or objective_class(entry["name"]).needs_teacher

    base = [e for e in entries if not delayed(e)]
    later = [resolve_start(e.get("start", 0) or 0, total_steps) for e in entries if delayed(e)]
    if not base or not later:
        names = [e["name"] for e in entries]
        raise SystemExit(f"the config's objectives are {names}; the comparison needs some from step 0 without the "
                         "teacher (the base arm) and some starting later or reading the EMA teacher (what the full "
                         "recipe adds): use configs/siglip2-base-debug.yaml or a config like it.")
    return base, min(later)


def new_objective_figures(records: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    """The first and last logged value of each new objective's loss and metrics (``loss/NAME``, ``NAME/*``)."""
    keys = sorted({k for r in records for k in r if k in {f"loss/{n}" for n in names} or k.split("/")[0] in names})
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        out[key] = {"first": values[0], "last": values[-1]}
    return out


def evaluate_arm(model_dir: Path, probes: dict[str, Path], batch_size: int) -> dict[str, float]:
    """Retrieval R@1/5 both ways and each label's linear-probe top-1 of the exported model."""
    from vlpretrain.eval.suite import EvalSettings, evaluate_model

    settings = EvalSettings("cpu", batch_size)
    first = evaluate_model(str(model_dir), str(probes[LABELS[0]]), ("retrieval", "linear_probe"), settings=settings)
    figures = {k: first["retrieval"][k] for k in RETRIEVAL}
    figures[f"probe_{LABELS[0]}"] = first["linear_probe"]["top1"]
    figures["probe_test_samples"] = first["linear_probe"]["test"]
    for label in LABELS[1:]:
        figures[f"probe_{label}"] = evaluate_model(str(model_dir), str(probes[label]), ("linear_probe",),
                                                   settings=settings)["linear_probe"]["top1"]
    return figures


def run_arm(args, data_root: Path, objectives: list[dict], seed: int, run_dir: Path,
            probes: dict[str, Path]) -> dict:
    """Train one arm, evaluate its export; its figures, final losses, new objectives' metrics and times."""
    from accelerate.state import AcceleratorState

    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train
    from vlpretrain.train.metrics import read_metrics

    fixed = [f"run.dir={run_dir}", f"run.seed={seed}", f"train.steps={args.steps}",
             f"train.batch_size={args.batch_size}", f"train.log_every={args.log_every}", "train.ckpt_every=0",
             "train.resume=null", "train.trackers=[]", "train.export=true", "eval.every=0",
             f"data.train={data_root}/train", "data.val=null", f"data.tokenizer={data_root}/tokenizer",
             f"objectives={json.dumps(objectives)}"]
    cfg = load_config(args.config, [*args.overrides, *fixed])
    AcceleratorState._reset_state(True)  # each in-process run gets its own Accelerate state
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's notes: stdout holds the table and JSON
        summary = train(cfg)
    train_s = time.perf_counter() - started
    AcceleratorState._reset_state(True)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    started = time.perf_counter()
    figures = evaluate_arm(run_dir / "model", probes, args.eval_batch_size)
    last = records[-1]
    return {"figures": figures, "train_s": train_s, "eval_s": time.perf_counter() - started,
            "steps": summary["steps"], "final_losses": {k: v for k, v in last.items() if k.startswith("loss")},
            "records": records}


def pre_start_diff(base: list[dict], full: list[dict], start: int) -> float | None:
    """The largest |total loss difference| of the two arms at the logged steps before the first delayed start."""
    full_at = {r["step"]: r["loss"] for r in full}
    diffs = [abs(r["loss"] - full_at[r["step"]]) for r in base if r["step"] <= start and r["step"] in full_at]
    return max(diffs) if diffs else None


# ---- figures over seeds


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, dict]]) -> dict:
    """Per arm: mean and sd over seeds of each figure; deltas full - base paired by seed."""
    keys = [k for k in runs[0][BASE_ARM]["figures"] if k != "probe_test_samples"]
    arms = {arm: {k: spread([r[arm]["figures"][k] for r in runs]) for k in keys} for arm in (BASE_ARM, FULL_ARM)}
    deltas = {}
    for k in keys:
        paired = [r[FULL_ARM]["figures"][k] - r[BASE_ARM]["figures"][k] for r in runs]
        deltas[k] = {**spread(paired), "full_ahead": sum(d > 0 for d in paired), "seeds": len(paired)}
    return {"arms": arms, "deltas": deltas}


def probe_se(accuracy: float, test: int) -> float:
    """The binomial standard error of one probe's accuracy on ``test`` samples."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(test, 1))


def table(result: dict) -> str:
    arms, deltas, seeds = result["arms"], result["deltas"], result["seeds"]
    lines = [f"{'figure':<14}{'base':>16}{'full':>16}{'full - base':>18}{'full ahead':>12}"]
    for k in arms[BASE_ARM]:
        b, f, d = arms[BASE_ARM][k], arms[FULL_ARM][k], deltas[k]
        lines.append(f"{k:<14}{b['mean']:>9.3f} ±{b['sd']:.3f}{f['mean']:>9.3f} ±{f['sd']:.3f}"
                     f"{d['mean']:>+11.3f} ±{d['sd']:.3f}{d['full_ahead']:>8}/{d['seeds']}")
    lines.append(f"(± sd over {len(seeds)} seed(s) {seeds}; one probe's own binomial SE ~{result['probe_se']:.3f})")
    for arm in (BASE_ARM, FULL_ARM):
        lines.append(f"{arm}: train {result['train_s'][arm]['mean']:.1f} s/seed, eval {result['eval_s'][arm]['mean']:.1f} s")
    for key, v in result["new_objectives"].items():
        lines.append(f"  {key}: first {v['first']:.4g} -> last {v['last']:.4g} (seed {seeds[0]})")
    return "\n".join(lines)


# ---- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/siglip2-base-debug.yaml", help="the full recipe's YAML")
    parser.add_argument("--steps", type=int, default=300, help="train.steps of each arm (default 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="train.batch_size (default 64)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first run.seed (default 0)")
    parser.add_argument("--train-samples", type=int, default=4000, help="synthetic training samples (default 4000)")
    parser.add_argument("--probe-samples", type=int, default=1000,
                        help="held-out labelled scenes evaluated (half fit the probe, half test it; default 1000)")
    parser.add_argument("--work", default="data/bench-recipe", help="where the dataset and probe shards are kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every (default 10)")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="images per forward in evaluation")
    parser.add_argument("--keep-runs", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the JSON figures to this file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both arms")
    args = parser.parse_intermixed_args(argv)
    for name in ("steps", "batch_size", "seeds", "train_samples", "log_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.probe_samples < 8:
        parser.error("--probe-samples must be >= 8 (the probe fits on half and needs every class there)")
    return args


def prepare_data(args, size: int) -> tuple[Path, dict[str, Path]]:
    """The synthetic training set (vlpretrain.data.bootstrap) and the probe shards, at the model's image ``size``."""
    from vlpretrain.config import DataConfig
    from vlpretrain.data.bootstrap import ensure_synthetic

    root = Path(args.work).resolve() / f"synth-{size}px-{args.train_samples}"
    data = DataConfig(train=str(root / "train"), val=str(root / "val"), tokenizer=str(root / "tokenizer"),
                      synthesize=args.train_samples)
    with contextlib.redirect_stdout(sys.stderr):
        ensure_synthetic(data, image_size=size, seed=0)
    probes = write_probe_sets(Path(args.work).resolve() / f"probe-{size}px-{args.probe_samples}", args.probe_samples,
                              size, seed=0)
    return root, probes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vlpretrain.config import load_config

    cfg = load_config(args.config, [*args.overrides, f"train.steps={args.steps}"])
    full_objectives = [dict(e) for e in cfg.objectives]
    base_objectives, start = split_arms(full_objectives, args.steps)  # (before anything is written)
    data_root, probes = prepare_data(args, cfg.model.image_size)
    new_names = [e["name"] for e in full_objectives if e not in base_objectives]
    seeds = [args.seed + k for k in range(args.seeds)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="vlpretrain-bench-recipe-") as tmp:
        runs_root = Path(args.keep_runs or tmp)
        for seed in seeds:
            runs.append({arm: run_arm(args, data_root, objectives, seed, runs_root / f"{arm}-seed{seed}", probes)
                         for arm, objectives in ((BASE_ARM, base_objectives), (FULL_ARM, full_objectives))})
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "batch_size": args.batch_size,
              "start_step": start, "new_objectives_names": new_names, "seeds": seeds,
              "train_samples": args.train_samples, "probe_samples": args.probe_samples,
              "torch_threads": torch.get_num_threads(), **summarise(runs)}
    test = runs[0][BASE_ARM]["figures"]["probe_test_samples"]
    result["probe_se"] = max(probe_se(result["arms"][arm][f"probe_{label}"]["mean"], test)
                             for arm in (BASE_ARM, FULL_ARM) for label in LABELS)
    result["train_s"] = {arm: spread([r[arm]["train_s"] for r in runs]) for arm in (BASE_ARM, FULL_ARM)}
    result["eval_s"] = {arm: spread([r[arm]["eval_s"] for r in runs]) for arm in (BASE_ARM, FULL_ARM)}
    result["final_losses"] = {arm: runs[0][arm]["final_losses"] for arm in (BASE_ARM, FULL_ARM)}
    result["new_objectives"] = new_objective_figures(runs[0][FULL_ARM]["records"], new_names)
    result["pre_start_loss_max_diff"] = max(
        (d for r in runs if (d := pre_start_diff(r[BASE_ARM]["records"], r[FULL_ARM]["records"], start)) is not None),
        default=None)
    print(table(result))
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
