"""Pipeline parallelism: static schedules (GPipe, 1F1B, ZB1P, DualPipe), their simulator and
tick tables, per-stage memory (docs/pipeline.md). The jitted step that runs them over a ``stage`` mesh axis is
``dsv3_jax.train.pipeline_step`` (it needs the train step; this package stays below ``train``)."""
from dsv3_jax.pipeline.schedules import SCHEDULES, Op, device_ops, stage_of
from dsv3_jax.pipeline.simulate import Event, Timeline, simulate

__all__ = ["SCHEDULES", "Op", "device_ops", "stage_of", "Event", "Timeline", "simulate"]
