"""Shard writing: ``make-shards`` round trip on real image files (formats, modes, EXIF, unreadable
ones), the folder input, all-or-nothing shards, and the synthetic scenes."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from tests.data_helpers import run_cli
from vlpretrain.cli import main
from vlpretrain.data.images import ImageSettings, ImageTransform
from vlpretrain.data.reader import SkipCounter, expand_sources, iter_shard
from vlpretrain.data.synthetic import captions, random_scene, synthesize
from vlpretrain.data.writer import ShardWriter, make_shards


def _read_all(folder) -> dict:
    skips = SkipCounter()
    samples = {s.key: s for url in expand_sources(str(folder))[0] for s in iter_shard(url, skips)}
    assert skips.take() == {}
    return samples


def _write_images(folder) -> dict[str, tuple[str, object]]:
    """Image files in several formats/modes; returns name -> (file, expected (w, h) or None=unreadable)."""
    folder.mkdir()
    files = {}
    Image.new("RGB", (48, 32), (250, 10, 10)).save(folder / "red.jpg", quality=95)
    files["red"] = ("red.jpg", (48, 32))
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(folder / "alpha.png")
    files["alpha"] = ("alpha.png", (40, 40))
    Image.new("L", (30, 20), 77).save(folder / "grey.png")
    files["grey"] = ("grey.png", (30, 20))
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    files["cmyk"] = ("cmyk.jpg", (24, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    Image.new("RGB", (60, 20), (10, 200, 10)).save(folder / "rotated.jpg", exif=exif)
    files["rotated"] = ("rotated.jpg", (20, 60))
    Image.fromarray(np.full((16, 16), 50000, dtype=np.uint16)).save(folder / "deep.png")
    files["deep"] = ("deep.png", (16, 16))
    Image.new("RGB", (400, 200), (9, 9, 9)).save(folder / "large.png")
    files["large"] = ("large.png", (128, 64))  # shrunk by --max-size 128
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files["broken"] = ("broken.jpg", None)
    return files


def test_make_shards_round_trip_on_real_image_files(tmp_path, capsys):
    files = _write_images(tmp_path / "images")
    rows = [{"image": f"images/{name}", "caption": f"a picture called {key}"} for key, (name, _) in files.items()]
    rows[0]["caption"] = ["first caption", "second caption"]
    rows.append({"image": "images/missing.jpg", "caption": "gone"})
    rows.append({"image": "images/red.jpg", "caption": "   "})
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in rows))

    result = run_cli("make-shards", "--input", str(listing), "--out", str(tmp_path / "shards"),
                     "--samples-per-shard", "3", "--max-size", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 7 samples in 3 shard(s)" in result.stdout
    assert "unreadable_image: " in result.stdout and "broken.jpg" in result.stdout
    assert "missing_file: " in result.stdout and "no_caption: " in result.stdout

    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    samples = _read_all(tmp_path / "shards")
    decoder = ImageTransform(ImageSettings(size=8), train=False)
    by_source = {s.captions[0].removeprefix("a picture called "): s for s in samples.values()}
    assert by_source.pop("first caption").captions == ["first caption", "second caption"]
    by_source["red"] = samples["000000000"]
    for key, (_, size) in files.items():
        if size is None:
            assert key not in by_source
            continue
        img = Image.open(io.BytesIO(by_source[key].image))
        assert img.format == "JPEG" and img.size == size, key
        rgb = decoder.decode(by_source[key].image)
        assert rgb.mode == "RGB"
    assert by_source["cmyk"].image[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(by_source["cmyk"].image)).mode == "RGB"

    capsys.readouterr()
    again = main(["make-shards", "--input", str(listing), "--out", str(tmp_path / "shards")])  # in this process
    assert again == 2 and "already holds 3 shard(s)" in capsys.readouterr().err


def test_folder_input_uses_same_named_txt_files(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 80, 0, 0)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture {i}\nalso picture {i}\n")
    Image.new("RGB", (20, 20)).save(folder / "nocaption.png")
    summary = make_shards(folder, tmp_path / "out", samples_per_shard=10)
    assert summary["written"] == 3 and summary["skipped"] == {"no_caption": [str(folder / "nocaption.png")]}
    caps = sorted(s.captions[0] for s in _read_all(tmp_path / "out").values())
    assert caps == ["picture 0", "picture 1", "picture 2"]


def test_a_failed_write_leaves_only_complete_shards(tmp_path):
    jpeg = (tmp_path / "x.jpg")
    Image.new("RGB", (8, 8)).save(jpeg)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "out", samples_per_shard=2) as writer:
        for i in range(3):
            writer.write(f"{i:03d}", jpeg.read_bytes(), [f"caption {i}"])
        raise RuntimeError("crash while writing the second shard")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard-000000.tar"]
    assert len(_read_all(tmp_path / "out")) == 2


def test_bad_make_shards_input_is_named(tmp_path):
    bad = tmp_path / "list.csv"
    bad.write_text("picture,words\na.jpg,hello\n")
    with pytest.raises(ValueError, match="no image path field; name it one of image"):
        make_shards(bad, tmp_path / "out")
    (tmp_path / "list.txt").write_text("a.jpg hello\n")
    with pytest.raises(ValueError, match="unknown format '.txt'; use .jsonl, .csv, .tsv or a folder"):
        make_shards(tmp_path / "list.txt", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar"))


def test_synthetic_scenes_are_deterministic_and_captions_true(tmp_path):
    sizes = synthesize(tmp_path / "a", 30, image_size=32, seed=5, samples_per_shard=8, num_val=5)
    synthesize(tmp_path / "b", 30, image_size=32, seed=5, samples_per_shard=8, num_val=5)
    assert sizes == {"train": {f"shard-{i:06d}.tar": n for i, n in enumerate([8, 8, 8, 6])},
                     "val": {"shard-000000.tar": 5}}
    for split in ("train", "val"):
        for name in sizes[split]:
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    samples = _read_all(tmp_path / "a" / "train")
    assert not set(samples) & set(_read_all(tmp_path / "a" / "val"))
    for s in samples.values():
        assert s.captions == captions(json.loads(_json_of(tmp_path / "a" / "train", s.key))["scene"])
    # relations follow positions
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        if len(scene["objects"]) == 2 and len({(o["color"], o["shape"]) for o in scene["objects"]}) == 2:
            left = min(scene["objects"], key=lambda o: o["x"])
            first = captions(scene)[0]
            if " left of " in first:
                assert first.startswith(("a " + left["size"], "an " + left["size"]))
                assert f"{left['color']} {left['shape']} left of" in first


def _json_of(folder, key) -> str:
    import tarfile

    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name == f"{key}.json":
                    return tar.extractfile(member).read().decode()
    raise KeyError(key)


@pytest.mark.parametrize("mtime", [None, 12.75])
def test_members_carry_whole_second_timestamps_and_no_pax_headers(tmp_path, mtime):
    import tarfile

    with ShardWriter(tmp_path, samples_per_shard=10, mtime=mtime) as writer:
        for i in range(3):
            writer.write(f"s{i}", b"not decoded here", [f"caption {i}"])
    with tarfile.open(next(tmp_path.glob("*.tar"))) as tar:
        members = tar.getmembers()
    assert len(members) == 9  # jpg, json, txt each; a PAX header (slow to read) would come with a fractional mtime
    assert all(m.pax_headers == {} and isinstance(m.mtime, int) for m in members)
    if mtime is not None:
        assert {m.mtime for m in members} == {12}


def test_synthesize_needs_no_val_path_but_rejects_a_wrong_one(tmp_path):
    from vlpretrain.config import ConfigError, DataConfig
    from vlpretrain.data.bootstrap import ensure_synthetic

    root = tmp_path / "synth"
    paths = {"train": str(root / "train"), "tokenizer": str(root / "tokenizer"), "synthesize": 32}
    with pytest.raises(ConfigError, match="data.val: with data.synthesize > 0 it must be"):
        ensure_synthetic(DataConfig(**paths, val=str(tmp_path / "elsewhere")), image_size=16, seed=0)
    assert ensure_synthetic(DataConfig(**paths, val=None), image_size=16, seed=0) == root  # benchmarks: no val
    assert any((root / "train").glob("*.tar")) and (root / "tokenizer").is_dir()
