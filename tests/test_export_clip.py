"""``vlpretrain export --format clip``: a native transformers CLIPModel folder, checked with the stock
CLIPModel, CLIPProcessor and the zero-shot-image-classification pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor, pipeline

from tests.helpers import make_model
from vlpretrain.cli import main
from vlpretrain.export.clip_format import export_clip
from vlpretrain.export.source import LoadedModel, TrainingInfo, load_source
from vlpretrain.export.timm_format import NotExpressible

TEXTS = ["a small red circle", "two blue squares at the top", "a green triangle"]
LABELS = ["red circle", "blue square", "green triangle", "yellow star"]


def _images(size: int = 32) -> list[Image.Image]:
    out = []
    for colour, box in (((220, 40, 40), (4, 4, 20, 20)), ((40, 80, 220), (10, 2, 30, 14)), ((40, 200, 60), (0, 8, 28, 30))):
        img = Image.new("RGB", (size, size), (250, 250, 250))
        ImageDraw.Draw(img).ellipse(box, fill=colour)
        out.append(img)
    return out


@pytest.fixture(scope="module")
def clip_export(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "vl-clip"
    assert main(["export", str(trained_run / "checkpoints" / "step_6"), "--out", str(out), "--format", "clip"]) == 0
    return out, load_source(trained_run / "checkpoints" / "step_6")


def test_clip_export_has_image_and_text_embeddings_equal_to_ours(clip_export, trained_run):
    out, ours = clip_export
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "processor_config.json", "README.md"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    clip = CLIPModel.from_pretrained(out).eval()
    stock = CLIPProcessor.from_pretrained(out)
    batch = ours.processor(images=_images(), text=TEXTS)
    theirs_text = stock(text=TEXTS, padding=True, return_tensors="pt")
    eos = clip.config.text_config.eos_token_id
    assert eos != 2 and eos == len(ours.processor.tokenizer) - 1
    expected = batch["input_ids"].clone()  # ours with EOS (2) and the last id swapped
    expected[batch["input_ids"] == 2], expected[batch["input_ids"] == eos] = eos, 2
    assert theirs_text["input_ids"].tolist() == expected.tolist()  # the stock tokenizer adds BOS/EOS itself
    with torch.no_grad():
        img = ours.model.encode_image(batch["pixel_values"])
        txt = ours.model.encode_text(batch["input_ids"], batch["attention_mask"])
        c_img = torch.nn.functional.normalize(clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
        c_txt = torch.nn.functional.normalize(clip.get_text_features(**theirs_text).pooler_output, dim=-1)
        stock_pixels = stock(images=_images(), return_tensors="pt")["pixel_values"]
    diff = max((img - c_img).abs().max().item(), (txt - c_txt).abs().max().item())
    print(f"clip export embedding max abs diff: {diff:.2e}")
    assert diff < 1e-4
    assert (stock_pixels - batch["pixel_values"]).abs().max() < 1e-4  # same size/mean/std as our processor
    scale = load_file(str(trained_run / "checkpoints" / "step_6" / "model.safetensors"))["objectives.contrastive.logit_scale"]
    assert clip.logit_scale.item() == pytest.approx(float(scale))


def test_stock_zero_shot_pipeline_runs_and_agrees_with_our_prediction(clip_export):
    out, ours = clip_export
    classify = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    template = "This is a photo of {}."  # the pipeline's default hypothesis template
    batch = ours.processor(images=_images(), text=[template.format(label) for label in LABELS])
    with torch.no_grad():
        img = ours.model.encode_image(batch["pixel_values"])
        txt = ours.model.encode_text(batch["input_ids"], batch["attention_mask"])
        probs = (math.exp(ours.info.logit_scale) * img @ txt.T).softmax(-1)  # (3 images, 4 labels)
    worst = 0.0
    for image, row in zip(_images(), probs):
        result = classify(image, candidate_labels=LABELS)
        scores = {r["label"]: r["score"] for r in result}
        assert result[0]["label"] == LABELS[int(row.argmax())]
        worst = max(worst, *(abs(scores[label] - row[i].item()) for i, label in enumerate(LABELS)))
        print(f"pipeline top label {result[0]['label']!r} ({result[0]['score']:.4f}); ours {LABELS[int(row.argmax())]!r}")
    print(f"pipeline vs ours probability max abs diff: {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("overrides, why", [({"modality_experts": True, "pre_norm": True}, "modality experts"),
                                            ({"pre_norm": False}, "pre_norm=true")])
def test_an_inexpressible_model_is_a_clear_error_and_writes_nothing(clip_export, tmp_path, overrides, why):
    _, ours = clip_export
    loaded = LoadedModel(make_model("debug", vocab_size=ours.model.config.vocab_size, **overrides), ours.processor,
                         TrainingInfo())
    with pytest.raises(NotExpressible, match=why):
        export_clip(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_sigmoid_trained_models_bias_stays_in_the_folder_and_is_said(clip_export, trained_run, tmp_path):
    """SigLIP's learnt bias has no CLIPModel parameter: it goes to config.json and the model card, with a
    warning, never silently away. The scale and bias are read as 1-element tensors (how FSDP keeps them)."""
    import json
    import shutil

    from safetensors.torch import save_file

    from vlpretrain.export.clip_format import ClipExportNote

    ckpt = tmp_path / "run" / "checkpoints" / "step_6"
    shutil.copytree(trained_run / "checkpoints" / "step_6", ckpt)
    shutil.copytree(trained_run / "processor", tmp_path / "run" / "processor")  # the checkpoint points to it
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["objectives.contrastive.logit_scale"] = torch.tensor([2.5])
    weights["objectives.contrastive.logit_bias"] = torch.tensor([-7.25])
    save_file(weights, str(ckpt / "model.safetensors"))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the file was rewritten on purpose
    manifest["files"]["model.safetensors"] = (ckpt / "model.safetensors").stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "siglip-clip"
    with pytest.warns(ClipExportNote, match="logit bias -7.25"):
        assert main(["export", str(ckpt), "--out", str(out), "--format", "clip"]) == 0
    assert json.loads((out / "config.json").read_text())["logit_bias"] == -7.25
    clip = CLIPModel.from_pretrained(out)
    assert clip.config.logit_bias == -7.25 and clip.logit_scale.item() == pytest.approx(2.5)
    assert "logit bias -7.25" in (out / "README.md").read_text()

    _, ours = clip_export  # a model folder without a training record: unknown scale and bias, said so
    with pytest.warns(ClipExportNote, match="logit scale is unknown"):
        export_clip(LoadedModel(ours.model, ours.processor, TrainingInfo()), tmp_path / "unknown")
    assert "is unknown" in (tmp_path / "unknown" / "README.md").read_text()
