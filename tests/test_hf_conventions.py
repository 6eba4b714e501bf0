"""transformers conventions: ``VLProcessor`` is a ``ProcessorMixin`` (padding/truncation/max_length, numpy/tensor/PIL
images, save/load, hub errors as themselves), ``generate`` takes its outputs and transformers' decoding arguments,
the export runs in transformers' pipelines with no vlpretrain, and a missing attention mask is inferred from pad."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import HIDE_VLPRETRAIN, run_without_vlpretrain

from vlpretrain import VLModel, VLProcessor
from vlpretrain.cli import main
from vlpretrain.data.images import ImageTransform
from vlpretrain.eval.beam import beam_search, caption_logprob

TEXTS = ["a small red circle", "", "two blue squares at the top " * 6]  # the last is longer than 16 tokens

NO_VLPRETRAIN = HIDE_VLPRETRAIN + r'''
import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

folder, texts = sys.argv[1], json.loads(sys.argv[2])
image = Image.new("RGB", (40, 32), (220, 40, 40))
image.paste((40, 80, 220), (4, 4, 20, 20))
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
arr = np.array(image)
batch = processor(text=texts, images=[arr, torch.from_numpy(arr).permute(2, 0, 1), image], padding="max_length",
                  truncation=True, max_length=16, return_tensors="pt")
captioner = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
out = {"processor": type(processor).__module__ + "." + type(processor).__name__,
       "image_processor": type(processor.image_processor).__name__,
       **{k: v.tolist() for k, v in batch.items()},
       "prompted": captioner(images=image, text="a small", max_new_tokens=6)}
torch.manual_seed(0)
out.update(sampled=captioner(images=image, text="", max_new_tokens=6,
                                   generate_kwargs={"do_sample": True, "temperature": 3.0}),
           features=extractor(image), pooled=extractor(image, pool=True))
print("RESULT " + json.dumps(out))
'''


def _image() -> Image.Image:
    image = Image.new("RGB", (40, 32), (220, 40, 40))
    image.paste((40, 80, 220), (4, 4, 20, 20))
    return image


@pytest.fixture(scope="module")
def model_dir(trained_run):
    return trained_run / "model"


@pytest.fixture(scope="module")
def loaded(model_dir):
    return VLModel.from_pretrained(str(model_dir)).eval(), VLProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def no_vlpretrain(model_dir, tmp_path_factory):
    """One process without vlpretrain: AutoProcessor, both pipelines, on an ``hf`` export of the run's model."""
    tmp = tmp_path_factory.mktemp("hf_conventions")
    export = tmp / "export"
    assert main(["export", str(model_dir), "--out", str(export)]) == 0
    return run_without_vlpretrain(NO_VLPRETRAIN, tmp, str(export), json.dumps(TEXTS))


def test_processor_takes_transformers_arguments_and_array_tensor_pil_images_with_todays_pixels(loaded, tmp_path):
    _, processor = loaded
    image = _image()
    arr = np.array(image)
    images = [arr, torch.from_numpy(arr).permute(2, 0, 1), image]
    batch = processor(text=TEXTS, images=images, padding="max_length", truncation=True, max_length=16,
                      return_tensors="pt")
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    S = processor.image_settings.size
    assert batch["pixel_values"].shape == (3, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 16)
    tok = processor.tokenizer
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[1] == 2 and lengths[2] == 16  # "" is BOS EOS; the long text is truncated to max_length
    assert all(batch["input_ids"][i, n - 1] == tok.eos_token_id for i, n in enumerate(lengths))  # EOS kept
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    # today's pixels: the eval ImageTransform on the PIL image, for every input kind
    transform = ImageTransform(processor.image_settings, train=False)
    today = transform.normalize(transform(transform.prepare(image))[None])  # (1, 3, S, S)
    assert all(torch.equal(batch["pixel_values"][i], today[0]) for i in range(3))
    assert processor.batch_decode(batch["input_ids"])[0] == TEXTS[0]
    assert processor.decode(batch["input_ids"][0]) == TEXTS[0]

    longest = processor(text=TEXTS[:2], padding=True)  # defaults: longest, truncated to the context, tensors
    assert longest["input_ids"].shape[1] == max(len(tok(TEXTS[0])["input_ids"]) + 2, 2)
    ragged = processor(text=TEXTS[:2], padding=False, return_tensors=None)
    assert [len(r) for r in ragged["input_ids"]] == [longest["attention_mask"][i].sum().item() for i in range(2)]
    with pytest.raises(ValueError, match="unknown argument 'colour'"):
        processor(text=TEXTS, colour="red")

    processor.save_pretrained(tmp_path / "proc")
    saved = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert saved["image_processor"]["size"] == {"shortest_edge": S} and saved["context_length"] == processor.context_length
    again = VLProcessor.from_pretrained(tmp_path / "proc")(text=TEXTS, images=images, padding="max_length",
                                                           max_length=16)
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    (tmp_path / "proc" / "processor_config.json").unlink()  # a folder written before: vlprocessor_config.json
    (tmp_path / "proc" / "vlprocessor_config.json").write_text(json.dumps(
        {"context_length": processor.context_length, "image": processor.image_settings.to_dict()}))
    legacy = VLProcessor.from_pretrained(tmp_path / "proc")
    assert legacy.image_settings == processor.image_settings and legacy.context_length == processor.context_length


