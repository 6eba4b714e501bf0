"""Objectives that start mid-run: weights over steps, nothing run or optimised before the start, and
exact resumption from state saved before and after a start (in-process: ObjectiveSet, AdamW, LambdaLR)."""

from __future__ import annotations

import copy

import pytest
import torch
from objectives_support import make_model, shapes_batch

from vlpretrain.config import ConfigError, OptimConfig, TeacherConfig
from vlpretrain.objectives import build_objective_set, parse_objective_entry
from vlpretrain.objectives.schedule import Schedule, check_starts, resolve_start
from vlpretrain.train.flops import FlopCounter
from vlpretrain.train.optim import add_started_groups, build_optimizer, build_scheduler

SMALL_MP = {"name": "masked_prediction", "head_hidden": 32}


def test_start_resolves_steps_and_fractions_and_ramps_the_weight():
    assert resolve_start(0, None) == 0 and resolve_start(7, None) == 7
    assert resolve_start(0.8, 10) == 8 and resolve_start(0.29, 100) == 29 and resolve_start(0.5, 7) == 3
    with pytest.raises(ValueError, match="total_steps"):
        resolve_start(0.5, None)
    sched = Schedule(start=4, ramp=4, weight=2.0)
    assert [sched.weight_at(s) for s in range(3, 10)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [Schedule(2, 0, 0.25).weight_at(s) for s in (1, 2, 9)] == [0.0, 0.25, 0.25]


@pytest.mark.parametrize("keys, match", [({"start": -1}, "start"), ({"start": 2.5}, "start"),
                                         ({"ramp": -3}, "ramp"), ({"start": float("nan")}, "start")])
def test_bad_start_or_ramp_is_a_config_error(keys, match):
    with pytest.raises(ConfigError, match=match):
        parse_objective_entry({"name": "contrastive", **keys})


def test_start_at_or_beyond_train_steps_is_an_error_before_training():
    check_starts([{"name": "contrastive"}, {"name": "captioning", "start": 0.99}, {"name": "x", "start": 9}], 10)
    for start in (10, 12):
        with pytest.raises(ConfigError, match=r"objectives\[1\] \(captioning\)\.start: step .* train\.steps=10"):
            check_starts([{"name": "contrastive"}, {"name": "captioning", "start": start}], 10)


def _flops_and_out(objectives, step):
    objectives.set_step(step)
    counter = FlopCounter(objectives)
    torch.manual_seed(0)
    out = objectives(shapes_batch(seed=0))
    counter.remove()
    return counter.forward_flops, out


def test_before_its_start_an_objective_runs_nothing_and_the_shared_forward_skips_its_needs():
    entries = [{"name": "contrastive"}, {"name": "captioning", "start": 3, "ramp": 2}]
    delayed = build_objective_set(make_model(text_embed_depth=1), entries, total_steps=10)
    alone = build_objective_set(make_model(text_embed_depth=1), entries[:1], total_steps=10)
    assert delayed.needs == {"image_pooled", "text_pooled"}  # captioning's "caption" forward is not planned
    before, out = _flops_and_out(delayed, 2)
    assert list(out.losses) == ["contrastive"] and before == _flops_and_out(alone, 2)[0] > 0
    after, out = _flops_and_out(delayed, 3)
    assert "caption" in delayed.needs and set(out.losses) == {"contrastive", "captioning"} and after > before
    assert float(delayed.objectives["captioning"].weight) == 0.5  # first ramp step: weight / ramp
    delayed.set_step(4)
    assert float(delayed.objectives["captioning"].weight) == 1.0


def _build(seed_for_init: int, steps: int = 6):
    torch.manual_seed(seed_for_init)
    entries = [{"name": "contrastive"}, {**SMALL_MP, "start": 3, "ramp": 2}]
    objectives = build_objective_set(make_model(), entries, total_steps=steps, teacher=TeacherConfig(momentum=0.9))
    return objectives


def _run(objectives, optimizer, scheduler, cfg, first: int, last: int, seen: list | None = None):
    for step in range(first, last):
        objectives.set_step(step)
        add_started_groups(optimizer, scheduler, objectives.parts_starting_at(step), cfg)
        if seen is not None:
            seen.append({id(p) for g in optimizer.param_groups for p in g["params"]})
        loss = objectives(shapes_batch(seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        objectives.after_optimizer_step()


def _fresh(cfg, steps, start_step, state=None):
    objectives = _build(seed_for_init=123)  # other initial weights: the loaded state must replace them all
    objectives.set_step(start_step)
    optimizer = build_optimizer(objectives, cfg, torch.device("cpu"), start_step=start_step)
    scheduler = build_scheduler(optimizer, cfg, steps)
    if state is not None:
        objectives.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    return objectives, optimizer, scheduler


def test_parameters_join_the_optimiser_at_the_start_and_resume_is_exact_before_and_after_it():
    cfg, steps = OptimConfig(lr=1e-3, warmup_steps=1), 6
    torch.manual_seed(0)
    objectives = _build(seed_for_init=0)
    optimizer = build_optimizer(objectives, cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg, steps)
    mp_params = {id(p) for p in objectives.objectives["masked_prediction"].parameters()}
    snapshots, seen = {}, []
    torch.manual_seed(0)
    for step in range(steps):
        if step in (2, 4):  # what a checkpoint holds when step `step` is about to run
            snapshots[step] = copy.deepcopy({"model": objectives.state_dict(), "optimizer": optimizer.state_dict(),
                                             "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()})
        _run(objectives, optimizer, scheduler, cfg, step, step + 1, seen)
    assert all(not (mp_params & ids) for ids in seen[:3]) and all(mp_params <= ids for ids in seen[3:])
    assert not any(k.startswith("teacher.") and "mask_token" in k for k in objectives.state_dict())
    unbroken = objectives.state_dict()
    assert any(k.startswith("teacher.backbone.") for k in unbroken)  # the teacher is checkpointed state
    for resumed_at, state in snapshots.items():
        again, opt, sched = _fresh(cfg, steps, resumed_at, state)
        _run(again, opt, sched, cfg, resumed_at, steps)
        assert len(opt.param_groups) == len(optimizer.param_groups)
        for key, value in again.state_dict().items():
            assert torch.equal(value, unbroken[key]), f"resumed at step {resumed_at}: {key} differs"


DELAYED = ("objectives=[{name: contrastive}, {name: masked_prediction, start: 0.5, ramp: 2, head_hidden: 32}, "
           "{name: self_distillation, start: 4, prototypes: 32, head_hidden: 32, head_bottleneck: 16, "
           "local_size: 16, local_crops: 2}]")


def test_trainer_starts_objectives_mid_run_and_resumes_exactly_across_the_starts(synth_root, tmp_path,
                                                                                 fresh_accelerate_state):
    import json

    from safetensors.torch import load_file

    from tests.helpers import train_overrides
    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train

    def run(run_dir, *extra):
        return train(load_config(None, train_overrides(synth_root, run_dir, DELAYED, "train.export=false",
                                                       "data.val=null", *extra)))

    with pytest.raises(ConfigError, match=r"start: step 6 is at or beyond train.steps=6"):
        run(tmp_path / "bad", DELAYED.replace("start: 4", "start: 6"))
    assert not (tmp_path / "bad").exists()
    unbroken = tmp_path / "unbroken"
    run(unbroken, "train.ckpt_every=2")
    records = [json.loads(line) for line in (unbroken / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: {k for k in r if k.startswith("loss/")} for r in records if "loss" in r}
    # step s runs with state.step = s - 1: masked_prediction from state 3 (0.5 x 6), self_distillation from 4
    assert losses[3] == {"loss/contrastive"} and losses[4] == {"loss/contrastive", "loss/masked_prediction"}
    assert losses[5] == losses[6] == {"loss/contrastive", "loss/masked_prediction", "loss/self_distillation"}
    resumed = tmp_path / "resumed"  # from the checkpoint before both starts
    run(resumed, f"train.resume={unbroken}/checkpoints/step_2", "train.ckpt_every=2")
    want, got = (load_file(d / "checkpoints" / "step_6" / "model.safetensors") for d in (unbroken, resumed))
    assert want.keys() == got.keys() and any(k.startswith("teacher.") for k in want)
    worst = max(float((want[k].double() - got[k].double()).abs().max()) for k in want)
    print(f"resumed from step 2 vs unbroken at step 6: max abs difference {worst}")
    assert worst == 0.0
