"""``dsv3 plan`` figures for the README (issue M10): the real 671B programs AOT-compiled by XLA:TPU
(libtpu, no TPU needed) for v5p slices, one JSON line each — bytes per chip, fits, FLOPs, collective
bytes, compile seconds — so the next change shows what it costs.

* ``train``: the 671B train step (seq 4096, one sequence per chip, MTP, aux-free balancing, the default
  remat policy, AdamW with the default bf16 moments) on v5p:8x8x4 (256 chips), expert=64,fsdp=4, bf16
  compute, ep_strategy auto (ragged_a2a at expert=64); ``train_fp8``: the same with quant=fp8;
  ``train_fp8_fp32_moments``: FP8 with fp32 AdamW moments (the heaviest state).
* ``smallest``: the same step on the next smaller slice, v5p:4x4x8 (128 chips; expert=128, as 64 is not
  a product of its physical axes): with fp32 moments, and with moment_dtype=bfloat16.
* ``decode``: one 671B decode step at 32K context over the latent cache, one sequence per batch shard.
* ``v6e``: the train step on the largest v6e slice, v6e:16x16 (256 chips of 32 GiB; expert=256: a 2-D
  torus takes axis sizes 16 or 256), with remat=full and bf16 moments — it does not fit (see README).

Each line: ``case``, the plan's ``bytes_per_chip`` (params, optimizer, arguments, temporaries, outputs,
aliased, total), ``hbm_bytes_per_chip``, ``fits``, ``flops_per_step`` (per chip; XLA counts a scanned
body once), ``collective_bytes_per_step``, ``compile_seconds``, the estimate and the notes. A program that
does not fit reports the compiler's total (arguments included) and compiles in seconds; one that fits
takes minutes (13 min for the 671B train step on two loaded CPU cores).

    python benchmarks/plan.py                 # every case
    python benchmarks/plan.py train decode    # some
"""
from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_platforms", "cpu")   # only compiling for the topology

from common import emit, load_average, log  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402
from dsv3_jax.plan import plan  # noqa: E402
from dsv3_jax.train.config import TrainConfig  # noqa: E402

RT = dict(compute_dtype="bfloat16")
CASES = {
    "train": dict(topology="v5p:8x8x4", mesh="expert=64,fsdp=4", step="train", runtime=RT),
    "train_fp8": dict(topology="v5p:8x8x4", mesh="expert=64,fsdp=4", step="train", runtime={**RT, "quant": "fp8"}),
    "train_fp8_fp32_moments": dict(topology="v5p:8x8x4", mesh="expert=64,fsdp=4", step="train",
                                   runtime={**RT, "quant": "fp8"}, train={"moment_dtype": "float32"}),
    "smallest": dict(topology="v5p:4x4x8", mesh="expert=128", step="train", runtime=RT,
                     train={"moment_dtype": "float32"}),
    "smallest_bf16_moments": dict(topology="v5p:4x4x8", mesh="expert=128", step="train", runtime=RT,
                                  train={"moment_dtype": "bfloat16"}),
    "v6e": dict(topology="v6e:16x16", mesh="expert=256", step="train", runtime={**RT, "remat": "full"}),
    "decode": dict(topology="v5p:8x8x4", mesh="expert=64,fsdp=4", step="decode", runtime=RT, context=32768),
}


def main(names: list[str]) -> None:
    cfg = dsv3.load_config("deepseek_v3_671b")
    for name in names or list(CASES):
        c = CASES[name]
        log(f"plan {name}: {c['step']} on {c['topology']} {c['mesh']} ...")
        p = plan(cfg, c["topology"], c["mesh"], step=c["step"], seq=4096, context=c.get("context", 32768),
                 runtime=dsv3.RuntimeConfig(**c["runtime"]), train=TrainConfig(**c.get("train", {})))
        gib = {k: (v / 2**30 if isinstance(v, (int, float)) else v) for k, v in p.bytes_per_chip.items()}
        emit({"case": name, "config": "deepseek_v3_671b", "topology": p.topology, "chips": p.chips,
              "mesh": {k: v for k, v in p.mesh.items() if v > 1}, "step": p.step, "batch": p.batch, "seq": p.seq,
              "context": c.get("context"), "runtime": c["runtime"], "train": c.get("train", {}),
              "gib_per_chip": gib, "hbm_gib_per_chip": p.hbm_bytes_per_chip / 2**30, "fits": p.fits,
              "flops_per_step": p.flops_per_step, "collective_bytes_per_step": p.collective_bytes_per_step,
              "collectives": p.collectives, "compile_seconds": p.compile_seconds,
              "est_step_seconds": p.est_step_seconds, "est_mfu": p.est_mfu, "notes": p.notes,
              "load_average": load_average(), "cores": os.cpu_count()})


if __name__ == "__main__":
    main(sys.argv[1:])
