"""Size presets: architecture values a ``ModelConfig`` starts from (``model.preset: base``)."""

from __future__ import annotations

# Every preset has pre_norm (timm's norm_pre, CLIP's pre_layrnorm): what a CLIP export needs. A plain
# timm ViT (no norm_pre) loads into model.pre_norm=false.
PRESETS: dict[str, dict] = {
    # seconds on a CPU: the tests' and the CPU demo twins' model
    "debug": dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, vocab_size=1024,
                  max_text_len=32, embed_dim=64, pre_norm=True),
    # ViT-Ti/16 class
    "tiny": dict(image_size=224, patch_size=16, width=192, depth=12, num_heads=3, max_text_len=64,
                 embed_dim=256, pre_norm=True),
    # ViT-S/16 class
    "small": dict(image_size=224, patch_size=16, width=384, depth=12, num_heads=6, max_text_len=64,
                  embed_dim=384, pre_norm=True),
    # ViT-B/16 class
    "base": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, max_text_len=64,
                 embed_dim=512, pre_norm=True),
    # ViT-L/16 class
    "large": dict(image_size=224, patch_size=16, width=1024, depth=24, num_heads=16, max_text_len=64,
                  embed_dim=768, pre_norm=True),
}


def preset_values(name: str) -> dict:
    """The values of preset ``name`` (with ``preset`` itself), or a clear error listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; valid presets: {', '.join(PRESETS)}.")
    return {"preset": name, **PRESETS[name]}
