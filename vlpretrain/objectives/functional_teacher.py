"""Loss maths of the teacher objectives as pure functions (no modules, no process group).

Self-distillation (DINO, Caron et al. 2021; SILC, Naeem et al. 2023): the teacher's prototype logits
are centred (minus an EMA of their batch mean, which keeps one prototype from winning everything)
and sharpened (a low temperature, which keeps the distribution from going uniform); the student's
logits of each local view are matched to them by cross-entropy. Masked feature prediction (iBOT,
TIPS): the student's prediction at each masked patch is compared to the teacher's feature there.

Shapes: ``B`` images, ``V`` student views per image, ``K`` prototypes, ``N`` patches, ``D`` features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlpretrain.layers.draws import rand


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution: softmax((t - c) / tau_t), in fp32. (B, K), c (K,) or (1, K)."""
    return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


def distillation_loss(student_logits: torch.Tensor, probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Cross-entropy of each student view to the teacher, averaged over views and images:

        L = 1/(V B) sum_v sum_b sum_k -p_bk log softmax(s_vb / tau_s)_k

    student_logits (V, B, K), probs (B, K) (from :func:`teacher_probs`, no gradient)."""
    log_student = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (V, B, K)
    return -(probs.detach()[None] * log_student).sum(-1).mean()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy (nats) of each row's distribution: (B, K) -> ()."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()


def effective_prototypes(probs: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the batch-mean distribution: how many prototypes the batch uses (1 when
    the teacher collapsed onto one, K when all are used evenly). (B, K) -> ()."""
    return entropy(probs.mean(0, keepdim=True)).exp()


def center_update(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO's centre EMA: c <- m c + (1 - m) mean_b t_b."""
    return center * momentum + batch_mean * (1 - momentum)


def random_patch_mask(batch: int, num_patches: int, mask_ratio: float, device=None,
                      generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                      stream: str = "patch_mask") -> torch.Tensor:
    """(B, N) bool: exactly ``round(N * mask_ratio)`` (at least 1, at most N - 1) random patches per image;
    drawn per image from ``seeds`` (B,) under ``stream`` when given (layers/draws.py), else from torch's generator."""
    hidden = min(max(1, round(num_patches * mask_ratio)), num_patches - 1)
    noise = rand(seeds, stream, batch, (num_patches,), device=device, generator=generator)  # (B, N)
    rank = noise.argsort(1).argsort(1)  # a random permutation
    return rank < hidden


def masked_feature_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine loss at the masked patches: (mean of 1 - cos(pred, target), mean cosine), in fp32.

    pred, target (M, D): the student's predictions and the teacher's features at the M masked patches
    of the batch. Cosine rather than a squared error: it ignores the features' scale, which the
    teacher's final norm gains set and drift, so the loss is bounded (in [0, 2]) whatever the width."""
    cos = F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)  # (M,)
    if cos.numel() == 0:
        return pred.sum() * 0.0, cos.sum()
    return (1 - cos).mean(), cos.detach().mean()
