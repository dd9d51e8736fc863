"""dsv3-jax: DeepSeek-V3 (671B MoE, MLA, MTP, FP8 training) in JAX / Flax NNX."""
from .config import ConfigError, ModelConfig, RopeScaling, load_config
from .model import DeepSeekV3, ModelOutput, RouterStats, TokenRangeError, make_forward
from .checkpoint.orbax_io import load_checkpoint
from .inference import generate

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "load_config", "DeepSeekV3", "ModelOutput",
           "RouterStats", "TokenRangeError", "make_forward", "load_checkpoint", "generate"]
__version__ = "0.1.0"
