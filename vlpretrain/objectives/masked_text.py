"""``masked_text``: masked token modelling conditioned on the image (``fused`` layout).

A share of the real caption tokens (never BOS, EOS or padding) is selected; a selected token
becomes the mask token (80%), a random token (10%) or stays (10%). Image and corrupted caption
attend to each other bidirectionally, and the tied language-model head predicts the original
tokens at the selected positions only (logits are computed there only). The loss is the mean
over the selected tokens of the batch: captions with nothing selected add nothing, and a batch
with nothing selected gives 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpretrain.layers.draws import SEED_KEY, fork
from vlpretrain.objectives.registry import register_objective
from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.functional import IGNORE_INDEX, mask_tokens, masked_token_loss


@dataclass
class MaskedTextConfig(ObjectiveConfig):
    """Masked token modelling of captions given the image."""

    mask_ratio: float = 0.15
    """Share of the real caption tokens selected for prediction, in (0, 1)."""
    mask_token_share: float = 0.8
    """Of the selected tokens, the share replaced by the mask token."""
    random_token_share: float = 0.1
    """Of the selected tokens, the share replaced by a random token (the rest stay unchanged)."""

    def checks(self):
        shares = self.mask_token_share + self.random_token_share
        return super().checks() + [
            (0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} must lie in (0, 1)"),
            (0.0 <= self.mask_token_share <= 1.0, "mask_token_share", f"{self.mask_token_share} must lie in [0, 1]"),
            (0.0 <= self.random_token_share <= 1.0, "random_token_share",
             f"{self.random_token_share} must lie in [0, 1]"),
            (shares <= 1.0 + 1e-9, "random_token_share",
             f"mask_token_share + random_token_share = {shares} must not exceed 1"),
        ]


@register_objective("masked_text")
class MaskedText(Objective):
    """BERT-style masked caption tokens, predicted from the image and the rest of the caption."""

    Config = MaskedTextConfig

    def __init__(self, cfg: MaskedTextConfig, model_config: Any):
        super().__init__(cfg, model_config)
        self.mask_token_id = self.require_token(model_config, "mask_token_id", "mask token")
        self.vocab_size = model_config.vocab_size
        self.special = [getattr(model_config, a) for a in ("pad_token_id", "bos_token_id", "eos_token_id")]

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        special = torch.tensor(self.special + [self.mask_token_id], device=ids.device)
        candidates = mask.bool() & ~torch.isin(ids, special)  # (B, T) real, non-special tokens
        seeds = batch.get(SEED_KEY)
        corrupted, labels = mask_tokens(ids, candidates, self.cfg.mask_ratio, self.mask_token_id, self.vocab_size,
                                        self.cfg.mask_token_share, self.cfg.random_token_share, seeds=seeds,
                                        stream=f"{self.name}/tokens")
        out = model.backbone(batch["pixel_values"], corrupted, mask, layout="fused", text_causal=False,
                             seeds=fork(seeds, f"{self.name}/backbone"))
        selected = labels != IGNORE_INDEX  # (B, T)
        logits = model.lm_head(out.text[selected])  # (M, V)
        targets = labels[selected]  # (M,)
        loss = masked_token_loss(logits, targets)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets).float().sum() / max(targets.numel(), 1)
        return ObjectiveOutput(loss, {"masked_acc": accuracy,
                                      "masked_share": selected.sum() / candidates.sum().clamp(min=1)})
