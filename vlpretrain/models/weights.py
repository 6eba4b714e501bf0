"""Strict weight loading: every key accounted for, or an error naming the keys.

Every path that puts saved weights into a model (export, eval, ``train.init_from``, resume, the
end-of-run export) goes through :func:`load_strict`, so no path can leave random weights in place
silently. The one documented exception is a tied ``lm_head.weight``: it is the text embedding, and a
state dict that omits it (as ``save_pretrained`` does) is complete.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

TIED_KEYS = ("lm_head.weight",)  # keys a state dict may omit when the model ties them to another weight
_SHOWN = 8  # keys named in an error; the rest are counted


class WeightMismatch(ValueError):
    """Saved weights whose keys or shapes do not match the model they are loaded into."""


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def weight_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against ``model``'s own state dict."""
    own = model.state_dict()
    tied = set(TIED_KEYS) if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else set()
    missing = sorted(k for k in own if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} (saved {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                    for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    return missing, unexpected, shapes


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model``; a :class:`WeightMismatch` naming every bad key unless all match.

    ``source`` says where the weights came from (a path, "the gathered FSDP state", ...) for the error."""
    missing, unexpected, shapes = weight_mismatch(model, state)
    if missing or unexpected or shapes:
        parts = [f"missing {_named(missing)}" if missing else "", f"unexpected {_named(unexpected)}" if unexpected else "",
                 f"wrong shape {_named(shapes)}" if shapes else ""]
        raise WeightMismatch(
            f"the weights from {source} do not match the {type(model).__name__} they are loaded into: "
            f"{'; '.join(p for p in parts if p)}. Load them into the model they were saved from (same config and "
            f"key names); nothing was loaded.")
    result = model.load_state_dict(dict(state), strict=False)  # every key checked above; tied keys may be absent
    assert not result.unexpected_keys, result.unexpected_keys
    if tied := [k for k in result.missing_keys if k in TIED_KEYS]:
        model.tie_weights()  # the omitted tied weight is the text embedding again
        assert tied == result.missing_keys, result.missing_keys
    return model
