"""The evaluation a training run does on ``data.val``: retrieval, caption token accuracy, captions."""

from __future__ import annotations

from typing import Any

import torch

from vlpretrain.eval.metrics import multi_caption_recall
from vlpretrain.models.losses import next_token_loss


@torch.no_grad()
def evaluate(model, batches, tokenizer, max_samples: int, num_captions: int, max_new_tokens: int,
             device, captioning: bool = True) -> dict[str, Any]:
    """Figures of ``model`` (a VLModel) over validation ``batches`` (dicts of pixel_values/input_ids/...).

    ``retrieval`` recall@1/5 both ways and, when the model was trained to caption (``captioning``),
    teacher-forced ``caption_loss`` and ``caption_token_acc`` (next-token accuracy on real caption
    tokens) and ``captions``: a few greedy captions with their reference.
    """
    was_training = model.training
    model.eval()
    images, texts, refs, first_pixels = [], [], [], None
    loss_sum = correct = counted = 0.0
    seen = 0
    for batch in batches:
        px = batch["pixel_values"].to(device)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        images.append(model.encode_image(px).float().cpu())
        texts.append(model.encode_text(ids, mask).float().cpu())
        if first_pixels is None:
            first_pixels, refs = px[:num_captions], ids[:num_captions]
        seen += len(px)
        if captioning:
            loss_sum, correct, counted = _caption_figures(model, px, ids, mask, (loss_sum, correct, counted))
        if max_samples and seen >= max_samples:
            break
    if not images:
        raise RuntimeError("the validation stream gave no batch; check data.val.")
    img, txt = torch.cat(images)[:max_samples or None], torch.cat(texts)[:max_samples or None]
    out: dict[str, Any] = {"samples": len(img), **multi_caption_recall(img, txt, torch.arange(len(img)), ks=(1, 5))}
    if captioning:
        out.update(caption_loss=loss_sum / max(counted, 1), caption_token_acc=correct / max(counted, 1))
    if captioning and num_captions:
        generated = model.generate(first_pixels, max_new_tokens=max_new_tokens)
        out["captions"] = [{"generated": g, "reference": r} for g, r in zip(
            tokenizer.batch_decode(generated, skip_special_tokens=True),
            tokenizer.batch_decode(refs, skip_special_tokens=True))]
    model.train(was_training)
    return out


def _caption_figures(model, px, ids, mask, sums: tuple[float, float, float]) -> tuple[float, float, float]:
    """Running (loss x tokens, correct tokens, tokens) of teacher-forced next-token prediction."""
    loss_sum, correct, counted = sums
    logits = model(pixel_values=px, input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    real = mask[:, 1:].bool()
    n = real.sum().item()
    loss_sum += next_token_loss(logits, ids, mask).item() * n
    correct += (logits[:, :-1].argmax(-1) == ids[:, 1:])[real].sum().item()
    return loss_sum, correct, counted + n