def test_hub_errors_surface_as_themselves(monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(OSError, match="couldn't connect") as offline:
        VLProcessor.from_pretrained("nobody/no-such-model", local_files_only=True)
    assert "save_pretrained" not in str(offline.value)
    request = httpx.Request("GET", "https://huggingface.co/nobody/no-such-model")
    for error, message in [(RepositoryNotFoundError("404", response=httpx.Response(404, request=request)),
                            "not a valid model identifier"),
                           (HfHubHTTPError("401 Unauthorized", response=httpx.Response(401, request=request)),
                            "401 Unauthorized")]:
        def refuse(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr("transformers.utils.hub.hf_hub_download", refuse)
        with pytest.raises(OSError, match=message):
            VLProcessor.from_pretrained("nobody/no-such-model")


def test_generate_takes_processor_outputs_greedy_beams_and_sampling(loaded):
    model, processor = loaded
    images = [_image(), Image.new("RGB", (32, 32), (40, 200, 40))]
    pixels = processor(images=images)["pixel_values"]
    inputs = processor(images=images)
    greedy = model.generate(**inputs, max_new_tokens=8)
    assert torch.equal(greedy, model.generate(pixels, max_new_tokens=8, use_cache=False))  # uncached path

    beams = model.generate(**inputs, num_beams=3, max_new_tokens=8, return_dict_in_generate=True)
    ids, scores = beam_search(model, pixels, beams=3, max_new_tokens=8)
    assert torch.equal(beams.sequences, ids)
    assert torch.allclose(beams.sequences_scores, caption_logprob(model, pixels, ids), atol=1e-4)
    normalised = model.generate(**inputs, num_beams=3, max_new_tokens=8, length_penalty=1.0)
    assert normalised.shape[0] == 2 and (normalised[:, 0] == model.config.bos_token_id).all()

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(**inputs, do_sample=True, max_new_tokens=8, **kw)

    assert torch.equal(sample(0, temperature=5.0), sample(0, temperature=5.0))
    assert not torch.equal(sample(0, temperature=100.0), sample(1, temperature=100.0))
    assert torch.equal(sample(3, top_k=1), greedy)  # transformers' top-k warper wired in

    # prompts of different lengths: the text is continued, each row as if generated alone
    prompted = model.generate(**processor(images=images, text=["", "a small"]), max_new_tokens=5)
    alone = model.generate(**processor(images=images[1:], text=["a small"]), max_new_tokens=5)
    prompt = processor(text=["a small"])["input_ids"][0, :-1]  # BOS a small (its EOS dropped)
    assert torch.equal(prompted[1, :alone.shape[1]], alone[0]) and torch.equal(alone[0, :len(prompt)], prompt)
    assert torch.equal(prompted[0, :greedy.shape[1]][:6], greedy[0, :6])
    pad = model.config.pad_token_id  # a left-padded prompt (a tokenizer padding on the left) reads the same
    left = torch.cat([torch.full((1, 2), pad), prompt[None]], dim=1)
    left_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, len(prompt), dtype=torch.long)], dim=1)
    assert torch.equal(model.generate(pixels[1:], input_ids=left, attention_mask=left_mask, max_new_tokens=5), alone)
    with pytest.raises(ValueError, match="does not use"):
        model.generate(**inputs, colour="red")
    with pytest.raises(ValueError, match="does not implement"):
        model.generate(**inputs, repetition_penalty=1.3)


def test_missing_attention_mask_is_inferred_from_the_pad_id(loaded):
    model, processor = loaded
    batch = processor(text=TEXTS[:2], images=[_image(), _image()])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # a padded batch
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), model.encode_text(ids, mask), atol=1e-6)
        plain = model(pixel_values=batch["pixel_values"], input_ids=ids, labels=ids).loss
        masked = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask, labels=ids).loss
        pads_counted = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=torch.ones_like(mask),
                             labels=ids).loss
    assert torch.allclose(plain, masked, atol=1e-6) and not torch.allclose(plain, pads_counted, atol=1e-3)


def test_export_loads_in_auto_processor_and_pipelines_without_vlpretrain(no_vlpretrain, loaded):
    model, processor = loaded
    theirs = no_vlpretrain
    assert theirs["processor"].startswith("transformers_modules.") and theirs["image_processor"] == "VLImageProcessor"
    image = _image()
    arr = np.array(image)
    ours = processor(text=TEXTS, images=[arr, torch.from_numpy(arr).permute(2, 0, 1), image], padding="max_length",
                     truncation=True, max_length=16)
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(torch.tensor(theirs[key]), ours[key]), key
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = processor.batch_decode(model.generate(**processor(images=[image]), max_new_tokens=6, do_sample=True,
                                                        temperature=3.0))[0]
        prompted = processor.batch_decode(model.generate(**processor(images=[image], text=["a small"]),
                                                         max_new_tokens=6))[0]
        out = model(**processor(images=[image]))
        features, pooled = out.image_hidden_states, out.pooler_output  # (1, 1 + N, D), (1, D)
    print(f"pipeline captions: {theirs['sampled']!r} {theirs['prompted']!r}")
    assert theirs["sampled"][0]["generated_text"] == sampled and sampled.strip()  # an empty prompt, a caption
    assert theirs["prompted"][0]["generated_text"] == prompted and prompted.startswith("a small")
    assert torch.allclose(torch.tensor(theirs["features"]), features, atol=1e-5)
    assert torch.allclose(torch.tensor(theirs["pooled"]), pooled, atol=1e-5) and pooled.shape[0] == 1
    assert torch.allclose(model.image_proj(pooled), model.encode_image(processor(images=[image])["pixel_values"],
                                                                       normalize=False), atol=1e-5)
