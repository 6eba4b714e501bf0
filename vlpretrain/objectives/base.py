"""What an objective is: a module with a name, its own small config and a weight.

Given the model, a batch and the features of the forwards it shares with other objectives, an
objective returns its loss and a dict of metrics. It declares what it needs from a shared forward
(``needs``) and which batch entries it reads (``batch_keys``); the combiner
(:class:`~vlpretrain.objectives.combine.ObjectiveSet`) runs the fewest forwards for all of them.
Objectives whose loss couples the examples of a batch (contrastive) derive from
:class:`CoupledObjective`, which splits the loss into per-example embeddings and a loss over the
whole set, so gradient accumulation can cache embeddings (:mod:`vlpretrain.train.accumulate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlpretrain.errors import ConfigError, raise_first_failure

# What a shared forward can provide (see vlpretrain.objectives.shared):
#   image   (B, Ni, D) final-normed image tokens that never attended to text
#   text    (B, T, D)  final-normed causal text states after model.config.text_embed_depth blocks (0: all)
#   caption (B, T, D)  final text states under prefix_lm, text reading the image from block K on
#   image_pooled (B, D) ``image`` at its cls token; text_pooled (B, D) ``text`` at each caption's last
#   real token. Asked alone, they come from forwards whose last block computes only those tokens.
NEEDS = ("image", "text", "caption", "image_pooled", "text_pooled")


@dataclass
class ObjectiveConfig:
    """Fields every objective has; an objective's own config dataclass derives from this."""

    weight: float = 1.0
    """Multiplier of this objective's loss in the total loss."""
    start: float = 0.0
    """First step the objective runs: a step (an integer >= 1), or a fraction of train.steps when < 1
    (0.8: from 80% of training). Before it, the objective costs nothing (vlpretrain.objectives.schedule)."""
    ramp: int = 0
    """Steps over which the weight rises linearly from weight / ramp (first step) to weight (0: at once)."""

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key, why-not) triples; subclasses extend the list with their own."""
        return [(math.isfinite(self.weight) and self.weight >= 0, "weight",
                 f"{self.weight} must be a finite number >= 0"),
                (math.isfinite(self.start) and self.start >= 0 and (self.start < 1 or self.start == int(self.start)),
                 "start", f"{self.start} must be a step (an integer >= 1) or a fraction of train.steps in [0, 1)"),
                (self.ramp >= 0, "ramp", f"{self.ramp} must be >= 0 steps (0: the full weight at once)")]

    def validate(self, where: str) -> None:
        """Raise ConfigError naming ``where.key`` and the fix for the first failed check."""
        raise_first_failure([(ok, f"{where}.{key}", why) for ok, key, why in self.checks()])


@dataclass
class ObjectiveOutput:
    """One objective's loss (a scalar with its graph) and metrics (detached scalars)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SharedFeatures:
    """Hidden states of the shared forward(s); an entry is None when no objective needs it."""

    image: torch.Tensor | None = None  # (B, Ni, D)
    text: torch.Tensor | None = None  # (B, T, D)
    caption: torch.Tensor | None = None  # (B, T, D)
    image_pooled: torch.Tensor | None = None  # (B, D)
    text_pooled: torch.Tensor | None = None  # (B, D)
    forwards: int = 0  # backbone calls made to produce them
    teacher: Any = None  # the started EMATeacher (vlpretrain.objectives.teacher), when an active objective needs it
    teacher_image: torch.Tensor | None = None  # (B, Ni, D) the teacher's final-normed tokens of pixel_values


class Objective(nn.Module):
    """Base class of every objective; register a subclass with ``@register_objective(name)``."""

    name: ClassVar[str] = ""  # set by register_objective
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    batch_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "input_ids")
    coupled: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # reads the EMA teacher (vlpretrain.objectives.teacher) once started

    def __init__(self, cfg: ObjectiveConfig, model_config: Any):
        """``model_config``: the model's architecture config (``VLConfig`` or ``ModelConfig``)."""
        super().__init__()
        if not isinstance(cfg, self.Config):
            raise TypeError(f"objective '{self.name}' takes a {self.Config.__name__}, got {type(cfg).__name__}.")
        cfg.validate(f"objectives.{self.name}")
        self.cfg = cfg
        self.needs: frozenset[str] = frozenset()  # subclasses set what they read from the shared forward
        # the weight now (ObjectiveSet.set_step applies start/ramp): a device tensor, so a ramp neither
        # syncs nor recompiles; not persistent (it follows from the step)
        self.register_buffer("scheduled_weight", torch.tensor(float(cfg.weight)), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """This step's weight: ``cfg.weight`` scaled by the start/ramp schedule (a 0-d tensor)."""
        return self.scheduled_weight

    def teacher_modules(self) -> dict[str, nn.Module]:
        """This objective's modules the EMA teacher keeps a copy of too (e.g. a projection head)."""
        return {}

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        raise NotImplementedError(f"objective '{self.name}' does not implement forward().")

    def no_weight_decay(self) -> set[str]:
        """Names of this objective's parameters to keep out of weight decay."""
        return set()

    def after_optimizer_step(self) -> None:
        """Called by the trainer after each optimiser step (also a skipped, non-finite one), outside any
        forward: the place to constrain parameters in place (e.g. clamp a temperature). Under FSDP the
        parameters here are the real, sharded ones; a change made inside ``forward`` would land on a
        gathered copy and be lost. No-op by default."""

    def error(self, what: str, fix: str) -> ValueError:
        """A ValueError naming this objective, what went wrong and the fix."""
        return ValueError(f"objective '{self.name}': {what}; {fix}.")

    def require_token(self, model_config: Any, attr: str, purpose: str) -> int:
        """The model's ``attr`` token id, checked to exist and to differ from pad/bos/eos."""
        value = getattr(model_config, attr, None)
        vocab = getattr(model_config, "vocab_size", None)
        others = {a: getattr(model_config, a, None) for a in ("pad_token_id", "bos_token_id", "eos_token_id")}
        others.pop(attr, None)
        clash = [a for a, v in others.items() if v is not None and v == value]
        if value is None or (vocab is not None and not 0 <= value < vocab) or clash:
            problem = (f"model.{attr}={value} is not a usable token id"
                       + (f" (it equals model.{clash[0]})" if clash else ""))
            raise ConfigError(f"objective '{self.name}' needs a {purpose}: {problem}. Give the tokenizer "
                              f"that special token and set model.{attr} to its id.")
        return int(value)


class CoupledObjective(Objective):
    """An objective whose loss couples the examples of a batch (e.g. contrastive).

    ``forward`` is ``loss_from_embeddings(embed(...))``: ``embed`` is per example (so it can be
    recomputed one micro-batch at a time) and ``loss_from_embeddings`` sees the whole set.
    """

    coupled = True

    def embed(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"objective '{self.name}' does not implement embed().")

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor]) -> ObjectiveOutput:
        raise NotImplementedError(f"objective '{self.name}' does not implement loss_from_embeddings().")

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        return self.loss_from_embeddings(self.embed(model, batch, shared))
