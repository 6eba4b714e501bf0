"""AdamW with decay only where it belongs, and the learning-rate schedule (from transformers)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from vlpretrain.config import OptimConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with decay; 1-D tensors (norms, biases) and the module's
    ``no_weight_decay()`` names (embeddings, positions, temperatures) without."""
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (CUDA and CPU: one pass over each tensor instead of a dozen
    ``foreach`` passes, ~5x faster on a CPU for a 12M-parameter model), foreach elsewhere."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None, foreach=None if fused else True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Warmup then cosine / linear / constant, via transformers' schedule library."""
    if cfg.schedule == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=total_steps, scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
    name = {"linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
