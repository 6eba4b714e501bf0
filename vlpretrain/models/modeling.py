"""``VLConfig`` / ``VLModel``: the HuggingFace face of the shared backbone.

``VLModel`` = :class:`~vlpretrain.models.backbone.VLBackbone` + projection heads + a language-model
head. It loads and saves with ``from_pretrained`` / ``save_pretrained`` (safetensors) and is known
to ``AutoConfig`` / ``AutoModel`` once loaded through ``vlpretrain`` (``vlpretrain.models.auto``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from vlpretrain.models.config import ModelConfig
from vlpretrain.layers.attention import KVCache
from vlpretrain.models.backbone import VLBackbone
from vlpretrain.models.losses import next_token_loss

_ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class VLConfig(PretrainedConfig):
    """HF config holding the :class:`ModelConfig` fields (the one list of architecture keys)."""

    model_type = "vlpretrain"

    def __init__(self, **kwargs):
        defaults = ModelConfig()
        arch = {name: kwargs.pop(name, getattr(defaults, name)) for name in _ARCH_FIELDS}
        super().__init__(**kwargs)
        for name, value in arch.items():
            setattr(self, name, value)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "VLConfig":
        cfg.validate()
        return cls(**dataclasses.asdict(cfg), **kwargs)

    def to_model_config(self) -> ModelConfig:
        cfg = ModelConfig(**{name: getattr(self, name) for name in _ARCH_FIELDS})
        cfg.validate()
        return cfg


@dataclass
class VLModelOutput(ModelOutput):
    """``loss`` (captioning, when labels are given), text ``logits`` and final hidden states."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    image_hidden_states: torch.Tensor | None = None  # (B, Ni, D)
    text_hidden_states: torch.Tensor | None = None  # (B, T, D)


class VLModel(PreTrainedModel):
    """Image patch encoder and text decoder on one fused-attention backbone."""

    config_class = VLConfig
    base_model_prefix = "vlmodel"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "backbone.text_embed.weight"}

    def __init__(self, config: VLConfig):
        super().__init__(config)
        cfg = config.to_model_config()
        self.backbone = VLBackbone(cfg)
        self.image_proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.image_proj.init_std = self.text_proj.init_std = cfg.width ** -0.5  # see _init_weights
        self.post_init()

    # -- HF plumbing --------------------------------------------------------------------------
    def _init_weights(self, module):
        """CLIP's width- and depth-aware initialisation (OpenAI CLIP, OpenCLIP): attention inputs and
        projections std width^-1/2, the two residual outputs of a block width^-1/2 (2 depth)^-1/2, the
        MLP input (2 width)^-1/2. timm's flat std=0.02 left a small model's image (and caption)
        embeddings nearly identical at the start: a 150-step contrastive run at width 192 stayed at
        chance, where this one learns (tools/compare_openclip.py)."""
        width_std = self.config.width ** -0.5
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            std = getattr(module, "init_std", None)  # set by Block and __init__ (HF inits each tensor once)
            if std is None:
                init.trunc_normal_(module.weight, std=0.02)
            else:
                init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=0.02)
        elif isinstance(module, VLBackbone):
            init.normal_(module.cls_token, std=width_std)
            init.normal_(module.pos_embed, std=width_std)
            init.trunc_normal_(module.text_pos_embed, std=0.01)
            init.zeros_(module.modality_embed)

    def get_input_embeddings(self):
        return self.backbone.text_embed

    def set_input_embeddings(self, value):
        self.backbone.text_embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # -- switches (timm-style names) ----------------------------------------------------------
    def set_attn_backend(self, name: str) -> None:
        """Choose the attention kernel of every block: sdpa, flex, flash_attn or eager."""
        self.backbone.set_attn_backend(name)

    @property
    def attn_backend(self) -> str:
        return self.backbone.attn_backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    # -- embeddings ---------------------------------------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) final-normed image tokens (timm ``forward_features``)."""
        return self.backbone(pixel_values=pixel_values, layout="image").image

    def pooled_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) the final-normed cls token, what an image embedding reads; the last
        block computes only that token (``pooled_only``: ~3/4 of its work skipped, same values)."""
        return self.backbone(pixel_values=pixel_values, layout="image", pooled_only=True).image[:, 0]

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> (B, E) image embeddings, L2-normalised by default."""
        emb = self.image_proj(self.pooled_image_features(pixel_values))
        return F.normalize(emb, dim=-1) if normalize else emb

    def text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, T) -> (B, T, D) unimodal causal text states after ``text_embed_depth`` blocks."""
        depth = self.config.text_embed_depth or None
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, layout="text",
                             depth=depth).text

    def pooled_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, T) -> (B, D) the unimodal text state at the last real token (``text_features`` pooled),
        with the last of those blocks computing only that token (``pooled_only``)."""
        depth = self.config.text_embed_depth or None
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, layout="text", depth=depth,
                             pooled_only=True).text[:, 0]

    def encode_text(self, input_ids, attention_mask=None, normalize: bool = True) -> torch.Tensor:
        """(B, T) -> (B, E) text embeddings read at the last real token, L2-normalised by default."""
        emb = self.text_proj(self.pooled_text_features(input_ids, attention_mask))
        return F.normalize(emb, dim=-1) if normalize else emb

    # -- forward ------------------------------------------------------------------------------
    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                layout: str | None = None, return_dict: bool | None = None) -> VLModelOutput:
        """Image and/or text through the backbone; with both, ``prefix_lm`` unless ``layout`` says.

        ``labels`` (B, T), usually ``input_ids``: the captioning loss (next-token cross-entropy,
        positions with label -100 or attention_mask 0 ignored).
        """
        out = self.backbone(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                            layout=layout, cross_from_layer=self.config.text_embed_depth)
        logits = self.lm_head(out.text) if out.text is not None else None  # (B, T, V)
        loss = None
        if labels is not None:
            if logits is None:
                raise ValueError("labels were given without input_ids; pass the caption tokens too.")
            if tuple(labels.shape) != tuple(input_ids.shape):
                raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {tuple(input_ids.shape)}.")
            loss = next_token_loss(logits, labels, attention_mask)
        return VLModelOutput(loss=loss, logits=logits, image_hidden_states=out.image,
                             text_hidden_states=out.text)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 30, input_ids=None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy captions (B, T) starting with the prompt (default: BOS), padded after EOS.

        With ``use_cache`` the image prefix and earlier tokens are computed once (KV cache).
        """
        cfg = self.config
        B = pixel_values.shape[0]
        if input_ids is None:
            input_ids = torch.full((B, 1), cfg.bos_token_id, dtype=torch.long, device=pixel_values.device)
        steps = min(max_new_tokens, cfg.max_text_len - input_ids.shape[1])
        if steps <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room: the prompt has "
                             f"{input_ids.shape[1]} of max_text_len={cfg.max_text_len} positions.")
        cache = KVCache() if use_cache else None
        seq, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        step_ids, step_pixels = input_ids, pixel_values
        for _ in range(steps):
            out = self.backbone(pixel_values=step_pixels, input_ids=step_ids, layout="prefix_lm",
                                cross_from_layer=cfg.text_embed_depth, cache=cache)
            nxt = self.lm_head(out.text[:, -1]).argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_token_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done = done | (nxt == cfg.eos_token_id)
            if bool(done.all()):
                break
            step_ids, step_pixels = (nxt[:, None], None) if use_cache else (seq, pixel_values)
        return seq
