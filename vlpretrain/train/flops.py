"""Model FLOPs of a training step, counted from the shapes that actually ran, and MFU.

Forward hooks on every ``nn.Linear`` / ``nn.Conv2d``, every attention module and every MLP (whose fc2
runs inside :class:`~vlpretrain.layers.mlp.GeluLinear`) add the FLOPs of
the call from its real input shape (so dynamic text padding, MAE's visible-patch subset, FLIP patch
dropout and every objective's extra forwards are counted as they ran). Only forwards that build a
graph count, and never the recompute inside ``backward`` (activation checkpointing): model FLOPs,
not hardware FLOPs. A step's FLOPs are 3x its forward FLOPs (backward ~ 2x forward).

Modules that run forward only, without a graph and without a backward (the EMA teacher of
:mod:`vlpretrain.objectives.teacher`, under ``no_grad``), are named by ``forward_only``: their calls
count once (1x, no backward), so MFU does not drop when the teacher starts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import torch
from torch import nn

from vlpretrain.layers.attention import Attention
from vlpretrain.layers.mlp import Mlp

# Dense peaks (FLOP/s) of known GPUs from their datasheets: (name pattern, bf16/fp16 tensor core, fp32).
# Matched as whole words of torch.cuda.get_device_name, most specific first: "L4" is not "L40", an
# "H100 PCIe" is not the SXM part ("NVIDIA H100 80GB HBM3"). Unknown names get no MFU.
GPU_PEAKS: list[tuple[str, float, float]] = [
    (r"H200 NVL", 835e12, 60e12), (r"H200", 989e12, 67e12),
    (r"H100 PCIE", 756e12, 51e12), (r"H100 NVL", 835e12, 60e12), (r"H100", 989e12, 67e12),
    (r"A100", 312e12, 19.5e12),
    (r"L40S", 362e12, 91.6e12), (r"L40", 181e12, 90.5e12), (r"L4", 121e12, 30.3e12),
    (r"A10G?", 125e12, 31.2e12),
    (r"RTX 4090", 165e12, 82.6e12),
    (r"V100.*PCIE", 112e12, 14e12), (r"V100", 125e12, 15.7e12),
]


def gpu_peak_flops(name: str, low_precision: bool) -> float | None:
    """The datasheet peak of the GPU called ``name`` (as torch.cuda.get_device_name says it), or None."""
    words = " ".join(re.split(r"[\s_-]+", name.upper()))  # "A100-SXM4-80GB" -> "A100 SXM4 80GB"
    for pattern, bf16, fp32 in GPU_PEAKS:
        if re.search(rf"\b{pattern}\b", words):
            return bf16 if low_precision else fp32
    return None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _call_flops(module: nn.Module, args: tuple, output: torch.Tensor) -> float:
    """Forward FLOPs of one call of a hooked module, from its real shapes."""
    if isinstance(module, Mlp):  # fc2 inside GeluLinear (fc1, and fc2 when called itself, hook on their own)
        return 2.0 * output.numel() * module.fc2.in_features if module.fuses() else 0.0
    if isinstance(module, nn.Linear):
        return 2.0 * args[0].numel() * module.out_features
    if isinstance(module, nn.Conv2d):
        k = module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
        return 2.0 * output.numel() * k
    B, Lq, D = output.shape  # attention scores and weighted sum: 2 matmuls of (Lq x Dh) @ (Dh x Lkv) per head
    return 4.0 * B * Lq * args[0].shape[1] * D


class FlopCounter:
    """Accumulates forward FLOPs of graph-building calls of the hooked module tree, and of every call of
    the ``forward_only`` subtrees (e.g. the EMA teacher; None entries are skipped), apart.

    Eager calls add to Python floats. Inside torch.compile the hooks are traced into the graph, where a
    Python number would be pinned to one value (a graph per text length); there they add to a float64
    tensor on the module's device instead, read on the host by :meth:`take_flops` only (so call it where
    the host reads anyway, e.g. at log steps)."""

    def __init__(self, module: nn.Module, forward_only: Iterable[nn.Module | None] = ()):
        self.forward_flops = 0.0  # graph-building forwards: a backward follows
        self.forward_only_flops = 0.0  # forward_only subtrees: no backward
        device = next(module.parameters(), torch.empty(0)).device
        self._compiled_forward_flops = torch.zeros((), dtype=torch.float64, device=device)  # the two, under compile
        self._compiled_forward_only_flops = torch.zeros((), dtype=torch.float64, device=device)
        alone = {id(sub) for m in forward_only if m is not None for sub in m.modules()}
        self._handles = []
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d, Attention, Mlp)):
                hook = self._forward_only_hook if id(sub) in alone else self._hook
                self._handles.append(sub.register_forward_hook(hook))

    def _hook(self, module, args, output) -> None:
        compiling = torch.compiler.is_compiling()
        # (inside torch.compile no hook runs in the backward, and the graph-task query would break the graph)
        if not torch.is_grad_enabled() or (not compiling and _in_backward()):
            return
        flops = _call_flops(module, args, output)
        if compiling:
            self._compiled_forward_flops.add_(flops)
        else:
            self.forward_flops += flops

    def _forward_only_hook(self, module, args, output) -> None:
        flops = _call_flops(module, args, output)
        if torch.compiler.is_compiling():
            self._compiled_forward_only_flops.add_(flops)
        else:
            self.forward_only_flops += flops

    def take_flops(self) -> float:
        """FLOPs of the training steps since the last call, and reset: the graph-building forwards x 3
        (backward ~ 2x forward) plus the forward-only ones x 1."""
        compiled = torch.stack([self._compiled_forward_flops, self._compiled_forward_only_flops]).tolist()  # one read
        flops = 3.0 * (self.forward_flops + compiled[0]) + self.forward_only_flops + compiled[1]
        self.forward_flops = self.forward_only_flops = 0.0
        self._compiled_forward_flops.zero_()
        self._compiled_forward_only_flops.zero_()
        return flops

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


_cpu_peak: dict[torch.dtype, float] = {}


def measured_cpu_peak(dtype: torch.dtype = torch.float32, bursts: int = 7, seconds: float = 0.05) -> float:
    """Matmul FLOP/s this CPU reaches (measured once per dtype): the CPU's MFU denominator. The best of
    several short bursts, so that other work on the machine during some of them does not lower it."""
    if dtype not in _cpu_peak:
        gen = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must draw as an unbroken one
        a = torch.randn(1024, 1024, generator=gen).to(dtype)
        b = torch.randn(1024, 1024, generator=gen).to(dtype)
        a @ b  # warm-up
        best = 0.0
        for _ in range(bursts):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                n += 1
            best = max(best, 2.0 * 1024**3 * n / (time.perf_counter() - start))
        _cpu_peak[dtype] = best
    return _cpu_peak[dtype]


def device_peak_flops(device: torch.device, low_precision: bool) -> float | None:
    """Peak FLOP/s of ``device`` per process: the table for known GPUs, measured on a CPU, else None."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), low_precision)
    if device.type == "cpu":
        return measured_cpu_peak(torch.bfloat16 if low_precision else torch.float32)
    return None


def flop_rates(flops: float, seconds: float, peak: float | None) -> dict[str, float]:
    """A log window's ``tflops_per_s`` and ``mfu``. MFU is left out without a peak, and where it would
    exceed 1: the work outran the peak, so the peak (a CPU's, measured) was wrong, not the work."""
    rate = flops / seconds
    rates = {"tflops_per_s": rate / 1e12}
    if peak and rate <= peak:
        rates["mfu"] = rate / peak
    return rates
