"""Shared fixtures: a synthetic dataset made once per session, a fresh Accelerate state per run."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`), every `slow` test runs on one worker, one at a time:
    they start `accelerate launch`/torchrun process pairs on accelerate's fixed rendezvous port 29500 and
    take both cores, so two at once would collide or thrash. A plain `python -m pytest` is unaffected."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("processes"))


@pytest.fixture(autouse=True)
def _one_thread_beside_the_processes(request):
    """Under xdist, in-process tests take one core, leaving the other to the worker running the `slow` group."""
    import os

    import torch

    if "PYTEST_XDIST_WORKER" not in os.environ or request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset (32 px, 8 train shards, val, tokenizer), generated once per session."""
    from vlpretrain.config import DataConfig
    from vlpretrain.data.bootstrap import ensure_synthetic

    root = tmp_path_factory.mktemp("synth") / "synth"
    cfg = DataConfig(train=str(root / "train"), val=str(root / "val"), tokenizer=str(root / "tokenizer"),
                     synthesize=512)
    ensure_synthetic(cfg, image_size=32, seed=0)
    return root


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run gets its own Accelerate state (it is a process-wide singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def trained_run(synth_root, tmp_path_factory):
    """One short debug training run (the preset's pre-norm makes it CLIP-expressible) shared by the eval, export and
    fine-tuning tests: ``run/checkpoints/step_6`` and ``run/model``."""
    from accelerate.state import AcceleratorState

    from tests.helpers import train_overrides
    from vlpretrain.config import load_config
    from vlpretrain.train.loop import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    AcceleratorState._reset_state(True)
    try:
        train(load_config(None, train_overrides(synth_root, run_dir, "train.steps=6",
                                                "train.ckpt_every=6")))
    finally:
        AcceleratorState._reset_state(True)
    return run_dir
