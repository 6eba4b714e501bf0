"""Masked-image reconstruction figures of a checkpoint trained with the ``masked_image`` objective.

The objective's decoder lives in the checkpoint (``objectives.masked_image.*``), so this task takes a
``checkpoints/step_N`` folder. Patches are hidden as in training (seeded), the decoder's predictions are
brought back to pixel units, un-normalised with the processor's mean/std to [0, 1], and compared with
the true pixels on the hidden patches only: MSE and PSNR = 10 log10(1 / MSE).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vlpretrain.models.weights import load_strict
from vlpretrain.objectives import build_objectives

PREFIX = "objectives.masked_image."


def masked_image_objective(checkpoint: str | Path, loaded):
    """The checkpoint's trained ``masked_image`` objective (its decoder weights loaded)."""
    from vlpretrain.export.source import is_checkpoint, read_weights

    checkpoint = Path(checkpoint)
    entries = [e for e in loaded.info.objectives if e.get("name") == "masked_image"]
    if not is_checkpoint(checkpoint) or not entries:
        raise ValueError(f"reconstruction needs a checkpoints/step_N folder of a run trained with the masked_image "
                         f"objective (its decoder is saved there); '{checkpoint}' is not one. Drop the task.")
    objective = build_objectives(entries, loaded.model.config)[0]
    weights = read_weights(checkpoint)
    load_strict(objective, {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)},
                f"checkpoint '{checkpoint}' (its masked_image decoder)")
    return objective.eval()


@torch.no_grad()
def reconstruction_figures(checkpoint: str | Path, loaded, samples, seed: int = 0, batch: int = 64) -> dict:
    """``mse`` (pixels in [0, 1]) and ``psnr`` (dB) over the hidden patches of ``samples``."""
    objective = masked_image_objective(checkpoint, loaded)
    model, processor = loaded.model.eval(), loaded.processor
    mean = torch.tensor(processor.image_settings.mean)  # (C,)
    std = torch.tensor(processor.image_settings.std)  # (C,)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the same hidden patches every evaluation
    squared, hidden = 0.0, 0.0
    try:
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            inputs = processor(images=[s.image for s in chunk], text=[(s.captions or [""])[0] for s in chunk])
            pred, patches, mask = objective.predict(model, dict(inputs))  # (B, P, p*p*C) x2, (B, P)
            channels = mean.shape[0]
            recon = objective.to_pixels(pred, patches).unflatten(-1, (-1, channels)) * std + mean  # (B, P, p*p, C)
            truth = patches.unflatten(-1, (-1, channels)) * std + mean
            per_patch = ((recon.clamp(0, 1) - truth) ** 2).mean(dim=(-2, -1))  # (B, P)
            squared += float((per_patch * mask).sum())
            hidden += float(mask.sum())
    finally:
        torch.set_rng_state(generator_state)
    mse = squared / max(hidden, 1.0)
    return {"mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "mask_ratio": objective.cfg.mask_ratio,
            "hidden_patches": int(hidden)}
