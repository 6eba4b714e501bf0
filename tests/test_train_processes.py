"""The trainer as users run it, in real processes: kill -9 and resume, SIGTERM, two-process DDP."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import train_overrides
from vlpretrain.config import load_config, to_yaml
from vlpretrain.train.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HOME": tempfile.mkdtemp(prefix="hf-home-")}  # no user accelerate config: `vlpretrain train` runs in-process


def write_config(path: Path, overrides: list[str], base: Path | None = None) -> Path:
    path.write_text(to_yaml(load_config(base, overrides)))
    return path


def start(config: Path, *args: str, command: tuple[str, ...] = ("vlpretrain.train",)) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *command, "--config", str(config), *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(run_dir), default=0) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(complete_checkpoints(run_dir)[-1][1] / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["cpu", "device"])  # device: JPEGs decoded by the trainer, crops drawn in the workers
def test_kill_9_then_resume_auto_reproduces_the_unbroken_run(synth_root, tmp_path, decode):
    # workers, shuffling and a randomly masking objective, so data position and RNG must all resume
    common = ["train.steps=10", "train.ckpt_every=3", "data.num_workers=2", "data.val=null", "train.export=false",
              f"data.decode={decode}",
              "objectives=[{name: contrastive}, {name: captioning}, {name: masked_text, mask_ratio: 0.3}]"]
    unbroken_dir, broken_dir = tmp_path / "unbroken", tmp_path / "broken"
    unbroken = start(write_config(tmp_path / "a.yaml", train_overrides(synth_root, unbroken_dir, *common)))
    broken_cfg = write_config(tmp_path / "b.yaml", train_overrides(synth_root, broken_dir, *common))
    proc = start(broken_cfg)
    kill_at = random.Random().randint(4, 8)
    wait_for_step(proc, broken_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finish(unbroken)
    finish(start(broken_cfg, "--resume", "auto"))
    a, b = final_weights(unbroken_dir), final_weights(broken_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"killed at step {kill_at}; resumed vs unbroken final weights: max abs difference {worst}")
    assert worst <= 1e-6, f"resumed run differs by {worst}"
    assert logged_steps(broken_dir) == list(range(1, 11))  # steps redone after the kill are logged once


@pytest.mark.slow
def test_kill_9_after_the_teacher_started_resumes_bit_exact_with_the_teacher(synth_root, tmp_path):
    # the siglip2 debug recipe with its delayed objectives starting at step 4 of 12: the step-6 checkpoint holds
    # the EMA teacher (initialised at 4, updated since), the self-distillation centre and the new objectives'
    # optimiser groups; killed after step 7, the run resumes from it to the unbroken run's weights
    start_step, kill_at = 4, 7
    common = [o for o in train_overrides(synth_root, tmp_path, "train.steps=12", "train.ckpt_every=3",
                                         "data.num_workers=2", "data.val=null", "train.export=false")
              if not o.startswith(("objectives=", "run.dir="))]
    common += [f"objectives.2.start={start_step}", f"objectives.3.start={start_step}"]  # self_distillation, masked_prediction
    recipe = ROOT / "configs" / "siglip2-base-debug.yaml"
    unbroken_dir, broken_dir = tmp_path / "unbroken", tmp_path / "broken"
    unbroken = start(write_config(tmp_path / "a.yaml", [f"run.dir={unbroken_dir}", *common], recipe))
    broken_cfg = write_config(tmp_path / "b.yaml", [f"run.dir={broken_dir}", *common], recipe)
    proc = start(broken_cfg)
    wait_for_step(proc, broken_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = complete_checkpoints(broken_dir)[-1][0]
    assert start_step < resumed_from < 12  # the teacher is in the checkpoint the run resumes from
    finish(unbroken)
    finish(start(broken_cfg, "--resume", "auto"))
    a, b = final_weights(unbroken_dir), final_weights(broken_dir)
    assert a.keys() == b.keys()
    teacher = [k for k in a if k.startswith("teacher.")]
    assert teacher and "objectives.self_distillation.center" in a
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    worst = max(diffs.values())
    print(f"resumed from step {resumed_from}; final weights ({len(a)} tensors, {len(teacher)} teacher): max abs "
          f"difference {worst}, teacher {max(diffs[k] for k in teacher)}, "
          f"centre {diffs['objectives.self_distillation.center']}")
    assert worst == 0.0, f"resumed run differs: {sorted(k for k, d in diffs.items() if d)[:5]}"
    # the teacher moved after its start (a teacher equal to the student would prove nothing about its restore)
    assert max((a[k] - a["model." + k.removeprefix("teacher.")]).abs().max().item()
               for k in teacher if k.startswith("teacher.backbone.")) > 0

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")}
                for r in records if "loss" in r}

    assert losses(broken_dir) == losses(unbroken_dir)
    assert "loss/self_distillation" in losses(unbroken_dir)[12]


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_and_resume_ignores_half_written_checkpoints(synth_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", train_overrides(
        synth_root, run_dir, "train.steps=500", "train.ckpt_every=0", "data.num_workers=2", "train.export=false"))
    proc = start(cfg, command=("vlpretrain", "train"))  # the user's command: the signal reaches the loop
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, timeout=60)
    assert "stopped by SIGTERM" in out
    (step, ckpt), = complete_checkpoints(run_dir)
    assert 3 <= step < 500 and (ckpt / "model.safetensors").is_file()
    # what a save killed half-way leaves behind: a temporary folder, or a folder without its state file
    half = run_dir / "checkpoints" / f".step_{step + 50}.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"truncated")
    (run_dir / "checkpoints" / f"step_{step + 60}").mkdir()
    finish(start(cfg, "--resume", "auto", f"train.steps={step + 2}"))
    assert logged_steps(run_dir)[-2:] == [step + 1, step + 2]
    assert [s for s, _ in complete_checkpoints(run_dir)][-1] == step + 2


def make_interleaved_shards(root: Path, per_rank: int, steps: int) -> tuple[Path, Path]:
    """The same samples as one shard (read by one process) and as two shards whose batches
    interleave it (read by two ranks): each global batch holds the same samples either way."""
    import random as rnd

    from vlpretrain.data.synthetic import captions, random_scene, render
    from vlpretrain.data.writer import ShardWriter, encode_jpeg

    n = 2 * per_rank * steps
    samples = []
    for i in range(n):
        scene = random_scene(rnd.Random(f"ddp/{i}"))
        samples.append((f"s{i:05d}", encode_jpeg(render(scene, 32)), captions(scene)[:1]))
    one, two = root / "one", root / "two"
    with ShardWriter(one, samples_per_shard=n) as w:
        for key, jpeg, caps in samples:
            w.write(key, jpeg, caps, {})
    halves = [[s for i, s in enumerate(samples) if (i // per_rank) % 2 == r] for r in (0, 1)]
    with ShardWriter(two, samples_per_shard=n // 2) as w:
        for half in halves:
            for key, jpeg, caps in half:
                w.write(key, jpeg, caps, {})
    return one, two


@pytest.mark.slow
def test_two_process_accelerate_launch_equals_one_process_with_the_doubled_batch(synth_root, tmp_path):
    per_rank, steps = 8, 5
    one, two = make_interleaved_shards(tmp_path / "shards", per_rank, steps)
    common = [f"train.steps={steps}", f"train.batch_size={2 * per_rank}", "data.shuffle_buffer=0",
              "data.val=null", "train.export=false", "optim.warmup_steps=0", "optim.lr=2e-3",
              "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.0,1.0]",  # no random crops
              "objectives=[{name: contrastive, loss: clip}]"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single = write_config(tmp_path / "single.yaml", train_overrides(synth_root, single_dir, *common,
                                                                    f"data.train={one}"))
    ddp = write_config(tmp_path / "ddp.yaml", train_overrides(synth_root, ddp_dir, *common, f"data.train={two}"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "vlpretrain.train", "--config", str(ddp)]
    two_procs = subprocess.Popen(launch, env={**ENV, "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    finish(start(single))
    finish(two_procs)
    assert json.loads((ddp_dir / "summary.json").read_text())["world_size"] == 2
    assert json.loads((single_dir / "summary.json").read_text())["world_size"] == 1

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    a, b = losses(single_dir), losses(ddp_dir)
    assert len(a) == len(b) == steps
    print(f"one process: {a}\ntwo processes: {b}")
    assert a[0] != a[-1]  # it trains
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    # the contrastive accuracy is over the gathered pool: two processes' mean is one process's on the whole batch
    accuracy = {run_dir: [{k: r[f"contrastive/{k}"] for k in ("i2t_acc", "t2i_acc", "pool_size")}
                          for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
                for run_dir in (single_dir, ddp_dir)}
    print(f"accuracy, one process: {accuracy[single_dir]}\ntwo processes: {accuracy[ddp_dir]}")
    assert all(r["pool_size"] == 2 * per_rank for r in accuracy[ddp_dir])
    assert accuracy[ddp_dir] == accuracy[single_dir]
