"""Eval additions: beam search (beam 1 is greedy; a vocabulary-wide beam is exhaustive), beam
captioning figures and the PNG sheet from ``vlpretrain eval``, and the CLIPScore-style alignment score."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.helpers import make_model
from tests.test_eval import write_eval_shard
from vlpretrain.cli import main
from vlpretrain.eval.beam import beam_search, caption_logprob
from vlpretrain.export.source import load_source


def _model_and_pixels():
    model = make_model("debug", max_text_len=12).eval()
    with torch.no_grad():  # a peaked, non-trivial next-token distribution
        model.backbone.text_embed.weight.normal_(0, 0.05)
    pixels = torch.randn(3, 3, model.config.image_size, model.config.image_size, generator=torch.Generator().manual_seed(0))
    return model, pixels


def test_beam_1_equals_greedy_and_its_score_is_the_caption_logprob():
    model, pixels = _model_and_pixels()
    greedy = model.generate(pixels, max_new_tokens=8)
    ids, scores = beam_search(model, pixels, beams=1, max_new_tokens=8)
    assert ids.tolist() == greedy.tolist()
    assert torch.allclose(scores, caption_logprob(model, pixels, greedy), atol=1e-4)


def test_beam_scores_are_real_logprobs_and_a_vocabulary_wide_beam_finds_the_best_caption():
    """Beam scores equal an independent teacher-forced forward; with as many beams as tokens, two
    decoding steps are exhaustive, so the beam's best equals the brute-force best over all V x V
    two-token captions (wider beams need not beat greedy in general, so that is not asserted)."""
    model, pixels = _model_and_pixels()
    cfg = model.config
    for beams in (2, 4):
        ids, scores = beam_search(model, pixels, beams=beams, max_new_tokens=8)
        assert torch.allclose(scores, caption_logprob(model, pixels, ids), atol=1e-4)
    V = cfg.vocab_size
    ids, scores = beam_search(model, pixels, beams=V, max_new_tokens=2)
    assert torch.allclose(scores, caption_logprob(model, pixels, ids), atol=1e-4)
    prefixes = torch.stack([torch.full((V,), cfg.bos_token_id), torch.arange(V)], dim=1)  # (V, 2): BOS t1
    for b in range(len(pixels)):
        with torch.no_grad():
            logp = model(pixel_values=pixels[b:b + 1].expand(V, -1, -1, -1),
                         input_ids=prefixes).logits.float().log_softmax(-1)  # (V, 2, V)
        total = logp[0, 0][:, None] + logp[:, 1]  # (V, V): log p(t1) + log p(t2 | t1)
        total[cfg.eos_token_id] = float("-inf")  # after EOS only pad follows, at no cost
        total[cfg.eos_token_id, cfg.pad_token_id] = logp[0, 0, cfg.eos_token_id]
        assert abs(float(scores[b]) - float(total.max())) < 1e-4, (b, float(scores[b]), float(total.max()))


def test_eval_cli_beam_captions_and_a_png_sheet_next_to_the_json(trained_run, tmp_path):
    shards = write_eval_shard(tmp_path / "eval", n=8)
    out = tmp_path / "figures.json"
    assert main(["eval", "--model", str(trained_run / "model"), "--data", str(shards), "--tasks", "retrieval",
                 "captioning", "--max-new-tokens", "6", "--beams", "3", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["captioning"]["greedy"]) == set(figures["captioning"]["beam3"]) == {"bleu4", "cider"}
    assert all("beam" in e for e in figures["captioning"]["examples"])
    assert len(figures["retrieval"]["examples"]) == 8
    sheet = Image.open(out.with_suffix(".png"))
    assert sheet.format == "PNG" and sheet.size[0] > 400
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_alignment_score_is_clipscore_of_each_image_and_prompt(trained_run, tmp_path, capsys):
    folder = tmp_path / "renders"
    folder.mkdir()
    colours = [(220, 40, 40), (40, 80, 220), (40, 200, 60)]
    for i, c in enumerate(colours):
        Image.new("RGB", (40, 40), c).save(folder / f"view{i}.png")
    prompts = ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "align.json"
    assert main(["eval", "--model", str(trained_run / "model"), "--images", str(folder), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["alignment"]
    loaded = load_source(trained_run / "model")
    batch = loaded.processor(images=[str(folder / f"view{i}.png") for i in range(3)], text=prompts)
    with torch.no_grad():
        cos = (loaded.model.encode_image(batch["pixel_values"]) *
               loaded.model.encode_text(batch["input_ids"], batch["attention_mask"])).sum(-1)
    expected = (100 * cos.clamp(min=0)).tolist()
    assert got["pairs"] == 3 and [got["per_image"][f"view{i}.png"] for i in range(3)] == pytest.approx(expected, abs=1e-4)
    assert got["clip_score"] == pytest.approx(sum(expected) / 3, abs=1e-4)
    (tmp_path / "prompts.txt").write_text("only one prompt\n")
    assert main(["eval", "--model", str(trained_run / "model"), "--images", str(folder), "--prompts",
                 str(tmp_path / "prompts.txt")]) == 2
    assert "1 prompts for 3 images" in capsys.readouterr().err
