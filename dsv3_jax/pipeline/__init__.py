"""Pipeline parallelism: static schedules (GPipe, 1F1B, ZB1P, DualPipe), their simulator, and the executor
that runs them over a ``stage`` mesh axis (docs/pipeline.md)."""
from dsv3_jax.pipeline.schedules import SCHEDULES, Op, device_ops, stage_of
from dsv3_jax.pipeline.simulate import Event, Timeline, simulate

__all__ = ["SCHEDULES", "Op", "device_ops", "stage_of", "Event", "Timeline", "simulate"]
