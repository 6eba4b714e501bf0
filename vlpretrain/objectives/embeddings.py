"""Image and text embeddings from shared features, through the model's pooling and projection heads.

The same maths as ``VLModel.encode_image`` / ``encode_text`` applied to hidden states an objective
already has, so objectives (built-in or third-party) embed exactly as the exported model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.models.heads import pool_image, pool_text


def image_embedding(model: nn.Module, image_tokens: torch.Tensor) -> torch.Tensor:
    """(B, Ni, D) final-normed image tokens -> (B, E) L2-normalised embeddings."""
    return pooled_image_embedding(model, pool_image(image_tokens))


def text_embedding(model: nn.Module, text_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) unimodal text states -> (B, E) L2-normalised embeddings (last real token)."""
    return pooled_text_embedding(model, pool_text(text_states, attention_mask))


def pooled_image_embedding(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(B, D) pooled final-normed image states (shared ``image_pooled``) -> (B, E) L2-normalised."""
    return F.normalize(model.image_proj(pooled), dim=-1)


def pooled_text_embedding(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(B, D) pooled unimodal text states (shared ``text_pooled``) -> (B, E) L2-normalised."""
    return F.normalize(model.text_proj(pooled), dim=-1)
