"""Mixed precision on CPUs without bf16/fp16 matrix units.

On such a CPU (AVX2, AVX-512 without BF16/FP16, no AMX) PyTorch's autocast runs every bf16/fp16
matmul, convolution and attention on its reference kernels: ~20x slower than fp32 (a 0.8 s fp32
step of the CPU benchmark model takes ~20 s). :class:`EmulatedLowPrecision` keeps autocast's
numbers and drops that cost: each op autocast would run in low precision gets its operands rounded
to the low-precision dtype, runs on the fp32 kernel (low-precision GEMMs accumulate in fp32 too) and
has its output rounded back, so the rounding points (activations, and through autograd the
gradients flowing back) are autocast's. Matmul and linear outputs are bit-identical to the native
kernel but for rare one-ulp differences (summation order); attention differs by up to one ulp
(the native kernel rounds its probabilities before the weighted sum).

:func:`low_precision_context` is the one switch: autocast via Accelerate, plus the emulation where
the device is such a CPU. The model is told once, when the trainer builds it (:func:`emulation_for`
into ``VLBackbone.set_low_precision_emulation``), so that gradient checkpointing's recomputation in
the backward and the MLP's own backward run the same way; nothing global is read by the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The ops on CPU autocast's low-precision list that a model reaches from Python.
_LOW_PRECISION_OPS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.scaled_dot_product_attention, F.prelu,
    torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm,
    torch.Tensor.baddbmm, torch.Tensor.addmm, torch.Tensor.addbmm,
})
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU has bf16/fp16 matmul units that PyTorch uses (oneDNN: AVX-512 BF16/FP16, AMX)."""
    check = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return precision not in check or bool(check[precision]())


def emulates(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` on ``device`` runs emulated (a CPU without the units for it)."""
    return device.type == "cpu" and precision in _DTYPES and not cpu_has_native(precision)


class EmulatedLowPrecision(TorchFunctionMode):
    """While CPU autocast is on: autocast's low-precision ops run in fp32 on operands rounded to
    ``dtype``, their outputs rounded to ``dtype``. Outside autocast every op runs untouched."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype

    def _round(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype).float()
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LOW_PRECISION_OPS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = func(*(self._round(a) for a in args), **{k: self._round(v) for k, v in kwargs.items()})
        return out.to(self.dtype)


def emulation_for(device: torch.device, precision: str) -> Callable[[], EmulatedLowPrecision] | None:
    """What the trainer hands ``VLBackbone.set_low_precision_emulation``: a maker of the emulation
    :func:`low_precision_context` enters on ``device`` at ``precision``, or None where it enters none."""
    return partial(EmulatedLowPrecision, _DTYPES[precision]) if emulates(device, precision) else None


@contextlib.contextmanager
def low_precision_context(accelerator, precision: str):
    """Accelerate's autocast, with :class:`EmulatedLowPrecision` inside it on a CPU without the units.
    Enter it around forward and backward (gradient checkpointing recomputes in the backward)."""
    with accelerator.autocast():
        if emulates(accelerator.device, precision):
            with EmulatedLowPrecision(_DTYPES[precision]):
                yield
        else:
            yield


def emulation_note(precision: str) -> str:
    """What a run prints before its first step when ``precision`` is emulated."""
    return (f"train.precision={precision} on a CPU without {precision} matrix units: matmuls and attention run on "
            f"fp32 kernels with operands and results rounded to {precision} (autocast's numbers; PyTorch's "
            f"reference {precision} kernels are ~20x slower here)")
