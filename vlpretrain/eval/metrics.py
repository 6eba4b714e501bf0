"""Evaluation figures as pure functions: multi-caption retrieval, top-k accuracy, caption scores."""

from __future__ import annotations

import re

import torch


def multi_caption_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                         ks=(1, 5, 10), chunk_elements: int = 1 << 24) -> dict[str, float]:
    """Recall@k both ways when an image has several captions (COCO / Flickr protocol).

    image_emb (N, E), text_emb (M, E) L2-normalised; text_to_image (M,) the image index of each
    caption. ``i2t_r@k``: share of images with ANY of their captions among the top k captions;
    ``t2i_r@k``: share of captions whose image is among the top k images (every caption ranks all
    N images). Ties count against the pair. The (N, M) similarities are computed a block of image rows
    at a time (about ``chunk_elements`` values), so memory grows with N + M, not N x M.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    N, M = len(image_emb), len(text_emb)
    rows = max(1, chunk_elements // max(M, 1))
    i2t_rank = torch.empty(N, dtype=torch.long)
    true = torch.empty(M)  # (M,) score of each caption's own image, from the same matmul as the others
    for a in range(0, N, rows):
        sim = image_emb[a:a + rows] @ text_emb.T  # (r, M)
        own = text_to_image[None, :] == torch.arange(a, a + len(sim))[:, None]  # (r, M) caption belongs to image
        best_own = sim.masked_fill(~own, float("-inf")).max(1).values  # (r,) best score of an own caption
        i2t_rank[a:a + rows] = (sim.masked_fill(own, float("-inf")) >= best_own[:, None]).sum(1)  # others above
        here = (text_to_image >= a) & (text_to_image < a + len(sim))  # (M,) captions of these images
        true[here] = sim[text_to_image[here] - a, here.nonzero()[:, 0]]
    t2i_at_least = torch.zeros(M, dtype=torch.long)  # (M,) images scoring at least the own one's score
    for a in range(0, N, rows):
        t2i_at_least += (image_emb[a:a + rows] @ text_emb.T >= true[None, :]).sum(0)
    t2i_rank = t2i_at_least - 1  # the own image is among them
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
