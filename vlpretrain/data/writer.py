"""Writing shards: :class:`ShardWriter` and the ``vlpretrain make-shards`` command.

Shards use the img2dataset layout: ``KEY.jpg`` + ``KEY.txt`` (first caption) + ``KEY.json``
(``{"captions": [...], ...}``), plus ``sizes.json`` ({shard file: samples}). ``--resize SIDE`` stores
images with their shorter side at SIDE (aspect ratio kept; smaller ones left alone unless ``--upscale``),
as img2dataset's ``keep_ratio`` mode does: decoding then costs what training needs. Given shards as
``--input``, make-shards rewrites them so (reshard), keeping every key, caption and json. Each shard is written
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
        record = {"captions": list(captions), **(meta or {})}
        self.write_members(key, {"jpg": jpeg, "txt": captions[0].encode("utf-8"),
                                 "json": json.dumps(record).encode("utf-8")})

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample as its members ``{ext: bytes}`` (written in this order)."""
        if self._tar is None:
            self._open_next()
        self._tar.write({"__key__": key, **members})
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


def stored_size(width: int, height: int, max_size: int | None = None, resize: int | None = None,
                upscale: bool = False) -> tuple[int, int] | None:
    """The (width, height) an upright image is stored at, or None to keep it as it is: ``resize`` scales
    the shorter side to it (only down unless ``upscale``), then ``max_size`` caps the longer side; the
    aspect ratio is kept (each side rounded, at least 1 pixel)."""
    scale = 1.0
    if resize is not None and (min(width, height) > resize or upscale):
        scale = resize / min(width, height)
    if max_size is not None and max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    if scale == 1.0:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resized(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An upright RGB image resized to ``size`` (antialiased bicubic; JPEGs DCT-downscaled first, never
    below ``size``, which is what makes resharding fast)."""
    return img.resize(size, Image.Resampling.BICUBIC)


def reencode(data: bytes, max_size: int | None = None, resize: int | None = None, upscale: bool = False,
             keep_plain_jpeg: bool = True) -> tuple[bytes, str] | None:
    """Encoded image bytes -> (JPEG bytes, "jpg") at the :func:`stored_size` (EXIF-rotated, RGB, q95),
    or None when they can stay as they are (the right size, and with ``keep_plain_jpeg`` a plain
    upright RGB/greyscale JPEG; otherwise only the size matters). Raises on an unreadable image."""
    with Image.open(io.BytesIO(data)) as img:
        orientation = img.getexif().get(0x0112, 1)  # EXIF orientation tag
        w, h = img.size
        if orientation in (5, 6, 7, 8):  # stored on its side
            w, h = h, w
        size = stored_size(w, h, max_size, resize, upscale)
        plain = img.format == "JPEG" and img.mode in ("RGB", "L") and orientation == 1
        if size is None and (plain or not keep_plain_jpeg):
            img.load()  # full decode: catches truncated files here, not at training time
            return None
        if size is not None and img.format == "JPEG":
            stored = size if orientation < 5 else size[::-1]
            img.draft("RGB", stored)
        img.load()
        img = to_rgb(ImageOps.exif_transpose(img))
        return encode_jpeg(img if size is None else _resized(img, size)), "jpg"


def image_to_jpeg(path: Path, max_size: int | None, resize: int | None = None, upscale: bool = False) -> bytes:
    """An image file as JPEG bytes: original bytes when already a plain, upright JPEG of the right size;
    otherwise EXIF-rotated, converted to RGB, resized (:func:`stored_size`) and re-encoded."""
    data = path.read_bytes()
    out = reencode(data, max_size, resize, upscale)
    return data if out is None else out[0]


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


def is_shard_input(path: str | Path) -> bool:
    """Whether ``--input`` names shards (a .tar, a brace pattern, or a folder holding .tar files)."""
    path = Path(path)
    return path.suffix == ".tar" or "{" in str(path) or (path.is_dir() and any(path.glob("*.tar")))


def reshard(input_spec: str | Path, out_dir: str | Path, resize: int | None, samples_per_shard: int = 1000,
            max_size: int | None = None, upscale: bool = False) -> dict:
    """Rewrite shards with their images at the :func:`stored_size`: every member but the image is copied
    byte for byte (keys, captions, json); an image already the right size keeps its bytes (and format)."""
    from vlpretrain.data.reader import IMAGE_EXTS, expand_sources, iter_groups

    skipped: dict[str, list[str]] = {}
    written = resized = 0
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for url in (u for urls in expand_sources(str(input_spec)) for u in urls):
            try:
                for key, members in iter_groups(url):
                    ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if ext is not None:
                        try:
                            out = reencode(members[ext], max_size, resize, upscale, keep_plain_jpeg=False)
                        except Exception:  # noqa: BLE001 - an unreadable image is copied as it is: the reader counts it
                            skipped.setdefault("unreadable_image_copied", []).append(f"{url}:{key}")
                            out = None
                        if out is not None:
                            members = {(out[1] if e == ext else e): (out[0] if e == ext else v)
                                       for e, v in members.items()}
                            resized += 1
                    writer.write_members(key, members)
                    written += 1
            except Exception as exc:  # noqa: BLE001 - a damaged shard: what was read is kept, the rest reported
                skipped.setdefault("damaged_shard", []).append(f"{url} ({type(exc).__name__})")
    return {"written": written, "resized": resized, "shards": dict(writer.sizes), "skipped": skipped}


def make_shards(input_path: str | Path, out_dir: str | Path, samples_per_shard: int = 1000,
                max_size: int | None = None, resize: int | None = None, upscale: bool = False) -> dict:
    """Write every readable input into shards; returns a summary with the inputs that were skipped.
    Shards as input are rewritten (:func:`reshard`)."""
    if is_shard_input(input_path):
        return reshard(input_path, out_dir, resize, samples_per_shard, max_size, upscale)
    skipped: dict[str, list[str]] = {}
    written = 0
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for image_path, captions in read_inputs(input_path):
            if not captions:
                skipped.setdefault("no_caption", []).append(str(image_path))
                continue
            try:
                jpeg = image_to_jpeg(image_path, max_size, resize, upscale)
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
                   "captions), a folder of images with same-named .txt files, or shards to rewrite (a folder "
                   "of .tar files, a .tar or a brace pattern: keys, captions and json kept)")
    p.add_argument("--out", required=True, help="output folder (must hold no shards yet)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-size", type=int, default=None, help="shrink images whose longer side exceeds PX")
    p.add_argument("--resize", type=int, default=None, metavar="SIDE",
                   help="store images with their shorter side at SIDE px, aspect ratio kept (smaller ones as they "
                        "are unless --upscale); e.g. 256 for 224 px training")
    p.add_argument("--upscale", action="store_true", help="with --resize: enlarge smaller images to SIDE too")
    p.set_defaults(func=_cmd_make_shards)


def _cmd_make_shards(args: argparse.Namespace) -> int:
    for name in ("max_size", "resize"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1 pixel.")
    if args.upscale and args.resize is None:
        raise ValueError("--upscale only applies with --resize SIDE.")
    summary = make_shards(args.input, args.out, args.samples_per_shard, args.max_size, args.resize, args.upscale)
    resized = f" ({summary['resized']} images resized)" if "resized" in summary else ""
    print(f"wrote {summary['written']} samples in {len(summary['shards'])} shard(s) to {args.out}{resized}")
    for reason, paths in summary["skipped"].items():
        print(f"skipped {len(paths)} input(s), {reason}: {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}")
    return 0 if summary["written"] else 1
