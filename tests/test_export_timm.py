"""``vlpretrain export --format timm``: the image tower loads in the real timm with the same features."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from tests.helpers import make_model
from vlpretrain.cli import main
from vlpretrain.export.source import LoadedModel, TrainingInfo, load_source
from vlpretrain.export.timm_format import NotExpressible, export_timm


def _features_diff(model, folder) -> float:
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(vit).__name__ == "VisionTransformer" and vit.num_classes == 0
    x = torch.randn(3, 3, model.config.image_size, model.config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.forward_features(x), vit.forward_features(x)
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def test_timm_export_of_a_checkpoint_loads_in_timm_with_the_same_features(trained_run, tmp_path):
    out = tmp_path / "vit"
    assert main(["export", str(trained_run / "checkpoints" / "step_6"), "--out", str(out), "--format", "timm"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = load_source(trained_run / "checkpoints" / "step_6")
    diff = _features_diff(loaded.model, out)
    print(f"timm export forward_features max abs diff: {diff:.2e}")
    assert diff < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["pre_norm"] is True
    data = timm.data.resolve_data_config({}, model=timm.create_model(f"local-dir:{out}", pretrained=True))
    settings = loaded.processor.image_settings
    assert data["input_size"] == (3, settings.size, settings.size)
    assert tuple(data["mean"]) == pytest.approx(settings.mean) and tuple(data["std"]) == pytest.approx(settings.std)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_modality_experts_and_a_nonzero_modality_embedding_still_match(trained_run, tmp_path):
    model = make_model("debug", modality_experts=True).eval()
    with torch.no_grad():
        model.backbone.modality_embed.normal_(0, 0.5)  # would show if it were not folded into pos_embed
        for name, p in model.backbone.named_parameters():
            if name.startswith("blocks.") and ".text_" in name:
                p.normal_(0, 0.5)  # text experts differ from the image ones
    processor = load_source(trained_run / "checkpoints" / "step_6").processor
    out = export_timm(LoadedModel(model, processor, TrainingInfo()), tmp_path / "experts")
    assert _features_diff(model, out) < 1e-5


def test_a_layernorm_epsilon_timm_cannot_build_is_a_clear_error_and_writes_nothing(trained_run, tmp_path):
    model = make_model("debug", norm_eps=1e-5).eval()
    processor = load_source(trained_run / "checkpoints" / "step_6").processor
    with pytest.raises(NotExpressible, match="norm_eps"):
        export_timm(LoadedModel(model, processor, TrainingInfo()), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
