"""Loss maths as pure functions (no process group, no modules), each checked against a reference.

Conventions: ``b`` is this process's batch, ``N`` the batch of all processes (``N = world * b``),
``E`` the embedding width, ``V`` the vocabulary, ``P`` the number of image patches. Contrastive
functions take *this process's rows* and *every process's columns* in rank order, with ``offset``
the index of this process's first row among the columns (``rank * b``); the process group only
gathers (see :mod:`vlpretrain.objectives.distributed`). The mean over processes of these local
losses is the loss of the whole batch, so DDP's gradient average yields the whole-batch gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlpretrain.layers.draws import rand, randint
from vlpretrain.models.losses import IGNORE_INDEX


# ----------------------------------------------------------------------------------------------
# text: next-token and masked-token prediction (the next-token loss itself: vlpretrain.models.losses)


def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the positions counted by :func:`next_token_loss` whose argmax is the next token (logits
    with or without the last position, as there)."""
    targets = labels[:, 1:]  # (B, T-1)
    counted = targets != IGNORE_INDEX
    if attention_mask is not None:
        counted = counted & (attention_mask[:, 1:] != 0)
    hit = (logits[:, :targets.shape[1]].argmax(-1) == targets) & counted  # (B, T-1)
    return hit.sum().float() / counted.sum().clamp(min=1)


