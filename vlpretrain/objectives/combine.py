"""The weighted sum of the configured objectives, from the fewest forwards.

:class:`ObjectiveSet` is the module a trainer optimises (and wraps in DDP / ``accelerator.prepare``):
it owns the model and the objectives (whose own parameters, e.g. the logit scale or an MAE
decoder, are thereby trained and synchronised too). Its forward checks the batch, runs the shared
forward for the union of the objectives' ``needs`` once, then each objective, and returns the
total loss with per-objective losses and metrics.

It also serves exact gradient accumulation for batch-coupled objectives
(:mod:`vlpretrain.train.accumulate`): ``embed_only=True`` returns their embeddings, and
``grad_cache=`` turns the total into the surrogate whose gradient is the big-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vlpretrain.objectives.base import CoupledObjective, Objective
from vlpretrain.objectives.shared import shared_forward

# what each batch entry is, for error messages
_KEY_HELP = {"pixel_values": "images", "input_ids": "caption token ids", "attention_mask": "caption mask"}


@dataclass
class ObjectiveSetOutput:
    """``loss`` (to backpropagate), per-objective unweighted ``losses`` and ``metrics`` (detached)."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # "objective/metric"
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # embed_only


@dataclass
class GradCache:
    """What one micro-batch's recompute pass needs (built by :mod:`vlpretrain.train.accumulate`).

    embedding_grads: objective -> embedding name -> dLoss/d(embedding) of this micro-batch's rows;
    param_grads: objective -> parameter name -> dLoss/d(parameter) of the coupled loss (given on one
    micro-step only); share: this micro-batch's share of the examples, weighting the other losses.
    """

    embedding_grads: dict[str, dict[str, torch.Tensor]]
    param_grads: dict[str, dict[str, torch.Tensor]]
    share: float


class ObjectiveSet(nn.Module):
    """A model and its objectives: ``forward(batch)`` gives the weighted total loss."""

    def __init__(self, model: nn.Module, objectives: Sequence[Objective]):
        super().__init__()
        if not objectives:
            raise ValueError("no objectives configured; add at least one entry under `objectives`.")
        names = [o.name for o in objectives]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"objective(s) {dupes} configured more than once; keep one entry per name.")
        self.model = model
        # coupled objectives first: accumulation replays their embeddings, which must draw the same
        # random numbers in both passes (the shared forward runs before everything else)
        ordered = sorted(objectives, key=lambda o: not o.coupled)
        self.objectives = nn.ModuleDict({o.name: o for o in ordered})
        self.needs = frozenset().union(*(o.needs for o in objectives))

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters()``) to keep out of weight decay."""
        names = {f"model.{n}" for n in self.model.no_weight_decay()}
        for key, obj in self.objectives.items():
            names |= {f"objectives.{key}.{n}" for n in obj.no_weight_decay()}
        return names

    def coupled(self) -> dict[str, CoupledObjective]:
        return {k: o for k, o in self.objectives.items() if o.coupled}

    def check_batch(self, batch: dict) -> dict:
        """The batch with ``attention_mask`` filled in (ids != pad) if absent; a clear error if an objective lacks input."""
        have = sorted(k for k, v in batch.items() if v is not None)
        for key, obj in self.objectives.items():
            for need in obj.batch_keys:
                if batch.get(need) is None:
                    raise ValueError(f"objective '{key}' needs '{need}' ({_KEY_HELP.get(need, need)}) in the batch, "
                                     f"but the batch has only {have}; feed image-text pairs or remove '{key}' "
                                     f"from `objectives`.")
        if batch.get("input_ids") is not None and batch.get("attention_mask") is None:
            batch = {**batch, "attention_mask": (batch["input_ids"] != self.model.config.pad_token_id).long()}
        return batch

    def forward(self, batch: dict, *, embed_only: bool = False, grad_cache: GradCache | None = None
                ) -> ObjectiveSetOutput:
        batch = self.check_batch(batch)
        shared = shared_forward(self.model, batch, self.needs)
        out = ObjectiveSetOutput()
        if embed_only:
            out.embeddings = {k: o.embed(self.model, batch, shared) for k, o in self.coupled().items()}
            return out
        terms = []
        for key, obj in self.objectives.items():
            if grad_cache is not None and obj.coupled:
                # surrogate: <embedding, cached gradient> (+ <parameter, its gradient> once) has the
                # gradient of the whole-batch coupled loss with respect to everything upstream
                grads = grad_cache.embedding_grads[key]
                term = sum((emb * grads[name]).sum()
                           for name, emb in obj.embed(self.model, batch, shared).items() if name in grads)
                params = dict(obj.named_parameters())
                for name, grad in grad_cache.param_grads.get(key, {}).items():
                    term = term + (params[name] * grad).sum()
            else:
                res = obj(self.model, batch, shared)
                out.losses[key] = res.loss.detach()
                out.metrics.update({f"{key}/{m}": v.detach() for m, v in res.metrics.items()})
                term = obj.weight * res.loss * (grad_cache.share if grad_cache is not None else 1.0)
            terms.append(term)
        # a new tensor, never one the output also holds detached: with one objective of weight 1 the total
        # is its loss, and torch.compile's inductor then returned one tensor for both outputs, marked
        # non-differentiable (the compiled loss had no graph; torch 2.14, tests/test_compile.py)
        out.loss = torch.stack(terms).sum()
        return out
