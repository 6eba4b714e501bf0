"""Tier 2: the image path equals a timm VisionTransformer with the weights copied key-for-key."""

from __future__ import annotations

import pytest
import timm
import torch

from tests.helpers import make_model


@pytest.mark.parametrize("preset, pre_norm", [("debug", True), ("debug", False), ("tiny", True)])
def test_image_path_equals_timm_vit(preset, pre_norm):
    """The presets' pre_norm is timm's norm_pre (a CLIP-style ViT); without it, a plain timm ViT."""
    model = make_model(preset, pre_norm=pre_norm).eval()
    c = model.config
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, pre_norm=pre_norm, num_classes=0).eval()
    torch.manual_seed(1)
    for p in vit.parameters():  # random weights, so an ignored key would show
        p.data.normal_(0, 0.05)
    state = vit.state_dict()
    if pre_norm:  # timm's pre-norm ViT (CLIP's layout) has no patch-conv bias: ours is zero then
        assert "patch_embed.proj.bias" not in state
        state["patch_embed.proj.bias"] = torch.zeros(c.width)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    assert unexpected == []
    assert all(k.startswith(("text_", "modality_")) for k in missing), missing
    x = torch.randn(2, 3, c.image_size, c.image_size)
    with torch.no_grad():
        ours, theirs = model.forward_features(x), vit.forward_features(x)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-5
        # and the image path's weights go back to timm key-for-key
        back = {k: v for k, v in model.backbone.state_dict().items() if k in vit.state_dict()}
        assert back.keys() == vit.state_dict().keys()
