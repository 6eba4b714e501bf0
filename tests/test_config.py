"""Typed configs: YAML + overrides, presets, clear errors, and every shipped config builds (tier 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlpretrain import VLConfig, VLModel
from vlpretrain.config import ConfigError, ExperimentConfig, describe, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # experiments; configs/accelerate/ holds launcher configs
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_preset_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: debug\n  depth: 3\nrun:\n  seed: 7\n")
    cfg = load_config(path, ["model.num_heads=4", "run.dir=out/x"])
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.model.width, cfg.model.depth, cfg.model.num_heads) == (64, 3, 4)  # preset, file, override
    assert (cfg.run.seed, cfg.run.dir) == (7, "out/x")
    assert load_config(None, ["model.preset=base"]).model.width == 768


def test_bare_no_precision_is_fp32_in_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  precision: no\n")  # YAML reads a bare no as false
    assert load_config(path).train.precision == "no"
    assert load_config(path, ["train.precision=bf16"]).train.precision == "bf16"
    assert load_config(write(tmp_path, "train: {}\n"), ["train.precision=no"]).train.precision == "no"


def test_resolved_config_prints_and_loads_back(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  preset: tiny\n  modality_experts: true\n"))
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text,overrides,match", [
    ("model:\n  widht: 3\n", [], r"exp.yaml: unknown config key 'model.widht'. Did you mean 'model.width'\?"),
    ("", ["modle.depth=2"], r"unknown config key 'modle'. Did you mean 'model'\?"),
    ("", ["model.depth=abc"], r"invalid value for 'model.depth'.*'abc'"),
    ("", ["model.preset=huge"], r"model.preset: unknown model preset 'huge'; valid presets: debug, tiny"),
    ("", ["model.width=100", "model.num_heads=3"], r"model.width: 100 is not a multiple of model.num_heads=3"),
    ("", ["model.attn_backend=fast"], r"model.attn_backend: 'fast' is not one of sdpa"),
    ("", ["model.eos_token_id=50000"], r"model.eos_token_id: 50000 is outside the vocabulary"),
    ("", ["depth"], r"override 'depth' is not of the form key.sub=value"),
    ("", ["data.worker_priority=lowest"], r"data.worker_priority: 'lowest' is not one of idle, low, normal"),
    ("", ["data.pad_multiple=0"], r"data.pad_multiple: 0 must be >= 1"),
    ("", ["train.compile=true", "train.compile_mode=fast"], r"train.compile_mode: 'fast' is not one of default, "),
    ("", ["train.compile_mode=reduce-overhead"], r"train.compile_mode: 'reduce-overhead' applies under torch.compile only; "
                                                 r"set train.compile=true"),
    ("", ["train.compile=true", "train.compile_mode=reduce-overhead", "train.accum_steps=2"],
     r"train.compile_mode: 'reduce-overhead' replays CUDA graphs.*need train.compile_mode=default"),
])
def test_bad_config_names_the_key_and_the_fix(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_has_help_text():
    lines = describe()
    assert any(line.startswith("model.text_embed_depth = 0  Text is unimodal") for line in lines)
    undocumented = [line for line in lines if line.split("  ", 1)[-1] == line]
    assert not undocumented, undocumented


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_builds(path):
    from vlpretrain.objectives import build_objective_set

    cfg = load_config(path)  # validates every section, objectives included
    config = VLConfig.from_model_config(cfg.model)
    if cfg.model.preset in ("debug", "tiny") or path.stem == "demo":
        model = VLModel(config)
        objectives = build_objective_set(model, cfg.objectives, cfg.train.steps, cfg.teacher)
        assert len(objectives.objectives) == len(cfg.objectives)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_every_accelerate_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(path)
    assert cfg.num_processes >= 1


def test_every_experiment_has_a_cpu_debug_twin():
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.model.preset != "debug" and not path.stem.endswith("-debug"):
            twin = path.with_name(f"{path.stem}-debug.yaml")
            assert twin.is_file(), f"configs/{path.name} has no CPU twin {twin.name}"
            assert load_config(twin).model.preset == "debug"


def test_cli_prints_resolved_config_and_reports_bad_keys(capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vlpretrain", "config", "--config", str(CONFIGS[0]), "model.depth=3"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)  # the real entry point, once
    assert ok.returncode == 0, ok.stderr
    assert "depth: 3" in ok.stdout
    from vlpretrain.cli import main

    assert main(["config", "--config", str(CONFIGS[0]), "model.deph=3"]) == 2
    assert "Did you mean 'model.depth'" in capsys.readouterr().err


def test_imports_register_third_party_objectives_before_validation(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from vlpretrain.objectives import Objective, ObjectiveConfig, register_objective\n"
        "@dataclass\nclass C(ObjectiveConfig):\n    margin: float = 0.2\n    \"\"\"A margin.\"\"\"\n"
        "@register_objective('plugin_loss')\nclass P(Objective):\n    Config = C\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown objective 'plugin_loss'"):
        load_config(None, ["objectives=[{name: plugin_loss, margin: 0.5}]"])
    cfg = load_config(None, ["imports=[my_plugin]", "objectives=[{name: plugin_loss, margin: 0.5}]"])
    assert cfg.objectives[0]["margin"] == 0.5
    with pytest.raises(ConfigError, match="imports: cannot import 'not_a_module'"):
        load_config(None, ["imports=[not_a_module]"])
