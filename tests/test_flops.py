"""MFU's numerator: FLOPs counted from the shapes that ran, once per forward, never for recompute."""

from __future__ import annotations

import torch

from tests.helpers import make_model, make_text
from vlpretrain.train.flops import FlopCounter, measured_cpu_peak


def analytic_forward_flops(cfg, batch: int, n_image: int, n_text: int) -> float:
    """Matmul FLOPs of one prefix-LM forward + lm_head, written out from the architecture."""
    D, H, L = cfg.width, int(cfg.width * cfg.mlp_ratio), n_image + n_text
    per_token_block = 2 * (D * 3 * D + D * D + D * H + H * D)  # qkv, proj, fc1, fc2
    attention = 4 * L * L * D  # scores and weighted sum, per sequence and block
    patches = (n_image - 1) * 2 * cfg.in_chans * cfg.patch_size**2 * D
    lm_head = n_text * 2 * D * cfg.vocab_size
    return batch * (cfg.depth * (L * per_token_block + attention) + patches + lm_head)


def test_counted_flops_match_the_architecture_and_skip_recompute_and_no_grad():
    model = make_model("debug")
    counter = FlopCounter(model)
    px = torch.randn(3, 3, 32, 32)
    ids, mask = make_text(3, 9)
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
    want = analytic_forward_flops(model.config, 3, 17, 9)
    assert counter.forward_flops == want
    out.loss.backward()
    assert counter.take_flops() == 3 * want  # forward + backward, and reset
    model.set_grad_checkpointing(True)  # recompute in backward is not model FLOPs
    model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert counter.take_flops() == 3 * want
    with torch.no_grad():
        model(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert counter.take_flops() == 0
    counter.remove()
    model(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert counter.forward_flops == 0


def test_cpu_peak_is_measured_without_touching_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert measured_cpu_peak(torch.float32, seconds=0.05) > 1e9
    assert torch.equal(torch.get_rng_state(), before)
