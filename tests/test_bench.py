"""tools/bench.py (the benchmark compare_openclip.py and gpu_check.sh run): its figures from the
per-step records, and one real run end to end on the debug twin of the GPU benchmark's config."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import train_overrides

ROOT = Path(__file__).resolve().parents[1]


def _tool_module(name: str = "bench"):
    """``tools/NAME.py`` imported as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_module():
    return _tool_module("bench")


def test_figures_are_time_weighted_over_the_steps_after_warmup():
    records = [{"step": 1, "step_time_s": 9.0, "samples_per_s": 1.0, "tokens_per_s": 1.0, "data_wait_frac": 1.0, "loss": 5.0},
               {"step": 2, "step_time_s": 1.0, "samples_per_s": 64.0, "tokens_per_s": 640.0, "data_wait_frac": 0.0,
                "loss": 4.0, "tflops_per_s": 1.0, "mfu": 0.1},
               {"step": 3, "step_time_s": 3.0, "samples_per_s": 16.0, "tokens_per_s": 160.0, "data_wait_frac": 0.5,
                "loss": 3.0, "tflops_per_s": 2.0, "mfu": 0.2},
               {"step": 3, "eval/i2t_r@1": 0.5}]  # evaluation records are not steps
    figures = _bench_module().summarise(records, warmup=1)
    assert figures["steps_timed"] == 2 and figures["final_loss"] == 3.0
    assert figures["samples_per_s"] == pytest.approx(112 / 4)  # 64 + 48 samples over 4 s
    assert figures["data_wait_frac"] == pytest.approx(1.5 / 4)
    assert figures["mfu"] == pytest.approx(0.7 / 4)
    with pytest.raises(SystemExit, match="raise train.steps"):
        _bench_module().summarise(records, warmup=3)


def test_log_windows_weigh_by_their_steps_and_warmup_drops_whole_windows():
    window = {"samples_per_s": 10.0, "tokens_per_s": 100.0, "data_wait_frac": 0.0, "loss": 1.0}
    records = [{**window, "step": 4, "step_time_s": 5.0},  # steps 1-4: straddles the warm-up
               {**window, "step": 8, "step_time_s": 1.0, "samples_per_s": 64.0},  # steps 5-8: 4 s
               {**window, "step": 10, "step_time_s": 2.0, "samples_per_s": 16.0}]  # steps 9-10: 4 s
    figures = _bench_module().summarise(records, warmup=2)
    assert figures["steps_timed"] == 6
    assert figures["samples_per_s"] == pytest.approx((64 * 4 + 16 * 4) / 8)


@pytest.mark.slow
def test_bench_runs_the_real_trainer_and_prints_one_json_line(synth_root, tmp_path):
    overrides = train_overrides(synth_root, tmp_path / "ignored", "train.steps=3", "train.batch_size=8")
    run = subprocess.run([sys.executable, "tools/bench.py", "--config", "configs/coca-base-debug.yaml", "--warmup", "1",
                          "--eval", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["steps_timed"] == 2 and figures["batch_size"] == 8 and figures["world_size"] == 1
    assert figures["samples_per_s"] > 0 and figures["peak_rss_mb"] > 100 and 0 <= figures["data_wait_frac"] <= 1
    assert 0 <= figures["eval"]["i2t_r@1"] <= 1 and 0 < figures["eval"]["samples"] <= 64


@pytest.mark.slow
def test_bench_data_stages_prints_every_stage_for_both_decode_modes_and_the_trainers_data_wait():
    run = subprocess.run([sys.executable, "tools/bench_data.py", "--stages", "--samples", "24", "--batch-size", "8",
                          "--image-size", "32", "--sides", "40,64", "--trainer-steps", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=_tree_env())
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    stages = ("read", "shuffle", "decode", "augment", "collate", "host_to_device")
    for mode in ("cpu", "device"):
        assert all(figures["stages"][mode][s] > 0 for s in stages), figures["stages"]
        assert figures["bound_by"][mode] in stages
        assert 0 <= figures["trainer"][mode]["data_wait_frac"] <= 1 and figures["trainer"][mode]["samples_per_s"] > 0
    assert figures["jpeg_share"] == 1.0  # every synthetic JPEG took the device path


def _tree_env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _recipe_module():
    return _tool_module("bench_recipe")


def test_bench_recipe_labels_the_dominant_object_and_splits_the_arms():
    recipe = _recipe_module()
    scene = {"objects": [{"shape": "circle", "color": "red", "r": 0.10, "x": 0.1, "y": 0.5},
                         {"shape": "triangle", "color": "blue", "r": 0.19, "x": 0.8, "y": 0.5},
                         {"shape": "square", "color": "green", "r": 0.19, "x": 0.4, "y": 0.5}]}
    from vlpretrain.data.synthetic import COLORS, SHAPES

    expected = {"shape": SHAPES.index("square"), "color": list(COLORS).index("green"), "count": 2}
    assert recipe.scene_labels(scene) == expected  # the leftmost of the large ones: the green square
    entries = [{"name": "contrastive", "loss": "siglip"}, {"name": "captioning"},
               {"name": "self_distillation", "start": 0.8}, {"name": "masked_prediction", "start": 0.8}]
    base, start = recipe.split_arms(entries, 20)
    assert [e["name"] for e in base] == ["contrastive", "captioning"] and start == 16
    with pytest.raises(SystemExit, match="the comparison needs some from step 0"):
        recipe.split_arms(entries[:2], 20)


@pytest.mark.slow
def test_bench_recipe_trains_both_arms_and_prints_every_figure(tmp_path):
    """Toy sizes (6 steps, the new objectives from step 4): the JSON has every field, all finite."""
    run = subprocess.run([sys.executable, "tools/bench_recipe.py", "--steps", "6", "--batch-size", "16",
                          "--log-every", "1", "--train-samples", "128", "--probe-samples", "32",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.json"),
                          "data.num_workers=0", "objectives.2.start=4", "objectives.3.start=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=_tree_env())
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "out.json").read_text())
    recipe = _recipe_module()
    expected = [*recipe.RETRIEVAL, *(f"probe_{label}" for label in recipe.LABELS)]
    for arm in ("base", "full"):
        assert sorted(figures["arms"][arm]) == sorted(expected)
        assert all(0 <= v["mean"] <= 1 for v in figures["arms"][arm].values())
        assert figures["train_s"][arm]["mean"] > 0 and figures["eval_s"][arm]["mean"] > 0
    assert all(math.isfinite(d["mean"]) for d in figures["deltas"].values())
    assert figures["start_step"] == 4 and figures["new_objectives_names"] == ["self_distillation", "masked_prediction"]
    for key in ("self_distillation/agreement", "self_distillation/effective_prototypes",
                "masked_prediction/masked_cosine", "loss/self_distillation", "loss/masked_prediction"):
        assert math.isfinite(figures["new_objectives"][key]["last"]), key
    assert "loss/self_distillation" not in figures["final_losses"]["base"]
    assert figures["pre_start_loss_max_diff"] == 0.0  # the arms are one run until the start
    assert "probe_shape" in run.stdout and "full ahead" in run.stdout  # the table
