"""``vlpretrain eval``: figures on labelled, multi-caption shards; bad input; the whole chain."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
import torch

from vlpretrain.cli import main
from vlpretrain.data.synthetic import captions, random_scene, render
from vlpretrain.eval.metrics import caption_scores, multi_caption_recall, topk_accuracy

SHAPES = ["circle", "square", "triangle"]


def write_eval_shard(folder, n: int = 24, labels: bool = True, class_names=SHAPES):
    """One shard of synthetic scenes: KEY.jpg, KEY.json (all captions), KEY.cls (shape of the first object)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "eval-000000.tar", "w") as tar:
        for i in range(n):
            scene = random_scene(random.Random(f"eval/{i}"))
            buf = io.BytesIO()
            render(scene, 32).save(buf, format="JPEG", quality=95)
            files = {"jpg": buf.getvalue(), "json": json.dumps({"captions": captions(scene)}).encode()}
            if labels:
                files["cls"] = str(SHAPES.index(scene["objects"][0]["shape"])).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if class_names is not None:
        (folder / "classnames.json").write_text(json.dumps(class_names))
    return folder


def test_multi_caption_recall_counts_an_image_hit_if_any_caption_ranks():
    image = torch.eye(3)  # (N=3, E=3)
    text = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])  # captions of images 0, 0, 1, 2
    owner = torch.tensor([0, 0, 1, 2])
    r = multi_caption_recall(image, text, owner, ks=(1, 2))
    # image 0: its 2nd caption scores 1, the others 0 (hit); image 1: its only caption (e2) scores 0 and
    # three others tie or beat it (miss); image 2: its caption (e1) scores 0, caption 2 scores 1 (miss)
    assert r["i2t_r@1"] == pytest.approx(1 / 3) and r["i2t_r@2"] == pytest.approx(1 / 3)
    # captions: 0 -> image 1 wins (miss at 1), 1 -> image 0 (hit), 2 -> image 2 not own (miss), 3 -> image 1
    assert r["t2i_r@1"] == pytest.approx(1 / 4)
    assert topk_accuracy(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]), ks=(1, 2)) == \
        {"top1": 0.5, "top2": 0.5}


def test_caption_scores_against_all_references():
    same = caption_scores(["a small red circle at the top"], [["a small red circle at the top", "a red circle"]])
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # disjoint words: no n-gram matches, BLEU-4 and CIDEr are zero
    none = caption_scores(["two green squares"], [["a red circle at the top left"]])
    assert none["bleu4"] < 1e-6 and none["cider"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 captions for 1 reference"):
        caption_scores(["a", "b"], [["a"]])


def test_eval_cli_writes_every_figure(trained_run, tmp_path):
    shards = write_eval_shard(tmp_path / "eval")
    out = tmp_path / "figures.json"
    assert main(["eval", "--model", str(trained_run / "model"), "--data", str(shards), "--tasks", "retrieval",
                 "zeroshot", "captioning", "linear_probe", "--max-new-tokens", "8", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["samples"] == 24 and figures["retrieval"]["captions"] > 24
    for key in ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10"):
        assert 0 <= figures["retrieval"][key] <= 1
    assert figures["retrieval"]["i2t_r@10"] >= figures["retrieval"]["i2t_r@1"]
    assert 0 <= figures["zeroshot"]["top1"] <= figures["zeroshot"]["top5"] == 1.0  # 3 classes: top-5 is certain
    assert set(figures["captioning"]["greedy"]) == {"bleu4", "cider"}
    assert figures["linear_probe"]["train"] == 12 and 0 <= figures["linear_probe"]["top1"] <= 1


def test_missing_labels_and_mismatched_class_names_are_clear_errors(trained_run, tmp_path, capsys):
    unlabelled = write_eval_shard(tmp_path / "nolabels", n=6, labels=False)
    out = tmp_path / "figures.json"
    assert main(["eval", "--model", str(trained_run / "model"), "--data", str(unlabelled), "--tasks", "zeroshot",
                 "--out", str(out)]) == 2
    assert "needs a .cls label per sample; 6 of 6" in capsys.readouterr().err
    labelled = write_eval_shard(tmp_path / "few", n=12, class_names=["circle", "square"])
    assert main(["eval", "--model", str(trained_run / "model"), "--data", str(labelled), "--tasks", "zeroshot",
                 "--out", str(out)]) == 2
    assert "2 class names, but the labels run from 0 to 2" in capsys.readouterr().err
    assert not out.exists()


def test_chain_export_then_finetune_from_it_then_eval(trained_run, synth_root, tmp_path, fresh_accelerate_state):
    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train

    exported = tmp_path / "hf"
    assert main(["export", str(trained_run / "checkpoints" / "step_6"), "--out", str(exported)]) == 0
    run_dir = tmp_path / "finetuned"
    summary = train(load_config("configs/finetune-retrieval-debug.yaml", [
        f"run.dir={run_dir}", f"train.init_from={exported}", f"data.tokenizer={exported}",
        f"data.train={synth_root}/train", f"data.val={synth_root}/val", "data.num_workers=0",
        "data.shuffle_buffer=64", "eval.max_samples=32", "eval.num_captions=0"]))
    assert summary["steps"] == 4
    shards = write_eval_shard(tmp_path / "eval", n=12)
    out = tmp_path / "figures.json"
    assert main(["eval", "--model", summary["export"], "--data", str(shards), "--tasks", "retrieval", "zeroshot",
                 "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["samples"] == 12 and "i2t_r@1" in figures["retrieval"] and "top1" in figures["zeroshot"]


def test_in_training_eval_reports_caption_figures_only_for_models_trained_to_caption():
    from tests.helpers import make_model, make_text
    from vlpretrain.eval.during_training import evaluate

    model = make_model()
    ids, mask = make_text(8, 6, lengths=[6, 5, 4, 6, 3, 6, 5, 4])
    batch = {"pixel_values": torch.randn(8, 3, 32, 32), "input_ids": ids, "attention_mask": mask}
    plain = evaluate(model, [batch], None, 0, 0, 4, "cpu", captioning=False)
    assert plain["samples"] == 8 and 0 <= plain["i2t_r@1"] <= 1
    assert not {"caption_loss", "caption_token_acc", "captions"} & set(plain)
    full = evaluate(model, [batch], None, 0, 0, 4, "cpu", captioning=True)
    assert full["caption_loss"] > 0 and 0 <= full["caption_token_acc"] <= 1
    assert full["i2t_r@1"] == plain["i2t_r@1"]
