"""Attention layouts and backends: semantics by perturbation, every backend held to ``eager``."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import make_model, make_text
from vlpretrain.layers.attention import AttentionLayout, attend, flash_attn_available, resolve_backend

LAYOUTS_WITH_TEXT = ["text", "prefix_lm", "fused", "separate"]
CASES = [("image", True), ("text", True), ("text", False), ("prefix_lm", True), ("fused", True),
         ("separate", True), ("separate", False)]


def run(model, layout, px, ids, mask, text_causal=True, cross_from_layer=0, output_layers=()):
    kw = dict(layout=layout, text_causal=text_causal, cross_from_layer=cross_from_layer,
              output_layers=output_layers)
    if layout == "image":
        return model.backbone(pixel_values=px, **kw)
    if layout == "text":
        return model.backbone(input_ids=ids, attention_mask=mask, **kw)
    return model.backbone(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)


def inputs(batch=3, length=9, lengths=(9, 6, 4), seed=0):
    torch.manual_seed(seed)
    px = torch.randn(batch, 3, 32, 32)
    ids, mask = make_text(batch, length, 1024, list(lengths), seed=seed)
    return px, ids, mask


def outputs_and_grads(model, backend, layout, text_causal, px, ids, mask):
    model.zero_grad(set_to_none=True)
    model.set_attn_backend(backend)
    out = run(model, layout, px, ids, mask, text_causal)
    parts = [t for t in (out.image, out.text) if t is not None]
    weights = [torch.linspace(-1, 1, t.numel()).reshape(t.shape) for t in parts]
    sum((p * w).sum() for p, w in zip(parts, weights)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [p.detach() for p in parts], grads


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("layout", ["text", "prefix_lm", "separate"])
def test_per_sequence_causality_matches_each_sequence_run_with_its_own_flag(backend, layout):
    model = make_model("debug")
    model.set_attn_backend(backend)
    px, ids, mask = inputs(batch=4, lengths=(9, 6, 4, 9))
    flags = torch.tensor([True, False, False, True])
    with torch.no_grad():
        mixed = run(model, layout, px, ids, mask, text_causal=flags, cross_from_layer=1)
        causal = run(model, layout, px, ids, mask, text_causal=True, cross_from_layer=1)
        bidirectional = run(model, layout, px, ids, mask, text_causal=False, cross_from_layer=1)
    want = torch.where(flags[:, None, None], causal.text, bidirectional.text)
    assert (mixed.text - want).abs().max() < 1e-5
    assert (causal.text - bidirectional.text)[flags].abs().max() > 1e-3  # the flag really differs per row
    if layout != "text":  # image rows never read text in these layouts: the same either way
        assert (mixed.image - causal.image).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        AttentionLayout("text", 0, 9, text_causal=flags[:, None])


@pytest.mark.parametrize("backend", ["sdpa", "flex", "sdpa_aligned"])
@pytest.mark.parametrize("layout,text_causal", CASES)
def test_backend_matches_eager(backend, layout, text_causal):
    model = make_model("debug")
    px, ids, mask = inputs()
    ref_out, ref_grads = outputs_and_grads(model, "eager", layout, text_causal, px, ids, mask)
    out, grads = outputs_and_grads(model, backend, layout, text_causal, px, ids, mask)
    for a, b in zip(out, ref_out):
        assert (a - b).abs().max() < 1e-5
    with torch.no_grad():  # the kernel itself: FlexAttention has no CPU backward and falls back above
        model.set_attn_backend(backend)
        out = run(model, layout, px, ids, mask, text_causal)
    for a, b in zip([t for t in (out.image, out.text) if t is not None], ref_out):
        assert (a - b).abs().max() < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # fp32 summation order differs between kernels: error relative to the scale, floor 1
        scale = ref_grads[name].abs().max().clamp(min=1.0)
        assert (grads[name] - ref_grads[name]).abs().max() / scale < 1e-5, name


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn needs a CUDA GPU and the flash-attn package")
@pytest.mark.parametrize("layout,text_causal", CASES)
def test_flash_attn_matches_eager_on_real_positions_in_bf16(layout, text_causal):
    model = make_model("debug").cuda()
    px, ids, mask = (t.cuda() for t in inputs())
    outs = {}
    for backend in ("eager", "flash_attn"):
        model.set_attn_backend(backend)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(model, layout, px, ids, mask, text_causal)
        # flash-attn leaves pad rows at zero where eager lets them attend to themselves: real rows only
        outs[backend] = [t.float() for t in (out.image, out.text[mask.bool()] if out.text is not None else None)
                         if t is not None]
    for a, b in zip(outs["flash_attn"], outs["eager"]):
        assert (a - b).abs().max() < 3e-2  # bf16


def test_flash_attn_without_gpu_falls_back_to_sdpa_with_one_warning():
    if flash_attn_available():
        pytest.skip("flash-attn is usable here; the fallback path only exists without it")
    q = k = v = torch.randn(2, 2, 5, 8)
    layout = AttentionLayout("image", 5, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = attend(q, k, v, layout, 0, "flash_attn")
        attend(q, k, v, layout, 0, "flash_attn")
    fallbacks = [w for w in caught if "flash_attn" in str(w.message)]
    assert len(fallbacks) == 1 and "sdpa" in str(fallbacks[0].message)
    assert torch.equal(first, attend(q, k, v, layout, 0, "sdpa"))


def test_prefix_lm_image_ignores_text_and_text_is_causal():
    model = make_model("debug").eval()
    px, ids, mask = inputs(lengths=(9, 9, 9))
    base = run(model, "prefix_lm", px, ids, mask)
    other_text = ids.clone()
    other_text[:, 1:8] = (other_text[:, 1:8] + 7) % 1000 + 5
    changed = run(model, "prefix_lm", px, other_text, mask)
    assert torch.equal(base.image, changed.image)
    t = 4
    later = ids.clone()
    later[:, t + 1:8] = (later[:, t + 1:8] + 11) % 1000 + 5
    changed = run(model, "prefix_lm", px, later, mask)
    assert torch.allclose(base.text[:, :t + 1], changed.text[:, :t + 1], atol=1e-6)
    assert not torch.allclose(base.text[:, t + 1:], changed.text[:, t + 1:], atol=1e-4)
    # and text does read the image
    changed = run(model, "prefix_lm", px + 1, ids, mask)
    assert not torch.allclose(base.text, changed.text, atol=1e-4)


def test_separate_sees_no_other_modality_and_fused_sees_both():
    model = make_model("debug").eval()
    px, ids, mask = inputs()
    other_ids = ids.clone()
    other_ids[:, 1:3] = (other_ids[:, 1:3] + 13) % 1000 + 5
    for layout, isolated in (("separate", True), ("fused", False)):
        base = run(model, layout, px, ids, mask)
        new_text = run(model, layout, px, other_ids, mask)
        new_image = run(model, layout, px * 2, ids, mask)
        assert torch.equal(base.image, new_text.image) is isolated, layout
        assert torch.allclose(base.text, new_image.text, atol=1e-6) is isolated, layout


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("layout,text_causal", [c for c in CASES if c[0] != "image"])
def test_appending_padding_changes_no_unpadded_output(backend, layout, text_causal):
    model = make_model("debug").eval()
    model.set_attn_backend(backend)
    px, ids, mask = inputs(lengths=(9, 6, 4))
    base = run(model, layout, px, ids, mask, text_causal)
    pad_ids = torch.cat([ids, torch.zeros(3, 5, dtype=ids.dtype)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(3, 5, dtype=mask.dtype)], dim=1)
    padded = run(model, layout, px, pad_ids, pad_mask, text_causal)
    real = mask.bool()
    assert (padded.text[:, :9][real] - base.text[real]).abs().max() < 1e-5
    if base.image is not None:
        assert (padded.image - base.image).abs().max() < 1e-5
    assert torch.isfinite(padded.text).all()


@pytest.mark.parametrize("kind", ["prefix_lm", "fused"])
def test_cross_attention_switch_holds_exactly_at_layer_k(kind):
    model = make_model("debug", depth=4).eval()
    px, ids, mask = inputs()
    K = 2
    layers = tuple(range(5))
    base = run(model, kind, px, ids, mask, cross_from_layer=K, output_layers=layers)
    moved = run(model, kind, px + 0.5, ids, mask, cross_from_layer=K, output_layers=layers)
    n_img = base.layout.n_image
    for k in range(5):  # layer_hidden[k]: hidden state after k blocks
        same = torch.allclose(base.layer_hidden[k][:, n_img:], moved.layer_hidden[k][:, n_img:], atol=1e-6)
        assert same is (k <= K), f"after {k} blocks with the switch at {K}"


def test_backend_choice_config_then_env_then_default(monkeypatch):
    monkeypatch.delenv("VLPRETRAIN_ATTN", raising=False)
    assert resolve_backend(None) == "sdpa"
    monkeypatch.setenv("VLPRETRAIN_ATTN", "eager")
    assert resolve_backend(None) == "eager"
    assert resolve_backend("flex") == "flex"
    assert make_model("debug").attn_backend == "eager"
    monkeypatch.setenv("VLPRETRAIN_ATTN", "fast")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*VLPRETRAIN_ATTN"):
        resolve_backend(None)


def test_unknown_backend_and_layout_are_clear_errors():
    model = make_model("debug")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*sdpa"):
        model.set_attn_backend("flash")
    px, ids, mask = inputs()
    with pytest.raises(ValueError, match="unknown attention layout 'cross'.*prefix_lm"):
        model.backbone(pixel_values=px, input_ids=ids, layout="cross")
    with pytest.raises(ValueError, match="layout 'image' takes no text"):
        model.backbone(pixel_values=px, input_ids=ids, layout="image")


@pytest.mark.parametrize("kind", LAYOUTS_WITH_TEXT + ["image"])
@pytest.mark.parametrize("rows", ["padded", "per_sequence_causal", "uniform"])
def test_query_mask_is_the_dense_masks_rows_at_the_query_positions(kind, rows):
    # a block computing only pooled tokens builds just the rows of its queries, never the whole mask
    n_image, n_text = (5, 0) if kind == "image" else ((0, 6) if kind == "text" else (5, 6))
    valid = torch.tensor([[True] * n_text, [True] * 4 + [False] * (n_text - 4), [True] * 2 + [False] * (n_text - 2)])
    causal = torch.tensor([True, False, True]) if rows == "per_sequence_causal" and n_text else True
    layout = AttentionLayout(kind, n_image, n_text, text_causal=causal,
                             text_valid=valid if rows == "padded" and n_text else None, cross_from_layer=1)
    query = torch.tensor([0, n_image + 2, n_image + n_text - 1]).clamp(max=layout.length - 1)
    for layer in (0, 1):
        dense = layout.dense_mask(layer, 0, layout.length, "cpu")
        got = layout.query_mask(layer, query, "cpu")
        if dense is None:
            assert got is None
            continue
        want = dense.expand(3, -1, -1, -1)[torch.arange(3), :, query].unsqueeze(2)  # (B, 1, 1, L)
        assert got.shape == (3, 1, 1, layout.length) and torch.equal(got.expand_as(want), want), (layer, got, want)


def test_keys_padded_to_a_multiple_of_8_give_the_same_attention():
    from vlpretrain.layers.attention import sdpa_keys_padded

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 29, 16, requires_grad=True) for _ in range(3))  # 29 keys: padded to 32
    mask = torch.rand(2, 1, 29, 29) > 0.3
    mask[..., 0] = True  # every query sees a key
    grad = torch.randn(2, 3, 29, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = sdpa_keys_padded(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-6
    assert all(g.shape == r.shape and (g - r).abs().max() < 1e-5 for g, r in zip(grads, ref_grads))