def mask_tokens(input_ids: torch.Tensor, candidates: torch.Tensor, mask_ratio: float, mask_token_id: int,
                vocab_size: int, mask_share: float = 0.8, random_share: float = 0.1,
                generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                stream: str = "mask_tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: (corrupted input_ids (B, T), labels (B, T) with IGNORE_INDEX unselected).

    Each candidate position (``candidates`` (B, T) bool: real, non-special tokens) is selected with
    probability ``mask_ratio``. A selected token becomes the mask token with probability
    ``mask_share``, a uniformly drawn vocabulary id with probability ``random_share``, and stays
    itself otherwise (80/10/10 by default). The loss is computed on every selected position.
    Drawn per caption from ``seeds`` (B,) under ``stream`` when given (layers/draws.py: position t's draws
    do not depend on the padded length T), else from torch's generator.
    """
    B, T = input_ids.shape
    device = input_ids.device
    selected = candidates & (rand(seeds, f"{stream}/select", B, (T,), device=device, generator=generator)
                             < mask_ratio)  # (B, T)
    action = rand(seeds, f"{stream}/action", B, (T,), device=device, generator=generator)  # mask / random / keep
    to_mask = selected & (action < mask_share)
    to_random = selected & (action >= mask_share) & (action < mask_share + random_share)
    random_ids = randint(seeds, f"{stream}/token", vocab_size, B, (T,), device=device, generator=generator)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the selected positions: logits (M, V), targets (M,).

    ``M = 0`` (nothing masked anywhere in the batch) gives 0 with the graph kept, never NaN.
    """
    token_loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return token_loss / max(targets.numel(), 1)


# ----------------------------------------------------------------------------------------------
# contrastive


def clip_loss(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
              logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Symmetric softmax InfoNCE (CLIP) of this process's rows against every process's columns.

    image, text (b, E) L2-normalised, all_image, all_text (N, E) holding them at ``offset``;
    logit_scale is the temperature's inverse ``s = exp(t)``, already clamped:

        L = 1/2 [ 1/b sum_i CE(s x_i . Y^T + bias, offset + i) + 1/b sum_i CE(s y_i . X^T + bias, offset + i) ]
    """
    labels = torch.arange(image.shape[0], device=image.device) + offset  # (b,)
    logits_per_image = logit_scale * image @ all_text.T  # (b, N)
    logits_per_text = logit_scale * text @ all_image.T  # (b, N)
    if logit_bias is not None:
        logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _siglip_block(image, text_block, logit_scale, logit_bias, diagonal: int):
    """-sum_ij log sigmoid(z_ij (s x_i . y_j + bias)) over one block of columns; z_ij = +1 iff j - i == diagonal."""
    logits = logit_scale * image @ text_block.T + logit_bias  # (b, c)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    cols = torch.arange(logits.shape[1], device=logits.device)[None, :]
    signs = torch.where(cols - rows == diagonal, 1.0, -1.0).to(logits.dtype)  # (b, c)
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(image: torch.Tensor, all_text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, offset: int = 0, chunk_size: int = 0) -> torch.Tensor:
    """Sigmoid loss (SigLIP) of this process's images against every process's texts.

    Every image-text pair is a binary problem, counted once (images as rows only):

        L = -1/b sum_i sum_j log sigmoid(z_ij (s x_i . y_j + bias)),  z_ij = +1 if j = offset + i else -1

    image (b, E), all_text (N, E). ``chunk_size > 0`` evaluates blocks of that many columns, each
    recomputed in the backward pass, so at most a (b, chunk_size) block of logits is ever alive.
    """
    if chunk_size <= 0 or chunk_size >= all_text.shape[0]:
        return _siglip_block(image, all_text, logit_scale, logit_bias, offset) / image.shape[0]
    total = image.new_zeros(())
    for start in range(0, all_text.shape[0], chunk_size):
        block = all_text[start:start + chunk_size]  # (c, E)
        total = total + checkpoint(_siglip_block, image, block, logit_scale, logit_bias, offset - start,
                                   use_reentrant=False)
    return total / image.shape[0]


@torch.no_grad()
def retrieval_accuracy(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor | None = None,
                       all_text: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 (image->text, text->image) accuracy of this rank's pairs ``image``/``text`` (b, E) retrieved
    from the pool of every rank's gathered columns ``all_image``/``all_text`` (N, E), where pair i is
    column ``offset + i``; without a pool, from the b pairs themselves. Averaged over ranks (equal b),
    it is the accuracy over the whole pool of N pairs."""
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    target = torch.arange(image.shape[0], device=image.device) + offset
    i2t = (image.float() @ all_text.float().T).argmax(1) == target  # (b,) over N texts
    t2i = (text.float() @ all_image.float().T).argmax(1) == target  # (b,) over N images
    return i2t.float().mean(), t2i.float().mean()


# ----------------------------------------------------------------------------------------------
# masked image modelling (MAE, He et al. 2022)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, patch*patch*C): patches in row-major order (as PatchEmbed), pixels (p, q, c)."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch * patch * C)


def norm_pix_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardised pixels: (x - mean) / sqrt(var + eps), var unbiased (MAE ``norm_pix_loss``)."""
    mean = patches.mean(dim=-1, keepdim=True)  # (B, P, 1)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)  # (B, P, 1)
    return (patches - mean) / (var + eps) ** 0.5


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred, target (B, P, K); mask (B, P) with 1 where the patch was hidden from the encoder:
        L = sum_bp m_bp * mean_k (pred - target)^2 / sum_bp m_bp
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, P)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                   stream: str = "random_masking"):
    """Per-sample random masking: (keep_idx (B, K), mask (B, P) 1 = hidden, ids_restore (B, P)).

    Patches are ranked by uniform noise (per image from ``seeds`` (B,) under ``stream`` when given, see
    layers/draws.py; else from torch's generator); the first ``K = round(P * (1 - mask_ratio))`` (at least 1)
    are kept, in that shuffled order. ``ids_restore`` undoes the shuffle: gathering
    ``[kept tokens ; mask tokens]`` with it puts every token back at its patch position.
    """
    keep = max(1, round(num_patches * (1 - mask_ratio)))
    noise = rand(seeds, stream, batch, (num_patches,), device=device, generator=generator)  # (B, P)
    ids_shuffle = noise.argsort(dim=1)  # (B, P)
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, P)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, P) in patch order
    return ids_shuffle[:, :keep], mask, ids_restore
