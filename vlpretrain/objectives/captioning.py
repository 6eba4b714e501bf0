"""``captioning``: next-token maximum likelihood of the caption given the image (prefix-LM).

The image tokens are a bidirectional prefix; caption tokens are causal and read the image from
block ``text_embed_depth`` on, so this shares one forward with ``contrastive`` (CoCa in one pass).
Logits at position t predict token t+1; padding is ignored and image positions carry no loss.

CapPa (Tschannen et al. 2023) parallel prediction: with probability ``parallel_prob`` per caption
(in training), the decoder input is all mask tokens and attends bidirectionally, so every token is
predicted from the image alone. Those captions take their own forward (the layout's causality is
per batch), and all captions share one loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpretrain.objectives import register_objective
from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.functional import next_token_accuracy, next_token_loss


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
        """(B, T, D) final text states, a random share of captions predicted in parallel (CapPa)."""
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        parallel = torch.rand(ids.shape[0], device=ids.device) < self.cfg.parallel_prob  # (B,)
        if not self.training:
            parallel.zero_()
        states = None
        for rows, causal in ((~parallel).nonzero()[:, 0], True), (parallel.nonzero()[:, 0], False):
            if rows.numel() == 0:
                continue
            sub_ids, sub_mask = ids[rows], mask[rows]  # (b', T)
            if not causal:  # every real position reads a mask token; padding stays padding
                sub_ids = torch.where(sub_mask.bool(), torch.full_like(sub_ids, self.mask_token_id), sub_ids)
            out = model.backbone(pixels[rows], sub_ids, sub_mask, layout="prefix_lm", text_causal=causal,
                                 cross_from_layer=self.text_embed_depth)
            if states is None:
                states = out.text.new_empty(ids.shape[0], *out.text.shape[1:])  # (B, T, D)
            states = states.index_copy(0, rows, out.text)
        return states

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        states = shared.caption if self.cfg.parallel_prob == 0 else self._parallel_states(model, batch)
        logits = model.lm_head(states[:, :-1])  # (B, T-1, V): the last position predicts nothing
        loss = next_token_loss(logits, ids, mask, per_caption=self.cfg.per_caption)
        with torch.no_grad():
            accuracy = next_token_accuracy(logits, ids, mask)
        return ObjectiveOutput(loss, {"token_acc": accuracy})
