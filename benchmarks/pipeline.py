"""Pipeline schedules (issue M11): JSON lines per measurement.

* ``simulated_bubble`` (one line per schedule): the simulator's bubble for PP=8 and 20 micro-batches (the
  report's DualPipe figure) against the report's formula from the same chunk times, ratio 1.0 expected.
  Chunk times follow the assumptions under which the report's table is exact (docs/pipeline.md
  §Assumptions): F = 1, W = 1, B = 2 (so the input-gradient half B - W equals F and W <= F, as in the
  zero-bubble paper's equal-time baseline), and F&B = 2.5 (overlapping a forward with a backward hides half
  a forward; the formula is exact for any F&B between max(F, B) and F + B). Each line also gives the bubble
  as a fraction of the step, the step time (makespan), the worst device's stashed micro-batches and the
  parameter copies. GPipe's baseline is the 1F1B formula, which GPipe's bubble also equals.

* ``executed_step`` (one line per schedule): the pipelined train step (``dsv3_jax/train/pipeline_step.py``) of
  a tiny model (1 dense + 4 MoE layers, MTP, 16 x 32 tokens) on 8 fake CPU devices, ``stage=4,data=2``,
  8 micro-batches, timed against the unpipelined step on ``data=8`` (the same devices and batch) in the same
  run; and the bubble the step measures (the share of ticks in which the worst device had no work, counted
  by the step as it runs) against the simulator's for the same grid (``Timeline.ticks()``). Fake devices
  share this machine's cores, so the step time is the total work of all stages plus the pipeline's
  bookkeeping (stash, ``ppermute``s, recomputation in the backward), not a pod's overlapped time.

* ``layout_bytes_671b``: the 671B train state's bytes per chip on v5p:2x8x16 with and without a stage axis
  (from the shardings; ``dsv3 plan --mesh stage=...`` compiles the same program for the compiler's figures).

* ``stage_split_671b``: the 671B model's cost-balanced split over 16 stages against the split by layer
  count (slowest stage over the mean), and its train state per chip on v5p:8x16x16 with ``stage=16``.

* ``compiled_671b`` (only when named): the 671B train step compiled for v5p:8x8x4 with ``stage=4,expert=64``
  (1F1B, 4 micro-batches) against ``expert=64,fsdp=4``, the compiler's bytes per chip (``dsv3 plan``).
* ``compiled_671b_pp16`` (only when named): ``stage=16,expert=64`` on v5p:8x16x8 (1,024 chips), DualPipe
  against 1F1B.

    python benchmarks/pipeline.py            # every measurement but compiled_671b
    python benchmarks/pipeline.py compiled_671b   # the two 671B compiles (~10 min on 2 cores)
    python benchmarks/pipeline.py compiled_671b_pp16   # 16 stages on 1,024 chips: DualPipe vs 1F1B (~8 min)
    python benchmarks/pipeline.py simulated  # some (by name prefix)
"""
from __future__ import annotations

import sys
from fractions import Fraction

from common import emit  # noqa: E402  (puts the repo root on sys.path)

from dsv3_jax.pipeline import SCHEDULES, simulate  # noqa: E402

PP, MICROBATCHES = 8, 20
F, B, W, FB = Fraction(1), Fraction(2), Fraction(1), Fraction(5, 2)


def report_bubble(schedule: str, pp: int, f=F, b=B, w=W, fb=FB):
    """The report's bubble formula (docs/architecture.md §9); GPipe's equals 1F1B's."""
    return {"gpipe": (pp - 1) * (f + b), "1f1b": (pp - 1) * (f + b), "zb1p": (pp - 1) * (f + b - 2 * w),
            "dualpipe": (Fraction(pp, 2) - 1) * (fb + b - 3 * w)}[schedule]


def simulated_bubble() -> None:
    for schedule in SCHEDULES:
        t = simulate(schedule, pp=PP, microbatches=MICROBATCHES, f=F, b=B, w=W, fb=FB)
        ours, baseline = t.bubble, report_bubble(schedule, PP)
        emit({"bench": "pipeline.simulated_bubble", "schedule": schedule, "pp": PP, "microbatches": MICROBATCHES,
              "times": {"F": float(F), "B": float(B), "W": float(W), "F&B": float(FB)},
              "ours": float(ours), "baseline": float(baseline), "baseline_is": "report formula",
              "ratio": float(ours / baseline), "bubble_fraction": float(ours / t.makespan),
              "makespan": float(t.makespan), "activations_worst_device": max(t.activations),
              "param_copies": t.param_copies})


