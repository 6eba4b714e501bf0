"""Pooling of final hidden states into one vector per image or caption."""

from __future__ import annotations

import torch


IMAGE_POOL_INDEX = 0  # images are pooled at the cls token, first in the sequence


def pool_image(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D) -> (B, D): the cls token (timm ``global_pool='token'``)."""
    return tokens[:, IMAGE_POOL_INDEX]


def text_pool_index(batch: int, length: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """(B,) position of the token each caption is pooled at: the last real one (EOS when right-padded)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    return attention_mask.long().sum(dim=1).clamp(min=1) - 1


def pool_text(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) -> (B, D): the last real token (EOS for right-padded captions), as CLIP pools."""
    B, T = tokens.shape[:2]
    return tokens[torch.arange(B, device=tokens.device), text_pool_index(B, T, attention_mask, tokens.device)]
