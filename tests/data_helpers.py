"""Shared helpers of the data tests: a small synthetic corpus, its tokenizer, stream shortcuts.

Built once per test session under pytest's base temp folder (several test modules share them).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, PER_SHARD = 96, 10  # 10 shards of uneven size (9 x 10 + 6): workers finish unevenly


def synth_corpus(tmp_path_factory) -> Path:
    """OUT/train (96 samples, 10 shards), OUT/val (12 samples) and OUT/tokenizer, 32 px images."""
    from vlpretrain.data.reader import iter_captions
    from vlpretrain.data.synthetic import synthesize
    from vlpretrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.getbasetemp() / "synth-corpus"
    if not (root / "tokenizer").is_dir():
        synthesize(root, NUM_TRAIN, image_size=32, seed=0, samples_per_shard=PER_SHARD, num_val=12)
        train_tokenizer(iter_captions(str(root / "train")), 256, root / "tokenizer")
    return root


def data_config(root: Path, **values):
    from vlpretrain.config import DataConfig

    paths = {"train": str(root / "train"), "val": str(root / "val"), "tokenizer": str(root / "tokenizer")}
    return DataConfig(**{**paths, **values})


def make_stream(cfg, split: str = "train", batch_size: int = 8, rank: int = 0, world_size: int = 1,
                seed: int = 0, tokenizer=None, normalize: bool = True, views=None):
    from vlpretrain.data.shards import ShardStream

    return ShardStream(cfg, split, batch_size=batch_size, image_size=32, context_length=32, tokenizer=tokenizer,
                       rank=rank, world_size=world_size, seed=seed, normalize=normalize, views=views)


def take(stream, n: int) -> list[dict]:
    """The next ``n`` batches, crossing epoch boundaries like a step-counting trainer."""
    out: list[dict] = []
    while len(out) < n:
        for batch in stream:
            out.append(batch)
            if len(out) == n:
                break
    return out


def jpeg_bytes(size=(32, 32), color=(200, 30, 30), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG", **save)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar file holding ``members`` (name, data) in order, as bytes."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter importing this tree."""
    return subprocess.run([sys.executable, "-c", code, *args], check=False, env=tree_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlpretrain.cli", *args], check=False, env=tree_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def tree_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env
