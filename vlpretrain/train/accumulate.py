"""Gradient accumulation that is exact for contrastive losses (feature caching, GradCache).

Accumulating a contrastive loss naively (one loss per micro-batch) shrinks the set of negatives to
one micro-batch: k micro-batches of b are not a batch of k*b. Here they are (Gao et al. 2021):

1. a no-grad pass over every micro-batch collects the embeddings of the batch-coupled objectives;
2. the coupled losses are computed once on the full set, giving dLoss/d(embeddings) for every
   row and the exact big-batch gradient of their own parameters (logit scale and bias);
3. each micro-batch is recomputed with gradients and backpropagates the surrogate
   ``<embedding, cached gradient>`` (whose gradient upstream is the big-batch gradient), plus on
   the last micro-step ``<parameter, cached gradient>``, plus its other (per-example) losses
   weighted by its share of the examples.

Random draws (patch dropout, masking) repeat in the recompute: a batch with per-sample seeds
(``sample_seed``, layers/draws.py) draws from them, the same in both passes by construction;
without, each micro-batch's recompute starts from the RNG state its no-grad pass started from. Under
DDP / Accelerate, the recompute of every micro-batch but the last runs under ``no_sync``, so
gradients are all-reduced once; under FSDP2 under ``set_requires_gradient_sync(False)``, so they are
reduce-scattered once. Under FSDP2, step 2 runs outside the forward, where the parameters are
shards: the root's parameters (the objectives' own, such as the logit scale) are gathered for it, so
their gradient is the full, exact one. Per-example-mean losses are exact; token-mean losses
(captioning, masked_text) are averaged per micro-batch and weighted by examples, which is the same
approximation DDP makes across ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from vlpretrain.objectives.combine import GradCache, ObjectiveSet, ObjectiveSetOutput
from vlpretrain.train.sharding import full_root_parameters, gradient_sync_off, is_sharded


def _unwrap(module: Any) -> ObjectiveSet:
    inner = module
    while not isinstance(inner, ObjectiveSet) and (hasattr(inner, "module") or hasattr(inner, "_orig_mod")):
        inner = getattr(inner, "_orig_mod", None) or inner.module  # torch.compile, DDP, accelerate wrappers
    if not isinstance(inner, ObjectiveSet):
        raise TypeError(f"accumulate_backward takes an ObjectiveSet (or a DDP/accelerate wrapper of one), "
                        f"got {type(module).__name__}; build it with build_objective_set(model, entries).")
    return inner


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("a micro-batch holds no tensors; pass dicts with pixel_values and/or input_ids.")


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def backward(loss: torch.Tensor, accelerator: Any = None) -> None:
    """``loss.backward()`` (through ``accelerator`` when given) outside autocast, as PyTorch advises:
    inside it, the backward matmuls of ops the forward ran in fp32 on purpose (the contrastive
    logits) would be cast down to bf16/fp16."""
    with torch.autocast(loss.device.type, enabled=False):
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()


def accumulate_backward(module: Any, micro_batches: Sequence[dict], accelerator: Any = None
                        ) -> ObjectiveSetOutput:
    """Backpropagate the loss of the union of ``micro_batches`` as if it were one batch.

    module: an :class:`ObjectiveSet`, or its DDP / ``accelerator.prepare`` wrapper (its forward
    is called, so DDP hooks run). accelerator: when given, its ``no_sync`` and ``backward`` are
    used (mixed-precision scaling included); configure it with ``gradient_accumulation_steps=1``,
    as this function does the accumulation. Returns the (detached) big-batch loss, per-objective
    losses and metrics; the caller then steps the optimiser.
    """
    if not micro_batches:
        raise ValueError("accumulate_backward got no micro-batches.")
    if accelerator is not None and getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
        raise ValueError("the Accelerator has gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}, which would rescale these gradients; "
                         "create it with gradient_accumulation_steps=1 and let accumulate_backward accumulate.")
    inner = _unwrap(module)
    coupled = inner.coupled()
    sizes = [_batch_size(b) for b in micro_batches]
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    total = float(bounds[-1])

    # 1. no-grad pass: embeddings of the coupled objectives, and the RNG state each pass starts from
    states, pieces = [], {key: {} for key in coupled}
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state())
            if coupled:
                for key, embs in module(batch, embed_only=True).embeddings.items():
                    for name, emb in embs.items():
                        pieces[key].setdefault(name, []).append(emb)

    # 2. the coupled losses on the whole set: gradients of every embedding row and of own parameters
    result = ObjectiveSetOutput(losses={}, metrics={})
    embedding_grads, param_grads, report = {}, {}, 0.0
    with full_root_parameters(inner):
        _coupled_losses(coupled, pieces, result, embedding_grads, param_grads)
    for key, obj in coupled.items():
        report = report + obj.weight * result.losses[key]

    # 3. recompute each micro-batch with gradients; all-reduce only on the last
    for i, batch in enumerate(micro_batches):
        _set_rng_state(states[i])
        last = i == len(micro_batches) - 1
        lo, hi = bounds[i], bounds[i + 1]
        cache = GradCache({k: {n: g[lo:hi] for n, g in grads.items()} for k, grads in embedding_grads.items()},
                          param_grads if last else {}, sizes[i] / total)
        if last:
            sync = contextlib.nullcontext()
        elif is_sharded(module):
            sync = gradient_sync_off(module)
        elif accelerator is not None:
            sync = accelerator.no_sync(module)
        else:
            sync = module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()
        with sync:
            out = module(batch, grad_cache=cache)
            backward(out.loss, accelerator)
        for key, value in out.losses.items():  # per-example objectives: example-weighted means
            obj_weight = inner.objectives[key].weight
            result.losses[key] = result.losses.get(key, 0.0) + value * cache.share
            report = report + obj_weight * value * cache.share
        for name, value in out.metrics.items():
            result.metrics[name] = result.metrics.get(name, 0.0) + value * cache.share
    result.loss = torch.as_tensor(report)
    return result


def _coupled_losses(coupled: dict, pieces: dict, result: ObjectiveSetOutput, embedding_grads: dict,
                    param_grads: dict) -> None:
    """Step 2: each coupled loss on the whole set of cached embeddings; fills its loss and metrics into
    ``result``, and the gradients of every embedding row and of its own parameters."""
    for key, obj in coupled.items():
        leaves = {name: torch.cat(parts).detach().requires_grad_() for name, parts in pieces[key].items()}
        res = obj.loss_from_embeddings(leaves)
        params = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
        with torch.autocast(res.loss.device.type, enabled=False):  # see backward()
            grads = torch.autograd.grad(obj.weight * res.loss, list(leaves.values()) + [p for _, p in params],
                                        allow_unused=True)
        embedding_grads[key] = {n: g for n, g in zip(leaves, grads[:len(leaves)]) if g is not None}
        param_grads[key] = {n: g for (n, _), g in zip(params, grads[len(leaves):]) if g is not None}
        result.losses[key] = res.loss.detach()
        # copies: a metric may be a view of a parameter (the logit bias), whose gathered storage FSDP frees next
        result.metrics.update({f"{key}/{m}": v.detach().clone() for m, v in res.metrics.items()})
