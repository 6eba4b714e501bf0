"""``VLConfig`` / ``VLModel``: the HuggingFace face of the shared backbone.

``VLModel`` = :class:`~vlpretrain.models.backbone.VLBackbone` + projection heads + a language-model
head. It loads and saves with ``from_pretrained`` / ``save_pretrained`` (safetensors) and is known
to ``AutoConfig`` / ``AutoModel`` once loaded through ``vlpretrain`` (``vlpretrain.models.auto``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from vlpretrain.models.backbone import VLBackbone
from vlpretrain.models.config import ModelConfig
from vlpretrain.models.generation import generate as generate_captions
from vlpretrain.models.generation import resolve_config
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


def strict_from_pretrained(cls, path, args, kwargs, new_keys: tuple[str, ...] = ()):
    """``PreTrainedModel.from_pretrained`` of ``cls``, strict: a missing, unexpected or wrong-shape weight is
    an error naming it (transformers initialises a missing one at random and only reports it), except keys
    starting with ``new_keys`` (a head the folder cannot hold). A trainer checkpoint folder is refused with
    the command that turns it into a model folder: its weights may be sharded and are prefixed by objective."""
    folder = Path(str(path))
    if (folder / "trainer_state.json").is_file() and not (folder / "config.json").is_file():
        raise ValueError(f"'{folder}' is a vlpretrain trainer checkpoint (checkpoints/step_N), not a model folder; "
                         f"its weights may be sharded across processes. Run `vlpretrain export {folder} --out DIR` "
                         f"first (it consolidates them) and load DIR.")
    want_info = kwargs.pop("output_loading_info", False)
    model, info = PreTrainedModel.from_pretrained.__func__(cls, path, *args, output_loading_info=True, **kwargs)
    bad = {what: sorted(str(k) for k in info.get(key) or () if not str(k).startswith(new_keys) or what != "missing")
           for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                             ("wrong shape", "mismatched_keys"))}
    if any(bad.values()):
        named = "; ".join(f"{what} {', '.join(keys[:8])}" + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                          for what, keys in bad.items() if keys)
        raise ValueError(f"the weights in '{path}' do not match {cls.__name__}: {named}. Load them into the model "
                         f"they were saved from (same config and key names).")
    return (model, info) if want_info else model


@dataclass
class VLModelOutput(ModelOutput):
    """``loss`` (captioning, when labels are given), text ``logits``, final hidden states and the pooled image
    token (``pooler_output``, read by the image-feature-extraction pipeline's ``pool=True``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    image_hidden_states: torch.Tensor | None = None  # (B, Ni, D)
    text_hidden_states: torch.Tensor | None = None  # (B, T, D)
    pooler_output: torch.Tensor | None = None  # (B, D) the final-normed cls token (image given)


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
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "VLModel":
        """``PreTrainedModel.from_pretrained``, strict (see :func:`strict_from_pretrained`)."""
        return strict_from_pretrained(cls, pretrained_model_name_or_path, args, kwargs)

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
    def forward_features(self, pixel_values: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) final-normed image tokens (timm ``forward_features``); ``seeds``:
        the backbone's per-row patch-dropout seeds, if any."""
        return self.backbone(pixel_values=pixel_values, layout="image", seeds=seeds).image

    def pooled_image_features(self, pixel_values: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) the final-normed cls token, what an image embedding reads; the last
        block computes only that token (``pooled_only``: ~3/4 of its work skipped, same values). ``seeds``:
        as in :meth:`forward_features`."""
        return self.backbone(pixel_values=pixel_values, layout="image", pooled_only=True, seeds=seeds).image[:, 0]

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> (B, E) image embeddings, L2-normalised by default."""
        emb = self.image_proj(self.pooled_image_features(pixel_values))
        return F.normalize(emb, dim=-1) if normalize else emb

    def text_mask(self, input_ids, attention_mask=None):
        """``attention_mask``, or without one the mask the pad id implies (1 where ``input_ids`` != pad): a
        right-padded batch is then pooled at each caption's EOS and its pads are never targets."""
        if attention_mask is not None or input_ids is None:
            return attention_mask
        return (input_ids != self.config.pad_token_id).long()  # (B, T)

    def text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, T) -> (B, T, D) unimodal causal text states after ``text_embed_depth`` blocks."""
        depth = self.config.text_embed_depth or None
        attention_mask = self.text_mask(input_ids, attention_mask)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, layout="text",
                             depth=depth).text

    def pooled_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, T) -> (B, D) the unimodal text state at the last real token (``text_features`` pooled),
        with the last of those blocks computing only that token (``pooled_only``)."""
        depth = self.config.text_embed_depth or None
        attention_mask = self.text_mask(input_ids, attention_mask)
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
        positions with label -100 or attention_mask 0 ignored). Without ``attention_mask`` the pad id
        implies it (:meth:`text_mask`).
        """
        attention_mask = self.text_mask(input_ids, attention_mask)
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
        pooled = out.image[:, 0] if out.image is not None else None  # (B, D) what image embeddings read
        return VLModelOutput(loss=loss, logits=logits, image_hidden_states=out.image,
                             text_hidden_states=out.text, pooler_output=pooled)

    # -- generation ---------------------------------------------------------------------------
    @classmethod
    def can_generate(cls) -> bool:
        """True: ``generate`` takes transformers' arguments (pipelines read this and ``generation_config``)."""
        return True

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, generation_config=None,
                 **kwargs) -> torch.Tensor:
        """Captions (B, T) for images ``pixel_values``, continuing the prompt ``input_ids`` (default: BOS),
        padded after EOS; takes a processor's output as is (``**processor(images=..., text=...)``).

        Arguments and defaults as transformers' ``generate``: ``max_new_tokens`` / ``max_length``, greedy,
        ``do_sample`` with ``temperature`` / ``top_k`` / ``top_p``, beam search with ``num_beams`` and
        ``length_penalty`` (default 0 here: summed log-probabilities), ``use_cache``,
        ``return_dict_in_generate``; see :mod:`vlpretrain.models.generation`.
        """
        gen = resolve_config(self.generation_config, generation_config, kwargs)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(gen, name) is None:
                setattr(gen, name, getattr(self.config, name))
        return generate_captions(self, pixel_values, input_ids, attention_mask, gen, use_cache=gen.use_cache)
