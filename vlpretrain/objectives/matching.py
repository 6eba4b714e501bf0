"""``matching``: image-text matching (ITM) with hard negatives, written as a third-party plug-in.

It uses only the public objective API (``register_objective``, ``Objective``, ``ObjectiveConfig``,
the shared-forward ``needs``, the embedding helpers and ``functional``) and touches no other objective's code.

For every pair of the batch, one negative image and one negative caption are drawn with
probability ``softmax(similarity / temperature)`` over the other examples (ALBEF, Li et al. 2021),
from the contrastive similarities of the model's own embeddings. Captions identical to the
positive one are never drawn (they would be false negatives); an example with no valid negative
gets none. Positives and negatives go through the backbone in the ``fused`` layout and a 2-way
head on the fused cls token says whether image and caption match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.embeddings import pooled_image_embedding, pooled_text_embedding
from vlpretrain.objectives.functional import IGNORE_INDEX
from vlpretrain.objectives.registry import register_objective


@dataclass
class MatchingConfig(ObjectiveConfig):
    """Image-text matching."""

    hard_negatives: bool = True
    """Draw negatives by similarity (hard); False draws them uniformly among the valid ones."""
    temperature: float = 0.07
    """Softmax temperature of the similarity that weights the hard negatives."""

    def checks(self):
        return super().checks() + [(self.temperature > 0, "temperature", f"{self.temperature} must be > 0")]


@torch.no_grad()
def sample_negatives(similarity: torch.Tensor, allowed: torch.Tensor, temperature: float | None):
    """One negative column per row: (index (B,), has_negative (B,) bool).

    similarity (B, B); allowed (B, B) bool, False on the diagonal and on false negatives. Weights
    are softmax(similarity / temperature) over the allowed columns (uniform when temperature is
    None); a row with no allowed column gets a dummy index and ``has_negative`` False.
    """
    scores = similarity.float() / temperature if temperature is not None else torch.zeros_like(similarity)
    scores = scores.masked_fill(~allowed, float("-inf"))  # (B, B)
    has_negative = allowed.any(dim=1)  # (B,)
    weights = torch.where(has_negative[:, None], scores.softmax(dim=1), torch.ones_like(scores))
    return torch.multinomial(weights, 1)[:, 0], has_negative


@register_objective("matching")
class Matching(Objective):
    """Binary matched / not-matched classification of fused image-caption pairs."""

    Config = MatchingConfig

    def __init__(self, cfg: MatchingConfig, model_config: Any):
        super().__init__(cfg, model_config)
        self.needs = frozenset({"image_pooled", "text_pooled"})  # for the similarities that pick hard negatives
        self.head = nn.Linear(model_config.width, 2)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        B = ids.shape[0]
        if B < 2:
            raise self.error("a batch of 1 has no negatives", "use a batch of at least 2 image-text pairs")
        with torch.no_grad():
            sim = pooled_image_embedding(model, shared.image_pooled) @ pooled_text_embedding(model, shared.text_pooled).T
            real = ids.masked_fill(mask == 0, -1)  # (B, T), padding made uniform
            same_caption = (real[:, None] == real[None]).all(-1)  # (B, B)
            allowed = ~same_caption  # (B, B), the diagonal included
            temperature = self.cfg.temperature if self.cfg.hard_negatives else None
            neg_text, text_ok = sample_negatives(sim, allowed, temperature)  # a caption for each image
            neg_image, image_ok = sample_negatives(sim.T, allowed.T, temperature)  # an image for each caption
        # rows: B positives, B (negative image, caption), B (image, negative caption)
        all_pixels = torch.cat([pixels, pixels[neg_image], pixels])  # (3B, C, H, W)
        all_ids = torch.cat([ids, ids, ids[neg_text]])  # (3B, T)
        all_mask = torch.cat([mask, mask, mask[neg_text]])  # (3B, T)
        out = model.backbone(all_pixels, all_ids, all_mask, layout="fused", text_causal=False)
        logits = self.head(out.image[:, 0]).float()  # (3B, 2) from the fused cls token
        negative = torch.zeros(B, dtype=torch.long, device=ids.device)
        labels = torch.cat([torch.ones_like(negative), negative.masked_fill(~image_ok, IGNORE_INDEX),
                            negative.masked_fill(~text_ok, IGNORE_INDEX)])  # (3B,)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            counted = labels != IGNORE_INDEX
            accuracy = ((logits.argmax(-1) == labels) & counted).float().sum() / counted.sum()
            # pairwise: does each positive score above the negatives drawn for it? (chance 0.5)
            score = logits[:, 1] - logits[:, 0]  # (3B,) log-odds of "match"
            wins = ((score[:B] > score[B:2 * B]) & image_ok).sum() + ((score[:B] > score[2 * B:]) & text_ok).sum()
            pair_acc = wins.float() / (image_ok.sum() + text_ok.sum()).clamp(min=1)  # over drawn negatives
            found = (image_ok.float().mean() + text_ok.float().mean()) / 2
        return ObjectiveOutput(loss, {"itm_acc": accuracy, "pair_acc": pair_acc, "negatives_found": found})
