"""Reading WebDataset shards into raw samples, with every bad sample skipped and counted.

A shard is a tar file (local path, ``http(s)://`` URL or ``pipe:CMD``, opened by webdataset's
``gopen``) whose members ``KEY.EXT`` are grouped by KEY into samples (img2dataset layout: ``KEY.jpg``
+ ``KEY.txt`` + optional ``KEY.json``). This module only moves bytes: images stay encoded, so the
shuffle buffer holds compressed bytes and decoding happens later, in :mod:`vlpretrain.data.shards`.

Skip reasons (stable names, used in logs and tests):

===================  ======================================================================
missing_image        no .jpg/.jpeg/.png/.webp member for the key
missing_caption      neither a .txt nor captions in the .json
empty_caption        the caption (or every caption in the .json) is blank
caption_not_utf8     the .txt / .json is not UTF-8
bad_json             the .json does not parse
duplicate_key        the key already appeared in this shard (the later copy is skipped)
truncated_tar        the shard ends early (counted once per shard; the sample being read is lost)
unreadable_shard     the shard cannot be opened or is not a tar file
undecodable_image    (at decode time) the image bytes are not a readable image
image_too_large      (at decode time) the header says more than ``max_image_pixels`` pixels
===================  ======================================================================
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key ends at the first dot
_ZERO_BLOCK = b"\0" * tarfile.BLOCKSIZE


@dataclass
class RawSample:
    """One sample as stored: encoded image bytes and every caption it has."""

    key: str
    shard: str
    image: bytes
    captions: list[str]
    index: int = 0  # the sample's group index in its shard (bad groups count too): what a data position names


class SkipCounter:
    """Counts skipped samples by reason and by shard; :meth:`take` hands over what is new."""

    def __init__(self):
        self.by_shard: dict[str, Counter] = {}

    def add(self, reason: str, shard: str) -> None:
        self.by_shard.setdefault(shard, Counter())[reason] += 1

    def take(self) -> dict[str, dict[str, int]]:
        """The counts since the last call, as plain dicts ``{shard: {reason: n}}``."""
        out = {shard: dict(c) for shard, c in self.by_shard.items() if c}
        self.by_shard = {}
        return out


def merge_counts(total: dict[str, dict[str, int]], new: dict[str, dict[str, int]]) -> None:
    """Add ``{shard: {reason: n}}`` counts into ``total`` in place."""
    for shard, reasons in new.items():
        slot = total.setdefault(shard, {})
        for reason, n in reasons.items():
            slot[reason] = slot.get(reason, 0) + n


def by_reason(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """``{shard: {reason: n}}`` -> ``{reason: n}`` summed over shards."""
    out: Counter = Counter()
    for reasons in counts.values():
        out.update(reasons)
    return dict(out)


# -- shard specs -----------------------------------------------------------------------------------


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_sources(spec: str | list[str]) -> list[list[str]]:
    """A shard spec -> one URL list per ``::``-separated source.

    Each source is a brace pattern, a URL, a ``pipe:`` command or a local folder (all its ``*.tar``).
    Local paths must exist: a missing one is an error naming it, raised before any worker starts.
    """
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    sources = []
    for part in parts:
        part = part.strip()
        if not part:
            raise ValueError(f"shard spec '{spec}' has an empty source; separate sources with '::'.")
        if not is_remote(part) and Path(part).is_dir():
            urls = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"shard folder '{part}' holds no .tar files; write some with "
                                        "`vlpretrain make-shards` or `vlpretrain synth`.")
        else:
            urls = list(braceexpand.braceexpand(part))
            missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of '{part}' do not exist "
                                        f"(first: '{missing[0]}'); check the path or brace pattern.")
        sources.append(urls)
    return sources


# -- tar reading -----------------------------------------------------------------------------------


class _TailReader:
    """File wrapper that remembers how many bytes were read and the last few of them."""

    def __init__(self, fileobj, keep: int = 4 * tarfile.RECORDSIZE):
        self.fileobj, self.keep, self.total, self.tail = fileobj, keep, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.fileobj.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.keep:]
        return data

    def ended_properly(self, offset: int) -> bool:
        """Whether the block at ``offset`` (after the last member) is the tar end-of-archive block."""
        start = offset - (self.total - len(self.tail))
        return start >= 0 and self.tail[start:start + tarfile.BLOCKSIZE] == _ZERO_BLOCK


class _SeekingReader:
    """A local plain tar read with seeks over the members nobody wants."""

    def __init__(self, fileobj):
        self.fileobj = fileobj
        self.read, self.seek, self.tell = fileobj.read, fileobj.seek, fileobj.tell

    def ended_properly(self, offset: int) -> bool:
        self.fileobj.seek(offset)
        return self.fileobj.read(tarfile.BLOCKSIZE) == _ZERO_BLOCK


def _tar_members(url: str, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each regular member; raises ``_Truncated`` / ``_Unreadable`` on damage. A member
    ``want(name)`` declines comes as (name, None): its data is passed over, never copied into memory (in a
    local plain tar not even read: seeked past)."""
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any failure to open is reported as unreadable
        raise _Unreadable(f"{type(exc).__name__}: {exc}") from None
    # passing over members of a local plain tar: seek past their data instead of reading it
    seeking = want is not None and not is_remote(url) and url.endswith(".tar") and stream.seekable()
    reader = _SeekingReader(stream) if seeking else _TailReader(stream)
    seen_any, name = False, None
    try:
        with tarfile.open(fileobj=reader, mode="r:" if seeking else "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if want is not None and not want(name):
                    seen_any = True
                    yield name, None
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                seen_any = True
                yield name, data
            name = None
            # tar.offset counts uncompressed bytes: only a plain tar can be checked against the raw tail;
            # a compressed stream cut short fails in its decompressor instead (handled below)
            plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
            if plain and not reader.ended_properly(tar.offset):
                raise _Truncated("no end-of-archive block", None)
    except (_Truncated, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile/pipe/network errors all mean a damaged shard
        if not seen_any:
            raise _Unreadable(f"{type(exc).__name__}: {exc}") from None
        raise _Truncated(f"{type(exc).__name__}: {exc}", name) from None
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001, S110 - a pipe closed early may complain; the data was read
            pass


class _Truncated(Exception):
    """The shard ends early; ``member`` is the member being read when it did (None: between members)."""

    def __init__(self, detail: str, member: str | None):
        super().__init__(detail)
        self.member = member


class _Unreadable(Exception):
    pass


def _grouped(url: str, wanted: Callable[[int], bool] | None = None
             ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, {ext: bytes}) for consecutive members sharing a key (a repeated ext starts a new
    group), ``index`` counting groups from 0. A group ``wanted(index)`` declines comes with ``{}``: its
    members' data is skipped unread."""
    key, exts, parts, index = None, set(), {}, -1

    def split(name: str) -> tuple[str, str] | None:
        match = _KEY_EXT.match(name)
        if match is None or Path(name).name.startswith("__"):
            return None
        return match.group(1), match.group(2).lower()

    def want(name: str) -> bool:  # the member's group: the current one, or the next if it starts one
        parsed = split(name)
        if parsed is None:
            return False
        return wanted(index if parsed[0] == key and parsed[1] not in exts else index + 1)

    try:
        for name, data in _tar_members(url, want if wanted is not None else None):
            parsed = split(name)
            if parsed is None:
                continue
            k, ext = parsed
            if k != key or ext in exts:
                if key is not None:
                    yield index, key, parts
                key, exts, parts, index = k, set(), {}, index + 1
            exts.add(ext)
            if data is not None:
                parts[ext] = data
    except _Truncated as cut:
        # the sample being read is lost; the one before it is whole if the cut is in another key's
        # member (a cut between members leaves it unknowable whether more of it was to come)
        parsed = split(cut.member or "")
        if key is not None and parsed is not None and parsed[0] != key:
            yield index, key, parts
        raise
    if key is not None:
        yield index, key, parts


def iter_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample of a shard as stored, unchecked (for rewriting shards); a
    damaged shard raises after its last whole sample."""
    for _, key, parts in _grouped(url):
        yield key, parts


def _captions(parts: dict[str, bytes]) -> list[str]:
    """Every non-blank caption of a sample: the .json's ``captions`` list, else its ``caption``, else
    the .txt. Raises :class:`BadSample` with the reason."""
    from vlpretrain.data.images import BadSample

    captions = None
    try:
        if "json" in parts:
            meta = json.loads(parts["json"].decode("utf-8"))
            if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
                captions = [c for c in meta["captions"] if isinstance(c, str)]
            elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                captions = [meta["caption"]]
        if captions is None and "txt" in parts:
            captions = [parts["txt"].decode("utf-8")]
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None
    except json.JSONDecodeError:
        raise BadSample("bad_json") from None
    if captions is None:
        raise BadSample("missing_caption")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise BadSample("empty_caption")
    return captions


def iter_shard(url: str, skips: SkipCounter, start: int | None = 0, keep: Iterable[int] = ()) -> Iterator[RawSample]:
    """The good samples of one shard in stored order; every bad one is counted in ``skips``.

    Resuming (:mod:`vlpretrain.data.position`): groups before index ``start`` are passed over unread
    (neither kept nor counted again) except those in ``keep``; ``start=None`` reads only ``keep`` and stops
    after the last of them. Keys passed over still count for duplicate detection.
    """
    from vlpretrain.data.images import BadSample

    keep = frozenset(keep)
    if start is None and not keep:
        return
    last = max(keep, default=-1)

    def wanted(index: int) -> bool:
        return (start is not None and index >= start) or index in keep

    seen: set[str] = set()
    groups = _grouped(url, wanted if (start or keep) else None)
    try:
        for index, key, parts in groups:
            if start is None and index > last:
                break
            if key in seen:
                if wanted(index):
                    skips.add("duplicate_key", url)
                continue
            seen.add(key)
            if not wanted(index):
                continue
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            try:
                if ext is None:
                    raise BadSample("missing_image")
                yield RawSample(key, url, parts[ext], _captions(parts), index)
            except BadSample as bad:
                skips.add(bad.reason, url)
    except _Truncated:
        skips.add("truncated_tar", url)
    except _Unreadable:
        skips.add("unreadable_shard", url)
    finally:
        groups.close()


def iter_captions(spec: str) -> Iterator[str]:
    """Every caption of every good sample of a shard spec (for tokenizer training)."""
    skips = SkipCounter()
    for urls in expand_sources(spec):
        for url in urls:
            for sample in iter_shard(url, skips):
                yield from sample.captions
