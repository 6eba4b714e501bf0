"""Self-contained, checked checkpoints: every weight load strict, the tokenizer kept with the run, and a
resume that cannot be honoured refused before anything is written."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import train_overrides
from vlpretrain.cli import main
from vlpretrain.config import ConfigError, load_config
from vlpretrain.export.source import IncompleteCheckpoint, load_source
from vlpretrain.models.weights import WeightMismatch
from vlpretrain.train.checkpoint import MANIFEST, RUN_PROCESSOR, write_manifest

REPO = Path(__file__).resolve().parents[1]
PROBE = ["a small red circle", "two blue squares at the top"]
PLANTED = "model.image_proj.weight"  # renamed in the planted checkpoint to ...
RENAMED = "model.image_proj.renamed"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_in_process(overrides: list[str]) -> dict:
    from accelerate.state import AcceleratorState

    from vlpretrain.train.loop import train

    AcceleratorState._reset_state(True)
    try:
        return train(load_config(None, overrides))
    finally:
        AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def own_run(synth_root, tmp_path_factory):
    """A 2-step run whose data.tokenizer is its own copy, named relative to the working directory the run
    started in (``base``): ``base/run`` with ``checkpoints/step_2`` and ``processor``."""
    base = tmp_path_factory.mktemp("own")
    shutil.copytree(synth_root / "tokenizer", base / "tok")
    overrides = train_overrides(synth_root, base / "run", "data.tokenizer=tok", "train.steps=2",
                                "train.export=false", "data.val=null")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        train_in_process(overrides)
    finally:
        os.chdir(cwd)
    return base, overrides


def regenerate_tokenizer(path: Path) -> None:
    """A new tokenizer at ``path`` trained on other text: the same special ids, other ids for the probe."""
    from vlpretrain.data.tokenizer import train_tokenizer

    words = "zebra quartz violet ember orbit maple lunar cobalt".split()
    train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4, 48, path)


def test_tokenizer_regenerated_at_data_tokenizer_changes_no_ids_of_export_eval_or_resume(own_run, synth_root,
                                                                                           tmp_path, capsys):
    from vlpretrain import VLProcessor
    from vlpretrain.data.tokenizer import encode_captions, load_tokenizer
    from vlpretrain.eval.suite import evaluate_model

    base, overrides = own_run
    run = tmp_path / "run"  # a copy: this test changes its tokenizer and resumes it
    shutil.copytree(base / "run", run)
    shutil.copytree(base / "tok", tmp_path / "tok")
    ckpt = run / "checkpoints" / "step_2"
    trained = encode_captions(load_tokenizer(base / "tok"), PROBE, 64)["input_ids"].tolist()
    before = evaluate_model(str(ckpt), str(synth_root / "val"), max_samples=32)
    regenerate_tokenizer(tmp_path / "tok")
    assert encode_captions(load_tokenizer(tmp_path / "tok"), PROBE, 64)["input_ids"].tolist() != trained

    cwd = os.getcwd()
    os.chdir(tmp_path)  # data.tokenizer=tok now names the regenerated tokenizer
    try:
        assert load_source(ckpt).processor(text=PROBE)["input_ids"].tolist() == trained
        after = evaluate_model(str(ckpt), str(synth_root / "val"), max_samples=32)
        assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
        processor_before = files_of(run / RUN_PROCESSOR)
        train_in_process([*overrides[1:], f"run.dir={run}", "train.steps=3", "train.resume=auto"])
    finally:
        os.chdir(cwd)
    assert VLProcessor.from_pretrained(tmp_path / "hf")(text=PROBE)["input_ids"].tolist() == trained
    assert after["retrieval"] == before["retrieval"]
    assert "is not the tokenizer of the checkpoint" in capsys.readouterr().out  # named, not switched to
    assert files_of(run / RUN_PROCESSOR) == processor_before
    assert load_source(run / "checkpoints" / "step_3").processor(text=PROBE)["input_ids"].tolist() == trained


def test_export_from_another_working_directory_of_a_moved_run(own_run, tmp_path):
    base, _ = own_run
    moved = tmp_path / "moved" / "run"  # the run folder moved: its checkpoint finds the processor relative to itself
    shutil.copytree(base / "run", moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ckpt = moved / "checkpoints" / "step_2"
    relative = os.path.relpath(ckpt, elsewhere)
    code = ("import sys; from vlpretrain.cli import main; "
            f"sys.exit(main(['export', {str(ckpt)!r}, '--out', 'abs']) or main(['export', {relative!r}, '--out', 'rel']))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_source(base / "run" / "checkpoints" / "step_2")
    for out in ("abs", "rel"):
        got = load_source(elsewhere / out)
        assert got.processor(text=PROBE)["input_ids"].tolist() == want.processor(text=PROBE)["input_ids"].tolist()
        assert all(torch.equal(v, got.model.state_dict()[k]) for k, v in want.model.state_dict().items())


def test_resume_changing_the_objective_set_or_missing_a_file_is_refused_before_anything_is_written(own_run,
                                                                                                  tmp_path):
    base, overrides = own_run
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    shutil.copytree(base / "tok", tmp_path / "tok")
    resume = [*overrides[1:], f"run.dir={run}", "data.tokenizer=tok", "train.steps=4", "train.resume=auto"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        before = files_of(run)
        with pytest.raises(ConfigError, match=r"different objective set \(checkpoint \['captioning', 'contrastive'\]"
                                              r", config \['contrastive'\]\)"):
            train_in_process([*resume, "objectives=[{name: contrastive}]"])
        with pytest.raises(ConfigError, match=r"parameters differ \(objectives.contrastive.logit_bias: checkpoint "
                                              r"None != config \("):  # siglip adds a learnable bias
            train_in_process([*resume, "objectives=[{name: contrastive, loss: siglip}, {name: captioning}]"])
        assert files_of(run) == before
        (run / "checkpoints" / "step_2" / "optimizer.bin").unlink()
        before = files_of(run)
        with pytest.raises(ConfigError, match=r"step_2' is incomplete: no optimizer.bin \(listed in its manifest"):
            train_in_process(resume)
        assert files_of(run) == before
    finally:
        os.chdir(cwd)


def plant_mismatch(folder: Path) -> None:
    """Rename one weight of the checkpoint ``folder`` and record the files again (a consistent manifest)."""
    weights = load_file(folder / "model.safetensors")
    weights[RENAMED] = weights.pop(PLANTED)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / MANIFEST).unlink()
    write_manifest(folder, folder.parent.parent / RUN_PROCESSOR)


def test_a_planted_key_mismatch_is_named_on_every_load_path(trained_run, synth_root, tmp_path, capsys, monkeypatch):

    from vlpretrain import VLConfig, VLModel
    from vlpretrain.eval.suite import evaluate_model
    from vlpretrain.finetune import VLModelForImageClassification
    from vlpretrain.objectives import build_objective_set
    from vlpretrain.train.loop import _full_model

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "step_6"
    plant_mismatch(ckpt)
    named = rf"missing {PLANTED[len('model.'):]}.*unexpected {RENAMED[len('model.'):]}"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert PLANTED[len("model."):] in err and RENAMED[len("model."):] in err and not (tmp_path / "out").exists()
    with pytest.raises(WeightMismatch, match=named):
        evaluate_model(str(ckpt), str(synth_root / "val"), max_samples=16)
    overrides = train_overrides(synth_root, tmp_path / "new", "model.pre_norm=true", f"train.init_from={ckpt}")
    with pytest.raises(WeightMismatch, match=named):
        train_in_process(overrides)
    assert not (tmp_path / "new").exists()
    before = files_of(run)
    with pytest.raises(WeightMismatch, match=rf"missing {PLANTED}.*unexpected {RENAMED}.*nothing was loaded or written"):
        train_in_process(train_overrides(synth_root, run, "model.pre_norm=true", "train.steps=8", "train.resume=auto"))
    assert files_of(run) == before

    # the end-of-run export under FSDP puts the gathered state into a fresh model
    from vlpretrain.train import sharding

    def gathered_with_a_mismatch(module, every_rank=False):  # what the FSDP gather hands back, one key renamed
        state = module.state_dict()
        state[RENAMED] = state.pop(PLANTED)
        return state

    monkeypatch.setattr(sharding, "is_sharded", lambda module: True)
    monkeypatch.setattr(sharding, "gather_full_state", gathered_with_a_mismatch)
    main_process = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    cfg = load_config(run / "config.yaml")
    objectives = build_objective_set(VLModel(VLConfig.from_model_config(cfg.model)), cfg.objectives)
    with pytest.raises(WeightMismatch, match=named):
        _full_model(cfg, main_process, objectives)

    # a model folder (run.dir/model, an hf export) with the same mismatch, through each loader
    folder = run / "model"
    weights = load_file(folder / "model.safetensors")
    weights[RENAMED[len("model."):]] = weights.pop(PLANTED[len("model."):])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    for load in (load_source, VLModel.from_pretrained,
                 lambda f: VLModelForImageClassification.from_pretrained(f, num_labels=3)):
        with pytest.raises(ValueError, match=rf"missing (vlmodel\.)?{PLANTED[len('model.'):]}.*unexpected "
                                             rf"{RENAMED[len('model.'):]}"):
            load(folder)


def test_a_trainer_checkpoint_given_to_a_model_loader_says_to_export_it_first(trained_run):
    from vlpretrain import VLModel, VLProcessor

    ckpt = trained_run / "checkpoints" / "step_6"
    with pytest.raises(ValueError, match=r"is a vlpretrain trainer checkpoint.*Run `vlpretrain export .*step_6 --out"):
        VLModel.from_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match=r"is a vlpretrain trainer checkpoint.*`vlpretrain export"):
        VLProcessor.from_pretrained(ckpt)


def test_a_checkpoint_without_manifest_is_refused_until_sealed_with_its_tokenizer(trained_run, synth_root, tmp_path):
    from vlpretrain.train.integrity import main as seal

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "step_6"
    whole = (ckpt / "scheduler.bin").read_bytes()
    (ckpt / "scheduler.bin").write_bytes(whole[:-1])  # a truncated copy
    with pytest.raises(IncompleteCheckpoint, match=r"changed size: scheduler.bin \(\d+ bytes, saved \d+\)"):
        load_source(ckpt)
    (ckpt / "scheduler.bin").write_bytes(whole)
    (ckpt / MANIFEST).unlink()  # as saved before checkpoints carried manifests
    shutil.rmtree(run / RUN_PROCESSOR)
    with pytest.raises(IncompleteCheckpoint, match=r"no manifest.json.*python -m vlpretrain.train.integrity .*step_6 "
                                                   r"--tokenizer DIR"):
        load_source(ckpt)
    assert seal([str(ckpt), "--tokenizer", str(synth_root / "tokenizer")]) == 0
    want = load_source(trained_run / "checkpoints" / "step_6")
    got = load_source(ckpt)
    assert got.processor(text=PROBE)["input_ids"].tolist() == want.processor(text=PROBE)["input_ids"].tolist()
    assert all(torch.equal(v, got.model.state_dict()[k]) for k, v in want.model.state_dict().items())


def test_the_resume_weight_check_reads_a_sharded_checkpoint_from_its_metadata(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tests.helpers import make_model
    from vlpretrain.objectives import build_objective_set
    from vlpretrain.train.integrity import check_saved_weights, saved_weight_shapes

    objectives = build_objective_set(make_model("debug"), [{"name": "contrastive"}, {"name": "captioning"}])
    state = {k: v for k, v in objectives.state_dict().items() if k != "model.lm_head.weight"}  # tied: saved once
    good, bad = tmp_path / "good", tmp_path / "bad"
    with pytest.warns(UserWarning, match="single process"):  # no process group: one writer
        dcp.save({**state, "optimizer.step": torch.zeros(1)}, checkpoint_id=good)
        state[RENAMED] = state.pop(PLANTED)
        dcp.save(state, checkpoint_id=bad)
    assert saved_weight_shapes(good)[PLANTED] == tuple(objectives.state_dict()[PLANTED].shape)
    check_saved_weights(good, objectives)
    with pytest.raises(WeightMismatch, match=rf"missing {PLANTED}; unexpected {RENAMED}"):
        check_saved_weights(bad, objectives)
