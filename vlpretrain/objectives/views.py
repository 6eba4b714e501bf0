"""Extra augmented views of a batch's images, made on the device (random resized crops).

The self-distillation student reads local crops of each image. The data workers make them
(:mod:`vlpretrain.data.views`) except with ``data.decode=device`` (the workers decode no pixels) or for
a batch without ``views``; then they are cut here from the batch's clean ``pixel_values`` on the
device: one affine grid per crop, bilinear resampling, the crops' areas and aspect ratios drawn as
torchvision's RandomResizedCrop draws them (log-uniform ratio). The random numbers come from each
crop row's own seed when the batch has per-sample seeds (:mod:`vlpretrain.layers.draws`: the same
crops however the batch is split over processes), else from torch's generator on the images' device
(accumulation's RNG replay and a resume's restored RNG state reproduce those).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlpretrain.layers.draws import rand


def random_resized_crops(images: torch.Tensor, n: int, size: int, scale: tuple[float, float],
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), seeds: torch.Tensor | None = None,
                         stream: str = "crops") -> torch.Tensor:
    """(B, C, H, W) -> (n * B, C, size, size): ``n`` crops of each image, view-major (crop v of image b
    at row ``v * B + b``). Each covers a share of the image's area drawn from ``scale`` with an aspect
    ratio drawn log-uniformly from ``ratio`` (clipped to the image), at a uniform position. ``seeds``:
    (n * B,) view-major per-crop seeds (``draws.per_view``), drawn from under ``stream``; None: torch's generator."""
    B = images.shape[0]
    device = images.device

    def draw(name: str, low: float = 0.0, high: float = 1.0) -> torch.Tensor:  # (nB,)
        return rand(seeds, f"{stream}/{name}", n * B, low=low, high=high, device=device)

    area = draw("area", scale[0], scale[1])  # (nB,)
    aspect = draw("ratio", math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width as a share of the image width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (draw("x") * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, inside the image
    cy = (draw("y") * 2 - 1) * (1 - h)
    theta = torch.zeros(n * B, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, (n * B, images.shape[1], size, size), align_corners=False)
    source = images.repeat(n, 1, 1, 1)  # (nB, C, H, W), view-major
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
