"""Fine-tuning API with the real consumers: transformers.Trainer, a classification head, peft LoRA."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import make_model
from vlpretrain import VLModel, VLProcessor
from vlpretrain.data.synthetic import captions, random_scene, render
from vlpretrain.finetune import (VLModelForImageClassification, apply_lora, class_text_embeddings, freeze_image_only,
                                 freeze_text_only, lock_image_path)

SHAPES = ["circle", "square", "triangle"]


def scenes(n: int, seed: int = 0):
    """(PIL images, first captions, shape label of the first object) of ``n`` synthetic scenes."""
    out = [random_scene(random.Random(f"ft/{seed}/{i}")) for i in range(n)]
    return ([render(s, 32) for s in out], [captions(s)[0] for s in out],
            [SHAPES.index(s["objects"][0]["shape"]) for s in out])


def test_vlmodel_trains_under_transformers_trainer_and_the_loss_falls(trained_run, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = VLModel.from_pretrained(trained_run / "model")
    processor = VLProcessor.from_pretrained(trained_run / "model")
    images, texts, _ = scenes(16)
    batch = processor(images=images, text=texts)
    rows = [{"pixel_values": batch["pixel_values"][i], "input_ids": batch["input_ids"][i],
             "attention_mask": batch["attention_mask"][i], "labels": batch["input_ids"][i]} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, max_steps=12,
                             learning_rate=2e-3, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"Trainer captioning loss: first {losses[0]:.3f} -> last {losses[-1]:.3f}")
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]


def test_classifier_from_pretrained_with_zero_shot_head_and_loss(trained_run):
    folder = trained_run / "model"
    clf = VLModelForImageClassification.from_pretrained(folder, num_labels=3).eval()
    base = VLModel.from_pretrained(folder).eval()
    for name, value in base.state_dict().items():  # the pretrained weights arrived under vlmodel.
        assert torch.equal(clf.vlmodel.state_dict()[name], value), name
    processor = VLProcessor.from_pretrained(folder)
    clf.init_head_from_class_names(processor, SHAPES)
    images, _, labels = scenes(8)
    pixels = processor(images=images)["pixel_values"]
    with torch.no_grad():
        out = clf(pixel_values=pixels, labels=torch.tensor(labels))
        zero_shot = 100 * base.encode_image(pixels) @ class_text_embeddings(base, processor, SHAPES).T  # (B, K)
    assert out.logits.shape == (8, 3) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.logits, zero_shot, atol=1e-4)
    with pytest.raises(ValueError, match="2 class names for a head of num_labels=3"):
        clf.init_head_from_class_names(processor, SHAPES[:2])


@pytest.mark.parametrize("experts", [False, True])
def test_freeze_image_only_and_text_only_freeze_only_one_modality(experts):
    model = make_model(modality_experts=experts)
    frozen_image = set(freeze_image_only(model))
    assert "backbone.patch_embed.proj.weight" in frozen_image and "image_proj.weight" in frozen_image
    assert "backbone.blocks.0.attn.qkv.weight" not in frozen_image  # shared: cannot be frozen for one modality
    assert ("backbone.blocks.0.mlp.fc1.weight" in frozen_image) == experts
    frozen_text = set(freeze_text_only(make_model(modality_experts=experts)))
    assert "backbone.text_embed.weight" in frozen_text and "text_proj.weight" in frozen_text
    assert ("backbone.blocks.0.text_mlp.fc1.weight" in frozen_text) == experts
    assert not frozen_image & frozen_text
    # an image-only step leaves the frozen image tower untouched and trains the rest
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([[1, 7, 9, 2]])
    model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=ids.expand(2, -1), labels=ids.expand(2, -1)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not changed & frozen_image and "backbone.blocks.0.attn.qkv.weight" in changed


@pytest.mark.parametrize("experts", [False, True])
def test_lit_locks_everything_image_tokens_pass_through(experts):
    """lock_image_path (train.freeze: image_path): image embeddings stay as they were; text-only parts train."""
    model = make_model(modality_experts=experts)
    frozen = set(lock_image_path(model))
    assert "backbone.blocks.0.attn.qkv.weight" in frozen and "backbone.modality_embed" in frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("backbone.blocks.0.text_mlp.fc1.weight" in trainable) == experts and "text_proj.weight" in trainable
    px, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 7, 9, 2], [1, 8, 2, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        image_before, text_before = model.encode_image(px), model.encode_text(ids, mask)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    (model.encode_image(px) @ model.encode_text(ids, mask).T).diagonal().sum().neg().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(model.encode_image(px), image_before)
        assert not torch.allclose(model.encode_text(ids, mask), text_before)


def test_lora_wraps_attention_and_mlp_trains_a_step_and_saves_the_adapter(trained_run, tmp_path):
    clf = VLModelForImageClassification.from_pretrained(trained_run / "model", num_labels=3)
    peft_model = apply_lora(clf, r=4, modules_to_save=["classifier"])
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert any(part in n for n in lora_names), part
    assert not any("patch_embed" in n for n in lora_names)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    images, _, labels = scenes(8)
    pixels = VLProcessor.from_pretrained(trained_run / "model")(images=images)["pixel_values"]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(pixel_values=pixels, labels=torch.tensor(labels)).loss.backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if n in before)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
