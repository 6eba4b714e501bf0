"""``vlpretrain eval --model DIR --data SHARDS [--tasks ...] [--out FILE]``: every figure as one JSON.

Tasks: ``retrieval`` (multi-caption R@1/5/10 both ways), ``zeroshot`` (top-1/top-5 from class names
and prompt templates), ``captioning`` (greedy and, with ``--beams N``, beam-search captions; BLEU-4 and
CIDEr against all references), ``linear_probe`` (logistic regression on frozen image features, half
the samples to fit, half to test), ``reconstruction`` (MSE/PSNR of the masked_image decoder on hidden
patches; needs a checkpoint trained with that objective).
``--images FOLDER --prompts FILE`` adds the CLIPScore-style alignment score; with ``--out FILE.json`` a
PNG sheet of sample images, captions and top retrieved texts is written next to it as ``FILE.png``.
The shards are read once, ``--batch-size`` images at a time on ``--device`` (cuda when available) at
``--precision``: embeddings and captions are kept, images are not, so memory does not grow with their number.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlpretrain.eval.beam import beam_search
from vlpretrain.eval.metrics import caption_scores, multi_caption_recall, topk_accuracy
from vlpretrain.eval.samples import batched, iter_samples, load_class_names, read_samples
from vlpretrain.finetune import DEFAULT_TEMPLATES, class_text_embeddings

TASKS = ("retrieval", "zeroshot", "captioning", "linear_probe", "reconstruction")


@dataclass
class EvalSettings:
    """Where and how the model runs: device, batch size (images and texts per forward), precision."""

    device: str = "cpu"
    batch_size: int = 64
    precision: str = "no"  # no (fp32), bf16 or fp16 autocast
    max_new_tokens: int = 24
    beams: int = 1

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(torch.device(self.device).type, dtype=dtype, enabled=dtype is not None)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class _Pass:
    """What one streamed pass over the shards keeps: per-sample vectors and text, never the images."""

    image_emb: list[torch.Tensor] = field(default_factory=list)  # (B, E) L2-normalised, on the CPU
    features: list[torch.Tensor] = field(default_factory=list)  # (B, D) pooled, for linear_probe only
    captions: list[list[str]] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    greedy: list[str] = field(default_factory=list)
    beam: list[str] = field(default_factory=list)


@torch.no_grad()
def _stream(model, processor, samples, tasks, settings: EvalSettings) -> _Pass:
    """One pass over ``samples`` in batches: embeddings (and captions when asked) per batch, so memory
    does not grow with the number of images."""
    keep = _Pass()
    for batch in batched(samples, settings.batch_size):
        pixels = processor(images=[s.image for s in batch])["pixel_values"].to(settings.device)  # (B, 3, S, S)
        with settings.autocast():
            cls = model.pooled_image_features(pixels)  # (B, D)
            keep.image_emb.append(F.normalize(model.image_proj(cls).float(), dim=-1).cpu())
            if "linear_probe" in tasks:
                keep.features.append(cls.float().cpu())
            if "captioning" in tasks:
                keep.greedy += processor.batch_decode(model.generate(pixels, max_new_tokens=settings.max_new_tokens))
                if settings.beams > 1:
                    ids = beam_search(model, pixels, settings.beams, settings.max_new_tokens)[0]
                    keep.beam += processor.batch_decode(ids)
        keep.captions += [s.captions for s in batch]
        keep.labels += [s.label for s in batch]
    return keep


@torch.no_grad()
def _retrieval(model, processor, captions: list[list[str]], image_emb, settings: EvalSettings) -> dict[str, Any]:
    texts = [(i, c) for i, caps in enumerate(captions) for c in caps]
    if any(not caps for caps in captions):
        raise ValueError("retrieval needs captions (.txt or .json) for every sample; these shards have "
                         f"{sum(1 for c in captions if not c)} of {len(captions)} without. Drop the task.")
    emb = []
    for i in range(0, len(texts), settings.batch_size):
        batch = processor(text=[c for _, c in texts[i:i + settings.batch_size]])
        with settings.autocast():
            out = model.encode_text(batch["input_ids"].to(settings.device), batch["attention_mask"].to(settings.device))
        emb.append(F.normalize(out.float(), dim=-1).cpu())
    owner, text_emb = torch.tensor([i for i, _ in texts]), torch.cat(emb)
    top = (image_emb[:8] @ text_emb.T).argmax(1).tolist()  # the best caption of the first images (sheet)
    return {**multi_caption_recall(image_emb, text_emb, owner), "captions": len(texts),
            "examples": [texts[j][1] for j in top]}


def _labels(labels: list[int | None], task: str) -> torch.Tensor:
    missing = sum(1 for label in labels if label is None)
    if missing:
        raise ValueError(f"{task} needs a .cls label per sample; {missing} of {len(labels)} samples have none.")
    return torch.tensor(labels)


@torch.no_grad()
def _zeroshot(model, processor, labels, image_emb, class_names, templates, settings: EvalSettings) -> dict[str, float]:
    labels = _labels(labels, "zeroshot")
    if class_names is None:
        raise ValueError("zeroshot needs class names: a classnames.json next to the shards or --class-names.")
    if int(labels.max()) >= len(class_names) or int(labels.min()) < 0:
        raise ValueError(f"{len(class_names)} class names, but the labels run from {int(labels.min())} to "
                         f"{int(labels.max())}; give one name per class index.")
    with settings.autocast():
        classes = class_text_embeddings(model, processor, class_names, templates)
    logits = image_emb @ F.normalize(classes.float(), dim=-1).cpu().T  # (N, K)
    return topk_accuracy(logits, labels)


def _captioning(kept: _Pass, beams: int) -> dict[str, Any]:
    """Greedy captions (and, with ``beams`` > 1, beam-search captions) scored against all references."""
    if any(not caps for caps in kept.captions):
        raise ValueError("captioning needs reference captions for every sample (.txt or .json).")
    out: dict[str, Any] = {"greedy": caption_scores(kept.greedy, kept.captions)}
    if beams > 1:
        out[f"beam{beams}"] = caption_scores(kept.beam, kept.captions)
    out["examples"] = [{"generated": g, **({"beam": kept.beam[j]} if kept.beam else {}), "references": refs[:3]}
                       for j, (g, refs) in enumerate(zip(kept.greedy[:8], kept.captions))]
    return out


def _linear_probe(labels, features) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    labels = _labels(labels, "linear_probe").numpy()
    half = len(labels) // 2
    if half < 2 or len(set(labels[:half])) < 2:
        raise ValueError("linear_probe needs at least 4 samples and two classes in the first half.")
    x = features.numpy()
    probe = LogisticRegression(max_iter=1000, C=1.0).fit(x[:half], labels[:half])
    return {"top1": float((probe.predict(x[half:]) == labels[half:]).mean()), "train": half,
            "test": len(labels) - half}


def evaluate_model(model_dir: str, data: str, tasks: tuple[str, ...] = ("retrieval",), class_names=None,
                   templates=DEFAULT_TEMPLATES, max_samples: int = 0, max_new_tokens: int = 24,
                   beams: int = 1, settings: EvalSettings | None = None) -> dict[str, Any]:
    """Every requested figure of the model at ``model_dir`` (any folder ``load_source`` reads) on ``data``.

    The shards are read once, streamed in batches (``reconstruction`` reads its samples itself, on the CPU)."""
    from vlpretrain.export.source import load_source

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task(s) {sorted(unknown)}; valid: {', '.join(TASKS)}.")
    settings = settings or EvalSettings()
    settings.max_new_tokens, settings.beams = max_new_tokens, beams
    loaded = load_source(model_dir)
    model, processor = loaded.model, loaded.processor
    done: dict[str, Any] = {}
    if "reconstruction" in tasks:
        from vlpretrain.eval.reconstruction import reconstruction_figures

        done["reconstruction"] = reconstruction_figures(model_dir, loaded, read_samples(data, processor, max_samples))
    model.to(settings.device).eval()
    kept = _stream(model, processor, iter_samples(data, processor, max_samples), tasks, settings)
    image_emb = torch.cat(kept.image_emb)
    results: dict[str, Any] = {"model": str(model_dir), "data": data, "samples": len(image_emb)}
    for task in tasks:
        if task == "retrieval":
            results[task] = _retrieval(model, processor, kept.captions, image_emb, settings)
        elif task == "zeroshot":
            results[task] = _zeroshot(model, processor, kept.labels, image_emb, load_class_names(data, class_names),
                                      templates, settings)
        elif task == "captioning":
            results[task] = _captioning(kept, beams)
        elif task == "reconstruction":
            results[task] = done[task]
        else:
            results[task] = _linear_probe(kept.labels, torch.cat(kept.features))
    return results


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model folder or checkpoint on shards; JSON of all figures")
    p.add_argument("--model", required=True, help="model folder (run.dir/model, hf export) or checkpoints/step_N")
    p.add_argument("--data", default=None, help="evaluation shards (same syntax as data.train)")
    p.add_argument("--images", default=None, help="alignment score: a folder of images (with --prompts)")
    p.add_argument("--prompts", default=None, help="alignment score: one prompt per image line (file-name order) "
                   "or a JSON {file name: prompt}")
    p.add_argument("--tasks", nargs="+", default=["retrieval"], choices=TASKS, help="tasks to run")
    p.add_argument("--class-names", nargs="+", default=None, help="class names (else classnames.json by the shards)")
    p.add_argument("--max-samples", type=int, default=0, help="samples to read (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest generated caption")
    p.add_argument("--beams", type=int, default=1, help="captioning: also beam search with this many beams (> 1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images (and texts) per forward")
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="autocast precision")
    p.add_argument("--out", default=None, help="JSON file for the figures (default: print only)")
    p.set_defaults(func=_cmd_eval)


def _alignment(model_dir: str, images: str, prompts: str) -> dict[str, Any]:
    from vlpretrain.eval.report import alignment_scores, read_prompts
    from vlpretrain.export.source import load_source

    pairs = read_prompts(images, prompts)
    loaded = load_source(model_dir)
    return {"model": str(model_dir), "alignment": alignment_scores(loaded.model, loaded.processor, pairs)}


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlpretrain.eval.report import write_sheet

    if (args.images is None) != (args.prompts is None) or (args.data is None and args.images is None):
        raise ValueError("give --data SHARDS, or --images FOLDER with --prompts FILE (alignment score), or both.")
    results: dict[str, Any] = {}
    if args.data is not None:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1.")
        settings = EvalSettings(args.device or default_device(), args.batch_size, args.precision)
        results = evaluate_model(args.model, args.data, tuple(args.tasks), args.class_names,
                                 max_samples=args.max_samples, max_new_tokens=args.max_new_tokens, beams=args.beams,
                                 settings=settings)
    if args.images is not None:
        results = {**_alignment(args.model, args.images, args.prompts), **results}
    text = json.dumps(results, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.data is not None:  # the sample sheet next to the JSON
            from vlpretrain.export.source import load_source

            samples = read_samples(args.data, load_source(args.model).processor, 8)
            write_sheet(out.with_suffix(".png"), [s.image for s in samples], results)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    print(text)
    return 0
