"""Small builders shared by the tests: seeded models from presets, random captions."""

from __future__ import annotations

import torch

from vlpretrain import VLConfig, VLModel
from vlpretrain.models.presets import preset_values


def make_model(preset: str = "debug", **overrides) -> VLModel:
    """A seeded model of ``preset`` with architecture ``overrides``."""
    torch.manual_seed(0)
    return VLModel(VLConfig(**{**preset_values(preset), **overrides}))


def make_text(batch: int, length: int, vocab: int = 1024, lengths: list[int] | None = None, seed: int = 0):
    """Random ``BOS tokens EOS`` captions right-padded with 0: (input_ids (B, T), attention_mask (B, T))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = lengths or [length] * batch
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = 1, 2
        ids[b, n:] = 0
        mask[b, :n] = 1
    return ids, mask


def train_overrides(root, run_dir, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU training run of the debug model on ``synth_root``."""
    return [f"run.dir={run_dir}", "model.preset=debug", "model.text_embed_depth=1",
            f"data.train={root}/train", f"data.val={root}/val", f"data.tokenizer={root}/tokenizer",
            "data.num_workers=0", "data.shuffle_buffer=64", "train.batch_size=16", "train.steps=6",
            "train.log_every=1", "train.ckpt_every=0", "optim.warmup_steps=2", "eval.max_samples=64",
            "eval.num_captions=2", "eval.max_new_tokens=8",
            "objectives=[{name: contrastive, weight: 1.0}, {name: captioning, weight: 1.0}]", *extra]
