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

``--decode-modes``: ours with ``data.decode=cpu`` against ``data.decode=device`` instead (interleaved the
same way), both as the trainer takes them: normalised pixels on ``--device`` (default: cuda if there is
one, else cpu, where the device mode decodes in this process on ``torch.get_num_threads()`` threads).
``--stages``: each stage alone, see :mod:`bench_stages`. ``--resize-sides 512,256``: the ``cpu`` pipeline
on the same pictures stored with their shorter side at each size (``make-shards --resize``).
``--views 6,96``: the ``cpu`` pipeline with and without worker views (self-distillation's local crops: 6 of
96 px, area 0.05-0.4, from the same decoded image), i.e. what a view-reading objective's start costs the workers.

Prints one JSON line. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_shards(out: Path, samples: int, per_shard: int, seed: int = 0, unique: int = 256,
                 sides: tuple[int, int] = (256, 512)) -> None:
    """Photo-like JPEGs (gradients, shapes, a little noise), sides drawn in ``sides``: ``unique`` of them
    (drawing one takes ~25 ms), repeated under new keys up to ``samples`` (each is decoded anew)."""
    from vlpretrain.data.writer import ShardWriter, encode_jpeg

    rng = np.random.default_rng(seed)
    images: list[bytes] = []
    with ShardWriter(out, per_shard, mtime=0.0) as writer:
        for i in range(samples):
            if i < unique:
                images.append(encode_jpeg(_photo(rng, sides), quality=90))
            writer.write(f"{i:09d}", images[i % unique], [f"picture number {i} with four circles"])


