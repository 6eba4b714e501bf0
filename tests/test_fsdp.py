"""FSDP2 under the trainer, in real processes: ``vlpretrain train --accelerate-config
configs/accelerate/fsdp-cpu-2.yaml`` (2 CPU processes over gloo) against one process on the doubled batch,
its sharded checkpoint exported to a hub folder that transformers loads without vlpretrain and
resumed by one plain process, and a one-process checkpoint resumed under FSDP by two; the SigLIP 2 debug
recipe (EMA teacher) starting its teacher objectives, equal to one process and resuming after their start.

Random draws: every training draw (crops, caption picks, views, MAE and masked-prediction masks, CapPa's
parallel captions, self-distillation's crops) comes from each sample's own seed (data/README.md, "Per-sample
draws"), so 2 processes draw what one process draws for the same samples, with random crops on: each
objective is compared with one process on the doubled batch. Captioning is per-caption (per_caption: true):
the default token mean over a rank's batch is, like DDP's, a mean of per-rank means.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import embedding_diff, run_without_vlpretrain, train_overrides
from tests.test_export_hf import FRESH_PROCESS
from tests.test_train_processes import ENV, ROOT, finish, make_interleaved_shards, start, write_config
from vlpretrain.train.checkpoint import complete_checkpoints

PER_RANK, STEPS = 8, 4
MAE = "{name: masked_image, decoder_width: 32, decoder_depth: 1, decoder_heads: 2}"
COMMON = [f"train.steps={STEPS}", f"train.batch_size={2 * PER_RANK}", "data.shuffle_buffer=0", "data.val=null",
          "train.export=false", "optim.warmup_steps=1", "optim.lr=2e-3"]  # random crops (data.crop_scale) on
# A: CLIP, captioning and masked_image, FSDP vs one process; S: the SigLIP 2 recipe with 2 micro-batches per rank
OBJECTIVES_A = f"objectives=[{{name: contrastive, loss: clip}}, {{name: captioning, per_caption: true}}, {MAE}]"
S_START = 2  # the teacher objectives run from step 3 of 4


def siglip2_overrides() -> list[str]:
    """configs/siglip2-base-debug.yaml's objectives and teacher, per-caption captioning, teacher objectives
    starting at step S_START."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(ROOT / "configs" / "siglip2-base-debug.yaml")
    entries = OmegaConf.to_container(recipe.objectives)
    for entry in entries:
        if entry["name"] == "captioning":
            entry["per_caption"] = True
        if "start" in entry:
            entry["start"] = S_START
    assert {e["name"] for e in entries} == {"contrastive", "captioning", "self_distillation", "masked_prediction"}
    teacher = [f"teacher.{k}={v}" for k, v in OmegaConf.to_container(recipe.teacher).items()]
    return [f"objectives={json.dumps(entries)}", *teacher]


def launch(config: Path, kind: str, *args: str) -> subprocess.Popen:
    """``kind``: fsdp (the user's command with the FSDP accelerate config), ddp (the CPU DDP recipe)."""
    if kind == "fsdp":
        cmd = [sys.executable, "-m", "vlpretrain", "train", "--accelerate-config",
               str(ROOT / "configs" / "accelerate" / "fsdp-cpu-2.yaml"), "--config", str(config), *args]
        env = ENV  # no ACCELERATE_USE_CPU here: `vlpretrain train` sets it from the file's use_cpu
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "vlpretrain.train", "--config", str(config), *args]
        env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def consolidated(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's full weights, however they were saved (what export and eval read)."""
    from vlpretrain.export.source import read_weights

    return read_weights(complete_checkpoints(run_dir)[-1][1])


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    # model.safetensors leaves out the tied lm_head (it is the text embedding); a sharded checkpoint keeps it
    assert a.keys() ^ b.keys() <= {"model.lm_head.weight"}, sorted(a.keys() ^ b.keys())
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a.keys() & b.keys())


