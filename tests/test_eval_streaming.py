"""``vlpretrain eval`` streams: the figures do not depend on the batch size, at most two batches of
images are alive at a time, and --device / --precision / --batch-size reach the run."""

from __future__ import annotations

import json
import weakref

import pytest
from test_eval import write_eval_shard

from vlpretrain.cli import main
from vlpretrain.eval.samples import iter_samples
from vlpretrain.eval.suite import EvalSettings, _stream
from vlpretrain.export.source import load_source


def test_one_batch_of_images_is_alive_at_a_time(trained_run, tmp_path):
    data = str(write_eval_shard(tmp_path / "eval", n=20))
    loaded = load_source(trained_run / "model")
    refs: list[weakref.ref] = []
    most = 0

    def watched():
        nonlocal most
        for sample in iter_samples(data, loaded.processor):
            most = max(most, sum(r() is not None for r in refs))  # earlier samples still referenced somewhere
            refs.append(weakref.ref(sample))
            yield sample

    kept = _stream(loaded.model.eval(), loaded.processor, watched(), ("retrieval",), EvalSettings(batch_size=3))
    assert sum(len(e) for e in kept.image_emb) == 20 and len(kept.captions) == 20
    assert most < 2 * 3, most  # the batch just run and the one being filled: bounded, whatever the count


def test_figures_do_not_depend_on_the_batch_size_and_flags_reach_the_run(trained_run, tmp_path, capsys):
    data = str(write_eval_shard(tmp_path / "eval", n=20))
    figures = {}
    for flags in (["--batch-size", "64"], ["--batch-size", "3", "--device", "cpu"], ["--precision", "bf16"]):
        assert main(["eval", "--model", str(trained_run / "model"), "--data", data, "--tasks", "retrieval",
                     "zeroshot", *flags]) == 0
        figures[" ".join(flags)] = json.loads(capsys.readouterr().out)
    fp32, batched3, bf16 = figures.values()
    assert fp32["samples"] == batched3["samples"] == bf16["samples"] == 20
    for task in ("retrieval", "zeroshot"):
        for key, value in fp32[task].items():
            if isinstance(value, float):
                assert batched3[task][key] == pytest.approx(value, abs=1e-6), key
                assert 0 <= bf16[task][key] <= 1
    assert main(["eval", "--model", str(trained_run / "model"), "--data", data, "--batch-size", "0"]) == 2
    assert "--batch-size 0 must be >= 1" in capsys.readouterr().err


def test_recall_in_blocks_of_rows_equals_the_whole_matrix():
    import torch

    from vlpretrain.eval.metrics import multi_caption_recall

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    owner = torch.randint(0, 37, (90,), generator=g)
    owner[:37] = torch.arange(37)  # every image has a caption
    text = torch.nn.functional.normalize(image[owner] + 0.8 * torch.randn(90, 8, generator=g), dim=-1)
    text[40] = text[3]  # a tie
    whole = multi_caption_recall(image, text, owner)
    assert 0 < whole["i2t_r@1"] < 1 and 0 < whole["t2i_r@5"] < 1
    assert multi_caption_recall(image, text, owner, chunk_elements=90 * 5) == whole  # 5 rows a block
    assert multi_caption_recall(image, text, owner, chunk_elements=1) == whole  # one row a block
