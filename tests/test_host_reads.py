"""A training step never reads a device value on the host (on a GPU each read idles the device).

Every op that hands a tensor's value to Python or sizes its output by the data (``.item()``, ``bool``,
``nonzero``, boolean indexing, ...) is seen by a dispatch mode. The CPU runs the same code as a GPU,
so a read counted here is a sync there. Non-finite steps are skipped on the device (fused AdamW's
``found_inf``) and the trainer's per-step flags are read one step late (:mod:`vlpretrain.train.host_reads`).
"""

from __future__ import annotations

import collections
import copy
import os
import traceback
from pathlib import Path

import pytest
import torch
from objectives_support import make_model, random_batch
from torch.utils._python_dispatch import TorchDispatchMode

import vlpretrain
from vlpretrain.objectives import build_objective_set
from vlpretrain.train.accumulate import accumulate_backward
from vlpretrain.train.host_reads import LaggedReadback, step_unless
from vlpretrain.train.window import WindowMeans, step_values

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
         "aten.is_nonzero.default", "aten.equal.default", "aten._unique2.default", "aten.unique_consecutive.default",
         "aten.repeat_interleave.Tensor", "aten.item.default", "aten.allclose.default"}
# the package's own folder: a checkout is itself often named vlpretrain/, and this file lives inside it
PACKAGE = os.path.dirname(os.path.realpath(vlpretrain.__file__)) + os.sep


def package_line(filename: str, lineno: int) -> str | None:
    """``objectives/x.py:12`` for a line of the vlpretrain package, None for any other file."""
    path = os.path.realpath(filename)
    return f"{path[len(PACKAGE):]}:{lineno}" if path.startswith(PACKAGE) else None


class HostReads(TorchDispatchMode):
    """Counts the ops that read tensor values on the host, by op and by the vlpretrain line that ran them."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
            for a in args)
        if name in READS or bool_index:
            ours = [line for f in traceback.extract_stack() if (line := package_line(f.filename, f.lineno))]
            where = ours[-1] if ours else "outside vlpretrain"
            self.seen[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.tensor([1.0, -1.0])
    with HostReads() as reads:
        t.sum().item()
        bool(t.sum() > 0)
        float(t[0])
        t[t > 0]
        t.nonzero()
    assert sum(reads.seen.values()) == 5, reads.seen


def _train_step(objectives, batch, accum: int = 1):
    optimizer = torch.optim.AdamW(objectives.parameters(), lr=1e-3, fused=True)
    if accum == 1:
        out = objectives(batch)
        out.loss.backward()
    else:
        size = len(batch["input_ids"]) // accum
        micro = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(accum)]
        out = accumulate_backward(objectives, micro)
    grad_norm = torch.nn.utils.clip_grad_norm_(objectives.parameters(), float("inf"))
    bad = (~torch.isfinite(out.loss.detach()) | ~torch.isfinite(grad_norm)).reshape(1)
    step_unless(optimizer, bad)
    WindowMeans().add(step_values(out), bad)  # the trainer's log-window sums: on the device too
    optimizer.zero_grad(set_to_none=True)


STEPS = {
    "contrastive+captioning": ([{"name": "contrastive"}, {"name": "captioning"}], {}, 1),
    "siglip chunked": ([{"name": "contrastive", "loss": "siglip", "chunk_size": 2}], {}, 1),
    "captioning per caption": ([{"name": "captioning", "per_caption": True}], {}, 1),
    "CapPa (parallel captions)": ([{"name": "captioning", "parallel_prob": 0.5}], {}, 1),
    "patch dropout": ([{"name": "contrastive"}, {"name": "captioning"}], {"patch_dropout": 0.5}, 1),
    "modality experts": ([{"name": "contrastive"}, {"name": "captioning"}], {"modality_experts": True}, 1),
    "matching": ([{"name": "contrastive"}, {"name": "matching"}], {}, 1),
    "masked_image": ([{"name": "masked_image"}], {}, 1),
    "accumulated (GradCache)": ([{"name": "contrastive"}, {"name": "captioning"}], {}, 2),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_a_training_step_reads_nothing_on_the_host(name):
    entries, model_options, accum = STEPS[name]
    objectives = build_objective_set(make_model(text_embed_depth=1, **model_options), entries)
    objectives.model.set_grad_checkpointing(name == "modality experts")  # checkpointing's recompute too
    batch = random_batch(batch=8)  # captions of several lengths: padded rows
    _train_step(objectives, batch, accum)  # the first step creates the optimiser state
    with HostReads() as reads:
        _train_step(objectives, batch, accum)
    assert not reads.seen, f"host reads in a {name} step: {dict(reads.seen)}"


def test_masked_text_reads_once_to_size_its_head_to_the_masked_tokens():
    # a deliberate read: the vocabulary head runs on the masked tokens only (a mask_ratio share of the
    # text), whose number is drawn per batch; the head on every token would cost 1/mask_ratio its FLOPs
    objectives = build_objective_set(make_model(text_embed_depth=1), [{"name": "masked_text"}])
    _train_step(objectives, random_batch(batch=8))
    with HostReads() as reads:
        _train_step(objectives, random_batch(batch=8))
    source = (Path(vlpretrain.__file__).parent / "objectives" / "masked_text.py").read_text().splitlines()
    selecting = {f"objectives/masked_text.py:{n}" for n, line in enumerate(source, 1) if "[selected]" in line}
    assert len(selecting) == 2  # the head's input and its targets
    assert reads.seen and {where for _, where in reads.seen} <= selecting | {"outside vlpretrain"}, dict(reads.seen)


def _adamw_states(optimizer):
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups for p in g["params"]]


def _adamw(model, fused: bool):
    return torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused or None,
                             foreach=None if fused else True)


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_is_skipped_and_a_finite_one_taken(fused):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = _adamw(model, fused), _adamw(twin, fused)

    def backward(m, scale=1.0):
        (m(x).square().mean() * scale).backward()

    for m, opt in ((model, optimizer), (twin, twin_optimizer)):  # one real step: the state exists
        backward(m)
        opt.step()
        opt.zero_grad()
    weights, states = [p.clone() for p in model.parameters()], _adamw_states(optimizer)
    backward(model, float("nan"))
    with HostReads() as reads:
        step_unless(optimizer, torch.tensor([True]))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    for got, want in zip(_adamw_states(optimizer), states):  # moments and step count too
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert bool(reads.seen) != fused  # fused decides on the device; foreach reads the flag on the host
    assert not hasattr(optimizer, "found_inf")
    optimizer.zero_grad()
    backward(model)
    step_unless(optimizer, torch.tensor([False]))
    backward(twin)
    twin_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_lagged_readback_hands_over_each_step_once_in_order():
    readback = LaggedReadback()
    assert readback.take() == [] and readback.take(flush=True) == []
    readback.push(torch.tensor([0.0, 1.0]))
    assert readback.take() == []  # the latest waits for the next step
    readback.push(torch.tensor([2.0, 3.0]))
    readback.push(torch.tensor([4.0, 5.0]))
    assert [t.tolist() for t in readback.take()] == [[0.0, 1.0], [2.0, 3.0]]
    assert [t.tolist() for t in readback.take(flush=True)] == [[4.0, 5.0]]
    assert readback.take(flush=True) == []
