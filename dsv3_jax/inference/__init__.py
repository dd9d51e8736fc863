"""Generation over the model's latent cache (prefill + decode, sampling, MTP speculation)."""
from ..errors import GenerationError
from ..model import LatentCache, ModelCache, init_cache
from .generate import GenerateResult, Generator, generate, sample

__all__ = ["GenerateResult", "GenerationError", "Generator", "LatentCache", "ModelCache", "generate", "init_cache",
           "sample"]
