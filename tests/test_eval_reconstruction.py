"""``vlpretrain eval --tasks reconstruction``: MAE decoder figures from a checkpoint, better after training."""

from __future__ import annotations

import pytest

from tests.helpers import train_overrides
from vlpretrain.config import load_config
from vlpretrain.eval.suite import evaluate_model
from vlpretrain.train.loop import train

MAE = "objectives=[{name: masked_image, mask_ratio: 0.5, decoder_width: 64, decoder_depth: 1, decoder_heads: 2}]"


def test_reconstruction_psnr_rises_with_training_and_needs_a_masked_image_checkpoint(synth_root, tmp_path,
                                                                                       fresh_accelerate_state):
    run_dir = tmp_path / "mae"
    train(load_config(None, train_overrides(synth_root, run_dir, MAE, "train.steps=40", "train.ckpt_every=1",
                                            "train.keep_last=40", "optim.lr=2e-3", "data.val=null",
                                            "train.export=false")))
    val = f"{synth_root}/val"
    early = evaluate_model(str(run_dir / "checkpoints" / "step_1"), val, ("reconstruction",), max_samples=48)
    late = evaluate_model(str(run_dir / "checkpoints" / "step_40"), val, ("reconstruction",), max_samples=48)
    print(early["reconstruction"], late["reconstruction"])
    assert late["reconstruction"]["hidden_patches"] == 48 * 8  # half of 16 patches of every image
    assert late["reconstruction"]["psnr"] > early["reconstruction"]["psnr"] + 0.5  # measured: +0.98 dB
    again = evaluate_model(str(run_dir / "checkpoints" / "step_40"), val, ("reconstruction",), max_samples=48)
    assert again["reconstruction"] == late["reconstruction"]  # the hidden patches are seeded


def test_reconstruction_without_the_objective_is_a_clear_error(trained_run, synth_root):
    with pytest.raises(ValueError, match="reconstruction needs a checkpoints/step_N folder of a run trained with"):
        evaluate_model(str(trained_run / "checkpoints" / "step_6"), f"{synth_root}/val", ("reconstruction",),
                       max_samples=4)
