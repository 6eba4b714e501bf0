"""Checkpoints that survive anything: written to a hidden temporary folder and renamed when complete.

``run.dir/checkpoints/step_<N>/`` holds what Accelerate saves (model as safetensors, optimiser,
scheduler, every process's RNG states) or, under FSDP, a ``torch.distributed.checkpoint`` folder
``sharded/`` of model and optimiser with ``scheduler.bin`` and each rank's ``rng_state_rank<R>.json``
(:mod:`vlpretrain.train.sharding`; either form resumes with or without FSDP, on any number of processes);
the data position (``data_state.json``: one file written by the main process from every rank's state,
world-size independent; see data/README.md), the trainer state
(JSON: step, samples seen, counters) and the resolved config. A folder is complete exactly when it
carries the final name: a save killed half-way leaves only ``.step_<N>.tmp``, which resume ignores.
Nothing here unpickles: Accelerate loads with ``weights_only=True``; our own files are JSON/YAML.

Each checkpoint also holds ``manifest.json``: every other file of the folder with its size (whatever
the save wrote: Accelerate's files, sharded ``torch.distributed.checkpoint`` files, data state), and
the run's processor folder (tokenizer + processor config, ``run.dir/processor``) as a path relative
to the checkpoint, so a moved run folder still finds it. Resume, export, eval and ``train.init_from``
check the files against it and read the tokenizer from there, never from ``data.tokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import os
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
MANIFEST = "manifest.json"
RUN_PROCESSOR = "processor"  # run.dir/processor: the tokenizer and processor config the run trains with
SEAL_COMMAND = "python -m vlpretrain.train.integrity"  # seals a checkpoint saved before manifests existed
DATA_POSITION = "data_state.json"
# model keys that may change between a checkpoint and its resume (they change no parameter shape)
_NOT_ARCHITECTURE = {"attn_backend", "patch_dropout", "preset"}


class IncompleteCheckpoint(ConfigError, FileNotFoundError):
    """A checkpoint or model folder that lacks a file (or its manifest) a consumer needs."""


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


@dataclass
class Trainables:
    """What a checkpoint's model/optimiser part is saved from and restored into."""

    module: Any  # the ObjectiveSet itself: FSDP2-sharded, or plain (not its DDP wrapper)
    optimizer: Any  # as accelerate prepared it
    scheduler: Any
    sharded: bool  # FSDP2: saved with torch.distributed.checkpoint


def save_checkpoint(accelerator, run_dir: str | Path, step: int, trainer_state: dict, stream,
                    config_yaml: str, keep_last: int, trainables: Trainables | None = None) -> Path:
    """Write checkpoint ``step`` atomically (all ranks call this) and keep the newest ``keep_last``.
    ``stream``: the training ShardStream (or None), whose position is saved."""
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
    if stream is not None:
        _save_data_position(accelerator, tmp, stream)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        write_manifest(tmp, Path(run_dir) / RUN_PROCESSOR)  # after every other file, before the last
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


def _save_data_position(accelerator, folder: Path, stream) -> None:
    """Every rank's stream state, gathered on the main process and written there as one data position."""
    state = stream.state_dict()
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        states = [None] * accelerator.num_processes if accelerator.is_main_process else None
        dist.gather_object(state, states, dst=0)
    else:
        states = [state]
    if accelerator.is_main_process:
        (folder / DATA_POSITION).write_text(json.dumps(stream.gather_position(states)))


def read_data_position(path: Path) -> dict | None:
    """The checkpoint's data position (None: it has none, the data starts afresh). A checkpoint holding
    only the per-rank files of older versions is refused with the fix."""
    if (path / DATA_POSITION).is_file():
        return json.loads((path / DATA_POSITION).read_text())
    if any(path.glob("data_state_rank*.json")):
        raise ConfigError(f"cannot resume the data stream from {path}: it holds per-rank data states "
                          f"(data_state_rank*.json) of an older vlpretrain, not {DATA_POSITION}. Resume it with that "
                          "version, or start a new run.dir with train.init_from=<that checkpoint> (keeps the weights, "
                          "restarts the data).")
    return None


def check_data_position(path: Path, stream) -> None:
    """Before anything is written: refuse a resume whose data spec changed (reason and fix in the error)."""
    position = read_data_position(path)
    if position is not None:
        stream.check_position(position, str(path / DATA_POSITION))


def _seed_rank_without_rng_state(accelerator, path: Path, step: int) -> None:
    """A rank the checkpoint has no RNG state for (it was saved by fewer processes) is seeded from
    (run.seed, rank, step) instead of keeping whatever it held (Accelerate skips such a rank quietly)."""
    from accelerate.utils import set_seed

    rank = accelerator.process_index
    seed = int(OmegaConf.load(path / CONFIG_FILE).get("run", {}).get("seed", 0))
    digest = hashlib.sha256(f"rng/{seed}/{rank}/{step}".encode()).digest()
    set_seed(int.from_bytes(digest[:4], "little"))  # numpy takes seeds below 2**32
    print(f"[rank {rank}] {path} holds no RNG state for rank {rank} (saved by fewer processes): "
          f"seeded from (run.seed, rank, step)", flush=True)


