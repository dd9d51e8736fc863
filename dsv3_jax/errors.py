"""The user-error family. Every error a user can cause raises a ``Dsv3Error`` subclass whose
message names the input (file, tensor, flag, position), says what is wrong and how to fix it; the
CLI prints it as one line and exits with code 2. Anything else is a bug.

Each class also derives from ``ValueError`` so callers that catch ``ValueError`` keep working.
The root lives in ``sharding.errors`` because ``sharding`` (below the model) raises ``MeshError``.
"""
from __future__ import annotations

from sharding.errors import Dsv3Error, MeshError


class ConfigError(Dsv3Error, ValueError):
    """A config value is wrong; the message says which field, what value, and how to fix it."""


class CheckpointError(Dsv3Error, ValueError):
    """A checkpoint or weight file is missing, malformed or does not match the config."""


class TokenRangeError(Dsv3Error, ValueError):
    """Token ids of the wrong rank, dtype or range reached the model."""


class GenerationError(Dsv3Error, ValueError):
    """A bad generation request (empty prompt, too long for the context, bad sampling parameter)."""


class DataError(Dsv3Error, ValueError):
    """A data source, tokenizer or batch is missing or malformed."""


class PipelineConfigError(ConfigError):
    """A pipeline setting (schedule, stages, micro-batches) that cannot run; the message names the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data path or tokenizer file does not exist (also a ``FileNotFoundError``)."""


__all__ = ["Dsv3Error", "ConfigError", "CheckpointError", "MeshError", "TokenRangeError", "GenerationError",
           "DataError", "DataNotFoundError", "PipelineConfigError"]
