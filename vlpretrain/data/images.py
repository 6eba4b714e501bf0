"""Image decoding and transforms: the one place where bytes become normalised pixels.

Decoding reads the header first (size check before any pixel is decoded), asks the JPEG decoder for
a reduced-size image when the target is much smaller (PIL ``draft``: DCT scaling, 2-8x less work),
applies the EXIF orientation and converts every mode to RGB (alpha composited on white, 16-bit
greyscale scaled, CMYK/palette converted). Transforms are torchvision's, applied to uint8 tensors
(torch's antialiased uint8 resize is vectorised): random resized crop for training (no flip unless
asked: captions say left and right), resize + centre crop for evaluation. Workers produce uint8
tensors; :meth:`ImageTransform.normalize` turns a whole batch into floats at once, in the worker or,
for the trainer, on its device after the copy (a quarter of the bytes to move; no float pass in workers).

The same :class:`ImageTransform` serves the training pipeline and :class:`VLProcessor`.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageSettings:
    """Everything that defines the image side of the input (saved with a processor)."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    max_pixels: int = 89_478_485
    interpolation: str = field(default="bicubic")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> ImageSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit greyscale scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)  # (H, W) 16-bit range
        img = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")


class ImageTransform:
    """Bytes or PIL image -> uint8 (3, S, S) tensor; batches -> normalised float.

    ``train=True``: random resized crop (+ optional flip) driven by a per-sample seed, so a sample's
    augmentation depends only on where it sits in the stream (exact resume). ``train=False``:
    resize the shorter side to S, centre crop S x S.
    """

    def __init__(self, settings: ImageSettings, train: bool):
        self.settings = settings
        self.train = train
        s = settings
        interp = InterpolationMode(s.interpolation)
        self._interpolation = interp
        self._random_crop = v2.RandomResizedCrop(s.size, scale=s.crop_scale, ratio=s.crop_ratio,
                                                 interpolation=interp, antialias=True)
        if train:
            steps = [self._random_crop]
            if s.hflip:
                steps.append(v2.RandomHorizontalFlip())
            # smallest crop side is sqrt(min area) of the image side: decode at least size/sqrt(low)
            self.decode_side = math.ceil(s.size / math.sqrt(s.crop_scale[0]))
        else:
            steps = [v2.Resize(s.size, interpolation=interp, antialias=True), v2.CenterCrop(s.size)]
            self.decode_side = s.size
        # to a uint8 tensor first: torch's vectorised antialiased uint8 resize is ~3x faster than PIL's
        self.transform = v2.Compose([v2.PILToTensor(), *steps])
        mean, std = torch.tensor(s.mean).view(1, 3, 1, 1), torch.tensor(s.std).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        scale, shift = 1.0 / (255.0 * std), mean / std  # (x / 255 - mean) / std = x * scale - shift
        self._affine = {torch.device("cpu"): (scale, shift)}  # per device: copied there once, never per batch

    # -- decoding -------------------------------------------------------------------------------
    def open_header(self, data: bytes, draft: bool = True) -> Image.Image:
        """The image with only its header read, checked against ``max_pixels``; with ``draft`` set to
        decode at the reduced size the transform needs (:meth:`draft`). Raises :class:`BadSample`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))  # reads the header only
            except Image.DecompressionBombError as exc:
                raise BadSample("image_too_large", str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - any unreadable header is a bad sample
                raise BadSample("undecodable_image", f"{type(exc).__name__}: {exc}") from None
        if img.width * img.height > self.settings.max_pixels:
            raise BadSample("image_too_large", f"{img.width}x{img.height} pixels > "
                            f"max_image_pixels={self.settings.max_pixels}")
        if draft:
            self.draft(img)
        return img

    def draft(self, img: Image.Image) -> None:
        """A header-only JPEG set to decode at a reduced size (PIL ``draft``: DCT scaling by 1/2, 1/4 or 1/8,
        never below ``decode_side``); ``img.size`` is then that size. Other formats are left alone."""
        if img.format == "JPEG":
            img.draft("RGB", (self.decode_side, self.decode_side))

    def decode(self, data: bytes) -> Image.Image:
        """Header check, early-downscaled decode, EXIF orientation, RGB. Raises :class:`BadSample`."""
        img = self.open_header(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
                raise BadSample("undecodable_image", f"{type(exc).__name__}: {exc}") from None

    def prepare(self, img: Image.Image) -> Image.Image:
        """A caller's PIL image -> RGB with EXIF orientation applied (what :meth:`decode` returns)."""
        return to_rgb(ImageOps.exif_transpose(img))

    # -- transforms -----------------------------------------------------------------------------
    def __call__(self, img: Image.Image, seed: int | None = None) -> torch.Tensor:
        """RGB PIL image -> uint8 (3, S, S). ``seed`` fixes the random crop (training)."""
        if not self.train or seed is None:
            return self.transform(img)
        pixels = v2.functional.pil_to_tensor(img)  # (3, H, W) uint8
        return self.apply_crop(pixels, self.crop_params(*pixels.shape[-2:], seed=seed))

    def crop_params(self, height: int, width: int, seed: int) -> tuple[int, int, int, int, bool]:
        """The training crop of an image of ``height`` x ``width`` (as decoded, upright) for ``seed``:
        (top, left, crop height, crop width, flip), the draws of torchvision's RandomResizedCrop (and
        RandomHorizontalFlip with ``hflip``). The worker draws them; :meth:`apply_crop` (in the worker, or
        on the trainer's device with data.decode=device) applies them."""
        shape_only = torch.empty((), dtype=torch.uint8).expand(3, height, width)  # no pixels allocated
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also pokes accelerators
            box = self._random_crop.make_params([shape_only])
            flip = self.settings.hflip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)'s draw
        return box["top"], box["left"], box["height"], box["width"], flip

    def apply_crop(self, pixels: torch.Tensor, params: tuple[int, int, int, int, bool]) -> torch.Tensor:
        """uint8 (3, H, W) on any device -> the crop ``params`` resized to uint8 (3, S, S) there."""
        top, left, height, width, flip = params
        size = self.settings.size
        out = v2.functional.resized_crop(pixels, top, left, height, width, [size, size],
                                         interpolation=self._interpolation, antialias=True)
        return v2.functional.horizontal_flip(out) if flip else out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float32 (B, 3, S, S), scaled to [0, 1] then standardised, on the device
        ``pixels`` are on (the same float32 operations everywhere, so the same numbers)."""
        if pixels.device not in self._affine:
            self._affine[pixels.device] = tuple(t.to(pixels.device) for t in self._affine[torch.device("cpu")])
        scale, shift = self._affine[pixels.device]
        return pixels.float().mul_(scale).sub_(shift)  # two in-place passes
