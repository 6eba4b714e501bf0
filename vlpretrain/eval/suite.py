"""``vlpretrain eval --model DIR --data SHARDS [--tasks ...] [--out FILE]``: every figure as one JSON.

Tasks: ``retrieval`` (multi-caption R@1/5/10 both ways), ``zeroshot`` (top-1/top-5 from class names
and prompt templates), ``captioning`` (greedy and, with ``--beams N``, beam-search captions; BLEU-4 and
CIDEr against all references), ``linear_probe`` (logistic regression on frozen image features, half
the samples to fit, half to test), ``reconstruction`` (MSE/PSNR of the masked_image decoder on hidden
patches; needs a checkpoint trained with that objective).
``--images FOLDER --prompts FILE`` adds the CLIPScore-style alignment score; with ``--out FILE.json`` a
PNG sheet of sample images, captions and top retrieved texts is written next to it as ``FILE.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from vlpretrain.eval.beam import beam_search
from vlpretrain.eval.metrics import caption_scores, multi_caption_recall, topk_accuracy
from vlpretrain.eval.samples import EvalSample, load_class_names, read_samples
from vlpretrain.finetune import DEFAULT_TEMPLATES, class_text_embeddings

TASKS = ("retrieval", "zeroshot", "captioning", "linear_probe", "reconstruction")


@torch.no_grad()
def _image_embeddings(model, processor, samples: list[EvalSample], batch: int = 64):
    """(N, E) normalised image embeddings and (N, D) pooled pre-projection features."""
    embs, feats = [], []
    for i in range(0, len(samples), batch):
        pixels = processor(images=[s.image for s in samples[i:i + batch]])["pixel_values"]  # (B, 3, S, S)
        cls = model.forward_features(pixels)[:, 0]  # (B, D)
        feats.append(cls)
        embs.append(torch.nn.functional.normalize(model.image_proj(cls), dim=-1))
    return torch.cat(embs), torch.cat(feats)


@torch.no_grad()
def _retrieval(model, processor, samples, image_emb) -> dict[str, float]:
    texts = [(i, c) for i, s in enumerate(samples) for c in s.captions]
    if len(texts) < len(samples) or any(not s.captions for s in samples):
        raise ValueError("retrieval needs captions (.txt or .json) for every sample; these shards have "
                         f"{sum(1 for s in samples if not s.captions)} of {len(samples)} without. Drop the task.")
    emb = []
    for i in range(0, len(texts), 256):
        batch = processor(text=[c for _, c in texts[i:i + 256]])
        emb.append(model.encode_text(batch["input_ids"], batch["attention_mask"]))
    owner, text_emb = torch.tensor([i for i, _ in texts]), torch.cat(emb)
    top = (image_emb[:8] @ text_emb.T).argmax(1).tolist()  # the best caption of the first images (sheet)
    return {**multi_caption_recall(image_emb, text_emb, owner), "captions": len(texts),
            "examples": [texts[j][1] for j in top]}


def _labels(samples, task: str) -> torch.Tensor:
    missing = sum(1 for s in samples if s.label is None)
    if missing:
        raise ValueError(f"{task} needs a .cls label per sample; {missing} of {len(samples)} samples have none.")
    return torch.tensor([s.label for s in samples])


@torch.no_grad()
def _zeroshot(model, processor, samples, image_emb, class_names, templates) -> dict[str, float]:
    labels = _labels(samples, "zeroshot")
    if class_names is None:
        raise ValueError("zeroshot needs class names: a classnames.json next to the shards or --class-names.")
    if int(labels.max()) >= len(class_names) or int(labels.min()) < 0:
        raise ValueError(f"{len(class_names)} class names, but the labels run from {int(labels.min())} to "
                         f"{int(labels.max())}; give one name per class index.")
    logits = image_emb @ class_text_embeddings(model, processor, class_names, templates).T  # (N, K)
    return topk_accuracy(logits, labels)


@torch.no_grad()
def _captioning(model, processor, samples, max_new_tokens: int, beams: int = 1) -> dict[str, Any]:
    """Greedy captions (and, with ``beams`` > 1, beam-search captions) scored against all references."""
    if any(not s.captions for s in samples):
        raise ValueError("captioning needs reference captions for every sample (.txt or .json).")
    greedy, beam = [], []
    for i in range(0, len(samples), 64):
        pixels = processor(images=[s.image for s in samples[i:i + 64]])["pixel_values"]
        greedy += processor.batch_decode(model.generate(pixels, max_new_tokens=max_new_tokens))
        if beams > 1:
            beam += processor.batch_decode(beam_search(model, pixels, beams, max_new_tokens)[0])
    references = [s.captions for s in samples]
    out: dict[str, Any] = {"greedy": caption_scores(greedy, references)}
    if beams > 1:
        out[f"beam{beams}"] = caption_scores(beam, references)
    out["examples"] = [{"generated": g, **({"beam": beam[j]} if beam else {}), "references": s.captions[:3]}
                       for j, (g, s) in enumerate(zip(greedy[:8], samples))]
    return out


def _linear_probe(samples, features) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    labels = _labels(samples, "linear_probe").numpy()
    half = len(samples) // 2
    if half < 2 or len(set(labels[:half])) < 2:
        raise ValueError("linear_probe needs at least 4 samples and two classes in the first half.")
    x = features.numpy()
    probe = LogisticRegression(max_iter=1000, C=1.0).fit(x[:half], labels[:half])
    return {"top1": float((probe.predict(x[half:]) == labels[half:]).mean()), "train": half,
            "test": len(samples) - half}


def evaluate_model(model_dir: str, data: str, tasks: tuple[str, ...] = ("retrieval",), class_names=None,
                   templates=DEFAULT_TEMPLATES, max_samples: int = 0, max_new_tokens: int = 24,
                   beams: int = 1) -> dict[str, Any]:
    """Every requested figure of the model at ``model_dir`` (any folder ``load_source`` reads) on ``data``."""
    from vlpretrain.export.source import load_source

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task(s) {sorted(unknown)}; valid: {', '.join(TASKS)}.")
    loaded = load_source(model_dir)
    model, processor = loaded.model, loaded.processor
    samples = read_samples(data, processor, max_samples)
    image_emb, features = _image_embeddings(model, processor, samples)
    results: dict[str, Any] = {"model": str(model_dir), "data": data, "samples": len(samples)}
    for task in tasks:
        if task == "retrieval":
            results[task] = _retrieval(model, processor, samples, image_emb)
        elif task == "zeroshot":
            results[task] = _zeroshot(model, processor, samples, image_emb, load_class_names(data, class_names),
                                      templates)
        elif task == "captioning":
            results[task] = _captioning(model, processor, samples, max_new_tokens, beams)
        elif task == "reconstruction":
            from vlpretrain.eval.reconstruction import reconstruction_figures

            results[task] = reconstruction_figures(model_dir, loaded, samples)
        else:
            results[task] = _linear_probe(samples, features)
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
        results = evaluate_model(args.model, args.data, tuple(args.tasks), args.class_names,
                                 max_samples=args.max_samples, max_new_tokens=args.max_new_tokens, beams=args.beams)
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
