"""data.decode=device: JPEGs decoded by the consumer (here device=cpu, the code a GPU runs with
device=cuda) give the pixels the workers give, every image kind through its path; a corrupt JPEG
costs one counted sample, never the batch or its size."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_helpers import data_config, make_stream, png_bytes, synth_corpus, take
from vlpretrain.data.device_decode import SPARES, DeviceBatches
from vlpretrain.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(synth_corpus(tmp_path_factory) / "tokenizer")


def _photo(seed: int, size=(48, 40), mode="RGB") -> Image.Image:
    """Smooth gradients and a disc: photo-like, so JPEG and resize errors stay realistic."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (np.linspace(0, 1, w)[None, :, None] * rng.uniform(60, 250, 3)
           + np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 60, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img.paste(tuple(int(c) for c in rng.integers(0, 255, 3)), (w // 4, h // 4, w // 2, h // 2))
    return img.convert(mode)


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def _rotated(seed: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(_photo(seed, (52, 36)), exif=exif)


def _shard(path, samples: list[tuple[str, str, bytes]]) -> None:
    """A real tar shard: KEY.EXT image + KEY.txt caption per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, ext, data in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", f"a picture called {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


KINDS = {  # key -> (ext, bytes, decoded by the device?)
    "rgb": ("jpg", _jpeg(_photo(0)), True),
    "progressive": ("jpg", _jpeg(_photo(1), progressive=True), True),
    "exif6": ("jpg", _rotated(2, 6), True),
    "exif3": ("jpg", _rotated(3, 3), True),
    "exif8": ("jpg", _rotated(4, 8), True),
    "grey": ("jpg", _jpeg(_photo(5, mode="L")), True),
    "cmyk": ("jpg", _jpeg(_photo(6, mode="CMYK")), False),
    "png": ("png", png_bytes(_photo(7)), False),
}


def _stream(root, tokenizer, decode: str, batch_size: int, **cfg):
    cfg = data_config(root, decode=decode, num_workers=0, shuffle_buffer=0, crop_scale=[0.3, 1.0], hflip=True, **cfg)
    return make_stream(cfg, batch_size=batch_size, tokenizer=tokenizer, normalize=False)


def test_device_pixels_equal_worker_pixels_for_every_image_kind(tmp_path, tokenizer):
    _shard(tmp_path / "train" / "kinds.tar", [(k, ext, data) for k, (ext, data, _) in KINDS.items()])
    size = len(KINDS)
    (cpu,) = take(_stream(tmp_path, tokenizer, "cpu", size), 1)
    stream = _stream(tmp_path, tokenizer, "device", size)
    (raw,) = take(stream, 1)
    enc = raw["encoded"]
    on_device = {raw["keys"][r] for r in enc["jpeg_rows"].tolist()}
    assert on_device == {k for k, (_, _, device) in KINDS.items() if device}  # the others: decoded in the worker
    assert raw["pixel_values"].shape == (size, 0)  # placeholder until decoded
    batch = DeviceBatches(stream, "cpu")(raw)
    assert batch["keys"] == cpu["keys"] and torch.equal(batch["input_ids"], cpu["input_ids"])
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == cpu["pixel_values"].shape
    diff = (batch["pixel_values"].int() - cpu["pixel_values"].int()).abs().amax(dim=(1, 2, 3))  # per sample
    print(dict(zip(batch["keys"], diff.tolist())))
    assert int(diff.max()) <= 1, dict(zip(batch["keys"], diff.tolist()))
    assert len({tuple(p.shape) for p in batch["pixel_values"]}) == 1
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])  # real, different images


def test_a_corrupt_jpeg_costs_one_counted_sample_and_never_the_batch(tmp_path, tokenizer):
    good = [(f"good{i}", "jpg", _jpeg(_photo(10 + i))) for i in range(9)]
    whole = _jpeg(_photo(99))
    corrupt = whole[:whole.index(b"\xff\xda") + 40]  # whole header (passes the worker's check), pixel data cut
    samples = [*good[:2], ("corrupt", "jpg", corrupt), *good[2:]]
    _shard(tmp_path / "train" / "bad.tar", samples)
    stream = _stream(tmp_path, tokenizer, "device", 4)
    decoded = DeviceBatches(stream, "cpu")
    raw = take(stream, 2)
    assert raw[0]["skipped"] == {} and raw[0]["encoded"]["spare_keys"] == ["good3", "good4"][:SPARES]
    first, second = decoded(raw[0]), decoded(raw[1])
    assert first["keys"] == ["good0", "good1", "good3", "good2"]  # the corrupt row filled by the first spare
    assert first["pixel_values"].shape == (4, 3, 32, 32) and first["input_ids"].shape[0] == 4
    assert first["skipped"] == {"undecodable_image": 1} and second.get("skipped") == {}
    assert stream.skipped_by_reason() == {"undecodable_image": 1}
    assert second["keys"] == ["good3", "good4", "good5", "good6"]  # the spare trains again in its own batch
    assert torch.equal(first["pixel_values"][2], second["pixel_values"][0])  # with its own crop both times
    assert first["sample_seed"][2] == second["sample_seed"][0]  # and its own seed (its masks, its views)
    assert first["sample_seed"].tolist()[:2] == raw[0]["sample_seed"].tolist()[:2]
    caption = first["attention_mask"][2].bool()
    assert torch.equal(first["input_ids"][2][caption], second["input_ids"][0][second["attention_mask"][0].bool()])
    # the good samples are the worker-decoded ones
    cpu = take(_stream(tmp_path, tokenizer, "cpu", 4), 1)[0]
    assert cpu["keys"] == ["good0", "good1", "good2", "good3"]
    by_key = dict(zip(first["keys"], first["pixel_values"]))
    for key, pixels in zip(cpu["keys"], cpu["pixel_values"]):
        assert int((by_key[key].int() - pixels.int()).abs().max()) <= 1, key


def test_device_mode_refuses_a_normalising_stream(tmp_path, tokenizer):
    _shard(tmp_path / "train" / "one.tar", [("a", "jpg", _jpeg(_photo(0)))])
    with pytest.raises(ValueError, match="normalize=False"):
        make_stream(data_config(tmp_path, decode="device", num_workers=0), batch_size=1, tokenizer=tokenizer)


def test_a_jpeg_the_cpu_path_decodes_downscaled_gets_the_same_crop_and_close_pixels(tmp_path, tokenizer):
    from vlpretrain.data.device_decode import plan_jpeg
    from vlpretrain.data.images import ImageSettings, ImageTransform

    transform = ImageTransform(ImageSettings(size=32, crop_scale=(0.3, 1.0)), train=True)
    data = _jpeg(_photo(3, (150, 130)))
    assert transform.decode(data).size == (75, 65)  # the cpu path: DCT-scaled by 1/2
    plan = plan_jpeg(transform, data, seed=11)
    assert plan[-1] == 2 and plan[:5] == (*transform.crop_params(65, 75, seed=11)[:4], 0)  # that size's crop
    _shard(tmp_path / "train" / "big.tar", [("big", "jpg", data), ("rgb", "jpg", KINDS["rgb"][1])])
    (cpu,) = take(_stream(tmp_path, tokenizer, "cpu", 2, crop_ratio=[0.75, 1.33]), 1)
    stream = _stream(tmp_path, tokenizer, "device", 2, crop_ratio=[0.75, 1.33])
    (batch,) = [DeviceBatches(stream, "cpu")(b) for b in take(stream, 1)]
    assert batch["keys"] == cpu["keys"] == ["big", "rgb"]
    diff = (batch["pixel_values"].float() - cpu["pixel_values"].float()).abs()  # (2, 3, 32, 32)
    print(f"draft-sized JPEG: mean {diff[0].mean():.2f}, max {diff[0].max():.0f} grey levels")
    assert float(diff[0].mean()) < 1.0 and int(diff[1].max()) <= 1  # shrunk two ways; the small one exact
