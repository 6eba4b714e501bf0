"""Worker of ``test_objectives_distributed``: one rank of a 2-process gloo run under torchrun.

Reads ``cases.pt`` from the folder given as argument (initial state dicts, the global batch and
each case's objectives, dtype and micro-batch count), trains one step per case through
``accelerator.prepare`` (DDP) and again sharded by the trainer's FSDP2 path
(:func:`vlpretrain.train.sharding.shard`), on this rank's half of the batch, and writes every
parameter's gradient after DDP's all-reduce / FSDP's reduce-scatter (gathered whole) to
``grads_rank{r}.pt`` (FSDP's under ``fsdp/<case>``), with the step's metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from objectives_support import grads_of, make_model

from vlpretrain.objectives import build_objective_set
from vlpretrain.objectives.distributed import world
from vlpretrain.train.accumulate import accumulate_backward
from vlpretrain.train.sharding import FsdpSettings, shard


def main(folder: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, size = world()
    assert size == 2 == accelerator.num_processes, f"expected 2 processes, got world size {size}"
    data = torch.load(folder / "cases.pt")
    batch = data["batch"]
    per_rank = batch["input_ids"].shape[0] // size
    local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    results = {"world_size": size, "backend": torch.distributed.get_backend()}
    for (name, case), fsdp in [(item, fsdp) for fsdp in (False, True) for item in data["cases"].items()]:
        objectives = build_objective_set(make_model(), case["entries"]).to(case["dtype"])
        objectives.load_state_dict(case["state"])
        wrapped = shard(objectives, accelerator.device, FsdpSettings()) if fsdp else accelerator.prepare(objectives)
        if case["micro_batches"] == 1:
            out = wrapped(local)
            accelerator.backward(out.loss)
        else:
            k = case["micro_batches"]
            parts = [dict(zip(local, vals)) for vals in zip(*(v.chunk(k) for v in local.values()))]
            out = accumulate_backward(wrapped, parts, accelerator=accelerator)
        if fsdp:
            grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads_of(wrapped).items()}
            results[f"fsdp/{name}"] = {"grads": grads, "loss": out.loss.detach(), "metrics": out.metrics,
                                       "sharded": type(wrapped.objectives["contrastive"].logit_scale).__name__}
        else:
            results[name] = {"grads": grads_of(accelerator.unwrap_model(wrapped)), "loss": out.loss.detach(),
                             "metrics": out.metrics}
    torch.save(results, folder / f"grads_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
