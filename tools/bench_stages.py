"""``tools/bench_data.py --stages``: the samples/s of each data stage alone, for both ``data.decode`` modes,
and the real trainer's data-wait fraction under each, so a user sees which stage bounds them.

Each stage runs alone in this process on the output of the one before (inputs made first, untimed):

===============  ==========================================================================================
read             shard bytes -> raw samples (tar parsing, caption checks; ``reader.iter_shard``)
shuffle          the seeded shuffle buffer over those samples (1000 held, ``data.shuffle_buffer``'s default)
decode           cpu: header check + PIL decode at draft size + EXIF + RGB per sample;
                 device: header check + crop draw per sample (the worker's part), then the trainer's
                 batched ``decode_jpeg`` of each batch on ``--device``
augment          cpu: the random resized crop per sample (uint8, antialiased bicubic);
                 device: EXIF turn + the same crop on ``--device``
collate          cpu: stacking a batch of pixels + caption tokenisation; device: packing the JPEG bytes + tokenisation
host_to_device   cpu: the uint8 batch copied to ``--device`` and normalised there; device: the JPEG bytes'
                 copy (what nvJPEG reads) + normalising the decoded batch there
===============  ==========================================================================================

The worker stages (read to collate; decode's first half in device mode) run in each of
``data.num_workers`` processes, so the pipeline's rate is at most about workers x the slowest of them;
the trainer's stages (device decode, augment, host_to_device) run once per rank. Rates are per process
(one thread, except the device decode on a CPU, which the trainer spreads over ``torch.get_num_threads()``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return max(time.perf_counter() - start, 1e-9), out


def _rate(n: int, fn) -> tuple[float, object]:
    """(samples/s of ``fn`` over ``n`` samples, its output)."""
    seconds, out = _seconds(fn)
    return n / seconds, out


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def measure(shards: Path, tokenizer, image_size: int, batch_size: int, device: str) -> dict:
    """{"stages": {mode: {stage: samples/s}}, "bound_by": {mode: slowest stage}}."""
    from vlpretrain.data.device_decode import DeviceBatches, pack, plan_jpeg
    from vlpretrain.data.images import ImageSettings, ImageTransform
    from vlpretrain.data.reader import SkipCounter, expand_sources, iter_shard
    from vlpretrain.data.shards import ShuffleBuffer
    from vlpretrain.data.tokenizer import encode_captions

    urls = expand_sources(str(shards))[0]
    seconds, samples = _seconds(lambda: [s for url in urls for s in iter_shard(url, SkipCounter())])
    n = len(samples)
    read = n / seconds
    shuffle, _ = _rate(n, lambda: list(ShuffleBuffer(1000, random.Random(0))(((0, i), s) for i, s in enumerate(samples))))
    transform = ImageTransform(ImageSettings(size=image_size), train=True)
    captions = [s.captions[0] for s in samples]

    def collate_text() -> None:
        for part in _batches(captions, batch_size):
            encode_captions(tokenizer, part, 64)

    stages: dict[str, dict[str, float]] = {"cpu": {"read": read, "shuffle": shuffle},
                                            "device": {"read": read, "shuffle": shuffle}}
    cpu = stages["cpu"]
    cpu["decode"], images = _rate(n, lambda: [transform.decode(s.image) for s in samples])
    cpu["augment"], pixels = _rate(n, lambda: [transform(img, seed=i) for i, img in enumerate(images)])
    cpu["collate"], stacked = _rate(n, lambda: ([torch.stack(b) for b in _batches(pixels, batch_size)], collate_text())[0])
    cpu["host_to_device"], _ = _rate(n, lambda: [transform.normalize(b.to(device)) for b in stacked])

    dev = stages["device"]
    decoder = DeviceBatches(_StreamLike(transform), device)
    worker_rate, plans = _rate(n, lambda: [plan_jpeg(transform, s.image, i) for i, s in enumerate(samples)])
    jobs = [(torch.frombuffer(bytearray(s.image), dtype=torch.uint8), p) for s, p in zip(samples, plans) if p]
    decode_rate, decoded = _rate(len(jobs), lambda: [x for b in _batches(jobs, batch_size) for x in decoder.decode_only(b)])
    dev["decode"] = 1 / (1 / worker_rate + 1 / decode_rate)  # both halves, one after the other
    dev["decode_worker_part"], dev["decode_device_part"] = worker_rate, decode_rate
    turned = list(zip(decoded, (p for _, p in jobs)))
    dev["augment"], crops = _rate(len(jobs), lambda: [
        decoder._finish(x, p) for x, p in turned])
    rows = [(s.image, p) for s, p in zip(samples, plans) if p]
    dev["collate"], packed = _rate(len(rows), lambda: ([pack(b, image_size) for b in _batches(rows, batch_size)],
                                                       collate_text())[0])
    dev["host_to_device"], _ = _rate(len(rows), lambda: [
        (p["jpeg_data"].to(device), transform.normalize(torch.stack(b)))
        for p, b in zip(packed, _batches(crops, batch_size))])
    rounded = {mode: {k: round(v, 1) for k, v in figures.items()} for mode, figures in stages.items()}
    main = ("read", "shuffle", "decode", "augment", "collate", "host_to_device")
    return {"stages": rounded, "bound_by": {mode: min(main, key=figures.get) for mode, figures in stages.items()},
            "jpeg_share": round(len(jobs) / n, 3)}


class _StreamLike:
    """What :class:`DeviceBatches` reads of a stream: the image transform (and skip totals)."""

    def __init__(self, transform):
        self.dataset = type("Dataset", (), {"transform": transform})()
        self.skipped_by_shard: dict = {}


def trainer(shards: Path, tokenizer_dir: Path, config: str, steps: int, batch_size: int, workers: int) -> dict:
    """The real trainer (tools/bench.py, its own process) on these shards under each decode mode:
    {mode: {"data_wait_frac", "samples_per_s"}}. The model's image size is the config's."""
    out = {}
    for mode in ("cpu", "device"):
        cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--config", config, "--warmup", "2",
               f"data.train={shards}", f"data.tokenizer={tokenizer_dir}", "data.val=null", f"data.decode={mode}",
               f"train.steps={steps}", f"train.batch_size={batch_size}", f"data.num_workers={workers}",
               "data.mode=resampled"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        if run.returncode != 0:
            out[mode] = {"error": run.stderr.strip().splitlines()[-1:]}
            continue
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        out[mode] = {k: round(figures[k], 4) for k in ("data_wait_frac", "samples_per_s")}
    return out