@pytest.fixture(scope="module")
def runs(synth_root, tmp_path_factory):
    """A under FSDP2 (2 processes) and one process (the doubled batch); S (the SigLIP 2 recipe) under FSDP2
    (2 processes, 2 micro-batches each, a checkpoint after the teacher objectives' start) and one process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one, two = make_interleaved_shards(tmp / "shards", PER_RANK, STEPS)
    dirs = {name: tmp / name for name in ("a_fsdp", "a_one", "s_fsdp", "s_one")}

    def config(name: str, *extra: str) -> Path:
        return write_config(tmp / f"{name}.yaml", train_overrides(synth_root, dirs[name], *COMMON, *extra))

    s_fsdp = launch(config("s_fsdp", *siglip2_overrides(), f"data.train={two}", "train.accum_steps=2",
                           "train.ckpt_every=3"), "fsdp")
    s_one = start(config("s_one", *siglip2_overrides(), f"data.train={one}"))
    finish(s_one)
    finish(s_fsdp)
    a_one = start(config("a_one", OBJECTIVES_A, f"data.train={one}", "train.ckpt_every=2"))
    finish(launch(config("a_fsdp", OBJECTIVES_A, f"data.train={two}", "train.ckpt_every=2", "train.export=true"),
                  "fsdp"))  # also the end-of-run gather
    finish(a_one)
    return {**dirs, "two": two}


def assert_equal_runs(one: Path, fsdp: Path, keys: set[str]) -> None:
    """Every logged loss (and ``keys``) of ``fsdp`` equal to ``one``'s to rel 1e-5, at every step; the final
    weights (the EMA teacher's included) within 1e-5."""
    a, b = records(one), records(fsdp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert a[0]["loss"] != a[-1]["loss"]  # it trains
    compared = {k for r in a for k in r if k == "loss" or k.startswith("loss/")} | keys
    assert {k for r in b for k in r if k.startswith("loss")} <= compared
    worst_rel = 0.0
    for key in sorted(compared):
        mine, theirs = [r.get(key) for r in a], [r.get(key) for r in b]
        assert (None in mine) == (None in theirs) and [m is None for m in mine] == [t is None for t in theirs], key
        pairs = [(m, t) for m, t in zip(mine, theirs) if m is not None]
        assert [t for _, t in pairs] == pytest.approx([m for m, _ in pairs], rel=1e-5, abs=1e-6), key
        worst_rel = max([worst_rel] + [abs(t - m) / max(abs(m), 1e-12) for m, t in pairs])
    worst, where = max_diff(consolidated(one), consolidated(fsdp))
    print(f"{fsdp.name} vs {one.name}: {len(compared)} logged figures x {STEPS} steps, max rel diff {worst_rel:.2e}; "
          f"final weights max abs diff {worst:.2e} at {where}")
    assert worst < 1e-5, where


@pytest.mark.slow
def test_two_fsdp_processes_really_shard_every_parameter(runs):
    for name in ("a_fsdp", "s_fsdp"):
        info = summary(runs[name])
        assert info["world_size"] == 2
        assert info["distributed"]["sharding"] == "fsdp2"
        assert info["distributed"]["dtensor_parameters"] == info["distributed"]["parameters"] > 0
        ckpt = complete_checkpoints(runs[name])[-1][1]
        assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not (ckpt / "model.safetensors").exists()
    assert summary(runs["a_one"])["world_size"] == summary(runs["s_one"])["world_size"] == 1


@pytest.mark.slow
def test_siglip2_recipe_on_two_fsdp_processes_with_accumulation_equals_one_process(runs):
    # SigLIP (its logit scale and bias get their gradient outside the forward, from the cached embeddings of
    # both micro-batches), CapPa captioning, and from step 3 self-distillation (worker views) and masked
    # prediction against the EMA teacher, with random crops: every draw per sample
    started = [r["step"] for r in records(runs["s_one"]) if "loss/self_distillation" in r and "loss/masked_prediction" in r]
    assert started == list(range(S_START + 1, STEPS + 1))
    assert any(k.startswith("teacher.") for k in consolidated(runs["s_fsdp"]))
    assert_equal_runs(runs["s_one"], runs["s_fsdp"], {"contrastive/logit_bias", "grad_norm"})


@pytest.mark.slow
def test_fsdp_with_masked_image_equals_one_process_with_the_doubled_batch(runs):
    # CLIP, captioning and masked_image (whose decoder is sharded too): the same MAE masks per sample
    assert_equal_runs(runs["a_one"], runs["a_fsdp"], {"grad_norm"})
    # the end-of-run export gathered the shards into the model strictly: the checkpoint's weights exactly
    exported = load_file(str(runs["a_fsdp"] / "model" / "model.safetensors"))
    saved = consolidated(runs["a_fsdp"])
    assert exported and all(torch.equal(v, saved[f"model.{k}"]) for k, v in exported.items())


@pytest.mark.slow
def test_fsdp_checkpoint_exports_to_a_hub_folder_transformers_loads_without_vlpretrain(runs, tmp_path):

    from vlpretrain.cli import main
    from vlpretrain.export.source import load_source

    step = complete_checkpoints(runs["a_fsdp"])[-1][1]
    out = tmp_path / "hub"
    assert main(["export", str(step), "--out", str(out)]) == 0
    theirs = run_without_vlpretrain(FRESH_PROCESS, tmp_path, str(out))
    # the trained model: the consolidated shards, strictly loaded into a VLModel
    assert json.loads((out / "config.json").read_text())["vlpretrain_training"]["logit_scale"] == pytest.approx(
        float(consolidated(runs["a_fsdp"])["objectives.contrastive.logit_scale"].reshape(())))
    diff = embedding_diff(load_source(step), theirs)
    print(f"FSDP checkpoint -> hf export -> AutoModel: embedding max abs diff {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.slow
def test_two_process_fsdp_checkpoint_resumes_in_one_plain_process(runs, tmp_path):
    from vlpretrain.export.source import read_weights

    source = runs["a_fsdp"]
    saved, cfg = resume_elsewhere(source, 2, tmp_path)
    finish(start(cfg, "--resume", str(saved)))
    run_dir = tmp_path / "resumed"
    info = summary(run_dir)
    assert info["world_size"] == 1 and info["distributed"]["sharding"] == "none" and info["steps"] == STEPS
    resumed, original = records(run_dir), records(source)
    assert [r["step"] for r in resumed] == [3, 4]  # the step counter continues
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in original][2:], rel=1e-9)  # so does the LR
    assert resumed[-1]["samples_seen"] == STEPS * 2 * PER_RANK
    # the saved shards are the weights the first resumed step starts from: its logit scale (read in the
    # forward, before the step) is the one the 2-process run used at step 3
    assert resumed[0]["contrastive/logit_scale"] == pytest.approx(original[2]["contrastive/logit_scale"], rel=1e-6)
    worst, _ = max_diff(read_weights(saved), consolidated(run_dir))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in resumed) and worst > 0  # it trains on


