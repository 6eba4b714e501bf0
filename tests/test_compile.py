"""``train.compile``: the objective set under torch.compile traces as one graph (no host sync splits it)
and gives the eager loss and gradients; the logit-scale clamp (after the optimiser step, outside any
graph) acts on the parameter the compiled module reads.
Dynamo and AOTAutograd are what is checked (the ``aot_eager`` backend: no code generation, seconds), but
for one test of inductor's code generation over two caption lengths (~50 s)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from objectives_support import grads_of, make_model, max_grad_diff, random_batch
from torch._dynamo.utils import counters

from vlpretrain.objectives import build_objective_set


CAPPA = {"name": "captioning", "parallel_prob": 0.5}  # a random half of the captions predicted in parallel


@pytest.mark.parametrize("entries", [[{"name": "contrastive"}, {"name": "captioning"}], [{"name": "contrastive"}, CAPPA]],
                         ids=["coca", "cappa"])
def test_compiled_objectives_are_one_graph_with_eager_losses_and_gradients(entries):
    torch._dynamo.reset()
    counters.clear()
    eager = build_objective_set(make_model(text_embed_depth=1), entries)
    twin = copy.deepcopy(eager)
    for module in (eager, twin):  # above the clamp: the hook after the optimiser step must clamp the parameter
        with torch.no_grad():
            module.objectives["contrastive"].logit_scale.fill_(math.log(500.0))
    compiled = torch.compile(twin, backend="aot_eager")
    batch = random_batch(batch=8)
    torch.manual_seed(1)  # CapPa's draw of parallel captions: the same in both runs (a mix of both kinds)
    want = eager(batch)
    torch.manual_seed(1)
    got = compiled(batch)
    want.loss.backward()
    got.loss.backward()
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    worst, where = max_grad_diff(grads_of(twin), grads_of(eager))
    assert worst < 1e-5, f"gradients differ by {worst} at {where}"
    for module in (eager, twin):
        module.objectives["contrastive"].after_optimizer_step()
        assert abs(float(module.objectives["contrastive"].logit_scale.detach()) - math.log(100.0)) < 1e-6
    torch.manual_seed(1)
    clamped = compiled(batch).loss  # reads the clamped value
    torch.manual_seed(1)
    assert torch.allclose(clamped, eager(batch).loss, rtol=1e-5, atol=1e-6) and not torch.allclose(clamped, got.loss)


@pytest.mark.parametrize("accumulate", [False, True])
def test_varied_text_lengths_share_one_graph_and_the_flop_counter_counts_inside_it(accumulate):
    # the trainer pads captions to each batch's longest, so the text length changes every batch; its
    # FlopCounter hooks every Linear/attention/MLP. Neither may cost a graph per length (after dynamo's
    # limit of 8 the rest would run eager) nor a graph break per hooked module.
    from vlpretrain.train.accumulate import accumulate_backward
    from vlpretrain.train.flops import FlopCounter
    from vlpretrain.train.loop import _to_device

    torch._dynamo.reset()
    counters.clear()
    objectives = build_objective_set(make_model(text_embed_depth=1), [{"name": "contrastive"}, {"name": "captioning"}])
    counter = FlopCounter(objectives)
    compiled = torch.compile(objectives, backend="aot_eager")

    def step(module, batch):
        if not accumulate:
            return module(_to_device(batch, "cpu", compiled=module is compiled)).loss.backward()
        halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
        accumulate_backward(module, [_to_device(h, "cpu", compiled=module is compiled) for h in halves])

    for length in (12, 11, 9, 8, 6, 10, 5, 7, 4):
        batch = random_batch(batch=4, length=length)
        step(objectives, batch)
        eager_flops = counter.take_flops()
        step(compiled, batch)
        assert counter.take_flops() == eager_flops > 0, length
    assert dict(counters["graph_break"]) == {}
    # one graph per call: accumulation's no-grad embedding pass, and its recompute with and without the
    # coupled objectives' parameter gradients (added on the last micro-batch only)
    assert counters["stats"]["unique_graphs"] == (3 if accumulate else 1)



def _mutated_inputs(fn, *args) -> dict[int, bool]:
    """``fn(*args)`` compiled: for each graph input the graph writes in place, whether AOTAutograd counts it
    among the static inputs (the indices inductor's CUDA graphs take as fixed addresses)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext

    torch._dynamo.reset()
    found: dict[int, bool] = {}

    def backend(gm, example_inputs):
        compiled = aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: make_boxed_func(g.forward))
        meta = TracingContext.try_get().fw_metadata
        found.update({i: i in meta.static_input_indices for i, info in enumerate(meta.input_info) if info.mutates_data})
        return compiled

    torch.compile(fn, backend=backend)(*args)
    return found


