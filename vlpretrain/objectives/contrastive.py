"""``contrastive``: align image and text embeddings, CLIP (softmax) or SigLIP (sigmoid).

Embeddings come from the model's own pooling and projection heads on the shared forward (the
image tokens and the unimodal text at ``text_embed_depth``), so they are ``encode_image`` /
``encode_text``. Each rank computes the loss of its own rows against the columns of every rank,
gathered so that gradients flow back to their owner (:mod:`vlpretrain.objectives.distributed`);
DDP's gradient average then gives the gradient of the whole batch. The temperature and the bias
are fp32 parameters of this objective, out of weight decay; the loss is computed in fp32 (or fp64).
Both are 1-element tensors (shape (1,)), not 0-d scalars, so FSDP2 can shard them like every other
parameter; checkpoints written with 0-d scalars load (reshaped), and exports map them back to scalars.
The logit scale is clamped to ``max_logit_scale`` on the parameter after each optimiser step
(:meth:`Contrastive.after_optimizer_step`), never inside ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpretrain.objectives.registry import register_objective
from vlpretrain.objectives.base import CoupledObjective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.distributed import gather_with_grad, world
from vlpretrain.objectives.embeddings import pooled_image_embedding, pooled_text_embedding
from vlpretrain.objectives.functional import clip_loss, retrieval_accuracy, siglip_loss

LOSSES = ("clip", "siglip")
# initial log logit scale t (s = exp t) and bias b: CLIP's temperature 0.07; SigLIP's t' = ln 10, b = -10
DEFAULT_INIT = {"clip": (math.log(1 / 0.07), None), "siglip": (math.log(10.0), -10.0)}


@dataclass
class ContrastiveConfig(ObjectiveConfig):
    """Image-text contrastive learning."""

    loss: str = "clip"
    """clip (softmax InfoNCE in both directions) or siglip (a sigmoid per image-text pair)."""
    logit_scale_init: float | None = None
    """Initial log logit scale t, with s = exp(t); None: ln(1/0.07) for clip, ln(10) for siglip."""
    logit_bias_init: float | None = None
    """Initial logit bias; None: -10 for siglip and no bias for clip (a number gives clip a learnable bias)."""
    max_logit_scale: float = 100.0
    """Largest logit scale s; t is clamped to ln of it after every optimiser step, as CLIP does."""
    chunk_size: int = 0
    """siglip only: logit columns evaluated at once, recomputed in backward to bound memory (0: all)."""

    def checks(self):
        return super().checks() + [
            (self.loss in LOSSES, "loss", f"'{self.loss}' is not one of {', '.join(LOSSES)}"),
            (math.isfinite(self.max_logit_scale) and self.max_logit_scale > 1, "max_logit_scale",
             f"{self.max_logit_scale} must be a finite number > 1"),
            (self.chunk_size >= 0, "chunk_size", f"{self.chunk_size} must be >= 0 (0: no chunking)"),
            (self.chunk_size == 0 or self.loss == "siglip", "chunk_size",
             "chunking applies to loss: siglip only; set it to 0 for clip"),
        ]


@register_objective("contrastive")
class Contrastive(CoupledObjective):
    """CLIP / SigLIP loss on the model's image and text embeddings."""

    Config = ContrastiveConfig

    def __init__(self, cfg: ContrastiveConfig, model_config: Any):
        super().__init__(cfg, model_config)
        self.needs = frozenset({"image_pooled", "text_pooled"})
        scale_init, bias_init = DEFAULT_INIT[cfg.loss]
        scale_init = cfg.logit_scale_init if cfg.logit_scale_init is not None else scale_init
        bias_init = cfg.logit_bias_init if cfg.logit_bias_init is not None else bias_init
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.diverged_message = str(self.error(
            "the learnable logit scale t or bias is not finite, so training diverged",
            "resume from the last good checkpoint with a lower learning rate or more warmup, "
            "and keep logit_scale/logit_bias out of weight decay (no_weight_decay())"))
        self.logit_scale = nn.Parameter(torch.tensor([min(scale_init, self.max_log_scale)], dtype=torch.float32))
        self.logit_bias = (nn.Parameter(torch.tensor([bias_init], dtype=torch.float32))
                           if bias_init is not None else None)
        self.register_load_state_dict_pre_hook(_scalars_as_one_element)

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "logit_bias"} if self.logit_bias is not None else {"logit_scale"}

    def after_optimizer_step(self) -> None:
        """Clamp t to ln(max_logit_scale) on the parameter itself (as CLIP does, so t can come back down).
        Under FSDP each rank clamps its shard of the real parameter; nothing is read on the host."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.max_log_scale)

    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s = exp(t) in ``dtype``, shape (1,); a non-finite t (or bias) is a clear error.

        The check is an asynchronous assert on the device, so no step waits for the host to read t (inside
        torch.compile's graphs it is left out; the trainer's non-finite loss count still stops a run)."""
        if not torch.compiler.is_compiling():
            finite = torch.isfinite(self.logit_scale.detach()).all()
            if self.logit_bias is not None:
                finite = finite & torch.isfinite(self.logit_bias.detach()).all()
            torch._assert_async(finite, self.diverged_message)
        return self.logit_scale.to(dtype).exp()

    def embed(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> dict[str, torch.Tensor]:
        return {"image": pooled_image_embedding(model, shared.image_pooled),  # (b, E)
                "text": pooled_text_embedding(model, shared.text_pooled)}  # (b, E)

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor]) -> ObjectiveOutput:
        dtype = torch.promote_types(embeddings["image"].dtype, torch.float32)  # fp32 at least
        image, text = embeddings["image"].to(dtype), embeddings["text"].to(dtype)  # (b, E)
        rank, _ = world()
        offset = rank * image.shape[0]  # this rank's first row among the gathered columns
        with torch.autocast(device_type=image.device.type, enabled=False):
            scale = self.scale(dtype)
            bias = self.logit_bias.to(dtype) if self.logit_bias is not None else None
            all_text = gather_with_grad(text)  # (N, E)
            if self.cfg.loss == "clip":
                all_image = gather_with_grad(image)  # (N, E)
                loss = clip_loss(image, text, all_image, all_text, scale, bias, offset)
            else:
                loss = siglip_loss(image, all_text, scale, bias, offset, self.cfg.chunk_size)
                all_image = gather_with_grad(image.detach())  # (N, E), for the accuracy only
        # accuracy over the pool of all N gathered pairs (this rank's rows; the trainer's mean over ranks)
        i2t, t2i = retrieval_accuracy(image, text, all_image.detach(), all_text.detach(), offset)
        pool = torch.full((), all_text.shape[0], dtype=torch.float32, device=image.device)
        metrics = {"logit_scale": scale.detach().reshape(()), "i2t_acc": i2t, "t2i_acc": t2i,
                   "pool_size": pool}  # scalars
        if bias is not None:
            metrics["logit_bias"] = bias.detach().clone().reshape(())  # a copy: the parameter changes at the step
        return ObjectiveOutput(loss, metrics)


def _scalars_as_one_element(module, state_dict, prefix, *args) -> None:
    """Checkpoints from before the logit scale and bias were 1-element tensors hold them as 0-d
    scalars: reshaped to (1,) on load (any other shape is left for the strict load to report)."""
    for name in ("logit_scale", "logit_bias"):
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            state_dict[prefix + name] = value.reshape(1)
