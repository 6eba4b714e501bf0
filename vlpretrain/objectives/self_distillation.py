"""``self_distillation``: local-to-global self-distillation (SILC, Naeem et al. 2023; DINO's loss).

The student sees ``local_crops`` small crops of each image; the EMA teacher
(:mod:`vlpretrain.objectives.teacher`) sees the whole clean view. Both pooled image representations
(the cls token, final-normed) go through a projection head to ``prototypes`` logits: an MLP, an L2
normalisation, and a weight-normalised last layer (DINO's head with ``norm_last_layer``: the
prototypes are unit vectors). The teacher's head is the EMA of the student's. The teacher's logits
are centred and sharpened (``teacher_temp``), the student's softened by ``student_temp``, and the
loss is their cross-entropy (:mod:`vlpretrain.objectives.functional_teacher`).

The centre is an EMA (``center_momentum``) of the teacher's batch-mean logits over the whole
batch: every micro-batch adds its sums, and ``after_optimizer_step`` (once per optimiser step)
all-reduces them over the ranks and moves the centre, so accumulation and the number of processes
do not change it. Logged: the teacher's mean entropy, the effective number of prototypes the
batch uses (exp of the entropy of the batch-mean teacher distribution; collapse shows there first),
and the student/teacher agreement: ``divergence`` (the loss minus the teacher's entropy: the mean
KL(teacher || student), 0 when they agree) and ``agreement`` (share of local views whose top
prototype is the teacher's).

Local crops (``local_size`` px; the backbone resamples its positions) come from the data workers when
the batch carries ``views["local"]`` (declared by :meth:`views`, made by :mod:`vlpretrain.data.views`),
else they are cut on the device from ``pixel_values`` (:mod:`vlpretrain.objectives.views`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlpretrain.errors import ConfigError
from vlpretrain.data.views import ViewSpec
from vlpretrain.layers.draws import SEED_KEY, fork, per_view
from vlpretrain.objectives import register_objective
from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.distributed import world
from vlpretrain.objectives.functional_teacher import (
    center_update, distillation_loss, effective_prototypes, entropy, teacher_probs)
from vlpretrain.objectives.views import random_resized_crops


@dataclass
class SelfDistillationConfig(ObjectiveConfig):
    """Student local crops against the EMA teacher's global view, through a prototype head."""

    prototypes: int = 65536
    """K: prototypes of the head's weight-normalised last layer (DINO's default)."""
    head_hidden: int = 2048
    """Hidden width of the head's MLP."""
    head_bottleneck: int = 256
    """Width of the normalised bottleneck before the prototypes."""
    head_layers: int = 3
    """Linear layers of the head's MLP (>= 1)."""
    student_temp: float = 0.1
    """Temperature of the student's softmax."""
    teacher_temp: float = 0.04
    """Temperature of the teacher's softmax (below the student's: sharpening)."""
    center_momentum: float = 0.9
    """EMA momentum of the teacher centre, per optimiser step."""
    local_crops: int = 6
    """Local crops per image the student sees."""
    local_size: int = 96
    """Side of the local crops in pixels: a multiple of model.patch_size, at most model.image_size."""
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    """Area range of the local crops, as shares of the image (DINO's)."""

    def checks(self):
        s = self.local_scale
        return super().checks() + [
            (self.prototypes >= 1 and self.head_hidden >= 1 and self.head_bottleneck >= 1, "prototypes",
             "prototypes, head_hidden and head_bottleneck must be >= 1"),
            (self.head_layers >= 1, "head_layers", f"{self.head_layers} must be >= 1"),
            (self.student_temp > 0 and self.teacher_temp > 0, "teacher_temp",
             f"student_temp={self.student_temp} and teacher_temp={self.teacher_temp} must be > 0"),
            (0.0 <= self.center_momentum < 1.0, "center_momentum", f"{self.center_momentum} must lie in [0, 1)"),
            (self.local_crops >= 1, "local_crops", f"{self.local_crops} must be >= 1"),
            (len(s) == 2 and 0 < s[0] <= s[1] <= 1, "local_scale", f"{s} must be [low, high] with 0 < low <= high <= 1"),
        ]


class PrototypeHead(nn.Module):
    """DINO's head: MLP -> L2 normalise -> cosine logits against K unit prototypes."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int, layers: int):
        super().__init__()
        widths = [dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            mlp += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(widths) - 2 else [])
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., K) logits in [-1, 1] (weight norm with g = 1: only directions matter)."""
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T


