"""Data pipeline throughput: vlpretrain's ShardStream vs the pipeline OpenCLIP uses, same shards.

Both read the same WebDataset shards of 256-512 px JPEGs, shuffle, decode, random-resized-crop to
224 px (OpenCLIP's train transform: scale 0.9-1, bicubic), normalise, tokenise and batch in the same
number of DataLoader workers; ours as the trainer takes it: uint8 batches from the workers,
normalised by the consumer (here on the CPU, in the main process). OpenCLIP's side is its own code: ``wds.decode("pilrgb")`` +
``open_clip.transform.image_transform(224, is_train=True)`` + its tokenizer, in a ``wds.WebLoader``.
Runs are interleaved (A B B A A B ...) and the ratio is taken from medians, because the machine is shared.
Rates are steady-state: timed from each run's first batch. Peak RSS per worker is the largest
``VmHWM`` seen in /proc for the worker processes.

    python tools/bench_data.py [--samples 512] [--workers 2] [--rounds 4]

Prints one JSON line. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_shards(out: Path, samples: int, per_shard: int, seed: int = 0, unique: int = 256) -> None:
    """Photo-like JPEGs (gradients, shapes, a little noise), sides drawn in [256, 512]: ``unique`` of them
    (drawing one takes ~25 ms), repeated under new keys up to ``samples`` (each is decoded anew)."""
    from vlpretrain.data.writer import ShardWriter, encode_jpeg

    rng = np.random.default_rng(seed)
    images: list[bytes] = []
    with ShardWriter(out, per_shard, mtime=0.0) as writer:
        for i in range(samples):
            if i < unique:
                images.append(encode_jpeg(_photo(rng), quality=90))
            writer.write(f"{i:09d}", images[i % unique], [f"picture number {i} with four circles"])


def _photo(rng: np.random.Generator) -> Image.Image:
    w, h = (int(v) for v in rng.integers(256, 513, size=2))
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(50, 200, 3)
    base = ramp + np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 55, 3)
    noise = rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        draw.ellipse((x, y, x + 40, y + 40), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


class PeakRSS:
    """Polls the VmHWM (peak RSS) of this process's children while a run lasts."""

    def __init__(self):
        import psutil

        self.me, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for child in self.me.children(recursive=True):
                try:
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ours(shards: Path, tokenizer, workers: int, batch_size: int, priority: str):
    from vlpretrain.config import DataConfig
    from vlpretrain.data.shards import ShardStream

    cfg = DataConfig(train=str(shards), num_workers=workers, shuffle_buffer=100, worker_priority=priority)
    stream = ShardStream(cfg, "train", batch_size=batch_size, image_size=224, context_length=64,
                         tokenizer=tokenizer, seed=0, normalize=False)
    # as the trainer takes it: uint8 from the workers, normalised by the consumer (here on this CPU, in
    # this process; the trainer does it on its device)
    return ((stream.normalize(b["pixel_values"]), b["input_ids"]) for b in stream)


def openclip(shards: Path, workers: int, batch_size: int):
    import open_clip
    import webdataset as wds
    from open_clip.transform import image_transform

    preprocess = image_transform(224, is_train=True)
    tokenize = open_clip.get_tokenizer("ViT-B-32")
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    pipeline = (wds.WebDataset(urls, shardshuffle=100, nodesplitter=wds.split_by_node,
                               workersplitter=wds.split_by_worker, handler=wds.warn_and_continue)
                .shuffle(100).decode("pilrgb", handler=wds.warn_and_continue)
                .rename(image="jpg;png;jpeg;webp", text="txt")
                .map_dict(image=preprocess, text=lambda t: tokenize([t])[0])
                .to_tuple("image", "text").batched(batch_size, partial=True))
    return iter(wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                              persistent_workers=False))


def timed(make_batches) -> tuple[float, int, int]:
    """(samples/s in the steady state, samples seen, peak worker RSS). The clock starts at the first
    batch: worker start-up (fork, imports, first reads) is a per-epoch constant that on a short run
    on a shared machine would dominate the figure's noise."""
    with PeakRSS() as rss:
        n, steady, first = 0, 0, None
        for images, _ in make_batches():
            n += int(images.shape[0])
            if first is None:
                first = time.perf_counter()
            else:
                steady += int(images.shape[0])
        seconds = time.perf_counter() - first
    return steady / seconds, n, rss.peak


def main() -> None:
    from vlpretrain.config import DataConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--priority", choices=["idle", "low", "normal"], default=DataConfig.worker_priority,
                        help="data.worker_priority of our workers (OpenCLIP's run at normal priority)")
    args = parser.parse_args()

    from vlpretrain.data.tokenizer import load_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.samples, per_shard=max(1, args.samples // (4 * args.workers)))
        tok = load_tokenizer(train_tokenizer((f"picture number {i} with four circles" for i in range(500)), 64,
                                             Path(tmp) / "tok"))
        results: dict[str, list] = {"vlpretrain": [], "openclip": []}
        runs = {"vlpretrain": lambda: ours(shards, tok, args.workers, args.batch_size, args.priority),
                "openclip": lambda: openclip(shards, args.workers, args.batch_size)}
        for r in range(args.rounds):  # interleaved A B B A A B ...: neither side always goes first
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                results[name].append(timed(runs[name]))
    rate = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    counts = {k: sorted({r[1] for r in v}) for k, v in results.items()}
    print(json.dumps({
        "bench": "data_pipeline", "samples": args.samples, "workers": args.workers, "priority": args.priority,
        "rounds": args.rounds,
        "image_px": "256-512 -> 224", "cpus": os.cpu_count(),
        "vlpretrain_samples_per_s": round(rate["vlpretrain"], 1),
        "openclip_samples_per_s": round(rate["openclip"], 1),
        "ratio": round(rate["vlpretrain"] / rate["openclip"], 3),
        "runs_samples_per_s": {k: [round(r[0], 1) for r in v] for k, v in results.items()},
        "samples_seen": counts,
        "peak_rss_per_worker_mb": {k: round(max(r[2] for r in v) / 2**20) for k, v in results.items()},
    }))


if __name__ == "__main__":
    main()
