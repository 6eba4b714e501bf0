"""``data.decode: device``: JPEGs decoded in batches on the trainer's device (nvJPEG on CUDA).

With ``cpu`` decoding (the default) the DataLoader workers decode, crop and resize every image; on a
GPU node their CPUs, not the model, bound the step (issue 22: 12 workers on an H200 made ~2260 samples/s
for a model that eats ~4490). With ``device`` the work splits in two:

**Worker** (:func:`plan_jpeg`, :func:`pack`): I/O, the shuffle, the header checks (``max_image_pixels``,
format) and the caption tokenisation, as before, and the crop parameters: drawn from the same seeded RNG
and on the same (DCT-draft-sized, upright) image size as the ``cpu`` path, so a sample gets the same
crop in either mode and a resumed run the same crops as an unbroken one. A JPEG that ``decode_jpeg``
decodes (baseline or progressive, RGB or greyscale) travels as its raw bytes with its plan (crop box,
flip, EXIF orientation, draft scale); anything else (PNG, WebP, CMYK/YCCK or 12-bit JPEG) is decoded in
the worker by the ``cpu`` path and travels as pixels.

**Trainer** (:class:`DeviceBatches`): the batch's JPEGs are decoded by one batched
``torchvision.io.decode_jpeg(list, device=...)`` call, then each is shrunk like the ``cpu`` path's draft
where that applies (:func:`draft_like`), turned upright (EXIF), cropped,
resized (antialiased bicubic) and flipped there with ``torchvision.transforms.v2.functional``; the
trainer then normalises the uint8 batch as it does for worker-decoded batches. On a CPU-only machine the
same code runs with ``device=cpu``, the batch split over ``torch.get_num_threads()`` threads (the
decoder and the resize release the GIL), which is what the tests exercise.

**Bad JPEGs.** A batched call fails as a whole, so then each image is retried alone on the device, and
one that fails there is retried on the CPU with PIL; one that fails both is skipped and counted as
``undecodable_image`` (the reader's reason, in the batch's ``skipped`` and so the trainer's
``skipped/*`` figures, and in the stream's running totals). Its row is filled so the batch keeps its
size: the contrastive all-gather needs equal batches on every rank, and a compiled or CUDA-graph step
one shape. The filler is a *spare*: each worker batch carries the next :data:`SPARES` samples of its
worker's stream (bytes and tokens only; they are the first samples of the worker's next batch, where
they train again), so a bad JPEG costs one sample seen twice and never a batch, a step size or a
collective. A spare is decoded only when needed, and a spare that fails is not counted (its own batch
counts it). Only a worker's last batch of an epoch has fewer spares; if those run out the row repeats
the batch's first good row (counted in :attr:`DeviceBatches.repeated_rows`).

Why ``torchvision.io.decode_jpeg`` and not TorchCodec although torchvision 0.29 deprecates its decoders:
TorchCodec is not installed here or on the lent GPU machine (offline, torch 2.11); its wheels are built
against one torch and one CUDA major (the PyPI 0.16 one links CUDA 13), and its ``decode_jpeg`` takes the
same list and ``device`` arguments, so :func:`_decode_jpeg` is the one line to change when torchvision
drops its decoders. The deprecation warning is silenced for that call only.

The shift in pixels between modes: none where the ``cpu`` path decodes at full size (both use
libjpeg-turbo's default IDCT and upsampling on the CPU; nvJPEG is within a grey level). Where a stored
image is at least twice the size the crop needs, the ``cpu`` path decodes it DCT-downscaled (PIL draft)
and the device path decodes it whole and averages the same blocks (:func:`draft_like`): the same crop
box, pixels that differ by the two ways of shrinking (about a grey level on average).
``vlpretrain make-shards --resize`` stores images at training size, which makes that case rare.
"""

from __future__ import annotations

import io
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlpretrain.data.images import BadSample, ImageTransform, to_rgb
from vlpretrain.data.reader import merge_counts

