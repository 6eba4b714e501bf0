"""The embedded default dataset: synthetic shards and their tokenizer, generated on first use.

When ``data.synthesize`` is > 0 and ``data.train`` holds no shards yet, the folder above it gets
``train/`` and ``val/`` synthetic shards (:mod:`vlpretrain.data.synthetic`) and a SentencePiece
``tokenizer/`` trained on their captions. Everything is written aside and moved into place in one
rename, so an interrupted generation never looks like a complete dataset.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vlpretrain.config import ConfigError, DataConfig
from vlpretrain.data.reader import iter_captions
from vlpretrain.data.synthetic import synthesize
from vlpretrain.data.tokenizer import train_tokenizer

SYNTH_VOCAB = 256  # the synthetic grammar has about a hundred words


def ensure_synthetic(cfg: DataConfig, image_size: int, seed: int) -> Path | None:
    """Generate the synthetic dataset ``cfg`` points at if asked to and absent; returns its folder."""
    if cfg.synthesize <= 0:
        return None
    root = Path(cfg.train).parent
    expected = {"data.train": root / "train", "data.val": root / "val", "data.tokenizer": root / "tokenizer"}
    for key, path in expected.items():
        value = getattr(cfg, key.split(".")[1])
        if key == "data.val" and value is None:  # no validation asked for (benchmarks): fine
            continue
        if value is None or Path(value) != path:
            raise ConfigError(f"{key}: with data.synthesize > 0 it must be '{path}' (train/, val/ and tokenizer/ "
                              f"side by side), got {value!r}.")
    if root.is_dir() and any((root / "train").glob("*.tar")) and (root / "tokenizer").is_dir():
        return root
    if root.exists():
        raise ConfigError(f"data.synthesize: '{root}' exists but is not a complete synthetic dataset; remove it "
                          "or point data.train elsewhere.")
    work = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    print(f"generating the synthetic dataset ({cfg.synthesize} samples, {image_size} px) in {root} ...", flush=True)
    synthesize(work, cfg.synthesize, image_size=image_size, seed=seed, samples_per_shard=max(cfg.synthesize // 16, 1))
    train_tokenizer(iter_captions(str(work / "train")), SYNTH_VOCAB, work / "tokenizer")
    root.parent.mkdir(parents=True, exist_ok=True)
    work.rename(root)
    return root
