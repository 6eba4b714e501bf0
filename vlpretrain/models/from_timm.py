"""Start the image path from a timm VisionTransformer (``train.init_from: timm:NAME``), key for key.

The backbone uses timm's parameter names, so a timm ViT's ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``norm_pre``, ``blocks.N.*`` and ``norm`` load as they are. timm resolves the
name itself (its hub cache, ``hf-hub:ORG/NAME``, ``local-dir:PATH``) and never downloads here unless
timm would. The architecture of the shared blocks is the timm model's; the image and patch size stay
the run's, with the position embeddings and the patch embedding resampled by timm's own helpers.
Text embeddings, text norms, modality embeddings and the heads start fresh.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpretrain.models.config import ModelConfig
from vlpretrain.models.weights import WeightMismatch, load_strict, weight_mismatch

PREFIX = "timm:"


def create_timm_vit(name: str):
    """timm's pretrained ``name`` (without the ``timm:`` prefix), headless, drawn without touching the
    global RNG (timm initialises before it loads)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        vit = timm.create_model(name, pretrained=True, num_classes=0)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"train.init_from 'timm:{name}' is a {type(vit).__name__}; only timm VisionTransformers "
                         "load into the backbone (e.g. timm:vit_base_patch16_224.augreg_in21k).")
    return vit


def timm_architecture(vit, name: str) -> dict:
    """The ModelConfig fields of the timm ViT's trunk, or a ValueError naming what our blocks lack."""
    block = vit.blocks[0]
    act = block.mlp.act
    unsupported = {
        "no class token": vit.cls_token is None,
        "register tokens": getattr(vit, "num_reg_tokens", 0) > 0,
        "position embeddings without the class token's": getattr(vit, "no_embed_class", False),
        "layer scale (init_values)": not isinstance(block.ls1, nn.Identity),
        "q/k norms": not isinstance(block.attn.q_norm, nn.Identity),
        f"activation {act}": not (isinstance(act, nn.GELU) and act.approximate == "none"),
        f"final norm {type(vit.norm).__name__}": not isinstance(vit.norm, nn.LayerNorm),
    }
    found = [what for what, bad in unsupported.items() if bad]
    if found:
        raise ValueError(f"train.init_from 'timm:{name}': this ViT has {', '.join(found)}, which the backbone's "
                         "blocks do not express; pick a plain pre-norm ViT (cls token, GELU, LayerNorm).")
    return dict(width=vit.embed_dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
                mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
                norm_eps=vit.norm.eps, pre_norm=not isinstance(vit.norm_pre, nn.Identity),
                in_chans=vit.patch_embed.proj.in_channels)


def timm_image_tower(cfg: ModelConfig, init_from: str | None):
    """For ``init_from`` = ``timm:NAME``: the timm ViT, with its trunk's shape written into ``cfg`` (the
    run's image and patch size kept); None for anything else."""
    if not init_from or not init_from.startswith(PREFIX):
        return None
    name = init_from[len(PREFIX):]
    vit = create_timm_vit(name)
    for key, value in timm_architecture(vit, name).items():
        setattr(cfg, key, value)
    return vit


def _resampled(key: str, value: torch.Tensor, own: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``pos_embed`` to the model's patch grid, ``patch_embed.proj.weight`` to its patch size (timm's helpers)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    if key == "pos_embed" and value.shape != own.shape:
        grid = cfg.image_size // cfg.patch_size
        return resample_abs_pos_embed(value, [grid, grid], num_prefix_tokens=1)
    if key == "patch_embed.proj.weight" and value.shape[-2:] != own.shape[-2:]:
        return resample_patch_embed(value, [cfg.patch_size, cfg.patch_size])
    return value


def load_timm_image_path(model, vit, source: str) -> dict[str, list[str]]:
    """Copy ``vit``'s weights into ``model.backbone`` (resampled where the grid or patch differs);
    returns {"loaded": backbone keys from timm, "new": the model's keys that start fresh}. Every timm
    key must land somewhere with the right shape, else a WeightMismatch naming them."""
    own = model.backbone.state_dict()
    state = {k: _resampled(k, v, own[k], model.config) if k in own else v for k, v in vit.state_dict().items()}
    if "patch_embed.proj.bias" not in state:  # timm's pre-norm ViTs (CLIP's layout) have no patch bias
        state["patch_embed.proj.bias"] = torch.zeros_like(own["patch_embed.proj.bias"])
    _, unexpected, shapes = weight_mismatch(model.backbone, state)
    if unexpected or shapes:
        raise WeightMismatch(f"the timm model {source} does not fit the backbone: unexpected {unexpected}, wrong "
                             f"shape {shapes}; nothing was loaded.")
    load_strict(model.backbone, {**own, **state}, source)
    loaded = sorted(state)
    new = sorted(k for k in model.state_dict() if not (k.startswith("backbone.") and k[len("backbone."):] in state))
    return {"loaded": loaded, "new": new}


def describe_load(report: dict[str, list[str]], source: str) -> str:
    """One paragraph for the log: what came from timm and what starts fresh."""
    return (f"train.init_from {source}: loaded {len(report['loaded'])} image-path tensors "
            f"({', '.join(report['loaded'])}); new: {', '.join(report['new'])}")
