"""``--format hf``: a HuggingFace-hub folder that loads without vlpretrain installed.

The folder holds ``config.json`` (with ``auto_map``), ``model.safetensors``, the tokenizer files, the
processor config, the generated modelling code (:mod:`vlpretrain.export.remote_code`) and a model card.
Every export is assembled in a hidden sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vlpretrain.export.remote_code import AUTO_MAP, map_processor_to_remote_code, write_remote_code
from vlpretrain.export.source import TRAINING_INFO_KEY, LoadedModel, TrainingInfo


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder next to ``out`` that replaces ``out`` only if the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(loaded: LoadedModel, out: str | Path, license: str = "apache-2.0") -> Path:
    """Write ``loaded`` as a hub folder at ``out`` (replacing it only when complete)."""
    model, processor, info = loaded.model, loaded.processor, loaded.info
    with atomic_folder(out) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        setattr(model.config, TRAINING_INFO_KEY, info.to_dict())
        try:
            model.save_pretrained(tmp)
        finally:
            del model.config.auto_map
        processor.save_pretrained(tmp)
        write_remote_code(tmp)
        map_processor_to_remote_code(tmp)
        (tmp / "README.md").write_text(model_card(info, model.config, Path(out).name, license))
    return Path(out)


def _figures_table(figures: dict[str, float]) -> str:
    if not figures:
        return "No evaluation figures were recorded for this checkpoint; run `vlpretrain eval --model DIR --data SHARDS`."
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(figures.items()))
    return f"| metric | value |\n|---|---|\n{rows}"


def model_card(info: TrainingInfo, config, name: str, license: str) -> str:
    """A model card: front matter (licence, tags), training facts, evaluation figures and usage."""
    objectives = ", ".join(f"`{o.get('name')}` (weight {o.get('weight', 1.0)})" for o in info.objectives) or "unknown"
    arch = (f"width {config.width}, depth {config.depth}, {config.num_heads} heads, image {config.image_size} px / "
            f"patch {config.patch_size}, text context {config.max_text_len}, embedding {config.embed_dim}, "
            f"text embedding after {config.text_embed_depth or config.depth} blocks"
            f"{', modality experts' if config.modality_experts else ''}")
    return f"""---
license: {license}
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags: [vlpretrain, vision-language, clip, captioning]
---

# {name}

A vision-language model pretrained with [vlpretrain](https://github.com/vlpretrain/vlpretrain): one
transformer backbone shared by image patches and text tokens.

- Architecture: {arch}.
- Objectives: {objectives}.
- Training data: `{info.data or 'unknown'}`.
- Steps: {info.steps if info.steps is not None else 'unknown'}; samples seen: \
{info.samples_seen if info.samples_seen is not None else 'unknown'}.

## Evaluation

{_figures_table(info.eval)}

## Usage

Needs `torch`, `transformers`, `timm`, `torchvision` and `tokenizers`; vlpretrain itself is not needed.

```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{name}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
image = Image.open("cat.jpg")
batch = processor(images=[image], text=["a photo of a cat", "a photo of a dog"])
with torch.no_grad():
    image_emb = model.encode_image(batch["pixel_values"])                          # (1, E), L2-normalised
    text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"])      # (2, E)
    probs = (100 * image_emb @ text_emb.T).softmax(-1)
    ids = model.generate(**processor(images=[image]), max_new_tokens=20, num_beams=3)
caption = processor.batch_decode(ids)[0]
```

Or through transformers' pipelines:

```python
from transformers import pipeline

captioner = pipeline("image-text-to-text", model="{name}", trust_remote_code=True)
captioner(images=image, text="", max_new_tokens=20)     # the text is a prompt the caption continues
features = pipeline("image-feature-extraction", model="{name}", trust_remote_code=True)(image)  # (1, 1 + N, D)
```
"""


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to ``repo_id`` (token from ``HF_TOKEN`` / the huggingface_hub login)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json; push the folder `vlpretrain export` wrote.")
    api = HfApi()
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                               commit_message="Upload model exported by vlpretrain")
    return str(getattr(commit, "commit_url", commit))


