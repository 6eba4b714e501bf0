"""The transformer MLP, ``fc2(GELU(fc1(x)))`` with timm's parameter names, keeping one activation.

Autograd through a plain fc1 -> GELU -> fc2 keeps two (B, L, 4D) tensors for the backward: fc1's
output (GELU's input) and GELU's output (fc2's input). :class:`GeluLinear` keeps only the first and
recomputes GELU in the backward (one elementwise op, ~2% of a step), which drops 4·B·L·D values per
block: about a quarter of a ViT's activation memory. Outputs and gradients are the plain version's:
the backward runs the same matmuls in the dtype autocast gave the forward; with
``emulate_low_precision`` set (by the trainer, for CPUs without bf16/fp16 units, see
:mod:`vlpretrain.train.precision`) on fp32 kernels with operands and results rounded to that dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of low-precision operands on the fp32 kernel, rounded back: an emulated matmul."""
    return (a.float() @ b.float()).to(a.dtype)


class GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)`` that saves ``h`` (not ``gelu(h)``) for the backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, emulated: bool = False):
        out = F.linear(F.gelu(h), weight, bias)  # under autocast: autocast's dtype
        ctx.save_for_backward(h, weight)
        ctx.has_bias, ctx.emulated = bias is not None, emulated
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        dtype = grad.dtype  # the forward's output dtype: the one its matmul ran in
        with torch.autocast(grad.device.type, enabled=False):
            act = F.gelu(h).to(dtype).reshape(-1, h.shape[-1])
            g, w = grad.reshape(-1, grad.shape[-1]), weight.to(dtype)
            matmul = fp32_matmul if ctx.emulated else torch.matmul
            grad_act, grad_weight = matmul(g, w), matmul(g.t(), act)
            grad_h = torch.ops.aten.gelu_backward(grad_act.reshape(h.shape).to(h.dtype), h)
            grad_bias = g.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_h, grad_weight.to(weight.dtype), grad_bias, None


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's ``Mlp`` names and initialisation-free layout)."""

    emulate_low_precision: bool = False
    """Under CPU autocast, run the backward's matmuls on fp32 kernels (rounded like autocast's): set where
    the trainer emulates bf16/fp16 on a CPU without the units for them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def fuses(self) -> bool:
        """Whether a forward now takes :class:`GeluLinear`: when building a graph, and only while
        ``fc2`` is a plain ``nn.Linear`` (a LoRA- or otherwise wrapped fc2 gets called as itself)."""
        return torch.is_grad_enabled() and type(self.fc2) is nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.fuses():
            emulated = self.emulate_low_precision and torch.is_autocast_enabled("cpu")
            return GeluLinear.apply(h, self.fc2.weight, self.fc2.bias, emulated)
        return self.fc2(F.gelu(h))
