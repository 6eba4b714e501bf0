"""self_distillation and masked_prediction: their maths against references written plainly here (DINO's
loss, centre and cosine), the backbone's mask-token and any-size hooks, the views, bad input, and a
short run of a tiny model in which each learns on a held-out batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from objectives_support import make_model, shapes_batch

from vlpretrain.config import ConfigError, TeacherConfig
from vlpretrain.objectives import build_objective_set, parse_objective_entry
from vlpretrain.objectives.functional_teacher import (
    center_update, distillation_loss, effective_prototypes, entropy, masked_feature_loss, random_patch_mask,
    teacher_probs)
from vlpretrain.objectives.self_distillation import SelfDistillation, SelfDistillationConfig
from vlpretrain.objectives.views import random_resized_crops

SD = {"name": "self_distillation", "prototypes": 64, "head_hidden": 64, "head_bottleneck": 32, "local_size": 16,
      "local_crops": 4, "local_scale": [0.3, 0.6]}
EVAL = shapes_batch(seed=12345)


def test_distillation_loss_centre_and_usage_match_dinos_formulas():
    g = torch.Generator().manual_seed(0)
    V, B, K, t_s, t_t, m = 3, 5, 7, 0.1, 0.04, 0.9
    student, teacher, center = torch.randn(V, B, K, generator=g), torch.randn(B, K, generator=g), torch.randn(1, K, generator=g)
    probs = teacher_probs(teacher, center, t_t)
    # DINO's DINOLoss.forward, one local view at a time against the one global teacher view
    q = F.softmax((teacher - center) / t_t, dim=-1)
    total, n = 0.0, 0
    for v in range(V):
        total += torch.sum(-q * F.log_softmax(student[v] / t_s, dim=-1), dim=-1).mean()
        n += 1
    want_loss = float(total / n)
    assert abs(float(distillation_loss(student, probs, t_s)) - want_loss) < 1e-6 * max(1.0, want_loss)  # fp32
    # DINO's update_center: c * m + batch_center * (1 - m), batch_center = sum(teacher) / len(teacher)
    want = center * m + torch.sum(teacher, dim=0, keepdim=True) / len(teacher) * (1 - m)
    assert torch.allclose(center_update(center, teacher.mean(0, keepdim=True), m), want, atol=1e-7)
    def plain_entropy(dist):
        return -sum(float(p) * math.log(float(p)) for p in dist if p > 0)

    assert abs(float(entropy(probs)) - sum(plain_entropy(row) for row in q) / B) < 1e-5
    assert abs(float(effective_prototypes(probs)) - math.exp(plain_entropy(q.mean(0)))) < 1e-4
    one_hot = F.one_hot(torch.zeros(B, dtype=torch.long), K).float()
    assert abs(float(effective_prototypes(one_hot)) - 1.0) < 1e-5  # collapse: one prototype


def test_masked_feature_loss_is_one_minus_cosine_at_the_masked_patches():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)
    cos = [float(p @ t / (p.norm() * t.norm())) for p, t in zip(pred, target)]
    loss, mean_cos = masked_feature_loss(pred, target)
    assert abs(float(loss) - (1 - sum(cos) / 9)) < 1e-6 and abs(float(mean_cos) - sum(cos) / 9) < 1e-6
    mask = random_patch_mask(4, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [8] * 4 and not torch.equal(mask[0], mask[1])


def test_backbone_replaces_masked_patch_embeddings_and_reads_other_sizes():
    model = make_model()
    bb, px = model.backbone, torch.randn(2, 3, 32, 32)
    token = torch.randn(64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3], mask[1, 10] = True, True
    plain, masked = bb.embed_image(px), bb.embed_image(px, patch_mask=mask, mask_token=token)
    assert torch.equal(masked[:, 1:][~mask], plain[:, 1:][~mask]) and torch.equal(masked[:, 0], plain[:, 0])
    want = bb.norm_pre(token + bb.pos_embed[0, 1:][mask.nonzero()[:, 1]] + bb.modality_embed[0])  # per token
    assert torch.allclose(masked[:, 1:][mask], want, atol=1e-6)
    with pytest.raises(ValueError, match="patch_mask and mask_token"):
        bb(pixel_values=px, patch_mask=mask)
    with pytest.raises(ValueError, match="expected"):
        bb(pixel_values=torch.randn(2, 3, 16, 16))  # other sizes only when asked
    small = bb(pixel_values=torch.randn(2, 3, 16, 16), layout="image", any_size=True).image
    assert small.shape == (2, 1 + 4, 64) and torch.equal(bb.patch_positions(4), bb.pos_embed[:, 1:])


def test_local_crops_come_from_their_own_image():
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    images = colours[:, :, None, None].expand(3, 3, 32, 32).clone()  # one flat colour per image
    images[:, :, :16] *= 0.5  # top half darker: a crop's content depends on where it is
    crops = random_resized_crops(images, n=4, size=16, scale=(0.05, 0.4))
    assert crops.shape == (12, 3, 16, 16)
    for row in range(12):
        image = row % 3  # view-major: crop v of image b at row v * B + b
        hue = crops[row].mean((1, 2))
        assert int(hue.argmax()) == int(colours[image].argmax()) and float(hue.min()) == 0.0
    whole = random_resized_crops(images, n=1, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(whole, images, atol=1e-5)  # the whole image at its own size is itself


@pytest.mark.parametrize("entry, match", [
    ({"name": "masked_prediction", "mask_ratio": 0.0}, "mask_ratio"),
    ({"name": "masked_prediction", "mask_ratio": 1.0}, "mask_ratio"),
    ({"name": "self_distillation", "teacher_temp": 0.0}, "teacher_temp"),
    ({"name": "self_distillation", "local_scale": [0.5, 0.2]}, "local_scale")])
def test_bad_values_are_config_errors(entry, match):
    with pytest.raises(ConfigError, match=match):
        parse_objective_entry(entry)


@pytest.mark.parametrize("size", [40, 12])
def test_views_larger_than_the_image_or_off_the_patch_grid_are_errors(size):
    model = make_model()
    with pytest.raises(ConfigError, match="local_size"):
        SelfDistillation(SelfDistillationConfig(local_size=size), model.config)


def _learn(entry: dict, steps: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    objectives = build_objective_set(make_model(), [entry], total_steps=steps, teacher=TeacherConfig(momentum=0.99))

    def evaluate():
        objectives.eval()
        torch.manual_seed(0)  # the same crops and masks before and after
        with torch.no_grad():
            out = objectives(EVAL)
        objectives.train()
        return {k: float(v) for k, v in {**out.losses, **out.metrics}.items()}

    before = evaluate()
    optimizer = torch.optim.AdamW([p for _, named, _ in objectives.parameter_parts(0) for _, p in named], lr=1e-3,
                                  weight_decay=0.0)
    for step in range(steps):
        objectives.set_step(step)
        loss = objectives(shapes_batch(seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objectives.after_optimizer_step()
    after = evaluate()
    print(f"{entry['name']}: before {before}\n  after {after}")
    return before, after


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_self_distillation_student_comes_to_agree_with_the_teacher(one_thread):
    before, after = _learn(SD, steps=20)
    assert after["self_distillation/divergence"] < 0.6 * before["self_distillation/divergence"]
    assert after["self_distillation/agreement"] > before["self_distillation/agreement"]
    assert after["self_distillation/effective_prototypes"] > 4  # of 64: no collapse onto a few


def test_masked_prediction_cosine_to_the_teacher_rises(one_thread):
    before, after = _learn({"name": "masked_prediction", "head_hidden": 64}, steps=20)
    assert before["masked_prediction/masked_cosine"] < 0.3
    assert after["masked_prediction/masked_cosine"] > before["masked_prediction/masked_cosine"] + 0.4


def test_worker_views_come_from_the_same_image_and_leave_the_clean_view_as_it_was():
    from PIL import Image

    from vlpretrain.data.images import ImageSettings, ImageTransform
    from vlpretrain.data.views import ViewSpec, collate_views, make_views

    left_red = torch.zeros(3, 48, 64, dtype=torch.uint8)
    left_red[0, :, :32] = 255  # left half red, right half blue: a crop shows one or both, never green
    left_red[2, :, 32:] = 255
    img = Image.fromarray(left_red.permute(1, 2, 0).numpy())
    transform = ImageTransform(ImageSettings(size=32), train=True)
    specs = {"local": ViewSpec(3, 16, (0.05, 0.4)), "global": ViewSpec(1, 32, (0.4, 1.0))}
    clean = transform(img, seed=7)
    views = make_views(img, specs, sample_seed=7)
    assert torch.equal(transform(img, seed=7), clean)  # the clean view's draw is untouched
    assert views["local"].shape == (3, 3, 16, 16) and views["global"].shape == (1, 3, 32, 32)
    for crops in views.values():
        assert int(crops[:, 1].max()) == 0 and int(crops[:, [0, 2]].max()) == 255  # this image's content
    again = make_views(img, specs, sample_seed=7)
    assert all(torch.equal(views[k], again[k]) for k in views)  # a sample's views follow from its seed
    other = make_views(img, specs, sample_seed=8)
    assert not torch.equal(views["local"], other["local"])
    assert collate_views([views, again])["local"].shape == (2, 3, 3, 16, 16)
    with pytest.raises(ValueError, match="at most the image size"):
        ViewSpec(1, 64, (0.4, 1.0)).check("global", 32)


def test_self_distillation_reads_worker_views_when_the_batch_has_them():
    torch.manual_seed(0)
    objectives = build_objective_set(make_model(), [SD], total_steps=4)
    obj = objectives.objectives["self_distillation"]
    assert objectives.views() == {"local": obj.views()["local"]} and obj.views()["local"].count == 4
    local = torch.randn(6, 4, 3, 16, 16)  # (B, V, C, s, s)
    got = obj.local_views({"pixel_values": torch.randn(6, 3, 32, 32), "views": {"local": local}})
    assert torch.equal(got[1 * 6 + 2], local[2, 1])  # view-major: view v of image b at row v * B + b


def test_centre_moves_once_per_step_towards_the_mean_over_all_its_micro_batches():
    torch.manual_seed(0)
    objectives = build_objective_set(make_model(), [{**SD, "center_momentum": 0.8}], total_steps=4)
    obj, teacher = objectives.objectives["self_distillation"], objectives.teacher
    before = obj.center.clone()
    batch = shapes_batch(seed=3)
    halves = [{k: v[:12] for k, v in batch.items()}, {k: v[12:] for k, v in batch.items()}]
    objectives.set_step(0)
    for half in halves:  # two micro-batches of one optimiser step
        objectives(half)
    assert torch.equal(obj.center, before)  # not moved by a forward
    objectives.after_optimizer_step()
    with torch.no_grad():
        logits = teacher.heads["self_distillation"]["head"](
            teacher.backbone(pixel_values=batch["pixel_values"], layout="image").image[:, 0])  # (24, K)
    assert torch.allclose(obj.center, 0.8 * before + 0.2 * logits.mean(0, keepdim=True), atol=1e-6)
    objectives.set_step(1)
    objectives(halves[0])
    objectives.set_step(1)  # a new step begins: what was gathered outside it (a probe forward) is dropped
    moved = obj.center.clone()
    objectives.after_optimizer_step()
    assert torch.equal(obj.center, moved)
