"""The EMA teacher: equal to the student at its start, then the EMA formula applied by hand (cosine
momentum schedule included) to 1e-6; no gradients, no optimiser state; clear errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
from objectives_support import make_model, shapes_batch
from torch import nn

from vlpretrain.config import ConfigError, TeacherConfig, load_config
from vlpretrain.objectives import build_objective_set
from vlpretrain.objectives.combine import ObjectiveSet
from vlpretrain.objectives.masked_prediction import MaskedPrediction, MaskedPredictionConfig

SD = {"name": "self_distillation", "prototypes": 32, "head_hidden": 32, "head_bottleneck": 16, "local_size": 16,
      "local_crops": 2}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in module.named_parameters()}  # the hand formula in fp64


def _max_diff(a: dict, b: dict) -> float:
    """Largest difference, relative to the tensor's scale where that exceeds 1 (fp32 rounding grows with it)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) / max(1.0, float(b[k].abs().max())) for k in a)


def test_teacher_starts_as_the_student_then_follows_the_ema_formula_with_the_cosine_schedule():
    start, total, m0 = 2, 8, 0.9
    objectives = build_objective_set(make_model(), [{"name": "contrastive"}, {**SD, "start": start}], total_steps=total,
                                     teacher=TeacherConfig(momentum=m0, momentum_end=1.0))
    teacher, student = objectives.teacher, objectives.model.backbone
    head, teacher_head = objectives.objectives["self_distillation"].head, teacher.heads["self_distillation"]["head"]
    assert not any(p.requires_grad for p in teacher.parameters())
    objectives.train()
    assert not teacher.training  # always eval: the teacher sees the whole view
    optimizer = torch.optim.SGD([p for _, named, _ in objectives.parameter_parts(total) for _, p in named], lr=0.05)
    untouched = _tensors(teacher.backbone)
    expected = None
    for step in range(total):
        objectives.set_step(step)
        if step < start:
            assert _max_diff(_tensors(teacher.backbone), untouched) == 0.0  # nothing before the start
        if step == start:  # initialised from the student, exactly
            assert _max_diff(_tensors(teacher.backbone), _tensors(student)) == 0.0
            assert _max_diff(_tensors(teacher_head), _tensors(head)) == 0.0
            expected = {"b": _tensors(student), "h": _tensors(head)}
        loss = objectives(shapes_batch(seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objectives.after_optimizer_step()
        assert all(p.grad is None for p in teacher.parameters())
        if expected is not None:
            k = step + 1  # optimiser steps done: DINO's cosine from m0 (at the start) to 1 (at the last step)
            m = 1 - (1 - m0) * (math.cos(math.pi * (k - start) / (total - start)) + 1) / 2
            for key, now in (("b", _tensors(student)), ("h", _tensors(head))):
                expected[key] = {n: m * expected[key][n] + (1 - m) * now[n] for n in now}
            assert _max_diff(_tensors(teacher.backbone), expected["b"]) < 1e-6
            assert _max_diff(_tensors(teacher_head), expected["h"]) < 1e-6
    assert _max_diff(_tensors(teacher.backbone), _tensors(student)) > 1e-4  # it lags the student


def test_teacher_is_state_but_not_export_and_not_optimised():
    objectives = build_objective_set(make_model(), [{"name": "contrastive"}, {"name": "masked_prediction",
                                                                           "head_hidden": 16}], total_steps=4)
    keys = objectives.state_dict().keys()
    assert {k for k in keys if k.startswith("teacher.backbone.")} == {f"teacher.backbone.{k}"
                                                                     for k in objectives.model.backbone.state_dict()}
    optimised = {id(p) for _, named, _ in objectives.parameter_parts(4) for _, p in named}
    assert not optimised & {id(p) for p in objectives.teacher.parameters()}
    assert build_objective_set(make_model(), [{"name": "contrastive"}]).teacher is None  # built only when needed


class _NoBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = make_model().config
        self.proj = nn.Linear(2, 2)

    def no_weight_decay(self):
        return set()


def test_teacher_needs_a_backbone_with_patch_features_and_a_valid_momentum():
    model = _NoBackbone()
    objective = MaskedPrediction(MaskedPredictionConfig(head_hidden=8), model.config)
    with pytest.raises(ConfigError, match=r"masked_prediction.*per-patch image features"):
        ObjectiveSet(model, [objective], total_steps=4)
    with pytest.raises(ConfigError, match="teacher.momentum_end"):
        load_config(overrides=["teacher.momentum=0.99", "teacher.momentum_end=0.9"])
    with pytest.raises(ConfigError, match="teacher.momentum"):
        load_config(overrides=["teacher.momentum=1.5"])
    assert load_config(overrides=["teacher.momentum=0.99"]).teacher.momentum == 0.99
