"""Tier 1: every preset builds, runs both modalities, trains every parameter; checkpointing is exact."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_model, make_text
from vlpretrain.models.presets import PRESETS


def full_loss(model, px, ids, mask):
    """Uses every parameter: captioning under prefix_lm plus both embeddings."""
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
    return out.loss + model.encode_image(px).sum() + model.encode_text(ids, mask).sum(), out


def grads_of(model, px, ids, mask):
    model.zero_grad(set_to_none=True)
    loss, out = full_loss(model, px, ids, mask)
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


CASES = [pytest.param(p, False, marks=[pytest.mark.slow] if p == "large" else []) for p in PRESETS]
CASES += [("debug", True), ("tiny", True)]  # modality experts: same code path at every size


@pytest.mark.parametrize("preset,experts", CASES)
def test_preset_shapes_gradients_and_checkpointing(preset, experts):
    # large runs its real width/depth/heads at 64 px and 16 tokens to keep the suite short on 2 cores
    smaller = dict(image_size=64, max_text_len=16) if preset == "large" else {}
    model = make_model(preset, modality_experts=experts, **smaller)
    c = model.config
    batch = 2 if preset in ("debug", "tiny") else 1
    px = torch.randn(batch, 3, c.image_size, c.image_size)
    T = c.max_text_len
    ids, mask = make_text(batch, T, c.vocab_size, [T, T - 3][:batch])

    out, grads = grads_of(model, px, ids, mask)
    n_tokens = 1 + (c.image_size // c.patch_size) ** 2
    assert out.image_hidden_states.shape == (batch, n_tokens, c.width)
    assert out.text_hidden_states.shape == (batch, T, c.width)
    assert out.logits.shape == (batch, T, c.vocab_size)
    assert model.encode_image(px).shape == (batch, c.embed_dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not missing, f"parameters without a gradient: {missing}"

    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = grads_of(model, px, ids, mask)
    assert torch.equal(out_ckpt.logits, out.logits)
    for name, g in grads.items():
        assert torch.equal(grads_ckpt[name], g), name
