"""Inference: latent-cache generation and MTP speculative decoding (SPEC §2, §5)."""
from .cached import LatentCache, ModelCache, cache_bytes_per_token, init_cache, model_cached, mtp_cached
from .generate import GenerateResult, GenerationError, Generator, generate, sample

__all__ = ["LatentCache", "ModelCache", "cache_bytes_per_token", "init_cache", "model_cached", "mtp_cached",
           "GenerateResult", "GenerationError", "Generator", "generate", "sample"]
