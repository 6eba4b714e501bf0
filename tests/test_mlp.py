"""The MLP that recomputes GELU in the backward: timm's numbers, one activation kept instead of two."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp as TimmMlp

from vlpretrain.layers.mlp import Mlp
from vlpretrain.train.precision import EmulatedLowPrecision


def _pair():
    torch.manual_seed(0)
    ours = Mlp(24, 96)
    reference = TimmMlp(24, 96, act_layer=torch.nn.GELU)
    reference.load_state_dict(ours.state_dict())  # the same parameter names
    return ours, reference


def _run(module, x, autocast: torch.dtype | None = None):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        out = module(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out, x.grad, {n: p.grad for n, p in module.named_parameters()}


def test_outputs_and_gradients_are_timms_in_fp32():
    ours, reference = _pair()
    x = torch.randn(3, 7, 24)
    (out, gx, grads), (ref, ref_gx, ref_grads) = _run(ours, x), _run(reference, x)
    assert torch.equal(out, ref)
    assert torch.allclose(gx, ref_gx, atol=1e-6, rtol=1e-5)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5) for n in ref_grads)
    with torch.no_grad():
        assert torch.equal(ours(x), ref)  # inference takes the plain path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_matches_timm_under_autocast(dtype):
    ours, reference = _pair()
    x = torch.randn(3, 7, 24)
    (out, gx, grads), (ref, ref_gx, ref_grads) = _run(ours, x, dtype), _run(reference, x, dtype)
    assert out.dtype == ref.dtype == dtype and torch.equal(out, ref)
    assert gx.dtype == torch.float32 and torch.allclose(gx, ref_gx, atol=2e-3, rtol=1e-2)
    assert all(grads[n].dtype == torch.float32 for n in grads)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=2e-3, rtol=1e-2) for n in ref_grads)


def test_emulated_bf16_matches_timm_under_the_same_emulation():
    ours, reference = _pair()
    ours.emulate_low_precision = True  # what VLBackbone.set_low_precision_emulation sets
    x = torch.randn(3, 7, 24)
    with EmulatedLowPrecision(torch.bfloat16):
        (out, gx, grads), (ref, ref_gx, ref_grads) = _run(ours, x, torch.bfloat16), _run(reference, x, torch.bfloat16)
    assert torch.equal(out, ref)
    assert torch.allclose(gx, ref_gx, atol=2e-3, rtol=1e-2)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=2e-3, rtol=1e-2) for n in ref_grads)


def _saved_bytes(module, x) -> int:
    """Bytes of the activations autograd keeps (parameters, however viewed, left out)."""
    storages, params = {}, {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.clone().requires_grad_())
    return sum(storages.values())


def test_keeps_one_hidden_activation_instead_of_two():
    ours, reference = _pair()
    x = torch.randn(4, 16, 24)
    hidden = 4 * 16 * 96 * 4  # one (B, L, 4D) fp32 tensor
    assert _saved_bytes(reference, x) - _saved_bytes(ours, x) == hidden


def test_a_wrapped_fc2_is_called_as_itself():
    """LoRA (peft) replaces fc2 with a wrapper: the fused path must step aside, not bypass it."""
    ours, _ = _pair()
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(x.shape)
            return self.inner(x) + 1.0

    x = torch.randn(2, 5, 24)
    plain = ours(x)
    ours.fc2 = Wrapper(ours.fc2)
    assert not ours.fuses()
    assert torch.allclose(ours(x), plain + 1.0) and calls == [torch.Size([2, 5, 96])]
