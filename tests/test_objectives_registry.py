"""Registry, YAML entries, the combiner, a third-party plug-in, and clear errors on bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from objectives_support import make_model, random_batch

from vlpretrain.config import ConfigError, load_config
from vlpretrain.objectives import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    available_objectives,
    build_objective_set,
    build_objectives,
    register_objective,
)


def test_builtins_are_registered():
    assert set(available_objectives()) >= {"contrastive", "captioning", "masked_text", "masked_image", "matching"}


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown objective 'captoning'.*Did you mean 'captioning'") as err:
        build_objectives([{"name": "captoning"}], make_model().config)
    assert "contrastive" in str(err.value) and "masked_image" in str(err.value)


def test_yaml_entries_are_validated_against_each_objectives_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {preset: debug}\nobjectives:\n  - {name: contrastive, weight: 1.0, loss: siglip}\n"
                    "  - {name: captioning, weight: 2.0, per_caption: true}\n")
    cfg = load_config(path)
    assert cfg.objectives[0]["loss"] == "siglip" and cfg.objectives[1]["weight"] == 2.0
    with pytest.raises(ConfigError, match=r"objectives\[1\] \(captioning\): unknown key 'per_captoin'.*'per_caption'"):
        load_config(path, ["objectives.1={name: captioning, per_captoin: true}"])
    with pytest.raises(ConfigError, match=r"objectives\[0\] \(contrastive\).loss: 'softmax' is not one of clip, siglip"):
        load_config(path, ["objectives.0.loss=softmax"])
    with pytest.raises(ConfigError, match=r"invalid value for 'weight'"):
        load_config(path, ["objectives.1.weight=heavy"])
    with pytest.raises(ConfigError, match="already configured"):
        load_config(path, ["objectives=[{name: contrastive}, {name: contrastive, loss: siglip}]"])
    # a list item can be addressed from the command line even when the file has no objectives section
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {preset: debug}\n")
    assert load_config(bare, ["objectives.0.loss=siglip"]).objectives == [
        {"name": "contrastive", "weight": 1.0, "loss": "siglip"}]


@pytest.mark.parametrize("name", ["masked_text", "masked_image"])
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_mask_ratio_outside_open_unit_interval_is_refused(name, ratio):
    with pytest.raises(ConfigError, match=rf"\({name}\).mask_ratio: {ratio} must lie in \(0, 1\)"):
        build_objectives([{"name": name, "mask_ratio": ratio}], make_model().config)


def test_objective_needing_text_on_a_batch_without_text():
    model = make_model()
    objectives = build_objective_set(model, [{"name": "captioning"}])
    batch = random_batch(batch=2)
    with pytest.raises(ValueError, match=r"objective 'captioning' needs 'input_ids'.*remove 'captioning'"):
        objectives({"pixel_values": batch["pixel_values"]})
    # an image-only objective is happy with images alone
    images_only = build_objective_set(model, [{"name": "masked_image", "decoder_width": 32, "decoder_depth": 1,
                                               "decoder_heads": 2}])
    assert torch.isfinite(images_only({"pixel_values": batch["pixel_values"]}).loss)


@pytest.mark.parametrize("name,entry", [("masked_text", {}), ("captioning", {"parallel_prob": 0.5})])
def test_missing_mask_token_is_a_clear_error(name, entry):
    model = make_model()
    model.config.mask_token_id = None  # a tokenizer without a mask token
    with pytest.raises(ConfigError, match=rf"objective '{name}' needs a .*mask token.*set model.mask_token_id"):
        build_objectives([{"name": name, **entry}], model.config)
    model.config.mask_token_id = model.config.pad_token_id  # ... or one that collides with padding
    with pytest.raises(ConfigError, match="equals model.pad_token_id"):
        build_objectives([{"name": name, **entry}], model.config)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_logit_scale_is_a_clear_error(value):
    objectives = build_objective_set(make_model(), [{"name": "contrastive"}])
    with torch.no_grad():
        objectives.objectives["contrastive"].logit_scale.fill_(value)
    # an asynchronous device assert (no host sync on accelerators): on the CPU it raises at once
    with pytest.raises(RuntimeError, match=r"objective 'contrastive': the learnable logit scale .* not finite.*resume"):
        objectives(random_batch(batch=2))


def test_logit_scale_init_clamp_and_fp32():
    model = make_model()
    clip, siglip = (build_objectives([{"name": "contrastive", "loss": loss}], model.config)[0]
                    for loss in ("clip", "siglip"))
    assert abs(float(clip.logit_scale) - math.log(1 / 0.07)) < 1e-6 and clip.logit_bias is None
    assert abs(float(siglip.logit_scale) - math.log(10)) < 1e-6 and float(siglip.logit_bias) == -10.0
    # 1-element tensors, not 0-d scalars: FSDP2 shards every parameter and refuses 0-d ones
    assert clip.logit_scale.shape == siglip.logit_bias.shape == (1,)
    assert siglip.no_weight_decay() == {"logit_scale", "logit_bias"}
    objectives = build_objective_set(model, [{"name": "contrastive"}])
    clip = objectives.objectives["contrastive"]
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(500.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objectives(random_batch(batch=3))
    assert out.loss.dtype == torch.float32 and clip.logit_scale.dtype == torch.float32
    # forward reads the parameter and never changes it (under FSDP it would change a gathered copy) ...
    assert abs(float(out.metrics["contrastive/logit_scale"]) - 500.0) < 1e-2
    assert abs(float(clip.logit_scale) - math.log(500.0)) < 1e-6
    clip.after_optimizer_step()  # ... the trainer's hook after each optimiser step clamps it
    assert abs(float(clip.logit_scale) - math.log(100.0)) < 1e-6
    names = dict(objectives.named_parameters())
    assert {"objectives.contrastive.logit_scale", "model.backbone.pos_embed"} <= objectives.no_weight_decay()
    assert objectives.no_weight_decay() <= set(names) | {"model.backbone.text_embed.weight"}


@dataclass
class _MeanNormConfig(ObjectiveConfig):
    target: float = 1.0
    """Wanted mean L2 norm of the pooled image tokens."""


@register_objective("test_mean_norm")
class _MeanNorm(Objective):
    """A third-party objective written against the public API only."""

    Config = _MeanNormConfig
    batch_keys = ("pixel_values",)

    def __init__(self, cfg, model_config):
        super().__init__(cfg, model_config)
        self.needs = frozenset({"image"})

    def forward(self, model, batch, shared):
        norm = shared.image[:, 0].norm(dim=-1).mean()
        return ObjectiveOutput((norm - self.cfg.target) ** 2, {"norm": norm.detach()})


def test_third_party_plugin_registers_and_shares_the_forward():
    model = make_model()
    objectives = build_objective_set(model, [{"name": "contrastive"},
                                             {"name": "test_mean_norm", "weight": 0.5, "target": 3.0}])
    calls = []
    handle = model.backbone.register_forward_hook(lambda *args: calls.append(1))
    out = objectives(random_batch(batch=4))
    handle.remove()
    assert len(calls) == 2  # image + text forwards, shared by both objectives
    assert set(out.losses) == {"contrastive", "test_mean_norm"} and "test_mean_norm/norm" in out.metrics
    expected = out.losses["contrastive"] + 0.5 * out.losses["test_mean_norm"]
    assert abs(float(out.loss.detach() - expected)) < 1e-6
    with pytest.raises(ConfigError, match=r"unknown key 'targt'.*'target'"):
        build_objectives([{"name": "test_mean_norm", "targt": 2}], model.config)


def test_registration_mistakes_are_refused():
    with pytest.raises(TypeError, match="not an Objective subclass"):
        register_objective("not_an_objective")(dict)
    with pytest.raises(ValueError, match="already registered"):
        @register_objective("contrastive")
        class _Clash(Objective):
            pass


def test_checkpoints_with_0d_logit_scale_and_bias_load_reshaped():
    siglip = build_objectives([{"name": "contrastive", "loss": "siglip"}], make_model().config)[0]
    siglip.load_state_dict({"logit_scale": torch.tensor(2.5), "logit_bias": torch.tensor(-3.0)})  # the old 0-d form
    assert siglip.logit_scale.shape == (1,) and float(siglip.logit_scale) == 2.5 and float(siglip.logit_bias) == -3.0
    with pytest.raises(RuntimeError, match="size mismatch for logit_scale"):  # any other shape stays an error
        siglip.load_state_dict({"logit_scale": torch.zeros(2), "logit_bias": torch.zeros(1)})
