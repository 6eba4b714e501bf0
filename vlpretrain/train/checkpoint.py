"""Checkpoints that survive anything: written to a hidden temporary folder and renamed when complete.

``run.dir/checkpoints/step_<N>/`` holds what Accelerate saves (model as safetensors, optimiser,
scheduler, every process's RNG states) or, under FSDP, a ``torch.distributed.checkpoint`` folder
``sharded/`` of model and optimiser with ``scheduler.bin`` and each rank's ``rng_state_rank<R>.json``
(:mod:`vlpretrain.train.sharding`; either form resumes with or without FSDP, on any number of processes);
each rank's data-stream position (JSON), the trainer state
(JSON: step, samples seen, counters) and the resolved config. A folder is complete exactly when it
carries the final name: a save killed half-way leaves only ``.step_<N>.tmp``, which resume ignores.
Nothing here unpickles: Accelerate loads with ``weights_only=True``; our own files are JSON/YAML.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlpretrain.config import ConfigError
from vlpretrain.train.sharding import is_sharded_checkpoint, load_sharded, load_unsharded, save_sharded

PREFIX = "step_"
SCHEDULER_FILE = "scheduler.bin"  # the name Accelerate gives it too
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


def check_compatible(path: Path, model_cfg: Any) -> None:
    """A clear error, before any step, when the checkpoint's model shape differs from the config's."""
    saved = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE)).get("model", {})
    now = {k: v for k, v in vars(model_cfg).items() if k not in _NOT_ARCHITECTURE}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} != config {v!r}"
             for k, v in now.items() if k in saved and saved[k] != v]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: a different model shape ({'; '.join(diffs)}). Resume with the "
                          f"config it was trained with, or start a new run.dir.")


@dataclass
class Trainables:
    """What a checkpoint's model/optimiser part is saved from and restored into."""

    module: Any  # the ObjectiveSet itself: FSDP2-sharded, or plain (not its DDP wrapper)
    optimizer: Any  # as accelerate prepared it
    scheduler: Any
    sharded: bool  # FSDP2: saved with torch.distributed.checkpoint


def save_checkpoint(accelerator, run_dir: str | Path, step: int, trainer_state: dict, data_state: dict | None,
                    config_yaml: str, keep_last: int, trainables: Trainables | None = None) -> Path:
    """Write checkpoint ``step`` atomically (all ranks call this) and keep the newest ``keep_last``."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"{PREFIX}{step}", root / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if trainables is not None and trainables.sharded:
        _save_sharded_state(accelerator, tmp, trainables)
    else:
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


def load_checkpoint(accelerator, path: Path, trainables: Trainables | None = None) -> tuple[dict, dict | None]:
    """Restore model/optimiser/scheduler/RNG into the prepared objects: (trainer state, this rank's data state).
    A sharded checkpoint loads into ``trainables`` whatever the number of processes and with or without FSDP."""
    if is_sharded_checkpoint(path):
        if trainables is None:
            raise ConfigError(f"{path} is a sharded (FSDP) checkpoint; pass the trainables to restore it into.")
        _load_sharded_state(accelerator, path, trainables)
    elif trainables is not None and trainables.sharded:  # saved without FSDP, resumed under it
        _load_unsharded_into_sharded(accelerator, path, trainables)
    else:
        accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    data_file = path / f"data_state_rank{accelerator.process_index}.json"
    data_state = json.loads(data_file.read_text()) if data_file.is_file() else None
    return trainer_state, data_state


# ----------------------------------------------------------------------------------------------
# the FSDP form: model and optimiser through torch.distributed.checkpoint, scheduler and RNG beside them


def _save_sharded_state(accelerator, folder: Path, trainables: Trainables) -> None:
    save_sharded(folder, trainables.module, _inner(trainables.optimizer))  # collective
    if accelerator.is_main_process:
        torch.save(trainables.scheduler.state_dict(), folder / SCHEDULER_FILE)
    (folder / f"rng_state_rank{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))


def _load_sharded_state(accelerator, folder: Path, trainables: Trainables) -> None:
    load_sharded(folder, trainables.module, _inner(trainables.optimizer))
    trainables.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
    rng = folder / f"rng_state_rank{accelerator.process_index}.json"
    if rng.is_file():  # a rank the saving run did not have keeps its fresh per-rank seed
        _set_rng_state(json.loads(rng.read_text()))
    else:
        print(f"[rank {accelerator.process_index}] {folder} holds no random state for this rank (saved with fewer "
              f"processes): its random draws start from its own seed")


def _load_unsharded_into_sharded(accelerator, folder: Path, trainables: Trainables) -> None:
    """Accelerate's files (model.safetensors, optimizer.bin, scheduler.bin, random_states_R.pkl) into the
    sharded module and optimiser."""
    from accelerate.utils import load as accelerate_load

    load_unsharded(folder, trainables.module, _inner(trainables.optimizer))
    trainables.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
    rng = folder / f"random_states_{accelerator.process_index}.pkl"
    if rng.is_file():
        import numpy as np

        states = accelerate_load(rng)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _rng_state() -> dict:
    """This process's random states (python, numpy, torch CPU and CUDA) as JSON-able values."""
    import numpy as np

    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": [version, list(mt), gauss], "torch": torch.get_rng_state().tolist(),
             "numpy": {**np_state, "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()}}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {**np_state["state"],
                                                "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}})
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
