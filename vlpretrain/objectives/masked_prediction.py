"""``masked_prediction``: masked feature prediction against the EMA teacher (TIPS / iBOT style).

``mask_ratio`` of each image's patch embeddings are replaced by a learned mask token (before the
positions are added, as BEiT and iBOT do: the backbone's ``patch_mask`` / ``mask_token``); the
student encodes the masked image, and its own head (an MLP, width to width) predicts, at every
masked patch, the teacher's final-normed output feature of that patch, the teacher having seen the
unmasked clean view (:mod:`vlpretrain.objectives.teacher`). The loss is 1 - cosine at the masked
patches only (why cosine: :func:`~vlpretrain.objectives.functional_teacher.masked_feature_loss`);
the mean cosine there is logged. The student's masked forward is this objective's own (it cannot be
shared: no other objective reads masked images); patch dropout does not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpretrain.layers.draws import SEED_KEY
from vlpretrain.objectives import register_objective
from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.functional_teacher import masked_feature_loss, random_patch_mask


@dataclass
class MaskedPredictionConfig(ObjectiveConfig):
    """Predict the teacher's per-patch features at masked patches."""

    mask_ratio: float = 0.5
    """Share of each image's patches replaced by the mask token, in (0, 1)."""
    head_hidden: int = 2048
    """Hidden width of the prediction head (width -> head_hidden -> width)."""

    def checks(self):
        return super().checks() + [
            (0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} must lie in (0, 1)"),
            (self.head_hidden >= 1, "head_hidden", f"{self.head_hidden} must be >= 1"),
        ]


@register_objective("masked_prediction")
class MaskedPrediction(Objective):
    """The student, reading masked patches, predicts the teacher's features there."""

    Config = MaskedPredictionConfig
    batch_keys = ("pixel_values",)
    needs_teacher = True

    def __init__(self, cfg: MaskedPredictionConfig, model_config: Any):
        super().__init__(cfg, model_config)
        D = model_config.width
        self.num_patches = (model_config.image_size // model_config.patch_size) ** 2
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.head = nn.Sequential(nn.Linear(D, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, D))
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.head:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        if shared.teacher_image is None:
            raise self.error("no teacher features in the shared forward", "run it through an ObjectiveSet")
        pixels = batch["pixel_values"]
        mask = random_patch_mask(pixels.shape[0], self.num_patches, self.cfg.mask_ratio, pixels.device,
                                 seeds=batch.get(SEED_KEY), stream=f"{self.name}/mask")  # (B, N)
        student = model.backbone(pixel_values=pixels, layout="image", patch_mask=mask,
                                 mask_token=self.mask_token).image[:, 1:]  # (B, N, D)
        pred = self.head(student[mask])  # (M, D)
        target = shared.teacher_image[:, 1:][mask]  # (M, D), no gradient (computed under no_grad)
        loss, cosine = masked_feature_loss(pred, target)
        return ObjectiveOutput(loss, {"masked_cosine": cosine})