def _photo(rng: np.random.Generator, sides: tuple[int, int] = (256, 512)) -> Image.Image:
    w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(50, 200, 3)
    base = ramp + np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 55, 3)
    noise = rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        r = min(40, w // 4, h // 4)
        x, y = int(rng.integers(0, w - r)), int(rng.integers(0, h - r))
        draw.ellipse((x, y, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
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


def ours(shards: Path, tokenizer, workers: int, batch_size: int, priority: str, decode: str = "cpu",
         device: str = "cpu", image_size: int = 224, views: dict | None = None):
    import torch

    from vlpretrain.config import DataConfig
    from vlpretrain.data.device_decode import DeviceBatches
    from vlpretrain.data.shards import ShardStream

    cfg = DataConfig(train=str(shards), num_workers=workers, shuffle_buffer=100, worker_priority=priority,
                     decode=decode)
    stream = ShardStream(cfg, "train", batch_size=batch_size, image_size=image_size, context_length=64,
                         tokenizer=tokenizer, seed=0, normalize=False, pin_memory=device.startswith("cuda"), views=views)
    decoded = DeviceBatches(stream, device)  # data.decode=device: decoded here (cpu: passes the batch through)
    # as the trainer takes it: uint8 from the workers (or decoded on the device), normalised on the device
    for b in stream:
        pixels = stream.normalize(decoded(b)["pixel_values"].to(device, non_blocking=True))
        if pixels.is_cuda:
            torch.cuda.synchronize()
        yield pixels, b["input_ids"]


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


def interleaved(runs: dict, rounds: int) -> dict[str, list]:
    """Each run ``rounds`` times, interleaved A B B A A B ...: neither side always goes first."""
    results: dict[str, list] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            results[name].append(timed(runs[name]))
    return results


def figures(results: dict[str, list]) -> dict:
    rate = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    return {"samples_per_s": {k: round(v, 1) for k, v in rate.items()},
            "runs_samples_per_s": {k: [round(r[0], 1) for r in v] for k, v in results.items()},
            "samples_seen": {k: sorted({r[1] for r in v}) for k, v in results.items()},
            "peak_rss_per_worker_mb": {k: round(max(r[2] for r in v) / 2**20) for k, v in results.items()}}


def main(argv: list[str] | None = None) -> None:
    from vlpretrain.config import DataConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--priority", choices=["idle", "low", "normal"], default=DataConfig.worker_priority,
                        help="data.worker_priority of our workers (OpenCLIP's run at normal priority)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--decode-modes", action="store_true", help="data.decode=cpu against device")
    what.add_argument("--stages", action="store_true", help="each stage alone, both decode modes, and the trainer's "
                      "data-wait fraction (see tools/bench_stages.py)")
    what.add_argument("--resize-sides", default=None, metavar="BIG,SMALL",
                      help="the cpu pipeline on shards stored at shorter side BIG and the same resharded to SMALL")
    what.add_argument("--views", default=None, metavar="COUNT,SIZE",
                      help="the cpu pipeline with and without COUNT worker views of SIZE px per sample")
    parser.add_argument("--device", default=None, help="the trainer's device (default: cuda if there is one, else cpu)")
    parser.add_argument("--image-size", type=int, default=224, help="the model's image size S (crops are S x S)")
    parser.add_argument("--sides", default="256,512", help="LO,HI: stored image sides drawn in [LO, HI]")
    parser.add_argument("--trainer-config", default="configs/coca-base-debug.yaml",
                        help="--stages: the config whose trainer's data-wait fraction is measured")
    parser.add_argument("--trainer-steps", type=int, default=12, help="--stages: trainer steps per decode mode (0: none)")
    args = parser.parse_args(argv)

    import torch

    from vlpretrain.data.tokenizer import load_tokenizer, train_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sides = tuple(int(v) for v in args.sides.split(","))
    head = {"samples": args.samples, "workers": args.workers, "priority": args.priority, "rounds": args.rounds,
            "batch_size": args.batch_size, "image_px": f"{sides[0]}-{sides[1]} -> {args.image_size}",
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        per_shard = max(1, args.samples // (4 * args.workers))
        if not args.resize_sides:
            write_shards(shards, args.samples, per_shard=per_shard, sides=sides)
        tok_dir = train_tokenizer((f"picture number {i} with four circles" for i in range(500)), 64, Path(tmp) / "tok")
        tok = load_tokenizer(tok_dir)

        def run(source: Path, decode: str = "cpu", views: dict | None = None):
            return lambda: ours(source, tok, args.workers, args.batch_size, args.priority, decode, device,
                                args.image_size, views)

        if args.stages:
            import bench_stages

            out = {"bench": "data_stages", **head, "device": device,
                   **bench_stages.measure(shards, tok, args.image_size, args.batch_size, device)}
            if args.trainer_steps:
                out["trainer"] = bench_stages.trainer(shards, tok_dir, args.trainer_config, args.trainer_steps,
                                                      args.batch_size, args.workers)
        elif args.decode_modes:
            out = figures(interleaved({"cpu": run(shards, "cpu"), "device": run(shards, "device")}, args.rounds))
            out = {"bench": "data_decode_modes", **head, "device": device, **out,
                   "device_over_cpu": round(out["samples_per_s"]["device"] / out["samples_per_s"]["cpu"], 3)}
        elif args.views:
            from vlpretrain.data.views import ViewSpec

            count, size = (int(v) for v in args.views.split(","))
            views = {"local": ViewSpec(count, size, (0.05, 0.4))}
            out = figures(interleaved({"no_views": run(shards), "views": run(shards, views=views)}, args.rounds))
            out = {"bench": "data_views", **head, "views": f"{count} x {size} px", **out,
                   "views_over_no_views": round(out["samples_per_s"]["views"] / out["samples_per_s"]["no_views"], 3)}
        elif args.resize_sides:
            big, small = (int(v) for v in args.resize_sides.split(","))
            out = resize_speedup(Path(tmp), args, big, small, run)
            out = {"bench": "data_resize_sides", **head, "image_px": f"shorter side {big} / {small} -> {args.image_size}",
                   **out}
        else:
            out = figures(interleaved({"vlpretrain": run(shards), "openclip": lambda: openclip(
                shards, args.workers, args.batch_size)}, args.rounds))
            out = {"bench": "data_pipeline", **head, "vlpretrain_samples_per_s": out["samples_per_s"]["vlpretrain"],
                   "openclip_samples_per_s": out["samples_per_s"]["openclip"],
                   "ratio": round(out["samples_per_s"]["vlpretrain"] / out["samples_per_s"]["openclip"], 3), **out}
    print(json.dumps(out))


def resize_speedup(tmp: Path, args, big: int, small: int, run) -> dict:
    """Pictures stored with both sides in [``big``, 4/3 ``big``], then the same
    shards rewritten by ``make-shards --resize small``: the cpu pipeline's rate on each."""
    from vlpretrain.data.writer import reshard

    sources, resized = tmp / f"side{big}", tmp / f"side{small}"
    per_shard = max(1, args.samples // (4 * args.workers))
    write_shards(sources, args.samples, per_shard=per_shard, sides=(big, big * 4 // 3), unique=min(args.samples, 64))
    reshard(sources, resized, small, samples_per_shard=per_shard)
    out = figures(interleaved({str(big): run(sources), str(small): run(resized)}, args.rounds))
    out["speedup"] = round(out["samples_per_s"][str(small)] / out["samples_per_s"][str(big)], 3)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_stages, next to this file
    main()
