"""Several objectives from one forward: CoCa in one pass equals separate forwards; the planner's counts."""

from __future__ import annotations

import pytest
import torch
from objectives_support import grads_of, make_model, max_grad_diff, random_batch

from vlpretrain.objectives import build_objective_set
from vlpretrain.objectives.embeddings import image_embedding, text_embedding
from vlpretrain.objectives.functional import clip_loss
from vlpretrain.objectives.shared import shared_forward


def _count_forwards(model):
    calls = []
    handle = model.backbone.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


@torch.no_grad()
def test_coca_one_pass_equals_separate_forwards():
    model = make_model(text_embed_depth=1)  # debug depth 2: text unimodal in block 0, reads the image in block 1
    batch = random_batch(batch=6, length=10)
    calls, handle = _count_forwards(model)
    shared = shared_forward(model, batch, {"image", "text", "caption"})
    handle.remove()
    assert len(calls) == 1 and shared.forwards == 1

    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    img_sep, txt_sep = model.encode_image(pixels), model.encode_text(ids, mask)
    logits_sep = model(pixels, ids, mask).logits
    img_one, txt_one = image_embedding(model, shared.image), text_embedding(model, shared.text, mask)
    logits_one = model.lm_head(shared.caption)
    assert float((img_one - img_sep).abs().max()) < 1e-5
    assert float((txt_one - txt_sep).abs().max()) < 1e-5
    real = mask.bool()
    assert float((logits_one - logits_sep)[real].abs().max()) < 1e-4
    # the unimodal text really is read before the image is seen: it differs from the caption states
    assert float((shared.text - shared.caption)[real].abs().max()) > 1e-2


def test_objective_set_one_pass_losses_and_gradients_equal_separate_forwards():
    model = make_model(text_embed_depth=1)
    batch = random_batch(batch=6, length=10)
    objectives = build_objective_set(model, [{"name": "contrastive"}, {"name": "captioning", "weight": 2.0}])
    calls, handle = _count_forwards(model)
    out = objectives(batch)
    handle.remove()
    assert len(calls) == 1
    out.loss.backward()
    one_pass = grads_of(objectives)

    objectives.zero_grad()
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
    scale = objectives.objectives["contrastive"].logit_scale.exp()
    contrastive = clip_loss(img, txt, img, txt, scale)
    captioning = model(pixels, ids, mask, labels=ids).loss
    (contrastive + 2.0 * captioning).backward()
    separate = grads_of(objectives)

    assert abs(float(out.losses["contrastive"] - contrastive)) < 1e-5
    assert abs(float(out.losses["captioning"] - captioning)) < 1e-5
    worst, where = max_grad_diff(one_pass, separate)
    largest = max(float(g.abs().max()) for g in separate.values())  # fp32 summation noise grows with it
    assert worst < 1e-5 * max(1.0, largest), (where, worst, largest)


@pytest.mark.parametrize("depth,needs,forwards", [
    (1, {"image", "text", "caption"}, 1),
    (1, {"caption"}, 1),
    (1, {"image", "text"}, 2),
    (0, {"image", "text", "caption"}, 2),  # K = 0: the unimodal text needs its own (text-only) forward
    (0, {"image"}, 1),
    (0, set(), 0),
    (1, {"image_pooled", "text_pooled", "caption"}, 1),  # pooled from the CoCa pass
    (0, {"image_pooled", "text_pooled"}, 2),
    (0, {"image", "image_pooled"}, 1),
])
def test_planner_runs_the_fewest_forwards(depth, needs, forwards):
    model = make_model(text_embed_depth=depth)
    calls, handle = _count_forwards(model)
    shared = shared_forward(model, random_batch(batch=2), needs)
    handle.remove()
    assert len(calls) == forwards == shared.forwards
    for need in ("image", "text", "caption", "image_pooled", "text_pooled"):
        made = need in needs or (need == "image" and "caption" in needs) or (
            need == "text" and "caption" in needs and bool({"text", "text_pooled"} & needs) and depth > 0)
        assert (getattr(shared, need) is not None) == made, need


def test_objectives_with_the_same_needs_share_the_forward():
    model = make_model(text_embed_depth=1)
    objectives = build_objective_set(model, [{"name": "contrastive"}, {"name": "captioning"},
                                             {"name": "matching"}])
    calls, handle = _count_forwards(model)
    objectives(random_batch(batch=4))
    handle.remove()
    assert len(calls) == 2  # the shared CoCa pass + matching's own fused pass over positives and negatives


@pytest.mark.parametrize("overrides", [{}, {"text_embed_depth": 1}, {"modality_experts": True},
                                       {"patch_dropout": 0.5}, {"attn_backend": "eager"}, {"checkpointing": True}])
def test_pooled_only_forwards_give_the_full_forwards_embeddings_and_gradients(overrides):
    overrides = dict(overrides)
    checkpointing = overrides.pop("checkpointing", False)
    model = make_model(**overrides)
    model.set_grad_checkpointing(checkpointing)
    batch = random_batch(batch=6, length=10)
    objectives = build_objective_set(model, [{"name": "contrastive"}])
    assert objectives.needs == {"image_pooled", "text_pooled"}
    results = []
    for needs in ({"image_pooled", "text_pooled"}, {"image", "image_pooled", "text", "text_pooled"}):
        objectives.needs = frozenset(needs)  # the second: full forwards, pooled afterwards
        objectives.zero_grad()
        torch.manual_seed(0)  # the same patch dropout draw
        out = objectives(batch)
        out.loss.backward()
        results.append((out.loss.detach(), grads_of(objectives)))
    (pooled_loss, pooled_grads), (full_loss, full_grads) = results
    assert abs(float(pooled_loss - full_loss)) < 1e-5
    worst, where = max_grad_diff(pooled_grads, full_grads)
    largest = max(float(g.abs().max()) for g in full_grads.values())  # fp32 summation noise grows with it
    assert worst < 1e-5 * max(1.0, largest), (where, worst, largest)
    assert float(full_loss) > 0 and any(float(g.abs().max()) > 0 for g in full_grads.values())


def test_pooled_only_computes_one_token_in_the_last_block_and_refuses_other_layouts():
    from vlpretrain.train.flops import FlopCounter

    model = make_model()
    batch = random_batch(batch=3, length=7)
    counter = FlopCounter(model)
    full = model.backbone(pixel_values=batch["pixel_values"], layout="image")
    full_flops = counter.take_flops()
    pooled = model.backbone(pixel_values=batch["pixel_values"], layout="image", pooled_only=True)
    pooled_flops = counter.take_flops()
    counter.remove()
    assert pooled.image.shape == (3, 1, full.image.shape[-1])
    assert float((pooled.image[:, 0] - full.image[:, 0]).abs().max()) < 1e-5
    cfg, L = model.config, full.image.shape[1]
    D, H = cfg.width, int(cfg.width * cfg.mlp_ratio)
    saved = 2 * (L - 1) * (D * D + D * H + H * D) + 4 * (L - 1) * L * D  # proj, fc1, fc2 and attention rows
    assert full_flops - pooled_flops == 3 * batch["pixel_values"].shape[0] * saved
    with pytest.raises(ValueError, match="pooled_only serves the 'image' and 'text' layouts"):
        model.backbone(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], pooled_only=True)
