"""Which parameters no objective reaches, and so whether DDP must look for unused parameters.

DDP's ``find_unused_parameters=True`` walks the autograd graph after every forward to find parameters
that will get no gradient; it costs time each step and hides a configuration that trains weights it
never uses. The trainer decides once at start-up instead: a probe forward and backward of the objective
set on a tiny synthetic batch of the run's shapes lists the trainable parameters that got no gradient.
None: DDP runs without the search. Some: they are named in one start-up line and DDP searches.

The probe runs under ``torch.random.fork_rng`` (the run's random stream is untouched), reads nothing
from the data stream and clears the gradients it made. Every rank probes: an objective may all-gather
across ranks (contrastive), so the probe is a collective like a training step. The decision holds for
objectives whose use of a parameter does not depend on the batch's content; every built-in one is so.
Gradient accumulation reaches the same parameters on its last (synchronised) micro-step.
"""

from __future__ import annotations

import torch
from torch import nn

PROBE_BATCH = 4  # samples: enough that a random mask (masked_text at any ratio in use) selects something
PROBE_TEXT = 16  # caption tokens (capped at the model's context)


def probe_batch(config, device) -> dict[str, torch.Tensor]:
    """A synthetic batch of the model's shapes: random pixels, ``BOS tokens EOS`` captions of ordinary ids."""
    length = min(PROBE_TEXT, config.max_text_len)
    specials = {getattr(config, a, None) for a in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")}
    ordinary = torch.tensor([i for i in range(min(config.vocab_size, 512)) if i not in specials])
    ids = ordinary[torch.randint(len(ordinary), (PROBE_BATCH, length))]  # (B, T)
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    pixels = torch.randn(PROBE_BATCH, 3, config.image_size, config.image_size)  # (B, 3, S, S)
    return {"pixel_values": pixels.to(device), "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def unused_parameters(objective_set: nn.Module, device) -> list[str]:
    """Names of the trainable parameters of ``objective_set`` (an unwrapped ObjectiveSet on ``device``)
    that one training forward and backward leaves without a gradient."""
    params = [(n, p) for n, p in objective_set.named_parameters() if p.requires_grad]
    if any(p.grad is not None for _, p in params):
        raise RuntimeError("unused_parameters probes a model without gradients; call it before training.")
    devices = [device] if torch.device(device).type == "cuda" else []
    was_training = objective_set.training
    objective_set.train()
    try:
        with torch.random.fork_rng(devices=devices):
            objective_set(probe_batch(objective_set.model.config, device)).loss.backward()
        return [n for n, p in params if p.grad is None]
    finally:
        for _, p in params:
            p.grad = None
        objective_set.train(was_training)


def unused_note(names: list[str], later: list[str] = ()) -> str:
    """The start-up line naming the parameters no running objective reaches; ``later``: objectives that
    start after this step (``start``), which may be what trains them."""
    head = (f"{len(names)} trainable parameter(s) get no gradient from the objectives running now, so DDP "
            f"searches for unused parameters every step: {', '.join(names)}. ")
    if later:
        return head + (f"Objectives starting later ({', '.join(later)}) train theirs from their start; "
                       f"anything else here trains nothing.")
    return head + "Remove what trains nothing or add the objective that uses it."


def decide_ddp(accelerator, objective_set: nn.Module) -> list[str] | None:
    """Probe ``objective_set`` (before ``accelerator.prepare``) and give the accelerator the DDP kwargs that
    follow: ``find_unused_parameters`` only when some parameter is unused (named in a printed line).
    Returns the unused names; None under FSDP, which has no such search (nothing is probed)."""
    from accelerate import DistributedDataParallelKwargs
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    objective_set.to(accelerator.device)
    names = unused_parameters(objective_set, accelerator.device)
    accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=bool(names))  # read by prepare
    if names:
        step = getattr(objective_set, "step", 0)
        later = [k for k, s in getattr(objective_set, "schedules", {}).items() if s.start > step]
        accelerator.print(unused_note(names, later))
    return names


def ddp_record(module: nn.Module, unused: list[str] | None) -> dict:
    """What summary.json records: the wrapped DDP module's own ``find_unused_parameters`` (None when the
    run has no DDP wrapper) and the parameters the start-up probe found unused."""
    ddp = getattr(module, "_orig_mod", module)  # under torch.compile, the DDP module it wraps
    flag = ddp.find_unused_parameters if isinstance(ddp, nn.parallel.DistributedDataParallel) else None
    return {"find_unused_parameters": flag, "unused_parameters": unused}
