"""The root of the project's user-error family, defined in the lowest layer.

``sharding`` must import nothing from ``dsv3_jax`` (it sits below the model) yet raises user errors
(``MeshError``), so the root class lives here and ``dsv3_jax.errors`` re-exports it next to the
model-level errors. The CLI turns any ``Dsv3Error`` into one line and exit code 2.
"""
from __future__ import annotations


class Dsv3Error(Exception):
    """A user error: the message names the input that is wrong and the fix."""


class MeshError(Dsv3Error, ValueError):
    """The requested mesh does not fit the devices or the model."""
