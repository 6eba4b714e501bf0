"""tools/gpu_check.py runs only on a rarely borrowed GPU; its ``--smoke`` mode runs the same code on
the CPU at toy sizes so that it cannot rot between GPU sessions (the figures mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section_without_error(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--smoke", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    sections = ("equivalence", "attention_alignment", "prefix_lm_timing", "train_base_bf16", "openclip_vit_b16")
    failed = {k: figures[k]["error"] for k in sections if "error" in figures[k]}
    assert not failed, failed
    fp32 = {k: v for k, v in figures["equivalence"].items() if k.endswith("/float32")}
    assert len(fp32) == 7 * 2  # every layout case, sdpa and flex (flash-attn needs CUDA)
    assert all(v["max_abs_out"] < 1e-4 and v["max_rel_grad"] < 1e-3 for v in fp32.values()), fp32
    assert figures["prefix_lm_timing"]["flex_speedup_vs_sdpa"] > 0
    aligned = figures["attention_alignment"]["17+12"]  # the candidates compute the same attention
    assert set(aligned["fwd_bwd_us"]) == {"bool_mask", "bias_aligned_rows", "keys_padded"}
    assert all(d < 1e-2 for d in aligned["max_abs_diff_vs_bool_mask"].values()), aligned
    assert figures["train_base_bf16"]["samples_per_s"] > 0 and figures["train_base_bf16"]["tflops_per_s"] > 0
    assert figures["openclip_vit_b16"]["ratio_vs_openclip"] > 0


def test_gpu_check_sh_refuses_an_unknown_argument_before_running_anything():
    run = subprocess.run(["bash", "tools/gpu_check.sh", "--install-only"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2
    assert "unknown argument '--install-only'" in run.stderr and not run.stdout


def test_gpu_check_py_names_the_valid_sections_for_an_unknown_one(tmp_path):
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--smoke", "--only", "attention_alignmnet",
                          str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unknown section(s) ['attention_alignmnet']" in run.stderr
    assert "attention_alignment" in run.stderr.split("valid:")[1] and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_gpu_check_sh_trainer_lines_run_on_the_cpu_at_toy_sizes(tmp_path):
    """--trainer-smoke runs the very lines --trainer runs on a lent GPU (toy values): the trainer under both
    data.decode modes side by side, the pipeline alone and its stages, each writing its figures."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "tools/gpu_check.sh", "--trainer-smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "failed" not in run.stdout, run.stdout[-3000:]
    for mode, name in (("device", "bench_gpu_device.json"), ("cpu", "bench_gpu.json")):
        figures = json.loads((tmp_path / name).read_text().strip().splitlines()[-1])
        assert f"data.decode={mode}" in figures["overrides"] and 0 <= figures["data_wait_frac"] <= 1
        assert f"data.decode={mode}: data_wait_frac {figures['data_wait_frac']:.3f}" in run.stdout
    stages = json.loads((tmp_path / "bench_data_stages.json").read_text())
    assert set(stages["stages"]) == {"cpu", "device"}
    assert json.loads((tmp_path / "bench_data_w12_idle.json").read_text())["vlpretrain_samples_per_s"] > 0
