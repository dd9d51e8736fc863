"""dsv3-jax: DeepSeek-V3 (671B MoE, MLA, MTP, FP8 training) in JAX / Flax NNX."""
from ._platform import avoid_absent_tpu

avoid_absent_tpu()  # before anything touches a JAX backend (see _platform.py)

from .errors import (CheckpointError, ConfigError, DataError, Dsv3Error, GenerationError, MeshError,
                     TokenRangeError)
from .config import ModelConfig, RopeScaling, RuntimeConfig, load_config, load_runtime
from .model import DeepSeekV3, ModelCache, ModelOutput, RouterStats, make_forward
from .checkpoint.orbax_io import load_checkpoint
from .inference import generate
from . import pipeline

__all__ = ["Dsv3Error", "ConfigError", "CheckpointError", "DataError", "GenerationError", "MeshError",
           "TokenRangeError", "ModelConfig", "RopeScaling", "RuntimeConfig", "load_config", "load_runtime",
           "DeepSeekV3", "ModelCache", "ModelOutput", "RouterStats", "make_forward", "load_checkpoint", "generate",
           "pipeline"]
__version__ = "0.1.0"
