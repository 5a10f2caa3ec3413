"""Step-3.5/3.7-Flash with its MTP blocks on MLX."""

from .config import ConfigError, ModelArgs
from .loading import load
from .model import Model
from .safetensors_io import CheckpointError
from .weights import QuantRecipe

__all__ = ["load", "Model", "ModelArgs", "QuantRecipe", "ConfigError", "CheckpointError"]
