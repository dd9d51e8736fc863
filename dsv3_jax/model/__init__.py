"""DeepSeek-V3 in Flax NNX: MLA, DeepSeekMoE, MTP, YaRN."""
from .moe import RouterStats, Routing, route
from .functional import make_forward
from .transformer import DeepSeekV3, ModelOutput, TokenRangeError, check_tokens

__all__ = ["make_forward", "DeepSeekV3", "ModelOutput", "RouterStats", "Routing", "TokenRangeError", "check_tokens", "route"]
