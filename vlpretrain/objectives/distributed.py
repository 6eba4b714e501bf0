"""The one collective the objectives use: an all-gather whose backward sends gradients home.

Rank ``r`` computes its local loss ``L_r`` against the gathered columns of every rank, so
``dL_r / d(features of rank s)`` is produced on rank ``r``. The backward of the gather sums these
over ``r`` and hands rank ``s`` its slice: ``d(sum_r L_r) / d f_s``. DDP then averages parameter
gradients over ranks, giving ``d(mean_r L_r) / d theta``, which is exactly the gradient of the
loss of the whole batch. (A gather without gradient drops the ``r != s`` terms; a global loss
computed identically on every rank and gathered with gradient counts them ``world`` times.)

Every rank must hold the same number of examples (the data pipeline drops the ragged last batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (world * b, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()  # (world * b, ...) this rank's dL_r / d(all features)
        if dist.get_backend() == dist.Backend.NCCL:  # reduce-scatter: each rank receives its summed slice
            out = grad.new_empty(ctx.rows, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad)
            return out
        total = grad.clone()  # gloo has no reduce-scatter: sum everything, keep this rank's rows
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on every rank -> (world * b, ...) in rank order; gradients flow back to their owner."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)
