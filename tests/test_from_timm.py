"""``train.init_from: timm:NAME``: a timm ViT saved locally (random weights, ``local-dir:``) loads into the
image path key for key; at another image or patch size the embeddings are resampled as timm does."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf

from vlpretrain import VLConfig, VLModel
from vlpretrain.models.config import ModelConfig
from vlpretrain.models.from_timm import load_timm_image_path, timm_image_tower
from vlpretrain.models.presets import preset_values
from vlpretrain.models.weights import WeightMismatch

ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "pre_norm"])
def saved_vit(request, tmp_path_factory):
    """A small timm ViT with random weights (so an ignored key would show), saved as timm's hub folder."""
    args = dict(ARGS, pre_norm=request.param)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    for p in vit.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("timm-vit")
    save_for_hf(vit, str(folder), model_args=args)
    return f"timm:local-dir:{folder}", args


def _ours(init_from: str, **sizes):
    cfg = ModelConfig(**{**preset_values("debug"), "width": 32, "depth": 1, "num_heads": 1, "pre_norm": False, **sizes})
    vit = timm_image_tower(cfg, init_from)
    model = VLModel(VLConfig.from_model_config(cfg)).eval()
    return model, load_timm_image_path(model, vit, init_from)


@pytest.mark.parametrize("sizes", [{}, {"image_size": 48}, {"patch_size": 4}], ids=["same", "image48", "patch4"])
def test_image_path_equals_timms_own_model_at_that_size(saved_vit, sizes):
    init_from, args = saved_vit
    model, report = _ours(init_from, **sizes)
    c = model.config
    assert (c.width, c.depth, c.num_heads, c.pre_norm) == (64, 2, 2, args["pre_norm"])  # the trunk is timm's
    # timm's own model at that size: its loader resamples pos_embed / the patch embedding the same way
    theirs = timm.create_model(init_from[len("timm:"):], pretrained=True, num_classes=0,
                               img_size=c.image_size, patch_size=c.patch_size).eval()
    x = torch.randn(2, 3, c.image_size, c.image_size)
    with torch.no_grad():
        tokens, ref = model.forward_features(x), theirs.forward_features(x)
        assert tokens.shape == ref.shape
        assert (tokens - ref).abs().max() < 1e-5
        pooled = F.normalize(model.image_proj(ref[:, 0]), dim=-1)  # cls pooling, as timm's global_pool='token'
        assert (model.encode_image(x) - pooled).abs().max() < 1e-5
    assert {"pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "norm.weight"} <= set(
        report["loaded"])
    assert {"backbone.text_embed.weight", "backbone.text_pos_embed", "image_proj.weight", "text_proj.weight"} <= set(
        report["new"])
    assert not [k for k in report["new"] if k.removeprefix("backbone.") in report["loaded"]]


def test_a_vit_the_blocks_cannot_express_is_refused(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, init_values=1e-5, **ARGS)
    save_for_hf(vit, str(tmp_path), model_args=dict(ARGS, init_values=1e-5))
    with pytest.raises(ValueError, match="layer scale"):
        _ours(f"timm:local-dir:{tmp_path}")


def test_a_timm_key_with_no_place_is_an_error(saved_vit):
    init_from, _ = saved_vit
    model, _ = _ours(init_from)
    vit = timm.create_model(init_from[len("timm:"):], pretrained=True, num_classes=0)
    vit.register_buffer("extra_token", torch.zeros(1))
    with pytest.raises(WeightMismatch, match="extra_token"):
        load_timm_image_path(model, vit, init_from)


def test_the_trainer_starts_from_the_timm_vit_and_lit_keeps_it(saved_vit, synth_root, tmp_path, capsys,
                                                                fresh_accelerate_state):
    """The LiT recipe (configs/lit-base.yaml's keys): a timm ViT as the image path, train.freeze=image_path,
    modality experts for the text side; after training the image path is still timm's, at the run's size."""
    from tests.helpers import train_overrides
    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train

    init_from, args = saved_vit
    overrides = train_overrides(synth_root, tmp_path / "run", f"train.init_from={init_from}", "train.steps=2",
                                "train.freeze=image_path", "model.modality_experts=true", "eval.num_captions=0",
                                "model.text_embed_depth=0", "model.image_size=48")
    train(load_config(None, overrides))
    out = capsys.readouterr().out
    assert f"train.init_from {init_from}: loaded" in out and "train.freeze=image_path:" in out
    new = out.split("new: ", 1)[1].splitlines()[0].split(", ")
    assert {"backbone.modality_embed", "backbone.blocks.0.text_mlp.fc1.weight", "text_proj.weight"} <= set(new)
    trained = VLModel.from_pretrained(tmp_path / "run" / "model").eval()
    assert (trained.config.width, trained.config.depth, trained.config.image_size) == (64, 2, 48)
    assert trained.config.pre_norm == args["pre_norm"]
    theirs = timm.create_model(init_from[len("timm:"):], pretrained=True, num_classes=0, img_size=48).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (trained.forward_features(x) - theirs.forward_features(x)).abs().max() < 1e-5
