"""The data workers cut an objective's views only from its start (vlpretrain/train/stream_views.py): the
trainer rebuilds its stream with the views at the start step, from the exact position it stood at."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tests.helpers import train_overrides
from vlpretrain.config import load_config
from vlpretrain.data.shards import RECORD_KEYS_ENV
from vlpretrain.train import loop
from vlpretrain.train.checkpoint import complete_checkpoints
from vlpretrain.train.stream_views import StreamViews

START = 3
OBJECTIVES = ("objectives=[{name: contrastive}, {name: self_distillation, start: %d, local_crops: 2, local_size: 16, "
              "prototypes: 64, head_hidden: 32, head_bottleneck: 16}]" % START)


def _run(synth_root, run_dir, monkeypatch) -> dict:
    """A 6-step in-process run with 2 workers (they prefetch ahead of the switch); per step whether its batch
    had views, the losses logged, the final weights and the sample keys delivered (RECORD_KEYS_ENV)."""
    had_views, to_device = [], loop._to_device

    def recording(batch, *args, **kwargs):
        had_views.append(sorted(batch.get("views") or {}))
        return to_device(batch, *args, **kwargs)

    AcceleratorState._reset_state(True)
    try:
        with monkeypatch.context() as m:
            m.setattr(loop, "_to_device", recording)
            loop.train(load_config(None, train_overrides(synth_root, run_dir, "data.num_workers=2", "data.val=null",
                                                         "train.export=false", OBJECTIVES)))
    finally:
        AcceleratorState._reset_state(True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = complete_checkpoints(run_dir)[-1][1]
    return {"views": had_views, "weights": load_file(ckpt / "model.safetensors"),
            "losses": [{k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")} for r in records],
            "keys": json.loads((ckpt / "data_state.json").read_text())["keys"]}


@pytest.mark.slow
def test_views_are_cut_from_the_start_step_and_the_run_equals_one_cutting_them_from_step_0(
        synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD_KEYS_ENV, "1")
    switched = _run(synth_root, tmp_path / "switched", monkeypatch)
    with monkeypatch.context() as m:  # what the trainer did before: the declared views from step 0 on
        m.setattr(StreamViews, "views_at", lambda self, step: dict(self.declared))
        from_0 = _run(synth_root, tmp_path / "from_0", monkeypatch)
    print(f"views per step, switched: {switched['views']}; from step 0: {from_0['views']}")
    assert switched["views"] == [[]] * START + [["local"]] * (6 - START)
    assert from_0["views"] == [["local"]] * 6
    keys = switched["keys"]["0"]
    assert len(keys) == len(set(keys)) == 6 * 16  # nothing repeated across the switch
    assert switched["keys"] == from_0["keys"]  # nor lost: the same samples, in the same order
    assert switched["losses"] == from_0["losses"] and "loss/self_distillation" in switched["losses"][-1]
    worst = max((switched["weights"][k] - from_0["weights"][k]).abs().max().item() for k in from_0["weights"])
    print(f"final weights, switched vs from step 0: max abs difference {worst}")
    assert switched["weights"].keys() == from_0["weights"].keys() and worst == 0.0


def test_a_stream_state_continues_only_in_its_own_layout(synth_root):
    from vlpretrain.data.shards import ShardStream

    cfg = load_config(None, train_overrides(synth_root, "unused", "data.num_workers=0")).data
    stream = ShardStream(cfg, "train", batch_size=8, image_size=32, context_length=16)
    it = iter(stream)
    next(it)
    again = ShardStream(cfg, "train", batch_size=8, image_size=32, context_length=16)
    again.load_state_dict(stream.state_dict())
    want, got = next(it), next(iter(again))  # the batch after the delivered one, either way
    assert got["keys"] == want["keys"] and torch.equal(got["pixel_values"], want["pixel_values"])
    other = ShardStream(cfg, "train", batch_size=4, image_size=32, context_length=16)
    with pytest.raises(ValueError, match="layout"):
        other.load_state_dict(stream.state_dict())