def executed_step() -> None:
    import os
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import side_by_side
    from dsv3_jax.config import RuntimeConfig, load_config
    from dsv3_jax.pipeline.config import PipelineConfig
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.program import train_program
    from sharding import DEFAULT_RULES, make_mesh

    cfg = dataclasses.replace(load_config("tiny"), num_layers=5)
    rt, t = RuntimeConfig(compute_dtype="float32"), TrainConfig(steps=100, moment_dtype="float32")
    pp, micro, rows, seq = 4, 8, 16, 32
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, seq + 1))
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((rows, seq)),
             "positions": np.broadcast_to(np.arange(seq), (rows, seq)), "loss_mask": np.ones((rows, seq))}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}

    def stepper(mesh_spec, pipeline=None):
        prog = train_program(cfg, rt, t, make_mesh(mesh_spec), DEFAULT_RULES, pipeline=pipeline)
        from flax import nnx
        from dsv3_jax.model.layers import RouterBias
        _, p, b, r = nnx.split(prog.build(), nnx.Param, RouterBias, ...)
        state = jax.device_put({"params": p, "bias": b, "rest": r, "opt": prog.tx.init(p),
                                "applied": jnp.zeros((), jnp.int32)}, prog.shardings)
        xb, poison = jax.device_put(batch, prog.batch_sharding), jnp.zeros((), jnp.float32)
        return lambda: prog.step(state, xb, poison)

    base = stepper("data=8")
    for schedule in SCHEDULES:
        run = stepper(f"stage={pp},data=2", PipelineConfig(schedule, micro))
        times, load = side_by_side({"pipelined": run, "unpipelined": base}, warmup=1, repeats=3,
                                   sync={k: jax.block_until_ready for k in ("pipelined", "unpipelined")})
        _, m = run()
        ticks = simulate(schedule, pp=pp, microbatches=micro).ticks()
        sim_idle = max(sum(row[d] is None for row in ticks) for d in range(pp)) / len(ticks)
        measured_idle = 1 - int(np.min(np.asarray(m["busy_ticks"]))) / len(ticks)
        ours, baseline = times["pipelined"]["median_s"], times["unpipelined"]["median_s"]
        emit({"bench": "pipeline.executed_step", "schedule": schedule, "mesh": f"stage={pp},data=2",
              "microbatches": micro, "tokens": rows * seq, "ours": ours, "baseline": baseline,
              "baseline_is": "unpipelined step on data=8", "ratio": ours / baseline,
              "bubble_measured": measured_idle, "bubble_simulated": sim_idle,
              "bubble_ratio": measured_idle / sim_idle if sim_idle else None, "ticks": len(ticks),
              "activations_measured": [int(x) for x in np.asarray(m["activations"])],
              "activations_simulated": simulate(schedule, pp=pp, microbatches=micro).activations, **load})


