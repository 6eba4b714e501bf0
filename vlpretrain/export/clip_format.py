"""``--format clip``: a native ``transformers.CLIPModel`` folder (no remote code).

Expressible when the model has no modality experts (CLIP's towers have one norm/MLP set each) and
``model.pre_norm`` is on (CLIP's vision tower always applies ``pre_layrnorm``). The mapping:

- vision: ``class_embedding`` = cls token; ``position_embedding`` = ``pos_embed`` + image modality
  embedding, plus the patch-conv bias on the patch rows (CLIP's conv has no bias); ``pre_layrnorm`` =
  ``norm_pre``; ``post_layernorm`` = ``norm`` (applied to the cls token only, per-token anyway).
- text: ``token_embedding`` = ``text_embed``; ``position_embedding`` = ``text_pos_embed`` + text modality
  embedding; the first ``text_embed_depth`` blocks (0: all); ``final_layer_norm`` = ``norm``; causal.
- both towers get copies of the shared blocks (``qkv`` split into ``q/k/v_proj``); projections and
  ``logit_scale`` (the checkpoint's ``objectives.contrastive.logit_scale``, a 1-element tensor in training,
  else ln(1/0.07)) as is.
- a sigmoid (SigLIP) loss's ``logit_bias``, which CLIPModel has no place for, stays in the folder as
  ``config.json``'s ``logit_bias`` and the model card says so (softmax over labels, as the zero-shot
  pipeline computes, is unchanged by it; sigmoid probabilities need it). Scale or bias unknown (a
  model folder without a training record) is said too, never filled in silently.

Pooling: ``CLIPTextTransformer`` pools at the first ``eos_token_id`` unless that id is 2, where it
keeps the legacy rule (the position of the largest id). Our EOS is 2, so the export moves EOS to the
tokenizer's last id L-1 (swapping embedding rows 2 and L-1 and the two tokens' ids in the exported
tokenizer); then the pooled position is the EOS, the token ours reads. The exported tokenizer adds
``BOS ... EOS`` itself (a template post-processor), as the stock pipeline expects.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from vlpretrain.export.hub import atomic_folder
from vlpretrain.export.source import LoadedModel
from vlpretrain.export.timm_format import NotExpressible

DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature


def check_expressible(config) -> None:
    """Raise :class:`NotExpressible` saying why ``config`` has no native CLIPModel equivalent."""
    if config.modality_experts:
        raise NotExpressible("--format clip: this model has modality experts (per-modality norms and MLPs "
                             "inside shared blocks), which transformers' CLIPModel cannot express. Export with "
                             "--format hf (remote code) instead.")
    if not config.pre_norm:
        raise NotExpressible("--format clip: this model was trained with model.pre_norm=false, but CLIP's vision "
                             "tower always applies pre_layrnorm. Train with model.pre_norm=true for a CLIP export, "
                             "or export with --format hf.")
    if config.vocab_size < 4:
        raise NotExpressible(f"--format clip: vocab_size={config.vocab_size} leaves no id to move EOS to.")


class ClipExportNote(UserWarning):
    """Something a CLIP export could not carry as CLIPModel weights; the folder's README says it too."""


def logit_notes(info) -> list[str]:
    """What the model card and the command line say about the contrastive scale and bias of ``info``."""
    notes = []
    if info.logit_scale is None:
        notes.append(f"The trained logit scale is unknown (a model folder without a training record): CLIP's "
                     f"initial value ln(1/0.07) = {DEFAULT_LOGIT_SCALE:.4f} is written. Export from the run's "
                     "checkpoints/step_N folder to carry the trained one.")
    if info.logit_bias is not None:
        notes.append(f"Trained with a sigmoid (SigLIP) loss, whose logit bias {info.logit_bias:.6g} CLIPModel has no "
                     "parameter for: it is kept as `logit_bias` in config.json. The pairwise logits are "
                     "`logits_per_image + config.logit_bias`, and a pair's probability is their sigmoid. A softmax "
                     "over candidate labels (the zero-shot pipeline's) does not depend on the bias.")
    elif info.logit_scale is None and not info.objectives:
        notes.append("Whether a logit bias was trained (a sigmoid loss) is unknown; none is written.")
    return notes


def clip_config(config, eos_id: int, logit_scale: float):
    from transformers import CLIPConfig

    shared = dict(hidden_size=config.width, intermediate_size=int(config.width * config.mlp_ratio),
                  num_attention_heads=config.num_heads, layer_norm_eps=config.norm_eps, hidden_act="gelu",
                  projection_dim=config.embed_dim)
    text = dict(shared, vocab_size=config.vocab_size, num_hidden_layers=config.text_embed_depth or config.depth,
                max_position_embeddings=config.max_text_len, pad_token_id=config.pad_token_id,
                bos_token_id=config.bos_token_id, eos_token_id=eos_id)
    vision = dict(shared, num_hidden_layers=config.depth, image_size=config.image_size,
                  patch_size=config.patch_size, num_channels=config.in_chans)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.embed_dim,
                      logit_scale_init_value=logit_scale)


