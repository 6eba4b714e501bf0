"""Pooling of final hidden states into one vector per image or caption."""

from __future__ import annotations

import torch


def pool_image(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D) -> (B, D): the cls token (timm ``global_pool='token'``)."""
    return tokens[:, 0]


def pool_text(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) -> (B, D): the last real token (EOS for right-padded captions), as CLIP pools."""
    if attention_mask is None:
        return tokens[:, -1]
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
