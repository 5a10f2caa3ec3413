"""Step-3.5/3.7-Flash with its MTP blocks on MLX."""

from .config import ConfigError, ModelArgs
from .conversion import convert
from .generation import GenerationResponse, generate, generate_step, stream_generate
from .loading import load
from .model import Model
from .safetensors_io import CheckpointError
from .sampling import make_logits_processors, make_sampler
from .weights import QuantRecipe

__all__ = [
    "load",
    "convert",
    "generate",
    "stream_generate",
    "generate_step",
    "GenerationResponse",
    "make_sampler",
    "make_logits_processors",
    "Model",
    "ModelArgs",
    "QuantRecipe",
    "ConfigError",
    "CheckpointError",
]
