"""vlpretrain: pretraining vision-language models on one shared fused-attention backbone."""

from transformers import AutoConfig, AutoModel

from vlpretrain.data.processor import VLProcessor
from vlpretrain.models.modeling import VLConfig, VLModel, VLModelOutput

__version__ = "0.1.0"

AutoConfig.register(VLConfig.model_type, VLConfig, exist_ok=True)
AutoModel.register(VLConfig, VLModel, exist_ok=True)

__all__ = ["VLConfig", "VLModel", "VLModelOutput", "VLProcessor", "__version__"]