def resume_elsewhere(source: Path, step: int, tmp_path: Path, *overrides: str, new_data: bool = False
                     ) -> tuple[Path, Path]:
    """A copy of ``source``'s checkpoint ``step`` (with the run's processor folder it points to) and a config
    of the same run in a new run.dir: (checkpoint, config). ``new_data``: the resumed run reads other shards,
    which a saved data position refuses (a different data spec), so the copy leaves its position out, as a
    checkpoint saved without one (these tests are about model, optimiser, schedule and step)."""
    from omegaconf import OmegaConf

    saved = tmp_path / "copy" / "checkpoints" / f"step_{step}"
    shutil.copytree(source / "checkpoints" / f"step_{step}", saved)
    shutil.copytree(source / "processor", tmp_path / "copy" / "processor")
    if new_data:
        (saved / "data_state.json").unlink()
        manifest = json.loads((saved / "manifest.json").read_text())
        del manifest["files"]["data_state.json"]
        (saved / "manifest.json").write_text(json.dumps(manifest))
    cfg = OmegaConf.merge(OmegaConf.load(source / "config.yaml"),
                          OmegaConf.from_dotlist([f"run.dir={tmp_path / 'resumed'}", *overrides]))
    OmegaConf.save(cfg, tmp_path / "resume.yaml")
    return saved, tmp_path / "resume.yaml"


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp_on_two(runs, tmp_path):
    from vlpretrain.export.source import read_weights

    source = runs["a_one"]  # saved without FSDP: model.safetensors, optimizer.bin (its lm_head left out: tied)
    saved, cfg = resume_elsewhere(source, 2, tmp_path, f"data.train={runs['two']}", new_data=True)
    finish(launch(cfg, "fsdp", "--resume", str(saved)))
    run_dir = tmp_path / "resumed"
    info = summary(run_dir)
    assert info["world_size"] == 2 and info["distributed"]["sharding"] == "fsdp2" and info["steps"] == STEPS
    resumed, original = records(run_dir), records(source)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in original][2:], rel=1e-9)
    # the first resumed step starts from the saved weights and moments: its logit scale (read in the
    # forward, before the step) is the one the unbroken run used at step 3
    assert resumed[0]["contrastive/logit_scale"] == pytest.approx(original[2]["contrastive/logit_scale"], rel=1e-6)
    worst, _ = max_diff(read_weights(saved), consolidated(run_dir))
    assert worst > 0


