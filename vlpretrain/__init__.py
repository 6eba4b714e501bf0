"""vlpretrain: pretraining vision-language models on one shared fused-attention backbone.

``import vlpretrain`` loads nothing heavy: the public classes below are imported on first use
(``from vlpretrain import VLModel``), so the command line and tools that need no model start fast.
Loaded that way, the model classes are registered with ``AutoConfig`` / ``AutoModel`` (models/auto.py).
"""

import importlib

__version__ = "0.1.0"

# public name -> the module it is loaded from on first access (PEP 562)
_LAZY = {
    "VLConfig": "vlpretrain.models.auto",
    "VLModel": "vlpretrain.models.auto",
    "VLModelOutput": "vlpretrain.models.auto",
    "VLProcessor": "vlpretrain.data.processor",
}

__all__ = ["VLConfig", "VLModel", "VLModelOutput", "VLProcessor", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vlpretrain' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
