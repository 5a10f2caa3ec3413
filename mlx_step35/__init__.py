"""Step-3.5/3.7-Flash with its MTP blocks on MLX."""

from .conversion import convert
from .config import ConfigError, ModelArgs
from .loading import load
from .model import Model
from .safetensors_io import CheckpointError
from .weights import QuantRecipe

__all__ = ["load", "convert", "Model", "ModelArgs", "QuantRecipe", "ConfigError", "CheckpointError"]
