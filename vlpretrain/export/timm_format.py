"""``--format timm``: the image tower as a timm ``VisionTransformer`` hub folder.

Our image-path parameter names are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``norm_pre``, ``blocks.N.*``, ``norm``), so the mapping is a key filter plus one fold: the image
modality embedding is added to every row of ``pos_embed`` (cls and patches alike), and with
``pre_norm`` (where timm's patch conv has no bias, like CLIP's) the patch bias to the patch rows. With modality
experts the image experts carry the timm names and the text experts are left out. The folder is
written by timm's own ``save_for_hf`` (``config.json`` with ``model_args`` + ``model.safetensors``),
so ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``hf-hub:`` once uploaded) rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlpretrain.export.hub import atomic_folder
from vlpretrain.export.source import LoadedModel

TIMM_ARCH = "vit_base_patch16_224"  # the registered ViT entry point; model_args override its sizes
TIMM_NORM_EPS = 1e-6  # timm's VisionTransformer LayerNorm epsilon


class NotExpressible(ValueError):
    """The model cannot be written in the requested format (the message says why)."""


def timm_model_args(config) -> dict:
    """``timm.create_model`` keyword arguments of the VisionTransformer equal to our image path."""
    if abs(config.norm_eps - TIMM_NORM_EPS) > 1e-12:
        raise NotExpressible(f"--format timm needs model.norm_eps={TIMM_NORM_EPS} (timm's ViT LayerNorm epsilon); "
                             f"this model uses {config.norm_eps}. Export with --format hf instead.")
    return dict(img_size=config.image_size, patch_size=config.patch_size, in_chans=config.in_chans,
                embed_dim=config.width, depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias, pre_norm=config.pre_norm, num_classes=0, global_pool="token")


def to_timm_vit(model):
    """A ``timm`` VisionTransformer holding ``model``'s image tower (eval mode)."""
    import timm

    vit = timm.create_model(TIMM_ARCH, pretrained=False, **timm_model_args(model.config))
    ours = model.backbone.state_dict()
    state = {k: ours[k] for k in vit.state_dict()}  # a KeyError here would mean the names drifted from timm's
    pos = ours["pos_embed"] + ours["modality_embed"][0]  # (1, 1 + N, D)
    if "patch_embed.proj.bias" not in state:  # timm drops the patch bias when pre_norm (as CLIP): fold it
        pos[:, 1:] += ours["patch_embed.proj.bias"]
    state["pos_embed"] = pos
    vit.load_state_dict(state, strict=True)
    return vit.eval()


def export_timm(loaded: LoadedModel, out: str | Path, license: str = "apache-2.0") -> Path:
    """Write the timm folder at ``out`` (replacing it only when complete)."""
    from timm.models import save_for_hf

    vit = to_timm_vit(loaded.model)
    settings = loaded.processor.image_settings
    data_config = dict(mean=tuple(settings.mean), std=tuple(settings.std), interpolation=settings.interpolation,
                       crop_pct=1.0, crop_mode="center")  # our eval transform: resize shorter side, centre crop
    card = dict(pretrained_cfg=dict(tag="vlpretrain", license=license))
    with atomic_folder(out) as tmp, torch.no_grad():
        save_for_hf(vit, str(tmp), model_config=card, safe_serialization=True, data_config=data_config)
        (tmp / "README.md").write_text(
            f"---\nlicense: {license}\nlibrary_name: timm\ntags: [image-feature-extraction, vlpretrain]\n---\n\n"
            "The image tower of a vlpretrain vision-language model as a timm VisionTransformer.\n\n"
            "```python\nimport timm\nmodel = timm.create_model(\"local-dir:PATH\", pretrained=True).eval()\n"
            "features = model.forward_features(x)  # (B, 1 + N, D)\n```\n")
    return Path(out)
