"""``masked_image``: masked autoencoding of pixels (MAE, He et al. 2022).

Each image hides a random ``mask_ratio`` of its patches; only the visible ones enter the backbone
(``keep_idx``). A light decoder of its own width and depth takes the encoded visible tokens plus a
learned mask token at every hidden position (restored to patch order), adds fixed 2-D sin-cos
positions and predicts each patch's pixels. Targets are per-patch standardised pixels
(``norm_pix``); the loss is the mean squared error over hidden patches only. With
``condition_on_text`` the visible patches and the caption attend to each other (``fused``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpretrain.layers.draws import SEED_KEY
from vlpretrain.objectives.registry import register_objective
from vlpretrain.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, SharedFeatures
from vlpretrain.objectives.functional import mae_loss, norm_pix_target, patchify, random_masking


@dataclass
class MaskedImageConfig(ObjectiveConfig):
    """Masked patch reconstruction."""

    mask_ratio: float = 0.75
    """Share of the patches hidden from the encoder, in (0, 1)."""
    norm_pix: bool = True
    """Predict per-patch standardised pixels (mean 0, unbiased variance 1, eps 1e-6) instead of raw ones."""
    decoder_width: int = 512
    """Width of the light pixel decoder."""
    decoder_depth: int = 8
    """Transformer blocks of the decoder."""
    decoder_heads: int = 16
    """Attention heads of the decoder; decoder_width must be a multiple of it."""
    condition_on_text: bool = False
    """Let the visible patches attend to the caption (fused layout) while encoding."""

    def checks(self):
        return super().checks() + [
            (0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} must lie in (0, 1)"),
            (self.decoder_width > 0 and self.decoder_depth >= 0 and self.decoder_heads > 0, "decoder_width",
             "decoder_width and decoder_heads must be > 0 and decoder_depth >= 0"),
            (self.decoder_width % 4 == 0, "decoder_width",
             f"{self.decoder_width} must be a multiple of 4 (2-D sin-cos positions)"),
            (self.decoder_width % max(self.decoder_heads, 1) == 0, "decoder_heads",
             f"decoder_width={self.decoder_width} is not a multiple of decoder_heads={self.decoder_heads}"),
        ]


class PixelDecoder(nn.Module):
    """Encoded visible tokens + mask tokens -> per-patch pixel predictions."""

    def __init__(self, in_width: int, width: int, depth: int, heads: int, grid: int, patch_dim: int):
        from timm.layers import build_sincos2d_pos_embed  # imported when used: ~40 MB for every trainer otherwise
        from timm.models.vision_transformer import Block

        super().__init__()
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = build_sincos2d_pos_embed([grid, grid], dim=width)  # (grid * grid, width), fixed
        self.register_buffer("pos_embed", torch.cat([pos.new_zeros(1, width), pos])[None], persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1 + K, D_enc): cls then visible patches in keep order -> (B, P, patch_dim)."""
        x = self.embed(tokens)  # (B, 1 + K, W)
        B, P = ids_restore.shape
        hidden = self.mask_token.expand(B, P + 1 - x.shape[1], -1)  # (B, P - K, W)
        patches = torch.cat([x[:, 1:], hidden], dim=1)  # (B, P, W) in shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # (B, 1 + P, W)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # (B, P, patch_dim)


@register_objective("masked_image")
class MaskedImage(Objective):
    """MAE pixel reconstruction with an objective-owned light decoder."""

    Config = MaskedImageConfig

    def __init__(self, cfg: MaskedImageConfig, model_config: Any):
        super().__init__(cfg, model_config)
        self.batch_keys = ("pixel_values", "input_ids") if cfg.condition_on_text else ("pixel_values",)
        self.patch = model_config.patch_size
        grid = model_config.image_size // self.patch
        self.decoder = PixelDecoder(model_config.width, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads,
                                    grid, self.patch * self.patch * model_config.in_chans)

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token"}

    def forward(self, model: nn.Module, batch: dict, shared: SharedFeatures) -> ObjectiveOutput:
        pred, patches, mask = self.predict(model, batch)
        target = norm_pix_target(patches) if self.cfg.norm_pix else patches
        loss = mae_loss(pred, target, mask)
        with torch.no_grad():  # reconstruction error in (normalised) pixel units
            pixel_mse = mae_loss(self.to_pixels(pred, patches), patches, mask)
        return ObjectiveOutput(loss, {"pixel_mse": pixel_mse})

    def predict(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode the visible patches, decode: (prediction (B, P, p*p*C), true patches (B, P, p*p*C),
        mask (B, P) with 1 at hidden patches)."""
        pixels = batch["pixel_values"]  # (B, C, H, W)
        num_patches = model.backbone.num_patches
        keep_idx, mask, ids_restore = random_masking(pixels.shape[0], num_patches, self.cfg.mask_ratio,
                                                     pixels.device, seeds=batch.get(SEED_KEY),
                                                     stream=f"{self.name}/mask")
        if self.cfg.condition_on_text:
            out = model.backbone(pixels, batch["input_ids"], batch["attention_mask"], layout="fused",
                                 text_causal=False, keep_idx=keep_idx)
        else:
            out = model.backbone(pixel_values=pixels, layout="image", keep_idx=keep_idx)
        pred = self.decoder(out.image, ids_restore)  # (B, P, p*p*C)
        return pred, patchify(pixels, self.patch).float(), mask

    def to_pixels(self, pred: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Predictions in the input's pixel units: undo the per-patch standardisation of norm_pix."""
        pred = pred.float()
        if not self.cfg.norm_pix:
            return pred
        return pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