SPARES = 2  # samples of the worker's next batch each batch carries, to fill rows of undecodable JPEGs
_ORIENTATION = 0x0112  # EXIF tag
_DEVICE_MODES = ("RGB", "L")  # PIL modes of the JPEGs decode_jpeg(mode=RGB) decodes like PIL does


# ---------------------------------------------------------------------------------------------------
# worker side


def plan_jpeg(transform: ImageTransform, data: bytes, seed: int) -> tuple[int, ...] | None:
    """A JPEG the device decodes -> its plan ``(top, left, height, width, flip, orientation, scale)``: the
    crop :meth:`ImageTransform.crop_params` draws for ``seed`` on the upright image at the size the ``cpu``
    path decodes it (PIL draft: stored size / ``scale``, scale 1, 2, 4 or 8), with its EXIF orientation;
    None for anything else (the caller decodes it on the CPU). Raises :class:`BadSample` for an
    unreadable or too-large header, exactly like the ``cpu`` path."""
    img = transform.open_header(data, draft=False)
    if img.format != "JPEG" or img.mode not in _DEVICE_MODES:
        return None
    orientation = img.getexif().get(_ORIENTATION, 1)
    orientation = orientation if orientation in range(2, 9) else 1  # what ImageOps.exif_transpose applies
    stored_w = img.size[0]
    transform.draft(img)
    draft_w, draft_h = img.size
    scale = next(s for s in (1, 2, 4, 8) if -(-stored_w // s) == draft_w)  # libjpeg: ceil(side / scale)
    if orientation >= 5:  # 5-8 transpose: the upright picture is the stored one turned on its side
        draft_w, draft_h = draft_h, draft_w
    top, left, height, width, flip = transform.crop_params(draft_h, draft_w, seed)
    return top, left, height, width, int(flip), orientation, scale


def pack(rows: list, size: int) -> dict[str, Any]:
    """Worker side: the images of a batch's rows (own rows, then spares), each either ``(bytes, plan)``
    from :func:`plan_jpeg` or worker-decoded uint8 (3, S, S) pixels -> the batch's ``encoded`` part:
    the JPEG bytes in one tensor (one shared-memory block, not one per image) with offsets."""
    jpeg_rows = [r for r, row in enumerate(rows) if isinstance(row, tuple)]
    pixel_rows = [r for r, row in enumerate(rows) if not isinstance(row, tuple)]
    blobs = [rows[r][0] for r in jpeg_rows]
    offsets = torch.tensor([0, *(len(b) for b in blobs)], dtype=torch.long).cumsum(0)  # (J + 1,)
    return {
        "jpeg_data": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if blobs
        else torch.empty(0, dtype=torch.uint8),
        "jpeg_offsets": offsets,
        "jpeg_plans": torch.tensor([rows[r][1] for r in jpeg_rows], dtype=torch.long).reshape(-1, 7),  # (J, 7)
        "jpeg_rows": torch.tensor(jpeg_rows, dtype=torch.long),
        "pixels": torch.stack([rows[r] for r in pixel_rows]) if pixel_rows
        else torch.empty((0, 3, size, size), dtype=torch.uint8),  # (P, 3, S, S)
        "pixel_rows": torch.tensor(pixel_rows, dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------
# trainer side


def _decode_jpeg(data, device: torch.device):
    """torchvision's (batched on a list) JPEG decoder to RGB uint8 (3, H, W) on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_pil(data: torch.Tensor) -> torch.Tensor | None:
    """The CPU retry: PIL, full size, no EXIF turn (applied afterwards like the device's output)."""
    try:
        img = Image.open(io.BytesIO(data.numpy().tobytes()))
        img.load()
        return torch.from_numpy(np.asarray(to_rgb(img)).copy()).permute(2, 0, 1)  # (3, H, W)
    except Exception:  # noqa: BLE001 - any failure means the sample cannot be decoded
        return None


def draft_like(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, ceil(H / scale), ceil(W / scale)): the mean of each scale x scale block (the
    last ones partial), what libjpeg's DCT scaling computes up to its rounding, so the crop the worker drew
    on the draft-sized image applies unchanged and the pixels stay close to the cpu path's."""
    if scale == 1:
        return pixels
    shrunk = torch.nn.functional.avg_pool2d(pixels[None].float(), scale, ceil_mode=True, count_include_pad=False)
    return shrunk[0].round_().clamp_(0, 255).to(torch.uint8)


def upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored -> as displayed under EXIF ``orientation`` (ImageOps.exif_transpose's turns)."""
    if orientation in (2, 3, 4):  # mirror, rotate 180, flip
        return pixels.flip({2: [-1], 3: [-2, -1], 4: [-2]}[orientation])
    if orientation >= 5:  # transpose, rotate 270, transverse, rotate 90
        turned = pixels.transpose(-2, -1)
        return {5: turned, 6: turned.flip(-1), 7: turned.flip([-2, -1]), 8: turned.flip(-2)}[orientation]
    return pixels


class DeviceBatches:
    """Trainer side: a stream's ``data.decode=device`` batch -> the same batch with ``pixel_values``
    uint8 (B, 3, S, S) on ``device`` (a ``cpu``-mode batch passes through untouched).

    Mutates the batch's ``skipped`` ({reason: n}) and the stream's ``skipped_by_shard`` with the
    samples it could not decode, so they are counted with the reader's."""

    def __init__(self, stream, device: torch.device | str):
        self.stream, self.device = stream, torch.device(device)
        self.transform: ImageTransform = stream.dataset.transform
        self.threads = 1 if self.device.type != "cpu" else max(1, torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None  # started at the first batch that needs it
        self.repeated_rows = 0  # rows filled by repeating a good row: no spare was left

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        enc = batch.get("encoded")
        if enc is None:
            return batch
        size = len(batch["pixel_values"])  # a (B, 0) placeholder: the rows are decoded here
        images = self._own_rows(enc, size)
        failed = [r for r in range(size) if images[r] is None]
        self._count(batch, [enc["shards"][r] for r in failed])
        source = self._fill(images, enc, size, failed)
        out = {k: v for k, v in batch.items() if k != "encoded"}
        out["pixel_values"] = torch.stack([images[source[r]].to(self.device, non_blocking=True) for r in range(size)])
        out["keys"] = [(batch["keys"] + enc["spare_keys"])[source[r]] for r in range(size)]
        if "sample_seed" in batch:  # a filled row draws as its sample does (the spare's or the repeated row's)
            out["sample_seed"] = torch.cat([batch["sample_seed"], enc["spare_seeds"]])[source]
        if failed:
            out.update(_text_rows(batch, enc, source, size))
        return out

    # -- decoding ---------------------------------------------------------------------------------
    def _jobs(self, enc: dict, rows: list[int]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        where = {int(r): j for j, r in enumerate(enc["jpeg_rows"])}
        offsets, data = enc["jpeg_offsets"].tolist(), enc["jpeg_data"]
        return [(data[offsets[where[r]]:offsets[where[r] + 1]], tuple(enc["jpeg_plans"][where[r]].tolist()))
                for r in rows]

    def _own_rows(self, enc: dict, size: int) -> list[torch.Tensor | None]:
        images: list[torch.Tensor | None] = [None] * (size + len(enc["spare_keys"]))
        for r, pixels in zip(enc["pixel_rows"].tolist(), enc["pixels"]):
            images[r] = pixels
        own = [r for r in enc["jpeg_rows"].tolist() if r < size]
        for r, image in zip(own, self.decode(self._jobs(enc, own))):
            images[r] = image
        return images

    def decode(self, jobs: list[tuple[torch.Tensor, tuple[int, ...]]]) -> list[torch.Tensor | None]:
        """(JPEG bytes (N,) uint8 on the CPU, plan from :func:`plan_jpeg`) -> uint8 (3, S, S) on the
        device, or None where neither the device nor PIL could decode it."""
        return self._in_chunks(self._decode_chunk, jobs)

    def decode_only(self, jobs: list[tuple[torch.Tensor, tuple[int, ...]]]) -> list[torch.Tensor | None]:
        """:meth:`decode` without the turn and crop: uint8 (3, H, W) as stored (tools/bench_stages.py)."""
        return self._in_chunks(self._decode_all, jobs)

    def _in_chunks(self, fn, jobs: list) -> list:
        """``fn`` over ``jobs``: one call on an accelerator (one batched decode), one per thread on a CPU."""
        if not jobs:
            return []
        if self.threads == 1 or len(jobs) < 2:
            return fn(jobs)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="device-decode")
        step = math.ceil(len(jobs) / self.threads)
        return [out for part in self._pool.map(fn, [jobs[i:i + step] for i in range(0, len(jobs), step)]) for out in part]

    def _decode_all(self, jobs: list) -> list[torch.Tensor | None]:
        try:
            return _decode_jpeg([data for data, _ in jobs], self.device)  # one batched call
        except Exception:  # noqa: BLE001 - the batched call fails as a whole: find the bad ones alone
            return [self._decode_alone(data) for data, _ in jobs]

    def _decode_chunk(self, jobs: list) -> list[torch.Tensor | None]:
        decoded = self._decode_all(jobs)
        return [None if image is None else self._finish(image, plan) for image, (_, plan) in zip(decoded, jobs)]

    def _decode_alone(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return _decode_jpeg(data, self.device)
        except Exception:  # noqa: BLE001 - rejected by the device decoder: PIL on the CPU has the last word
            image = _decode_pil(data)
            return None if image is None else image.to(self.device)

    def _finish(self, image: torch.Tensor, plan: tuple[int, ...]) -> torch.Tensor:
        """Decoded (3, H, W) -> the planned crop: shrunk like the cpu path's DCT draft, turned upright, cropped."""
        top, left, height, width, flip, orientation, scale = plan
        return self.transform.apply_crop(upright(draft_like(image, scale), orientation),
                                         (top, left, height, width, bool(flip)))

    # -- bad rows -----------------------------------------------------------------------------------
    def _count(self, batch: dict, shards: list[str]) -> None:
        if not shards:
            return
        counts: dict[str, dict[str, int]] = {}
        for shard in shards:
            merge_counts(counts, {shard: {"undecodable_image": 1}})
        merge_counts(self.stream.skipped_by_shard, counts)
        skipped = batch.setdefault("skipped", {})
        skipped["undecodable_image"] = skipped.get("undecodable_image", 0) + len(shards)

    def _fill(self, images: list, enc: dict, size: int, failed: list[int]) -> list[int]:
        """Row -> the row (own or spare) whose sample it trains on; decodes spares as needed."""
        source = list(range(size))
        spares = iter(range(size, len(images)))
        jpeg_rows = set(enc["jpeg_rows"].tolist())
        for r in failed:
            for s in spares:
                if images[s] is None and s in jpeg_rows:
                    images[s] = self.decode(self._jobs(enc, [s]))[0]
                if images[s] is not None:
                    source[r] = s
                    break
            else:
                good = next((g for g in range(size) if images[g] is not None), None)
                if good is None:
                    raise BadSample("undecodable_image", "no image of a whole batch and its spares decodes")
                source[r] = good
                self.repeated_rows += 1
        return source


def _text_rows(batch: dict, enc: dict, source: list[int], size: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` with filled rows taken from the spares (as wide as the wider of
    the batch's and the spares' padding, each already rounded to data.pad_multiple)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
    spare_ids, spare_mask = enc["spare_input_ids"], enc["spare_attention_mask"]  # (K, T')
    width = max(ids.shape[1], spare_ids.shape[1])
    out_ids = torch.full((size, width), int(enc["pad_id"]), dtype=ids.dtype)
    out_mask = torch.zeros((size, width), dtype=mask.dtype)
    for r, s in enumerate(source):
        src_ids, src_mask = (ids[s], mask[s]) if s < size else (spare_ids[s - size], spare_mask[s - size])
        out_ids[r, :src_ids.shape[0]], out_mask[r, :src_mask.shape[0]] = src_ids, src_mask
    return {"input_ids": out_ids, "attention_mask": out_mask}
