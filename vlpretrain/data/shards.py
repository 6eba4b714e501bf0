"""The training/evaluation stream: WebDataset shards -> batches for one rank, resumable exactly.

Design (every random choice derives from the seed, the epoch and the layout or the sample's key, never timing):

1. **Shard plan.** ``epoch`` mode: all shards, shuffled by ``(seed, epoch)`` (same permutation on
   every rank), then global worker ``g = rank * num_workers + worker`` takes shards ``g, g + R*W, ...``
   so each shard is read by exactly one worker of one rank per epoch. ``resampled`` mode: each worker
   draws ``ceil(shards / (R*W))`` shards with replacement (per-source weights) for its "epoch"; the
   stream is endless because epochs follow one another, and only full batches are delivered. A worker's
   plan is a list of tasks (:mod:`vlpretrain.data.position`): a fresh epoch's are whole shards.
2. **Raw samples** (:mod:`vlpretrain.data.reader`) go through a seeded shuffle buffer holding
   *encoded* bytes (:class:`ShuffleBuffer`); bad ones are skipped and counted by reason and shard.
3. Each sample leaving the buffer has a position ``i`` in its worker's stream. Its caption draw, random
   crop, views and ``sample_seed`` (of the trainer's per-sample draws, :mod:`vlpretrain.layers.draws`) come
   from :func:`sample_rng` of ``(seed, epoch, key)``: the same in any process, worker or shard layout
   (``resampled`` mode adds ``(rank, worker, i)``: a sample may recur). Images are decoded (early JPEG
   downscaling), transformed and batched *in the worker*, captions tokenised to the batch's longest.
4. **Order.** Workers' batches are delivered round-robin (worker 0, 1, ..., 0, 1, ...; a finished
   worker drops out). PyTorch's DataLoader only approximates this when workers finish unevenly, so
   the main process re-orders into exactly this sequence (a few batches of buffering at most).
5. **Position.** Every batch carries its worker's state at that point: the task in progress and the
   sample groups of it read, the shuffle buffer's slots (by shard and group index), its RNG draws and
   its position ``i``. The main process keeps the state of each worker's last *delivered* batch; from it
   follows what is left of the worker's epoch (:func:`~vlpretrain.data.position.advance`): shards it
   finished are gone, shards read to the end keep only the samples still buffered, the shard in
   progress continues after its last read group. :meth:`ShardStream.state_dict` is one rank's share;
   :meth:`ShardStream.gather_position` joins every rank's into the world-size-independent position the
   checkpoint saves (``data_state.json``), and :meth:`ShardStream.load_position` continues it: in the
   same layout each worker refills its buffer slots from their shards and continues bit-exactly; in
   another the rest of every started epoch is dealt out to the new readers. Either way a restarted
   reader opens only the shards it still needs and passes over groups already read without keeping
   them (see data/README.md "Resuming").

The epoch reaches the workers because every epoch starts fresh worker processes (no persistent
workers: nothing accumulates across epochs). A DataLoader ``timeout`` turns a stuck worker into an
error. In ``epoch`` mode, ranks can get different numbers of batches (shards differ in size): a
multi-rank trainer should count steps, or use ``resampled`` mode, rather than rely on equal epochs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
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
from vlpretrain.data.position import (
    FORMAT, Task, WorkerPlan, advance, check_position, data_spec, distribute)
from vlpretrain.data.reader import RawSample, SkipCounter, by_reason, expand_sources, iter_shard, merge_counts
from vlpretrain.data.tokenizer import encode_captions, load_tokenizer
from vlpretrain.data.views import ViewSpec, collate_views, make_views
from vlpretrain.layers.draws import SEED_KEY

RECORD_KEYS_ENV = "VLPRETRAIN_RECORD_DATA_KEYS"
"""Debugging aid: when set (to anything), a training stream also records the keys it delivered, per epoch, in
its state and in the saved data position (``keys``), so a test can check what a run trained on across resumes."""


def plan_shards(sources: list[list[str]], *, resampled: bool, weights: list[float] | None, shuffle: bool,
                seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """The shards (indices into the sources' URLs, in order) one worker of one rank reads in one epoch."""
    slots = world_size * num_workers
    everything = list(range(sum(len(urls) for urls in sources)))
    if not resampled:
        order = _shuffled(len(everything), seed, epoch) if shuffle else everything
        return list(order[rank * num_workers + worker::slots])
    rng = random.Random(f"resample/{seed}/{epoch}/{rank}/{worker}")
    draws = math.ceil(len(everything) / slots)
    if weights is None:  # uniform over shards
        return rng.choices(everything, k=draws)
    offsets = [sum(len(urls) for urls in sources[:s]) for s in range(len(sources))]
    picks = rng.choices(range(len(sources)), weights=weights, k=draws)
    return [offsets[s] + rng.choice(range(len(sources[s]))) for s in picks]


@functools.lru_cache(maxsize=4)
def _shuffled(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Shard order of an epoch (the same on every rank); cached: every worker of every rank slices it."""
    order = list(range(n))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return tuple(order)


class ShuffleBuffer:
    """Seeded reservoir shuffle over ``(id, sample)`` items: fill ``size``, then emit a random slot per
    incoming item (which takes that slot); at the end, shuffle what is left and emit it. Its state after
    any output is the slot ids in order, the number of RNG draws and whether it is draining, so a worker
    restarted with that state (the slots refilled from their shards) continues exactly."""

    def __init__(self, size: int, rng: random.Random, slots: list[tuple[int, int]] = (), draws: int = 0,
                 draining: bool = False):
        self.size, self.rng, self.draws, self.draining = size, rng, draws, draining
        for _ in range(draws):  # the same RNG state as after those draws (they do not depend on the items)
            rng.randrange(size)
        self.items: list[tuple[tuple[int, int], RawSample]] = []
        self._expected = list(slots)

    def ids(self) -> list[tuple[int, int]]:
        return [ident for ident, _ in self.items]

    def _refill(self, items: Iterator) -> Iterator:
        """Put the saved slots back in order as their samples arrive (they come first: they were read
        first); a sample that is not one of them means the shards changed, and what is missing is dropped."""
        where = {ident: i for i, ident in enumerate(self._expected)}
        slots: list = [None] * len(self._expected)
        rest = items
        for item in items:
            i = where.pop(item[0], None)
            if i is None:
                rest = itertools.chain([item], items)
                break
            slots[i] = item
            if not where:
                break
        self.items = [item for item in slots if item is not None]
        return rest

    def __call__(self, items: Iterator) -> Iterator:
        items = self._refill(iter(items)) if self._expected else iter(items)
        if not self.draining:
            for item in items:
                if len(self.items) < self.size:
                    self.items.append(item)
                    continue
                j = self.rng.randrange(self.size)
                self.draws += 1
                out, self.items[j] = self.items[j], item
                yield out
            self.rng.shuffle(self.items)
            self.items.reverse()  # drained from the end: the shuffled order, first item first
            self.draining = True
        while self.items:
            yield self.items.pop()


class _Progress:
    """How far a worker's reader got: the task in progress and the groups of it read."""

    def __init__(self):
        self.task, self.group = 0, 0


class ShardDataset(IterableDataset):
    """One rank's samples as batches, produced inside each DataLoader worker (see module doc).

    Yields batch dicts tagged with ``_worker``/``_cursor``/``_skipped`` and, last, an end marker per
    worker; :class:`ShardStream` turns these into the ordered batches the trainer sees.
    """

    def __init__(self, sources: list[list[str]], *, transform: ImageTransform, tokenizer,
                 context_length: int, batch_size: int, resampled: bool, weights: list[float] | None,
                 shuffle: bool, buffer_size: int, seed: int, rank: int, world_size: int, num_workers: int,
                 random_caption: bool = True, normalize: bool = True, pad_multiple: int = 1,
                 decode_on_device: bool = False, views: dict[str, ViewSpec] | None = None):
        self.sources, self.transform, self.tokenizer = sources, transform, tokenizer
        self.views = dict(views or {})  # extra views made from each training sample's decoded image (data/views.py)
        self.decode_on_device = decode_on_device  # data.decode=device: JPEGs leave as bytes (device_decode)
        self.spares = SPARES if decode_on_device else 0  # next samples each batch carries, to fill bad rows
        self.pad_multiple = pad_multiple
        self.normalize_pixels = normalize  # False: uint8 pixels, normalised by the consumer
        self.random_caption = random_caption
        self.context_length, self.batch_size = context_length, batch_size
        self.resampled, self.weights, self.shuffle, self.buffer_size = resampled, weights, shuffle, buffer_size
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.urls = [url for urls in sources for url in urls]
        self.epoch = 0
        self.plans: dict[int, WorkerPlan] = {}  # worker -> its work for the rest of the epoch (ShardStream sets it)
        self.finished: set[int] = set()  # workers whose epoch was already fully delivered

    def _worker_id(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardDataset planned for {self.num_workers} workers but runs in "
                               f"{info.num_workers}; build it through ShardStream.")
        return info.id

    def _raw(self, plan: WorkerPlan, skips: SkipCounter, progress: _Progress) -> Iterator[tuple]:
        """``((task, index), sample)`` for every good sample of the plan's tasks, in reading order."""
        for t, task in enumerate(plan.tasks):
            for sample in iter_shard(self.urls[task.shard], skips, start=task.start, keep=task.keep):
                progress.task, progress.group = t, sample.index + 1
                yield (t, sample.index), sample
        progress.task, progress.group = len(plan.tasks), 0

    def _buffer(self, plan: WorkerPlan, worker: int) -> ShuffleBuffer | None:
        if not self.shuffle or self.buffer_size <= 1:
            return None
        rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        return ShuffleBuffer(self.buffer_size, rng, plan.slots, plan.draws, plan.draining)

    def _load(self, sample: RawSample, position: int, worker: int) -> tuple[Any, str, dict, int | None]:
        """The image (see :meth:`_image`), the caption, the extra views and the sample's seed (None in
        evaluation); raises :class:`BadSample`."""
        if not self.shuffle:  # evaluation: first caption, fixed transform
            return self.transform(self.transform.decode(sample.image)), sample.captions[0], {}, None
        layout = (self.rank, worker, position) if self.resampled else ()
        rng = sample_rng(self.seed, self.epoch, sample.key, layout)
        pick = int(rng.integers(len(sample.captions)))  # drawn either way: the crop seed stays the same
        caption = sample.captions[pick if self.random_caption else 0]
        crop_seed = int(rng.integers(2**62))
        seed = int(rng.integers(2**62))
        image, views = self._image(sample.image, crop_seed)
        return image, caption, views, seed

    def _image(self, data: bytes, crop_seed: int) -> tuple[Any, dict]:
        """Decoded, cropped uint8 (3, S, S) and its views ({name: uint8 (count, 3, s, s)}, each drawn from its own
        seed derived from ``crop_seed``: the clean crop is the same with or without them); with data.decode=device
        a JPEG stays ``(bytes, plan)`` (header checked, crop drawn) for the trainer's device to decode, and no
        views are made here (the trainer's objectives cut theirs on the device)."""
        if self.decode_on_device:
            plan = plan_jpeg(self.transform, data, crop_seed)
            if plan is not None:
                return (data, plan), {}
        img = self.transform.decode(data)
        views = make_views(img, self.views, crop_seed, self.transform.settings.interpolation) if self.views else {}
        return self.transform(img, seed=crop_seed), views

    def _captions(self, items: list) -> dict[str, torch.Tensor]:
        if not items:  # a batch without spares (the tokenizer refuses an empty list)
            return {"input_ids": torch.zeros((0, 2), dtype=torch.long), "attention_mask": torch.zeros((0, 2), dtype=torch.long)}
        return encode_captions(self.tokenizer, [item[1] for item in items], self.context_length, self.pad_multiple)

    def _batch(self, items: list, worker: int, cursor: int, skipped: dict) -> dict[str, Any]:
        """The batch of ``items[:batch_size]``; the rest are spares (data.decode=device only)."""
        own, spares = items[:self.batch_size], items[self.batch_size:]
        if self.decode_on_device:  # pixels decoded by the trainer (device_decode.DeviceBatches)
            batch = {"pixel_values": torch.empty((len(own), 0), dtype=torch.uint8), **self._captions(own)}
            spare_text = self._captions(spares)
            batch["encoded"] = {**pack([item[0] for item in items], self.transform.settings.size),
                                "spare_input_ids": spare_text["input_ids"],
                                "spare_attention_mask": spare_text["attention_mask"],
                                "spare_keys": [item[2] for item in spares], "shards": [item[3] for item in items],
                                "spare_seeds": _seeds(spares),
                                "pad_id": self.tokenizer.pad_token_id}
        else:
            pixels = torch.stack([item[0] for item in own])  # (B, 3, S, S) uint8
            batch = {"pixel_values": self.transform.normalize(pixels) if self.normalize_pixels else pixels,
                     **self._captions(own)}
            if self.views:  # {name: uint8 (B, count, 3, s, s)}, normalised like pixel_values
                views = collate_views([item[4] for item in own])
                batch["views"] = {k: self.transform.normalize(v) for k, v in views.items()} if self.normalize_pixels else views
        batch["keys"] = [item[2] for item in own]
        if self.shuffle:  # training: the per-sample seeds of the trainer's draws
            batch[SEED_KEY] = _seeds(own)
        batch.update(_worker=worker, _cursor=cursor, _skipped=skipped)
        return batch

    def _batch_at(self, items: list, worker: int, at: tuple) -> dict[str, Any]:
        """The batch of ``items`` with the position ``at`` = (cursor, skips, snapshot) of its last own sample
        (its spares, read after it, belong to the next batch)."""
        cursor, skipped, snapshot = at
        return {**self._batch(items, worker, cursor, skipped), "_pos": snapshot}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self._worker_id()
        skips = SkipCounter()
        plan = self.plans.get(worker, WorkerPlan())
        cursor = plan.cursor
        if worker not in self.finished:
            progress = _Progress()
            buffer = self._buffer(plan, worker)
            raw = self._raw(plan, skips, progress)
            items: list = []
            held = None  # (cursor, skips, position) at a full batch's last sample, while its spares are read
            for position, (_, sample) in enumerate(buffer(raw) if buffer else raw, start=plan.cursor):
                cursor = position + 1
                try:
                    image, caption, views, seed = self._load(sample, position, worker)
                except BadSample as bad:
                    skips.add(bad.reason, sample.shard)
                    continue
                items.append((image, caption, sample.key, sample.shard, views, seed))
                if len(items) == self.batch_size:
                    held = (cursor, skips.take(), _snapshot(progress, buffer))
                if len(items) == self.batch_size + self.spares:  # spares: the next batch's first samples
                    yield self._batch_at(items, worker, held)
                    items, held = items[self.batch_size:], None
            if held is not None:  # the stream ended while reading spares
                yield self._batch_at(items, worker, held)
                items = items[self.batch_size:]
            if items and not self.resampled:  # resampled: full batches only (samples are redrawn anyway)
                yield self._batch_at(items, worker, (cursor, skips.take(), _snapshot(progress, buffer)))
        yield {"_worker": worker, "_end": True, "_cursor": cursor, "_skipped": skips.take()}


def sample_rng(seed: int, epoch: int, key: str, layout: tuple[int, ...] = ()) -> np.random.Generator:
    """The generator of one training sample's draws (caption, crop and views, its ``sample_seed``), seeded by
    ``(seed, epoch, key)`` (the key's blake2b digest, stable across Python runs) and ``layout`` (resampled mode's
    ``(rank, worker, position)``; empty: the same draws wherever and whenever in the epoch the sample is read).
    Keys should be unique in a dataset (WebDataset's convention): samples sharing one draw alike."""
    digest = np.frombuffer(hashlib.blake2b(key.encode(), digest_size=16).digest(), dtype=np.uint32)
    return np.random.default_rng([seed, epoch, *digest.tolist(), *layout])


def _seeds(items: list) -> torch.Tensor:  # the items' sample seeds, int64 (n,)
    return torch.tensor([item[5] for item in items], dtype=torch.int64)


def _snapshot(progress: _Progress, buffer: ShuffleBuffer | None) -> dict[str, Any]:
    """The worker's state after a batch (sent with it; :func:`~vlpretrain.data.position.advance` reads it).
    Slots travel as int64 bytes: compact, and the DataLoader passes bytes through untouched."""
    ids = buffer.ids() if buffer else []
    return {"task": progress.task, "group": progress.group, "slots": np.asarray(ids, np.int64).tobytes(),
            "draws": buffer.draws if buffer else 0, "draining": buffer.draining if buffer else False}


def _slots(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {**snapshot, "slots": np.frombuffer(snapshot["slots"], np.int64).reshape(-1, 2).tolist()}


def set_worker_priority(priority: str, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: this worker's CPU priority (``data.worker_priority``)."""
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority in ("idle", "low"):
        os.nice(10)


class ShardStream:
    """Batches for one rank, one epoch per ``iter()``; resumable (``state_dict``, ``gather_position``,
    ``load_position``: module doc, point 5).

    Each batch is a dict: ``pixel_values`` (B, 3, S, S) float32 (uint8 with ``normalize=False``: then the
    consumer calls :meth:`normalize`, e.g. on its GPU after the copy), ``input_ids``/``attention_mask``
    (B, T) with T the longest caption in the batch (<= context length), ``keys`` (sample keys), in training
    ``sample_seed`` (int64 (B,), each sample's seed for the trainer's draws: :func:`sample_rng`) and
    ``skipped`` ({reason: n} newly skipped since the previous batch), and with ``views`` a ``views`` dict
    ({name: (B, count, 3, s, s)}, uint8 or float like ``pixel_values``). ``skipped_by_shard`` holds the
    running totals ({shard: {reason: n}}).
    """

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, image_size: int, context_length: int,
                 tokenizer=None, rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False,
                 normalize: bool = True, views: dict[str, ViewSpec] | None = None):
        """``pin_memory``: the loader hands over batches in page-locked memory (for a CUDA device: their copy
        to it then runs asynchronously instead of staging through the host first). ``normalize=False``: the
        workers hand over uint8 pixels (a quarter of the bytes through shared memory, pinning and the copy
        to the device, and no float pass per sample in the workers); :meth:`normalize` makes them floats.
        ``views``: extra views of each training image ({name: ViewSpec}, the objectives' declared views) that
        the workers cut from the same decoded image into ``batch["views"]`` (:mod:`vlpretrain.data.views`);
        with data.decode=device the workers decode nothing, so they make none (:attr:`views` is empty and the
        objectives cut theirs on the device)."""
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
        self.decode_on_device = decode_on_device = self.train and cfg.decode == "device"
        views = dict(views or {}) if self.train else {}
        for name, view in views.items():
            view.check(name, image_size)
        self.views = {} if decode_on_device else views  # what the workers cut (none when they decode nothing)
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
            pad_multiple=cfg.pad_multiple, decode_on_device=decode_on_device, views=self.views)
        self.timeout, self.worker_priority, self.pin_memory = cfg.timeout, cfg.worker_priority, pin_memory
        self.rank, self.world_size = rank, world_size
        self.spec = data_spec(self.sources, seed=seed, mode=cfg.mode, weights=cfg.train_weights)
        self._layout = {"world_size": world_size, "num_workers": self.dataset.num_workers, "batch_size": batch_size,
                        "shuffle_buffer": cfg.shuffle_buffer}
        self.skipped_by_shard: dict[str, dict[str, int]] = {}
        self.carry: dict[int, list[Task]] = {}  # epochs planned from a saved remainder instead of from scratch
        self._snaps: dict[int, tuple[dict, int]] = {}  # worker -> (its snapshot, cursor) at its last delivered batch
        self._delivered: dict[int, int] = {}
        self._keys: dict[str, list[str]] | None = {} if self.train and os.environ.get(RECORD_KEYS_ENV) else None
        self.set_epoch(0)

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
        ds = self.dataset
        ds.epoch, ds.finished, ds.plans = epoch, set(), self._plan(epoch, self.rank)
        self._snaps, self._delivered = {}, {w: 0 for w in range(ds.num_workers)}

    def _plan(self, epoch: int, rank: int) -> dict[int, WorkerPlan]:
        """Each worker's plan for a whole ``epoch`` on ``rank``: dealt from a carried remainder, or planned."""
        ds, workers = self.dataset, self.dataset.num_workers
        if epoch in self.carry:
            dealt = distribute(self.carry[epoch], self.world_size, workers)
            return {w: WorkerPlan(dealt[rank * workers + w]) for w in range(workers)}
        return {w: WorkerPlan([Task(i, 0) for i in plan_shards(
            self.sources, resampled=ds.resampled, weights=ds.weights, shuffle=ds.shuffle, seed=ds.seed, epoch=epoch,
            rank=rank, world_size=self.world_size, worker=w, num_workers=workers)]) for w in range(workers)}

    def _current_plans(self) -> dict[int, WorkerPlan]:
        """Each worker's plan from its last delivered batch on (finished workers: nothing left)."""
        ds = self.dataset
        plans = {}
        for w, plan in ds.plans.items():
            if w in ds.finished:
                plans[w] = WorkerPlan(cursor=plan.cursor)
            elif w in self._snaps:
                snapshot, cursor = self._snaps[w]
                plans[w] = advance(plan, _slots(snapshot), cursor)
            else:
                plans[w] = plan
        return plans

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
        ds.plans, self._snaps = self._current_plans(), {}  # workers (re)start from the last delivered batch
        has_work = any(plan.tasks or plan.slots for w, plan in ds.plans.items() if w not in ds.finished)
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
                if head.get("_end"):
                    done.add(nxt)
                    ds.finished.add(nxt)
                    ds.plans[nxt] = WorkerPlan(cursor=head["_cursor"])
                    continue
                self._snaps[nxt] = (head["_pos"], head["_cursor"])
                self._delivered[nxt] += 1
                emitted += 1
                batch = {k: v for k, v in head.items() if not k.startswith("_")}
                batch["skipped"] = by_reason(unreported)
                unreported = {}
                if self._keys is not None:
                    self._keys.setdefault(str(ds.epoch), []).extend(batch["keys"])
                yield batch
        if emitted == 0 and not any(self._delivered.values()) and has_work:
            raise RuntimeError(f"epoch {ds.epoch} of {self.num_shards} shard(s) produced no batch; every sample "
                               f"was skipped: {self.skipped_by_reason()}. Check the shards (see data/README.md).")
        self.set_epoch(ds.epoch + 1)

    # -- position (see vlpretrain.data.position and data/README.md) ----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the position after its last delivered batch (plain Python types). The
        checkpoint gathers every rank's and :meth:`gather_position` makes the one saved position of them."""
        plans = self._current_plans()
        state = {"format": FORMAT, "rank": self.rank, **self._layout, "epoch": self.dataset.epoch,
                 "workers": [{**plans[w].to_json(), "delivered": self._delivered[w],
                              "finished": w in self.dataset.finished} for w in sorted(plans)],
                 "carry": {str(e): [t.to_json() for t in tasks] for e, tasks in self.carry.items()},
                 "skipped_by_shard": {s: dict(r) for s, r in self.skipped_by_shard.items()}}
        if self._keys is not None:
            state["keys"] = {e: list(k) for e, k in self._keys.items()}
        return state

    def gather_position(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The world-size-independent data position of every rank's :meth:`state_dict` (in rank order,
        all taken in this stream's layout): per started epoch, the remaining tasks (epoch mode), the skip
        counts, and the ranks' own states for a resume in the same layout."""
        lo, hi = min(s["epoch"] for s in states), max(s["epoch"] for s in states)
        remaining: dict[int, list[Task]] = {}
        if not self.resampled:
            for e in range(lo, hi + 1):
                remaining[e] = []
                for r, s in enumerate(states):
                    if s["epoch"] == e:  # its workers' plans are what is left of their part of the epoch
                        remaining[e] += [Task.from_json(t) for w in s["workers"] for t in w["tasks"]]
                    elif s["epoch"] < e:  # not started on this epoch yet: all of its part is left
                        remaining[e] += [t for plan in self._plan(e, r).values() for t in plan.tasks]
            remaining.update({e: tasks for e, tasks in self.carry.items() if e > hi})
        skipped: dict[str, dict[str, int]] = {}
        keys: dict[str, list[str]] = {}
        for s in states:
            merge_counts(skipped, s["skipped_by_shard"])
            for e, k in s.get("keys", {}).items():
                keys.setdefault(e, []).extend(k)
        layout = {k: v for k, v in self._layout.items()}
        position = {"format": FORMAT, "spec": self.spec, "epoch": lo,
                    "remaining": {str(e): [t.to_json() for t in tasks] for e, tasks in sorted(remaining.items())},
                    "skipped_by_shard": skipped,
                    "exact": {**layout, "carry": {str(e): [t.to_json() for t in tasks]
                                                  for e, tasks in self.carry.items() if e > lo},
                              "ranks": [{k: s[k] for k in ("epoch", "workers", "skipped_by_shard", "keys") if k in s}
                                        for s in states]}}
        if self._keys is not None:
            position["keys"] = keys
        return position

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the last batch delivered by the stream whose :meth:`state_dict` this is, same
        rank and layout (train/stream_views.py); what its workers made but did not deliver is read again."""
        layout = {k: state[k] for k in self._layout}
        if layout != self._layout or state["rank"] != self.rank:
            raise ValueError(f"a stream state of rank {state['rank']} in layout {layout} cannot continue in rank "
                             f"{self.rank} of layout {self._layout}; use gather_position/load_position.")
        self._continue(state, state["carry"])

    def _continue(self, mine: dict[str, Any], carry: dict[str, list]) -> None:
        """This rank's state (workers' plans, counts, carried epochs) from a state in this stream's layout."""
        ds = self.dataset
        self.carry = {int(e): [Task.from_json(t) for t in tasks] for e, tasks in carry.items()}
        ds.epoch, self._snaps = int(mine["epoch"]), {}
        ds.plans = {w: WorkerPlan.from_json(x) for w, x in enumerate(mine["workers"])}
        ds.finished = {w for w, x in enumerate(mine["workers"]) if x["finished"]}
        self._delivered = {w: int(x["delivered"]) for w, x in enumerate(mine["workers"])}
        self.skipped_by_shard = {s: dict(r) for s, r in mine["skipped_by_shard"].items()}
        if self._keys is not None:
            self._keys = {e: list(k) for e, k in mine.get("keys", {}).items()}

    def check_position(self, position: dict[str, Any], source: str = "the data position") -> None:
        """A ConfigError naming the reason and the fix when ``position`` cannot continue in this stream."""
        check_position(position, self.spec, source)

    def load_position(self, position: dict[str, Any], source: str = "the data position") -> str:
        """Continue from ``position`` (:meth:`gather_position`'s). In the layout it was saved in (processes,
        workers, batch size, shuffle buffer), each worker continues exactly ("exact"); in another, the rest of
        each started epoch is dealt out to this layout's readers ("redistributed"; resampled mode: new draws
        from the next epoch on, see data/README.md). Returns which of the two it did."""
        self.check_position(position, source)
        exact = position["exact"]
        if all(exact[k] == v for k, v in self._layout.items()):
            self._continue(exact["ranks"][self.rank], exact["carry"])
            return "exact"
        first = self.rank == 0  # the running totals go to one rank, so that summing over ranks stays right
        self.skipped_by_shard = {s: dict(r) for s, r in position["skipped_by_shard"].items()} if first else {}
        if self._keys is not None:
            self._keys = {e: list(k) for e, k in position.get("keys", {}).items()} if first else {}
        if self.resampled:  # draws with replacement: nothing is owed, so the new layout draws afresh
            self.carry = {}
            self.set_epoch(max(r["epoch"] for r in exact["ranks"]) + 1)
        else:
            self.carry = {int(e): [Task.from_json(t) for t in tasks] for e, tasks in position["remaining"].items()}
            self.set_epoch(int(position["epoch"]))
        return "redistributed"
