"""Evaluation samples from shards: decoded images, every caption, and the ``.cls`` label if any."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlpretrain.data.images import BadSample
from vlpretrain.data.reader import _captions, _grouped, expand_sources


@dataclass
class EvalSample:
    key: str
    image: Image.Image
    captions: list[str]  # may be empty
    label: int | None


def iter_samples(spec: str, processor, max_samples: int = 0) -> Iterator[EvalSample]:
    """Up to ``max_samples`` (0: all) samples of the shards ``spec``, one at a time, images decoded by the
    processor's transform (header checks, EXIF, RGB); captions by the training reader's rule (``.json``
    captions, else its caption, else ``.txt``). Samples whose image does not decode are skipped."""
    seen = 0
    for url in [u for source in expand_sources(spec) for u in source]:
        for _, key, parts in _grouped(url):
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if image_ext is None:
                continue
            try:
                image = processor.image_transform.decode(parts[image_ext])
            except BadSample:
                continue
            try:
                captions = _captions(parts)
            except BadSample:
                captions = []
            label = int(parts["cls"].decode().strip()) if "cls" in parts else None
            yield EvalSample(key, image, captions, label)
            seen += 1
            if max_samples and seen >= max_samples:
                return
    if not seen:
        raise ValueError(f"no readable image samples in '{spec}'.")


def read_samples(spec: str, processor, max_samples: int = 0) -> list[EvalSample]:
    """:func:`iter_samples` as a list (every image held: for small reads, e.g. a sample sheet)."""
    return list(iter_samples(spec, processor, max_samples))


def batched(samples: Iterable[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    """Consecutive lists of ``size`` samples (the last may be shorter)."""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_class_names(spec: str, given: list[str] | None) -> list[str] | None:
    """Class names given on the command line, else ``classnames.json`` (a list) next to the shards."""
    if given:
        return list(given)
    first = Path([u for source in expand_sources(spec) for u in source][0])
    candidates = [first.parent / "classnames.json", first / "classnames.json"]
    for path in candidates:
        if path.is_file():
            names = json.loads(path.read_text())
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path} must hold a JSON list of class names.")
            return names
    return None