@register_objective("self_distillation")
class SelfDistillation(Objective):
    """SILC / DINO local-to-global self-distillation on the pooled image representation."""

    Config = SelfDistillationConfig
    batch_keys = ("pixel_values",)
    needs_teacher = True

    def __init__(self, cfg: SelfDistillationConfig, model_config: Any):
        super().__init__(cfg, model_config)
        size, patch, image = cfg.local_size, model_config.patch_size, model_config.image_size
        if size % patch or size > image:
            raise ConfigError(f"objective 'self_distillation': local_size={size} must be a multiple of "
                              f"model.patch_size={patch} and at most model.image_size={image} (a view larger "
                              f"than the image); set objectives[].local_size accordingly.")
        self.head = PrototypeHead(model_config.width, cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes,
                                  cfg.head_layers)
        self.register_buffer("center", torch.zeros(1, cfg.prototypes))  # persistent: checkpointed
        # this rank's summed teacher logits since the step began, and their count in a last column (a plain
        # attribute: DDP would broadcast rank 0's buffers over it; the count a tensor: no guard under compile)
        self._center_sum: torch.Tensor | None = None  # (1, K + 1)

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def views(self) -> dict[str, ViewSpec]:
        """The extra views it reads, for the data workers (vlpretrain.data.views)."""
        c = self.cfg
        return {"local": ViewSpec(c.local_crops, c.local_size, tuple(c.local_scale))}

    def local_views(self, batch: dict, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(V * B, C, s, s) view-major local crops: the data workers' ``batch["views"]["local"]`` (B, V, C, s, s,
        normalised) when the batch has them, else cut on the device from ``pixel_values`` (``seeds``: (V * B,)
        per-crop seeds, or None)."""
        given = (batch.get("views") or {}).get("local")
        if given is not None:
            return given.transpose(0, 1).reshape(-1, *given.shape[2:])
        c = self.cfg
        return random_resized_crops(batch["pixel_values"], c.local_crops, c.local_size, tuple(c.local_scale),
                                    seeds=seeds, stream=f"{self.name}/crops")

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        if shared.teacher is None:
            raise self.error("no teacher features in the shared forward", "run it through an ObjectiveSet")
        cfg, pixels = self.cfg, batch["pixel_values"]
        B = pixels.shape[0]
        seeds = per_view(batch.get(SEED_KEY), cfg.local_crops, self.name)  # (VB,) or None (layers/draws.py)
        local = self.local_views(batch, seeds)  # (VB, C, s, s)
        pooled = model.backbone(pixel_values=local, layout="image", any_size=True, pooled_only=True,
                                seeds=fork(seeds, f"{self.name}/backbone")).image[:, 0]
        student = self.head(pooled).view(cfg.local_crops, B, -1)  # (V, B, K)
        with torch.no_grad():
            teacher = shared.teacher.heads[self.name]["head"](shared.teacher_image[:, 0]).float()  # (B, K)
            probs = teacher_probs(teacher, self.center, cfg.teacher_temp)
        loss = distillation_loss(student, probs, cfg.student_temp)
        if self.training:
            total = torch.cat([teacher.sum(0, keepdim=True), teacher.new_full((1, 1), B)], dim=1)  # (1, K + 1)
            self._center_sum = total if self._center_sum is None else self._center_sum + total
        with torch.no_grad():
            agreement = (student.argmax(-1) == probs.argmax(-1)[None]).float().mean()
            teacher_entropy = entropy(probs)
            metrics = {"teacher_entropy": teacher_entropy, "effective_prototypes": effective_prototypes(probs),
                       "divergence": loss.detach() - teacher_entropy, "agreement": agreement}
        return ObjectiveOutput(loss, metrics)

    def begin_step(self) -> None:
        """A new optimiser step: forget teacher logits gathered outside one (e.g. a start-up probe)."""
        self._center_sum = None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move the centre towards the mean teacher logits of the step's whole batch (all ranks)."""
        if self._center_sum is None:
            return
        stats = self._center_sum.clone()  # (1, K + 1)
        if world()[1] > 1:
            dist.all_reduce(stats)
        mean = stats[:, :-1] / stats[:, -1:]  # (1, K)
        self.center.copy_(center_update(self.center, mean, self.cfg.center_momentum))
        self._center_sum = None
