"""Writing shards: :class:`ShardWriter` and the ``vlpretrain make-shards`` command.

Shards use the img2dataset layout: ``KEY.jpg`` + ``KEY.txt`` (first caption) + ``KEY.json``
(``{"captions": [...], ...}``), plus ``sizes.json`` ({shard file: samples}). Each shard is written
under a hidden temporary name and renamed only when complete, so a crash never leaves a truncated
shard that looks finished. A folder that already holds shards is refused rather than mixed into.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageOps

from vlpretrain.data.images import to_rgb

IMAGE_KEYS = ("image", "image_path", "path", "file", "filepath")
CAPTION_KEYS = ("captions", "caption", "text")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ShardWriter:
    """Samples -> ``OUT/{prefix}-NNNNNN.tar`` with ``samples_per_shard`` each, then ``sizes.json``.

    ``mtime`` fixes the members' timestamps (reproducible bytes); None stamps the current time.
    Timestamps are whole seconds: a fractional one makes every member carry a PAX header, which
    costs readers (Python's tarfile) a third of their time per member.
    """

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "shard",
                 mtime: float | None = None):
        import webdataset as wds

        self._wds = wds
        if samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard {samples_per_shard} must be >= 1.")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob("*.tar"))
        if existing:
            raise FileExistsError(f"'{self.out_dir}' already holds {len(existing)} shard(s) "
                                  f"(e.g. {existing[0].name}); write to an empty folder or delete them first.")
        self.samples_per_shard, self.prefix = samples_per_shard, prefix
        self.mtime = int(time.time() if mtime is None else mtime)
        self.sizes: dict[str, int] = {}
        self._tar = self._tmp = self._name = None
        self._count = 0

    def _open_next(self) -> None:
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._tmp = self.out_dir / f".{self._name}.tmp"
        self._tar = self._wds.TarWriter(str(self._tmp), mtime=self.mtime)  # fixed mtime: byte-identical
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        os.replace(self._tmp, self.out_dir / self._name)  # complete shards only ever appear whole
        self.sizes[self._name] = self._count
        self._tar = None

    def write(self, key: str, jpeg: bytes, captions: list[str], meta: dict | None = None) -> None:
        """Add one sample: JPEG bytes, its captions (the first goes to .txt) and extra .json fields."""
        if self._tar is None:
            self._open_next()
        record = {"captions": list(captions), **(meta or {})}
        self._tar.write({"__key__": key, "jpg": jpeg, "txt": captions[0].encode("utf-8"),
                         "json": json.dumps(record).encode("utf-8")})
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def close(self) -> dict[str, int]:
        """Finish the last shard and write ``sizes.json``; returns {shard: samples}."""
        if self._tar is not None:
            self._finish()
        tmp = self.out_dir / ".sizes.json.tmp"
        tmp.write_text(json.dumps(self.sizes, indent=1))
        os.replace(tmp, self.out_dir / "sizes.json")
        return self.sizes

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self) -> ShardWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_to_jpeg(path: Path, max_size: int | None) -> bytes:
    """An image file as JPEG bytes: original bytes when already a plain, upright, small-enough JPEG;
    otherwise EXIF-rotated, converted to RGB, shrunk to ``max_size`` (longer side) and re-encoded."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        upright = img.getexif().get(0x0112, 1) == 1  # EXIF orientation tag
        small = max_size is None or max(img.size) <= max_size
        if img.format == "JPEG" and img.mode in ("RGB", "L") and upright and small:
            img.load()  # full decode: catches truncated files here, not at training time
            return data
        img.load()
        img = to_rgb(ImageOps.exif_transpose(img))
        if not small:
            img.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
        return encode_jpeg(img)


def _as_captions(value) -> list[str]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if isinstance(v, str) and v.strip()]


def _pick(row: dict, names: tuple[str, ...], what: str, where: str):
    for name in names:
        if name in row:
            return row[name]
    raise ValueError(f"{where}: no {what} field; name it one of {', '.join(names)} (found: {', '.join(row)}).")


def read_inputs(path: str | Path) -> Iterator[tuple[Path, list[str]]]:
    """(image path, captions) from a .jsonl/.csv/.tsv listing or a folder of images with .txt files."""
    path = Path(path)
    if path.is_dir():
        for img in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            lines = txt.read_text(encoding="utf-8", errors="replace").splitlines() if txt.is_file() else []
            yield img, [line.strip() for line in lines if line.strip()]
        return
    if not path.is_file():
        raise FileNotFoundError(f"--input '{path}' does not exist; give a .jsonl/.csv/.tsv file or a folder.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise ValueError(f"--input '{path}': unknown format '{suffix}'; use .jsonl, .csv, .tsv or a folder.")
    with open(path, newline="", encoding="utf-8") as f:
        if suffix == ".jsonl":
            rows = (json.loads(line) for line in f if line.strip())
        else:
            rows = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        for n, row in enumerate(rows, start=1):
            where = f"{path} row {n}"
            image = Path(str(_pick(row, IMAGE_KEYS, "image path", where)))
            yield (image if image.is_absolute() else path.parent / image), _as_captions(
                _pick(row, CAPTION_KEYS, "caption", where))


def make_shards(input_path: str | Path, out_dir: str | Path, samples_per_shard: int = 1000,
                max_size: int | None = None) -> dict:
    """Write every readable input into shards; returns a summary with the inputs that were skipped."""
    skipped: dict[str, list[str]] = {}
    written = 0
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for image_path, captions in read_inputs(input_path):
            if not captions:
                skipped.setdefault("no_caption", []).append(str(image_path))
                continue
            try:
                jpeg = image_to_jpeg(image_path, max_size)
            except FileNotFoundError:
                skipped.setdefault("missing_file", []).append(str(image_path))
                continue
            except Exception:  # noqa: BLE001 - any unreadable image is reported, never fatal
                skipped.setdefault("unreadable_image", []).append(str(image_path))
                continue
            writer.write(f"{written:09d}", jpeg, captions, {"source": str(image_path)})
            written += 1
    return {"written": written, "shards": dict(writer.sizes), "skipped": skipped}


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-shards", help="pack images + captions into WebDataset shards")
    p.add_argument("--input", required=True, help=".jsonl/.csv/.tsv (image path + caption or list of "
                   "captions) or a folder of images with same-named .txt files")
    p.add_argument("--out", required=True, help="output folder (must hold no shards yet)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-size", type=int, default=None, help="shrink images whose longer side exceeds PX")
    p.set_defaults(func=_cmd_make_shards)


def _cmd_make_shards(args: argparse.Namespace) -> int:
    summary = make_shards(args.input, args.out, args.samples_per_shard, args.max_size)
    print(f"wrote {summary['written']} samples in {len(summary['shards'])} shard(s) to {args.out}")
    for reason, paths in summary["skipped"].items():
        print(f"skipped {len(paths)} input(s), {reason}: {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}")
    return 0 if summary["written"] else 1
