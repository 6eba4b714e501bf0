"""The model's own config: the architecture of the shared image/text transformer.

A plain dataclass (no OmegaConf, no torch at import): the model, its HF config and the exported
remote code use it alone; the experiment config (:mod:`vlpretrain.config`) composes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vlpretrain.errors import raise_first_failure


@dataclass
class ModelConfig:
    """Architecture of the shared image/text transformer (see ``vlpretrain.models.presets``)."""

    preset: Optional[str] = None
    """Size preset to start from (debug, tiny, small, base, large); keys set here override it."""
    image_size: int = 224
    """Input image side in pixels (square)."""
    patch_size: int = 16
    """Patch side in pixels; image_size must be a multiple of it."""
    in_chans: int = 3
    """Image channels."""
    width: int = 768
    """Transformer width shared by image patches and text tokens."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block; width must be a multiple of it."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of width."""
    qkv_bias: bool = True
    """Bias on the fused qkv projection (timm ViT default)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    vocab_size: int = 32000
    """Text vocabulary size (set from the tokenizer by the trainer)."""
    max_text_len: int = 64
    """Longest text sequence (context length) including BOS/EOS."""
    embed_dim: int = 512
    """Width of the L2-normalised image/text embeddings (projection heads)."""
    modality_experts: bool = False
    """VLMo / BEiT-3 style experts: per-modality norms and MLPs, shared attention."""
    text_embed_depth: int = 0
    """Text is unimodal in the first K blocks: the text embedding is read after them and captions
    attend to the image only from block K on (CoCa in one pass); 0 means all blocks / from block 0."""
    pre_norm: bool = False
    """LayerNorm on the image tokens after the position embeddings (timm ``norm_pre``, CLIP's
    ``pre_layrnorm``); needed for an exact export to transformers' CLIPModel. On in every preset."""
    patch_dropout: float = 0.0
    """FLIP patch dropout: share of patches dropped at random in training (0 disables)."""
    tie_word_embeddings: bool = True
    """Tie lm_head to text_embed."""
    attn_backend: Optional[str] = None
    """Attention backend: sdpa, flex, flash_attn, eager or sdpa_aligned (sdpa whose masked calls pad the keys
    to a multiple of 8, for cuDNN's aligned kernels; untimed yet) (None: $VLPRETRAIN_ATTN, then sdpa)."""
    pad_token_id: int = 0
    """Padding token id."""
    bos_token_id: int = 1
    """Beginning-of-sequence token id (also the decoder start token)."""
    eos_token_id: int = 2
    """End-of-sequence token id."""
    mask_token_id: Optional[int] = 4
    """Mask token id for masked token modelling (None: the tokenizer has none)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent key and the fix."""
        from vlpretrain.layers.attention import BACKENDS

        positive = ["image_size", "patch_size", "in_chans", "width", "depth", "num_heads", "vocab_size", "embed_dim"]
        raise_first_failure([(getattr(self, k) > 0, f"model.{k}", f"{getattr(self, k)} must be > 0") for k in positive])
        checks = [
            (self.image_size % self.patch_size == 0, "model.image_size",
             f"{self.image_size} is not a multiple of model.patch_size={self.patch_size}"),
            (self.width % self.num_heads == 0, "model.width",
             f"{self.width} is not a multiple of model.num_heads={self.num_heads}"),
            (0 <= self.text_embed_depth <= self.depth, "model.text_embed_depth",
             f"{self.text_embed_depth} must lie in [0, model.depth={self.depth}]"),
            (0.0 <= self.patch_dropout < 1.0, "model.patch_dropout", f"{self.patch_dropout} must lie in [0, 1)"),
            (self.attn_backend is None or self.attn_backend in BACKENDS, "model.attn_backend",
             f"'{self.attn_backend}' is not one of {', '.join(BACKENDS)}"),
            (self.max_text_len >= 2, "model.max_text_len", f"{self.max_text_len} leaves no room for BOS and EOS"),
        ]
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, name)
            if value is None and name == "mask_token_id":
                continue
            checks.append((0 <= value < self.vocab_size, f"model.{name}",
                           f"{value} is outside the vocabulary [0, model.vocab_size={self.vocab_size})"))
        raise_first_failure(checks)
