"""The model classes, registered with transformers' ``AutoConfig`` / ``AutoModel``.

``from vlpretrain import VLModel`` (or VLConfig) loads them through here, so that afterwards
``AutoModel.from_pretrained(folder)`` knows a vlpretrain folder without ``trust_remote_code``.
The exported remote code does not carry this: there transformers registers what it loads.
"""

from transformers import AutoConfig, AutoModel

from vlpretrain.models.modeling import VLConfig, VLModel, VLModelOutput

AutoConfig.register(VLConfig.model_type, VLConfig, exist_ok=True)
AutoModel.register(VLConfig, VLModel, exist_ok=True)

__all__ = ["VLConfig", "VLModel", "VLModelOutput"]
