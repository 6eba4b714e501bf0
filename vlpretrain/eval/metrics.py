"""Evaluation figures as pure functions: multi-caption retrieval, top-k accuracy, caption scores."""

from __future__ import annotations

import re

import torch


def multi_caption_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                         ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways when an image has several captions (COCO / Flickr protocol).

    image_emb (N, E), text_emb (M, E) L2-normalised; text_to_image (M,) the image index of each
    caption. ``i2t_r@k``: share of images with ANY of their captions among the top k captions;
    ``t2i_r@k``: share of captions whose image is among the top k images (every caption ranks all
    N images). Ties count against the pair.
    """
    sim = image_emb.float() @ text_emb.float().T  # (N, M)
    own = text_to_image[None, :] == torch.arange(len(image_emb))[:, None]  # (N, M) caption belongs to image
    best_own = sim.masked_fill(~own, float("-inf")).max(1).values  # (N,) best score of an own caption
    i2t_rank = (sim.masked_fill(own, float("-inf")) >= best_own[:, None]).sum(1)  # (N,) others ranked above
    true = sim[text_to_image, torch.arange(len(text_emb))]  # (M,) score of each caption's own image
    t2i_rank = (sim >= true[None, :]).sum(0) - 1  # (M,) other images scoring at least as high
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r@{k}"] = (t2i_rank < k).float().mean().item()
    return out


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """logits (N, K), labels (N,): share of samples whose label is among the k highest logits."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    return {f"top{k}": (top[:, :k] == labels[:, None]).any(1).float().mean().item() for k in ks}


def _tokens(text: str) -> str:
    """Lower-case words without punctuation (what COCO's PTB tokenizer yields for plain captions;
    the PTB tokenizer itself needs Java and is not used)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(generated: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr(-D) of ``generated`` against every reference, with pycocoevalcap's
    pure-Python scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(generated) != len(references) or not generated:
        raise ValueError(f"{len(generated)} captions for {len(references)} reference lists.")
    gts = {i: [_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_tokens(g) or "<empty>"] for i, g in enumerate(generated)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
