"""The fewest backbone forwards that give every objective what it declared it needs.

Plan (K = ``model.config.text_embed_depth``):

* ``caption`` needed: one ``prefix_lm`` forward with text reading the image from block K on. Its
  image tokens never attend to text, so they are the image-only tokens; for K > 0 the text states
  entering block K have not seen the image either, so the unimodal ``text`` is read there
  (``output_layers=(K,)`` + the final norm). This is CoCa in one pass.
* ``image`` not yet produced: an ``image`` forward.
* ``text`` not yet produced (no caption forward, or K = 0): a causal ``text`` forward of K blocks
  (all when K = 0), i.e. exactly ``model.encode_text``'s features.
* ``image_pooled`` / ``text_pooled``: pooled from ``image`` / ``text`` when those were produced;
  asked alone (contrastive without captioning), ``model.pooled_image_features`` /
  ``pooled_text_features``: the same forwards with the last block computing only the cls / last
  real token, which is all an embedding reads (``encode_image`` / ``encode_text`` run them too).

The embeddings built from these (:mod:`vlpretrain.objectives.embeddings`) equal
``model.encode_image`` / ``model.encode_text``; a test holds them to it.
"""

from __future__ import annotations

from torch import nn

from vlpretrain.layers.draws import SEED_KEY, fork
from vlpretrain.models.heads import pool_image, pool_text
from vlpretrain.objectives.base import NEEDS, SharedFeatures


def shared_forward(model: nn.Module, batch: dict, needs: frozenset[str] | set[str]) -> SharedFeatures:
    """Run the planned forwards of ``model`` (a VLModel) on ``batch`` for ``needs`` (subset of NEEDS)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown shared-forward needs {sorted(unknown)}; valid: {', '.join(NEEDS)}.")
    backbone, K = model.backbone, model.config.text_embed_depth
    pixels, ids, mask = batch.get("pixel_values"), batch.get("input_ids"), batch.get("attention_mask")
    seeds = batch.get(SEED_KEY)  # per-sample patch dropout when the batch has seeds (layers/draws.py)
    out = SharedFeatures()
    if "caption" in needs:
        layers = (K,) if {"text", "text_pooled"} & set(needs) and K > 0 else ()
        res = backbone(pixels, ids, mask, layout="prefix_lm", cross_from_layer=K, output_layers=layers,
                       seeds=fork(seeds, "shared/caption"))
        out.image, out.caption, out.forwards = res.image, res.text, out.forwards + 1
        if layers:
            out.text = backbone.final_norm(res.layer_hidden[K], res.image.shape[1])[1]  # (B, T, D)
    if "image" in needs and out.image is None:
        out.image, out.forwards = model.forward_features(pixels, fork(seeds, "shared/image")), out.forwards + 1
    if "text" in needs and out.text is None:
        out.text, out.forwards = model.text_features(ids, mask), out.forwards + 1
    if "image_pooled" in needs:
        if out.image is None:
            out.image_pooled = model.pooled_image_features(pixels, fork(seeds, "shared/image"))
            out.forwards += 1
        else:
            out.image_pooled = pool_image(out.image)
    if "text_pooled" in needs:
        if out.text is None:
            out.text_pooled, out.forwards = model.pooled_text_features(ids, mask), out.forwards + 1
        else:
            out.text_pooled = pool_text(out.text, mask)
    return out
