"""Model code of the engine: the FramePack transformer and checkpoint loading."""

from framepack_backend.models.loading import load_safetensors_state_dict, save_sharded_safetensors
from framepack_backend.models.transformer import FramePackTransformer, TransformerConfig, TransformerOutput

__all__ = [
    "FramePackTransformer",
    "TransformerConfig",
    "TransformerOutput",
    "load_safetensors_state_dict",
    "save_sharded_safetensors",
]
