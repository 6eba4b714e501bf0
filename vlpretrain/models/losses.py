"""Losses the model computes itself: ``VLModel.forward(labels=...)``'s next-token cross-entropy.

They live with the model (which imports nothing from the trainer); the objectives import them from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels at this value count in no loss (PyTorch's cross_entropy default)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    per_caption: bool = False) -> torch.Tensor:
    """Causal LM cross-entropy: the logit at position t predicts label t+1.

    logits (B, T, V), or (B, T-1, V) without the last position (which predicts nothing: computing the
    head without it saves its FLOPs and a copy), labels (B, T) with IGNORE_INDEX where no loss is
    wanted; positions where ``attention_mask`` is 0 are ignored too. ``per_caption=False`` averages
    over all predicted tokens of the batch; ``True`` averages each caption's tokens first, then the captions.
    """
    T = labels.shape[1]
    targets = labels[:, 1:]  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    pred = logits[:, :T - 1].float()  # (B, T-1, V)
    # rows of (B*(T-1), V): the class dimension contiguous (a (B, V, T-1) transpose runs ~1.25x slower on a CPU)
    token_loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(targets.shape)  # (B, T-1)
    counted = (targets != IGNORE_INDEX).float()  # (B, T-1)
    if not per_caption:
        return token_loss.sum() / counted.sum().clamp(min=1)
    per_row = token_loss.sum(1) / counted.sum(1).clamp(min=1)  # (B,) 0 for a caption with no counted token
    has_tokens = (counted.sum(1) > 0).float()
    return per_row.sum() / has_tokens.sum().clamp(min=1)  # mean over captions with tokens (0 if none)
