"""``vlpretrain export --format hf``: a hub folder that transformers loads with no vlpretrain around."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import HIDE_VLPRETRAIN, embedding_diff, run_without_vlpretrain
from vlpretrain.cli import main
from vlpretrain.export.source import IncompleteCheckpoint, load_source

FRESH_PROCESS = HIDE_VLPRETRAIN + r'''
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 80, 220))]
batch = processor(images=images, text=["a small red circle", "two blue squares at the top"])
with torch.no_grad():
    out = {"image": model.encode_image(batch["pixel_values"]).tolist(),
           "text": model.encode_text(batch["input_ids"], batch["attention_mask"]).tolist(),
           "input_ids": batch["input_ids"].tolist(), "model_module": type(model).__module__}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def hf_export(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "vl-debug"
    assert main(["export", str(trained_run / "checkpoints" / "step_6"), "--out", str(out)]) == 0
    return out


def test_hf_folder_has_config_weights_tokenizer_processor_code_and_card(hf_export):
    names = {p.name for p in hf_export.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "modeling_vlpretrain.py", "processing_vlpretrain.py", "README.md"):
        assert name in names, name
    config = json.loads((hf_export / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_vlpretrain.VLModel"
    assert config["vlpretrain_training"]["steps"] == 6
    for code in hf_export.glob("*.py"):
        assert not re.search(r"^\s*(from|import) vlpretrain\b", code.read_text(), re.MULTILINE), code
    card = (hf_export / "README.md").read_text()
    assert "license: apache-2.0" in card and "`contrastive`" in card and "Steps: 6" in card
    assert "i2t_r@1" in card and "trust_remote_code=True" in card
    assert not [p for p in hf_export.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_fresh_process_without_vlpretrain_loads_it_with_the_same_embeddings(hf_export, trained_run, tmp_path):
    theirs = run_without_vlpretrain(FRESH_PROCESS, tmp_path, str(hf_export))
    assert theirs["model_module"].startswith("transformers_modules.")
    diff = embedding_diff(load_source(trained_run / "checkpoints" / "step_6"), theirs)
    print(f"hf export embedding max abs diff: {diff:.2e}")
    assert diff < 1e-5


def test_reexport_from_the_hf_folder_keeps_the_training_facts(hf_export, tmp_path):
    out = tmp_path / "again"
    assert main(["export", str(hf_export), "--out", str(out)]) == 0
    assert "Steps: 6" in (out / "README.md").read_text()
    a, b = load_source(hf_export).model.state_dict(), load_source(out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_incomplete_checkpoint_is_a_clear_error_and_writes_nothing(trained_run, tmp_path, capsys):
    broken = tmp_path / "step_6"
    shutil.copytree(trained_run / "checkpoints" / "step_6", broken)
    (broken / "model.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(IncompleteCheckpoint, match="no model.safetensors"):
        load_source(broken)
    assert main(["export", str(broken), "--out", str(out)]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_pickled_weights_are_refused_not_run(trained_run, tmp_path):
    folder = tmp_path / "model"  # a model folder: a checkpoint's manifest would refuse the swapped file first
    shutil.copytree(trained_run / "model", folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": Path("/etc")}, folder / "pytorch_model.bin")  # an arbitrary object, not a tensor
    with pytest.raises(ValueError, match="will not be unpickled"):
        load_source(folder)


def test_teacher_only_weights_are_refused_by_export_and_eval_naming_the_fix(trained_run, tmp_path, capsys):
    """A checkpoint or model folder whose weights are the EMA teacher's ``teacher.*`` keys alone (no student) is
    refused by ``load_source``, ``vlpretrain export`` and ``vlpretrain eval`` with the fix, and nothing is written."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "run" / "checkpoints" / "step_6"
    shutil.copytree(trained_run / "checkpoints" / "step_6", ckpt)
    shutil.copytree(trained_run / "processor", tmp_path / "run" / "processor")  # the checkpoint points to it
    weights = load_file(str(ckpt / "model.safetensors"))
    teacher = {"teacher.backbone." + k[len("model.backbone."):]: v for k, v in weights.items()
               if k.startswith("model.backbone.")}
    save_file(teacher, str(ckpt / "model.safetensors"))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the file was rewritten on purpose
    manifest["files"]["model.safetensors"] = (ckpt / "model.safetensors").stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    folder = tmp_path / "model"
    shutil.copytree(trained_run / "model", folder)
    save_file(teacher, str(folder / "model.safetensors"))
    for source in (ckpt, folder):
        with pytest.raises(ValueError, match=r"only the EMA teacher .*Pass the run's checkpoints/step_N folder"):
            load_source(source)
        out = tmp_path / f"out-{source.name}"
        assert main(["export", str(source), "--out", str(out)]) == 2
        assert "only the EMA teacher" in capsys.readouterr().err and not out.exists()
        assert main(["eval", "--model", str(source), "--data", str(tmp_path / "unused")]) == 2
        assert "only the EMA teacher" in capsys.readouterr().err
    assert load_source(trained_run / "checkpoints" / "step_6").model is not None  # the student's weights still load


def test_push_to_hub_uploads_the_exported_folder(trained_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, private, exist_ok: calls.append(("create", repo_id, exist_ok)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, folder_path, repo_id, commit_message: calls.append(
                            ("upload", sorted(p.name for p in Path(folder_path).iterdir()), repo_id)))
    out = tmp_path / "pushed"
    assert main(["export", str(trained_run / "checkpoints" / "step_6"), "--out", str(out),
                 "--push-to-hub", "me/vl-debug"]) == 0
    assert calls[0] == ("create", "me/vl-debug", True)
    assert calls[1][0] == "upload" and calls[1][2] == "me/vl-debug"
    assert "model.safetensors" in calls[1][1] and "modeling_vlpretrain.py" in calls[1][1]
