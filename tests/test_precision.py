"""Emulated bf16/fp16 on CPUs without matrix units: autocast's numbers on fp32 kernels."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.ops import aten
from torch.utils._python_dispatch import TorchDispatchMode
from objectives_support import make_model, random_batch

import vlpretrain.train.precision as precision
from vlpretrain.objectives import build_objective_set
from vlpretrain.train.precision import EmulatedLowPrecision, emulation_for
from vlpretrain.train.accumulate import accumulate_backward, backward


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matmul-family aten op that runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.convolution_backward,
                                   aten.convolution):
            self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each element of ``x`` (at least at 1.0 * eps)."""
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1.0))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_ops_give_autocasts_numbers_and_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 33, 48, generator=g), torch.randn(40, 48, generator=g) / 7, torch.randn(40, generator=g)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))
    img, kernel = torch.randn(2, 3, 16, 16, generator=g), torch.randn(8, 3, 4, 4, generator=g) / 7
    ops = {"linear": lambda: F.linear(x, w, b), "matmul": lambda: x @ w.T, "bmm": lambda: torch.bmm(x, x.transpose(1, 2)),
           "conv2d": lambda: F.conv2d(img, kernel, stride=4),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, op in ops.items():
        with torch.autocast("cpu", dtype=dtype):
            native = op()
            with EmulatedLowPrecision(dtype):
                emulated = op()
        assert emulated.dtype == native.dtype == dtype, name
        diff = (emulated.float() - native.float()).abs()
        # the same rounding points; only summation order (and attention's rounded probabilities) differ
        assert (diff <= 2 * _ulp(native.float(), dtype)).all(), (name, diff.max())
        exact = 0.99 if name != "sdpa" else 0.4
        assert (diff == 0).float().mean() >= exact, (name, (diff == 0).float().mean())
        assert (emulated.float() - op()).abs().max() > 0, name  # it did round: fp32 differs
    with EmulatedLowPrecision(torch.bfloat16):
        assert F.linear(x, w, b).dtype == torch.float32  # outside autocast nothing changes
        assert torch.equal(F.linear(x, w, b), x @ w.T + b)


def _loss_and_grads(objectives, batch, mode: str):
    objectives.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
        with EmulatedLowPrecision(torch.bfloat16) if mode == "emulated" else contextlib.nullcontext():
            out = objectives(batch)
            backward(out.loss)
    return out.loss.item(), {n: p.grad.clone() for n, p in objectives.named_parameters() if p.grad is not None}


def test_emulated_training_step_is_as_close_to_fp32_as_native_bf16():
    model = make_model(text_embed_depth=1)
    objectives = build_objective_set(model, [{"name": "contrastive"}, {"name": "captioning"}])
    batch = random_batch(batch=4, length=9)
    results = {mode: _loss_and_grads(objectives, batch, mode) for mode in ("fp32", "native", "emulated")}
    loss32, grads32 = results["fp32"]
    assert set(results["emulated"][1]) == set(grads32) == set(results["native"][1])

    def distance(mode):
        return max(float((results[mode][1][n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in grads32.items())

    native, emulated = distance("native"), distance("emulated")
    assert 0 < emulated <= 1.5 * native + 1e-3, (emulated, native)  # rounded like bf16, no further from fp32
    assert abs(results["emulated"][0] - loss32) <= 2 * abs(results["native"][0] - loss32) + 1e-2

    model.set_grad_checkpointing(True)  # the backward recomputes the blocks: emulated there too, once told
    model.backbone.set_low_precision_emulation(lambda: EmulatedLowPrecision(torch.bfloat16))
    loss, grads = _loss_and_grads(objectives, batch, "emulated")
    assert loss == results["emulated"][0]
    assert all(torch.equal(grads[n], g) for n, g in results["emulated"][1].items())
    model.backbone.set_low_precision_emulation(None)  # untold: the recomputation runs native bf16 and
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # saves other tensors than the forward did
        _loss_and_grads(objectives, batch, "emulated")


def test_emulation_is_chosen_only_for_low_precision_on_a_cpu_without_units(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "cpu_has_native", lambda p: False)
    assert precision.emulates(cpu, "bf16") and precision.emulates(cpu, "fp16")
    assert emulation_for(cpu, "fp16")().dtype == torch.float16 and emulation_for(cpu, "no") is None
    assert emulation_for(cuda, "bf16") is None
    assert not precision.emulates(cpu, "no") and not precision.emulates(cuda, "bf16")
    assert "train.precision=bf16 on a CPU without bf16" in precision.emulation_note("bf16")
    monkeypatch.setattr(precision, "cpu_has_native", lambda p: True)
    assert not precision.emulates(cpu, "bf16")
    monkeypatch.undo()
    assert precision.cpu_has_native("no")


def test_backward_runs_outside_autocast_so_emulated_steps_never_reach_low_precision_kernels():
    model = make_model(text_embed_depth=1)
    model.backbone.set_low_precision_emulation(lambda: EmulatedLowPrecision(torch.bfloat16))  # as the trainer does
    objectives = build_objective_set(model, [{"name": "contrastive"}, {"name": "captioning"}])
    batch = random_batch(batch=4, length=9)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    with torch.autocast("cpu", dtype=torch.bfloat16), EmulatedLowPrecision(torch.bfloat16):
        out = objectives(batch)
        with _MatmulDtypes() as seen:
            backward(out.loss)
        assert seen.dtypes == {torch.float32}
        with _MatmulDtypes() as seen:
            accumulate_backward(objectives, halves)
        assert seen.dtypes == {torch.float32}
        out = objectives(batch)
        with _MatmulDtypes() as seen:
            out.loss.backward()  # the trap: inside autocast, fp32 ops' backward matmuls are cast down
        assert torch.bfloat16 in seen.dtypes
