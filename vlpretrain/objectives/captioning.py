"""``captioning``: next-token maximum likelihood of the caption given the image (prefix-LM).

The image tokens are a bidirectional prefix; caption tokens are causal and read the image from
block ``text_embed_depth`` on, so this shares one forward with ``contrastive`` (CoCa in one pass).
Logits at position t predict token t+1; padding is ignored and image positions carry no loss.

CapPa (Tschannen et al. 2023) parallel prediction: with probability ``parallel_prob`` per caption
(in training), the decoder input is all mask tokens and attends bidirectionally, so every token is
predicted from the image alone. All captions run in one forward (the layout's causality is per
caption) and share one loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpretrain.layers.draws import SEED_KEY, fork, rand
from vlpretrain.models.losses import next_token_loss
from vlpretrain.objectives.registry import register_objective
from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.functional import next_token_accuracy


@dataclass
class CaptioningConfig(ObjectiveConfig):
    """Captioning by next-token prediction."""

    per_caption: bool = False
    """Average the token losses of each caption first, then the captions (default: mean over all tokens)."""
    parallel_prob: float = 0.0
    """CapPa: probability that a caption is predicted in parallel from mask tokens (0 disables)."""

    def checks(self):
        return super().checks() + [(0.0 <= self.parallel_prob <= 1.0, "parallel_prob",
                                    f"{self.parallel_prob} must lie in [0, 1]")]


@register_objective("captioning")
class Captioning(Objective):
    """Prefix-LM captioning loss with the model's (tied) language-model head."""

    Config = CaptioningConfig

    def __init__(self, cfg: CaptioningConfig, model_config: Any):
        super().__init__(cfg, model_config)
        self.text_embed_depth = model_config.text_embed_depth
        self.mask_token_id = (self.require_token(model_config, "mask_token_id", "mask token for parallel prediction")
                              if cfg.parallel_prob > 0 else None)
        self.needs = frozenset() if cfg.parallel_prob > 0 else frozenset({"caption"})

    def _parallel_states(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(B, T, D) final text states, a random share of captions predicted in parallel (CapPa): those
        read mask tokens bidirectionally, the others their tokens causally, all in one backbone pass
        (a per-caption causal flag in the layout: no host read, no split of the batch)."""
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        if not self.training:  # evaluation predicts autoregressively
            return model.backbone(pixels, ids, mask, layout="prefix_lm", cross_from_layer=self.text_embed_depth).text
        seeds = batch.get(SEED_KEY)  # per-sample draws when the batch has seeds (layers/draws.py)
        parallel = rand(seeds, f"{self.name}/parallel", ids.shape[0], device=ids.device) < self.cfg.parallel_prob  # (B,)
        # every real position of a parallel caption reads a mask token; padding stays padding
        ids = torch.where(parallel[:, None] & mask.bool(), torch.full_like(ids, self.mask_token_id), ids)
        return model.backbone(pixels, ids, mask, layout="prefix_lm", text_causal=~parallel,
                              cross_from_layer=self.text_embed_depth, seeds=fork(seeds, f"{self.name}/backbone")).text

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        states = shared.caption if self.cfg.parallel_prob == 0 else self._parallel_states(model, batch)
        logits = model.lm_head(states[:, :-1])  # (B, T-1, V): the last position predicts nothing
        loss = next_token_loss(logits, ids, mask, per_caption=self.cfg.per_caption)
        with torch.no_grad():
            accuracy = next_token_accuracy(logits, ids, mask)
        return ObjectiveOutput(loss, {"token_acc": accuracy})
