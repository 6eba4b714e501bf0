"""Checkpoints that survive anything: written to a hidden temporary folder and renamed when complete.

``run.dir/checkpoints/step_<N>/`` holds what Accelerate saves (model as safetensors, optimiser,
scheduler, every process's RNG states), each rank's data-stream position (JSON), the trainer state
(JSON: step, samples seen, counters) and the resolved config. A folder is complete exactly when it
carries the final name: a save killed half-way leaves only ``.step_<N>.tmp``, which resume ignores.
Nothing here unpickles: Accelerate loads with ``weights_only=True``; our own files are JSON/YAML.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlpretrain.config import ConfigError

PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
# model keys that may change between a checkpoint and its resume (they change no parameter shape)
_NOT_ARCHITECTURE = {"attn_backend", "patch_dropout", "preset"}


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    for path in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        step = path.name[len(PREFIX):]
        if path.is_dir() and step.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``auto``: the newest complete checkpoint of the run (None if there is none); else a folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"train.resume: '{resume}' is not a complete checkpoint folder (no {TRAINER_STATE}); "
                          f"pass a {checkpoints_dir(run_dir)}/{PREFIX}<N> folder or 'auto'.")
    step = json.loads((path / TRAINER_STATE).read_text())["step"]
    newer = [p for s, p in complete_checkpoints(run_dir) if s > step]
    if newer:  # their history is not this run's any more: later saves and resume=auto would mix the two
        raise ConfigError(f"train.resume: run.dir already holds checkpoints newer than step {step} "
                          f"({', '.join(p.name for p in newer)}); move them out of {checkpoints_dir(run_dir)} "
                          f"(or resume into a new run.dir) to restart from {path}.")
    return path


def resumed_step(path: Path) -> int:
    """The step a complete checkpoint folder resumes at (its trainer state's ``step``)."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["step"])


def check_compatible(path: Path, model_cfg: Any) -> None:
    """A clear error, before any step, when the checkpoint's model shape differs from the config's."""
    saved = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE)).get("model", {})
    now = {k: v for k, v in vars(model_cfg).items() if k not in _NOT_ARCHITECTURE}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} != config {v!r}"
             for k, v in now.items() if k in saved and saved[k] != v]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: a different model shape ({'; '.join(diffs)}). Resume with the "
                          f"config it was trained with, or start a new run.dir.")


def save_checkpoint(accelerator, run_dir: str | Path, step: int, trainer_state: dict, data_state: dict | None,
                    config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (all ranks call this) and keep the newest ``keep_last``."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"{PREFIX}{step}", root / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if data_state is not None:
        (tmp / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(data_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))  # last file: marks it whole
        trash = root / f".{PREFIX}{step}.old"
        if final.exists():  # the same step saved again: keep a complete copy until the new one is in place
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
        for _, old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*root.glob(f".{PREFIX}*.tmp"), *root.glob(f".{PREFIX}*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict | None]:
    """Restore model/optimiser/scheduler/RNG into the prepared objects: (trainer state, this rank's data state)."""
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    data_file = path / f"data_state_rank{accelerator.process_index}.json"
    data_state = json.loads(data_file.read_text()) if data_file.is_file() else None
    return trainer_state, data_state