@pytest.mark.slow
def test_fsdp_resume_on_the_same_processes_continues_the_run_exactly(runs, tmp_path):
    # model and optimiser shards, scheduler, each rank's RNG (its MAE masks) and data position: the
    # resumed steps 3-4 are the unbroken run's
    source = runs["a_fsdp"]
    saved, cfg = resume_elsewhere(source, 2, tmp_path, "train.export=false")
    finish(launch(cfg, "fsdp", "--resume", str(saved)))
    run_dir = tmp_path / "resumed"
    resumed, original = records(run_dir), records(source)
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "loss/masked_image", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in original][2:], key
    worst, where = max_diff(consolidated(source), consolidated(run_dir))
    print(f"FSDP resumed at step 2 vs unbroken: max abs diff {worst:.2e} at {where}")
    assert worst <= 1e-6, where


@pytest.mark.slow
def test_siglip2_recipe_under_fsdp_resumes_after_the_teacher_objectives_start(runs, tmp_path):
    """The SigLIP 2 run's checkpoint of step 3 (after the start of self-distillation and masked prediction)
    resumes on 2 FSDP processes to the unbroken step 4 exactly (the teacher's weights included)."""
    source = runs["s_fsdp"]
    saved, resume_cfg = resume_elsewhere(source, 3, tmp_path)
    finish(launch(resume_cfg, "fsdp", "--resume", str(saved)))
    resumed, unbroken = records(tmp_path / "resumed"), records(source)
    assert summary(tmp_path / "resumed")["world_size"] == 2
    assert [r["step"] for r in resumed] == [STEPS]
    for key in ("loss", "loss/self_distillation", "loss/masked_prediction"):
        assert resumed[0][key] == unbroken[-1][key], key
    a, b = consolidated(source), consolidated(tmp_path / "resumed")
    assert any(k.startswith("teacher.") for k in a)
    worst, where = max_diff(a, b)
    print(f"SigLIP 2 recipe resumed at step 3 vs unbroken: max abs diff {worst:.2e} at {where}")
    assert worst <= 1e-6, where


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this one process: FSDP2 over a mesh of 1 (DTensor parameters) in-process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_step_autocasts_like_unsharded_and_skips_non_finite_updates(one_process_group):
    import copy

    from torch.distributed.tensor import DTensor

    from tests.objectives_support import random_batch
    from tests.helpers import make_model
    from vlpretrain.objectives import build_objective_set
    from vlpretrain.train.host_reads import step_unless
    from vlpretrain.train.optim import build_optimizer
    from vlpretrain.config import OptimConfig
    from vlpretrain.train.sharding import FsdpSettings, shard

    plain = build_objective_set(make_model(text_embed_depth=1), [{"name": "contrastive", "loss": "siglip"},
                                                                 {"name": "captioning"}])
    sharded = shard(copy.deepcopy(plain), torch.device("cpu"), FsdpSettings())
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    batch = random_batch(batch=4)
    for module in (plain, sharded):  # bf16 autocast around forward and backward, as the trainer does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(batch)
        out.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in plain.named_parameters())
    assert worst < 1e-6, worst

    optimizer = build_optimizer(sharded, OptimConfig(lr=1e-2), torch.device("cpu"))  # fused AdamW
    before = {n: p.full_tensor().clone() for n, p in sharded.named_parameters()}
    step_unless(optimizer, torch.tensor([True]))  # a non-finite step: nothing moves, on the device
    assert all(torch.equal(before[n], p.full_tensor()) for n, p in sharded.named_parameters())
    step_unless(optimizer, torch.tensor([False]))
    assert all(not torch.equal(before[n], p.full_tensor()) for n, p in sharded.named_parameters()
               if p.grad is not None and p.grad.full_tensor().abs().max() > 0)


