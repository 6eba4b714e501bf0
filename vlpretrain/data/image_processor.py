"""``VLImageProcessor``: a transformers image processor running the training pipeline's eval transform.

It saves and loads with ``CLIPImageProcessor``'s keys (``size.shortest_edge``, ``crop_size``,
``resample``, ``image_mean``/``image_std``, ``rescale_factor``, ``do_*``), so tools that read those keys
understand it, while the pixels come from the one :class:`~vlpretrain.data.images.ImageTransform` the
evaluation stream uses (resize the shorter side with antialiasing, centre crop, normalise): the same
numbers as the stream, which CLIP's own resize does not give. Training-only settings (random crop range,
flip) ride along under ``train_*`` keys so a saved processor keeps every :class:`ImageSettings` field.

Accepted images: PIL images, file paths (decoded as the data pipeline decodes bytes), and uint8 (0-255) or
float (0-1) numpy arrays / torch tensors, channels last (H, W, C) or first (C, H, W), one image or a batch.
Arrays and tensors go through PIL, so ``np.array(img)`` gives exactly the pixels of ``img``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import PILImageResampling

from vlpretrain.data.images import ImageSettings, ImageTransform

_FIXED_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def _side(value, name: str) -> int | None:
    """``size`` / ``crop_size`` as transformers writes them (int, ``shortest_edge``, square height/width)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ValueError(f"{name}={value!r} is not supported: the model reads square images; give an int, "
                     "{'shortest_edge': S} or {'height': S, 'width': S}.")


class VLImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` (B, 3, S, S) float32, normalised as in training."""

    model_input_names = ["pixel_values"]

    def __init__(self, size=None, crop_size=None, resample=None, image_mean=None, image_std=None,
                 rescale_factor: float = 1 / 255, max_pixels: int | None = None, train_crop_scale=None,
                 train_crop_ratio=None, train_hflip: bool | None = None, **kwargs):
        for step in _FIXED_STEPS:
            if kwargs.pop(step, True) is not True:
                raise ValueError(f"{step}=False is not supported: the model was trained on images resized, "
                                 "centre-cropped, scaled to [0, 1] and normalised; feed it the same.")
        if abs(rescale_factor - 1 / 255) > 1e-12:
            raise ValueError(f"rescale_factor={rescale_factor} is not supported: pixels are scaled by 1/255.")
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        side, crop = _side(size, "size"), _side(crop_size, "crop_size")
        if side is not None and crop is not None and side != crop:
            raise ValueError(f"size {side} and crop_size {crop} differ: the eval transform resizes the shorter side "
                             "to the crop size; give one size.")
        given = {"size": side if side is not None else crop, "mean": image_mean, "std": image_std,
                 "max_pixels": max_pixels, "crop_scale": train_crop_scale, "crop_ratio": train_crop_ratio,
                 "hflip": train_hflip,
                 "interpolation": None if resample is None else PILImageResampling(resample).name.lower()}
        self.settings = ImageSettings.from_dict({k: v for k, v in given.items() if v is not None})
        self.transform = ImageTransform(self.settings, train=False)

    @classmethod
    def from_settings(cls, settings: ImageSettings) -> VLImageProcessor:
        return cls(**cls._keys(settings))

    @staticmethod
    def _keys(s: ImageSettings) -> dict:
        return {"size": {"shortest_edge": s.size}, "crop_size": {"height": s.size, "width": s.size},
                "resample": int(PILImageResampling[s.interpolation.upper()]), "image_mean": list(s.mean),
                "image_std": list(s.std), "rescale_factor": 1 / 255, "max_pixels": s.max_pixels,
                "train_crop_scale": list(s.crop_scale), "train_crop_ratio": list(s.crop_ratio), "train_hflip": s.hflip}

    # attribute views in transformers' names (read by tools written for CLIPImageProcessor)
    size = property(lambda self: {"shortest_edge": self.settings.size})
    crop_size = property(lambda self: {"height": self.settings.size, "width": self.settings.size})
    image_mean = property(lambda self: list(self.settings.mean))
    image_std = property(lambda self: list(self.settings.std))
    resample = property(lambda self: int(PILImageResampling[self.settings.interpolation.upper()]))

    def to_dict(self) -> dict:
        out = {"image_processor_type": type(self).__name__, **{step: True for step in _FIXED_STEPS},
               **self._keys(self.settings)}
        if getattr(self, "auto_map", None):
            out["auto_map"] = self.auto_map
        return out

    # -- images -------------------------------------------------------------------------------
    def to_pil(self, image) -> Image.Image:
        """One image (PIL, path, array or tensor) -> RGB PIL image, as the data pipeline would decode it."""
        if isinstance(image, (str, Path)):
            return self.transform.decode(Path(image).read_bytes())
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
                image = image.permute(1, 2, 0)  # torchvision's (C, H, W) -> (H, W, C)
            image = image.numpy()
        if isinstance(image, np.ndarray):
            image = Image.fromarray(self._uint8_hwc(image))
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL images, file paths, numpy arrays or torch tensors, not "
                            f"{type(image).__name__}.")
        return self.transform.prepare(image)

    @staticmethod
    def _uint8_hwc(arr: np.ndarray) -> np.ndarray:
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"an image array has shape {arr.shape}; expected (H, W), (H, W, C) or (C, H, W) "
                             "with C in 1, 3, 4.")
        if arr.dtype == np.uint8:
            return arr
        if np.issubdtype(arr.dtype, np.floating):
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ValueError("a float image array must hold values in [0, 1]; pass uint8 for 0-255 pixels.")
            return np.round(arr * 255).astype(np.uint8)
        raise ValueError(f"image arrays must be uint8 (0-255) or float (0-1), not {arr.dtype}.")

    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)  # a (B, ...) batch
        return [images]

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        """Images -> ``BatchFeature`` with ``pixel_values`` (B, 3, S, S). Other keys (``size``, ``image_mean``,
        ... as saved) override this processor's for the call."""
        if kwargs:
            unknown = set(kwargs) - set(self._keys(self.settings)) - set(_FIXED_STEPS)
            if unknown:
                raise ValueError(f"VLImageProcessor got unknown arguments {sorted(unknown)}; valid: "
                                 f"{sorted(self._keys(self.settings))}.")
            return type(self)(**{**self._keys(self.settings), **kwargs}).preprocess(images, return_tensors)
        pixels = torch.stack([self.transform(self.to_pil(img)) for img in self._as_list(images)])  # (B, 3, S, S) uint8
        return BatchFeature({"pixel_values": self.transform.normalize(pixels)}, tensor_type=return_tensors)

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)
