"""Model code for Hugging Face checkpoint layouts and the safetensors loader.

``config``    ModelConfig from config.json (no transformers import)
``model``     StageModel: the embedding / decoder layers / head one pipeline stage owns
``loader``    load_stage: build a stage on the meta device and read only its tensors
``moe``       router, fused experts (expert_ffn) and the shared expert
"""
from dejavu_py.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    load_model_config,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "load_model_config"]
