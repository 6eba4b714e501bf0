"""Image decoding: every mode to RGB with the right colours, EXIF orientation, early JPEG downscaling,
the pixel limit checked on the header, seeded training crops."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.data.images import BadSample, ImageSettings, ImageTransform, to_rgb


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def test_every_mode_becomes_rgb_with_sensible_colours():
    assert to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)  # on white
    assert to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("LA", (2, 2), (0, 255))).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_exif_orientation_and_early_downscaling():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 256x128 landscape file is a 128x256 portrait picture
    data = _jpeg(Image.new("RGB", (256, 128), (0, 0, 200)), exif=exif)
    decoder = ImageTransform(ImageSettings(size=32), train=False)
    img = decoder.decode(data)
    assert img.mode == "RGB" and img.size == (32, 64)  # DCT-scaled 1/4 at decode, then rotated
    assert decoder(img).shape == (3, 32, 32)
    train = ImageTransform(ImageSettings(size=32, crop_scale=(0.25, 1.0)), train=True)
    assert train.decode(data).size == (64, 128)  # small crops need more pixels: only 1/2


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    data = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)))
    header_only = data[:data.index(b"\xff\xda") + 100]  # headers + start of scan; pixel data cut
    with pytest.raises(BadSample) as err:
        ImageTransform(ImageSettings(size=32, max_pixels=256 * 256 - 1), train=False).decode(header_only)
    assert err.value.reason == "image_too_large"
    with pytest.raises(BadSample) as err:
        ImageTransform(ImageSettings(size=32), train=False).decode(header_only)
    assert err.value.reason == "undecodable_image"


def test_training_crops_follow_the_seed_and_leave_global_rng_alone():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    train = ImageTransform(ImageSettings(size=32, crop_scale=(0.2, 1.0)), train=True)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = train(img, seed=1), train(img, seed=1), train(img, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(1), before)
    pixels = train.normalize(torch.stack([a, c]))  # (2, 3, 32, 32)
    assert pixels.dtype == torch.float32 and abs(float(pixels.mean())) < 1.5
