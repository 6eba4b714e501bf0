"""The one EMA teacher: an exponential moving average of the student's backbone (and of heads).

``teacher: {momentum: 0.996, momentum_end: 1.0}``. Objectives declare that they read it with the
class attribute ``needs_teacher = True`` (as they declare ``needs``) and may name modules of their
own the teacher keeps a copy of too (``teacher_modules()``, e.g. self-distillation's head). The
:class:`~vlpretrain.objectives.combine.ObjectiveSet` builds one :class:`EMATeacher` when any
configured objective needs it, initialises it from the student when the first of them starts, and
updates it after each optimiser step (``ObjectiveSet.after_optimizer_step``).

* **A copy, built at construction.** The teacher is a submodule of the ObjectiveSet from the start
  (see :mod:`vlpretrain.objectives.schedule`): its parameters have ``requires_grad=False`` (no
  gradient, no optimiser state, ignored by DDP's reducer and by clipping), it lives in the same
  state dict as the student, so every checkpoint carries it and a resume restores it exactly; an
  export takes the ``model.`` keys only, so it carries the student alone. It is always in eval mode
  (no patch dropout: it sees the whole view).
* **Initialised at its start step** ``S`` (the earliest start of the objectives needing it):
  ``set_step(S)`` copies every student parameter and buffer into it. The decision is a function of
  the step, so a run resumed before ``S`` copies at ``S`` as the unbroken run did, and one resumed
  after ``S`` loads the teacher it had.
* **EMA** after the optimiser step that completes step ``s`` (the step count becomes ``k = s + 1``):
  ``teacher <- m_k * teacher + (1 - m_k) * student`` with the cosine schedule (DINO, iBOT)
  ``m_k = end - (end - m0) * (1 + cos(pi * p)) / 2``, ``p = (k - S) / (total - S)`` clipped to [0, 1]:
  ``m0`` when the teacher starts, ``momentum_end`` at the last step. It is ``lerp`` on each local
  tensor: under FSDP each rank updates its own shards (student and teacher are sharded alike, no
  communication); under DDP every rank holds the same student after the step, so the same teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import math

import torch
from torch import nn

from vlpretrain.errors import ConfigError, raise_first_failure


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class TeacherConfig:
    """The one EMA teacher, shared by the objectives that need it (vlpretrain.objectives.teacher)."""

    momentum: float = 0.996
    """EMA momentum when the teacher starts (teacher = m * teacher + (1 - m) * student after each step)."""
    momentum_end: float = 1.0
    """Momentum at train.steps; it rises from momentum along a half cosine (DINO, iBOT)."""

    def validate(self) -> None:
        raise_first_failure([
            (0.0 <= self.momentum <= 1.0, "teacher.momentum", f"{self.momentum} must lie in [0, 1]"),
            (self.momentum <= self.momentum_end <= 1.0, "teacher.momentum_end",
             f"{self.momentum_end} must lie in [teacher.momentum={self.momentum}, 1]"),
        ])



def momentum_at(k: int, start: int, total: int, cfg: TeacherConfig) -> float:
    """EMA momentum of the update made when the step count reaches ``k`` (cosine from start to total)."""
    span = max(total - start, 1)
    progress = min(max((k - start) / span, 0.0), 1.0)
    return cfg.momentum_end - (cfg.momentum_end - cfg.momentum) * (1 + math.cos(math.pi * progress)) / 2


def check_backbone(model: nn.Module, who: str) -> None:
    """A clear error when ``model`` has no backbone that gives per-patch image features."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "num_patches") or not hasattr(backbone, "embed_image"):
        raise ConfigError(f"objective(s) {who} need an EMA teacher of a backbone with per-patch image features "
                          f"(a VLModel's VLBackbone), but the model is {type(model).__name__} without one; "
                          f"train a VLModel or remove those objectives.")


class EMATeacher(nn.Module):
    """EMA copies of the student's backbone (``backbone``) and of objectives' heads (``heads[name]``)."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], cfg: TeacherConfig, start: int,
                 total_steps: int | None):
        super().__init__()
        cfg.validate()
        self.cfg, self.start, self.total_steps = cfg, start, total_steps
        self.backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.heads = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False) for k, m in heads.items()})
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)  # always eval: no patch dropout, the whole view

    def shard_units(self) -> list[nn.Module]:
        """The modules the trainer calls directly (the backbone, each mirrored head): under FSDP2 each is a
        unit of its own (its blocks inside it too), so the teacher's weights are gathered only while it runs,
        never with the root's before its start."""
        return [self.backbone, *(m for mirrored in self.heads.values() for m in mirrored.values())]

    def momentum(self, k: int) -> float:
        if self.total_steps is None:
            raise ValueError("the EMA teacher's momentum schedule needs the run's length; build the ObjectiveSet "
                             "with total_steps=train.steps.")
        return momentum_at(k, self.start, self.total_steps, self.cfg)

    def _pairs(self, student_backbone: nn.Module, student_heads: dict[str, nn.Module], buffers: bool):
        """(teacher tensor, student tensor) of every parameter (and buffer), matched by name."""
        named = (lambda m: m.named_buffers()) if buffers else (lambda m: m.named_parameters())
        pairs = []
        for teacher, student in [(self.backbone, student_backbone),
                                 *((self.heads[k], student_heads[k]) for k in self.heads)]:
            mine, theirs = dict(named(teacher)), dict(named(student))
            if mine.keys() != theirs.keys():
                raise RuntimeError(f"the EMA teacher and its student differ in {sorted(mine.keys() ^ theirs.keys())}.")
            pairs += [(_local(mine[n]), _local(theirs[n].detach())) for n in mine]
        return pairs

    @torch.no_grad()
    def initialise(self, student_backbone: nn.Module, student_heads: dict[str, nn.Module]) -> None:
        """Teacher := student (parameters and buffers)."""
        for buffers in (False, True):
            for t, s in self._pairs(student_backbone, student_heads, buffers):
                t.copy_(s)

    @torch.no_grad()
    def update(self, student_backbone: nn.Module, student_heads: dict[str, nn.Module], k: int) -> float:
        """teacher <- m_k teacher + (1 - m_k) student; returns m_k. (lerp: a teacher equal to a student
        that did not move stays bit-equal, e.g. the head of an objective that starts later.)"""
        m = self.momentum(k)
        pairs = self._pairs(student_backbone, student_heads, False)
        if pairs and m < 1.0:
            torch._foreach_lerp_([t for t, _ in pairs], [s for _, s in pairs], 1.0 - m)
        return m
