"""Image-text retrieval recall: pure functions on embeddings."""

from __future__ import annotations

import torch


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways for paired rows: image i's caption is text i.

    image_emb (N, E), text_emb (N, E), L2-normalised. ``i2t_r@k``: share of images whose caption
    ranks in the top k of all N captions; ``t2i_r@k``: share of captions whose image ranks in the
    top k of all N images. Ties count against the pair (a strict rank).
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must pair up.")
    sim = image_emb.float() @ text_emb.float().T  # (N, N)
    true = sim.diagonal()  # (N,)
    # rank of the true pair = how many candidates score strictly higher, or equal with another index
    i2t_rank = (sim > true[:, None]).sum(1) + ((sim == true[:, None]).sum(1) - 1)
    t2i_rank = (sim > true[None, :]).sum(0) + ((sim == true[None, :]).sum(0) - 1)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r@{k}"] = (t2i_rank < k).float().mean().item()
    return out
