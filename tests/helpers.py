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


# The start of a script run in a process where vlpretrain is not importable (CI installs it editable):
# what a user without vlpretrain has, for the tests of what an export gives transformers alone.
HIDE_VLPRETRAIN = r'''
import importlib.abc, json, sys


class HideVlpretrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vlpretrain" or name.startswith("vlpretrain."):
            raise ImportError(f"{name} is hidden from this process")
        return None


sys.meta_path.insert(0, HideVlpretrain())
try:
    import vlpretrain
except ImportError:
    pass
else:
    sys.exit("vlpretrain is importable here: the test would prove nothing")
'''

def run_without_vlpretrain(script: str, folder, *args: str) -> dict:
    """Run ``script`` (starting with HIDE_VLPRETRAIN) in an isolated Python in ``folder`` with ``args``; the
    JSON it prints after ``RESULT ``."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(folder / "modules")
    path = folder / "elsewhere.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, "-I", str(path), *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


PROBE_TEXTS = ["a small red circle", "two blue squares at the top"]


def probe_images():
    from PIL import Image

    return [Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 80, 220))]


def embedding_diff(loaded, theirs: dict) -> float:
    """Max abs difference between ``loaded``'s (a LoadedModel) embeddings of the probe images and texts and
    ``theirs`` (``image``/``text``/``input_ids`` computed elsewhere from the same inputs); the ids must match."""
    batch = loaded.processor(images=probe_images(), text=PROBE_TEXTS)
    assert batch["input_ids"].tolist() == theirs["input_ids"]
    with torch.no_grad():
        img = loaded.model.encode_image(batch["pixel_values"])
        txt = loaded.model.encode_text(batch["input_ids"], batch["attention_mask"])
    return max((img - torch.tensor(theirs["image"])).abs().max().item(),
               (txt - torch.tensor(theirs["text"])).abs().max().item())
