"""``make-shards --resize SIDE``: images stored with their shorter side at SIDE, aspect ratio kept
(smaller ones only with --upscale), and the reshard mode that rewrites shards keeping keys, captions
and json; the resized shards train through the real trainer."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from tests.data_helpers import png_bytes, run_cli
from tests.helpers import train_overrides
from vlpretrain.cli import main
from vlpretrain.data.reader import iter_groups
from vlpretrain.data.writer import make_shards, stored_size


def _groups(folder) -> dict[str, dict[str, bytes]]:
    return {key: members for tar in sorted(folder.glob("*.tar")) for key, members in iter_groups(str(tar))}


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_stored_size_scales_the_shorter_side_and_keeps_the_aspect_ratio():
    assert stored_size(300, 150, resize=64) == (128, 64)
    assert stored_size(150, 300, resize=64) == (64, 128)
    assert stored_size(50, 80, resize=64) is None  # never enlarged unless asked
    assert stored_size(50, 80, resize=64, upscale=True) == (64, 102)
    assert stored_size(64, 100, resize=64) is None  # already there
    assert stored_size(1000, 400, resize=200, max_size=300) == (300, 120)  # then the longer side capped


def test_make_shards_resize_on_image_files(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (300, 150), (200, 0, 0)).save(folder / "wide.jpg")
    Image.new("RGB", (50, 80), (0, 200, 0)).save(folder / "small.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 200x100, shown 100x200
    Image.new("RGB", (200, 100), (0, 0, 200)).save(folder / "turned.jpg", exif=exif)
    for name in ("wide", "small", "turned"):
        (folder / f"{name}.txt").write_text(f"the {name} one")
    make_shards(folder, tmp_path / "out", resize=64)
    sizes = {json.loads(m["json"])["captions"][0]: _size(m["jpg"]) for m in _groups(tmp_path / "out").values()}
    assert sizes == {"the wide one": (128, 64), "the small one": (50, 80), "the turned one": (64, 128)}
    make_shards(folder, tmp_path / "up", resize=64, upscale=True)
    assert sorted(_size(m["jpg"]) for m in _groups(tmp_path / "up").values()) == [(64, 102), (64, 128), (128, 64)]


@pytest.fixture(scope="module")
def resharded(synth_root, tmp_path_factory):
    """The synthetic training shards (32 px) plus a shard of odd images, rewritten at --resize 24."""
    root = tmp_path_factory.mktemp("reshard")
    odd = root / "odd"
    odd.mkdir()
    members = {"wide": {"jpg": _jpeg(90, 60), "txt": b"a wide one", "json": b'{"captions": ["a wide one", "b"]}'},
               "tall": {"png": png_bytes(Image.new("RGB", (40, 100), (9, 90, 200))), "txt": b"a tall one"},
               "tiny": {"jpg": _jpeg(20, 16), "txt": b"a tiny one", "cls": b"7"}}
    with tarfile.open(odd / "odd-000000.tar", "w") as tar:
        for key, parts in members.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = run_cli("make-shards", "--input", str(odd), "--out", str(root / "odd24"), "--resize", "24")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 3 samples in 1 shard(s)" in out.stdout and "(2 images resized)" in out.stdout
    # the reshard of the training shards in this process (the command above ran the real entry point; a second
    # process would only import torch again)
    assert main(["make-shards", "--input", str(synth_root / "train"), "--out", str(root / "train24"),
                 "--resize", "24", "--samples-per-shard", "64"]) == 0
    return root, members


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (180, 40, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def test_reshard_keeps_keys_captions_and_json_and_resizes_the_images(resharded, synth_root):
    root, members = resharded
    odd = _groups(root / "odd24")
    assert list(odd) == ["wide", "tall", "tiny"]
    assert _size(odd["wide"]["jpg"]) == (36, 24) and _size(odd["tall"]["jpg"]) == (24, 60)  # png -> jpg, aspect kept
    assert odd["tiny"]["jpg"] == members["tiny"]["jpg"]  # smaller than 24: its bytes as they were
    for key, parts in members.items():
        assert {e: v for e, v in odd[key].items() if e not in ("jpg", "png")} == \
               {e: v for e, v in parts.items() if e not in ("jpg", "png")}
    before, after = _groups(synth_root / "train"), _groups(root / "train24")
    assert list(after) == list(before) and len(after) > 100
    for key, parts in after.items():
        assert parts["txt"] == before[key]["txt"] and parts["json"] == before[key]["json"]
        assert _size(parts["jpg"]) == (24, 24)


def test_resized_shards_train(resharded, synth_root, tmp_path, fresh_accelerate_state):
    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train

    root, _ = resharded
    cfg = load_config(None, train_overrides(synth_root, tmp_path / "run", f"data.train={root / 'train24'}",
                                            "data.val=null", "train.steps=3", "train.export=false",
                                            "data.decode=device"))  # and the trainer's device decoding in-process
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["skipped_samples"] == {}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite (not NaN)
