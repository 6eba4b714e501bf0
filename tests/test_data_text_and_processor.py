"""The caption tokenizer through ``AutoTokenizer``, caption encoding, and ``VLProcessor`` (save/load,
same transform as the evaluation stream, feeds ``VLModel``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tests.data_helpers import data_config, make_stream, synth_corpus
from vlpretrain import VLConfig, VLModel, VLProcessor
from vlpretrain.data.reader import SkipCounter, expand_sources, iter_captions, iter_shard
from vlpretrain.data.tokenizer import encode_captions, load_tokenizer, train_tokenizer
from vlpretrain.models.presets import preset_values


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_corpus(tmp_path_factory)


def test_tokenizer_loads_through_autotokenizer_and_round_trips(corpus):
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    captions = list(iter_captions(str(corpus / "train")))
    assert len(captions) > 200
    for caption in captions:
        ids = tok(caption, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == caption
        assert 3 not in ids  # every caption word is in the vocabulary
    assert len(tok("a small red circle left of a large blue square", add_special_tokens=False)["input_ids"]) <= 12


def test_tokenizer_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="vocab-size 4 is too small"):
        train_tokenizer(["a b"], 4, tmp_path / "tok")
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_tokenizer([" "], 64, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    with pytest.raises(FileNotFoundError, match="vlpretrain tokenizer --data"):
        load_tokenizer(tmp_path / "nowhere")


def test_encode_captions_pads_to_longest_and_keeps_eos_when_truncating(corpus):
    tok = load_tokenizer(corpus / "tokenizer")
    long = "a small red circle left of a large blue square " * 4
    out = encode_captions(tok, ["a red circle", long], context_length=10)
    assert out["input_ids"].shape == (2, 10)
    assert out["input_ids"][1, 0] == 1 and out["input_ids"][1, -1] == 2
    short = int(out["attention_mask"][0].sum())
    assert out["input_ids"][0, short - 1] == 2 and (out["input_ids"][0, short:] == 0).all()
    assert encode_captions(tok, ["a red circle"], 64)["input_ids"].shape[1] == short


def test_pad_multiple_rounds_the_padded_length_up_capped_at_the_context(corpus):
    tok = load_tokenizer(corpus / "tokenizer")
    captions = ["a red circle", "a small red circle left of a large blue square"]
    longest = encode_captions(tok, captions, 64)
    n = longest["input_ids"].shape[1]
    for multiple, context in ((8, 64), (5, 64), (n, 64), (64, 40)):
        out = encode_captions(tok, captions, context, pad_multiple=multiple)
        width = min(-(-n // multiple) * multiple, context)
        assert out["input_ids"].shape == (2, width), (multiple, context)
        # the real tokens are the longest padding's; the rest is padding, masked out
        assert torch.equal(out["input_ids"][:, :n], longest["input_ids"])
        assert torch.equal(out["attention_mask"][:, :n], longest["attention_mask"])
        assert (out["input_ids"][:, n:] == tok.pad_token_id).all() and (out["attention_mask"][:, n:] == 0).all()
    with pytest.raises(ValueError, match="pad_multiple=0 must be >= 1"):
        encode_captions(tok, captions, 64, pad_multiple=0)


def test_stream_pads_to_data_pad_multiple(corpus):
    tok = load_tokenizer(corpus / "tokenizer")
    widths = {multiple: [b["input_ids"].shape[1] for _, b in zip(range(3), make_stream(
        data_config(corpus, num_workers=0, pad_multiple=multiple), "val", batch_size=4, tokenizer=tok))]
        for multiple in (1, 8)}
    assert widths[8] == [min(-(-w // 8) * 8, 32) for w in widths[1]] and any(w % 8 for w in widths[1])


def test_processor_matches_eval_stream_round_trips_and_feeds_the_model(corpus, tmp_path):
    cfg = data_config(corpus, num_workers=0)
    tok = load_tokenizer(corpus / "tokenizer")
    batch = next(iter(make_stream(cfg, "val", batch_size=4, tokenizer=tok)))
    raw = {s.key: s for url in expand_sources(cfg.val)[0] for s in iter_shard(url, SkipCounter())}
    paths = []
    for key in batch["keys"]:
        paths.append(tmp_path / f"{key}.jpg")
        paths[-1].write_bytes(raw[key].image)
    texts = [raw[key].captions[0] for key in batch["keys"]]

    processor = VLProcessor.from_data_config(cfg, image_size=32, context_length=32, tokenizer=tok)
    out = processor(images=[str(p) for p in paths], text=texts, return_tensors="pt")
    assert torch.equal(out["pixel_values"], batch["pixel_values"])  # one transform for both
    assert torch.equal(out["input_ids"], batch["input_ids"])

    processor.save_pretrained(tmp_path / "proc")
    loaded = VLProcessor.from_pretrained(tmp_path / "proc")
    from PIL import Image

    images = [Image.open(p) for p in paths]
    again = loaded(images=images, text=texts)
    first = processor(images=images, text=texts)
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(first[key], again[key])
    assert loaded.batch_decode(again["input_ids"]) == texts

    model = VLModel(VLConfig(**preset_values("debug"))).eval()
    with torch.no_grad():
        img = model.encode_image(again["pixel_values"])
        txt = model.encode_text(again["input_ids"], again["attention_mask"])
        loss = model(**again, labels=again["input_ids"]).loss
    assert img.shape == txt.shape == (4, 64) and torch.isfinite(loss)
    with pytest.raises(FileNotFoundError, match="vlprocessor_config.json"):
        VLProcessor.from_pretrained(corpus / "tokenizer")
