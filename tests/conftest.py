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


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset (32 px, 8 train shards, val, tokenizer), generated once per session."""
    from vlpretrain.config import DataConfig
    from vlpretrain.data.bootstrap import ensure_synthetic

    root = tmp_path_factory.mktemp("synth") / "synth"
    cfg = DataConfig(train=str(root / "train"), val=str(root / "val"), tokenizer=str(root / "tokenizer"),
                     synthesize=512)
    ensure_synthetic(cfg, image_size=32, seed=0)
    return root


def train_overrides(root, run_dir, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU training run of the debug model on ``synth_root``."""
    return [f"run.dir={run_dir}", "model.preset=debug", "model.text_embed_depth=1",
            f"data.train={root}/train", f"data.val={root}/val", f"data.tokenizer={root}/tokenizer",
            "data.num_workers=0", "data.shuffle_buffer=64", "train.batch_size=16", "train.steps=6",
            "train.log_every=1", "train.ckpt_every=0", "optim.warmup_steps=2", "eval.max_samples=64",
            "eval.num_captions=2", "eval.max_new_tokens=8",
            "objectives=[{name: contrastive, weight: 1.0}, {name: captioning, weight: 1.0}]", *extra]


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run gets its own Accelerate state (it is a process-wide singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