def test_the_teachers_backbone_blocks_and_heads_are_fsdp_units_and_it_runs_as_unsharded(one_process_group):
    """The EMA teacher's blocks (Blocks, like the student's), its backbone and its heads are FSDP2 units of their
    own; at its start it equals the student and the sharded set gives the unsharded losses and gradients."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    from tests.helpers import make_model
    from tests.objectives_support import random_batch
    from vlpretrain.objectives import build_objective_set
    from vlpretrain.train.sharding import FsdpSettings, shard

    entries = [{"name": "contrastive", "loss": "siglip"},
               {"name": "self_distillation", "start": 1, "local_crops": 2, "local_size": 16, "prototypes": 32,
                "head_hidden": 16, "head_bottleneck": 8},
               {"name": "masked_prediction", "start": 1, "head_hidden": 16}]
    plain = build_objective_set(make_model(text_embed_depth=1), entries, total_steps=3)
    sharded = shard(copy.deepcopy(plain), torch.device("cpu"), FsdpSettings())
    teacher = sharded.teacher
    units = [teacher.backbone, *teacher.backbone.blocks, teacher.heads["self_distillation"]["head"]]
    assert all(isinstance(m, FSDPModule) for m in units) and not isinstance(teacher, FSDPModule)
    batch = random_batch(batch=4)
    out = {}
    for name, module in (("plain", plain), ("sharded", sharded)):
        module.set_step(1)  # the teacher starts: a copy of the student
        torch.manual_seed(0)  # the same local crops and masks
        result = module(batch)
        result.loss.backward()
        out[name] = result
    assert set(out["sharded"].losses) == {"contrastive", "self_distillation", "masked_prediction"}
    for key, value in out["plain"].losses.items():
        assert torch.allclose(out["sharded"].losses[key], value, atol=1e-6), key
    student = dict(sharded.model.backbone.named_parameters())
    assert all(torch.equal(p.full_tensor(), student[n].full_tensor()) for n, p in teacher.backbone.named_parameters())
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in plain.named_parameters() if p.grad is not None)
    assert worst < 1e-6, worst


def test_sharded_checkpoint_keys_are_checked_strictly_and_consolidate_without_a_process_group(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tests.helpers import make_model
    from vlpretrain.models.weights import WeightMismatch
    from vlpretrain.objectives import build_objective_set
    from vlpretrain.train.integrity import check_saved_weights
    from vlpretrain.train.sharding import SHARDED_DIR, check_sharded_weights, read_sharded_weights

    objectives = build_objective_set(make_model(), [{"name": "contrastive", "loss": "siglip"},
                                                    {"name": "masked_prediction", "head_hidden": 16}], total_steps=4)
    state = {k: v.detach().clone() for k, v in objectives.state_dict().items()}
    dcp.save({**state, "optimizer": {"state": {}, "param_groups": []}}, checkpoint_id=str(tmp_path / SHARDED_DIR),
             no_dist=True)
    weights = read_sharded_weights(tmp_path)
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())
    expected = {k: tuple(v.shape) for k, v in state.items()}
    check_sharded_weights(tmp_path, expected, "here")  # the same keys: no error
    check_saved_weights(tmp_path, objectives)  # the resume check counts the EMA teacher's teacher.* keys as weights
    planted = {("model.renamed" if k == "model.backbone.norm.weight" else k): s for k, s in expected.items()}
    planted["objectives.contrastive.logit_scale"] = ()
    with pytest.raises(WeightMismatch, match=r"missing model.renamed; unexpected model.backbone.norm.weight; "
                                             r"wrong shape objectives.contrastive.logit_scale \(saved \(1,\), model \(\)\)"):
        check_sharded_weights(tmp_path, planted, "here")


def test_fsdp_settings_come_from_the_launcher_and_unsupported_ones_are_refused(monkeypatch):
    from vlpretrain.config import ConfigError
    from vlpretrain.train.sharding import FsdpSettings, fsdp_from_launcher

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_from_launcher() is None  # no FSDP asked: DDP or one process, as Accelerate decides
    launched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
                "FSDP_OFFLOAD_PARAMS": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
    bad = {"FSDP_VERSION": ("1", "FSDP2 only"), "FSDP_OFFLOAD_PARAMS": ("true", "offload"),
           "FSDP_RESHARD_AFTER_FORWARD": ("FULL_SHARD", "FSDP1 sharding strategy"),
           "FSDP_STATE_DICT_TYPE": ("FULL_STATE_DICT", "SHARDED_STATE_DICT")}
    for key, (value, why) in bad.items():
        for name, v in {**launched, key: value}.items():
            monkeypatch.setenv(name, v)
        with pytest.raises(ConfigError, match=why):
            fsdp_from_launcher()
    for name, v in launched.items():
        monkeypatch.setenv(name, v)
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        fsdp_from_launcher("fp16")
    assert fsdp_from_launcher("bf16") == FsdpSettings(reshard_after_forward=False, wrap=("Block",))
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # taken: Accelerate's state stays MULTI_CPU / MULTI_GPU
