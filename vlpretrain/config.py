"""Typed experiment configs: dataclasses loaded from YAML with ``key.sub=value`` overrides.

Each component owns a small dataclass (the model's is :class:`~vlpretrain.models.config.ModelConfig`); the experiment
config only composes them. Merging, YAML parsing and type checking are done by OmegaConf; this
module adds presets and error messages that name the bad key and the closest valid one.

Every field carries a docstring (the string literal under it); :func:`describe` turns those into
help text for the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlpretrain.errors import ConfigError, closest_hint, raise_first_failure
from vlpretrain.models.config import ModelConfig
from vlpretrain.models.presets import preset_values
from vlpretrain.objectives import validate_objective_entries
from vlpretrain.objectives.teacher import TeacherConfig


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (never on norms, biases, embeddings, temperatures)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas (CLIP's 0.98 for beta2)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""
    schedule: str = "cosine"
    """After warmup: cosine (to min_lr_ratio * lr), linear (to 0) or constant."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""

    def validate(self) -> None:
        checks = [
            (self.lr > 0, "optim.lr", f"{self.lr} must be > 0"),
            (self.weight_decay >= 0, "optim.weight_decay", f"{self.weight_decay} must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
             f"{self.betas} must be two values in [0, 1)"),
            (self.warmup_steps >= 0, "optim.warmup_steps", f"{self.warmup_steps} must be >= 0"),
            (self.schedule in ("cosine", "linear", "constant"), "optim.schedule",
             f"'{self.schedule}' is not one of cosine, linear, constant"),
            (0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"{self.min_lr_ratio} must lie in [0, 1]"),
            (self.grad_clip >= 0, "optim.grad_clip", f"{self.grad_clip} must be >= 0 (0 disables)"),
        ]
        raise_first_failure(checks)


FREEZE_RECIPES = ("image_path", "image_only", "text_only")  # vlpretrain.finetune.FREEZE
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


@dataclass
class TrainConfig:
    """The optimisation loop (vlpretrain.train.loop)."""

    steps: int = 1000
    """Optimiser steps to train for."""
    batch_size: int = 64
    """Global batch: samples per optimiser step over all processes and micro-batches."""
    accum_steps: int = 1
    """Micro-batches per step (exact for contrastive losses: features are cached across them)."""
    precision: str = "no"
    """Mixed precision: no (fp32), bf16 or fp16 (autocast via Accelerate)."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl (and tracker logs)."""
    ckpt_every: int = 500
    """Steps between checkpoints (0: only at the end); one is always written at the end."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: Optional[str] = None
    """auto: continue from the newest complete checkpoint of run.dir (if any); or a checkpoint folder."""
    max_nonfinite: int = 5
    """Non-finite losses in a row (each skips its update) before training stops with a checkpoint."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    compile: bool = False
    """torch.compile the model and objectives."""
    compile_mode: str = "default"
    """torch.compile's mode under train.compile: default, max-autotune-no-cudagraphs, or with CUDA graphs
    on GPUs (the host launches a whole step at once) reduce-overhead or max-autotune. CUDA graphs need
    train.accum_steps=1, and record a graph per caption length (set data.pad_multiple=8)."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to log to: wandb (WANDB_MODE=offline works), tensorboard."""
    init_from: Optional[str] = None
    """Start from the weights of a model folder (export, run.dir/model) or a checkpoints/step_N folder; or
    timm:NAME, a timm ViT (timm's resolution: cache, hf-hub:, local-dir:) into the image path, with the
    trunk's shape taken from it and the run's image/patch size (embeddings resampled); text and heads fresh."""
    export: bool = True
    """Save the final model and processor as a HuggingFace folder in run.dir/model at the end."""
    freeze: Optional[str] = None
    """Parameters kept frozen (vlpretrain.finetune): image_path (LiT: everything image tokens pass through,
    shared blocks included; text-only parameters train), image_only or text_only (one modality's own
    parameters; the shared blocks train). None: all train."""

    def __post_init__(self):
        if self.precision in ("False", "false"):  # YAML (and a key=value override) reads a bare `no` as false
            self.precision = "no"

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "train.steps", f"{self.steps} must be >= 1"),
            (self.batch_size >= 1, "train.batch_size", f"{self.batch_size} must be >= 1"),
            (self.accum_steps >= 1, "train.accum_steps", f"{self.accum_steps} must be >= 1"),
            (self.precision in ("no", "bf16", "fp16"), "train.precision", f"'{self.precision}' is not one of no, bf16, fp16"),
            (self.compile_mode in COMPILE_MODES, "train.compile_mode",
             f"'{self.compile_mode}' is not one of {', '.join(COMPILE_MODES)}"),
            (self.compile or self.compile_mode == "default", "train.compile_mode",
             f"'{self.compile_mode}' applies under torch.compile only; set train.compile=true"),
            (self.accum_steps == 1 or self.compile_mode not in CUDA_GRAPH_MODES, "train.compile_mode",
             f"'{self.compile_mode}' replays CUDA graphs, whose outputs each replay overwrites; accumulation's "
             f"micro-batches (train.accum_steps={self.accum_steps}) need train.compile_mode=default or "
             f"max-autotune-no-cudagraphs, or train.accum_steps=1"),
            (self.log_every >= 1, "train.log_every", f"{self.log_every} must be >= 1"),
            (self.ckpt_every >= 0, "train.ckpt_every", f"{self.ckpt_every} must be >= 0"),
            (self.keep_last >= 1, "train.keep_last", f"{self.keep_last} must be >= 1"),
            (self.max_nonfinite >= 1, "train.max_nonfinite", f"{self.max_nonfinite} must be >= 1"),
            (self.freeze is None or self.freeze in FREEZE_RECIPES, "train.freeze",
             f"'{self.freeze}' is not one of {', '.join(FREEZE_RECIPES)} (or null)"),
            (set(self.trackers) <= {"wandb", "tensorboard"}, "train.trackers",
             f"{self.trackers} may only name wandb and tensorboard"),
        ]
        raise_first_failure(checks)


