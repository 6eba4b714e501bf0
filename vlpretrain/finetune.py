"""Fine-tuning API: an image classifier on the pretrained model, LiT-style freezing and LoRA.

``VLModel`` itself works with ``transformers.Trainer`` (give it ``pixel_values``, ``input_ids``,
``attention_mask`` and ``labels``; it returns the captioning ``loss``). For classification,
:class:`VLModelForImageClassification` puts a linear head on the L2-normalised image embedding; the
head can start as the zero-shot classifier built from class-name prompts.

The backbone is SHARED by image and text tokens, so what "the image tower" means must be said:

- :func:`freeze_image_only` / :func:`freeze_text_only` freeze the parameters one modality alone uses;
  the shared blocks (attention, and norms/MLPs unless the model has modality experts) and
  ``modality_embed`` (one tensor, both modalities' rows) stay trainable, so image features still change.
- :func:`lock_image_path` is LiT (locked-image tuning): every parameter image tokens pass through is
  frozen, shared blocks included, so image embeddings stay exactly as pretrained; what trains is what
  text alone uses (embeddings, ``text_proj``, and with modality experts the text norms and MLPs, which
  makes LiT on an experts model a real text tower). ``train.freeze: image_path`` applies it in the trainer.

To freeze everything but a head, use ``model.requires_grad_(False)`` and unfreeze the head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from vlpretrain.models.modeling import VLConfig, VLModel, strict_from_pretrained

DEFAULT_TEMPLATES = ("a photo of a {}.", "{}", "an image of a {}.")
# every linear projection of attention and MLP, in shared blocks and text experts alike
LORA_TARGET_MODULES = r".*blocks\.\d+\.(attn\.(qkv|proj)|(text_)?mlp\.(fc1|fc2))"


@torch.no_grad()
def class_text_embeddings(model: VLModel, processor, class_names: Sequence[str],
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(K, E) L2-normalised class embeddings: the mean over ``templates`` of each class's prompt
    embeddings, renormalised (CLIP's prompt ensembling)."""
    if not class_names:
        raise ValueError("class_names is empty; give one name per class.")
    device = next(model.parameters()).device
    prompts = [t.format(name) for name in class_names for t in templates]
    batch = processor(text=prompts)
    emb = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (K*P, E)
    emb = emb.view(len(class_names), len(templates), -1).mean(1)  # (K, E)
    return F.normalize(emb, dim=-1)


class VLModelForImageClassification(PreTrainedModel):
    """Linear classifier on ``VLModel.encode_image`` (normalised); ``labels`` (B,) give ``loss``."""

    config_class = VLConfig
    base_model_prefix = "vlmodel"
    main_input_name = "pixel_values"

    def __init__(self, config: VLConfig):
        super().__init__(config)
        self.vlmodel = VLModel(config)
        self.classifier = nn.Linear(config.embed_dim, config.num_labels)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "VLModelForImageClassification":
        """From a ``VLModel`` folder (a new ``classifier`` head) or a saved classifier; strict otherwise: a
        missing or unexpected weight of the model is an error naming it, never a random initialisation."""
        return strict_from_pretrained(cls, pretrained_model_name_or_path, args, kwargs, new_keys=("classifier.",))

    def _init_weights(self, module):
        if module is self.classifier:
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        else:
            self.vlmodel._init_weights(module)

    @torch.no_grad()
    def init_head_from_class_names(self, processor, class_names: Sequence[str],
                                   templates: Sequence[str] = DEFAULT_TEMPLATES, scale: float = 100.0) -> None:
        """Zero-shot initialisation: row k = ``scale`` * class k's text embedding, bias 0, so the
        untrained classifier is the zero-shot classifier (logits = scale * cosine similarity)."""
        if len(class_names) != self.config.num_labels:
            raise ValueError(f"{len(class_names)} class names for a head of num_labels={self.config.num_labels}.")
        emb = class_text_embeddings(self.vlmodel, processor, class_names, templates)  # (K, E)
        self.classifier.weight.copy_(scale * emb)
        self.classifier.bias.zero_()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.classifier(self.vlmodel.encode_image(pixel_values))  # (B, K)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def _image_only_names(model: VLModel) -> list[str]:
    experts = model.config.modality_experts
    names = []
    for name, _ in model.named_parameters():
        local = name.split("vlmodel.", 1)[-1]
        if local.startswith(("backbone.patch_embed.", "backbone.cls_token", "backbone.pos_embed",
                             "backbone.norm_pre.", "image_proj.")):
            names.append(name)
        elif experts and re.match(r"backbone\.(blocks\.\d+\.(norm1|norm2|mlp)\.|norm\.)", local):
            names.append(name)  # with experts these serve image tokens only (text has text_norm*, text_mlp)
    return names


def _text_only_names(model: VLModel) -> list[str]:
    experts = model.config.modality_experts
    names = []
    for name, _ in model.named_parameters():
        local = name.split("vlmodel.", 1)[-1]
        if local.startswith(("backbone.text_embed.", "backbone.text_pos_embed", "text_proj.", "lm_head.")):
            names.append(name)
        elif experts and re.match(r"backbone\.(blocks\.\d+\.text_(norm1|norm2|mlp)\.|text_norm\.)", local):
            names.append(name)
    return names


def _freeze(model: nn.Module, names: list[str]) -> list[str]:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def freeze_image_only(model: VLModel) -> list[str]:
    """Freeze the parameters only image tokens use; returns their names.

    That is ``patch_embed``, ``cls_token``, ``pos_embed``, ``norm_pre``, ``image_proj`` and, with
    modality experts, each block's image norms and MLP and the final image ``norm``. The shared
    blocks (and ``modality_embed``) stay trainable: see :func:`lock_image_path` for LiT.
    """
    return _freeze(model, _image_only_names(model))


def freeze_text_only(model: VLModel) -> list[str]:
    """Freeze the parameters only text tokens use: ``text_embed`` (= the tied ``lm_head``),
    ``text_pos_embed``, ``text_proj`` and, with modality experts, the text norms and MLPs. The shared
    blocks stay trainable."""
    return _freeze(model, _text_only_names(model))


def lock_image_path(model: VLModel) -> list[str]:
    """LiT: freeze every parameter image tokens pass through (all but the text-only ones); returns their
    names. Image embeddings no longer change; text-only parameters train."""
    text_only = set(_text_only_names(model))
    return _freeze(model, [n for n, _ in model.named_parameters() if n not in text_only])


# train.freeze values (vlpretrain.config.FREEZE_RECIPES) -> what they freeze
FREEZE = {"image_path": lock_image_path, "image_only": freeze_image_only, "text_only": freeze_text_only}


def apply_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               modules_to_save: Sequence[str] = ()):
    """Wrap ``model`` with peft LoRA adapters on every attention (``qkv``, ``proj``) and MLP
    (``fc1``, ``fc2``) projection; ``modules_to_save`` stay fully trainable (e.g. ``["classifier"]``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_MODULES,
                        modules_to_save=list(modules_to_save) or None)
    return get_peft_model(model, config)
