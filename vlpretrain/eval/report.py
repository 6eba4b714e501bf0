"""Evaluation extras: the image-text alignment score (CLIPScore) and the PNG sheet of samples."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_prompts(images: str | Path, prompts: str | Path) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs: ``prompts`` is a JSON object {file name: prompt} or a text file with one
    prompt per line, paired with the folder's images in name order."""
    folder, prompts = Path(images), Path(prompts)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images '{folder}' is not a folder of images.")
    if not prompts.is_file():
        raise FileNotFoundError(f"--prompts '{prompts}' does not exist; give a text file (one prompt per line) "
                                "or a JSON object {image file name: prompt}.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if prompts.suffix == ".json":
        mapping = json.loads(prompts.read_text())
        missing = [name for name in mapping if not (folder / name).is_file()]
        if not isinstance(mapping, dict) or missing:
            raise ValueError(f"--prompts {prompts}: expected {{image file name: prompt}} for files in {folder}; "
                             f"missing images: {missing[:5]}.")
        return [(folder / name, text) for name, text in mapping.items()]
    lines = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    if len(lines) != len(files) or not files:
        raise ValueError(f"--prompts {prompts} has {len(lines)} prompts for {len(files)} images in {folder}; give "
                         "one prompt line per image (in file-name order) or a JSON object {file name: prompt}.")
    return list(zip(files, lines))


@torch.no_grad()
def alignment_scores(model, processor, pairs: list[tuple[Path, str]], batch: int = 64) -> dict[str, Any]:
    """CLIPScore-style ``100 * max(cos(image, prompt), 0)`` per pair and its mean (as T3Bench reports)."""
    scores = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        inputs = processor(images=[str(p) for p, _ in chunk], text=[t for _, t in chunk])
        img = model.encode_image(inputs["pixel_values"])  # (B, E), normalised
        txt = model.encode_text(inputs["input_ids"], inputs["attention_mask"])  # (B, E)
        scores += (100 * (img * txt).sum(-1).clamp(min=0)).tolist()
    return {"clip_score": sum(scores) / len(scores), "pairs": len(pairs),
            "per_image": {p.name: s for (p, _), s in zip(pairs, scores)}}


def write_sheet(path: str | Path, images: list, results: dict[str, Any], columns: int = 4) -> Path:
    """A PNG of up to 8 sample images, each with its generated caption(s) and top retrieved text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    captions = results.get("captioning", {}).get("examples", [])
    retrieved = results.get("retrieval", {}).get("examples", [])
    n = min(len(images), 8)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.6 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        ax.axis("off")
        if j >= n:
            continue
        ax.imshow(images[j])
        lines = []
        if j < len(captions):
            lines.append(f"greedy: {captions[j]['generated']}")
            if "beam" in captions[j]:
                lines.append(f"beam: {captions[j]['beam']}")
        if j < len(retrieved):
            lines.append(f"top text: {retrieved[j]}")
        ax.set_title("\n".join(textwrap.fill(line, 34) for line in lines), fontsize=7, loc="left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
