"""Evaluation across ranks equals the single-process evaluation; DDP searches for unused parameters only
when the objective set leaves some unused, and names them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import make_model, train_overrides
from tests.test_train_processes import ENV, finish, write_config
from vlpretrain.eval.during_training import evaluate_val_shards, rank_shards
from vlpretrain.objectives import build_objective_set
from vlpretrain.train.unused import decide_ddp, unused_parameters


def test_every_shard_goes_to_one_rank_and_ranks_beyond_the_shards_get_none():
    urls = ["a", "b", "c"]
    plans = [rank_shards(urls, r, 2) for r in range(2)]
    assert plans == [[(0, "a"), (2, "c")], [(1, "b")]]
    assert [rank_shards(urls[:1], r, 3) for r in range(3)] == [[(0, "a")], [], []]


@pytest.fixture(scope="module")
def three_val_shards(tmp_path_factory):
    """50 validation samples in shards of 20, 20 and 10: two ranks get unequal shares."""
    from vlpretrain.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("val3")
    synthesize(out, num_samples=1, image_size=32, seed=1, samples_per_shard=20, num_val=50)
    assert len(list((out / "val").glob("*.tar"))) == 3
    return out / "val"


def _eval_one_process(checkpoint, val, max_samples: int = 45, **kwargs) -> dict:
    from vlpretrain.export.source import load_source

    loaded = load_source(str(checkpoint))
    return evaluate_val_shards(loaded.model, loaded.processor, str(val), max_samples=max_samples, num_captions=2,
                               max_new_tokens=8, device="cpu", captioning=True, **kwargs)


def test_validation_workers_change_no_figure(trained_run, three_val_shards):
    # two workers interleave batches of 8 from shards 0 and 1 and each stops at 16 samples: the figures
    # still come from the first 15 samples in shard order
    ckpt = trained_run / "checkpoints" / "step_6"
    alone = _eval_one_process(ckpt, three_val_shards, 15, batch_size=8)
    split = _eval_one_process(ckpt, three_val_shards, 15, batch_size=8, num_workers=2)
    assert alone["samples"] == 15 and alone == split
    assert _eval_one_process(ckpt, three_val_shards, 20, batch_size=8)["caption_loss"] != alone["caption_loss"]


def test_an_objective_set_leaving_parameters_unused_names_them_and_ddp_searches(fresh_accelerate_state, capsys):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    captioning_only = build_objective_set(make_model(), [{"name": "captioning"}])
    rng = torch.get_rng_state()
    assert decide_ddp(accelerator, captioning_only) == ["model.image_proj.weight", "model.text_proj.weight"]
    assert accelerator.ddp_handler.find_unused_parameters is True
    assert "model.image_proj.weight, model.text_proj.weight" in capsys.readouterr().out
    assert torch.equal(rng, torch.get_rng_state())  # the probe drew from a forked stream
    assert all(p.grad is None for p in captioning_only.parameters())
    full = build_objective_set(make_model(), [{"name": "contrastive"}, {"name": "captioning"}])
    assert unused_parameters(full, "cpu") == []
    # an objective that starts later trains its own parameters from then on: the note says so
    later = build_objective_set(make_model(), [{"name": "contrastive"}, {"name": "masked_image", "start": 5}], 10)
    assert any(n.startswith("objectives.masked_image.") for n in decide_ddp(accelerator, later))  # its decoder
    assert "Objectives starting later (masked_image)" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_ddp_eval_equals_one_process_eval_and_ddp_skips_the_unused_search(
        synth_root, three_val_shards, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "ddp.yaml", train_overrides(
        synth_root, run_dir, f"data.val={three_val_shards}", "eval.max_samples=45", "train.steps=12", "optim.lr=3e-3",
        "train.export=false"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "vlpretrain.train", "--config", str(config)]
    finish(subprocess.Popen(launch, env={**ENV, "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ddp"] == {"find_unused_parameters": False, "unused_parameters": []}
    alone = _eval_one_process(summary["checkpoint"], three_val_shards)
    print(f"two ranks: {summary['eval']}\none process: {alone}")
    assert alone["samples"] == summary["eval"]["samples"] == 45
    assert summary["eval"] == alone  # R@k, caption loss and accuracy, sample captions: all exact
