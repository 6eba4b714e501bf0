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
    return _split(list(module.named_parameters()), skip, weight_decay)


def _split(named: list[tuple[str, nn.Parameter]], skip: set[str], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def part_groups(parts: list, weight_decay: float) -> list[dict]:
    """AdamW groups of an ObjectiveSet's ``parameter_parts``: the two groups of :func:`param_groups` for
    the first part (kept even when empty), then the non-empty decay / no-decay groups of each later part."""
    groups = []
    for i, (_, named, skip) in enumerate(parts):
        split = _split(named, skip, weight_decay)
        groups += split if i == 0 else [g for g in split if g["params"]]
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device,
                    start_step: int = 0) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (CUDA and CPU: one pass over each tensor instead of a dozen
    ``foreach`` passes, ~5x faster on a CPU for a 12M-parameter model), foreach elsewhere.
    An ObjectiveSet contributes the parameters it trains when step ``start_step`` is about to run (the
    resumed step): objectives starting later join through :func:`add_started_groups`."""
    fused = device.type in ("cuda", "cpu")
    groups = (part_groups(module.parameter_parts(start_step), cfg.weight_decay)
              if hasattr(module, "parameter_parts") else param_groups(module, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None, foreach=None if fused else True)


def add_started_groups(optimizer, scheduler, parts: list, cfg: OptimConfig) -> int:
    """Append the groups of newly started objectives (``ObjectiveSet.parts_starting_at(step)``) to
    ``optimizer`` and to its LambdaLR ``scheduler`` (or their Accelerate wrappers), at this step's
    learning rate; returns the number of groups added. Their AdamW state is created by their first update."""
    inner_opt = getattr(optimizer, "optimizer", optimizer)
    inner_sched = getattr(scheduler, "scheduler", scheduler)
    added = 0
    for group in part_groups([("none", [], set())] + list(parts), cfg.weight_decay)[2:]:
        factor = inner_sched.lr_lambdas[0](inner_sched.last_epoch)
        inner_opt.add_param_group({**group, "initial_lr": cfg.lr, "lr": cfg.lr * factor})
        inner_sched.base_lrs.append(cfg.lr)
        inner_sched.lr_lambdas.append(inner_sched.lr_lambdas[0])
        added += 1
    if added:
        inner_sched._last_lr = [g["lr"] for g in inner_opt.param_groups]
    return added


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Warmup then cosine / linear / constant, via transformers' schedule library."""
    if cfg.schedule == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=total_steps, scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
    name = {"linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
