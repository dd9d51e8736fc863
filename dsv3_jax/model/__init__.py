"""DeepSeek-V3 in Flax NNX: MLA, DeepSeekMoE, MTP, YaRN."""
from .functional import make_forward
from .mla import LatentCache
from .routing import RouterStats, Routing, route
from .transformer import DeepSeekV3, ModelCache, ModelOutput, TokenRangeError, check_tokens, init_cache

__all__ = ["make_forward", "DeepSeekV3", "LatentCache", "ModelCache", "ModelOutput", "RouterStats", "Routing",
           "TokenRangeError", "check_tokens", "init_cache", "route"]
