"""The run's model before training: its vocabulary and special ids from the run's tokenizer, or
``train.init_from``'s model folder or checkpoint (weights and architecture) loaded strictly."""

from __future__ import annotations

from vlpretrain.config import ConfigError, ExperimentConfig
from vlpretrain.models.from_timm import PREFIX as TIMM_PREFIX
from vlpretrain.models.modeling import VLConfig, VLModel
from vlpretrain.models.weights import load_strict

SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")


def _tokenizer_into_model_config(cfg: ExperimentConfig, tokenizer) -> None:
    """The model's vocabulary and special ids come from the tokenizer (one source of truth)."""
    m = cfg.model
    m.vocab_size = len(tokenizer)
    for name in SPECIAL_IDS:
        value = getattr(tokenizer, name, None)
        setattr(m, name, None if value is None else int(value))  # None mask: objectives needing one say so
    m.validate()


def _model_from_pretrained(cfg: ExperimentConfig, source, tokenizer) -> VLModel:
    """``train.init_from`` (``source``: its model folder or ``checkpoints/step_N`` folder, loaded): the
    pretrained weights and architecture, the run's own non-architecture keys, and a tokenizer the model knows."""
    pretrained = source.model
    own = {k: getattr(cfg.model, k) for k in ("attn_backend", "patch_dropout")}
    cfg.model = pretrained.config.to_model_config()
    for k, v in own.items():
        setattr(cfg.model, k, v)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(f"the run's tokenizer has {len(tokenizer)} tokens but train.init_from's model only "
                          f"{cfg.model.vocab_size}; use the tokenizer saved with that model.")
    for name in SPECIAL_IDS:
        ours, theirs = getattr(tokenizer, name, None), getattr(cfg.model, name)
        if ours is not None and ours != theirs:
            raise ConfigError(f"the run's tokenizer's {name} is {ours} but train.init_from's model uses {theirs}; "
                              f"use the tokenizer saved with that model.")
    model = VLModel(VLConfig.from_model_config(cfg.model))
    load_strict(model, pretrained.state_dict(), f"train.init_from '{cfg.train.init_from}'")
    return model


def _load_init_from(init_from: str | None):
    """``train.init_from``'s model folder or checkpoint, loaded (weights, processor, facts); None without it."""
    if not init_from or init_from.startswith(TIMM_PREFIX):  # timm:NAME is read by models/from_timm.py
        return None
    from vlpretrain.export.source import load_source

    return load_source(init_from)

