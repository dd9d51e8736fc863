"""Device mesh with the five axes of this project: ``stage`` (pipeline stages, docs/design.md §Pipeline),
``data``, ``fsdp``, ``expert``, ``tensor``."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from .errors import MeshError

AXES = ("stage", "data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; one of them may be -1 (= all remaining devices)."""
    stage: int = 1
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, spec: str | None) -> "MeshConfig":
        """``"data=2,expert=4"`` → ``MeshConfig(data=2, expert=4)``. Sizes are positive integers, or -1
        (one axis at most: all remaining devices); ``MeshError`` names the item and the fix."""
        if not spec:
            return cls()
        kw: dict[str, int] = {}
        example = "(fix: write AXIS=N items, e.g. --mesh data=2,expert=4)"
        for item in spec.split(","):
            if "=" not in item:
                raise MeshError(f"mesh {spec}: item {item.strip()!r} is not AXIS=N {example}.")
            k, v = (s.strip() for s in item.split("=", 1))
            if k not in AXES:
                raise MeshError(f"mesh {spec}: unknown mesh axis {k!r} (fix: use some of {list(AXES)}, "
                                "e.g. --mesh data=2,expert=4).")
            if k in kw:
                raise MeshError(f"mesh {spec}: axis {k!r} is given twice (fix: name each axis once).")
            try:
                kw[k] = int(v)
            except ValueError:
                raise MeshError(f"mesh {spec}: axis size {k}={v!r} is not an integer {example}.") from None
            if kw[k] < 1 and kw[k] != -1:
                raise MeshError(f"mesh {spec}: axis size {k}={kw[k]} must be a positive integer, or -1 for all "
                                f"remaining devices (fix: e.g. {k}=2).")
        if list(kw.values()).count(-1) > 1:
            raise MeshError(f"mesh {spec}: only one axis may be -1 (fix: give the other sizes explicitly).")
        return cls(**kw)

    def sizes(self, n_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in AXES}
        bad = [a for a, s in sizes.items() if s == 0 or s < -1]
        if bad:
            raise MeshError(f"mesh axis sizes must be positive or -1, got {sizes} (fix: e.g. data=2,expert=4).")
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise MeshError(f"only one mesh axis may be -1, got {free} (fix: give the other sizes explicitly).")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if n_devices % fixed:
                raise MeshError(f"{n_devices} devices cannot be split into {sizes} (the fixed axes multiply to "
                                f"{fixed}; fix: make them divide {n_devices}).")
            sizes[free[0]] = n_devices // fixed
        if math.prod(sizes.values()) != n_devices:
            raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are available "
                            "(fix: make the sizes multiply to the device count, or set one axis to -1).")
        return sizes


def make_mesh(cfg: MeshConfig | str | None = None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``Mesh`` over all (or the given) devices with axes ``AXES``, Auto axis types (sharding is
    propagated by XLA from the parameter and batch shardings we set)."""
    if not isinstance(cfg, MeshConfig):
        cfg = MeshConfig.parse(cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.sizes(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        from jax.sharding import AxisType
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    except (ImportError, TypeError):  # older jax without axis types
        return Mesh(np.asarray(devices).reshape(shape), AXES)
    except NotImplementedError as e:  # TPU slices: axis sizes must tile the physical torus
        raise MeshError(f"mesh {sizes} cannot be laid out on these {len(devices)} chips' physical topology "
                        f"({str(e).splitlines()[0][:160]}) (fix: choose axis sizes that are products of the "
                        "slice's physical axes, e.g. expert=64 on v5p:8x8x4 but expert=128 on v5p:4x4x8).") from None
