"""Loss maths as pure functions (no process group, no modules), each checked against a reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    per_caption: bool = False) -> torch.Tensor:
    """Causal LM cross-entropy: the logit at position t predicts label t+1.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX where no loss is wanted; positions where
    ``attention_mask`` is 0 are ignored too. ``per_caption=False`` averages over all predicted
    tokens of the batch; ``True`` averages each caption's tokens first, then the captions.
    """
    targets = labels[:, 1:].clone()  # (B, T-1)
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    pred = logits[:, :-1].float()  # (B, T-1, V)
    token_loss = F.cross_entropy(pred.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (targets != IGNORE_INDEX).float()  # (B, T-1)
    if not per_caption:
        return token_loss.sum() / counted.sum().clamp(min=1)
    per_row = token_loss.sum(1) / counted.sum(1).clamp(min=1)
    has_tokens = counted.sum(1) > 0
    return per_row[has_tokens].mean() if has_tokens.any() else token_loss.sum() * 0