def _blocks(ours: dict, prefix: str, depth: int, width: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"{prefix}.encoder.layers.{i}."
        qkv_w = ours[src + "attn.qkv.weight"]  # (3D, D): q, k, v rows
        qkv_b = ours.get(src + "attn.qkv.bias", torch.zeros(3 * width))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = qkv_w[j * width:(j + 1) * width]
            out[dst + f"self_attn.{name}.bias"] = qkv_b[j * width:(j + 1) * width]
        pairs = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for a, b in pairs.items():
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = ours[src + f"{a}.{p}"]
    return out


def clip_state_dict(model, eos_id: int, logit_scale: float) -> dict[str, torch.Tensor]:
    """Our weights under CLIPModel's names, EOS moved from ``model.config.eos_token_id`` to ``eos_id``."""
    c = model.config
    ours = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    mod = ours["modality_embed"]  # (2, D): image, text
    vis_pos = ours["pos_embed"][0] + mod[0]  # (1 + N, D)
    vis_pos[1:] += ours["patch_embed.proj.bias"]
    tokens = ours["text_embed.weight"].clone()  # (V, D)
    tokens[[c.eos_token_id, eos_id]] = tokens[[eos_id, c.eos_token_id]]
    state = {
        "vision_model.embeddings.class_embedding": ours["cls_token"].reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": ours["patch_embed.proj.weight"],
        "vision_model.embeddings.position_embedding.weight": vis_pos,
        "text_model.embeddings.token_embedding.weight": tokens,
        "text_model.embeddings.position_embedding.weight": ours["text_pos_embed"][0] + mod[1],
        "visual_projection.weight": model.image_proj.weight.detach().clone(),
        "text_projection.weight": model.text_proj.weight.detach().clone(),
        "logit_scale": torch.tensor(float(logit_scale)),
    }
    for tower, norm_in, norm_out in (("vision_model", "pre_layrnorm", "post_layernorm"),
                                     ("text_model", None, "final_layer_norm")):
        for p in ("weight", "bias"):
            if norm_in:
                state[f"{tower}.{norm_in}.{p}"] = ours[f"norm_pre.{p}"]
            state[f"{tower}.{norm_out}.{p}"] = ours[f"norm.{p}"]
    state.update(_blocks(ours, "vision_model", c.depth, c.width))
    state.update(_blocks(ours, "text_model", c.text_embed_depth or c.depth, c.width))
    return state


def clip_tokenizer(tokenizer, eos_id: int):
    """``tokenizer`` with EOS renumbered to ``eos_id`` (swapped with the token there) and a post-processor
    that adds ``BOS ... EOS`` (and ``BOS A EOS EOS B EOS`` for pairs, unused here)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    old = tokenizer.eos_token_id
    swap = {old: eos_id, eos_id: old}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]  # {piece: id}
    if not isinstance(vocab, dict):
        raise NotExpressible(f"--format clip: the tokenizer's {spec['model']['type']} model has no id table to "
                             "renumber EOS in; export with --format hf.")
    spec["model"]["vocab"] = {piece: swap.get(i, i) for piece, i in vocab.items()}
    for added in spec.get("added_tokens", []):
        added["id"] = swap.get(added["id"], added["id"])
    backend = Tokenizer.from_str(json.dumps(spec))
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, eos_id)])
    specials = {n: getattr(tokenizer, n) for n in ("pad_token", "bos_token", "eos_token", "unk_token", "mask_token")
                if getattr(tokenizer, n, None) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length, **specials)


def clip_image_processor(settings):
    """A stock ``CLIPImageProcessor`` equal to our eval transform: resize shorter side, centre crop, normalise."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": settings.size}, do_center_crop=True,
                              crop_size={"height": settings.size, "width": settings.size},
                              resample=PILImageResampling[settings.interpolation.upper()], do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(settings.mean),
                              image_std=list(settings.std), do_convert_rgb=True)


def export_clip(loaded: LoadedModel, out: str | Path, license: str = "apache-2.0") -> Path:
    """Write a native CLIP folder at ``out`` (nothing is written when the model is not expressible)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor, info = loaded.model, loaded.processor, loaded.info
    check_expressible(model.config)
    n_tokens = len(processor.tokenizer)
    eos_id = n_tokens - 1
    if eos_id == model.config.eos_token_id or n_tokens > model.config.vocab_size:
        raise NotExpressible(f"--format clip: the tokenizer has {n_tokens} tokens for a vocabulary of "
                             f"{model.config.vocab_size}; EOS cannot be moved off id 2. Export with --format hf.")
    logit_scale = info.logit_scale if info.logit_scale is not None else DEFAULT_LOGIT_SCALE
    clip = CLIPModel(clip_config(model.config, eos_id, logit_scale)).eval()
    clip.load_state_dict(clip_state_dict(model, eos_id, logit_scale), strict=True)
    if info.logit_bias is not None:
        clip.config.logit_bias = info.logit_bias  # saved in config.json beside CLIP's own keys
    stock = CLIPProcessor(image_processor=clip_image_processor(processor.image_settings),
                          tokenizer=clip_tokenizer(processor.tokenizer, eos_id))
    notes = logit_notes(info)
    with atomic_folder(out) as tmp:
        clip.save_pretrained(tmp)
        stock.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"---\nlicense: {license}\nlibrary_name: transformers\npipeline_tag: zero-shot-image-classification\n"
            "tags: [clip, vlpretrain]\n---\n\nA vlpretrain model as a native `transformers.CLIPModel` "
            f"(EOS moved to id {eos_id} so CLIP pools at it).\n\n```python\nfrom transformers import pipeline\n"
            "classify = pipeline(\"zero-shot-image-classification\", model=\"PATH\")\n"
            "classify(image, candidate_labels=[\"cat\", \"dog\"])\n```\n"
            + "".join(f"\n{note}\n" for note in notes))
    for note in notes:
        warnings.warn(f"--format clip: {note}", ClipExportNote, stacklevel=2)
    return Path(out)