def layout_bytes_671b() -> None:
    """Per-chip parameter + AdamW bytes of the 671B train state on a v5p:2x8x16 slice (256 chips), from the
    shardings ``train_program`` lays out (no compile): with ``stage=2`` (the MoE stack split over stages, the
    rest replicated over them) against the same chips without a stage axis. 58 MoE layers: 2 is the only
    stage count below 29 that divides them; the torus takes ``stage`` on its 2-chip axis."""
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dsv3_jax.config import RuntimeConfig, load_config
    from dsv3_jax.pipeline.config import PipelineConfig
    from dsv3_jax.plan import _per_chip_bytes, topology_devices
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.program import train_program
    from sharding import DEFAULT_RULES, make_mesh

    cfg, devs = load_config("deepseek_v3_671b"), topology_devices("v5p:2x8x16")

    def gib(spec, pipeline=None):
        prog = train_program(cfg, RuntimeConfig(), TrainConfig(), make_mesh(spec, devices=devs), DEFAULT_RULES,
                             pipeline=pipeline)
        return sum(_per_chip_bytes(prog.abstract[k], prog.shardings[k]) for k in prog.abstract) / 2**30
    base = gib("fsdp=16,expert=16")
    for schedule in ("1f1b", "dualpipe"):
        ours = gib("stage=2,fsdp=16,expert=8", PipelineConfig(schedule, 4))
        emit({"bench": "pipeline.layout_bytes_671b", "topology": "v5p:2x8x16", "schedule": schedule,
              "mesh": "stage=2,fsdp=16,expert=8", "baseline_mesh": "fsdp=16,expert=16",
              "ours_gib_per_chip": ours, "baseline_gib_per_chip": base, "ratio": ours / base,
              "what": "params + router bias + AdamW moments (stored state; DualPipe's second stage copy is a "
                      "temporary of the step, not stored)"})


def stage_split_671b() -> None:
    """The 671B model (3 dense + 58 MoE layers + 1 MTP depth) on 16 stages: the cost-balanced split
    (``pipeline.partition.balance``) against the split by layer count (58 = 10 x 4 + 6 x 3, the extra layers
    on the first stages), as the most expensive stage's forward FLOPs per token over the mean stage's (1 =
    perfect balance; a pipeline runs at the pace of its slowest stage); then the train state per chip on
    v5p:8x16x16 (2048 chips) with ``stage=16`` (uneven split, stack stored padded to 16 x 4 rows) against the
    same chips without a stage axis, from the shardings (no compile)."""
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dsv3_jax.config import RuntimeConfig, load_config
    from dsv3_jax.pipeline.config import PipelineConfig
    from dsv3_jax.pipeline.partition import balance, stage_costs, stage_extras
    from dsv3_jax.plan import _per_chip_bytes, topology_devices
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.program import train_program
    from sharding import DEFAULT_RULES, make_mesh

    cfg, pp = load_config("deepseek_v3_671b"), 16
    extras = stage_extras(cfg, cfg.num_mtp_layers)
    ours, naive = balance(cfg, pp, cfg.num_mtp_layers), (4,) * 10 + (3,) * 6

    def imbalance(split):
        c = stage_costs(split, *extras)
        return max(c) / (sum(c) / pp)
    emit({"bench": "pipeline.stage_split_671b", "pp": pp, "split": list(ours), "baseline_split": list(naive),
          "ours_max_over_mean": imbalance(ours), "baseline_max_over_mean": imbalance(naive),
          "ratio": imbalance(ours) / imbalance(naive),
          "moe_layer_units": {"first_stage_extra": extras[1] / extras[0], "last_stage_extra": extras[2] / extras[0]},
          "what": "slowest stage's forward FLOPs/token over the mean stage's (seq 4096)"})
    devs = topology_devices("v5p:8x16x16")

    def gib(spec, pipeline=None):
        prog = train_program(cfg, RuntimeConfig(), TrainConfig(), make_mesh(spec, devices=devs), DEFAULT_RULES,
                             pipeline=pipeline)
        return sum(_per_chip_bytes(prog.abstract[k], prog.shardings[k]) for k in prog.abstract) / 2**30
    base, staged = gib("fsdp=128,expert=16"), gib("stage=16,fsdp=8,expert=16", PipelineConfig("1f1b", pp))
    emit({"bench": "pipeline.stage_split_671b_bytes", "topology": "v5p:8x16x16", "mesh": "stage=16,fsdp=8,expert=16",
          "baseline_mesh": "fsdp=128,expert=16", "ours_gib_per_chip": staged, "baseline_gib_per_chip": base,
          "ratio": staged / base, "what": "params + router bias + AdamW moments (stored state, stack padded to "
                                          "16 x 4 rows for the [1, 4 x 14, 1] split)"})


