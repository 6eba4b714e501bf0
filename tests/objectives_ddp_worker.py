"""Worker of ``test_objectives_distributed``: one rank of a 2-process gloo run under torchrun.

Reads ``cases.pt`` from the folder given as argument (initial state dicts, the global batch and
each case's objectives, dtype and micro-batch count), trains one step per case through
``accelerator.prepare`` (DDP) on this rank's half of the batch, and writes every parameter's
gradient after DDP's all-reduce to ``grads_rank{r}.pt``.
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


def main(folder: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, size = world()
    assert size == 2 == accelerator.num_processes, f"expected 2 processes, got world size {size}"
    data = torch.load(folder / "cases.pt")
    batch = data["batch"]
    per_rank = batch["input_ids"].shape[0] // size
    local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    results = {"world_size": size, "backend": torch.distributed.get_backend()}
    for name, case in data["cases"].items():
        objectives = build_objective_set(make_model(), case["entries"]).to(case["dtype"])
        objectives.load_state_dict(case["state"])
        wrapped = accelerator.prepare(objectives)
        if case["micro_batches"] == 1:
            out = wrapped(local)
            accelerator.backward(out.loss)
        else:
            k = case["micro_batches"]
            parts = [dict(zip(local, vals)) for vals in zip(*(v.chunk(k) for v in local.values()))]
            out = accumulate_backward(wrapped, parts, accelerator=accelerator)
        results[name] = {"grads": grads_of(accelerator.unwrap_model(wrapped)), "loss": out.loss.detach()}
    torch.save(results, folder / f"grads_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
