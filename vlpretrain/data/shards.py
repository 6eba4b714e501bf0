"""The training/evaluation stream: WebDataset shards -> batches for one rank, resumable exactly.

Design (every random choice derives from ``(seed, epoch, rank, worker)``, nothing from timing):

1. **Shard plan.** ``epoch`` mode: all shards, shuffled by ``(seed, epoch)`` (same permutation on
   every rank), then global worker ``g = rank * num_workers + worker`` takes shards ``g, g + R*W, ...``
   so each shard is read by exactly one worker of one rank per epoch. ``resampled`` mode: each worker
   draws ``ceil(shards / (R*W))`` shards with replacement (per-source weights) for its "epoch"; the
   stream is endless because epochs follow one another, and only full batches are delivered.
2. **Raw samples** (:mod:`vlpretrain.data.reader`) go through a seeded shuffle buffer holding
   *encoded* bytes; bad ones are skipped and counted by reason and shard.
3. Each sample leaving the buffer has a position ``i`` in its worker's stream; its caption draw (``data.captions``)
   and random crop are seeded by ``(seed, epoch, rank, worker, i)``. Images are decoded (early JPEG
   downscaling), transformed, and batched *in the worker*, captions tokenised to the batch's longest.
4. **Order.** Workers' batches are delivered round-robin (worker 0, 1, ..., 0, 1, ...; a finished
   worker drops out). PyTorch's DataLoader only approximates this when workers finish unevenly, so
   the main process re-orders into exactly this sequence (a few batches of buffering at most).
5. **Position.** ``state_dict()`` holds the epoch, and per worker the batches delivered and the
   number of buffer outputs they consumed (the cursor). A restored worker replays its raw stream up
   to the cursor *without decoding* (reading bytes only, ~free next to decoding), so the next batches
   are exactly those an unbroken run would have produced. Skip counts so far are part of the state.

The epoch reaches the workers because every epoch starts fresh worker processes (no persistent
workers: nothing accumulates across epochs). A DataLoader ``timeout`` turns a stuck worker into an
error. In ``epoch`` mode, ranks can get different numbers of batches (shards differ in size): a
multi-rank trainer should count steps, or use ``resampled`` mode, rather than rely on equal epochs.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlpretrain.config import ConfigError, DataConfig
from vlpretrain.data.device_decode import SPARES, pack, plan_jpeg
from vlpretrain.data.images import BadSample, ImageSettings, ImageTransform
from vlpretrain.data.reader import RawSample, SkipCounter, by_reason, expand_sources, iter_shard, merge_counts
from vlpretrain.data.tokenizer import encode_captions, load_tokenizer


def plan_shards(sources: list[list[str]], *, resampled: bool, weights: list[float] | None, shuffle: bool,
                seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one worker of one rank reads in one epoch, in reading order."""
    slots = world_size * num_workers
    everything = [url for urls in sources for url in urls]
    if not resampled:
        if shuffle:
            random.Random(f"shards/{seed}/{epoch}").shuffle(everything)
        return everything[rank * num_workers + worker::slots]
    rng = random.Random(f"resample/{seed}/{epoch}/{rank}/{worker}")
    draws = math.ceil(len(everything) / slots)
    if weights is None:  # uniform over shards
        return rng.choices(everything, k=draws)
    picks = rng.choices(range(len(sources)), weights=weights, k=draws)
    return [rng.choice(sources[s]) for s in picks]


