"""A non-editable install runs the embedded demo (shipped as package data) from any folder, and a
finished demo run started again (its config says ``resume: auto``) logs its final evaluation once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthesize=160", "data.num_workers=0", "data.shuffle_buffer=16", "train.steps=3", "train.batch_size=16",
        "train.log_every=1", "train.ckpt_every=0", "eval.every=0", "eval.max_samples=32", "eval.num_captions=1",
        "eval.max_new_tokens=4"]


def _install(tmp_path: Path) -> Path:
    """A fresh venv (seeing this environment's packages, so nothing downloads) with vlpretrain installed
    from a copy of the source tree, non-editable: what `pip install .` or a wheel gives a user."""
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "vlpretrain", src / "vlpretrain", ignore=shutil.ignore_patterns("__pycache__"))
    # --without-pip: the venv uses this environment's pip, setuptools and wheel (a venv's own seed lacks wheel)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", str(src)], check=True, capture_output=True)
    return venv


@pytest.mark.slow
def test_installed_package_runs_the_demo_from_any_folder_and_a_rerun_evaluates_once(tmp_path):
    venv = _install(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"))  # no user accelerate config applies
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import vlpretrain; print(vlpretrain.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this checkout

    def demo() -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "vlpretrain"), "train", *TINY], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)

    first = demo()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "== vlpretrain: done ==" in first.stdout
    run = work / "runs" / "demo"
    assert (run / "model" / "model.safetensors").is_file() and (work / "data" / "synth" / "tokenizer").is_dir()

    again = demo()  # resume: auto finds the finished run: nothing to train, nothing to evaluate again
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/i2t_r@1" in r]
    assert [r["step"] for r in evals] == [3]
    assert json.loads((run / "summary.json").read_text())["eval"]["i2t_r@1"] == evals[0]["eval/i2t_r@1"]