def _compiled_bytes(ours, baseline) -> dict:
    """The JSON fields comparing two ``dsv3 plan`` results: GiB per chip (total and by kind), their
    ratio, whether each fits the chip's HBM, and the compile times."""
    gib = {k: {n: v / 2**30 for n, v in p.bytes_per_chip.items()} for k, p in (("ours", ours), ("baseline", baseline))}
    return {"ours_gib_per_chip": gib["ours"]["total"], "baseline_gib_per_chip": gib["baseline"]["total"],
            "ratio": gib["ours"]["total"] / gib["baseline"]["total"], "ours_fits": ours.fits,
            "baseline_fits": baseline.fits, "hbm_gib_per_chip": baseline.hbm_bytes_per_chip / 2**30,
            "ours_bytes_gib": gib["ours"], "baseline_bytes_gib": gib["baseline"],
            "compile_seconds": {"ours": ours.compile_seconds, "baseline": baseline.compile_seconds},
            "what": "the compiler's bytes per chip (arguments + temporaries + outputs - aliased)"}


def compiled_671b() -> None:
    """The 671B train step (seq 4096, 256 sequences, default runtime and recipe: bf16 compute, bf16 AdamW
    moments, MTP) compiled by XLA:TPU for v5p:8x8x4 (256 chips) with a stage axis (``stage=4,expert=64``,
    1F1B over 4 micro-batches, the cost-balanced split) and without (``expert=64,fsdp=4``): the compiler's
    bytes per chip (``dsv3 plan``). Two compiles of several minutes each, so only when named."""
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dsv3_jax.config import load_config
    from dsv3_jax.pipeline.config import PipelineConfig
    from dsv3_jax.plan import plan

    cfg, topo = load_config("deepseek_v3_671b"), "v5p:8x8x4"
    base = plan(cfg, topo, "expert=64,fsdp=4", batch=256, seq=4096)
    staged = plan(cfg, topo, "stage=4,expert=64", batch=256, seq=4096,
                  pipeline=PipelineConfig(schedule="1f1b", microbatches=4))
    emit({"bench": "pipeline.compiled_671b", "topology": topo, "mesh": "stage=4,expert=64", "baseline_mesh":
          "expert=64,fsdp=4", "schedule": "1f1b", "microbatches": 4, "batch": 256, "seq": 4096,
          **_compiled_bytes(staged, base)})


def compiled_671b_pp16() -> None:
    """The report's shape, 16 stages x 64-way expert parallelism, on v5p:8x16x8 (1,024 chips): the 671B
    train step compiled with DualPipe (32 micro-batches of 64 sequences) against 1F1B (16 of 64), the
    compiler's bytes per chip. Two compiles of ~4 minutes each, so only when named."""
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dsv3_jax.config import load_config
    from dsv3_jax.pipeline.config import PipelineConfig
    from dsv3_jax.plan import plan

    cfg, topo, mesh = load_config("deepseek_v3_671b"), "v5p:8x16x8", "stage=16,expert=64"
    one = plan(cfg, topo, mesh, batch=1024, seq=4096, pipeline=PipelineConfig(schedule="1f1b", microbatches=16))
    dual = plan(cfg, topo, mesh, batch=2048, seq=4096, pipeline=PipelineConfig(schedule="dualpipe", microbatches=32))
    emit({"bench": "pipeline.compiled_671b_pp16", "topology": topo, "mesh": mesh, "schedule": "dualpipe",
          "baseline_schedule": "1f1b", "microbatches": 32, "baseline_microbatches": 16, "sequences_per_microbatch": 64,
          "seq": 4096, **_compiled_bytes(dual, one)})


MEASUREMENTS = {"simulated_bubble": simulated_bubble, "executed_step": executed_step,
                "layout_bytes_671b": layout_bytes_671b, "stage_split_671b": stage_split_671b,
                "compiled_671b": compiled_671b, "compiled_671b_pp16": compiled_671b_pp16}
ON_REQUEST = {"compiled_671b", "compiled_671b_pp16"}   # minutes of compiling: run when named, not by default


def main(names: list[str]) -> None:
    for name, fn in MEASUREMENTS.items():
        # by name prefix; the on-request compiles only by their exact name (compiled_671b is not _pp16)
        if (not names and name not in ON_REQUEST) or any(
                name == n or (name not in ON_REQUEST and name.startswith(n)) for n in names):
            fn()


if __name__ == "__main__":
    main(sys.argv[1:])