def load_checkpoint(accelerator, path: Path, trainables: Trainables | None = None) -> tuple[dict, dict | None]:
    """Restore model/optimiser/scheduler/RNG into the prepared objects: (trainer state, the data position).
    A sharded checkpoint loads into ``trainables`` whatever the number of processes and with or without FSDP."""
    from accelerate.utils.constants import RNG_STATE_NAME

    rank = accelerator.process_index
    if is_sharded_checkpoint(path):
        if trainables is None:
            raise ConfigError(f"{path} is a sharded (FSDP) checkpoint; pass the trainables to restore it into.")
        _load_sharded_state(path, trainables)
        rng_file = path / f"rng_state_rank{rank}.json"
        if rng_file.is_file():
            _set_rng_state(json.loads(rng_file.read_text()))
    else:
        if trainables is not None and trainables.sharded:  # saved without FSDP, resumed under it
            _load_unsharded_into_sharded(accelerator, path, trainables)
        else:
            accelerator.load_state(str(path))
        rng_file = path / f"{RNG_STATE_NAME}_{rank}.pkl"
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if not rng_file.is_file():
        _seed_rank_without_rng_state(accelerator, path, int(trainer_state["step"]))
    return trainer_state, read_data_position(path)


def write_manifest(folder: Path, processor_dir: Path) -> None:
    """``folder/manifest.json``: every file under ``folder`` (relative name -> bytes) but the manifest and
    trainer_state.json (written after it), and ``processor_dir`` relative to ``folder``. The main process
    writes it once every rank's files are in place."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    for own in (MANIFEST, TRAINER_STATE):
        files.pop(own, None)
    manifest = {"format": 1, "processor": os.path.relpath(processor_dir, folder), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def check_manifest(folder: Path) -> dict:
    """The manifest of checkpoint ``folder`` once every file it lists is there with its size; else an
    :class:`IncompleteCheckpoint` naming the missing or truncated files."""
    if not (folder / MANIFEST).is_file():
        raise IncompleteCheckpoint(
            f"checkpoint '{folder}' has no {MANIFEST}: it was saved before checkpoints recorded their files and "
            f"tokenizer, so it cannot say which tokenizer it was trained with. Seal it once with that tokenizer: "
            f"`{SEAL_COMMAND} {folder} --tokenizer DIR` (writes the run's processor folder and the manifest).")
    manifest = json.loads((folder / MANIFEST).read_text())
    missing = [name for name in manifest["files"] if not (folder / name).is_file()]
    short = [f"{name} ({(folder / name).stat().st_size} bytes, saved {size})" for name, size in manifest["files"].items()
             if name not in missing and (folder / name).stat().st_size != size]
    if missing or short:
        problems = ([f"no {', '.join(missing)}"] if missing else []) + ([f"changed size: {', '.join(short)}"] if short
                                                                        else [])
        raise IncompleteCheckpoint(f"checkpoint '{folder}' is incomplete: {'; '.join(problems)} (listed in its "
                                   f"{MANIFEST}). Copy the checkpoint again whole, or pick another complete "
                                   f"checkpoints/step_N folder.")
    return manifest


def checkpoint_processor(folder: Path) -> Path:
    """The processor folder (tokenizer + processor config) checkpoint ``folder`` was trained with, checked."""
    from vlpretrain.data.processor import CONFIG_NAME

    target = folder / check_manifest(folder)["processor"]
    if not (target / CONFIG_NAME).is_file():
        raise IncompleteCheckpoint(
            f"checkpoint '{folder}' points to its run's processor at '{os.path.normpath(target)}', which has no "
            f"{CONFIG_NAME}. Move or copy the run folder whole (the checkpoint and run.dir/{RUN_PROCESSOR} together).")
    return target


# ----------------------------------------------------------------------------------------------
# the FSDP form: model and optimiser through torch.distributed.checkpoint, scheduler and RNG beside them


def _save_sharded_state(accelerator, folder: Path, trainables: Trainables) -> None:
    save_sharded(folder, trainables.module, _inner(trainables.optimizer))  # collective
    if accelerator.is_main_process:
        torch.save(trainables.scheduler.state_dict(), folder / SCHEDULER_FILE)
    (folder / f"rng_state_rank{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))


def _load_sharded_state(folder: Path, trainables: Trainables) -> None:
    load_sharded(folder, trainables.module, _inner(trainables.optimizer))
    trainables.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))


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