def shuffle_buffer(items: Iterator[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """Seeded reservoir shuffle: fill ``size`` items, then emit a random one per incoming item."""
    if size <= 1:
        yield from items
        return
    buf: list[RawSample] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """One rank's samples as batches, produced inside each DataLoader worker (see module doc).

    Yields batch dicts tagged with ``_worker``/``_cursor``/``_skipped`` and, last, an end marker per
    worker; :class:`ShardStream` turns these into the ordered batches the trainer sees.
    """

    def __init__(self, sources: list[list[str]], *, transform: ImageTransform, tokenizer,
                 context_length: int, batch_size: int, resampled: bool, weights: list[float] | None,
                 shuffle: bool, buffer_size: int, seed: int, rank: int, world_size: int, num_workers: int,
                 random_caption: bool = True, normalize: bool = True, pad_multiple: int = 1,
                 decode_on_device: bool = False):
        self.sources, self.transform, self.tokenizer = sources, transform, tokenizer
        self.decode_on_device = decode_on_device  # data.decode=device: JPEGs leave as bytes (device_decode)
        self.spares = SPARES if decode_on_device else 0  # next samples each batch carries, to fill bad rows
        self.pad_multiple = pad_multiple
        self.normalize_pixels = normalize  # False: uint8 pixels, normalised by the consumer
        self.random_caption = random_caption
        self.context_length, self.batch_size = context_length, batch_size
        self.resampled, self.weights, self.shuffle, self.buffer_size = resampled, weights, shuffle, buffer_size
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.epoch = 0
        self.resume_cursor: dict[int, int] = {}  # worker -> buffer outputs already consumed
        self.finished: set[int] = set()  # workers whose epoch was already fully delivered

    def _worker_id(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardDataset planned for {self.num_workers} workers but runs in "
                               f"{info.num_workers}; build it through ShardStream.")
        return info.id

    def _positions(self, worker: int, skips: SkipCounter) -> Iterator[tuple[int, RawSample]]:
        """(position, raw sample) leaving this worker's shuffle buffer, from the resume cursor on."""
        shards = plan_shards(self.sources, resampled=self.resampled, weights=self.weights, shuffle=self.shuffle,
                             seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                             worker=worker, num_workers=self.num_workers)
        raw = (s for url in shards for s in iter_shard(url, skips))
        if self.shuffle:
            raw = shuffle_buffer(raw, self.buffer_size, random.Random(
                f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}"))
        start = self.resume_cursor.get(worker, 0)
        for position, sample in enumerate(raw):
            if position < start:  # replay: bytes only, no decoding
                if position == start - 1:
                    skips.take()  # these were counted before the checkpoint
                continue
            yield position, sample

    def _load(self, sample: RawSample, position: int, worker: int) -> tuple[Any, str]:
        """The image (see :meth:`_image`) and the caption; raises :class:`BadSample`."""
        if not self.shuffle:  # evaluation: first caption, fixed transform
            return self.transform(self.transform.decode(sample.image)), sample.captions[0]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, position])
        pick = int(rng.integers(len(sample.captions)))  # drawn either way: the crop seed stays the same
        caption = sample.captions[pick if self.random_caption else 0]
        crop_seed = int(rng.integers(2**62))
        return self._image(sample.image, crop_seed), caption

    def _image(self, data: bytes, crop_seed: int) -> Any:
        """Decoded, cropped uint8 (3, S, S); with data.decode=device a JPEG stays ``(bytes, plan)``
        (header checked, crop drawn) for the trainer's device to decode."""
        if self.decode_on_device:
            plan = plan_jpeg(self.transform, data, crop_seed)
            if plan is not None:
                return data, plan
        return self.transform(self.transform.decode(data), seed=crop_seed)

    def _captions(self, items: list) -> dict[str, torch.Tensor]:
        if not items:  # a batch without spares (the tokenizer refuses an empty list)
            return {"input_ids": torch.zeros((0, 2), dtype=torch.long), "attention_mask": torch.zeros((0, 2), dtype=torch.long)}
        return encode_captions(self.tokenizer, [c for _, c, _, _ in items], self.context_length, self.pad_multiple)

    def _batch(self, items: list, worker: int, cursor: int, skipped: dict) -> dict[str, Any]:
        """The batch of ``items[:batch_size]``; the rest are spares (data.decode=device only)."""
        own, spares = items[:self.batch_size], items[self.batch_size:]
        if self.decode_on_device:  # pixels decoded by the trainer (device_decode.DeviceBatches)
            batch = {"pixel_values": torch.empty((len(own), 0), dtype=torch.uint8), **self._captions(own)}
            spare_text = self._captions(spares)
            batch["encoded"] = {**pack([image for image, _, _, _ in items], self.transform.settings.size),
                                "spare_input_ids": spare_text["input_ids"],
                                "spare_attention_mask": spare_text["attention_mask"],
                                "spare_keys": [k for _, _, k, _ in spares], "shards": [s for _, _, _, s in items],
                                "pad_id": self.tokenizer.pad_token_id}
        else:
            pixels = torch.stack([p for p, _, _, _ in own])  # (B, 3, S, S) uint8
            batch = {"pixel_values": self.transform.normalize(pixels) if self.normalize_pixels else pixels,
                     **self._captions(own)}
        batch["keys"] = [k for _, _, k, _ in own]
        batch.update(_worker=worker, _cursor=cursor, _skipped=skipped)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self._worker_id()
        skips = SkipCounter()
        cursor = self.resume_cursor.get(worker, 0)
        if worker not in self.finished:
            items: list = []
            held = None  # (cursor, skips) at a full batch's last sample, while its spares are read
            for position, sample in self._positions(worker, skips):
                cursor = position + 1
                try:
                    image, caption = self._load(sample, position, worker)
                except BadSample as bad:
                    skips.add(bad.reason, sample.shard)
                    continue
                items.append((image, caption, sample.key, sample.shard))
                if len(items) == self.batch_size:
                    held = (cursor, skips.take())
                if len(items) == self.batch_size + self.spares:  # spares: the next batch's first samples
                    yield self._batch(items, worker, *held)
                    items, held = items[self.batch_size:], None
            if held is not None:  # the stream ended while reading spares
                yield self._batch(items, worker, *held)
                items = items[self.batch_size:]
            if items and not self.resampled:  # resampled: full batches only (samples are redrawn anyway)
                yield self._batch(items, worker, cursor, skips.take())
        yield {"_worker": worker, "_end": True, "_cursor": cursor, "_skipped": skips.take()}


def set_worker_priority(priority: str, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: this worker's CPU priority (``data.worker_priority``)."""
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority in ("idle", "low"):
        os.nice(10)


class ShardStream:
    """Batches for one rank, one epoch per ``iter()``; ``state_dict``/``load_state_dict`` resume exactly.

    Each batch is a dict: ``pixel_values`` (B, 3, S, S) float32 (uint8 with ``normalize=False``: then the
    consumer calls :meth:`normalize`, e.g. on its GPU after the copy), ``input_ids``/``attention_mask``
    (B, T) with T the longest caption in the batch (<= context length), ``keys`` (sample keys) and
    ``skipped`` ({reason: n} newly skipped since the previous batch). ``skipped_by_shard`` holds the
    running totals ({shard: {reason: n}}).
    """

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, image_size: int, context_length: int,
                 tokenizer=None, rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False,
                 normalize: bool = True):
        """``pin_memory``: the loader hands over batches in page-locked memory (for a CUDA device: their copy
        to it then runs asynchronously instead of staging through the host first). ``normalize=False``: the
        workers hand over uint8 pixels (a quarter of the bytes through shared memory, pinning and the copy
        to the device, and no float pass per sample in the workers); :meth:`normalize` makes them floats."""
        if split not in ("train", "val"):
            raise ValueError(f"split '{split}' is not one of train, val.")
        cfg.validate()
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size}).")
        spec = cfg.train if split == "train" else cfg.val
        if spec is None:
            raise ConfigError(f"data.{split} is not set; give a shard folder, pattern or URL.")
        self.train = split == "train"
        self.resampled = self.train and cfg.mode == "resampled"
        self.sources = expand_sources(spec)
        self.num_shards = sum(len(s) for s in self.sources)
        self.num_workers = cfg.num_workers
        if not self.train:  # evaluation reads every shard once: never more workers than shards
            self.num_workers = min(cfg.num_workers, self.num_shards // world_size)
        self._check_enough_shards(f"data.{split}", world_size)
        settings = ImageSettings(size=image_size, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                 crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
                                 hflip=cfg.hflip, max_pixels=cfg.max_image_pixels)
        decode_on_device = self.train and cfg.decode == "device"
        if decode_on_device and normalize:
            raise ValueError("data.decode=device hands the consumer JPEG bytes to decode: build the train stream "
                             "with normalize=False and pass each batch through device_decode.DeviceBatches.")
        self.dataset = ShardDataset(
            self.sources, transform=ImageTransform(settings, train=self.train),
            tokenizer=tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer),
            context_length=context_length, batch_size=batch_size, resampled=self.resampled,
            weights=cfg.train_weights if self.resampled else None, shuffle=self.train,
            buffer_size=cfg.shuffle_buffer, seed=seed, rank=rank, world_size=world_size,
            num_workers=max(self.num_workers, 1), random_caption=cfg.captions == "random", normalize=normalize,
            pad_multiple=cfg.pad_multiple, decode_on_device=decode_on_device)
        self.timeout, self.worker_priority, self.pin_memory = cfg.timeout, cfg.worker_priority, pin_memory
        self.skipped_by_shard: dict[str, dict[str, int]] = {}
        self._delivered = {w: 0 for w in range(self.dataset.num_workers)}
        self._identity = {"seed": seed, "rank": rank, "world_size": world_size, "num_workers": self.num_workers,
                          "batch_size": batch_size, "mode": "resampled" if self.resampled else "epoch",
                          "split": split, "shards": self.num_shards}

    def _check_enough_shards(self, key: str, world_size: int) -> None:
        needed = world_size * max(self.num_workers, 1)
        if self.resampled or self.num_shards >= needed:
            return
        raise ConfigError(
            f"{key}: {self.num_shards} shard(s) for {world_size} rank(s) x {max(self.num_workers, 1)} "
            f"worker(s) = {needed} readers; in epoch mode every reader needs at least one shard. "
            f"Fix: write at least {needed} shards (e.g. a smaller --samples-per-shard), set "
            f"data.num_workers={max(self.num_shards // world_size, 0)}, or set data.mode=resampled.")

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``pixel_values`` of a ``normalize=False`` batch -> the float32 the workers would have made,
        on whatever device they are."""
        return self.dataset.transform.normalize(pixels)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next ``iter()``."""
        self.dataset.epoch = epoch
        self.dataset.resume_cursor, self.dataset.finished = {}, set()
        self._delivered = {w: 0 for w in self._delivered}

    def skipped_by_reason(self) -> dict[str, int]:
        """Total skipped samples so far, by reason."""
        return by_reason(self.skipped_by_shard)

    def _raw_items(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self.dataset)
        # every draw in the workers is seeded explicitly; the loader's own generator must not consume
        # the caller's global RNG (a resumed run would otherwise draw differently from an unbroken one)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            timeout=self.timeout, persistent_workers=False, prefetch_factor=2, pin_memory=self.pin_memory,
                            worker_init_fn=functools.partial(set_worker_priority, self.worker_priority),
                            generator=torch.Generator().manual_seed(self.dataset.epoch))
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch in round-robin worker order; then the epoch advances."""
        ds = self.dataset
        pending: dict[int, deque] = {w: deque() for w in self._delivered}
        done = set(ds.finished)
        unreported: dict[str, dict[str, int]] = {}
        emitted = 0
        for item in self._raw_items():
            pending[item["_worker"]].append(item)
            while len(done) < len(pending):
                nxt = min((w for w in pending if w not in done), key=lambda w: (self._delivered[w], w))
                if not pending[nxt]:
                    break  # wait for that worker's next batch
                head = pending[nxt].popleft()
                merge_counts(self.skipped_by_shard, head["_skipped"])
                merge_counts(unreported, head["_skipped"])
                ds.resume_cursor[nxt] = head["_cursor"]
                if head.get("_end"):
                    done.add(nxt)
                    ds.finished.add(nxt)
                    continue
                self._delivered[nxt] += 1
                emitted += 1
                batch = {k: v for k, v in head.items() if not k.startswith("_")}
                batch["skipped"] = by_reason(unreported)
                unreported = {}
                yield batch
        if emitted == 0 and sum(self._delivered.values()) == 0:
            raise RuntimeError(f"epoch {ds.epoch} of {self.num_shards} shard(s) produced no batch; every sample "
                               f"was skipped: {self.skipped_by_reason()}. Check the shards (see data/README.md).")
        self.set_epoch(ds.epoch + 1)

    # -- position -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last delivered batch (plain Python types)."""
        ds = self.dataset
        return {**self._identity, "epoch": ds.epoch, "delivered": dict(self._delivered),
                "cursor": dict(ds.resume_cursor), "finished": sorted(ds.finished),
                "skipped_by_shard": {s: dict(r) for s, r in self.skipped_by_shard.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuse a state from a different stream setup."""
        changed = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a} != now {b}" for k, (a, b) in changed.items())
            raise ValueError(f"data stream state does not match this stream ({detail}); resume with the same "
                             "data/worker/batch settings, or start the data stream afresh (set_epoch).")
        ds = self.dataset
        ds.epoch = int(state["epoch"])
        ds.resume_cursor = {int(w): int(c) for w, c in state["cursor"].items()}
        ds.finished = {int(w) for w in state["finished"]}
        self._delivered = {int(w): int(n) for w, n in state["delivered"].items()}
        self.skipped_by_shard = {s: dict(r) for s, r in state["skipped_by_shard"].items()}