@dataclass
class EvalConfig:
    """Evaluation on data.val during and after training (vlpretrain.eval)."""

    every: int = 0
    """Steps between evaluations (0: only at the end)."""
    max_samples: int = 1000
    """Validation samples used (0: all)."""
    num_captions: int = 4
    """Generated captions written to the log at each evaluation."""
    max_new_tokens: int = 24
    """Longest generated caption."""

    def validate(self) -> None:
        if self.every < 0 or self.max_samples < 0 or self.num_captions < 0 or self.max_new_tokens < 1:
            raise ConfigError("eval: every, max_samples and num_captions must be >= 0 and max_new_tokens >= 1.")


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    dir: str = "runs/default"
    """Output folder of the run."""
    seed: int = 0
    """Global random seed."""


@dataclass
class DataConfig:
    """WebDataset shards and how they are read (see ``vlpretrain.data.shards`` and data/README.md).

    Image size and context length come from the model config and the batch size from the trainer;
    this section only says where the samples are and how they are streamed.
    """

    train: str = "data/synth/train"
    """Training shards: a folder of .tar files, a brace pattern (``shards/{00000..00099}.tar``),
    http(s):// URLs or ``pipe:CMD`` commands; several sources separated by ``::``."""
    val: str | None = "data/synth/val"
    """Validation shards (same syntax); read once in order, without augmentation. None: no validation."""
    train_weights: list[float] | None = None
    """Sampling weight of each ``::`` source of data.train (resampled mode only); None: equal weights."""
    mode: str = "epoch"
    """epoch: every training sample once per epoch; resampled: shards drawn with replacement, endless."""
    tokenizer: str = "data/synth/tokenizer"
    """Local HuggingFace tokenizer folder (``vlpretrain tokenizer`` writes one)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the main process)."""
    worker_priority: str = "idle"
    """CPU priority of the worker processes where they share cores with the training compute (CPU
    training). idle (Linux SCHED_IDLE): they run only on cores the compute leaves idle, so they never
    stall its threads, and fully whenever the trainer waits for data (+10-15% samples/s over low on
    2 cores, tools/bench.py; watch data_wait_frac on a machine busy with other jobs); low: niceness
    +10 (also where SCHED_IDLE does not exist); normal: the trainer's priority."""
    captions: str = "random"
    """Which caption trains when a sample has several (a .json ``captions`` list): random (a fresh draw
    each time the sample is read, a text augmentation) or first (always the first, the one the .txt
    holds and the one validation scores; what trainers reading only .txt see, OpenCLIP's included)."""
    pad_multiple: int = 1
    """Captions are right-padded to the batch's longest, rounded up to a multiple of this (capped at the
    context length). 1: the longest (least compute). 8 on GPUs: aligned shapes, and at most
    context/8 text lengths, each of which records its own CUDA graph under train.compile_mode=reduce-overhead."""
    decode: str = "cpu"
    """Where training images are decoded. cpu: in the data workers (decode, crop, resize per sample).
    device: the workers read, shuffle, check headers, draw the crops and tokenise; the trainer decodes each
    batch's JPEGs in one call on its device (nvJPEG on CUDA; torch.get_num_threads() threads on a CPU) and
    crops and resizes there, so CPU workers no longer bound a GPU. Same crops as cpu (exact resume); PNG,
    WebP and CMYK JPEGs are still decoded in the workers; an undecodable JPEG is skipped and counted, its
    row filled from the next samples (see vlpretrain.data.device_decode). Validation always decodes on cpu."""
    shuffle_buffer: int = 1000
    """Samples (raw bytes, not decoded) held for shuffling across shards; 0 or 1 disables sample shuffling."""
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """Area range of the training random resized crop (OpenCLIP's default; ImageNet uses 0.08-1)."""
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """Aspect-ratio range of the training random resized crop."""
    hflip: bool = False
    """Random horizontal flips in training; off by default because captions say left and right."""
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel normalisation mean (OpenAI CLIP's)."""
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel normalisation std (OpenAI CLIP's)."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels (read from the header, before decoding) are skipped and counted."""
    timeout: float = 600.0
    """Seconds to wait for one batch from a worker before failing loudly instead of hanging."""
    synthesize: int = 0
    """If > 0 and data.train holds no shards yet: generate this many synthetic training samples (plus val
    and a tokenizer) next to it first (the demo's embedded default; see vlpretrain.data.bootstrap)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent key and the fix."""
        n_sources = len(self.train.split("::"))
        checks = [
            (self.mode in ("epoch", "resampled"), "data.mode", f"'{self.mode}' is not one of epoch, resampled"),
            (self.num_workers >= 0, "data.num_workers", f"{self.num_workers} must be >= 0"),
            (self.worker_priority in ("idle", "low", "normal"), "data.worker_priority",
             f"'{self.worker_priority}' is not one of idle, low, normal"),
            (self.captions in ("random", "first"), "data.captions", f"'{self.captions}' is not one of random, first"),
            (self.decode in ("cpu", "device"), "data.decode", f"'{self.decode}' is not one of cpu, device"),
            (self.shuffle_buffer >= 0, "data.shuffle_buffer", f"{self.shuffle_buffer} must be >= 0"),
            (self.pad_multiple >= 1, "data.pad_multiple", f"{self.pad_multiple} must be >= 1 (1: pad to the longest caption)"),
            (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             "data.crop_scale", f"{self.crop_scale} must be [low, high] with 0 < low <= high <= 1"),
            (len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
             "data.crop_ratio", f"{self.crop_ratio} must be [low, high] with 0 < low <= high"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "data.mean/data.std",
             "need three values each and a positive std"),
            (self.max_image_pixels > 0, "data.max_image_pixels", f"{self.max_image_pixels} must be > 0"),
            (self.timeout > 0, "data.timeout", f"{self.timeout} must be > 0 seconds"),
            (self.train_weights is None or len(self.train_weights) == n_sources, "data.train_weights",
             (f"{self.train_weights} has {len(self.train_weights or [])} weights for {n_sources} "
              "'::'-separated sources in data.train; give one weight per source")),
            (self.train_weights is None or (min(self.train_weights) >= 0 and sum(self.train_weights) > 0),
             "data.train_weights", "weights must be >= 0 with a positive sum"),
            (self.train_weights is None or self.mode == "resampled", "data.train_weights",
             "source weights only apply when shards are drawn; set data.mode=resampled or drop the weights"),
        ]
        raise_first_failure(checks)


@dataclass
class ExperimentConfig:
    """A whole experiment; each section is handed only to the component it configures."""

    imports: list[str] = field(default_factory=list)
    """Python modules imported before anything is built, e.g. ones registering third-party objectives."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "contrastive", "weight": 1.0}])
    """Training objectives: a list of {name, weight, keys of that objective's config}; see vlpretrain.objectives."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def validate(self) -> None:
        import importlib

        for module in self.imports:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"imports: cannot import '{module}' ({exc}); is it installed or on PYTHONPATH?") from None
        self.model.validate()
        self.data.validate()
        validate_objective_entries(self.objectives)
        self.optim.validate()
        self.train.validate()
        self.eval.validate()
        self.teacher.validate()


# ----------------------------------------------------------------------------------------------
# loading


def _dataclass_at(schema: Any, path: list[str]) -> Any:
    """The dataclass type found by following ``path`` through nested dataclass fields."""
    node = schema
    for part in path:
        if not dataclasses.is_dataclass(node):
            return None
        hit = {f.name: f for f in dataclasses.fields(node)}.get(part)
        if hit is None:
            return None
        node = hit.type if not isinstance(hit.type, str) else _resolve_type(node, hit.name)
    return node


def _resolve_type(owner: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(owner)[name]


def _explain(exc: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    full_key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) and full_key:
        parts = full_key.split(".")
        owner = _dataclass_at(schema, parts[:-1])
        if owner is not None and dataclasses.is_dataclass(owner):
            names = [f.name for f in dataclasses.fields(owner)]
            prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
            return ConfigError(f"{source}: unknown config key '{full_key}'.{closest_hint(parts[-1], names, prefix)}")
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{source}: invalid value for '{full_key}': {msg}")


def apply_preset(raw: DictConfig) -> DictConfig:
    """Replace ``model`` by the preset's values with the file's own model keys on top."""
    model = raw.get("model") if isinstance(raw, DictConfig) else None
    if model is None or model.get("preset") is None:
        return raw
    try:
        values = preset_values(model.preset)
    except ValueError as exc:
        raise ConfigError(f"model.preset: {exc}") from None
    base = OmegaConf.create({"model": values})
    return OmegaConf.merge(base, raw)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type = ExperimentConfig,
) -> Any:
    """Build a typed config from a YAML file and ``key.sub=value`` overrides.

    Later sources win: dataclass defaults < preset < YAML file < overrides. Raises
    :class:`ConfigError` naming an unknown key (with the closest valid one) or a mistyped value.
    """
    layers = []
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file.")
        source = str(path)
        layers.append(OmegaConf.load(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value.")
    raw = OmegaConf.merge(*layers) if layers else OmegaConf.create({})
    try:
        if overrides:  # applied in place so that list items can be addressed: objectives.0.loss=siglip
            for f in dataclasses.fields(schema):
                if f.name not in raw and f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                    if isinstance(default, list):
                        raw[f.name] = default
            raw.merge_with_dotlist(list(overrides))
        raw = apply_preset(raw)
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, source if not overrides else f"{source} + overrides") from None
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (printed by the CLI and saved with every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring (the string literal right under the field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """``key: type = default  help`` lines for every leaf field, for ``--help`` output."""
    import typing

    lines = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else "[...]"
        lines.append(f"{prefix}{f.name} = {default!r}  {docs.get(f.name, '')}".rstrip())
    return lines
