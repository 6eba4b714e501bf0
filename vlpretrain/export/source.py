"""Load what an export starts from: a trainer checkpoint (``checkpoints/step_N``) or a model folder.

A checkpoint holds Accelerate's ``model.safetensors`` of the objective set (``model.*`` for the
VLModel, ``objectives.<name>.*`` for objective parameters such as the contrastive logit scale), or
under FSDP a ``sharded/`` torch.distributed.checkpoint folder with the same keys (consolidated here,
in one process, without a process group or GPU), ``config.yaml`` (the resolved experiment),
``trainer_state.json`` and ``manifest.json`` (its files, checked before anything is read, and the run's
processor folder: the tokenizer it was trained with, never ``data.tokenizer``). A run with an EMA
teacher also saves ``teacher.*`` keys; an export and an evaluation take the student (``model.*``)
alone, and refuse weights that hold the teacher but no student (:func:`refuse_teacher_only`). Every
weight is loaded strictly, from either source. A model folder is what
``VLModel.save_pretrained`` + ``VLProcessor.save_pretrained`` write (the trainer's ``run.dir/model``
or an ``hf`` export). Nothing here unpickles: weights come from safetensors, or from a ``.bin`` file
through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlpretrain.data.processor import CONFIG_NAME as PROCESSOR_CONFIG
from vlpretrain.data.processor import LEGACY_CONFIG_NAME as LEGACY_PROCESSOR_CONFIG
from vlpretrain.data.processor import VLProcessor
from vlpretrain.models.modeling import VLConfig, VLModel
from vlpretrain.models.weights import load_strict
from vlpretrain.train.checkpoint import IncompleteCheckpoint, check_manifest, checkpoint_processor

TRAINING_INFO_KEY = "vlpretrain_training"  # config.json entry carrying TrainingInfo through exports


@dataclass
class TrainingInfo:
    """What is known about how a model was trained (for the model card and the CLIP logit scale)."""

    objectives: list[dict] = field(default_factory=list)
    data: str | None = None
    steps: int | None = None
    samples_seen: int | None = None
    eval: dict[str, float] = field(default_factory=dict)
    logit_scale: float | None = None  # log of the contrastive temperature's inverse, as CLIP stores it
    logit_bias: float | None = None  # the sigmoid (SigLIP) loss's learnt bias; None: no bias was trained

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


@dataclass
class LoadedModel:
    model: VLModel
    processor: VLProcessor
    info: TrainingInfo


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full weights in ``folder`` as CPU tensors: ``model.safetensors``, a sharded (FSDP) checkpoint's
    ``sharded/`` folder consolidated in this process, or ``pytorch_model.bin`` (loaded weights-only)."""
    from safetensors.torch import load_file

    from vlpretrain.train.sharding import is_sharded_checkpoint, read_sharded_weights

    folder = Path(folder)
    if is_sharded_checkpoint(folder):
        return read_sharded_weights(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary pickles: say so instead of running them
            raise ValueError(f"{folder / 'pytorch_model.bin'} is not a plain tensor file ({exc}); it will not be "
                             "unpickled. Re-save it as safetensors.") from exc
    raise IncompleteCheckpoint(f"'{folder}' has no model.safetensors (nor a sharded/ checkpoint folder, nor "
                               "pytorch_model.bin): the checkpoint is incomplete. Pick a complete checkpoints/step_N "
                               "folder or an exported model folder.")


TEACHER_PREFIX = "teacher."  # the EMA teacher's keys in a checkpoint (vlpretrain.objectives.teacher)


def refuse_teacher_only(weights: dict[str, torch.Tensor], where: str, student_prefix: str = "") -> None:
    """A ValueError when ``weights`` hold the EMA teacher's ``teacher.*`` keys but no student weights (keys
    under ``student_prefix`` other than the teacher's): exports and evaluation carry the student only."""
    teacher = [k for k in weights if k.startswith(TEACHER_PREFIX)]
    student = [k for k in weights if k.startswith(student_prefix) and not k.startswith(TEACHER_PREFIX)]
    if teacher and not student:
        raise ValueError(f"{where} holds only the EMA teacher ({len(teacher)} '{TEACHER_PREFIX}*' weights, e.g. "
                         f"'{teacher[0]}') and no student model; exports and evaluation take the student only. "
                         f"Pass the run's checkpoints/step_N folder as the trainer saved it (its 'model.*' weights "
                         f"are the student) or the run's exported model folder.")


def is_checkpoint(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "trainer_state.json").is_file()


def load_source(path: str | Path) -> LoadedModel:
    """A trainer checkpoint or a model folder as (VLModel in eval mode, VLProcessor, TrainingInfo)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"'{path}' is not a folder; pass a run's checkpoints/step_N folder or a model "
                                "folder (run.dir/model or an hf export).")
    loaded = _from_checkpoint(path) if is_checkpoint(path) else _from_model_folder(path)
    loaded.model.eval()
    return loaded


def _from_checkpoint(path: Path) -> LoadedModel:
    from omegaconf import OmegaConf

    from vlpretrain.config import ExperimentConfig

    missing = [n for n in ("config.yaml", "trainer_state.json") if not (path / n).is_file()]
    if missing:
        raise IncompleteCheckpoint(f"checkpoint '{path}' is incomplete: no {', '.join(missing)}. Pick a complete "
                                   "checkpoints/step_N folder (hidden .step_N.tmp folders are unfinished saves).")
    check_manifest(path)  # every file the save wrote, before any is read
    processor = VLProcessor.from_pretrained(checkpoint_processor(path))
    cfg: ExperimentConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                                                                OmegaConf.load(path / "config.yaml")))
    weights = read_weights(path)
    refuse_teacher_only(weights, f"checkpoint '{path}'", student_prefix="model.")
    model = VLModel(VLConfig.from_model_config(cfg.model))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    load_strict(model, state, f"checkpoint '{path}' (the model its config.yaml describes)")
    state_json = json.loads((path / "trainer_state.json").read_text())
    scale, bias = (_scalar(weights, f"objectives.contrastive.{name}") for name in ("logit_scale", "logit_bias"))
    info = TrainingInfo(objectives=[dict(vars(o)) if not isinstance(o, dict) else o for o in cfg.objectives],
                        data=str(cfg.data.train), steps=state_json.get("step"),
                        samples_seen=state_json.get("samples_seen"), eval=_eval_figures(path.parent.parent,
                                                                                         state_json.get("step")),
                        logit_scale=scale, logit_bias=bias)
    return LoadedModel(model, processor, info)


def _scalar(weights: dict[str, torch.Tensor], key: str) -> float | None:
    """The learnt scalar stored under ``key`` (a 0-d tensor, or 1-element as FSDP keeps them), else None."""
    value = weights.get(key)
    if value is None:
        return None
    if value.numel() != 1:
        raise ValueError(f"checkpoint weight '{key}' has shape {tuple(value.shape)}; expected one value.")
    return float(value.reshape(()))


def _eval_figures(run_dir: Path, step: int | None) -> dict[str, float]:
    """The newest ``eval/*`` figures a run logged at or before ``step`` (empty when none)."""
    figures: dict[str, float] = {}
    log = run_dir / "metrics.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        record = json.loads(line)
        if step is not None and record.get("step", 0) > step:
            break
        found = {k[5:]: v for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        figures = found or figures
    return figures


def _from_model_folder(path: Path) -> LoadedModel:
    for names in (("config.json",), (PROCESSOR_CONFIG, LEGACY_PROCESSOR_CONFIG)):
        if not any((path / name).is_file() for name in names):
            raise IncompleteCheckpoint(f"'{path}' is neither a checkpoint (no config.yaml / trainer_state.json) nor "
                                       f"a complete model folder (no {names[0]}).")
    # a clear error before transformers reports a missing file or the teacher's keys its own way
    refuse_teacher_only(read_weights(path), f"model folder '{path}'")
    model = VLModel.from_pretrained(str(path))  # strict: a missing or unexpected weight is an error
    info = TrainingInfo(**getattr(model.config, TRAINING_INFO_KEY, None) or {})
    return LoadedModel(model, VLProcessor.from_pretrained(path), info)
