"""The trainer: outputs, bad starts that change nothing, non-finite losses, wandb, export."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.helpers import train_overrides
from vlpretrain import VLModel
from vlpretrain.config import ConfigError, load_config
from vlpretrain.train.checkpoint import complete_checkpoints
from vlpretrain.train.loop import TrainingStopped, train


def run(root, run_dir, *extra):
    return train(load_config(None, train_overrides(root, run_dir, *extra)))


def test_run_writes_metrics_checkpoints_plots_summary_and_export(synth_root, tmp_path, fresh_accelerate_state):
    run_dir = tmp_path / "run"
    summary = run(synth_root, run_dir, "train.ckpt_every=2", "train.keep_last=2")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("samples_seen", "loss", "loss/contrastive", "loss/captioning", "lr", "samples_per_s",
                "data_wait_frac", "tflops_per_s", "nonfinite_steps"):
        assert key in steps[-1], key
    assert steps[-1]["samples_seen"] == 6 * 16
    assert 0 <= steps[-1]["data_wait_frac"] <= 1 and steps[-1]["tflops_per_s"] > 0
    assert all(0 < r["mfu"] <= 1 for r in steps if "mfu" in r)  # (left out where the measured CPU peak was outrun)
    for r in steps:  # logged every step: the window is one step of 16 samples
        assert abs(r["step_time_s"] * r["samples_per_s"] - 16) < 1e-6
        assert r["tokens_per_s"] > 16 * r["samples_per_s"]  # every image alone brings 1 + 16 patch tokens
    evals = [r for r in records if "eval/i2t_r@1" in r]
    assert len(evals) == 1 and len(evals[0]["eval/captions"]) == 2
    assert [s for s, _ in complete_checkpoints(run_dir)] == [4, 6]  # keep_last=2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "loss.png").is_file()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 6 and saved["samples_seen"] == 96 and "i2t_r@1" in saved["eval"]
    model = VLModel.from_pretrained(summary["export"])
    from vlpretrain import VLProcessor

    processor = VLProcessor.from_pretrained(summary["export"])
    batch = processor(text=["a red circle"], return_tensors="pt")
    assert model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (1, 64)


def test_restarting_from_an_older_checkpoint_refuses_while_newer_ones_exist(synth_root, tmp_path,
                                                                             fresh_accelerate_state):
    run_dir = tmp_path / "run"
    run(synth_root, run_dir, "train.steps=4", "train.ckpt_every=2", "train.export=false", "data.val=null")
    older = run_dir / "checkpoints" / "step_2"
    with pytest.raises(ConfigError, match=r"newer than step 2 \(step_4\); move them out"):
        run(synth_root, run_dir, f"train.resume={older}", "train.steps=4")
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2, 4]


def test_data_too_small_for_one_batch_is_an_error_not_a_hang(synth_root, tmp_path, fresh_accelerate_state):
    with pytest.raises(ConfigError, match="gave this rank no batch of 1024 samples"):
        run(synth_root, tmp_path / "run", "train.batch_size=1024")


@pytest.mark.parametrize("extra,match", [
    (["train.batch_size=15", "train.accum_steps=2"], r"train.batch_size: 15 does not split.*multiple of 2"),
    (["data.train=/nonexistent/shards"], r"/nonexistent/shards"),
    (["objectives=[{name: contrastiv}]"], r"unknown objective 'contrastiv'. Did you mean 'contrastive'"),
    (["train.precision=fp8"], r"train.precision: 'fp8' is not one of"),
])
def test_bad_start_fails_before_any_step_and_writes_nothing(synth_root, tmp_path, extra, match,
                                                            fresh_accelerate_state):
    run_dir = tmp_path / "run"
    with pytest.raises((ConfigError, FileNotFoundError, ValueError), match=match):
        run(synth_root, run_dir, *extra)
    assert not run_dir.exists()


def test_failed_start_overwrites_nothing_of_an_existing_run(synth_root, tmp_path, fresh_accelerate_state):
    run_dir = tmp_path / "run"
    run(synth_root, run_dir, "train.steps=2", "train.export=false")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds checkpoints; continue it with train.resume=auto"):
        run(synth_root, run_dir, "train.steps=2")  # a fresh start into a used run.dir
    with pytest.raises(ConfigError, match=r"different model shape \(model.width: checkpoint 64 != config 96"):
        run(synth_root, run_dir, "train.resume=auto", "model.width=96")
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("grad_clip", ["0", "1.0"])
def test_nonfinite_losses_skip_updates_then_stop_with_the_last_good_weights(synth_root, tmp_path, grad_clip,
                                                                             fresh_accelerate_state):
    # a learning rate so large that the first update blows the weights up: later steps are skipped,
    # then training stops with a checkpoint holding the weights of the last applied update
    blow_up = ["optim.lr=1e30", "optim.warmup_steps=0", "optim.schedule=constant", f"optim.grad_clip={grad_clip}"]
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="non-finite in 2 steps in a row"):
        run(synth_root, run_dir, *blow_up, "train.max_nonfinite=2", "train.steps=20")
    (step, ckpt), = complete_checkpoints(run_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    applied = step - state["nonfinite_total"]
    assert state["nonfinite_run"] == 2 and applied >= 1
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    AcceleratorState._reset_state(True)
    reference_dir = tmp_path / "reference"  # the same run stopped after exactly the applied updates
    run(synth_root, reference_dir, *blow_up, f"train.steps={applied}", "train.export=false", "data.val=null")
    got = load_file(ckpt / "model.safetensors")
    want = load_file(complete_checkpoints(reference_dir)[-1][1] / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.isfinite(w).all() or w.abs().max() > 1e20 for w in want.values())  # it did blow up


def test_wandb_offline_run_holds_the_logged_metrics(synth_root, tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run(synth_root, run_dir, "train.trackers=[wandb]", "train.steps=3", "train.export=false")
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged = wandb_history(files[0])  # (wandb's service process may still be flushing: wait for it)
    losses = [h["loss"] for h in logged if "loss" in h]
    ours = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    assert losses == pytest.approx(ours)


def wandb_history(path, wait_s: float = 30.0) -> list[dict]:
    """History rows of a complete .wandb file (one with its exit record), waiting up to ``wait_s``."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        rows, complete = _read_wandb(path)
        if complete or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _read_wandb(path) -> tuple[list[dict], bool]:
    """A 7-byte W&B header, then LevelDB-log records of protobufs: (history rows, has exit record)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, rows, complete = path.read_bytes(), 7, 32768, b"", [], False
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            kind_name = rec.WhichOneof("record_type")
            complete = complete or kind_name == "exit"
            if kind_name == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
    return rows, complete


def test_tensorboard_tracker_holds_the_logged_loss(synth_root, tmp_path, fresh_accelerate_state):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run(synth_root, run_dir, "train.trackers=[tensorboard]", "train.steps=3", "train.export=false")
    events = EventAccumulator(str(next(p.parent for p in run_dir.rglob("events.out.tfevents.*"))))
    events.Reload()
    logged = [e.value for e in events.Scalars("loss")]
    ours = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    assert logged == pytest.approx(ours, rel=1e-6)


def test_init_from_a_checkpoint_folder_starts_from_its_weights(synth_root, tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    first = tmp_path / "first"
    run(synth_root, first, "train.steps=2", "train.export=false", "data.val=null")
    ckpt = complete_checkpoints(first)[-1][1]
    AcceleratorState._reset_state(True)
    second = tmp_path / "second"  # one step with a vanishing learning rate: the weights must stay the checkpoint's
    run(synth_root, second, f"train.init_from={ckpt}", "train.steps=1", "optim.lr=1e-20", "optim.weight_decay=0",
        "train.export=false", "data.val=null", "model.patch_dropout=0.25")
    before, after = load_file(ckpt / "model.safetensors"), load_file(complete_checkpoints(second)[-1][1] / "model.safetensors")
    model_keys = [k for k in before if k.startswith("model.")]
    assert model_keys and all((after[k] - before[k]).abs().max() < 1e-12 for k in model_keys)
    saved = load_config(second / "config.yaml")
    assert saved.model.patch_dropout == 0.25 and saved.model.width == 64  # own training keys, pretrained shape


def test_compiled_run_with_cuda_graph_mode_marks_each_step_and_equals_eager(synth_root, tmp_path, monkeypatch, capsys,
                                                                            fresh_accelerate_state):
    # train.compile under a CUDA-graph mode: torch.compile gets the mode's options, and each step starts a new
    # CUDA-graph iteration (the step before's graph outputs may be overwritten only from there on). The
    # compiled trainer (dynamo + AOTAutograd; aot_eager: no code generation, seconds) logs the eager losses.
    from accelerate.state import AcceleratorState

    real_compile, options, marks = torch.compile, [], []

    def compile_without_codegen(module, **kwargs):
        options.append(kwargs["options"])
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    quick = ["train.export=false", "data.val=null", "data.pad_multiple=8"]

    def losses(run_dir):
        return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    torch._dynamo.reset()
    run(synth_root, tmp_path / "compiled", *quick, "train.compile=true", "train.compile_mode=reduce-overhead")
    assert len(options) == 1 and options[0]["triton.cudagraphs"] and len(marks) == 6
    assert "train.compile_mode=reduce-overhead: CUDA graphs apply on CUDA devices only" in capsys.readouterr().out
    AcceleratorState._reset_state(True)
    run(synth_root, tmp_path / "eager", *quick)
    assert len(options) == 1 and len(marks) == 6
    compiled, eager = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert len(compiled) == 6 and max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-4, (compiled, eager)


def test_a_data_bound_run_says_so_once_after_its_first_log_window(synth_root, tmp_path, monkeypatch, capsys,
                                                                   fresh_accelerate_state):
    # batches made slow (0.3 s each): every log window waits on data for most of its time; the note comes
    # once, at the second window (the first holds the workers' start), and names the worker count
    from accelerate.state import AcceleratorState

    import vlpretrain.train.loop as loop

    real_next = loop._next_batch

    def slow_next(*args):
        time.sleep(0.3)
        return real_next(*args)

    monkeypatch.setattr(loop, "_next_batch", slow_next)
    quick = ["train.export=false", "data.val=null", "train.log_every=2", "data.num_workers=1"]
    run(synth_root, tmp_path / "slow", *quick)
    out = capsys.readouterr().out
    assert out.count("the model waited on data") == 1 and "[step 4]" in out and "data.num_workers=1," in out, out
    AcceleratorState._reset_state(True)
    run(synth_root, tmp_path / "one_window", *quick, "train.steps=2")  # one window: the start alone, no note
    assert "the model waited on data" not in capsys.readouterr().out


def test_logged_losses_and_metrics_are_means_over_the_log_window(synth_root, tmp_path, fresh_accelerate_state):
    # the same seeded run logged every step and every 5 steps: the 5-step record is the mean of the
    # five 1-step records (the old trainer logged the window's last step instead)
    from accelerate.state import AcceleratorState

    quick = ["train.steps=5", "train.export=false", "data.val=null"]
    run(synth_root, tmp_path / "every", *quick)
    AcceleratorState._reset_state(True)
    run(synth_root, tmp_path / "window", *quick, "train.log_every=5")
    per_step = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    (window,) = [json.loads(line) for line in (tmp_path / "window" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_step] == [1, 2, 3, 4, 5] and window["step"] == 5
    keys = ("loss", "loss/contrastive", "loss/captioning", "contrastive/i2t_acc", "contrastive/logit_scale",
            "captioning/token_acc")
    for key in keys:
        values = [r[key] for r in per_step]
        assert window[key] == pytest.approx(sum(values) / 5, rel=1e-5, abs=1e-7), key
    losses = [r["loss"] for r in per_step]
    assert max(losses) - min(losses) > 1e-3  # the steps differ: a last-step value would not pass the above
    assert window["contrastive/pool_size"] == 16 and window["window_nonfinite_steps"] == 0
    assert all(r["window_nonfinite_steps"] == 0 for r in per_step)


def test_nonfinite_steps_are_left_out_of_the_window_means_and_counted(fresh_accelerate_state):
    from accelerate import Accelerator

    from vlpretrain.train.window import WindowMeans

    means = WindowMeans()
    ok, bad = torch.tensor([False]), torch.tensor([True])
    means.add({"loss": torch.tensor(1.0), "x/acc": torch.tensor(0.25)}, ok)
    means.add({"loss": torch.tensor(float("nan")), "x/acc": torch.tensor(float("inf"))}, bad)
    means.add({"loss": torch.tensor(3.0), "x/acc": torch.tensor(0.75)}, ok)
    accelerator = Accelerator(cpu=True)
    assert means.take(accelerator) == {"loss": 2.0, "x/acc": 0.5, "window_nonfinite_steps": 1}
    means.add({"loss": torch.tensor(float("nan"))}, bad)  # a window of only non-finite steps: NaN, not an error
    taken = means.take(accelerator)
    assert taken["loss"] != taken["loss"] and taken["window_nonfinite_steps"] == 1
    assert means.take(accelerator) == {}  # nothing added since


def test_an_objective_starting_mid_window_is_averaged_over_the_steps_that_logged_it(fresh_accelerate_state):
    from accelerate import Accelerator

    from vlpretrain.train.window import WindowMeans

    means, ok = WindowMeans(), torch.tensor([False])
    means.add({"loss": torch.tensor(1.0)}, ok)
    means.add({"loss": torch.tensor(2.0), "loss/late": torch.tensor(4.0)}, ok)  # `late` starts at this step
    means.add({"loss/late": torch.tensor(6.0), "loss": torch.tensor(3.0)}, ok)  # any order
    assert means.take(Accelerator(cpu=True)) == {"loss": 2.0, "loss/late": 5.0, "window_nonfinite_steps": 0}
    means.add({"loss": torch.tensor(1.0), "loss/late": torch.tensor(1.0)}, ok)
    with pytest.raises(ValueError, match="did not log"):  # a name that stops mid-window is an error
        means.add({"loss": torch.tensor(1.0)}, ok)
