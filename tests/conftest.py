"""Shared fixtures: small models built from presets, deterministic inputs."""

from __future__ import annotations

import pytest
import torch

from vlpretrain import VLConfig, VLModel
from vlpretrain.models.presets import preset_values


def make_model(preset: str = "debug", **overrides) -> VLModel:
    torch.manual_seed(0)
    return VLModel(VLConfig(**{**preset_values(preset), **overrides}))


def make_text(batch: int, length: int, vocab: int, lengths: list[int] | None = None, seed: int = 0):
    """BOS tokens EOS captions, right-padded with 0: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = lengths or [length] * batch
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = 1, 2
        ids[b, n:] = 0
        mask[b, :n] = 1
    return ids, mask


@pytest.fixture
def debug_model() -> VLModel:
    return make_model("debug").eval()