def test_a_compiled_step_writes_in_place_only_to_static_inputs():
    # CUDA graphs (train.compile_mode=reduce-overhead) replay a graph only if every input it changes in place
    # has a static address; otherwise inductor runs that graph without CUDA graphs, silently. The trainer's
    # graph writes in place to the FLOP counter's in-graph total only (the logit scale is clamped after the
    # optimiser step, outside the graph).
    from vlpretrain.train.flops import FlopCounter
    from vlpretrain.train.loop import _to_device

    def add_to(total, x):
        total.add_(x.sum())

    assert _mutated_inputs(add_to, torch.zeros(()), torch.ones(3)) == {0: False}  # the check sees a non-static one
    objectives = build_objective_set(make_model(text_embed_depth=1), [{"name": "contrastive"}, {"name": "captioning"}])
    counter = FlopCounter(objectives)
    mutated = _mutated_inputs(objectives, _to_device(random_batch(batch=4, length=9), "cpu", compiled=True))
    assert len(mutated) == 1 and all(mutated.values()), mutated  # the FLOP total
    assert counter.take_flops() > 0


def test_inductor_compiled_steps_over_caption_lengths_equal_eager():
    # inductor's real code generation (~50 s; the other tests here use aot_eager) on ITM alone, over two
    # caption lengths. Two failures it caught (torch 2.14): (1) one objective of weight 1: the total is its
    # loss, which the output also holds detached; inductor returned one tensor for both, marked
    # non-differentiable ("does not require grad" at the first backward). (2) the fused mask, saved for the
    # backward in a layout differing from eager's in a size-1 dim, was pinned to the first length's strides
    # ("expected ... stride" at the second length). fallback_random: the negatives drawn as in eager.
    from vlpretrain.train.loop import _to_device

    torch._dynamo.reset()
    eager = build_objective_set(make_model(depth=1, text_embed_depth=0), [{"name": "matching"}])
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    with torch._inductor.config.patch(fallback_random=True):
        for length in (9, 7):
            batch = random_batch(batch=4, length=length)
            torch.manual_seed(length)
            want = eager(batch)
            torch.manual_seed(length)
            got = compiled(_to_device(batch, "cpu", compiled=True))
            assert got.loss.requires_grad and got.loss is not got.losses["matching"]
            got.loss.backward()
            want.loss.backward()
            assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6), (length, got.loss, want.loss)
            worst, where = max_grad_diff(grads_of(twin), grads_of(eager))
            assert worst < 1e-4, f"length {length}: gradients differ by {worst} at {where}"


@pytest.mark.parametrize("masked", ["masked_text", "masked_image"])
def test_masking_objectives_compile_with_a_dynamic_caption_length(masked):
    # the trainer marks the caption length dynamic; a random draw sized by it must trace (passing
    # generator=None picked the overload that rejects symbolic sizes: masked_text failed to compile)
    from vlpretrain.train.loop import _to_device

    torch._dynamo.reset()
    eager = build_objective_set(make_model(depth=1), [{"name": "contrastive"}, {"name": masked}])
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    for length in (9, 7):
        batch = random_batch(batch=4, length=length)
        torch.manual_seed(length)
        want = eager(batch).loss
        torch.manual_seed(length)
        got = compiled(_to_device(batch, "cpu", compiled=True)).loss
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (length, got, want)


def test_gradient_checkpointing_compiles_with_eager_losses_and_gradients():
    # torch.compile takes no context_fn but TorchDispatchModes: the emulation's checkpoint context stays eager
    torch._dynamo.reset()
    model = make_model(depth=2, text_embed_depth=1)
    model.set_grad_checkpointing(True)
    eager = build_objective_set(model, [{"name": "contrastive"}, {"name": "captioning"}])
    twin = copy.deepcopy(eager)
    batch = random_batch(batch=4, length=8)
    got, want = torch.compile(twin, backend="aot_eager")(batch), eager(batch)
    got.loss.backward()
    want.loss.backward()
    assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    worst, where = max_grad_diff(grads_of(twin), grads_of(eager))
    assert worst < 1e-5, f"gradients differ by {worst} at {where}"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("version, mix_order", [("2.11.0+cu130", False), ("2.14.1", None)])
def test_compile_options_are_the_modes_own_with_mix_order_reduction_off_before_torch_2_14(
        monkeypatch, mode, version, mix_order):
    # torch 2.11's inductor mis-sliced mix-order reduction's workspace under a dynamic caption length (the
    # first compiled backward failed on an H200); the trainer turns that fusion off there and nowhere else
    from torch._inductor import list_mode_options
    from torch.torch_version import TorchVersion

    from vlpretrain.train.loop import compile_options

    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    options = compile_options(mode)
    assert options.get("triton.mix_order_reduction") is mix_order
    assert {k: v for k, v in options.items() if k != "triton.mix_order_reduction"} == list_mode_options(mode)
    torch.compile(torch.nn.Linear(2, 2), options=options)  # every option is one this torch knows
