"""Extra augmented views of one decoded image, made by the data workers.

Objectives declare the views they read, e.g. self-distillation's ``local: 6 x 96 px`` crops
(:meth:`SelfDistillation.views`): a :class:`ViewSpec` per name. A worker that has decoded a sample's
image (and made its clean view with :class:`~vlpretrain.data.images.ImageTransform` as today) calls
:func:`make_views` on the same PIL image; :func:`collate_views` stacks a batch. The clean view is
untouched: each view draws its crops from its own generator seeded from the sample's seed and the
view's name, never from the stream the clean crop uses, so the image-text losses see the same pixels
with or without views, and a sample's views depend only on its place in the stream (exact resume).

Views are uint8 like the clean view and normalised on the trainer's device with the same
:meth:`ImageTransform.normalize`. Wiring: the trainer passes the views of the objectives running to
``ShardStream(views=...)`` (rebuilt from its exact position when one that reads views starts:
vlpretrain/train/stream_views.py); ``ShardDataset._image`` calls ``make_views`` on the image it decoded for the
clean view, ``_batch`` adds ``collate_views(...)`` under ``batch["views"]``, and the trainer's
``_to_device`` moves and normalises ``batch["views"][name]`` (data/README.md "Extra views").
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2


@dataclass(frozen=True)
class ViewSpec:
    """``count`` random resized crops of ``size`` px covering ``scale`` of the image's area."""

    count: int
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def check(self, name: str, image_size: int) -> None:
        """A ValueError naming the view when it is empty, larger than the image or has a bad scale."""
        if self.count < 1 or not 0 < self.size <= image_size:
            raise ValueError(f"view '{name}': {self.count} x {self.size} px must be at least one crop of at most "
                             f"the image size {image_size} px; lower its size or count.")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view '{name}': scale {list(self.scale)} must be [low, high] with 0 < low <= high <= 1.")


def view_seed(sample_seed: int, name: str) -> int:
    """The seed of a view's crops: the sample's seed and a stable hash of the view's name."""
    return (sample_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def make_views(img: Image.Image, specs: dict[str, ViewSpec], sample_seed: int,
               interpolation: str = "bicubic") -> dict[str, torch.Tensor]:
    """RGB PIL image -> {name: uint8 (count, 3, size, size)} crops of that image, reproducible from the seed."""
    pixels = v2.functional.pil_to_tensor(img)  # (3, H, W) uint8, once for every view
    out = {}
    for name, spec in specs.items():
        crop = v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                                    interpolation=InterpolationMode(interpolation), antialias=True)
        generator = torch.Generator().manual_seed(view_seed(sample_seed, name))
        crops = []
        for _ in range(spec.count):
            top, left, h, w = _crop_box(pixels.shape[-2:], spec, crop, generator)
            crops.append(v2.functional.resized_crop(pixels, top, left, h, w, [spec.size, spec.size],
                                                    interpolation=crop.interpolation, antialias=True))
        out[name] = torch.stack(crops)  # (count, 3, size, size)
    return out


def _crop_box(hw, spec: ViewSpec, crop: v2.RandomResizedCrop, generator: torch.Generator):
    """torchvision's RandomResizedCrop box drawn from ``generator`` (its own draws use the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        params = crop.make_params([torch.empty(3, *hw)])
    return params["top"], params["left"], params["height"], params["width"]


def collate_views(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample views -> {name: uint8 (B, count, 3, size, size)}."""
    return {name: torch.stack([item[name] for item in items]) for name in items[0]} if items else {}
